"""The runner: wires reader, request builder, limiter, client, parser, journal and writer.

    code = run(load_job("jobs/demo.toml"), RunOptions())     # the process exit code

Shape of a run:
  1. lock the job, check the request shape, plan the manifest's shards, check committed parts;
  2. a producer reads pending shards one at a time into a bounded queue (memory stays flat);
  3. `max_concurrency` workers take rows, pace on the limiter, send, retry, and journal results;
  4. a shard whose last row is journaled is committed: part file, rename, commit record;
  5. a stop (signal, quota, auth, endpoint down, budget) lets in-flight requests finish within the
     grace period, commits what arrived (partial shards included) and leaves the rest pending.

With `[request] stream` answers are read as SSE (pipeline.net.stream); with `[labels]` an answer must
pass the schema (pipeline.rows.labels) or is asked again; with `[pricing]` each row gets a cost and a
budget holds each request's worst case before it is sent (pipeline.rows.pricing).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Coroutine

import pyarrow as pa

from ..config import DEFAULT_OUTPUT_TOKENS, Job
from ..crashpoints import crash_point, fault_point
from ..errors import (
    InputError,
    JobError,
    LocalFailure,
    RequestError,
    RowError,
    StopJob,
    local_failure,
)
from ..io.checkpoint import Checkpoint
from ..io.journal import Journal, latest_per_id, read_journal_table, repair_tail
from ..io.manifest import Plan, Shard, plan_manifest, range_digest, read_shard, row_ids
from ..io.storage import PartStore, display
from ..io.writer import (
    RESULT_SCHEMA,
    build_part,
    journal_schema,
    part_name,
    remove_leftovers,
    write_empty_part,
    write_part,
)
from ..net.breaker import ENDPOINT_FAULTS, Breaker
from ..net.client import Client
from ..net.limiter import Limiter
from ..net.retry import STOP_KINDS, retry_delay, server_delay, should_retry
from ..redact import Redactor
from ..rows.answer import parse_response
from ..rows.pricing import Budget, row_cost, total_cost, worst_case_cost
from ..rows.request import RequestBuilder, placeholders

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..rows.labels import Labels

__all__ = ["RunOptions", "run", "EXIT_OK", "EXIT_FAILED_ROWS", "EXIT_USAGE", "EXIT_STOPPED", "EXIT_LOCAL_FAILURE",
           "EXIT_LOCKED"]

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_STOPPED, EXIT_LOCAL_FAILURE, EXIT_LOCKED = 0, 1, 2, 3, 4, 75
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
STOP_DEADLINE_S = 10.0  # after a stop: grace_s for requests in flight, then this for commits, then exit
PROGRESS_EVERY_S = 0.25
ROWS_PER_BATCH = 512  # manifest rows turned into Python objects at a time
DONE_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("error_kind", pa.string())])


@dataclass(frozen=True)
class RunOptions:
    retry_failed: frozenset[str] | None = None  # None: no retry; empty set: every failed kind
    restart: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal


@dataclass
class _ShardWork:
    shard: Shard
    table: pa.Table
    ids: list[str]
    pending: int
    enqueued: bool = False


@dataclass
class _Counts:
    ok: int = 0
    failed: int = 0
    sent: int = 0  # HTTP requests made this run
    spent: float = 0.0  # cost of this run's answers, from [pricing]
    by_kind: Counter = field(default_factory=Counter)


_redactor = Redactor()  # the run's secrets (the key, storage credentials): set by run()


def _say(message: str) -> None:
    """A line for the person running the job; never with a secret in it."""
    print(_redactor.scrub(message), file=sys.stderr, flush=True)


def _hide_secrets(job: Job) -> Redactor:
    """Every message, journal line, log and summary of this run is scrubbed of these."""
    global _redactor
    _redactor = Redactor([job.api_key(), *PartStore.for_output(job.output).secrets()])
    return _redactor


def run(job: Job, options: RunOptions = RunOptions()) -> int:
    """Run the job to its end or to a stop; returns the exit code. Never raises for row errors."""
    _return_freed_memory()
    _hide_secrets(job)
    if job.run.engine == "ray":
        from .ray import (
            run_on_ray,  # the optional extra: a JobError naming it when Ray is missing
        )
    ckpt = Checkpoint(job.output.checkpoint)
    with ckpt.locked(job.name):
        if ckpt.took_over_from is not None:
            _say(f"note: took over the lock left by pid {ckpt.took_over_from}, which is no longer running")
        try:  # a full or read-only disk is one line and exit 4, before anything is sent
            plan, commits, todo = _prepare(job, ckpt, options)
            started = time.time()
            if plan.total_rows == 0:
                return _finish_empty(job, ckpt, plan, started)
        except OSError as exc:
            raise local_failure(exc, "preparing the run") from None
        if not todo:
            return _finish(job, ckpt, plan, started, _Counts(), stopped=None)
        if job.run.engine == "ray":  # the same shards and _Engine, run as Ray tasks (ray_engine.py)
            counts, stopped = run_on_ray(job, ckpt, plan, todo, options)
            return _finish(job, ckpt, plan, started, counts, stopped)
        return event_loop_runner()(_run_async(job, ckpt, plan, todo, commits, options, started))


def _prepare(job: Job, ckpt: Checkpoint, options: RunOptions) -> tuple[Plan, dict[int, dict[str, Any]], list[Shard]]:
    """Under the lock, before anything is sent: the output folder is this job's, the request shape
    is the checkpoint's, the plan is current and the committed parts are as recorded."""
    store = PartStore.for_output(job.output)
    store.claim(job.name, ckpt.folder)  # before --restart may remove anything there
    if options.restart:
        ckpt.reset(store)
    ckpt.check_job(job.request_shape(), job.run.shard_rows)
    plan = _current_plan(job, ckpt)
    commits = _verified_commits(job, ckpt, plan)
    return plan, commits, _shards_to_run(plan, commits, options.retry_failed)


def _return_freed_memory() -> None:
    """Each shard commit allocates tens of MB for a moment; a long run's RSS must not keep them
    (bench: million). Arrow on the system allocator: jemalloc, its default pool, kept them (~40
    MB). glibc's malloc kept them too, with an arena per thread (reads and commits run in threads)
    and a mmap threshold that grows after large frees: two arenas, large buffers always mmapped
    (returned on free), and `_trim` after each commit. Must run before the threads start."""
    pa.set_memory_pool(pa.system_memory_pool())
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed at 1 MB


@functools.cache  # loaded once, not at every shard commit
def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def _trim() -> None:
    """Give the pages a shard commit freed back to the system."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop where installed: the benchmarks show it cuts the event loop's cost per request.

    Set as the event loop policy, and only over the default one: a policy the host process chose
    (an embedding application, the image benchmark's stall monitor) is respected.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run


def _current_plan(job: Job, ckpt: Checkpoint) -> Plan:
    old = ckpt.load_plan()
    if old is not None and old.checked and old.matches_file(job.input.path):
        return old  # the fast path of a finished job's rerun: no manifest scan
    # (a plan made before every row was checked while planning is made again, checks included)
    plan = plan_manifest(job.input, job.run.shard_rows)
    if old is not None:
        _check_append_only(job, old, plan)
    ckpt.save_plan(plan)
    return plan


def _check_append_only(job: Job, old: Plan, new: Plan) -> None:
    """Rows already processed must be unchanged; rows may only be appended."""
    for s in old.shards:
        n = new.shards[s.index] if s.index < len(new.shards) else None
        if n is not None and n.digest == s.digest:
            continue
        if n is not None and n.rows > s.rows and n.start == s.start and range_digest(job.input, s.start, s.end) == s.digest:
            continue  # the last shard grew: rows were appended
        raise JobError(
            f"[input] path: manifest rows {s.first_row}-{s.first_row + s.rows - 1} changed since they were processed "
            f"(only appending rows is allowed); run with --restart to start over"
        )


def _verified_commits(job: Job, ckpt: Checkpoint, plan: Plan) -> dict[int, dict[str, Any]]:
    """Commit records whose part file is in place as recorded; leftovers removed."""
    store = PartStore.for_output(job.output)  # a URL's storage is first reached here, before anything is sent
    for name in remove_leftovers(store):
        _say(f"note: removed {name}, a temporary file left by an interrupted run")
    good = {}
    commits = ckpt.commits()
    in_place = store.in_place({rec["file"]: rec for rec in commits.values()})
    for index, rec in commits.items():
        if rec["file"] in in_place:
            good[index] = rec
        else:
            _say(f"note: {rec['file']} does not match its commit record; it is rebuilt from the journal")
    return good


def _shards_to_run(plan: Plan, commits: dict[int, dict[str, Any]], retry: frozenset[str] | None) -> list[Shard]:
    todo = []
    for shard in plan.shards:
        rec = commits.get(shard.index)
        complete = rec is not None and rec["rows"] == shard.rows and rec["digest"] == shard.digest
        wants_retry = retry is not None and rec is not None and any(
            n and (not retry or kind in retry) for kind, n in rec["failed"].items()
        )
        if not complete or wants_retry:
            todo.append(shard)
    return todo


async def _run_async(
    job: Job, ckpt: Checkpoint, plan: Plan, todo: list[Shard], commits: dict[int, dict[str, Any]], options: RunOptions, started: float
) -> int:
    counts = _Counts()
    stopped: StopJob | LocalFailure | int | None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if job.serve is not None:
                from ..tools.serve import start_subprocess

                base_url = await stack.enter_async_context(start_subprocess(job.serve))
                job = job.with_base_url(base_url)
            engine = _Engine(job, ckpt, plan, options, committed_rows={i: c["rows"] for i, c in commits.items()})
            counts = engine.counts
            stopped = await engine.run(todo)
    except JobError:
        raise  # before anything was sent (a bad [serve] table, a prompt placeholder): exit 2
    except Exception as exc:  # noqa: BLE001 - the supervisor itself failed: still a truthful end
        stopped = local_failure(exc, "running the job")
        _say(f"error: {stopped}")
    return _finish(job, ckpt, plan, started, counts, stopped)


class _RowState:
    """What one row's processing has done so far, for an error row should it fail unexpectedly."""

    __slots__ = ("row_id", "attempts", "spent")

    def __init__(self, row_id: str) -> None:
        self.row_id = row_id
        self.attempts = 0
        self.spent: float | None = None  # this row's cost over its attempts


class _Engine:
    """One process's worker pool over some shards, supervised.

    Every task (producer, workers, shard commits, journal syncer, progress) belongs to one
    `asyncio.TaskGroup`: none outlives the run, none fails unseen. A worker never dies of a row:
    an exception the pipeline did not plan for while processing one row makes that row an error
    row of kind "internal" (type and message; traceback in the checkpoint's errors.log) and the
    worker goes on. A failure of shared machinery (journal, commit, storage, the producer) is a
    `LocalFailure`: the run stops as for a provider's stop (requests in flight get the grace
    period, what arrived is committed where possible) and exits 4. Every stop is bounded: once
    stopping, the process ends within grace_s + STOP_DEADLINE_S whatever else hangs.
    """

    def __init__(
        self,
        job: Job,
        ckpt: Checkpoint,
        plan: Plan,
        options: RunOptions,
        committed_rows: dict[int, int] | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.job = job
        self.committed_rows = committed_rows or {}
        self.ckpt = ckpt
        self.plan = plan
        self.options = options
        self.limits = job.limits
        self.redactor = _hide_secrets(job)  # what a provider or a bug may echo never reaches a file
        self.builder = RequestBuilder(job, plan.columns, redactor=self.redactor)
        # `limiter`: the Ray engine's workers share one cluster-wide budget (lease.LeasedLimiter).
        self.limiter = limiter if limiter is not None else Limiter(
            job.limits.requests_per_minute,
            job.limits.tokens_per_minute,
            burst=job.limits.burst,
            max_pause_s=job.limits.max_retry_after_s,
        )
        self.breaker = Breaker(job.limits.breaker_failures, job.limits.breaker_seconds)
        self.journal = Journal(ckpt.journal_dir, on_failure=self._journal_failed)
        self.counts = _Counts()
        self.queue: asyncio.Queue[tuple[_ShardWork, int, dict[str, Any]] | None] = asyncio.Queue(maxsize=2 * job.limits.max_concurrency)
        self.work: dict[int, _ShardWork] = {}
        self.stop_reason: StopJob | None = None
        self.failure: LocalFailure | None = None
        self.held: list[tuple[_ShardWork, dict[str, Any]]] = []  # endpoint-fault errors during a failure streak
        self.stop_signal: int | None = None
        self.stopping = asyncio.Event()
        self.finalize_lock = asyncio.Lock()
        self.idle: set[asyncio.Task[None]] = set()  # workers waiting for a row: nothing in flight
        self.tasks: asyncio.TaskGroup | None = None
        self.deadline: threading.Timer | None = None
        self.internal_errors = 0
        self.rng = random.Random()
        self.done_before = 0
        self.columns = self._request_columns()
        self.labels = _labels(job)
        self.budget = Budget(job, 0.0)  # replaced in run() by one that knows the job's spend so far

    def _request_columns(self) -> list[str]:
        cols = {c for c in (self.job.input.image_column, self.job.input.prompt_column, self.job.input.video_column) if c}
        cols.update(placeholders(self.job.request.prompt or ""))
        return [c for c in self.plan.columns if c in cols]

    # -- the run -------------------------------------------------------------------------

    async def run(self, todo: list[Shard]) -> StopJob | LocalFailure | int | None:
        """Send the shards' pending rows; returns why it stopped early (None: it did not)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        bar = None
        try:
            if self.job.pricing is not None:
                self.budget = await asyncio.to_thread(
                    Budget.for_run, self.job, self.ckpt.journal_dir, self.ckpt.commits(), [s.index for s in todo]
                )
            _warm_imports()
            bar = self._bar()
            async with Client(
                self.job.endpoint.url,
                self.job.api_key(),
                timeout_s=self.limits.timeout_s,
                max_connections=self.limits.max_concurrency,
            ) as self.client:
                await self._supervise(todo, bar)
            await self._commit_partial()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self._close(bar)
        if self.failure is not None:
            return self.failure
        return self.stop_signal if self.stop_signal is not None else self.stop_reason

    async def _close(self, bar: tqdm | None) -> None:
        """Release everything the run holds; a failure here is recorded, never raised over the run's."""
        try:
            self.journal.close()
        except OSError as exc:
            self._fail(local_failure(exc, "closing the journal"))
        self.counts.spent = self.budget.spent_now
        self._update_bar(bar)
        if bar is not None:
            bar.close()
        try:
            await self.builder.aclose()  # the fetcher's session and the image workers
        except Exception as exc:  # noqa: BLE001 - nothing is lost by a failed close; say so and go on
            _say(f"note: could not close the image workers cleanly ({type(exc).__name__}: {exc})")
        if self.deadline is not None:
            self.deadline.cancel()

    async def _supervise(self, todo: list[Shard], bar: tqdm | None) -> None:
        async with asyncio.TaskGroup() as tasks:
            self.tasks = tasks
            ticker = tasks.create_task(self._tick(bar))
            syncer = tasks.create_task(self.journal.sync_forever())
            producer = tasks.create_task(self._guarded(self._produce(todo), "reading the manifest"))
            workers = [tasks.create_task(self._worker()) for _ in range(self.limits.max_concurrency)]
            await self._until_done(producer, workers)
            if self.stop_reason is None and self.stop_signal is None and self.failure is None:
                self._release_held()  # the run ended with the endpoint up: those rows really failed
            ticker.cancel()
            syncer.cancel()
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
            self._fail(local_failure(exc, doing))

    def _on_signal(self, sig: int) -> None:
        if self.stop_signal is not None:  # the second Ctrl-C: stop at once
            _say("stopping now; everything journaled so far is kept")
            with contextlib.suppress(OSError):
                self.journal.sync()
            os._exit(EXIT_SIGNAL[sig])
        self.stop_signal = sig
        _say(f"\nstopping: finishing requests in flight (up to {self.limits.grace_s:g}s), then committing; "
             f"press Ctrl-C again to stop at once")
        self._stopping(EXIT_SIGNAL[sig])

    def _stop(self, reason: StopJob) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stopping(EXIT_STOPPED)

    def _fail(self, failure: LocalFailure) -> None:
        """A failure of this machine's side: stop sending; the first one is the run's reason."""
        if self.failure is None:
            self.failure = failure
            _say(f"error: {failure}")
        self._stopping(EXIT_LOCAL_FAILURE)

    def _journal_failed(self, exc: OSError) -> None:
        self._fail(local_failure(exc, "journaling answers"))

    def _stopping(self, code: int) -> None:
        """Stop taking rows, and make sure the process ends even if something below hangs: a
        thread, not the loop (a blocked loop is one of the things it guards against)."""
        self.stopping.set()
        if self.deadline is None:
            limit = self.limits.grace_s + STOP_DEADLINE_S
            self.deadline = threading.Timer(limit, _exit_hard, args=(code, limit))
            self.deadline.daemon = True
            self.deadline.start()

    # -- producer ------------------------------------------------------------------------

    async def _produce(self, todo: list[Shard]) -> None:
        retry = self.options.retry_failed
        for shard in todo:
            table = await asyncio.to_thread(read_shard, self.job.input, self.plan, shard)
            ids = row_ids(self.job.input, table, shard)
            done, restored = await asyncio.to_thread(self._answers_so_far, shard)
            fault_point("produce")
            for rec in restored:  # written back: the journal is whole again
                self.journal.append(shard.index, rec)
            send = [
                i
                for i, row_id in enumerate(ids)
                if (rec := done.get(row_id)) is None
                or (retry is not None and rec[0] == "error" and (not retry or rec[1] in retry))
            ]
            del done
            self.done_before += len(ids) - len(send)
            work = _ShardWork(shard, table, ids, pending=len(send))
            self.work[shard.index] = work
            needed = table.select(self.columns)
            for start in range(0, len(send), ROWS_PER_BATCH):  # Python rows only a batch at a time
                batch = send[start : start + ROWS_PER_BATCH]
                for i, row in zip(batch, needed.take(pa.array(batch, pa.int64())).to_pylist()):
                    await self.queue.put((work, i, row))
            work.enqueued = True
            if work.pending == 0:
                self._schedule_commit(work)
        for _ in range(self.limits.max_concurrency):
            await self.queue.put(None)  # one "no more rows" per worker

    def _answers_so_far(self, shard: Shard) -> tuple[dict[str, tuple[str, str | None]], list[dict[str, Any]]]:
        """(id -> (status, error_kind)) of the shard's answered rows, from its journal, or from
        its committed part file if the journal was lost (a deleted checkpoint folder must not
        make --retry-failed buy the whole shard again); plus the records to restore."""
        repair_tail(self.ckpt.journal_dir, shard.index)
        latest = latest_per_id(read_journal_table(self.ckpt.journal_dir, shard.index, DONE_SCHEMA))
        done = dict(zip(latest.column("id").to_pylist(),
                        zip(latest.column("status").to_pylist(), latest.column("error_kind").to_pylist())))
        restored = []
        if len(done) < self.committed_rows.get(shard.index, 0):
            columns = journal_schema(self.labels.fields() if self.labels is not None else ()).names
            part = PartStore.for_output(self.job.output).read_table(part_name(shard.index), columns)
            for rec in part.to_pylist() if part is not None else ():
                if rec["id"] not in done:
                    done[rec["id"]] = (rec["status"], rec["error_kind"])
                    restored.append(rec)
        return done, restored

    # -- workers -------------------------------------------------------------------------

    async def _worker(self) -> None:
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
            work, index, row = item
            record = await self._row(work.ids[index], row)
            if record is None:  # stopped before an answer: the row stays pending
                return
            try:
                self._settle_row(work, record)
            except Exception as exc:  # noqa: BLE001 - the journal or a commit failed: the run stops
                self._fail(local_failure(exc, "journaling an answer"))
                return

    async def _row(self, row_id: str, row: dict[str, Any]) -> dict[str, Any] | None:
        """The row's record; None when a stop came first. Raises only CancelledError."""
        state = _RowState(row_id)
        try:
            return await self._process(state, row)
        except StopJob as stop:
            self._stop(stop)
        except LocalFailure as failure:
            self._fail(failure)
        except Exception as exc:  # noqa: BLE001 - a bug met by this row: an error row, the run goes on
            return self._internal_error(state, exc)
        return None

    def _internal_error(self, state: _RowState, exc: Exception) -> dict[str, Any]:
        self.internal_errors += 1
        log = self.ckpt.folder / "errors.log"
        text = self.redactor.scrub("".join(traceback.format_exception(exc)))
        with contextlib.suppress(OSError):
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} row {state.row_id}:\n{text}\n")
        if self.internal_errors == 1:
            _say(f"note: row {state.row_id} met an internal error ({type(exc).__name__}: {exc}); it is written as "
                 f"error_kind \"internal\" and the run goes on; traceback in {log}")
        err = RowError(f"internal error ({type(exc).__name__}: {exc})", kind="internal")
        return {**_error_record(state.row_id, err, attempts=state.attempts), "cost": state.spent}

    def _settle_row(self, work: _ShardWork, record: dict[str, Any]) -> None:
        crash_point("after_response")
        if record["status"] == "error" and record["error_kind"] in ENDPOINT_FAULTS and self.breaker.streak:
            # Out of attempts while nothing succeeds: the endpoint may be down rather than the
            # row bad. Hold the error until a success shows the endpoint up; if the breaker
            # trips instead, the row stays pending for the next run.
            self.held.append((work, record))
            return
        self._deliver(work, record)
        if self.held and not self.breaker.streak:
            self._release_held()

    def _deliver(self, work: _ShardWork, record: dict[str, Any]) -> None:
        self.journal.append(work.shard.index, self.redactor.scrub_record(record))
        if record["status"] == "ok":
            self.counts.ok += 1
        else:
            self.counts.failed += 1
            self.counts.by_kind[record["error_kind"]] += 1
        work.pending -= 1
        if work.pending == 0 and work.enqueued:
            self._schedule_commit(work)

    def _release_held(self) -> None:
        held, self.held = self.held, []
        for work, record in held:
            self._deliver(work, record)

    async def _backoff(self, seconds: float) -> None:
        """Wait before a retry; a stop ends the wait at once (the row then stays pending)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _process(self, state: _RowState, row: dict[str, Any]) -> dict[str, Any] | None:
        try:
            built = await self.builder.build(row)  # files, fetches and Pillow work run off the loop
        except InputError as err:
            return _error_record(state.row_id, err, attempts=0)
        fault_point("row")
        estimate = self._estimate(built.prompt, built.media)
        worst = worst_case_cost(self.job, built.prompt, built.media) if self.budget.limit is not None else 0.0
        invalid: dict[str, Any] | None = None  # the last answer that failed the [labels] schema
        invalid_count = 0
        while True:
            if self.stopping.is_set():
                return invalid  # a paid answer that failed the schema is kept; else the row stays pending
            state.attempts += 1
            sent_at = await self.limiter.acquire(estimate, stop=self.stopping)  # None: a stop came first
            if sent_at is None:
                return invalid
            try:
                held = await self.budget.hold(worst)  # may wait for requests in flight to settle
            except StopJob as stop:
                if invalid is None:
                    raise
                self._stop(stop)
                return invalid
            outcome = await self._attempt(state, built.body, held, sent_at, estimate)
            if outcome is None:
                return invalid  # stopped before sending
            if isinstance(outcome, float):
                await self._backoff(outcome)
                continue
            if outcome["status"] == "ok" and self.labels is not None:
                try:
                    outcome.update(self.labels.check(outcome["answer"]))
                except RequestError as err:  # invalid_output: ask again, up to max_invalid_retries
                    invalid = {**outcome, "status": "error", "error_kind": err.kind, "error": err.describe()}
                    invalid_count += 1
                    if invalid_count > self.labels.config.max_invalid_retries:
                        return invalid
                    continue
            return outcome

    async def _attempt(
        self, state: _RowState, body: bytes, held: float, sent_at: float, estimate: float
    ) -> dict[str, Any] | float | None:
        """One request. Returns the row's record (an answer, or an error out of attempts), the
        seconds to wait before trying again, or None when a stop came before sending. The
        budget's hold is released on every path (a leaked hold would make later rows wait forever)."""
        settled = False
        try:
            if self.stopping.is_set():
                return None
            self.counts.sent += 1
            try:
                self.journal.flush_before_send()
            except OSError as exc:
                raise local_failure(exc, "journaling answers") from None
            try:
                post = self.client.post_stream if self.job.request.stream else self.client.post
                data, headers, latency, warning = await post(body, max_bytes=self.limits.max_response_bytes)
                self.limiter.observe(headers)
                answer = parse_response(data)
                if answer.answer is None and answer.finish_reason != "length":
                    raise RequestError("response has no answer content", kind="invalid_response")
            except RequestError as err:
                self.budget.settle(held, None)
                settled = True
                return self._failed_attempt(state, err, sent_at)
            cost = row_cost(self.job, answer.model, answer.prompt_tokens, answer.completion_tokens, answer.total_tokens)
            self.budget.settle(held, cost)
            settled = True
            state.spent = cost if state.spent is None else state.spent + (cost or 0.0)
            self.breaker.success()
            self.limiter.settle(estimate, answer.total_tokens)
            return self._answer_record(state, answer, latency, warning)
        finally:
            if not settled:
                self.budget.settle(held, None)

    def _failed_attempt(self, state: _RowState, err: RequestError, sent_at: float) -> dict[str, Any] | float:
        if err.kind in STOP_KINDS:
            raise StopJob(_stop_message(err, self.job.endpoint.api_key_env), kind=err.kind) from None
        self.limiter.observe(err.headers)
        if err.kind == "rate_limit":  # the whole pool pauses and slows, not just this row
            self.limiter.slow_down(server_delay(err.headers, time.time(), rate_limited=True), sent_at=sent_at)
        if self.breaker.failure(err.kind):
            raise StopJob(
                f"the endpoint looks down ({self.breaker.streak} failed attempts in a row, last: {err.describe()})",
                kind="endpoint_down",
            ) from None
        if not should_retry(err, state.attempts, self.limits.max_attempts):
            return {**_error_record(state.row_id, err, attempts=state.attempts), "cost": state.spent}
        return float(retry_delay(err, state.attempts, now=time.time(), jitter=self.rng.random(),
                           max_server_delay=self.limits.max_retry_after_s))

    def _answer_record(self, state: _RowState, answer: Any, latency: float, warning: str | None) -> dict[str, Any]:
        record = {
            "id": state.row_id,
            "answer": answer.answer,
            "reasoning": answer.reasoning,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.total_tokens,
            "model": answer.model,
            "finish_reason": answer.finish_reason,
            "status": "ok",
            "error": warning,  # on an ok row, a warning: the answer held bad text, replaced
            "error_kind": None,
            "attempts": state.attempts,
            "latency_ms": round(latency),
            "cost": state.spent,
        }
        if answer.answer is None:  # finish_reason "length" before the thinking ended
            record.update(status="error", error_kind="truncated",
                          error="cut off by max_tokens before the answer began (finish_reason: length)")
        return record

    def _estimate(self, prompt: str, images: int) -> float:
        if self.limits.tokens_per_minute <= 0:
            return 0.0
        out = self.job.request.max_tokens or DEFAULT_OUTPUT_TOKENS
        return len(prompt) / 3 + images * self.limits.image_token_estimate + out

    # -- commits -------------------------------------------------------------------------

    def _schedule_commit(self, work: _ShardWork) -> None:
        assert self.tasks is not None
        self.tasks.create_task(self._guarded(self._commit(work), f"committing shard {work.shard.index}"))

    async def _commit(self, work: _ShardWork) -> None:
        async with self.finalize_lock:
            if self.work.get(work.shard.index) is not work:
                return
            del self.work[work.shard.index]
            if self.journal.failure is None:
                self.journal.close_shard(work.shard.index)
            # else: the journal file holds what could be written; the part is made from that
            await asyncio.to_thread(commit_shard, self.job, self.ckpt, work.shard, work.table, work.ids)
            _trim()

    async def _commit_partial(self) -> None:
        """After a stop: write what arrived for shards still open, so the output holds it now.
        Each shard is tried on its own: one that cannot be written stays in the journal."""
        if self.journal.failure is None:
            with contextlib.suppress(OSError):  # recorded by the journal, reported through _fail
                self.journal.sync()
        for work in list(self.work.values()):
            await self._guarded(self._commit(work), f"committing shard {work.shard.index}")

    # -- progress ------------------------------------------------------------------------

    def _bar(self) -> tqdm | None:
        show = self.options.progress if self.options.progress is not None else sys.stderr.isatty()
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=self.plan.total_rows, unit="row", dynamic_ncols=True, smoothing=0.1, file=sys.stderr)

    async def _tick(self, bar: tqdm | None) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            self._update_bar(bar)

    def _update_bar(self, bar: tqdm | None) -> None:
        if bar is None:
            return
        done = self.done_before + self.counts.ok + self.counts.failed
        bar.update(done - bar.n)
        spend = {"spent": f"{self.budget.spent:.4f}"} if self.job.pricing is not None else {}
        bar.set_postfix(ok=self.counts.ok, failed=self.counts.failed, **spend, refresh=False)


def _warm_imports() -> None:
    """Imports that hold the GIL for 0.1-0.5 s happen now, before the first request, not in the
    first commit's thread while requests are out: there they stalled the loop, and the requests
    due meanwhile left together (429s from an endpoint counting per half second, tests/test_ray.py).
    Shard commits need pyarrow.compute; pyarrow's first pa.array of Python objects imports pandas
    where it is installed and not marked absent (cli.py does that for `pipeline run`; a Ray worker
    process, which may serve other tasks, keeps it)."""
    import pyarrow.compute  # noqa: F401

    pa.array([0])


def _exit_hard(code: int, limit: float) -> None:
    """The stop's deadline passed (a thread or a request that ignores cancellation): end now.
    Everything journaled is on disk or in the OS's hands already."""
    _say(f"error: the run did not end within {limit:g}s of the stop; exiting now (everything journaled is kept)")
    os._exit(code)


def _stop_message(err: RequestError, key_env: str | None) -> str:
    if err.kind == "quota":
        return (f"the provider says the account is out of quota or credit (HTTP {err.status}: {err.message}); "
                f"top it up, then run the same command again to continue")
    where = (f"check the key in the variable {key_env} ([endpoint] api_key_env)" if key_env
             else "no key was sent: set [endpoint] api_key_env to the variable that holds it")
    return f"the provider refused the API key (HTTP {err.status}: {err.message}); {where}, then run again to continue"


def _error_record(row_id: str, err: RowError, *, attempts: int) -> dict[str, Any]:
    return {
        "id": row_id,
        "answer": None,
        "reasoning": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "model": None,
        "finish_reason": None,
        "status": "error",
        "error": err.describe(),
        "error_kind": err.kind,
        "attempts": attempts,
        "latency_ms": None,
    }


def _labels(job: Job) -> "Labels | None":
    """The job's [labels] checker; imported only then (jsonschema is slow to import)."""
    if job.labels is None:
        return None
    from ..rows.labels import Labels

    return Labels(job.labels)


def commit_shard(job: Job, ckpt: Checkpoint, shard: Shard, table: pa.Table, ids: list[str]) -> dict[str, Any] | None:
    """Journal -> part file -> rename -> commit record. Blocking; runs in a thread."""
    labels = _labels(job)
    extra = labels.fields() if labels is not None else ()
    lines = read_journal_table(ckpt.journal_dir, shard.index, journal_schema(extra))
    part = build_part(table, ids, latest_per_id(lines), job.input.id_column, extra)
    if part.num_rows == 0:
        return None
    fault_point("commit")
    written = write_part(PartStore.for_output(job.output), shard.index, part)
    status = part.column("status").to_pylist()
    kinds = Counter(k for k, s in zip(part.column("error_kind").to_pylist(), status) if s == "error")
    tokens = {
        key: sum(filter(None, part.column(key).to_pylist()))  # not pyarrow.compute: its import stalls ~60 ms
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    record = {
        "shard": shard.index,
        "file": written.name,
        "size": written.size,
        "part_digest": written.digest,
        "rows": part.num_rows,
        "shard_rows": shard.rows,
        "digest": shard.digest,
        "ok": status.count("ok"),
        "failed": dict(kinds),
        "tokens": tokens,
        "at": time.time(),
    }
    if written.etag is not None:
        record["etag"] = written.etag
    if job.pricing is not None:  # every attempt paid for in this shard, superseded ones included
        record["spend"] = total_cost(lines)
    ckpt.record_commit(record)
    return record


def _exit_code(stopped: StopJob | LocalFailure | int | None, state: dict[str, Any]) -> int:
    if isinstance(stopped, LocalFailure):
        return EXIT_LOCAL_FAILURE
    if isinstance(stopped, int):
        return EXIT_SIGNAL[stopped]
    if stopped is not None:
        return EXIT_STOPPED
    return EXIT_FAILED_ROWS if state["failed"] else EXIT_OK


def _finish(
    job: Job, ckpt: Checkpoint, plan: Plan, started: float, counts: _Counts, stopped: StopJob | LocalFailure | int | None
) -> int:
    """The run's end: exit code, last_run.json and the summary lines, all from the commit records,
    so the summary, `pipeline status` and last_run.json agree."""
    try:
        state = dataset_state(plan, ckpt.commits())
    except OSError as exc:
        stopped = local_failure(exc, "reading the commit records")
        state = dataset_state(plan, {})
    if stopped is None and state["pending"]:  # never 0 (or 1) while a row has no result
        stopped = LocalFailure(f"{state['pending']} rows have no result although the run ended; run again to send them")
    code = _exit_code(stopped, state)
    ended = time.time()
    summary = {
        "job": job.name,
        "started": started,
        "ended": ended,
        "duration_s": round(ended - started, 3),
        "exit_code": code,
        "output": display(job.output.path),
        "this_run": {"requests_sent": counts.sent, "ok": counts.ok, "failed": counts.failed, "failed_by_kind": dict(counts.by_kind)},
        **state,
    }
    if isinstance(stopped, (StopJob, LocalFailure)):
        summary["stopped"] = {"kind": stopped.kind, "message": _redactor.scrub(str(stopped)),
                              "local": isinstance(stopped, LocalFailure)}
    if job.pricing is not None:
        summary["this_run"]["spent"] = round(counts.spent, 6)
        summary["budget"] = job.pricing.budget
    try:
        ckpt.write_summary(summary)
    except OSError as exc:
        _say(f"error: could not write {ckpt.summary_path} ({exc.strerror}); the summary is only printed below")
        code = max(code, EXIT_LOCAL_FAILURE) if code in (EXIT_OK, EXIT_FAILED_ROWS) else code
    _say_summary(job, state, counts, ended - started, stopped, code)
    return code


def _say_summary(
    job: Job, state: dict[str, Any], counts: _Counts, seconds: float, stopped: StopJob | LocalFailure | int | None, code: int
) -> None:
    failed = ", ".join(f"{k} {n}" for k, n in sorted(state["failed_by_kind"].items())) or "none"
    _say(
        f"{job.name}: {state['ok']} ok, {state['failed']} failed ({failed}), {state['pending']} pending of {state['rows']} rows; "
        f"{counts.sent} requests this run in {seconds:.1f}s; {state['tokens']['total_tokens']} tokens in all; "
        f"results in {display(job.output.path)}"
    )
    if job.pricing is not None:
        limit = f" of a budget of {job.pricing.budget:g}" if job.pricing.budget is not None else ""
        _say(f"spent {state['spend']:.4f}{limit} in all ({counts.spent:.4f} this run)")
    if isinstance(stopped, StopJob):
        _say(f"stopped: {stopped}")
    elif isinstance(stopped, LocalFailure):
        _say(f"stopped by a local failure: {stopped}")
    if code in (EXIT_STOPPED, EXIT_LOCAL_FAILURE, *EXIT_SIGNAL.values()) or state["pending"]:
        _say(f"to continue: pipeline run {job.source}")
    elif state["failed"]:
        _say(f"to send the failed rows again: pipeline run {job.source} --retry-failed")


def _finish_empty(job: Job, ckpt: Checkpoint, plan: Plan, started: float) -> int:
    """A manifest without rows: an empty dataset with every column, so a reader of the output
    finds a table (with no rows) rather than no folder."""
    extra = _labels(job).fields() if job.labels is not None else ()  # type: ignore[union-attr]
    write_empty_part(PartStore.for_output(job.output), _empty_input(job, plan), job.input.id_column, extra)
    _say(f"{job.name}: the manifest {job.input.path} has no rows; nothing to send")
    return _finish(job, ckpt, plan, started, _Counts(), stopped=None)


def _empty_input(job: Job, plan: Plan) -> pa.Table:
    """The manifest's columns with no rows, typed as its shards would be read."""
    import base64

    import pyarrow.parquet as pq

    if plan.format == "parquet":
        schema = pq.ParquetFile(job.input.path).schema_arrow
    elif plan.format == "jsonl" and plan.header:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(plan.header)))
    else:  # csv cells are read as text; an empty JSON Lines file has no columns at all
        schema = pa.schema([(c, pa.string()) for c in plan.columns])
    return pa.Table.from_batches([], schema=schema)


def dataset_state(plan: Plan, commits: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the whole output, from the commit records alone (no answer is read)."""
    by_kind: Counter = Counter()
    ok = rows = 0
    tokens: Counter = Counter()
    spend = 0.0
    for rec in commits.values():
        spend += rec.get("spend") or 0.0
        ok += rec["ok"]
        rows += rec["rows"]
        by_kind.update(rec["failed"])
        tokens.update(rec["tokens"])
    total = plan.total_rows
    return {
        "rows": total,
        "ok": ok,
        "failed": sum(by_kind.values()),
        "failed_by_kind": dict(by_kind),
        "pending": max(0, total - rows),
        "tokens": {k: tokens.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "spend": round(spend, 6),  # from [pricing]; 0 without it
    }
