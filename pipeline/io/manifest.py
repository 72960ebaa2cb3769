"""The manifest: the rows of a job's source, planned into shards without loading them, checked
whole, read one shard at a time. The rest of the pipeline reads rows only through here.

    plan = plan_manifest(job.input, shard_rows=10_000)     # a JobError naming the bad rows, if any
    plan, changed = current_plan(job.input, 10_000, old)   # a resume: `old` itself when nothing changed
    rows = read_rows(job.input, plan, plan.shards[0])      # ShardRows(table, ids, errors)

A shard is `shard_rows` consecutive rows of one file (or images of a folder); it is the unit of
work and of commit. Boundaries depend only on the rows before them, so they are stable across
runs: rows appended to a file only add to its last shard or make new ones, files added make new
shards (with new indexes), and each shard carries a digest of its rows, so a resume tells "rows
or files added" from "rows edited" (refused: answers would mismatch). The formats are sources
(pipeline.io.sources): each lists its files, plans shards that name their file and reads one.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from ..config import InputConfig
from ..errors import JobError
from .plan import FileInfo, Plan, Shard, load_plan_dict
from .references import holds_bytes, referenced
from .sources import Listing, ShardRows, Unreadable, decode_schema, heavy_columns, source_for

__all__ = ["Shard", "Plan", "FileInfo", "ShardRows", "Unreadable", "plan_manifest", "current_plan", "read_rows",
           "read_shard", "shard_batches", "load_plan_dict", "plan_schema", "heavy_columns", "REFER_ROWS"]

_RESTART = "run with --restart (in Python: restart=True) to start over"
REFER_ROWS = 64  # rows of image bytes read at a time to make their references


def plan_manifest(cfg: InputConfig, shard_rows: int) -> Plan:
    """Shard boundaries, digests and every row checked as the run will read it; memory stays
    flat but for 8 bytes a row when rows have ids. A JobError names every bad row found."""
    return source_for(cfg).plan(shard_rows)


def current_plan(cfg: InputConfig, shard_rows: int, old: Plan | None) -> tuple[Plan, bool]:
    """The plan of the source as it is now, and whether it differs from `old`. Nothing but a
    listing is read when no file changed; else the files added or changed are planned (the
    others keep their shards), and rows already planned that changed, or files gone, are refused."""
    source = source_for(cfg, old.format if old is not None and cfg.format is None else None)
    listing = source.list()
    if old is not None and old.single != listing.single:  # the rows' ids would change: all sent again
        was, now = ("one file", "a set of files") if old.single else ("a set of files", "one file")
        raise JobError(f"[input] path: this job's checkpoint was made from {was} and the path now names {now}; its "
                       f"rows would get other ids and be sent again; point path back, or {_RESTART}")
    if old is not None and old.checked and old.format == source.format and _same_files(old, listing):
        return old, False
    plan = source.plan(shard_rows, listing, previous=old)
    if old is not None:
        _check_append_only(cfg, old, plan)
    return plan, True


def _same_files(old: Plan, listing: Listing) -> bool:
    if old.single != listing.single or len(old.files) != len(listing.files):
        return False
    if old.single:  # a plan of version 1 does not record the file's name
        return old.files[0].same(listing.files[0])
    return all(a.name == b.name and a.same(b) for a, b in zip(old.files, listing.files))


def _check_append_only(cfg: InputConfig, old: Plan, new: Plan) -> None:
    """Rows already planned must be unchanged: rows may only be appended, files only added."""
    source = source_for(cfg, new.format)
    names = {f.name for f in new.files}
    if not old.single:
        for f in old.files:
            if f.name not in names:
                raise JobError(f"[input] path: {source.shown(new, f.name)} is gone since its rows were planned "
                               f"(files may only be added); put it back, or {_RESTART}")
    now = {("" if old.single else s.file, s.start): s for s in new.shards}
    for s in old.shards:
        n = now.get(("" if old.single else s.file, s.start))
        if n is not None and n.digest == s.digest:
            continue
        if n is not None and n.rows >= s.rows and _range_digest(cfg, old, new, s) == s.digest:
            continue  # the shard grew (rows appended), or a plan of another version digests otherwise
        if old.single:
            raise JobError(f"[input] path: manifest rows {s.first_row}-{s.first_row + s.rows - 1} changed since they "
                           f"were processed (only appending rows is allowed); {_RESTART}")
        raise JobError(f"[input] path: {source.shown(new, s.file)} changed since its rows were planned (rows "
                       f"{s.first_row}-{s.first_row + s.rows - 1}; only adding files or appending rows is allowed); {_RESTART}")


def _range_digest(cfg: InputConfig, old: Plan, new: Plan, shard: Shard) -> str:
    """The digest the old shard's range has in the source now, computed as `old` computed it."""
    source = source_for(cfg, new.format)
    return source.range_digest(old, shard)


def read_rows(cfg: InputConfig, plan: Plan, shard: Shard, columns: list[str] | None = None,
              refer: frozenset[str] = frozenset()) -> ShardRows:
    """The shard's rows (only `columns`, if given), their ids, and the rows that cannot be read.
    Columns in `refer` that hold image bytes are read a window of rows at a time and held as
    references (pipeline.io.references): a shard's ids and references, never its bytes.
    A file gone or changed since planning makes every row of the shard one that cannot be read
    (nulls in every column), where the ids are known without the file; else, and when its
    storage fails, this raises Unreadable (the shard waits for the next run)."""
    source = source_for(cfg, plan.format)
    wanted = plan.columns if columns is None else columns
    schema = plan_schema(plan)
    refs = [c for c in wanted if c in refer and holds_bytes(schema.field(c).type)]
    try:
        rows = source.read(plan, shard, [c for c in wanted if c not in refs] if refs else columns)
        held = {c: rows.table.column(c) for c in rows.table.column_names}
        for c in refs:
            held[c] = pa.chunked_array([referenced(w.column(c)) for w in source.batches(plan, shard, [c], REFER_ROWS)],
                                       pa.list_(pa.string()) if pa.types.is_list(schema.field(c).type) else pa.string())
        return ShardRows(pa.table({c: held[c] for c in wanted}) if refs else rows.table, rows.ids, rows.errors)
    except Unreadable as exc:
        ids = source.known_ids(plan, shard) if exc.lasting else None
        if ids is None:
            raise
        table = pa.table({f.name: pa.nulls(len(ids), f.type) for f in (schema.field(c) for c in wanted)})
        return ShardRows(table, ids, dict.fromkeys(range(len(ids)), str(exc)))


def read_shard(cfg: InputConfig, plan: Plan, shard: Shard) -> pa.Table:
    """The shard's rows as a table; CSV cells stay strings exactly as written (ids like "007")."""
    return read_rows(cfg, plan, shard).table


def shard_batches(cfg: InputConfig, plan: Plan, shard: Shard, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """The shard's `columns`, `rows` at a time: byte columns are never held for a whole shard."""
    return source_for(cfg, plan.format).batches(plan, shard, columns, rows)


def plan_schema(plan: Plan) -> pa.Schema:
    """The columns and types every shard of the plan reads as (CSV: all text)."""
    if plan.schema:
        return decode_schema(plan.schema)
    return pa.schema([(c, pa.string()) for c in plan.columns])
