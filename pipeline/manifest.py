"""The manifest: split into shards without loading it, and read one shard at a time.

A shard is `shard_rows` consecutive rows; it is the unit of work and of commit. Boundaries depend
only on the rows before them, so they are stable across runs and rows appended later only add to
the last shard or make new ones. Each shard carries a digest of its bytes, so a resume can tell
"rows appended" (earlier digests equal) from "rows edited" (refused: answers would mismatch).

    plan = plan_manifest(job.input, shard_rows=10_000)
    table = read_shard(job.input, plan, plan.shards[0])   # a pyarrow.Table of that shard's rows

CSV and JSONL are scanned once for record boundaries (quote-aware for CSV: a quoted cell may hold
newlines); Parquet shards are row ranges.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .config import InputConfig
from .errors import JobError

__all__ = ["Shard", "Plan", "plan_manifest", "read_shard", "row_ids", "load_plan_dict", "range_digest"]

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Shard:
    index: int
    first_row: int  # manifest row number of the shard's first row
    rows: int
    start: int  # byte offset (csv/jsonl) or row number (parquet)
    end: int
    digest: str


@dataclass(frozen=True)
class Plan:
    format: str
    size: int
    mtime_ns: int
    shard_rows: int
    columns: list[str]
    header: str  # csv: the header record, base64; jsonl: the Arrow schema, base64
    shards: list[Shard] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches_file(self, path: Path) -> bool:
        st = os.stat(path)
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


def load_plan_dict(d: dict[str, Any]) -> Plan:
    shards = [Shard(**s) for s in d["shards"]]
    return Plan(**{**d, "shards": shards})


def plan_manifest(cfg: InputConfig, shard_rows: int) -> Plan:
    """Scan the manifest for shard boundaries; memory stays flat whatever its size."""
    path = cfg.path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise JobError(f"[input] path: manifest {path} not found") from None
    if cfg.format == "parquet":
        plan = _plan_parquet(path, st, shard_rows)
    else:
        plan = _plan_text(path, st, cfg.format, shard_rows)
    for key in ("id_column", "image_column", "prompt_column"):
        col = getattr(cfg, key)
        if col is not None and col not in plan.columns:
            raise JobError(f"[input] {key}: column {col!r} is not in the manifest (it has: {', '.join(plan.columns)})")
    return plan


def _record_ends(f: io.BufferedReader, start: int, csv: bool) -> Iterator[int]:
    """Yield the byte offset just past each non-blank record, starting at `start`."""
    f.seek(start)
    pos = start
    in_quotes = False
    has_content = False
    tail = b""
    while True:
        chunk = f.read(_CHUNK)
        data = tail + chunk
        if not chunk:
            if data.strip():
                yield pos + len(data)
            return
        lines = data.split(b"\n")
        tail = lines.pop()
        for line in lines:
            pos += len(line) + 1
            if csv and line.count(b'"') % 2:
                in_quotes = not in_quotes
                has_content = True
                if in_quotes:
                    continue
            elif in_quotes:
                continue
            if has_content or line.strip():
                has_content = False
                yield pos


def _plan_text(path: Path, st: os.stat_result, fmt: str, shard_rows: int) -> Plan:
    csv = fmt == "csv"
    with open(path, "rb") as f:
        if csv:
            ends = _record_ends(f, 0, csv=True)
            header_end = next(ends, None)
            if header_end is None:
                raise JobError(f"[input] path: manifest {path} is empty (a CSV needs a header line)")
            f.seek(0)
            header = f.read(header_end)
            try:
                columns = pacsv.read_csv(io.BytesIO(header)).column_names
            except pa.ArrowInvalid as exc:
                raise JobError(f"[input] path: cannot read the CSV header of {path} ({exc})") from None
            body_start = header_end
        else:
            body_start = 0
        bounds: list[tuple[int, int, int]] = []  # (start, end, rows)
        start, rows, last = body_start, 0, body_start
        for end in _record_ends(f, body_start, csv):
            rows += 1
            last = end
            if rows == shard_rows:
                bounds.append((start, end, rows))
                start, rows = end, 0
        if rows:
            bounds.append((start, last, rows))
        shards = []
        first = 0
        for i, (s, e, n) in enumerate(bounds):
            shards.append(Shard(i, first, n, s, e, _digest_range(f, s, e)))
            first += n
    if csv:
        head = base64.b64encode(header).decode()
    else:
        columns, schema = _jsonl_schema(path, shards[0] if shards else None)
        head = base64.b64encode(schema.serialize().to_pybytes()).decode() if schema is not None else ""
    return Plan(fmt, st.st_size, st.st_mtime_ns, shard_rows, list(columns), head, shards)


def _digest_range(f: io.BufferedReader, start: int, end: int) -> str:
    h = hashlib.blake2b(digest_size=12)
    f.seek(start)
    left = end - start
    while left > 0:
        block = f.read(min(left, _CHUNK))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def _jsonl_schema(path: Path, first: Shard | None) -> tuple[list[str], pa.Schema | None]:
    if first is None:
        return [], None
    with open(path, "rb") as f:
        f.seek(first.start)
        data = f.read(first.end - first.start)
    try:
        table = pajson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid as exc:
        raise JobError(f"[input] path: {path} is not valid JSON Lines ({exc})") from None
    # Later shards are read with this schema so every part file has the same columns and types.
    return table.column_names, table.schema


def _plan_parquet(path: Path, st: os.stat_result, shard_rows: int) -> Plan:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise JobError(f"[input] path: cannot read the Parquet manifest {path} ({exc})") from None
    total = pf.metadata.num_rows
    shards = []
    for i, start in enumerate(range(0, total, shard_rows)):
        end = min(start + shard_rows, total)
        shards.append(Shard(i, start, end - start, start, end, _table_digest(_parquet_rows(pf, start, end))))
    return Plan("parquet", st.st_size, st.st_mtime_ns, shard_rows, pf.schema_arrow.names, "", shards)


def _table_digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.blake2b(sink.getvalue().to_pybytes(), digest_size=12).hexdigest()


def range_digest(cfg: InputConfig, start: int, end: int) -> str:
    """The digest a shard spanning [start, end) would have in this manifest (bytes, or Parquet
    rows): how a resume tells rows appended to a shard from rows edited in it."""
    if cfg.format == "parquet":
        return _table_digest(_parquet_rows(pq.ParquetFile(cfg.path), start, end))
    with open(cfg.path, "rb") as f:
        return _digest_range(f, start, end)


def _parquet_rows(pf: pq.ParquetFile, start: int, end: int) -> pa.Table:
    md = pf.metadata
    groups, offset, first_offset = [], 0, None
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if offset + n > start and offset < end:
            groups.append(g)
            if first_offset is None:
                first_offset = offset
        offset += n
    if not groups:
        return pa.Table.from_batches([], schema=pf.schema_arrow)  # not empty_table(): it imports pandas
    table = pf.read_row_groups(groups)
    return table.slice(start - (first_offset or 0), end - start)


def read_shard(cfg: InputConfig, plan: Plan, shard: Shard) -> pa.Table:
    """The shard's rows as a table; CSV cells stay strings exactly as written (ids like "007")."""
    if plan.format == "parquet":
        return _parquet_rows(pq.ParquetFile(cfg.path), shard.start, shard.end)
    with open(cfg.path, "rb") as f:
        f.seek(shard.start)
        body = f.read(shard.end - shard.start)
    if plan.format == "csv":
        header = base64.b64decode(plan.header)
        data = header if header.endswith(b"\n") else header + b"\n"
        try:
            return pacsv.read_csv(
                io.BytesIO(data + body),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in plan.columns}, strings_can_be_null=False
                ),
            )
        except pa.ArrowInvalid as exc:
            raise JobError(f"[input] path: {cfg.path} rows {shard.first_row}-{shard.first_row + shard.rows - 1}: bad CSV ({exc})") from None
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.header)))
    try:
        return pajson.read_json(
            io.BytesIO(body),
            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except pa.ArrowInvalid as exc:
        raise JobError(
            f"[input] path: {cfg.path} rows {shard.first_row}-{shard.first_row + shard.rows - 1}: "
            f"not readable with the columns of the first rows ({exc})"
        ) from None


def row_ids(cfg: InputConfig, table: pa.Table, shard: Shard) -> list[str]:
    """Each row's id: the id column as text, or else its manifest row number (stable on append)."""
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
