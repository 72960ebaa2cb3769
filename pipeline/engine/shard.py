"""The shard engine: one process's supervised worker pool over some shards of a job.

    engine = ShardEngine(job, ckpt, plan, limiter=Limiter(...), console=console, options=options)
    stopped = await engine.run(shards)     # None, or why it stopped early (StopJob, LocalFailure, a signal)
    engine.counts                          # this run's rows and requests, live (progress bars read it)
    engine.stop(reason)                    # from a signal handler or an executor: stop taking rows

A producer reads the shards' pending rows (those without an answer in the journal) into a bounded
queue; `max_concurrency` workers send them (pipeline.engine.sender), journal each result as it
arrives, and a shard whose last row is journaled is committed (pipeline.engine.commit). The rate
source is whatever limiter it is given: the local Limiter, or a Ray worker's share of the
cluster's budget.

Supervision: every task (producer, workers, shard commits, the journal's syncer, the request
cache's writer) belongs to one `asyncio.TaskGroup`: none outlives the run, none fails unseen (the
cache's failures are its own: a warning, then a run without it). A worker never dies of a row: an
exception the pipeline did not plan for while sending one row makes that row an error row of kind
"internal" (type and message; traceback in the checkpoint's errors.log) and the worker goes on. A
failure of shared machinery (journal, commit, storage, the producer) is a LocalFailure: the run
stops as for a provider's stop (requests in flight get grace_s, what arrived is committed where
possible). Every stop is bounded: once stopping, the process ends within grace_s + STOP_DEADLINE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Coroutine

import pyarrow as pa

from ..config import Job
from ..crashpoints import crash_point, fault_point
from ..errors import LocalFailure, RowError, StopJob, local_failure
from ..io.cache import Cache
from ..io.checkpoint import Checkpoint
from ..io.manifest import Plan, Shard, ShardRows, Unreadable
from ..net.breaker import REFUSAL_KINDS, Breaker
from ..net.client import Client
from ..net.concurrency import Gate, Gradient
from ..net.limiter import Pacer
from ..records import CommitRecord, ResultRow
from ..rows.pricing import SpendLimit
from ..rows.request import RequestBuilder, request_columns
from .book import Book
from .console import Console
from .feed import ROWS_PER_BATCH, Feed
from .options import RunOptions
from .probes import Probes
from .process import EXIT_SIGNAL, Deadline, exit_process, give_back_memory, warm_imports
from .sender import CacheUse, RowSender, RowState, error_row
from .summary import EXIT_LOCAL_FAILURE, EXIT_STOPPED, Counts, Stopped

if TYPE_CHECKING:
    from ..rows.labels import Labels

__all__ = ["ShardEngine", "STOP_DEADLINE_S", "ROWS_PER_BATCH", "make_labels"]

STOP_DEADLINE_S = 10.0  # after a stop: grace_s for requests in flight, then this for commits, then exit


def make_labels(job: Job) -> Labels | None:
    """The job's [labels] checker, compiled once per run; imported only then (jsonschema is slow to import)."""
    if job.labels is None:
        return None
    from ..rows.labels import Labels

    return Labels(job.labels)


@dataclass
class _ShardWork:
    shard: Shard
    table: pa.Table
    ids: list[str]
    send: list[int]  # positions of the rows to send
    enqueued: bool = False  # every row to send is queued: the shard commits when the book says it is complete


class ShardEngine:
    def __init__(self, job: Job, ckpt: Checkpoint, plan: Plan, *, limiter: Pacer, console: Console,
                 options: RunOptions, commits: Mapping[int, CommitRecord] | None = None,
                 expire: Callable[[int], None] = exit_process, breaker: type[Breaker] = Breaker) -> None:
        self.job, self.ckpt, self.plan, self.options = job, ckpt, plan, options
        self.limits = job.limits
        self.limiter = limiter
        self.console = console
        self.labels = make_labels(job)
        self.builder = RequestBuilder(job, plan.columns, redactor=console.redactor, labels=self.labels)
        # Under --retry-failed the rows sent are ones already refused: alike refusals are theirs again.
        refusals = job.limits.breaker_refusals if options.retry_failed is None else 0
        self.breaker = breaker(job.limits.breaker_failures, job.limits.breaker_seconds, refusals)  # Ray: SharedBreaker
        self.journal = ckpt.journal(on_failure=self._journal_failed)
        self.counts = Counts()
        self.book = Book(job, ckpt, plan, commits or {}, retry=options.retry_failed, labels=self.labels,
                         journal=self.journal, counts=self.counts, scrub=console.redactor.scrub)
        self.done_before = 0  # rows of the given shards answered before this run
        self.queue: asyncio.Queue[tuple[_ShardWork, int, dict[str, Any]] | None] = asyncio.Queue(
            maxsize=2 * job.limits.workers)
        self.work: dict[int, _ShardWork] = {}
        self.stop_reason: StopJob | None = None
        self.failure: LocalFailure | None = None
        self.stop_signal: int | None = None
        self.held: list[tuple[_ShardWork, ResultRow]] = []  # endpoint-fault errors during a failure streak
        self.stopping = asyncio.Event()
        self.finalize_lock = asyncio.Lock()
        self.idle: set[asyncio.Task[None]] = set()  # workers waiting for a row: nothing in flight
        self.tasks: asyncio.TaskGroup | None = None  # while the run's tasks are running
        self.deadline: Deadline | None = None
        self.expire = expire  # what a stop that does not end in time comes to: the process ends (CLI)
        self.internal_errors = 0
        self.spend = SpendLimit(job, 0.0)  # replaced in run() by one that knows the job's spend so far
        self.feed = Feed(job, plan, request_columns(job, plan.columns))
        self.gate = Gate(Gradient(cap=job.limits.workers) if job.limits.auto_concurrency else None)
        self.cache: Cache | None = None  # [run] cache, opened by run(); None: off or unusable

    # -- the run -------------------------------------------------------------------------

    async def run(self, shards: list[Shard]) -> Stopped:
        """Send the shards' pending rows; returns why it stopped early (None: it did not)."""
        self.probes = Probes(shards, self.breaker, open_shard=self._open_shard, tripped=lambda: self.stop(self.breaker.stop()),
                             enqueue=self._enqueue_one,
                             spawn=lambda probe: self._spawn(probe, "reading the manifest"))
        try:
            commits = await asyncio.to_thread(self.ckpt.commits)
            if self.job.pricing is not None:
                self.spend = await asyncio.to_thread(
                    SpendLimit.for_run, self.job, self.ckpt, commits, [s.index for s in shards])
            if any(rec.ok for rec in commits.values()):
                self.breaker.vouch()  # shards answered by earlier runs: refusals now are the rows' own
            warm_imports()
            cache = await CacheUse.open(self.job, read=not self.options.no_cache, warn=self.console.say,
                                        scrub=self.console.redactor.scrub_record)
            self.cache = cache.cache if cache is not None else None
            async with Client(self.job.endpoint.url, self.job.api_key(), timeout_s=self.limits.timeout_s,
                              max_connections=self.limits.workers, proxy=self.job.endpoint_proxy(),
                              headers=self.job.endpoint.headers, api=self.job.endpoint.api, redactor=self.console.redactor) as client:
                sender = RowSender(job=self.job, builder=self.builder, client=client, limiter=self.limiter,
                                   spend=self.spend, breaker=self.breaker, counts=self.counts, labels=self.labels,
                                   stopping=self.stopping, before_send=self.journal.flush_before_send,
                                   on_stop=self.stop, gate=self.gate, cache=cache)
                await self._supervise(shards, sender)
            await self._commit_partial()
        finally:
            await self._close()
        return self.stopped

    @property
    def stopped(self) -> Stopped:
        """Why the run stopped early, so far: this machine's failure wins, then a signal, then the provider."""
        if self.failure is not None:
            return self.failure
        return self.stop_signal if self.stop_signal is not None else self.stop_reason

    async def _close(self) -> None:
        """Release everything the run holds; a failure here is recorded, never raised over the run's."""
        try:
            self.journal.close()
        except OSError as exc:
            self.stop(local_failure(exc, "closing the journal"))
        if self.cache is not None:  # the answers waiting are written (never raises: the cache warns)
            await asyncio.to_thread(self.cache.close)
        self.counts.spent = self.spend.spent_now
        self.counts.paused_s = self.limiter.paused_s
        self.counts.limits = self._limits_used()
        try:
            await self.builder.aclose()  # the fetcher's session and the image workers
        except Exception as exc:  # noqa: BLE001 - nothing is lost by a failed close; say so and go on
            self.console.say(f"note: could not close the image workers cleanly ({type(exc).__name__}: {exc})")
        if self.deadline is not None:
            self.deadline.cancel()

    def _limits_used(self) -> dict[str, Any]:
        """What "auto" limits came to, for the summary and `pipeline status`."""
        ctl = self.gate.controller
        used = {} if ctl is None else {"max_concurrency": {"auto": True, "last": ctl.allowed, "low": int(ctl.low),
                                                           "high": int(ctl.high)}}
        return {**used, **self.limiter.found()}

    async def _supervise(self, shards: list[Shard], sender: RowSender) -> None:
        async with asyncio.TaskGroup() as tasks:
            self.tasks = tasks
            syncer = tasks.create_task(self.journal.sync_forever())
            writer = tasks.create_task(self.cache.write_forever()) if self.cache is not None else None
            producer = tasks.create_task(self._guarded(self._produce(shards), "reading the manifest"))
            workers = [tasks.create_task(self._worker(sender)) for _ in range(self.limits.workers)]
            await self._until_done(producer, workers)
            theirs = await self.breaker.verdict() if self.held else True  # a Ray worker's wait for the cluster's
            if self.stop_reason is None and self.stop_signal is None and self.failure is None and theirs:
                self._release_held()  # the run ended with the endpoint up: those rows really failed
            syncer.cancel()
            if writer is not None:
                writer.cancel()  # what it has not written yet, _close writes
        self.tasks = None
        # the group has waited for every shard commit it started

    async def _until_done(self, producer: asyncio.Task[None], workers: list[asyncio.Task[None]]) -> None:
        """Until the workers run out of rows, or a stop: then the in-flight grace period."""
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            pending = set(workers)
            while pending and not stop.done():
                await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
                pending = {w for w in workers if not w.done()}
        finally:
            stop.cancel()
        producer.cancel()  # the workers are gone or stopping: nobody takes its rows any more
        self.probes.cancel()
        if not pending:
            return
        for worker in list(self.idle):
            worker.cancel()  # waiting for a row: nothing in flight to wait for
        # Requests in flight may be answers already paid for: give them the grace period.
        await asyncio.wait(pending, timeout=self.limits.grace_s)
        for worker in pending:
            worker.cancel()
        await asyncio.wait(pending)

    async def _guarded(self, work: Coroutine[Any, Any, None], doing: str) -> None:
        """Run shared machinery; its failure stops the run (LocalFailure) instead of killing the group."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it is, the run stops cleanly and says why
            self.stop(local_failure(exc, doing))

    # -- stopping ------------------------------------------------------------------------

    def stop(self, reason: StopJob | LocalFailure | int) -> None:
        """Stop taking rows: the provider's stop (StopJob), this machine's (LocalFailure, which
        wins the exit code) or a signal (its number). The first reason of each kind is kept."""
        if isinstance(reason, LocalFailure):
            if self.failure is None:
                self.failure = reason
                self.console.say(f"error: {reason}")
            code = EXIT_LOCAL_FAILURE
        elif isinstance(reason, int):
            self.stop_signal = self.stop_signal or reason
            code = EXIT_SIGNAL[reason]
        else:
            self.stop_reason = self.stop_reason or reason
            code = EXIT_STOPPED
        self.stopping.set()
        if self.deadline is None:  # whatever hangs below, the process ends
            self.deadline = Deadline(self.limits.grace_s + STOP_DEADLINE_S, code, self.console.say, self.expire)

    def interrupt(self, sig: int) -> None:
        """The first Ctrl-C / SIGTERM: finish what is in flight, commit, exit 130 / 143."""
        self.console.say(f"\nstopping: finishing requests in flight (up to {self.limits.grace_s:g}s), then committing; "
                         f"press Ctrl-C again to stop at once")
        self.stop(sig)

    def sync_journal(self, sig: int = 0) -> None:
        """The second Ctrl-C: make what was received durable before the process exits at once."""
        self.console.say("stopping now; everything journaled so far is kept")
        with contextlib.suppress(OSError):
            self.journal.sync()

    def _journal_failed(self, exc: OSError) -> None:
        self.stop(local_failure(exc, "journaling answers"))

    # -- producer ------------------------------------------------------------------------

    async def _produce(self, shards: list[Shard]) -> None:
        probes = self.probes
        for shard in shards:
            try:
                work = await probes.work_for(shard)
                async for batch in self.feed.cells(shard, work.table, work.send, refer=True):  # a batch at a time
                    for i, cells in batch:
                        await probes.hold()  # while a verdict waits for the probes: no more rows refused alike
                        if not probes.taken(shard, i):  # else a probe sent it ahead
                            probes.producing(shard, i)
                            await self.queue.put((work, i, cells))
            except Unreadable as exc:  # at its open or as its bytes are read again: its rows not queued stay
                self.console.say(f"note: shard {shard.index} is left for a later run: {exc}")  # pending; the others go on
            else:
                work.enqueued = True
                if self.book.complete(shard.index):
                    _ = self._spawn(self._commit(work), f"committing shard {work.shard.index}")  # the TaskGroup owns it
            probes.passed(shard)
        await probes.drain()  # a probe's row is queued before the workers hear "no more rows"
        for _ in range(self.limits.workers):
            await self.queue.put(None)  # one "no more rows" per worker

    async def _open_shard(self, shard: Shard) -> _ShardWork:
        """The shard's rows, and which of them to send (the book decides: pipeline.engine.book)."""
        rows = await self.feed.open(shard)
        ids = rows.ids
        answers = await self.book.answers(shard)
        fault_point("produce")
        send = self.book.open(shard, ids, answers)
        self.done_before += len(ids) - len(send)
        if self.breaker.doubting and any(answer[0] == "ok" for answer in answers.done.values()):
            self.breaker.vouch()  # this job was answered before: refusals now are the rows' own
        work = _ShardWork(shard, rows.table, ids, [i for i in send if i not in rows.errors])
        self.work[shard.index] = work
        for i in [i for i in send if i in rows.errors]:  # unreadable: error rows of kind "input", never sent
            self._settle_row(work, error_row(ids[i], RowError(rows.errors[i], kind="input"), attempts=0))
        return work

    async def _enqueue_one(self, work: _ShardWork, i: int) -> None:
        """A probe's row, ahead of the producer."""
        await self.queue.put((work, i, await self.feed.one(work.shard, work.table, i)))

    # -- workers -------------------------------------------------------------------------

    async def _worker(self, sender: RowSender) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self.stopping.is_set():
            self.idle.add(me)
            try:
                item = await self.queue.get()
            finally:
                self.idle.discard(me)
            if item is None:
                return
            work, index, cells = item
            row = await self._row(sender, work.ids[index], cells, self.probes.at(work.shard, index))
            if row is None:  # stopped before an answer: the row stays pending
                return
            try:
                self._settle_row(work, row)
            except Exception as exc:  # noqa: BLE001 - the journal or a commit failed: the run stops
                self.stop(local_failure(exc, "journaling an answer"))
                return
            self.probes.settled(work.shard, index, requested=row.attempts > 0)  # failed here: its part is probed again

    async def _row(self, sender: RowSender, row_id: str, cells: dict[str, Any], at: float) -> ResultRow | None:
        """The row's result; None when a stop came first. Raises only CancelledError."""
        state = RowState(row_id, at)
        try:
            return await sender.send(state, cells)
        except (StopJob, LocalFailure) as reason:
            self.stop(reason)
        except Exception as exc:  # noqa: BLE001 - a bug met by this row: an error row, the run goes on
            return self._internal_error(state, exc)
        return None

    def _internal_error(self, state: RowState, exc: Exception) -> ResultRow:
        self.internal_errors += 1
        text = self.console.redactor.scrub("".join(traceback.format_exception(exc)))
        with contextlib.suppress(OSError):
            self.ckpt.log_error(f"{time.strftime('%Y-%m-%d %H:%M:%S')} row {state.row_id}:\n{text}\n")
        if self.internal_errors == 1:
            self.console.say(f"note: row {state.row_id} met an internal error ({type(exc).__name__}: {exc}); it is "
                             f"written as error_kind \"internal\" and the run goes on; traceback in {self.ckpt.errors_where}")
        err = RowError(f"internal error ({type(exc).__name__}: {exc})", kind="internal")
        return error_row(state.row_id, err, attempts=state.attempts, cost=state.spent)

    def _settle_row(self, work: _ShardWork, row: ResultRow) -> None:
        crash_point("after_response")
        row.finished_at = time.time()
        if not row.ok and self.breaker.holds(row.error_kind or ""):
            # Out of attempts while nothing succeeds (the endpoint may be down), or refused while
            # every refusal so far is the same and nothing was answered (the job may be wrong):
            # not the row's fault, perhaps. Hold the error until the breaker is settled; if it
            # trips instead, the row stays pending for the next run.
            self.held.append((work, row))
            if row.error_kind in REFUSAL_KINDS:
                self.probes.ask()
            return
        self._deliver(work, row)
        self.release_settled()

    def _deliver(self, work: _ShardWork, row: ResultRow) -> None:
        if self.book.settle(work.shard.index, row) and work.enqueued:
            _ = self._spawn(self._commit(work), f"committing shard {work.shard.index}")  # the TaskGroup owns it

    def _release_held(self) -> None:
        held, self.held = self.held, []
        for work, row in held:
            self._deliver(work, row)

    def release_settled(self) -> None:
        """Once the breaker is settled (here, or by a Ray worker's cluster news): what it held is the rows' own."""
        if self.held and self.breaker.settled and self.tasks is not None:
            self._release_held()

    # -- commits -------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None], doing: str) -> asyncio.Task[None]:
        assert self.tasks is not None, "rows settle, and commits and probes start, only while the run's tasks run"
        return self.tasks.create_task(self._guarded(work, doing))

    async def _commit(self, work: _ShardWork) -> None:
        async with self.finalize_lock:
            if self.work.get(work.shard.index) is not work:
                return
            del self.work[work.shard.index]
            filled = await asyncio.to_thread(self.feed.filled, work.shard, work.table)  # the references its pass made
            await self.book.commit(work.shard, ShardRows(filled, work.ids, {}))
            give_back_memory()

    async def _commit_partial(self) -> None:
        """After a stop: write what arrived for shards still open, so the output holds it now.
        Each shard is tried on its own: one that cannot be written stays in the journal."""
        if self.journal.failure is None:
            with contextlib.suppress(OSError):  # recorded by the journal, reported through stop()
                self.journal.sync()
        for work in list(self.work.values()):
            await self._guarded(self._commit(work), f"committing shard {work.shard.index}")
