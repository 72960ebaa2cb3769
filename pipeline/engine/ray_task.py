"""The Ray side of a Ray run: the coordinator actor and the task that runs one shard.

    coordinator = ray.remote(Coordinator).remote(job.limits)   # one per run, on the driver's node
    result = shard_task(job, plan, shard, options, coordinator)  # a Ray task: ShardEngine on one shard

A task runs ShardEngine on its one shard with `asyncio.run`, paced by its share of the cluster's
one rate budget (pipeline.engine.lease: LeasedLimiter over the coordinator's RateBudget). It
reports its counts every REPORT_EVERY_S and hears back the budget's epoch (a 429 anywhere slows
everyone) and the run's stop flag (a provider's stop, a failed shard, Ctrl-C on the driver). Its
breaker never trips on its own: its events go with each report to the coordinator's one
ClusterVerdict (endpoint down, wrong job), whose news (an answer anywhere) come back with the reply.
With a bucket checkpoint the reply also says how long the driver's lease on the job still holds:
the task writes (segments, its part, its commit record) only within it (its checkpoint's fence), so
a worker cut off from its driver stops writing before another run may take the job over.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from dataclasses import replace
from typing import Any

import ray
import ray.exceptions

from ..config import Job, LimitsConfig
from ..errors import LocalFailure, StopJob
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.manifest import Plan, Shard
from ..net.breaker import ClusterVerdict, SharedBreaker
from .console import Console
from .counts import Counts
from .lease import LeasedLimiter, RateBudget
from .options import RunOptions
from .process import on_signals
from .shard import ShardEngine

__all__ = ["Coordinator", "ActorBudget", "shard_task", "REPORT_EVERY_S"]

REPORT_EVERY_S = 0.25  # workers' counts to the coordinator; stop and slowdown news back


class Coordinator:
    """The rate budget, the workers' latest counts and the stop flag. Calls are served one at a
    time (a plain Ray actor), so its state needs no lock."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.budget = RateBudget(*limits.fixed_rate(),
                                 burst=limits.burst, max_pause_s=limits.max_retry_after_s)
        self.reports: dict[str, dict[str, Any]] = {}  # attempt -> its latest counts
        self.stopped: tuple[str, str] | None = None  # (kind, message)
        self.verdict = ClusterVerdict(limits.breaker_failures, limits.breaker_seconds, limits.breaker_refusals)
        self.lease_until = -math.inf  # the driver's lease on the job, on this process's clock

    def job_lease(self, left: float) -> None:
        """The driver's lease on the job holds `left` seconds more (its checkpoint's fence)."""
        self.lease_until = time.monotonic() + left

    def job_lease_left(self) -> float:
        return self.lease_until - time.monotonic()

    def lease(self, want: int, tokens: float, token_debt: float) -> dict[str, Any]:
        return self.budget.lease(want, tokens, token_debt)

    def slow_down(self, pause_s: float | None) -> None:
        self.budget.slow_down(pause_s)

    def pause(self, seconds: float) -> None:
        self.budget.pause(seconds)

    def report(self, attempt: str, counts: dict[str, Any], token_debt: float = 0.0,
               breaker: dict[str, Any] | None = None) -> dict[str, Any]:
        self.reports[attempt] = {**counts, "heard": time.monotonic()}
        self.budget.correct(token_debt)
        if breaker is not None and (stop := self.verdict.hear(counts["shard"], breaker)) is not None:
            self.stop(*stop)
        return {"epoch": self.budget.epoch, "stop": self.stopped, "breaker": self.verdict.news(),
                "lease": self.job_lease_left()}

    def running(self, shards: list[int], queued: int = 0) -> None:
        """The driver's shards in flight (the tasks whose breakers vote on a wrong job), and how many wait."""
        self.verdict.running(shards, queued)

    def stop(self, kind: str, message: str) -> None:
        if self.stopped is None:
            self.stopped = (kind, message)

    def state(self) -> dict[str, Any]:
        """This run's counts over every attempt, rows done per shard, and the stop if any."""
        done: dict[int, int] = {}
        for r in self.reports.values():
            # A rerun of a shard starts from its journal: the furthest attempt is the shard's progress.
            done[r["shard"]] = max(done.get(r["shard"], 0), r["done"])
        total = Counts.merged(self.reports.values())  # one set of counts for the cluster (the metrics')
        recent = time.monotonic() - 4 * REPORT_EVERY_S  # a dead worker's last report holds no request now
        in_flight = sum(r.get("in_flight", 0) for r in self.reports.values() if r["heard"] >= recent)
        return {"counts": total.to_dict(), "done": sum(done.values()),
                "stop": self.stopped, "in_flight": in_flight}


class ActorBudget:
    """The coordinator's handle with the face LeasedLimiter expects (lease.RateBudgetHandle)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def lease(self, want: int, tokens: float, token_debt: float) -> dict[str, Any]:
        return await self.actor.lease.remote(want, tokens, token_debt)

    def slow_down(self, pause_s: float | None) -> None:
        self.actor.slow_down.remote(pause_s)

    def pause(self, seconds: float) -> None:
        self.actor.pause.remote(seconds)


def shard_task(job: Job, plan: Plan, shard: Shard, options: RunOptions, coordinator: Any) -> dict[str, Any]:
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
    ckpt = open_checkpoint(job.output)
    ckpt.fence.hold_for(await coordinator.job_lease_left.remote())
    reporter = _Reporter(coordinator, f"{shard.index}:{os.getpid()}:{uuid.uuid4().hex[:8]}", shard, ckpt)
    async with ckpt.shard_lock(shard.index):
        limiter = LeasedLimiter(ActorBudget(coordinator), job.limits)
        committed = ckpt.commits().get(shard.index)  # lets a lost journal fall back to the part file
        engine = ShardEngine(job, ckpt, plan, limiter=limiter, console=Console.for_job(job), options=options,
                             commits={shard.index: committed} if committed else None, breaker=SharedBreaker)
        reports = asyncio.create_task(reporter.forever(engine, limiter))
        try:
            with on_signals(asyncio.get_running_loop(), first=engine.interrupt, at_once=engine.sync_journal):
                stopped = await engine.run([shard])
        finally:
            reports.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reports
            limiter.release()
            await reporter.report(engine, limiter)  # the last counts, unspent tokens back
    return {
        "shard": shard.index,
        "signal": stopped if isinstance(stopped, int) else None,
        "stop": [stopped.kind, str(stopped)] if isinstance(stopped, StopJob) else None,
        "failure": [stopped.kind, str(stopped)] if isinstance(stopped, LocalFailure) else None,
    }


class _Reporter:
    """A task's counts to the coordinator; back come the budget's epoch and the stop flag."""

    def __init__(self, coordinator: Any, attempt: str, shard: Shard, ckpt: Checkpoint) -> None:
        self.coordinator, self.attempt, self.shard, self.ckpt = coordinator, attempt, shard, ckpt

    async def forever(self, engine: ShardEngine, limiter: LeasedLimiter) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            await self.report(engine, limiter)

    async def report(self, engine: ShardEngine, limiter: LeasedLimiter) -> None:
        c, breaker = engine.counts, engine.breaker
        assert isinstance(breaker, SharedBreaker)
        own = engine.stop_reason if limiter.stop_reason is None else None  # quota, auth, endpoint down here
        if own is not None:
            limiter.stop(own)
        counts = {**c.to_dict(), "shard": self.shard.index, "done": engine.done_before + c.ok + c.failed,
                  "in_flight": engine.gate.in_flight}
        try:
            if own is not None:
                self.coordinator.stop.remote(own.kind, str(own))
            reply = await self.coordinator.report.remote(self.attempt, counts, limiter.take_token_debt(),
                                                         breaker.take_events())
        except ray.exceptions.RayError as exc:  # the coordinator is gone: so is the driver, or soon
            limiter.stop(StopJob(f"lost the run's coordinator ({type(exc).__name__}); run again to continue",
                                 kind="coordinator_lost"))
            return
        limiter.hear(reply["epoch"])
        self.ckpt.fence.hold_for(reply["lease"])  # heard back: the driver's lease still holds this long
        if reply["stop"] is not None:
            breaker.trip()  # what it holds stays pending
            limiter.stop(StopJob(reply["stop"][1], kind=reply["stop"][0]))
        else:
            breaker.hear(reply["breaker"])  # an answer elsewhere: what it holds may be the rows' own
            engine.release_settled()
