"""Preparing a run, under the job's lock and before anything is sent: the output folder is this
job's, the request shape is the checkpoint's, the plan is current (rows may only be appended), the
committed parts are as their records say and in this version's columns (pipeline.engine.upgrade),
and the shards still to do are known.

    ready = prepare(job, ckpt, options, console)
    ready.plan, ready.commits, ready.todo
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Job
from ..errors import JobError
from ..io.checkpoint import Checkpoint
from ..io.manifest import Plan, Shard
from ..io.manifest import current_plan as current_plan_of
from ..io.storage import PartStore
from ..io.writer import remove_leftovers
from ..records import CommitRecord
from .console import Console
from .book import shards_to_send
from .options import RunOptions
from .upgrade import adopted, upgrade_parts

__all__ = ["Prepared", "prepare"]


@dataclass(frozen=True)
class Prepared:
    plan: Plan
    commits: dict[int, CommitRecord]  # the records whose part files are in place
    todo: list[Shard]  # shards with rows to send (or to send again, with --retry-failed)


def prepare(job: Job, ckpt: Checkpoint, options: RunOptions, console: Console) -> Prepared:
    store = PartStore.for_output(job.output)
    saved = ckpt.saved_job()
    first = saved is None
    claimed = store.claim(job.name, str(ckpt))  # before --restart may remove anything there
    try:
        if options.restart:
            ckpt.reset(store)
            saved = None
        ckpt.check_job(job.request_shape(), job.run.shard_rows, saved)
        plan = current_plan(job, ckpt)
    except JobError:
        if first:  # refused before anything was sent (a bad manifest): leave nothing behind
            ckpt.forget_job()
            if claimed:
                store.unclaim()
        raise
    commits = upgrade_parts(job, ckpt, plan, verified_commits(store, ckpt, console), console)
    return Prepared(plan, commits, shards_to_send(plan, commits, options.retry_failed))


def current_plan(job: Job, ckpt: Checkpoint) -> Plan:
    """The plan as the source is now: the saved one when no file changed (a finished job's rerun
    lists the files and reads nothing); else planned again, only files added or changed read,
    edited rows and removed files refused (pipeline.io.manifest)."""
    old = ckpt.load_plan()
    plan, changed = current_plan_of(job.input, job.run.shard_rows, old)
    if changed:
        ckpt.save_plan(plan)
    return plan


def verified_commits(store: PartStore, ckpt: Checkpoint, console: Console) -> dict[int, CommitRecord]:
    """Commit records whose part file is in place as recorded; leftovers of a crash removed.
    A URL's storage is first reached here, before anything is sent."""
    for name in remove_leftovers(store):
        console.say(f"note: removed {name}, a temporary file left by an interrupted run")
    commits = ckpt.commits()
    in_place = store.in_place({rec.file: rec for rec in commits.values()})
    good = {}
    for index, rec in commits.items():
        if rec.file in in_place:
            good[index] = rec
        elif (upgraded := adopted(store, rec)) is not None:  # an upgrade whose record a kill cut off
            ckpt.record_commit(upgraded)
            good[index] = upgraded
        else:
            console.say(f"note: {rec.file} does not match its commit record; it is rebuilt from the journal")
    return good
