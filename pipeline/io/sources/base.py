"""The source seam: a source lists its files, plans shards that name their file, reads one shard.

    source = source_for(cfg)                        # pipeline.io.sources: the format's source
    plan = source.plan(10_000, previous=old)        # shards of new or changed files planned, others kept
    rows = source.read(plan, shard, columns=None)   # ShardRows(table, ids, errors)
    for batch in source.batches(plan, shard, ["image"], 512): ...   # a shard's media, a batch at a time

`FileSource` is the base of the formats whose shards lie in one file each (csv, jsonl, parquet,
webdataset): it plans file by file, keeps the shards of files unchanged since `previous` (same
size and stamp) without reading them, checks ids across every file, and gives indexes (shards
of earlier plans keep theirs; new ones come after the highest). A format implements only what
differs: which files are its own, planning one file, reading one shard.

A row that cannot be read (a damaged tar member, an unreadable sidecar) is an entry of
`ShardRows.errors`: the run writes it as an error row of kind "input" naming the object. A shard
whose file cannot be read at all any more raises `Unreadable` (naming the file).
"""

from __future__ import annotations

import base64
import bisect
from dataclasses import dataclass, field, replace
from typing import ClassVar, Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from ...config import InputConfig
from ...errors import JobError
from ..checks import IdCheck, Problems
from ..plan import FileInfo, Plan, Shard
from ..references import holds_bytes
from .location import Listing, Place

__all__ = ["Source", "FileSource", "ShardRows", "Unreadable", "PlanState", "heavy_columns", "encode_schema",
           "decode_schema", "check_columns"]


class ShardRows(NamedTuple):
    table: pa.Table
    ids: list[str]
    errors: dict[int, str]  # row position -> why it cannot be read (written as an error row of kind "input")


class Unreadable(Exception):
    """A shard's file cannot be read now. `lasting`: it is gone or changed (its rows become error
    rows where their ids are known without it); else its storage failed (the shard waits for
    the next run)."""

    def __init__(self, message: str, lasting: bool = True) -> None:
        super().__init__(message)
        self.lasting = lasting

    @classmethod
    def of(cls, shown: str, exc: BaseException) -> Unreadable:
        """A failure to open or read a file: lasting when it is not there any more."""
        text = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        return cls(f"{shown} cannot be read ({text})", lasting=isinstance(exc, FileNotFoundError))


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def heavy_columns(schema: pa.Schema) -> list[str]:
    """Columns holding image bytes (binary, HF's Image struct, lists of either: io/references.py),
    which are read a window of rows at a time rather than held for a whole shard."""
    return [f.name for f in schema if holds_bytes(f.type)]


@dataclass
class PlanState:
    """What planning carries from file to file: the columns every file must have, the problems
    found, the ids seen, the longest record."""

    problems: Problems
    ids: IdCheck | None
    single: bool
    schema: pa.Schema | None = None
    first: str = ""  # the file whose columns the others must have
    max_record: int = 0
    ordinal: int = 0  # rows of the files before this one
    starts: list[int] = field(default_factory=list)  # each file's first ordinal, for naming rows
    names: list[str] = field(default_factory=list)

    def begin(self, name: str) -> None:
        self.starts.append(self.ordinal)
        self.names.append(name)

    def label(self, ordinal: int) -> int | str:
        """How an error names a row: its row number (one file), else `file:row`."""
        if self.single:
            return ordinal
        at = bisect.bisect_right(self.starts, ordinal) - 1
        return f"{self.names[at]}:{ordinal - self.starts[at]}"

    def row(self, name: str, row: int) -> int | str:
        return row if self.single else f"{name}:{row}"


class Source:
    """A format's way to list, plan and read; see the module's doc."""

    format: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg
        self.place = Place(cfg)

    def accept(self, name: str) -> bool:
        return name.lower().endswith(self.suffixes)

    def list(self) -> Listing:
        listing = self.place.listing(self.accept)
        if not listing.files:
            what = ", ".join(f"{n} {s}" for s, n in sorted(listing.skipped.items())) or "no files"
            raise JobError(f"[input] path: {self.cfg.display} holds no {self.format} files ({'.'.join(self.suffixes[:1])} "
                           f"and the like; it holds {what}); point path at them, or set [input] format")
        if self.cfg.inferred and not listing.single:
            _refuse_mixed(self.cfg, self.format, listing)
        return listing

    def plan(self, shard_rows: int, listing: Listing | None = None, previous: Plan | None = None) -> Plan:
        raise NotImplementedError

    def read(self, plan: Plan, shard: Shard, columns: list[str] | None = None) -> ShardRows:
        raise NotImplementedError

    def batches(self, plan: Plan, shard: Shard, columns: list[str], rows: int) -> Iterator[pa.Table]:
        """The shard's `columns`, `rows` at a time (formats whose rows hold bytes stream them)."""
        table = self.read(plan, shard, columns).table
        for start in range(0, table.num_rows, rows):
            yield table.slice(start, rows)

    def range_digest(self, plan: Plan, shard: Shard) -> str:
        """The digest `shard`'s range of its file has now: rows appended told from rows edited."""
        raise NotImplementedError

    def ids(self, plan: Plan, shard: Shard, table: pa.Table) -> list[str]:
        """Each row's id: the id column as text, or its row number (`file:row` for several files)."""
        if self.cfg.id_column is not None:
            return _id_column(self.cfg, table, shard)
        ids = self.known_ids(plan, shard)
        assert ids is not None and len(ids) == table.num_rows
        return ids

    def shown(self, plan: Plan, name: str) -> str:
        return self.place.shown(plan.single, name)

    def known_ids(self, plan: Plan, shard: Shard) -> list[str] | None:
        """The shard's ids without reading its file (None: they are in it)."""
        if self.cfg.id_column is not None:
            return None
        rows = range(shard.first_row, shard.first_row + shard.rows)
        return [str(r) for r in rows] if plan.single else [f"{shard.file}:{r}" for r in rows]


class FileSource(Source):
    """A format whose shards each lie in one file."""

    def plan_file(self, info: FileInfo, shard_rows: int, state: PlanState) -> tuple[FileInfo, list[Shard]]:
        """One file's shards (indexes not yet given) with their digests; its bad rows told to state.problems."""
        raise NotImplementedError

    def shard_ids(self, plan: Plan, shard: Shard) -> tuple[pa.ChunkedArray, np.ndarray] | None:
        """The id column of a shard and each id's row in its file (None: it cannot be read)."""
        assert self.cfg.id_column is not None
        column = self.read(plan, shard, [self.cfg.id_column]).table.column(self.cfg.id_column)
        return column, np.arange(shard.first_row, shard.first_row + shard.rows)

    def adopt(self, previous: Plan, state: PlanState) -> None:
        """Take the columns of an earlier plan (its files are kept): new files must have them."""
        state.schema = decode_schema(previous.schema) if previous.schema else None
        state.max_record = max(state.max_record, previous.max_record)

    def finish(self, state: PlanState, shard_rows: int, listing: Listing, files: list[FileInfo],
               shards: list[Shard]) -> Plan:
        schema = state.schema if state.schema is not None else pa.schema([])
        return Plan(self.format, shard_rows, schema.names, shards, files, encode_schema(schema), state.max_record,
                    checked=True, single=listing.single)

    def plan(self, shard_rows: int, listing: Listing | None = None, previous: Plan | None = None) -> Plan:
        listing = listing if listing is not None else self.list()
        keep = _keepable(previous, self.format, shard_rows, listing)
        state = PlanState(Problems(self.cfg, _name(self.cfg, listing)), None, listing.single)
        if self.cfg.id_column is not None:
            state.ids = IdCheck(state.problems, state.label)
        keep = {f.name: keep[f.name] for f in listing.files if f.name in keep and keep[f.name].same(f)}
        if keep:
            assert previous is not None
            self.adopt(previous, state)
            state.first = next(iter(keep))
        files: list[FileInfo] = []
        drafts: list[Shard] = []
        kept: set[str] = set()
        earlier: dict[str, list[Shard]] = {}
        for s in previous.shards if keep and previous is not None else ():
            earlier.setdefault(s.file, []).append(s)
        for info in listing.files:
            state.begin(info.name)
            old = keep.get(info.name)
            if old is not None:
                files.append(old)
                drafts += earlier.get(old.name, [])
                kept.add(old.name)
                state.ordinal += old.rows
                continue
            try:
                planned, shards = self.plan_file(info, shard_rows, state)
            except OSError as exc:  # its storage, or the disk: not the rows' fault, and no row read
                raise self.place.failure("read", self.place.shown(listing.single, info.name), exc) from None
            files.append(planned)
            drafts += shards
            state.ordinal += planned.rows
        plan = self.finish(state, shard_rows, listing, files, _indexed(drafts, previous))
        if state.ids is not None:
            self._check_ids(plan, state, kept)
        state.problems.raise_if_any()
        return plan

    def _check_ids(self, plan: Plan, state: PlanState, kept: set[str]) -> None:
        """Ids of the files kept from an earlier plan are read again (a new file may repeat one)."""
        assert state.ids is not None
        firsts = dict(zip(state.names, state.starts))

        def of(shard: Shard) -> tuple[pa.ChunkedArray, np.ndarray] | None:
            found = self.shard_ids(plan, shard)
            return None if found is None else (found[0], found[1] + firsts[shard.file or state.names[0]])

        for shard in plan.shards:
            if (shard.file or "") in kept and (found := of(shard)) is not None:
                state.ids.add(*found)
        state.ids.finish(lambda: (of(s) for s in plan.shards))


def _name(cfg: InputConfig, listing: Listing) -> str:
    """How a message names the manifest: its file's name, or the path of a set of files."""
    return listing.files[0].name if listing.single and listing.files else cfg.display


def _keepable(previous: Plan | None, fmt: str, shard_rows: int, listing: Listing) -> dict[str, FileInfo]:
    """Files of `previous` whose shards a new plan may keep as they are (same file, same size
    and stamp, planned by this version with every row checked)."""
    if previous is None or previous.version < 2 or not previous.checked or previous.format != fmt \
            or previous.shard_rows != shard_rows or previous.single != listing.single:
        return {}
    return {f.name: f for f in previous.files}


def _indexed(drafts: list[Shard], previous: Plan | None) -> list[Shard]:
    """Indexes for planned shards: a shard where an earlier plan had one (same file, same first
    byte or row) keeps its index; the others get new ones after the highest, in file order."""
    old: dict[tuple[str, int], int] = {}
    if previous is not None:
        one = previous.single
        old = {("" if one else s.file, s.start): s.index for s in previous.shards}
    taken = set(old.values())
    nxt = previous.next_index() if previous is not None else 0
    out = []
    for shard in drafts:
        key = ("" if previous is not None and previous.single else shard.file, shard.start)
        index = old.get(key)
        if index is None or index not in taken:
            index, nxt = nxt, nxt + 1
        else:
            taken.discard(index)
        out.append(replace(shard, index=index))
    return out


def check_columns(cfg: InputConfig, columns: list[str]) -> None:
    """The columns the job names are in the manifest."""
    for key in ("id_column", "image_column", "prompt_column"):
        col = getattr(cfg, key)
        if col is not None and col not in columns:
            raise JobError(f"[input] {key}: column {col!r} is not in the manifest (it has: {', '.join(columns)})")


def _id_column(cfg: InputConfig, table: pa.Table, shard: Shard) -> list[str]:
    """Planning has checked every id; this guards a plan saved by an earlier version."""
    assert cfg.id_column is not None
    ids = table.column(cfg.id_column).cast(pa.string()).to_pylist()
    seen: set[str] = set()
    for i, value in enumerate(ids):
        if value is None or value == "":
            raise JobError(f"[input] id_column: manifest row {shard.first_row + i} has no {cfg.id_column!r}; every row needs an id")
        if value in seen:
            raise JobError(f"[input] id_column: id {value!r} appears twice in the manifest; ids must be unique")
        seen.add(value)
    return ids


def _refuse_mixed(cfg: InputConfig, fmt: str, listing: Listing) -> None:
    from ...config.inputs import SUFFIXES

    others = sorted({SUFFIXES[s] for s in listing.skipped if s in SUFFIXES} - {fmt})
    if others:
        kinds = " and ".join([fmt, *others])
        raise JobError(f"[input] path: {cfg.display} holds {kinds} files; set [input] format to the one to read "
                       f"(the others are then left out), or narrow path with a glob such as "
                       f"{cfg.display.rstrip('/')}/**/*{_suffix(fmt)}")


def _suffix(fmt: str) -> str:
    return {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet", "webdataset": ".tar", "images": ".jpg"}[fmt]
