"""Parquet files: shards are row ranges of one file, planned from its footer.

Every file must have the first file's columns and types. A shard's digest is of its rows' values,
read a window of rows at a time (fewer rows when they hold bytes) and hashed as plain Arrow IPC,
so memory stays within a window however big the shard, and the same rows in a file rewritten with
rows appended (other row groups) keep their digest. Plans of version 1 hashed whole shards; that
digest is still computed to compare with theirs.

The run reads a shard's light columns whole and its byte columns (`batches`) a window at a time.
Files are opened with a read buffer and without pyarrow's pre-buffering (its default), which
reads every row group a shard spans before the first row: 1 GB for a shard of 10,000 100 KB
images, where a row group at a time is 50 MB.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import JobError
from ..checks import short
from ..plan import FileInfo, Plan, Shard
from ..readers import parquet_rows
from .base import FileSource, PlanState, ShardRows, Unreadable, check_columns

__all__ = ["ParquetSource", "table_digest"]

WINDOW_ROWS = 1024  # rows hashed at a time
WINDOW_ROWS_BYTES = 32  # ... when rows hold bytes (images): a window of 32 x 1 MB images is 32 MB
_READ_BUFFER = 4 << 20  # bytes read from the file at a time (pyarrow's buffered stream)


class _HashSink:
    """A file-like sink that only hashes what is written (an IPC stream, never held)."""

    def __init__(self) -> None:
        self.hash = hashlib.blake2b(digest_size=12)
        self.closed = False

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _plain(table: pa.Table) -> pa.RecordBatch:
    """One array per column at offset 0: IPC writes slices and chunked columns differently."""
    arrays = []
    for column in table.columns:
        if column.num_chunks == 1 and column.chunk(0).offset == 0:
            arrays.append(column.chunk(0))
        else:
            arrays.append(pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type))
    return pa.RecordBatch.from_arrays(arrays, schema=table.schema)


def table_digest(table: pa.Table) -> str:
    """A version 1 plan's digest: the whole shard as one plain IPC stream (as it was computed)."""
    if any(c.num_chunks != 1 or c.chunk(0).offset != 0 for c in table.columns):
        table = pa.Table.from_arrays([pa.concat_arrays(c.chunks) if c.num_chunks else pa.array([], c.type)
                                      for c in table.columns], schema=table.schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.blake2b(sink.getvalue().to_pybytes(), digest_size=12).hexdigest()


def _windows(pf: pq.ParquetFile, start: int, end: int, size: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Rows [start, end) as tables of exactly `size` rows (the last fewer), cut from `start`
    whatever the row groups are."""
    md = pf.metadata
    groups, pos = [], None
    offset = 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if offset + n > start and offset < end:
            groups.append(g)
            pos = offset if pos is None else pos
        offset += n
    if not groups or pos is None:
        return
    pending: list[pa.RecordBatch] = []
    have = 0
    for batch in pf.iter_batches(batch_size=size, row_groups=groups, columns=columns, use_threads=False):
        lo, hi = max(start - pos, 0), min(end - pos, batch.num_rows)
        pos += batch.num_rows
        if hi > lo:
            pending.append(batch.slice(lo, hi - lo))
            have += hi - lo
        while have >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            pending, have = table.slice(size).to_batches(), have - size
        if pos >= end:
            break
    if have:
        yield pa.Table.from_batches(pending)


def _binary(t: pa.DataType) -> bool:
    """Whether values of this type hold bytes anywhere: the digest's window is then smaller. Its
    own rule, never changed: a shard's digest must be the same in every version."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
            or pa.types.is_binary_view(t):
        return True
    if pa.types.is_struct(t):
        return any(_binary(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _binary(t.value_type)
    return False


def _digest(pf: pq.ParquetFile, start: int, end: int) -> str:
    schema = pf.schema_arrow.remove_metadata()
    size = WINDOW_ROWS_BYTES if any(_binary(f.type) for f in schema) else WINDOW_ROWS
    sink = _HashSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), schema) as writer:
        for window in _windows(pf, start, end, size):
            writer.write_batch(_plain(window.replace_schema_metadata(None)))
    return sink.hash.hexdigest()


class ParquetSource(FileSource):
    format = "parquet"
    suffixes = (".parquet", ".pq")

    @contextmanager
    def _parquet(self, single: bool, name: str) -> Iterator[pq.ParquetFile]:
        local = self.place.local_path(single, name)
        if local is not None:
            yield pq.ParquetFile(local, buffer_size=_READ_BUFFER, pre_buffer=False)
            return
        with self.place.open(single, name) as f:
            yield pq.ParquetFile(f, buffer_size=_READ_BUFFER, pre_buffer=False)

    def plan_file(self, info: FileInfo, shard_rows: int, state: PlanState) -> tuple[FileInfo, list[Shard]]:
        shown = self.place.shown(state.single, info.name)
        try:
            with self._parquet(state.single, info.name) as pf:
                return self._plan_open(pf, info, shard_rows, state)
        except FileNotFoundError:
            raise JobError(f"[input] path: {shown} disappeared while it was planned") from None
        except pa.ArrowInvalid as exc:
            raise JobError(f"[input] path: cannot read the Parquet manifest {shown} ({short(exc)})") from None

    def _plan_open(self, pf: pq.ParquetFile, info: FileInfo, shard_rows: int,
                   state: PlanState) -> tuple[FileInfo, list[Shard]]:
        schema = pf.schema_arrow.remove_metadata()
        if state.schema is None:
            check_columns(self.cfg, schema.names)
            state.schema, state.first = schema, info.name
        elif not schema.equals(state.schema):
            raise JobError(f"[input] path: {info.name} has other columns than {state.first} ({_differ(schema, state.schema)}); "
                           f"every file needs the same columns and types")
        total = pf.metadata.num_rows
        cache: dict[tuple[int, ...], pa.Table] = {}
        shards = []
        for start in range(0, total, shard_rows):
            end = min(start + shard_rows, total)
            shards.append(Shard(-1, start, end - start, start, end, _digest(pf, start, end), info.name))
            if state.ids is not None:
                assert self.cfg.id_column is not None
                ids = parquet_rows(pf, start, end, columns=[self.cfg.id_column], cache=cache).column(0)
                state.ids.add(ids, np.arange(start, end) + state.ordinal)
        return FileInfo(info.name, info.size, info.stamp, total), shards

    def read(self, plan: Plan, shard: Shard, columns: list[str] | None = None) -> ShardRows:
        wanted = columns
        if columns is not None and self.cfg.id_column is not None and self.cfg.id_column not in columns:
            wanted = [*columns, self.cfg.id_column]
        with self._reading(plan, shard) as pf:
            table = parquet_rows(pf, shard.start, shard.end, columns=wanted)
        if table.num_rows != shard.rows:
            raise Unreadable(f"{self.shown(plan, shard.file)}: {table.num_rows} rows where {shard.rows} were planned "
                             f"(has the file changed?)")
        ids = self.ids(plan, shard, table)
        return ShardRows(table if columns is None else table.select(columns), ids, {})

    def batches(self, plan: Plan, shard: Shard, columns: list[str], rows: int) -> Iterator[pa.Table]:
        with self._reading(plan, shard) as pf:
            yield from _windows(pf, shard.start, shard.end, rows, columns)

    @contextmanager
    def _reading(self, plan: Plan, shard: Shard) -> Iterator[pq.ParquetFile]:
        name = plan.file_of(shard).name
        try:
            with self._parquet(plan.single, name) as pf:
                yield pf
        except pa.ArrowInvalid as exc:
            raise Unreadable(f"{self.shown(plan, name)} cannot be read as planned (has it changed?): {short(exc)}") from None
        except (OSError, JobError) as exc:
            raise Unreadable.of(self.shown(plan, name), exc) from None

    def range_digest(self, plan: Plan, shard: Shard) -> str:
        with self._parquet(plan.single, plan.file_of(shard).name) as pf:
            if plan.version < 2:
                return table_digest(parquet_rows(pf, shard.start, shard.end))
            return _digest(pf, shard.start, shard.end)


def _differ(a: pa.Schema, b: pa.Schema) -> str:
    mine, theirs = {f.name: f.type for f in a}, {f.name: f.type for f in b}
    diffs = [f"{n}: {mine[n]} vs {theirs[n]}" for n in mine if n in theirs and mine[n] != theirs[n]]
    diffs += [f"{n} only here" for n in mine if n not in theirs] + [f"no {n}" for n in theirs if n not in mine]
    return "; ".join(diffs[:3]) or "nullability or order"
