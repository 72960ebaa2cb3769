"""The Ray executor: the same shards and the same ShardEngine, run as Ray tasks over a cluster.

    [run]
    engine = "ray"
    ray_address = "auto"     # a running cluster; omitted: start a local Ray on this machine
    ray_workers = 0          # shards running at once; 0: one per CPU of the cluster
    shard_rows = 100000

Imported only when a job says engine = "ray" (Ray is the optional extra `pipeline[ray]`).

The driver (the `pipeline run` process) holds the job lock, plans the shards and checks the commit
records exactly as the local run does, then submits one Ray task per shard still to do, at most
`ray_workers` at a time. A task (pipeline.engine.ray_task) runs ShardEngine on its one shard: it
reads the shard's journal, sends only the rows not journaled yet, journals every answer and commits the
shard (part file, rename, commit record). The journal and the commit records are the only truth,
so the local engine's guarantees carry over:
  - a worker killed mid-shard: Ray runs the task again (TASK_RETRIES) and it continues from the
    shard's journal; only the rows that worker had in flight are sent twice;
  - the driver killed: Ray ends its tasks; the next run plans, verifies and runs what is left;
  - one process per shard at a time (a flock per shard), even while a task of a killed driver
    is still being torn down; with a bucket checkpoint, no writer outside the driver's lease
    (each worker's fence, renewed through the coordinator).

One small actor, the `Coordinator`, holds what the workers share: the cluster's one rate budget
(`lease.RateBudget`: leases of a few request slots and tokens; a 429 anywhere slows everyone),
the workers' counts (the driver's one progress bar and the run summary) and the stop flag (a
provider's quota/auth stop, a failed shard or Ctrl-C on the driver reaches every worker within
REPORT_EVERY_S; each commits what arrived, as the local engine does on a stop).

Storage: with a bucket checkpoint (`[output] checkpoint = "s3://..."`, pipeline.io.ckpt_bucket)
and output, nothing needs a path every machine sees: each worker writes its shard's journal
segments, part and commit record to the bucket. A folder checkpoint must be the same path on
every node: one machine, or a shared POSIX filesystem (NFS, ...) with flock and O_APPEND. The
manifest is read by every worker. `max_concurrency` is per worker: up to ray_workers *
max_concurrency requests are in flight, all paced by the one rate limit. `pipeline` must be
installed on every node.

Planning: rows/s = min(requests_per_minute / 60, workers x rows/s per worker core, what the
endpoint serves); `python -m bench.ray_bench` measures the middle term. A shard is the unit of
retry and of balancing: size it to take minutes (each costs a task start and a tail of one
request latency).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from dataclasses import replace
from typing import Any

from ..errors import JobError, LocalFailure, StopJob, local_failure

try:
    import ray
    import ray.exceptions
except ImportError:  # the extra is not installed
    raise JobError("[run] engine = \"ray\" needs the extra: pip install -e '.[ray]' in the clone (or 'pipeline[ray]')") from None

from ..config import Job
from ..io.checkpoint import Checkpoint
from ..io.manifest import Shard
from .executor import Executor
from .prepare import Prepared
from .progress import PROGRESS_EVERY_S, Progress
from .ray_task import Coordinator, shard_task
from .console import Console
from .counts import Counts, Live
from .summary import Stopped

__all__ = ["RayExecutor", "TASK_RETRIES"]

TASK_RETRIES = 3  # a shard whose worker process died is run again this many times


class RayExecutor(Executor):
    driver: _Driver | None = None

    def live(self) -> Live:
        """One series set for the cluster: the coordinator's sum of every worker's counts."""
        driver = self.driver
        if driver is None:
            return super().live()
        c, limits = driver.counts, self.job.limits
        rpm, tpm = limits.fixed_rate()
        return Live(Counts.merged([c.to_dict()]), in_flight=driver.in_flight,
                    remaining=driver.ready.plan.total_rows - driver.base_done - driver.done,
                    requests_per_minute=rpm, tokens_per_minute=tpm, concurrency=driver.workers * limits.workers)

    def execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        connected_here = _connect(self.job, self.console)
        try:
            self.driver = _Driver(self, ready, ckpt)
            return self.host.run_loop(self.driver.run())
        finally:
            if connected_here:
                ray.shutdown()  # ends a Ray started here; only disconnects from a cluster


def _connect(job: Job, console: Console) -> bool:
    if ray.is_initialized():  # e.g. a notebook or a test that started Ray itself
        return False
    address = job.run.ray_address
    # JSON logs: Ray's own lines while it starts are JSON too; after, they go through the console
    json_logs = ray.LoggingConfig(encoding="JSON", log_level="WARNING") if console.json else None
    try:
        # Workers' own output stays in Ray's session logs: the driver prints what a local run prints.
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 logging_config=json_logs)
        console.adopt_logger("ray")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JobError(f"[run] ray_address: cannot connect to {where} ({first}); "
                       f"start one with `ray start --head`, or leave ray_address out to start a local Ray") from None
    return True


class _Driver:
    """One run's driver loop: submits shard tasks, settles their results, polls the coordinator."""

    def __init__(self, executor: RayExecutor, ready: Prepared, ckpt: Checkpoint) -> None:
        self.executor, self.ready, self.ckpt = executor, ready, ckpt
        self.job, self.options, self.console = executor.job, executor.options, executor.console
        self.stopping = False
        self.stop_reason: StopJob | None = None
        self.stop_signal: int | None = None
        self.failure: LocalFailure | None = None
        self.counts = Counts()
        self.in_flight = 0  # requests out over the cluster, as last heard
        self.done = 0  # rows of the shards to do that have a result, as last heard
        self.workers = 1
        self.base_done = Executor._done_before(ready)  # shards committed before
        self.coordinator: Any = None

    async def run(self) -> tuple[Counts, Stopped]:
        async with self.executor.serving() as job:  # on this machine: reachable by this machine's workers
            self.coordinator = ray.remote(Coordinator).options(num_cpus=0, max_restarts=0).remote(job.limits)
            loop = asyncio.get_running_loop()
            with self.executor.host.signals(loop, self._interrupt, self._at_once), \
                    Progress(self.executor.progress, total=self.ready.plan.total_rows, initial=self.base_done,
                             auto=self.executor.host.auto_progress) as bar:
                try:
                    await self._drive(job, bar)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not self.executor.host.cancelled() or task is None:
                        raise
                    task.uncancel()  # the host ended the run at once (a second Ctrl-C): still a summary
        stopped: Stopped = self.failure or (self.stop_signal if self.stop_signal is not None else self.stop_reason)
        return self.counts, stopped

    async def _drive(self, job: Job, bar: Progress) -> None:
        cpus = float(ray.cluster_resources().get("CPU", 0))
        workers = self.workers = self.job.run.ray_workers or max(1, int(cpus))
        # More workers than CPUs share them: a worker mostly waits on the endpoint.
        task = ray.remote(shard_task).options(
            num_cpus=min(1.0, cpus / workers) if cpus else 1.0, max_retries=TASK_RETRIES, retry_exceptions=False
        )
        job_ref, plan_ref = ray.put(job), ray.put(self.ready.plan)
        await self.coordinator.job_lease.remote(self.ckpt.fence.left())  # before any task asks
        worker_options = replace(self.options, restart=False, progress=False)
        queue: deque[Shard] = deque(self.ready.todo)
        running: dict[asyncio.Future[Any], Shard] = {}
        rerun: Counter[int] = Counter()
        voters: tuple[list[int], int] = ([], 0)
        while True:
            while queue and not self.stopping and len(running) < workers:
                shard = queue.popleft()
                ref = task.remote(job_ref, plan_ref, shard, worker_options, self.coordinator)
                running[asyncio.wrap_future(ref.future())] = shard
            if voters != (now := (sorted(s.index for s in running.values()), len(queue))):
                voters = now
                self.coordinator.running.remote(*voters)  # whose breakers vote on a wrong job, how many wait
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
            self.console.say(f"error: {failure}")
        self._halt("failed", str(failure))

    def _halt(self, kind: str, message: str) -> None:
        """Stop the whole run: the first cause wins; every worker hears it on its next report."""
        if not self.stopping:
            self.stopping = True
            if kind != "failed":
                self.stop_reason = StopJob(message, kind=kind)
            self.coordinator.stop.remote(kind, message)

    def _interrupt(self, sig: int) -> None:
        self.stop_signal = sig
        self.stopping = True
        self.coordinator.stop.remote("signal", "stopped by a signal")
        self.console.say(f"\nstopping: workers finish requests in flight (up to {self.job.limits.grace_s:g}s), "
                         f"then commit; press Ctrl-C again to stop at once")

    def _at_once(self, sig: int) -> None:  # the second Ctrl-C: the process exits, Ray ends its tasks
        self.console.say("stopping now; everything journaled so far is kept")

    async def _poll(self, bar: Progress) -> None:
        try:
            self.ckpt.fence()  # this run's lease on the job still holds ...
        except OSError as exc:
            self._failed(local_failure(exc, "keeping the job's lease"))
        self.coordinator.job_lease.remote(self.ckpt.fence.left())  # ... and the workers write only within it
        state = await self.coordinator.state.remote()
        self.counts = Counts.merged([state["counts"]])
        self.in_flight = state.get("in_flight", 0)
        if state["stop"] is not None and not self.stopping:
            self._halt(*state["stop"])
        self.done = state["done"]
        bar.show(self.base_done + state["done"], ok=self.counts.ok, failed=self.counts.failed)
