"""The writer: a shard's rows and results into one Parquet part file, atomically.

A part is one atomic write of its store (pipeline.io.store): in a local folder a hidden temporary
name (`.part-000003.parquet.tmp`: ignored by pyarrow.dataset, pandas and a DuckDB `*.parquet`
glob), fsynced, renamed over its final name and the folder fsynced; in a bucket one put of the
complete file. A reader sees either the old complete file or the new complete file.

A part's layout (`layout_key`) is its columns' names and types, input columns aside (they are
typed as the manifest's reads give them). A part written by an earlier version lacks columns added
since; `upgrade_part` rewrites it in the current layout (the new columns null, image bytes as
references), a row group at a time, atomically, naming in its footer the file it was made from
(`MADE_FROM`): a run killed before recording the new part can tell it from a damaged one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import IO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from ..crashpoints import crash_point
from ..records import RESULT_COLUMNS, result_schema
from .durable import bytes_digest
from .references import holds_bytes, referenced
from .storage import PartStore

__all__ = ["part_name", "build_part", "journal_schema", "write_part", "write_empty_part", "WrittenPart", "remove_leftovers",
           "remove_parts", "output_columns", "layout_key", "read_footer", "column_sources", "upgrade_part", "MADE_FROM"]

MADE_FROM = b"pipeline.made_from"  # an upgraded part's footer: the part it was made from


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def output_columns(
    input_columns: list[str], id_column: str | None, extra: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """(input column, output name) pairs: the id column is `id`; clashes get an `input_` prefix.
    `extra`: names of further result columns (labels), reserved like the fixed ones."""
    pairs = []
    for col in input_columns:
        if col == id_column and col == "id":
            continue
        pairs.append((col, f"input_{col}" if col in RESULT_COLUMNS or col in extra else col))
    return pairs


def build_part(
    table: pa.Table,
    ids: list[str],
    results: pa.Table,
    id_column: str | None,
    extra_fields: list[pa.Field] | tuple[pa.Field, ...] = (),
    media: frozenset[str] = frozenset(),
) -> pa.Table:
    """Rows of `table` that have a result, in manifest order, with the result columns added.

    `results` has one row per id (see journal.latest_per_id) with `extra_fields` (label columns)
    and the result columns (records.result_schema); rows are matched by id, never by position.
    `media`: input columns whose image bytes the output holds as references (references.py).
    """
    # Plain dicts, not pc.index_in: its hash table reserves ~40 MB that the allocator then keeps.
    position = {row_id: i for i, row_id in enumerate(results.column("id").to_pylist())}
    where = [position.get(row_id) for row_id in ids]
    if None in where:
        keep = [i for i, w in enumerate(where) if w is not None]
        table = table.take(pa.array(keep, pa.int64()))
        ids = [ids[i] for i in keep]
        where = [where[i] for i in keep]
    matched = results.take(pa.array(where, pa.int64()))
    arrays: list[pa.Array | pa.ChunkedArray] = [pa.array(ids, pa.string())]
    names = ["id"]
    for col, name in output_columns(table.column_names, id_column, frozenset(f.name for f in extra_fields)):
        arrays.append(referenced(table.column(col)) if col in media else table.column(col))
        names.append(name)
    for field in (*extra_fields, *result_schema()):
        arrays.append(matched.column(field.name).cast(field.type))
        names.append(field.name)
    return pa.Table.from_arrays(arrays, names=names)


def journal_schema(extra_fields: list[pa.Field] | tuple[pa.Field, ...] = ()) -> pa.Schema:
    """The columns a journal line holds, typed as the part file wants them."""
    return pa.schema([pa.field("id", pa.string()), *extra_fields, *result_schema()])


class WrittenPart(NamedTuple):
    name: str
    size: int
    digest: str  # of the file's bytes: a resume trusts a part only if it still has them
    etag: str | None  # an object store's ETag for the part (None for a local folder)


def write_part(store: PartStore, shard: int, table: pa.Table) -> WrittenPart:
    """Write atomically; returns what the commit record keeps of the file."""
    name = part_name(shard)
    written = store.write(name, lambda f: pq.write_table(table, f, compression="zstd"), digest=True,
                          before_replace=lambda: crash_point("after_part_write"))
    crash_point("after_rename")  # the part is in place, no commit record yet
    assert written.digest is not None
    return WrittenPart(name, written.size, written.digest, written.etag)


def write_empty_part(store: PartStore, table: pa.Table, id_column: str | None,
                     extra_fields: list[pa.Field] | tuple[pa.Field, ...] = (), media: frozenset[str] = frozenset()) -> None:
    """A manifest with no rows: one part with no rows and every output column, so the output is
    a readable (empty) dataset. Not a shard's part: no commit record; the first shard's commit
    replaces it once rows are appended."""
    results = pa.Table.from_batches([], schema=journal_schema(extra_fields))
    write_part(store, 0, build_part(table, [], results, id_column, extra_fields, media))


def remove_leftovers(store: PartStore) -> list[str]:
    """Delete temporary files a crash left behind; returns their names (none on an object store,
    where nothing is written under a temporary name)."""
    removed = []
    for name in store.names():
        if name.startswith(".part-") and name.endswith(".tmp"):
            store.remove(name)
            removed.append(name)
    return removed


def remove_parts(store: PartStore) -> None:
    """--restart: the part files go with the answers they were made from."""
    for name in store.names():
        if name.startswith("part-") and name.endswith(".parquet"):
            store.remove(name)


def layout_key(schema: pa.Schema, free: Collection[str]) -> str:
    """A part's layout: its columns' names, in order, and their types, but for the `free` ones
    (input columns: typed as the manifest's reads give them)."""
    text = "|".join(f"{f.name}:{'*' if f.name in free else f.type}" for f in schema)
    return bytes_digest(text.encode())


def read_footer(store: PartStore, name: str) -> pq.FileMetaData:
    """A part's footer (its schema, rows and key-value metadata): the footer alone is read."""
    with store.store.open(name) as f:
        return pq.read_metadata(f)


def column_sources(have: pa.Schema, target: pa.Schema, renamed: Mapping[str, str]) -> dict[str, str | None] | None:
    """For each column of `target`, the column of a part of schema `have` it is made from (None: a
    column added since, null). `renamed`: output name -> input column where an input column now
    takes an `input_` prefix (a result column of that name was added since). None when the part
    holds a column the target has no place for (nothing is dropped)."""
    names = set(have.names)
    sources: dict[str, str | None] = {}
    for out, col in renamed.items():
        if out not in names and col in names:  # the part was written before the clash: its `col` is the input's
            sources[out] = col
    used = set(sources.values())
    for field in target:
        if field.name not in sources:
            sources[field.name] = field.name if field.name in names and field.name not in used else None
    if names - {s for s in sources.values() if s is not None}:
        return None
    return sources


def _conformed(column: pa.ChunkedArray | pa.Array, kind: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if column.type == kind:
        return column
    if holds_bytes(column.type) and not holds_bytes(kind):  # written before references: the output's reference now
        column = referenced(column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column]))
    return column.cast(kind)  # raises ArrowInvalid where no safe cast exists


def upgrade_part(store: PartStore, name: str, target: pa.Schema, sources: Mapping[str, str | None],
                 made_from: str) -> WrittenPart:
    """Rewrite part `name` in `target`'s columns from `sources` (column_sources), a row group at a
    time, atomically, its footer naming `made_from`; raises ArrowInvalid when a column cannot be
    cast (the part stays as it was)."""
    schema = target.with_metadata({MADE_FROM: made_from.encode()})

    def write(f: IO[bytes]) -> None:
        with store.store.open(name) as old, pq.ParquetWriter(f, schema, compression="zstd") as out:
            part = pq.ParquetFile(old)
            for g in range(part.num_row_groups):
                group = part.read_row_group(g, columns=[s for s in dict.fromkeys(sources.values()) if s is not None])
                n = group.num_rows
                out.write_table(pa.table([_conformed(group.column(src), field.type) if (src := sources[field.name])
                                          else pa.nulls(n, field.type) for field in target], schema=schema))

    written = store.write(name, write, digest=True)
    assert written.digest is not None
    return WrittenPart(name, written.size, written.digest, written.etag)
