"""The built-in endpoint as a GPU server: at most `capacity` requests worked on at once, the rest
waiting in arrival order (a deque of futures: a freed place goes to the oldest waiter, never to a
newcomer), a 503 at once when `queue_limit` already wait, and a latency that grows with the batch
(`batch_latency_growth`), as a continuous-batching server's does. The capacity changes at run time
by POST /admin/capacity or at the times `capacity_schedule` gives; either way new admissions obey
it at once and requests already in service finish. Capacity 0 is unlimited: nobody waits.

    gate = Capacity(opts)
    if not await gate.enter():      # False: the queue is full (app.py answers a 503)
        ...
    try:
        delay = opts.latency_ms * gate.growth()   # taken when service starts
    finally:
        gate.leave()
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from ...config.serve import ServeOptions
from ...net.concurrency import Places

__all__ = ["Capacity", "follow_schedule", "SCHEDULE_TICK_S"]

SCHEDULE_TICK_S = 0.02  # how often `capacity_schedule` is looked at


class Capacity(Places):
    """Places in service and the queue of those waiting for one (net.concurrency.Places: a freed
    place goes to the oldest waiter, taken for it before it resumes); the counts /stats reports."""

    def __init__(self, opts: ServeOptions) -> None:
        super().__init__()
        self.opts = opts
        self.restart()

    def restart(self) -> None:
        """POST /stats/reset: the configured capacity, the schedule's clock and the counts afresh;
        requests in service and in the queue keep their places."""
        self.limit = self.opts.capacity
        self.started = time.monotonic()
        self.applied = -1  # the schedule's last step applied
        self.max_busy = self.busy
        self.max_queued = len(self.waiting)
        self.rejected = 0
        self.tick()

    def free(self) -> bool:
        return self.limit <= 0 or self.busy < self.limit  # busy counts also while the capacity is 0

    def _take(self) -> None:
        super()._take()
        self.max_busy = max(self.max_busy, self.busy)

    async def enter(self) -> bool:
        """Wait for a place, in arrival order; False at once when the queue is full."""
        bound = self.opts.queue_limit
        if (self.waiting or not self.free()) and bound is not None and len(self.waiting) >= bound:
            self.rejected += 1
            return False
        self.max_queued = max(self.max_queued, len(self.waiting) + (1 if self.waiting or not self.free() else 0))
        await self.take()
        return True

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.wake()

    def tick(self) -> None:
        """Apply the schedule's step whose time has come (once: a POST after it holds until the next)."""
        elapsed = time.monotonic() - self.started
        due = [i for i, (t, _) in enumerate(self.opts.capacity_schedule) if t <= elapsed]
        if due and due[-1] != self.applied:
            self.applied = due[-1]
            self.set_limit(self.opts.capacity_schedule[self.applied][1])

    def growth(self) -> float:
        """How much longer than latency_ms this request's service takes: 1 + growth x (busy - 1) / capacity."""
        if self.limit <= 0 or not self.opts.batch_latency_growth:
            return 1.0
        return 1 + self.opts.batch_latency_growth * max(0, self.busy - 1) / self.limit

    def retry_in(self) -> float:
        """Seconds until the queue has moved past a newcomer, about: the rounds ahead of it x the latency."""
        rounds = math.ceil((len(self.waiting) + 1) / max(1, self.limit))
        return max(0.001, rounds * self.opts.latency_ms / 1000)

    def stats(self) -> dict[str, Any]:
        return {"capacity": self.limit, "in_service": self.busy, "max_in_service": self.max_busy,
                "queued_now": len(self.waiting), "max_queued": self.max_queued, "queue_rejected": self.rejected}


async def follow_schedule(gate: Capacity) -> None:
    """Apply `capacity_schedule` as its times come, until the app stops."""
    while True:
        await asyncio.sleep(SCHEDULE_TICK_S)
        gate.tick()
