"""Committing a shard, and finding what a shard has already: the journal is the source of truth.

    rec = commit_shard(job, ckpt, shard, table, ids, labels)   # journal -> part file -> commit record
    done, restored = answers_so_far(job, ckpt, shard, committed_rows, labels)

A commit reads the shard's journal (every result since the shard began, later lines winning),
joins it to the shard's rows by id, writes the part file atomically (pipeline.io.writer) and only
then records the commit: a crash at any point leaves either the old state or the new one. Then the
journal is compacted (housekeeping: every line kept in one compressed file, pipeline.io.segments).
Blocking; the engine runs these in threads.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import TYPE_CHECKING

import pyarrow as pa

from ..config import Job
from ..crashpoints import fault_point
from ..errors import JobError
from ..io.checkpoint import Checkpoint
from ..io.journal import latest_per_id
from ..io.manifest import Plan, Shard, plan_schema
from ..io.storage import PartStore
from ..io.writer import (
    build_part,
    journal_schema,
    part_name,
    write_empty_part,
    write_part,
)
from ..records import DETAIL_TOKEN_COLUMNS, TOKEN_COLUMNS, CommitRecord, ResultRow
from ..rows.pricing import total_cost

if TYPE_CHECKING:
    from ..rows.labels import Labels

__all__ = ["commit_shard", "answers_so_far", "compact_loose", "write_empty_dataset", "DONE_SCHEMA"]

DONE_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("error_kind", pa.string())])


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


def _token_sums(part: pa.Table) -> dict[str, int]:
    """TOKEN_COLUMNS summed over a part; a usage detail no row reported is left out (unknown, not 0).
    In Python, not pyarrow.compute: its first import stalls the loop ~60 ms."""
    sums: dict[str, int] = {}
    for key in TOKEN_COLUMNS:
        values = [v for v in part.column(key).to_pylist() if v is not None]
        if values or key not in DETAIL_TOKEN_COLUMNS:
            sums[key] = sum(values)
    return sums


def answers_so_far(job: Job, ckpt: Checkpoint, shard: Shard, committed_rows: int,
                   labels: Labels | None) -> tuple[dict[str, tuple[str, str | None]], list[ResultRow]]:
    """(id -> (status, error_kind)) of the shard's answered rows, from its journal, or from its
    committed part file if the journal was lost (a deleted checkpoint folder must not make
    --retry-failed buy the whole shard again); plus the rows to write back to the journal."""
    latest = latest_per_id(ckpt.journal_lines(shard.index, DONE_SCHEMA, repair=True))
    done = dict(zip(latest.column("id").to_pylist(),
                    zip(latest.column("status").to_pylist(), latest.column("error_kind").to_pylist())))
    restored: list[ResultRow] = []
    if len(done) < committed_rows:
        label_names = labels.names if labels is not None else []
        columns = journal_schema(labels.fields() if labels is not None else ()).names
        part = PartStore.for_output(job.output).read_table(part_name(shard.index), columns)
        for rec in part.to_pylist() if part is not None else ():
            if rec["id"] not in done:
                done[rec["id"]] = (rec["status"], rec["error_kind"])
                restored.append(ResultRow.from_dict(rec, label_names))
    return done, restored


def write_empty_dataset(job: Job, plan: Plan, labels: Labels | None) -> None:
    """A manifest with no rows: an empty dataset with every column, so a reader of the output
    finds a table (with no rows) rather than no folder."""
    extra = labels.fields() if labels is not None else ()
    write_empty_part(PartStore.for_output(job.output), _empty_input(plan), job.input.id_column, extra,
                     media_columns(job))


def _empty_input(plan: Plan) -> pa.Table:
    """The manifest's columns with no rows, typed as its shards would be read."""
    return pa.Table.from_batches([], schema=plan_schema(plan))
