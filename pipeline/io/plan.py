"""The plan: a source's files and the shards cut from them, kept as the checkpoint's plan.json.

    plan.files        # every file read, in sorted path order, with what tells a change (size, stamp)
    plan.shards       # the shards in file order; a shard names its file and never spans two
    plan.shard(7)     # by index: an index is a shard's identity (journal, part file, commit record)

A shard's index never changes once given: shards of files added later (and of rows appended to a
file) get new indexes after the highest one, so commits, journals and part files of earlier runs
keep meaning the same rows. A plan written before sources existed (one file, its size and mtime
at the top level) loads as a one-file plan of version 1 (its Parquet digests are of whole shards;
pipeline.io.sources.parquet still computes those to compare with).
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

__all__ = ["FileInfo", "Shard", "Plan", "load_plan_dict", "VERSION"]

VERSION = 2  # 1: one file (size and mtime at the top level), Parquet shards digested whole


@dataclass(frozen=True)
class FileInfo:
    """One file of a source, as listed and planned."""

    name: str  # relative to the source's root, "/"-separated; a one-file source: the file's own name
    size: int
    stamp: str  # what changes when the file does: its mtime in ns, or an object's ETag
    rows: int = 0
    header: str = ""  # csv: this file's header record, base64
    shard: int = -1  # images: the index of the shard this image is a row of
    note: str = ""  # webdataset: why the rest of a damaged tar cannot be read (its last row says so)

    def same(self, other: FileInfo) -> bool:
        return self.size == other.size and self.stamp == other.stamp

    def to_list(self) -> list[Any]:
        extra = {k: v for k in ("header", "shard", "note") if (v := getattr(self, k)) != _DEFAULTS[k]}
        return [self.name, self.size, self.stamp, self.rows, *([extra] if extra else [])]

    @classmethod
    def from_list(cls, item: list[Any]) -> FileInfo:
        return cls(item[0], int(item[1]), str(item[2]), int(item[3]), **(item[4] if len(item) > 4 else {}))


_DEFAULTS = {"header": "", "shard": -1, "note": ""}


@dataclass(frozen=True)
class Shard:
    """`rows` consecutive rows of one file (of an image folder: `rows` images): the unit of work and of commit."""

    index: int
    first_row: int  # the row number of its first row in its file (a one-file manifest's row number)
    rows: int
    start: int  # csv/jsonl: byte offset; parquet: row; webdataset: offset of its first member; images: 0
    end: int
    digest: str
    file: str = ""  # the name of its file (images: of its first image); "" in a plan of version 1


@dataclass(frozen=True)
class Plan:
    """A source's files and shards and what it takes to read each shard alone."""

    format: str
    shard_rows: int
    columns: list[str]
    shards: list[Shard] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    schema: str = ""  # the rows' Arrow schema (IPC, base64): what each shard reads as
    max_record: int = 0  # csv/jsonl: bytes of the longest record; 0 in a plan of an earlier version
    checked: bool = False  # every row was checked while planning (ids, encoding, fields); False in older plans
    single: bool = True  # the path names one file: a row's id is its row number, as before sources
    version: int = VERSION

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def block_size(self) -> int | None:
        """The block size pyarrow must read this manifest with (None: its default)."""
        from .readers import block_for

        return block_for(self.max_record) if self.max_record else None

    def shard(self, index: int) -> Shard:
        return self._by_index[index]

    def file_of(self, shard: Shard) -> FileInfo:
        if self.single or not shard.file:
            return self.files[0]
        return self._by_name[shard.file]

    def next_index(self) -> int:
        return max((s.index for s in self.shards), default=-1) + 1

    @cached_property
    def _by_index(self) -> dict[int, Shard]:
        return {s.index: s for s in self.shards}

    @cached_property
    def _by_name(self) -> dict[str, FileInfo]:
        return {f.name: f for f in self.files}

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("shards", "files")}
        d["shards"] = [asdict(s) for s in self.shards]
        d["files"] = [f.to_list() for f in self.files]
        return d

    def __eq__(self, other: object) -> bool:  # the caches are no part of a plan
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __getstate__(self) -> dict[str, Any]:  # sent to Ray workers without the caches
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    __hash__ = None  # type: ignore[assignment]  # lists inside: not hashable


def load_plan_dict(d: dict[str, Any]) -> Plan:
    """A plan.json of this version or an earlier one (one file: size, mtime_ns and header at the top)."""
    shards = [Shard(**s) for s in d["shards"]]
    known = {f.name for f in fields(Plan)} - {"shards", "files"}
    if "files" in d:
        files = [FileInfo.from_list(item) for item in d["files"]]
        return Plan(**{k: v for k, v in d.items() if k in known}, shards=shards, files=files)
    header = d.get("header", "")
    csv, rows = d["format"] == "csv", sum(s.rows for s in shards)
    one = FileInfo("", int(d["size"]), str(d["mtime_ns"]), rows, header if csv else "")
    schema = header if d["format"] == "jsonl" else ""
    if csv:
        schema = _strings_schema(d["columns"])
    rest = {k: v for k, v in d.items() if k in known and k not in ("schema", "version", "single")}
    return Plan(**rest, shards=shards, files=[one], schema=schema, single=True, version=1)


def _strings_schema(columns: list[str]) -> str:
    import pyarrow as pa

    schema = pa.schema([(c, pa.string()) for c in columns])
    return base64.b64encode(schema.serialize().to_pybytes()).decode()
