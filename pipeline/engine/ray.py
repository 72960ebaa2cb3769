"""The Ray engine: the same shards and the same `_Engine`, run as Ray tasks over a cluster.

    [run]
    engine = "ray"
    ray_address = "auto"     # a running cluster; omitted: start a local Ray on this machine
    ray_workers = 0          # shards running at once; 0: one per CPU of the cluster
    shard_rows = 100000

Imported only when a job says engine = "ray" (Ray is the optional extra `pipeline[ray]`).

The driver (the `pipeline run` process) holds the job lock, plans the shards and checks the commit
records exactly as the local run does, then submits one Ray task per shard still to do, at most
`ray_workers` at a time. A task runs `_Engine` on its one shard with `asyncio.run`: it reads the
shard's journal, sends only the rows not journaled yet, journals every answer and commits the
shard (part file, rename, commit record). The journal and the commit records are the only truth,
so the local engine's guarantees carry over:
  - a worker killed mid-shard: Ray runs the task again (TASK_RETRIES) and it continues from the
    shard's journal; only the rows that worker had in flight are sent twice;
  - the driver killed: Ray ends its tasks; the next run plans, verifies and runs what is left;
  - one process per shard at a time (a flock per shard), even while a task of a killed driver
    is still being torn down.

One small actor, the `Coordinator`, holds what the workers share: the cluster's one rate budget
(`lease.RateBudget`: leases of a few request slots and tokens; a 429 anywhere slows everyone),
the workers' counts (the driver's one progress bar and the run summary) and the stop flag (a
provider's quota/auth stop, a failed shard or Ctrl-C on the driver reaches every worker within
REPORT_EVERY_S; each commits what arrived, as the local engine does on a stop).

Storage: the output and checkpoint folders must be the same path on every node: one machine, or
a shared POSIX filesystem (NFS, ...) with flock and O_APPEND; object stores (s3://) are not
supported. `max_concurrency` is per worker: up to ray_workers * max_concurrency requests are in
flight, all paced by the one rate limit. `pipeline` must be installed on every node.

Planning: rows/s = min(requests_per_minute / 60, workers x rows/s per worker core, what the
endpoint serves); `python -m bench.ray_bench` measures the middle term. A shard is the unit of
retry and of balancing: size it to take minutes (each costs a task start and a tail of one
request latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import signal
import sys
import uuid
from collections import Counter, deque
from dataclasses import replace
from typing import Any, AsyncIterator

from ..errors import JobError, LocalFailure, StopJob, local_failure

try:
    import ray
    import ray.exceptions
except ImportError:  # the extra is not installed
    raise JobError("[run] engine = \"ray\" needs the extra: pip install 'pipeline[ray]'") from None

from tqdm import tqdm

from ..config import Job, LimitsConfig
from ..io.checkpoint import Checkpoint
from ..io.manifest import Plan, Shard
from .lease import LeasedLimiter, RateBudget
from .runner import EXIT_SIGNAL, PROGRESS_EVERY_S, RunOptions, _Counts, _Engine, _say

__all__ = ["run_on_ray", "Coordinator", "TASK_RETRIES", "REPORT_EVERY_S"]

TASK_RETRIES = 3  # a shard whose worker process died is run again this many times
REPORT_EVERY_S = 0.25  # workers' counts to the coordinator; stop and slowdown news back


# -- the coordinator: one per run, a Ray actor ------------------------------------------------


class Coordinator:
    """The rate budget, the workers' latest counts and the stop flag. Calls are served one at a
    time (a plain Ray actor), so its state needs no lock."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.budget = RateBudget(limits.requests_per_minute, limits.tokens_per_minute,
                                 burst=limits.burst, max_pause_s=limits.max_retry_after_s)
        self.reports: dict[str, dict[str, Any]] = {}  # attempt -> its latest counts
        self.stopped: tuple[str, str] | None = None  # (kind, message)

    def lease(self, want: int, tokens: float, token_debt: float) -> dict[str, Any]:
        return self.budget.lease(want, tokens, token_debt)

    def slow_down(self, pause_s: float | None) -> None:
        self.budget.slow_down(pause_s)

    def pause(self, seconds: float) -> None:
        self.budget.pause(seconds)

    def report(self, attempt: str, counts: dict[str, Any], token_debt: float = 0.0) -> dict[str, Any]:
        self.reports[attempt] = counts
        self.budget.correct(token_debt)
        return {"epoch": self.budget.epoch, "stop": self.stopped}

    def stop(self, kind: str, message: str) -> None:
        if self.stopped is None:
            self.stopped = (kind, message)

    def state(self) -> dict[str, Any]:
        """This run's counts over every attempt, rows done per shard, and the stop if any."""
        counts: Counter[str] = Counter()
        by_kind: Counter[str] = Counter()
        done: dict[int, int] = {}
        for r in self.reports.values():
            counts.update({k: r[k] for k in ("ok", "failed", "sent")})
            by_kind.update(r["by_kind"])
            # A rerun of a shard starts from its journal: the furthest attempt is the shard's progress.
            done[r["shard"]] = max(done.get(r["shard"], 0), r["done"])
        return {"counts": dict(counts), "by_kind": dict(by_kind), "done": sum(done.values()), "stop": self.stopped}


class _ActorBudget:
    """The coordinator's handle with the face LeasedLimiter expects."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def lease(self, want: int, tokens: float, token_debt: float) -> dict[str, Any]:
        return await self.actor.lease.remote(want, tokens, token_debt)

    def slow_down(self, pause_s: float | None) -> None:
        self.actor.slow_down.remote(pause_s)

    def pause(self, seconds: float) -> None:
        self.actor.pause.remote(seconds)


# -- a worker: one shard --------------------------------------------------------------------


def _shard_task(job: Job, plan: Plan, shard: Shard, options: RunOptions, coordinator: Any) -> dict[str, Any]:
    """The Ray task. Runs in a worker process; everything it leaves behind is on the storage."""
    return asyncio.run(_run_shard(job, plan, shard, options, coordinator))


def _sized_for_task(job: Job) -> Job:
    """The image pool of a shard task gets the CPUs Ray gave the task, not every core of its node:
    with one image process per core in every task, two tasks on a 2-core node ran no faster than
    one (bench: ray). An explicit [images] workers is kept."""
    if job.images.workers:
        return job
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return replace(job, images=replace(job.images, workers=max(1, math.ceil(cpus))))


async def _run_shard(job: Job, plan: Plan, shard: Shard, options: RunOptions, coordinator: Any) -> dict[str, Any]:
    job = _sized_for_task(job)
    ckpt = Checkpoint(job.output.checkpoint)
    attempt = f"{shard.index}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    async with _shard_lock(ckpt, shard):
        limiter = LeasedLimiter(_ActorBudget(coordinator), job.limits)
        committed = ckpt.commits().get(shard.index)  # lets a lost journal fall back to the part file
        engine = _Engine(job, ckpt, plan, options, committed_rows={shard.index: committed["rows"]} if committed else None,
                         limiter=limiter)
        reporter = asyncio.create_task(_report_forever(engine, limiter, coordinator, attempt, shard))
        try:
            stopped = await engine.run([shard])
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            limiter.release()
            await _report(engine, limiter, coordinator, attempt, shard)  # the last counts, unspent tokens back
    return {
        "shard": shard.index,
        "signal": stopped if isinstance(stopped, int) else None,
        "stop": [stopped.kind, str(stopped)] if isinstance(stopped, StopJob) else None,
        "failure": [stopped.kind, str(stopped)] if isinstance(stopped, LocalFailure) else None,
    }


@contextlib.asynccontextmanager
async def _shard_lock(ckpt: Checkpoint, shard: Shard) -> AsyncIterator[None]:
    """One process per shard: a task of a killed driver may still be dying when the next run starts."""
    ckpt.journal_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(ckpt.journal_dir / f"shard-{shard.index:06d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def _report_forever(engine: _Engine, limiter: LeasedLimiter, coordinator: Any, attempt: str, shard: Shard) -> None:
    while True:
        await asyncio.sleep(REPORT_EVERY_S)
        await _report(engine, limiter, coordinator, attempt, shard)


async def _report(engine: _Engine, limiter: LeasedLimiter, coordinator: Any, attempt: str, shard: Shard) -> None:
    """Counts to the coordinator; back come the budget's epoch and the stop flag."""
    c = engine.counts
    own = engine.stop_reason if limiter.stop_reason is None else None  # quota, auth, endpoint down here
    if own is not None:
        limiter.stop(own)
    counts = {"shard": shard.index, "done": engine.done_before + c.ok + c.failed,
              "ok": c.ok, "failed": c.failed, "sent": c.sent, "by_kind": dict(c.by_kind)}
    try:
        if own is not None:
            coordinator.stop.remote(own.kind, str(own))
        reply = await coordinator.report.remote(attempt, counts, limiter.take_token_debt())
    except ray.exceptions.RayError as exc:  # the coordinator is gone: so is the driver, or soon
        limiter.stop(StopJob(f"lost the run's coordinator ({type(exc).__name__}); run again to continue", kind="coordinator_lost"))
        return
    limiter.hear(reply["epoch"])
    if reply["stop"] is not None:
        limiter.stop(StopJob(reply["stop"][1], kind=reply["stop"][0]))


# -- the driver ---------------------------------------------------------------------------------


def run_on_ray(
    job: Job, ckpt: Checkpoint, plan: Plan, todo: list[Shard], options: RunOptions
) -> tuple[_Counts, StopJob | LocalFailure | int | None]:
    """Run the `todo` shards on Ray; returns this run's counts and why it stopped (as `_Engine.run`)."""
    connected_here = _connect(job)
    try:
        return asyncio.run(_Driver(job, plan, options).run(todo))
    finally:
        if connected_here:
            ray.shutdown()  # ends a Ray started here; only disconnects from a cluster


def _connect(job: Job) -> bool:
    if ray.is_initialized():  # e.g. a notebook or a test that started Ray itself
        return False
    address = job.run.ray_address
    try:
        # Workers' own output stays in Ray's session logs: the driver prints what a local run prints.
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise JobError(f"[run] ray_address: cannot connect to {where} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                       f"start one with `ray start --head`, or leave ray_address out to start a local Ray") from None
    return True


class _Driver:
    def __init__(self, job: Job, plan: Plan, options: RunOptions) -> None:
        self.job = job
        self.plan = plan
        self.options = options
        self.stopping = False
        self.stop_reason: StopJob | None = None
        self.stop_signal: int | None = None
        self.failure: LocalFailure | None = None
        self.counts = _Counts()
        self.base_done = 0  # rows of shards committed before this run, set by run()
        self.coordinator: Any = None

    async def run(self, todo: list[Shard]) -> tuple[_Counts, StopJob | LocalFailure | int | None]:
        self.base_done = self.plan.total_rows - sum(s.rows for s in todo)
        async with contextlib.AsyncExitStack() as stack:
            job = self.job
            if job.serve is not None:  # the built-in endpoint, on this machine: reachable by local workers
                from ..tools.serve import start_subprocess

                job = job.with_base_url(await stack.enter_async_context(start_subprocess(job.serve)))
            self.coordinator = ray.remote(Coordinator).options(num_cpus=0, max_restarts=0).remote(job.limits)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
            stack.callback(lambda: [loop.remove_signal_handler(s) for s in (signal.SIGINT, signal.SIGTERM)])
            bar = self._bar(todo)
            stack.callback(lambda: bar.close() if bar is not None else None)
            await self._drive(job, todo, bar)
        if self.failure is not None:
            return self.counts, self.failure
        return self.counts, self.stop_signal if self.stop_signal is not None else self.stop_reason

    async def _drive(self, job: Job, todo: list[Shard], bar: tqdm | None) -> None:
        cpus = float(ray.cluster_resources().get("CPU", 0))
        workers = self.job.run.ray_workers or max(1, int(cpus))
        # More workers than CPUs share them: a worker mostly waits on the endpoint.
        task = ray.remote(_shard_task).options(
            num_cpus=min(1.0, cpus / workers) if cpus else 1.0, max_retries=TASK_RETRIES, retry_exceptions=False
        )
        job_ref, plan_ref = ray.put(job), ray.put(self.plan)
        worker_options = replace(self.options, restart=False, progress=False)
        queue: deque[Shard] = deque(todo)
        running: dict[asyncio.Future[Any], Shard] = {}
        rerun: Counter[int] = Counter()
        while True:
            while queue and not self.stopping and len(running) < workers:
                shard = queue.popleft()
                ref = task.remote(job_ref, plan_ref, shard, worker_options, self.coordinator)
                running[asyncio.wrap_future(ref.future())] = shard
            if not running:
                break
            done, _ = await asyncio.wait(running, timeout=PROGRESS_EVERY_S, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                self._settle(fut, running.pop(fut), queue, rerun)
            await self._poll(bar)
        await self._poll(bar)

    def _settle(self, fut: asyncio.Future[Any], shard: Shard, queue: deque[Shard], rerun: Counter[int]) -> None:
        try:
            result = fut.result()
        except ray.exceptions.RayTaskError as err:  # the task raised: e.g. the manifest changed under it
            cause = err.cause if isinstance(err.cause, Exception) else err
            self._failed(local_failure(cause, f"shard {shard.index}"))
            return
        except ray.exceptions.RayError as err:  # its worker died TASK_RETRIES + 1 times, or its node is gone
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self._halt("worker_lost", f"shard {shard.index} could not be finished on Ray "
                                      f"({type(err).__name__}: {first[:200]}); run again to continue")
            return
        if result["failure"] is not None:
            self._failed(LocalFailure(result["failure"][1], kind=result["failure"][0]))
        elif result["stop"] is not None:
            self._halt(*result["stop"])
        elif result["signal"] is not None and not self.stopping:
            # That worker alone was stopped (its node drained, say): the shard goes on elsewhere.
            rerun[shard.index] += 1
            if rerun[shard.index] <= TASK_RETRIES:
                queue.append(shard)
            else:
                self._halt("worker_lost", f"the workers running shard {shard.index} were stopped {rerun[shard.index]} times")

    def _failed(self, failure: LocalFailure) -> None:
        if self.failure is None:
            self.failure = failure
            _say(f"error: {failure}")
        self._halt("failed", str(failure))

    def _halt(self, kind: str, message: str) -> None:
        """Stop the whole run: the first cause wins; every worker hears it on its next report."""
        if not self.stopping:
            self.stopping = True
            if kind != "failed":
                self.stop_reason = StopJob(message, kind=kind)
            self.coordinator.stop.remote(kind, message)

    def _on_signal(self, sig: int) -> None:
        if self.stop_signal is not None:  # the second Ctrl-C: stop at once (Ray ends the tasks)
            _say("stopping now; everything journaled so far is kept")
            os._exit(EXIT_SIGNAL[sig])
        self.stop_signal = sig
        self.stopping = True
        self.coordinator.stop.remote("signal", "stopped by a signal")
        _say(f"\nstopping: workers finish requests in flight (up to {self.job.limits.grace_s:g}s), then commit; "
             f"press Ctrl-C again to stop at once")

    async def _poll(self, bar: tqdm | None) -> None:
        state = await self.coordinator.state.remote()
        c = state["counts"]
        self.counts = _Counts(ok=c.get("ok", 0), failed=c.get("failed", 0), sent=c.get("sent", 0),
                              by_kind=Counter(state["by_kind"]))
        if state["stop"] is not None and not self.stopping:
            self._halt(*state["stop"])
        if bar is not None:
            bar.update(self.base_done + state["done"] - bar.n)
            bar.set_postfix(ok=self.counts.ok, failed=self.counts.failed, refresh=False)

    def _bar(self, todo: list[Shard]) -> tqdm | None:
        show = self.options.progress if self.options.progress is not None else sys.stderr.isatty()
        if not show:
            return None
        return tqdm(total=self.plan.total_rows, initial=self.base_done, unit="row", dynamic_ncols=True,
                    smoothing=0.1, file=sys.stderr)
