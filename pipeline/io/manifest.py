"""The manifest: split into shards without loading it, checked whole, read one shard at a time.

A shard is `shard_rows` consecutive rows; it is the unit of work and of commit. Boundaries depend
only on the rows before them, so they are stable across runs and rows appended later only add to
the last shard or make new ones. Each shard carries a digest of its bytes, so a resume can tell
"rows appended" (earlier digests equal) from "rows edited" (refused: answers would mismatch).

    plan = plan_manifest(job.input, shard_rows=10_000)    # a JobError naming the bad rows, if any
    table = read_shard(job.input, plan, plan.shards[0])   # a pyarrow.Table of that shard's rows

Rows are what pyarrow reads, and the shards read one by one give exactly the rows of the whole
file read at once. CSV and JSONL shards are byte ranges cut where records end, as `scan` finds
them in one numpy pass (pyarrow's quoting rules: a line break inside a quoted value is no end);
each is read by `readers` with the CSV header before it, or JSONL with the columns and types of
the first shard's rows. Parquet shards are row ranges. The longest record is kept in the plan,
so pyarrow's read blocks are made to hold it (rows of 64 MB and more).

Planning reads every shard once, as the run will, before anything is sent; the bad rows it
meets (invalid UTF-8, CSV rows with the wrong number of fields, JSON lines that cannot be read,
missing or repeated ids anywhere in the manifest) are reported together by `checks` in one
JobError that names them.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import InputConfig
from ..errors import JobError
from .checks import (
    DIAGNOSE_READS,
    IdCheck,
    Problems,
    diagnose_jsonl,
    jsonl_schema,
    rows_text,
    short,
)
from .readers import block_for, parquet_rows, read_csv, read_jsonl
from .scan import Layout, is_utf8, scan

__all__ = ["Shard", "Plan", "plan_manifest", "read_shard", "row_ids", "load_plan_dict", "range_digest"]

_DIGEST_BLOCK = 8 << 20


@dataclass(frozen=True)
class Shard:
    """`rows` consecutive rows of the manifest: the unit of work and of commit."""

    index: int
    first_row: int  # manifest row number of the shard's first row
    rows: int
    start: int  # byte offset (csv/jsonl) or row number (parquet)
    end: int
    digest: str


@dataclass(frozen=True)
class Plan:
    """A manifest's shards and what it takes to read each alone; kept as the checkpoint's plan.json."""

    format: str
    size: int
    mtime_ns: int
    shard_rows: int
    columns: list[str]
    header: str  # csv: the header record, base64; jsonl: the Arrow schema, base64
    shards: list[Shard] = field(default_factory=list)
    max_record: int = 0  # csv/jsonl: bytes of the longest record; 0 in a plan.json of an earlier version
    checked: bool = False  # every row was checked while planning (ids, encoding, fields); False in older plans

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def block_size(self) -> int | None:
        """The block size pyarrow must read this manifest with (None: its default)."""
        return block_for(self.max_record) if self.max_record else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches_file(self, path: Path) -> bool:
        st = os.stat(path)
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


def load_plan_dict(d: dict[str, Any]) -> Plan:
    shards = [Shard(**s) for s in d["shards"]]
    return Plan(**{**d, "shards": shards})


def plan_manifest(cfg: InputConfig, shard_rows: int) -> Plan:
    """Shard boundaries, digests and the whole manifest checked as the run will read it; memory
    stays flat but for 8 bytes a row when rows have ids. A JobError names every bad row found."""
    try:
        st = os.stat(cfg.path)
    except FileNotFoundError:
        raise JobError(f"[input] path: manifest {cfg.path} not found") from None
    if cfg.format == "parquet":
        return _plan_parquet(cfg, st, shard_rows)
    return _plan_text(cfg, st, shard_rows)


def _check_columns(cfg: InputConfig, columns: list[str]) -> None:
    for key in ("id_column", "image_column", "prompt_column"):
        col = getattr(cfg, key)
        if col is not None and col not in columns:
            raise JobError(f"[input] {key}: column {col!r} is not in the manifest (it has: {', '.join(columns)})")


# -- planning CSV and JSONL --------------------------------------------------------------------


def _plan_text(cfg: InputConfig, st: os.stat_result, shard_rows: int) -> Plan:
    csv = cfg.format == "csv"
    problems = Problems(cfg)
    with open(cfg.path, "rb") as f:
        layout = scan(f, csv, shard_rows, lambda row: problems.add("encoding", "the header" if row < 0 else row))
        block = block_for(layout.max_record)
        if csv:
            if layout.header_end is None:
                raise JobError(f"[input] path: manifest {cfg.path} is empty (a CSV needs a header line)")
            header = _read_range(f, 0, layout.header_end)
            columns = _csv_columns(header, block, problems)
            _check_columns(cfg, columns)
            head = base64.b64encode(header).decode()
        elif layout.bounds:
            first = layout.bounds[0]
            schema = jsonl_schema(_read_range(f, first[0], first[1]), block, problems)
            columns, head = schema.names, base64.b64encode(schema.serialize().to_pybytes()).decode()
            _check_columns(cfg, columns)
        else:  # an empty JSONL: no rows, no columns to check
            columns, head = [], ""
        plan = Plan(cfg.format, st.st_size, st.st_mtime_ns, shard_rows, list(columns), head, [], layout.max_record)
        shards = _check_shards(f, cfg, plan, layout, problems)
    problems.raise_if_any()
    return replace(plan, shards=shards, checked=True)


def _read_range(f: BinaryIO, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


def _csv_columns(header: bytes, block: int, problems: Problems) -> list[str]:
    try:
        names = read_csv(header, b"", block).column_names
    except UnicodeDecodeError:  # the scan has recorded it ("not valid UTF-8 (the header)"): say that
        problems.raise_if_any()
        raise
    except pa.ArrowInvalid as exc:
        problems.add("unreadable", f"the header: {short(exc)}")
        problems.raise_if_any()
        raise
    problems.fields = len(names)
    return names


def _check_shards(f: BinaryIO, cfg: InputConfig, plan: Plan, layout: Layout, problems: Problems) -> list[Shard]:
    """Each shard read as the run will read it: its digest, its rows' problems, its ids."""
    ids = IdCheck(layout.rows, problems) if cfg.id_column else None
    budget = [DIAGNOSE_READS]
    shards: list[Shard] = []
    first = 0
    for index, (start, end, rows) in enumerate(layout.bounds):
        body = _read_range(f, start, end)
        shard = Shard(index, first, rows, start, end, hashlib.blake2b(body, digest_size=12).hexdigest())
        found = _shard_ids(cfg, plan, shard, body, problems, budget)
        if ids is not None and found is not None:
            ids.add(*found)
        shards.append(shard)
        first += rows
    if ids is not None:
        quiet = Problems(cfg)  # reading again finds nothing new
        ids.finish(lambda: (_shard_ids(cfg, plan, s, _read_range(f, s.start, s.end), quiet, [0]) for s in shards))
    return shards


def _shard_ids(
    cfg: InputConfig, plan: Plan, shard: Shard, body: bytes, problems: Problems, budget: list[int]
) -> tuple[pa.ChunkedArray, np.ndarray] | None:
    """Read one shard as the run will, recording its bad rows. Its ids and their row numbers
    (None: no id column, or the shard cannot be read)."""
    rows = np.arange(shard.first_row, shard.first_row + shard.rows)
    where = f"rows {shard.first_row}-{shard.first_row + shard.rows - 1}"
    if plan.format == "csv":
        bad: list[int] = []

        def invalid(row: Any) -> str:  # pyarrow numbers rows from 1, the header included
            bad.append(row.number - 2)
            problems.add("fields", f"{rows_text([shard.first_row + row.number - 2])} has {row.actual_columns}")
            return "skip"

        key = cfg.id_column or plan.columns[0]
        if not is_utf8(memoryview(body)):  # named by the scan; pyarrow decodes the text of invalid rows
            body = body.decode("utf-8", "replace").encode()
        try:  # the id column alone, as bytes: the scan has checked the UTF-8 of every value
            table = read_csv(base64.b64decode(plan.header), body, plan.block_size, only=key, invalid=invalid)
        except pa.ArrowInvalid as exc:
            problems.add("unreadable", f"{where}: {short(exc)}")
            return None
        rows = np.delete(rows, bad)
    else:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.header)))
        try:
            table = read_jsonl(body, schema, plan.block_size)
        except pa.ArrowInvalid:
            table = None
        if table is None or table.num_rows != shard.rows:
            diagnose_jsonl(body, schema, plan.block_size, shard.first_row, problems, budget)
            return None
    if table.num_rows != rows.size:  # the scan and pyarrow disagree: a bug, never a guess
        found = table.num_rows + shard.rows - rows.size
        problems.add("unreadable", f"{where}: pyarrow reads {found} rows where the planner found {shard.rows}")
        return None
    return (table.column(cfg.id_column), rows) if cfg.id_column else None


# -- Parquet -------------------------------------------------------------------------------------


def _plan_parquet(cfg: InputConfig, st: os.stat_result, shard_rows: int) -> Plan:
    try:
        pf = pq.ParquetFile(cfg.path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise JobError(f"[input] path: cannot read the Parquet manifest {cfg.path} ({exc})") from None
    _check_columns(cfg, pf.schema_arrow.names)
    total = pf.metadata.num_rows
    problems = Problems(cfg)
    ids = IdCheck(total, problems) if cfg.id_column else None
    cache: dict[tuple[int, ...], pa.Table] = {}
    shards = []
    for i, start in enumerate(range(0, total, shard_rows)):
        end = min(start + shard_rows, total)
        table = parquet_rows(pf, start, end, cache=cache)
        shards.append(Shard(i, start, end - start, start, end, _table_digest(table)))
        if ids is not None:
            ids.add(table.column(cfg.id_column), np.arange(start, end))
    cache.clear()
    if ids is not None:
        col = [cfg.id_column]
        ids.finish(lambda: (
            (parquet_rows(pf, s.start, s.end, columns=col, cache=cache).column(0), np.arange(s.start, s.end)) for s in shards
        ))
    problems.raise_if_any()
    return Plan("parquet", st.st_size, st.st_mtime_ns, shard_rows, pf.schema_arrow.names, "", shards, checked=True)


def _table_digest(table: pa.Table) -> str:
    """Of the rows' values, not of how Arrow holds them: a slice of a row group (offset > 0) or a
    shard spanning row groups (several chunks) is made one plain array first, since IPC writes
    those differently, and the same rows in a file rewritten with rows appended (other row groups)
    must keep their digest. Tables already plain (one chunk, offset 0) are hashed as they are."""
    if any(c.num_chunks != 1 or c.chunk(0).offset != 0 for c in table.columns):
        table = pa.Table.from_arrays([pa.concat_arrays(c.chunks) if c.num_chunks else pa.array([], c.type)
                                      for c in table.columns], schema=table.schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.blake2b(sink.getvalue().to_pybytes(), digest_size=12).hexdigest()


def range_digest(cfg: InputConfig, start: int, end: int) -> str:
    """The digest a shard spanning [start, end) would have in this manifest (bytes, or Parquet
    rows): how a resume tells rows appended to a shard from rows edited in it."""
    if cfg.format == "parquet":
        return _table_digest(parquet_rows(pq.ParquetFile(cfg.path), start, end))
    h = hashlib.blake2b(digest_size=12)
    with open(cfg.path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, _DIGEST_BLOCK))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


# -- reading a shard -----------------------------------------------------------------------------


def read_shard(cfg: InputConfig, plan: Plan, shard: Shard) -> pa.Table:
    """The shard's rows as a table; CSV cells stay strings exactly as written (ids like "007")."""
    if plan.format == "parquet":
        return parquet_rows(pq.ParquetFile(cfg.path), shard.start, shard.end)
    with open(cfg.path, "rb") as f:
        body = _read_range(f, shard.start, shard.end)
    where = f"{cfg.path} rows {shard.first_row}-{shard.first_row + shard.rows - 1}"
    if plan.format == "csv":
        try:
            return read_csv(base64.b64decode(plan.header), body, plan.block_size, columns=plan.columns)
        except pa.ArrowInvalid as exc:
            raise JobError(f"[input] path: {where}: bad CSV ({short(exc)})") from None
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.header)))
    try:
        return read_jsonl(body, schema, plan.block_size)
    except pa.ArrowInvalid as exc:
        raise JobError(f"[input] path: {where}: not readable with the columns of the first rows ({short(exc)})") from None


def row_ids(cfg: InputConfig, table: pa.Table, shard: Shard) -> list[str]:
    """Each row's id: the id column as text, or else its manifest row number (stable on append).
    Planning has checked every id; this guards a plan saved by an earlier version."""
    if cfg.id_column is None:
        return [str(shard.first_row + i) for i in range(table.num_rows)]
    ids = table.column(cfg.id_column).cast(pa.string()).to_pylist()
    seen: set[str] = set()
    for i, value in enumerate(ids):
        if value is None or value == "":
            raise JobError(f"[input] id_column: manifest row {shard.first_row + i} has no {cfg.id_column!r}; every row needs an id")
        if value in seen:
            raise JobError(f"[input] id_column: id {value!r} appears twice in the manifest; ids must be unique")
        seen.add(value)
    return ids
