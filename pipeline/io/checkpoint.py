"""The checkpoint seam: which checkpoint a job has, and what it says about the output.

    ckpt = open_checkpoint(job.output)     # a FolderCheckpoint (a path) or a BucketCheckpoint (a URL)
    with ckpt.locked(job.name): ...        # one run per job (a flock, or a lease in the bucket)
    dataset_state(plan, ckpt.peek_commits())   # counts over the output, from the commit records

The operations are `Checkpoint`'s (pipeline.io.ckpt_base, which says how each backend does them);
the folder's layout is in pipeline.io.ckpt_folder, the bucket's in pipeline.io.ckpt_bucket.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..records import DETAIL_TOKEN_COLUMNS, TOKEN_COLUMNS, CommitRecord
from .ckpt_base import Checkpoint
from .ckpt_bucket import BucketCheckpoint
from .ckpt_folder import FolderCheckpoint
from .manifest import Plan

__all__ = ["Checkpoint", "FolderCheckpoint", "BucketCheckpoint", "open_checkpoint", "dataset_state"]


def open_checkpoint(output: Any) -> Checkpoint:
    """The checkpoint of a job's `[output]` (an OutputConfig: checkpoint, storage_options, and for a
    URL checkpoint_flush_s and checkpoint_lease_s)."""
    location = output.checkpoint
    assert location is not None  # set by the job loader
    if isinstance(location, str):
        return BucketCheckpoint(location, output.storage_options, flush_s=output.checkpoint_flush_s,
                                lease_s=output.checkpoint_lease_s)
    return FolderCheckpoint(location)


def dataset_state(plan: Plan, commits: dict[int, CommitRecord]) -> dict[str, Any]:
    """Counts over the whole output, from the commit records alone (no answer is read)."""
    by_kind: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    ok = rows = 0
    spend = 0.0
    for rec in commits.values():
        spend += rec.spend or 0.0
        ok += rec.ok
        rows += rec.rows
        by_kind.update(rec.failed)
        tokens.update(rec.tokens)
    return {
        "rows": plan.total_rows,
        "ok": ok,
        "failed": sum(by_kind.values()),
        "failed_by_kind": dict(by_kind),
        "pending": max(0, plan.total_rows - rows),
        # A usage detail no record holds is None: no answer reported it (or every part predates it).
        "tokens": {k: tokens.get(k, None if k in DETAIL_TOKEN_COLUMNS else 0) for k in TOKEN_COLUMNS},
        "spend": round(spend, 6),  # from [pricing]; 0 without it
    }
