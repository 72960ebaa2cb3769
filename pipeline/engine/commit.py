"""Committing a shard: the journal is the source of truth.

    rec = commit_shard(job, ckpt, shard, table, ids, labels)   # journal -> part file -> commit record

A commit reads the shard's journal (every result since the shard began, later lines winning),
joins it to the shard's rows by id, writes the part file atomically (pipeline.io.writer) and only
then records the commit: a crash at any point leaves either the old state or the new one. Then the
journal is compacted (housekeeping: every line kept in one compressed file, pipeline.io.segments).
Blocking; the engine runs these in threads. Which shards are complete, and what a shard has
already, is the book's (pipeline.engine.book).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa

from ..config import Job
from ..crashpoints import fault_point
from ..errors import JobError
from ..io.checkpoint import Checkpoint
from ..io.journal import latest_per_id
from ..io.manifest import Plan, Shard, plan_schema
from ..io.storage import PartStore
from ..io.writer import build_part, journal_schema, layout_key, output_columns, write_empty_part, write_part
from ..records import DETAIL_TOKEN_COLUMNS, TOKEN_COLUMNS, CommitRecord
from ..rows.pricing import total_cost

if TYPE_CHECKING:
    from ..rows.labels import Labels

__all__ = ["commit_shard", "compact_loose", "write_empty_dataset", "media_columns", "Layout", "part_layout"]


class Layout(NamedTuple):
    """The columns a part is written with now (pipeline.engine.upgrade brings older parts to it)."""

    schema: pa.Schema  # input columns typed as planned (a part's own reads may type them otherwise)
    free: frozenset[str]  # the input columns, whose types are the manifest's, not the layout's
    renamed: dict[str, str]  # output name -> input column, where an input column takes an `input_` prefix
    key: str  # layout_key(schema, free): what a commit record keeps


def commit_shard(job: Job, ckpt: Checkpoint, shard: Shard, table: pa.Table, ids: list[str],
                 labels: Labels | None) -> CommitRecord | None:
    """Journal -> part file -> rename -> commit record; None when no row of the shard has a result."""
    extra = labels.fields() if labels is not None else ()
    lines = ckpt.journal_lines(shard.index, journal_schema(extra))
    part = build_part(table, ids, latest_per_id(lines), job.input.id_column, extra, media_columns(job))
    if part.num_rows == 0:
        return None
    fault_point("commit")
    ckpt.fence()  # a run that lost its job's lease writes no part
    written = write_part(PartStore.for_output(job.output), shard.index, part)
    status = part.column("status").to_pylist()
    kinds = Counter(k for k, s in zip(part.column("error_kind").to_pylist(), status) if s == "error")
    record = CommitRecord(
        shard=shard.index, file=written.name, size=written.size, rows=part.num_rows, shard_rows=shard.rows,
        digest=shard.digest, ok=status.count("ok"), failed=dict(kinds),
        # sums in Python, not pyarrow.compute: its first import stalls the loop ~60 ms
        tokens=_token_sums(part),
        at=time.time(), part_digest=written.digest, etag=written.etag,
        spend=total_cost(lines) if job.pricing is not None else None,  # every attempt paid for, superseded ones too
        layout=layout_key(part.schema, _free(job, table.column_names, extra)),
    )
    ckpt.record_commit(record)
    del part, lines  # not kept while the journal is compacted
    with contextlib.suppress(OSError, JobError, pa.ArrowException):  # housekeeping: as it was, nothing lost
        ckpt.compact(shard.index)
    return record


def compact_loose(ckpt: Checkpoint, plan: Plan, commits: dict[int, CommitRecord]) -> int:
    """Housekeeping a killed run left: the journals of shards committed whole but not compacted
    (a kill between a commit and its compaction). One listing; how many were compacted."""
    whole = {i for i, rec in commits.items() if i < len(plan.shards) and rec.rows == plan.shards[i].rows}
    loose = sorted(ckpt.loose() & whole)
    for index in loose:
        with contextlib.suppress(OSError, JobError, pa.ArrowException):  # as it was, nothing lost
            ckpt.compact(index)
    return len(loose)


def media_columns(job: Job) -> frozenset[str]:
    """The input columns whose image bytes the output holds as references (none with keep_media)."""
    if job.output.keep_media:
        return frozenset()
    return frozenset(c for c in (job.input.image_column, job.input.video_column, job.input.audio_column) if c)


def part_layout(job: Job, plan: Plan, labels: Labels | None) -> Layout:
    """The current layout of the job's parts: the columns an empty part of its manifest has."""
    extra = labels.fields() if labels is not None else ()
    results = pa.Table.from_batches([], schema=journal_schema(extra))
    schema = build_part(_empty_input(plan), [], results, job.input.id_column, extra, media_columns(job)).schema
    free = _free(job, plan.columns, extra)
    renamed = {out: col for col, out in output_columns(plan.columns, job.input.id_column,
                                                       frozenset(f.name for f in extra)) if out != col}
    return Layout(schema, free, renamed, layout_key(schema, free))


def _free(job: Job, columns: list[str], extra: list[pa.Field] | tuple[pa.Field, ...]) -> frozenset[str]:
    """Output names of the input columns typed by the manifest (image bytes held as references are not)."""
    media = media_columns(job)
    return frozenset(out for col, out in output_columns(columns, job.input.id_column, frozenset(f.name for f in extra))
                     if col not in media)


def _token_sums(part: pa.Table) -> dict[str, int]:
    """TOKEN_COLUMNS summed over a part; a usage detail no row reported is left out (unknown, not 0).
    In Python, not pyarrow.compute: its first import stalls the loop ~60 ms."""
    sums: dict[str, int] = {}
    for key in TOKEN_COLUMNS:
        values = [v for v in part.column(key).to_pylist() if v is not None]
        if values or key not in DETAIL_TOKEN_COLUMNS:
            sums[key] = sum(values)
    return sums


def write_empty_dataset(job: Job, plan: Plan, labels: Labels | None) -> None:
    """A manifest with no rows: an empty dataset with every column, so a reader of the output
    finds a table (with no rows) rather than no folder."""
    extra = labels.fields() if labels is not None else ()
    write_empty_part(PartStore.for_output(job.output), _empty_input(plan), job.input.id_column, extra,
                     media_columns(job))


def _empty_input(plan: Plan) -> pa.Table:
    """The manifest's columns with no rows, typed as its shards would be read."""
    return pa.Table.from_batches([], schema=plan_schema(plan))
