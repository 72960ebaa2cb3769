"""The book: which rows of a shard still need sending, each result journaled and counted once, and
a shard committed when its last row is in. Every executor (local, Ray, batch), export-batch and
import-batch keep their shards here, so the one decision is taken in one place.

    book = Book(job, ckpt, plan, commits, retry=None, labels=labels, journal=journal, counts=counts)
    todo = shards_to_send(plan, commits, retry)  # the shards with rows to send, from the commit records
    answers = await book.answers(shard)        # what the shard has: its journal, or its committed part
    send = book.open(shard, rows.ids, answers) # positions of the rows to send; the shard's rows left
    if book.settle(shard.index, row): ...      # journaled and counted; True: that was its last row
    await book.commit(shard, rows)             # journal -> part file -> commit record

A row needs sending when it has no answer, or (with --retry-failed) when its answer is an error
of a kind asked for; once answered in this run it is settled for the run. Its answer is in the
shard's journal, or, where the journal lost rows (a deleted folder), in the shard's committed part
file: `commits` are the records of the parts in place (pipeline.engine.prepare), and a row a part
holds is never bought again. Rows read back from a part are journaled again before anything else
is (`answers`), so the journal, from which every part is made, holds them when the shard is next
committed. A batch run that has every row of a shard answered or waiting in a batch learns so
from the journal and its ledger alone (`open_known`): the manifest is not read again to find nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Job
from ..io.checkpoint import Checkpoint
from ..io.journal import Journal, latest_per_id
from ..io.manifest import Plan, Shard, ShardRows, read_rows
from ..io.storage import PartStore
from ..io.writer import journal_schema
from ..records import CommitRecord, ResultRow
from .commit import commit_shard, media_columns
from .counts import Counts

if TYPE_CHECKING:
    from ..rows.labels import Labels

__all__ = ["Book", "Answers", "read_answers", "shards_to_send", "wanted", "DONE_SCHEMA"]

DONE_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("error_kind", pa.string())])
Answer = tuple[str, str | None]  # (status, error_kind)


def wanted(answer: Answer | None, retry: frozenset[str] | None) -> bool:
    """THE decision, for a row: it has no answer; or --retry-failed (`retry`: the kinds asked for,
    empty for all) and its answer is an error of a kind asked for."""
    if answer is None:
        return True
    return retry is not None and answer[0] == "error" and (not retry or answer[1] in retry)


def shards_to_send(plan: Plan, commits: Mapping[int, CommitRecord], retry: frozenset[str] | None) -> list[Shard]:
    """The same decision for whole shards, from their commit records alone: those not committed
    whole (as planned now), and those whose part holds rows `wanted` again."""
    todo = []
    for shard in plan.shards:
        rec = commits.get(shard.index)
        complete = rec is not None and rec.rows == shard.rows and rec.digest == shard.digest
        again = rec is not None and any(n and wanted(("error", kind), retry) for kind, n in rec.failed.items())
        if not complete or again:
            todo.append(shard)
    return todo


@dataclass
class Answers:
    """What a shard has: row id -> (status, error_kind); and the rows read back from its part file
    (its journal had lost them), to be journaled again."""

    done: dict[str, Answer]
    restored: list[ResultRow] = field(default_factory=list)


def read_answers(job: Job, ckpt: Checkpoint, shard: Shard, commit: CommitRecord | None,
                 labels: Labels | None) -> Answers:
    """The shard's answers: its journal's, and its committed part's where the journal holds fewer
    rows than the part (the journal was lost). Blocking; cuts a torn journal tail (under the lock)."""
    latest = latest_per_id(ckpt.journal_lines(shard.index, DONE_SCHEMA, repair=True))
    done: dict[str, Answer] = dict(zip(latest.column("id").to_pylist(),
                                       zip(latest.column("status").to_pylist(), latest.column("error_kind").to_pylist())))
    restored: list[ResultRow] = []
    if commit is not None and len(done) < commit.rows:
        store = PartStore.for_output(job.output)
        label_names = labels.names if labels is not None else []
        wanted = journal_schema(labels.fields() if labels is not None else ()).names
        with store.store.open(commit.file) as f:
            source = pq.ParquetFile(f)
            have = set(source.schema_arrow.names)  # a part of an earlier layout lacks later columns
            part = source.read(columns=[c for c in wanted if c in have])
        for rec in part.to_pylist():
            if rec["id"] not in done:
                done[rec["id"]] = (rec["status"], rec["error_kind"])
                restored.append(ResultRow.from_dict(rec, label_names))
    return Answers(done, restored)


class Book:
    def __init__(self, job: Job, ckpt: Checkpoint, plan: Plan, commits: Mapping[int, CommitRecord], *,
                 retry: frozenset[str] | None, labels: Labels | None, journal: Journal | None = None,
                 counts: Counts | None = None, scrub: Callable[[str], str] | None = None) -> None:
        self.job, self.ckpt, self.plan, self.commits = job, ckpt, plan, commits
        self.retry, self.labels = retry, labels
        self.journal, self.counts, self.scrub = journal, counts, scrub
        self.left: dict[int, set[str]] = {}  # opened shards: ids of the rows with no answer yet in this run
        self.committed: set[int] = set()  # shards committed whole by this run: nothing left in them

    # -- which rows need sending -----------------------------------------------------------

    async def answers(self, shard: Shard) -> Answers:
        """The shard's answers (read in a thread); rows read back from its part are journaled again."""
        if self.journal is not None:
            self.journal.flush_before_send()  # what was settled is in the file the thread reads
        got = await asyncio.to_thread(read_answers, self.job, self.ckpt, shard, self.commits.get(shard.index),
                                      self.labels)
        if self.journal is not None:
            for row in got.restored:  # the journal is whole again: the next commit holds them
                self.journal.append(shard.index, row)
        return got

    def open(self, shard: Shard, ids: list[str], answers: Answers, held: Collection[str] = ()) -> list[int]:
        """Positions (ascending) of the shard's rows to send, leaving out `held` ones (in a batch
        already); every row not answered becomes one the shard waits for."""
        done = answers.done
        send = [i for i, row_id in enumerate(ids) if wanted(done.get(row_id), self.retry)]
        self.left[shard.index] = {ids[i] for i in send}
        return [i for i in send if ids[i] not in held] if held else send

    def open_known(self, shard: Shard, answers: Answers, held: set[str]) -> bool:
        """Without reading the shard: True, and the shard opened, when each of its rows is answered
        for good or `held` (waiting in a batch): nothing of it to send."""
        final = {row_id for row_id, answer in answers.done.items() if not wanted(answer, self.retry)}
        waiting = held - final
        if len(final) + len(waiting) < shard.rows:
            return False
        self.left[shard.index] = waiting
        return True

    def is_open(self, shard: int) -> bool:
        return shard in self.left

    def waiting(self, shard: int) -> set[str]:
        """Rows of an opened shard with no answer yet (in a batch, or to send)."""
        return self.left.get(shard, set())

    def complete(self, shard: int) -> bool:
        """Opened, and every row of it answered."""
        return shard in self.left and not self.left[shard]

    # -- results ---------------------------------------------------------------------------

    def settle(self, shard: int, row: ResultRow) -> bool:
        """A row's result, journaled (what a provider or a model echoed scrubbed) and counted, once;
        True when it was the last row its shard waited for."""
        assert self.journal is not None and self.counts is not None
        if row.finished_at is None:
            row.finished_at = time.time()
        self.journal.append(shard, row.scrubbed(self.scrub) if self.scrub is not None else row)
        self.counts.settle(row)
        left = self.left.get(shard)
        if left is None and shard in self.committed:  # answered again after its commit (a batch of an
            self.committed.discard(shard)                # earlier --retry-failed run): to commit again
            self.left[shard] = set()
            return True
        if left is None or row.id not in left:
            return False
        left.discard(row.id)
        return not left

    async def commit(self, shard: Shard, rows: ShardRows | None = None) -> None:
        """Journal -> part file -> commit record, in a thread. `rows`: the shard's rows as held,
        else read again (image bytes as the references the part holds)."""
        assert self.journal is not None
        if self.journal.failure is None:
            await self.journal.close_shard(shard.index)
        # else: the journal file holds what could be written; the part is made from that
        if rows is None:
            rows = await asyncio.to_thread(read_rows, self.job.input, self.plan, shard, None, media_columns(self.job))
        await asyncio.to_thread(commit_shard, self.job, self.ckpt, shard, rows.table, rows.ids, self.labels)
        if self.complete(shard.index):
            self.committed.add(shard.index)
            del self.left[shard.index]
