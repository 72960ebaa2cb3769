"""The readers: a manifest's bytes or row ranges made into pyarrow tables, with the options the run
reads with, so that planning checks rows exactly as the run will see them.

- CSV: the header record put in front of each shard's bytes; line breaks allowed in quoted
  values; cells kept as strings exactly as written (ids like "007"), empty cells as "" not null.
- JSON Lines: read with the schema given (the planner gives the first shard's), other fields
  ignored; without one, pyarrow infers it.
- Parquet: row ranges cut from row groups, the groups last read kept for the next range.

pyarrow reads text in blocks (1 MiB by default) and fails on a record spread over more than two,
so a block as long as the longest record is always enough: `block_for` gives it.
"""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

__all__ = ["read_csv", "read_jsonl", "parquet_rows", "block_for", "DEFAULT_BLOCK", "MAX_BLOCK"]

DEFAULT_BLOCK = 1 << 20  # pyarrow's own default block size
MAX_BLOCK = (1 << 31) - 1  # pyarrow's block_size is a 32-bit int


def block_for(max_record: int) -> int:
    """The block size that reads records of up to `max_record` bytes."""
    return min(max(DEFAULT_BLOCK, max_record), MAX_BLOCK)


def read_csv(
    header: bytes, body: bytes, block: int | None, *, columns: list[str] | None = None, only: str | None = None,
    invalid: Callable[[Any], str] | None = None,
) -> pa.Table:
    """Header and body as the run reads them, `columns` as strings exactly as written. With `only`:
    that column alone, as bytes, on one thread (so pyarrow numbers the rows `invalid` is told of)."""
    data = header if header.endswith((b"\n", b"\r")) else header + b"\n"  # a header-only file may end without
    read = pacsv.ReadOptions(**({"block_size": block} if block else {}), use_threads=only is None)
    parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid)
    if only is not None:
        convert = pacsv.ConvertOptions(include_columns=[only], column_types={only: pa.binary()}, strings_can_be_null=False)
    else:
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns or []}, strings_can_be_null=False)
    return pacsv.read_csv(pa.BufferReader(pa.py_buffer(data + body)), read_options=read, parse_options=parse,
                          convert_options=convert)


def read_jsonl(body: bytes, schema: pa.Schema | None, block: int | None) -> pa.Table:
    """JSON Lines with `schema` (None: the one pyarrow infers)."""
    read = pajson.ReadOptions(**({"block_size": block} if block else {}))
    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore") if schema else None
    return pajson.read_json(pa.BufferReader(pa.py_buffer(body)), read_options=read, parse_options=parse)


def parquet_rows(
    pf: pq.ParquetFile, start: int, end: int, *, columns: list[str] | None = None, cache: dict[tuple[int, ...], pa.Table] | None = None
) -> pa.Table:
    """Rows [start, end). With `cache`, the row groups last read are kept: shards smaller than a
    row group (a 1M-row file written as one group) do not each read the whole group again."""
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
    key = tuple(groups)
    table = cache.get(key) if cache is not None else None
    if table is None:
        table = pf.read_row_groups(groups, columns=columns)
        if cache is not None:
            cache.clear()
            cache[key] = table
    return table.slice(start - (first_offset or 0), end - start)
