"""WebDataset tar shards: each sample (the run of consecutive members sharing a key) is a row.

As WebDataset reads them: a member `dir/0042.jpg` belongs to the sample whose `__key__` is
`dir/0042` (the name up to the first dot of its base name); what follows the dot names the field.
A row's columns:

    key      the sample's key; the row's id is `<tar>:<key>` (the tar's path relative to the root)
    image    the bytes of its jpg, jpeg, png or webp member (the first found in that order), or null
    txt, json, cls, caption_txt, ...   the text of its members whose last extension is txt, text,
             json or cls (dots made "_", so a prompt may say {caption_txt}); null where a sample
             has none; without a last line break; at most 1 MiB each (a larger one makes the row an
             error row)

A tar is streamed member by member (tarfile's stream mode over an fsspec file), never extracted
to disk: planning reads each tar once, counting samples, hashing each shard's members (names and
bytes) and noting where each shard's first member starts, so a shard is read by seeking there. A
tar damaged part way (a bad header, cut short) keeps the samples before the damage, and one more
row, `<tar>:@damaged`, an error row of kind "input" saying where and why.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from ...errors import JobError
from ..checks import short
from ..plan import FileInfo, Plan, Shard
from .base import FileSource, PlanState, ShardRows, Unreadable, check_columns, decode_schema, encode_schema
from .location import Listing

__all__ = ["WebDatasetSource"]

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "text", "json", "cls")
MAX_TEXT = 1 << 20
DAMAGED = "@damaged"
_CHUNK = 1 << 20


def _split(name: str) -> tuple[str, str] | None:
    """(key, field) of a member name; None for a name without an extension."""
    folder, base = posixpath.split(name)
    if "." not in base.lstrip("."):
        return None
    stem, field = base.split(".", 1) if not base.startswith(".") else (base, "")
    return (posixpath.join(folder, stem), field) if field else None


def _column(field: str) -> str | None:
    """The text column a field fills (None: not a text field)."""
    return field.replace(".", "_").lower() if field.rsplit(".", 1)[-1].lower() in TEXT_EXTENSIONS else None


class _Sample:
    __slots__ = ("key", "offset", "fields")

    def __init__(self, key: str, offset: int) -> None:
        self.key, self.offset = key, offset
        self.fields: dict[str, bytes] = {}


def _samples(f: BinaryIO, end: list[int] | None = None) -> Iterator[_Sample]:
    """The samples from the file's position on, member by member (one sample's bytes held at a
    time). A damaged tar raises tarfile.TarError (or EOFError / OSError) where it is met; one cut
    inside a member's header ends quietly (tarfile's way): `end` gets where its last member ends."""
    start = f.tell()
    tar = tarfile.open(fileobj=f, mode="r|")
    sample: _Sample | None = None
    for member in tar:
        parts = _split(member.name) if member.isfile() else None
        if parts is None:
            continue
        if sample is None or parts[0] != sample.key:
            if sample is not None:
                yield sample
            sample = _Sample(parts[0], member.offset)
        source = tar.extractfile(member)
        assert source is not None
        sample.fields[parts[1]] = source.read()
    if sample is not None:
        yield sample
    if end is not None:
        end.append(start + tar.offset)


def _check_tail(f: BinaryIO, end: int) -> None:
    """After the last member only zeros may follow (the end-of-archive blocks and padding)."""
    f.seek(end)
    tail = f.read(1 << 16)
    if tail.strip(b"\0"):
        raise tarfile.ReadError(f"the bytes after its last whole member (at byte {end}) are not a member: cut short "
                                f"or damaged")


def _hash(h: Any, sample: _Sample) -> None:
    """A shard's digest covers its members' names and bytes, in order."""
    for field, data in sample.fields.items():
        h.update(f"{sample.key}.{field}\0{len(data)}\0".encode())
        h.update(data)


class WebDatasetSource(FileSource):
    format = "webdataset"
    suffixes = (".tar",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.fields: set[str] = set()  # the text columns found while planning

    def adopt(self, previous: Plan, state: PlanState) -> None:
        super().adopt(previous, state)
        self.fields |= {c for c in previous.columns if c not in ("key", "image")}

    def plan_file(self, info: FileInfo, shard_rows: int, state: PlanState) -> tuple[FileInfo, list[Shard]]:
        shards: list[Shard] = []
        h = hashlib.blake2b(digest_size=12)
        count, first, start, note = 0, 0, 0, ""
        with self._open(state.single, info.name) as f:
            end: list[int] = []
            try:
                for sample in _samples(f, end):
                    if count - first == shard_rows:  # the shard is full: it ends where this sample begins
                        shards.append(Shard(-1, first, shard_rows, start, sample.offset, h.hexdigest(), info.name))
                        h, first = hashlib.blake2b(digest_size=12), count
                    if count == first:
                        start = sample.offset
                    _hash(h, sample)
                    self.fields |= {c for field in sample.fields if (c := _column(field)) is not None}
                    count += 1
                _check_tail(f, end[0])
            except (tarfile.TarError, EOFError) as exc:
                note = f"the tar {self.place.shown(state.single, info.name)} is damaged after sample {count}: {short(exc)}"
                if count - first == shard_rows:  # the row saying so starts a shard of its own
                    shards.append(Shard(-1, first, shard_rows, start, f.tell(), h.hexdigest(), info.name))
                    h, first, start = hashlib.blake2b(digest_size=12), count, f.tell()
                h.update(note.encode())
                count += 1
            if count > first:  # `end` is where reading stopped: informative, a shard is read by samples
                shards.append(Shard(-1, first, count - first, start, f.tell(), h.hexdigest(), info.name))
        return FileInfo(info.name, info.size, info.stamp, count, note=note), shards

    def _open(self, single: bool, name: str) -> Any:
        try:
            return self.place.open(single, name)
        except FileNotFoundError:
            raise JobError(f"[input] path: {self.place.shown(single, name)} disappeared while it was planned") from None

    def finish(self, state: PlanState, shard_rows: int, listing: Listing, files: list[FileInfo],
               shards: list[Shard]) -> Plan:
        schema = pa.schema([("key", pa.string()), ("image", pa.binary()), *((c, pa.string()) for c in sorted(self.fields))])
        check_columns(self.cfg, schema.names)
        state.schema = schema
        return super().finish(state, shard_rows, listing, files, shards)

    # -- reading ----------------------------------------------------------------------------

    def read(self, plan: Plan, shard: Shard, columns: list[str] | None = None) -> ShardRows:
        tables, ids, errors = [], [], {}
        for table, batch_ids, batch_errors in self._stream(plan, shard, columns, shard.rows or 1):
            errors.update({len(ids) + i: e for i, e in batch_errors.items()})
            tables.append(table)
            ids += batch_ids
        schema = self._schema(plan, columns)
        return ShardRows(pa.concat_tables(tables) if tables else schema.empty_table(), ids, errors)

    def batches(self, plan: Plan, shard: Shard, columns: list[str], rows: int) -> Iterator[pa.Table]:
        for table, _, _ in self._stream(plan, shard, columns, rows):
            yield table

    def _schema(self, plan: Plan, columns: list[str] | None) -> pa.Schema:
        schema = decode_schema(plan.schema)
        return schema if columns is None else pa.schema([schema.field(c) for c in columns])

    def _stream(self, plan: Plan, shard: Shard, columns: list[str] | None,
                rows: int) -> Iterator[tuple[pa.Table, list[str], dict[int, str]]]:
        """The shard's rows, `rows` at a time: (table, ids, errors)."""
        info = plan.file_of(shard)
        schema = self._schema(plan, columns)
        damaged = bool(info.note) and shard.first_row + shard.rows == info.rows
        wanted = shard.rows - (1 if damaged else 0)
        batch: list[_Sample] = []
        done = 0
        shown = self.place.shown(plan.single, info.name)
        try:
            with self.place.open(plan.single, info.name) as f:
                f.seek(shard.start)
                for sample in _samples(f) if wanted else ():
                    batch.append(sample)
                    done += 1
                    if len(batch) == rows or done == wanted:
                        yield self._table(batch, schema, info, plan)
                        batch = []
                    if done == wanted:
                        break
        except (tarfile.TarError, EOFError) as exc:
            raise Unreadable(f"{shown} cannot be read as planned after {done} samples of shard "
                             f"{shard.index} ({type(exc).__name__}: {short(exc)})") from None
        except (OSError, JobError) as exc:
            raise Unreadable.of(shown, exc) from None
        if done < wanted:
            raise Unreadable(f"{shown} ends after {done} of the {wanted} samples planned for shard {shard.index} "
                             f"(has it changed?)")
        if damaged:
            empty = {f.name: pa.nulls(1, f.type) for f in schema}
            if "key" in empty:
                empty["key"] = pa.array([DAMAGED])
            yield pa.table(empty, schema=schema), [f"{_tar(plan, info)}:{DAMAGED}"], {0: info.note}

    def _table(self, batch: list[_Sample], schema: pa.Schema, info: FileInfo,
               plan: Plan) -> tuple[pa.Table, list[str], dict[int, str]]:
        errors: dict[int, str] = {}
        values: dict[str, list[Any]] = {f.name: [] for f in schema}
        for i, sample in enumerate(batch):
            texts = {c: data for field, data in sample.fields.items() if (c := _column(field)) is not None}
            for name in values:
                if name == "key":
                    values[name].append(sample.key)
                elif name == "image":
                    values[name].append(next((sample.fields[k] for k in IMAGE_FIELDS if k in sample.fields), None))
                else:
                    data = texts.get(name)
                    if data is not None and len(data) > MAX_TEXT:
                        errors[i] = f"member {sample.key}.{name} of {info.name} is over 1 MiB; text members are captions and labels"
                        data = None
                    values[name].append(None if data is None else data.decode("utf-8", "replace").rstrip("\r\n"))
        table = pa.table({n: pa.array(v, schema.field(n).type) for n, v in values.items()}, schema=schema)
        ids = [f"{_tar(plan, info)}:{s.key}" for s in batch]
        if self.cfg.id_column is not None and self.cfg.id_column in values:
            ids = [str(v) for v in values[self.cfg.id_column]]
        return table, ids, errors

    def known_ids(self, plan: Plan, shard: Shard) -> list[str] | None:
        return None  # the keys are in the tar

    def range_digest(self, plan: Plan, shard: Shard) -> str:
        h = hashlib.blake2b(digest_size=12)
        with self.place.open(plan.single, plan.file_of(shard).name) as f:
            f.seek(shard.start)
            for done, sample in enumerate(_samples(f), 1):
                _hash(h, sample)
                if done == shard.rows:
                    break
        return h.hexdigest()


def _tar(plan: Plan, info: FileInfo) -> str:
    return info.name
