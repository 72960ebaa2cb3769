"""The lease: one rate limit for many processes, handed out in short slices.

    budget = RateBudget(requests_per_minute=600, tokens_per_minute=0)   # one, in a Ray actor
    grant = budget.lease(want=4, tokens=0.0, token_debt=0.0)           # each worker, now and then
    limiter = LeasedLimiter(remote_budget, limits)                      # the worker's Pacer

`RateBudget` keeps the cluster's only schedule: a leaky bucket whose places are start times
("slots"). A lease is a few consecutive slots, as delays from now; no two leases share a slot, so
however many workers there are, in any window of T seconds at most burst + rate*T requests start:
never more than requests_per_minute in sixty seconds, about rpm/60 in any one second. A slot not
used within `SLOT_EXPIRY_S` of its time is thrown away (a worker that died, or ran out of rows,
returns nothing: its slots just pass). Tokens per minute are leased the same way, as a budget of
tokens usable after a delay, corrected by what the server reports as soon as a worker next
leases or reports (every few hundred milliseconds).

A 429 seen by any worker is sent to the budget: it pauses and slows the pace for everyone (the
same policy as the local `Limiter`), and bumps an epoch that tells every worker to drop the
slots it holds, so the slowdown reaches the whole cluster within one lease.

Pure Python, no Ray: the budget takes a clock, so it is tested as a table of times.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any, Awaitable, Callable, Protocol

from ..config import LimitsConfig
from ..errors import StopJob
from ..net.limiter import LATE_S, Limiter
from ..waits import wait_event

__all__ = ["RateBudget", "LeasedLimiter", "RateBudgetHandle", "LEASE_S", "SLOT_EXPIRY_S"]

LEASE_S = 0.25  # a lease covers about this much of the cluster's pace: a 429 reaches all within it
SLOT_EXPIRY_S = 0.05  # a slot sent later than this would bunch with others' slots: dropped instead
TOKEN_LEASE_S = 0.5  # a token lease covers about this much of tokens_per_minute


class RateBudget(Limiter):
    """The cluster's schedule (lives in one place, e.g. a Ray actor).

    It is a Limiter for its pause, slowdown and recovery policy (one policy for both engines);
    instead of waiting itself, it hands out start times.
    """

    def __init__(self, requests_per_minute: float, tokens_per_minute: float = 0.0, *, burst: int = 1,
                 max_pause_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(requests_per_minute, tokens_per_minute, burst=burst, max_pause_s=max_pause_s, clock=clock)
        self.next_free = -math.inf  # the bucket starts full: `burst` slots may start at once
        self.epoch = 0  # bumped on every slowdown or pause: workers drop the slots they hold

    def lease(self, want: int, tokens: float = 0.0, token_debt: float = 0.0) -> dict[str, Any]:
        """`want` slots (delays from now, in order); with `tokens`, the delay before they may be spent.

        `token_debt` is what earlier leases' requests really used beyond their estimates (negative:
        less), so the token schedule is corrected for everyone.
        """
        now = self.clock()
        self._recover(now)
        self.correct(token_debt)
        rate = self.rate_per_s
        floor = max(now, self.paused_until)
        # A bucket of `burst` places: up to `burst` slots may share the first start time.
        base = max(self.next_free, floor - (self.burst - 1) / rate)
        slots = []
        for _ in range(max(0, want)):
            delay = max(base, floor) - now
            slots.append(0.0 if delay < 1e-9 else delay)  # float dust from summing 1/rate
            base += 1.0 / rate
        self.next_free = base
        token_delay = None
        if tokens > 0 and self.tokens is not None:
            token_delay = max(floor - now, self.tokens.delay_for(tokens))
        return {"slots": slots, "token_delay": token_delay, "epoch": self.epoch}

    def correct(self, token_debt: float) -> None:
        """Tokens really used beyond the estimates leased for them (negative: fewer)."""
        if self.tokens is not None and token_debt:
            self.tokens.adjust(token_debt)

    def slow_down(self, pause_s: float | None, *, sent_at: float | None = None) -> None:
        before = (self.factor, self.paused_until)
        epoch = self.epoch
        super().slow_down(pause_s, sent_at=sent_at)  # may pause() too: still one new epoch
        if (self.factor, self.paused_until) != before:
            # Holders drop the slots granted at the old pace when they hear of it; the schedule
            # itself goes on after them, so a slot in use and a new one never overlap.
            self.epoch = epoch + 1

    def pause(self, seconds: float) -> None:
        """The server said "no requests left until ..." (x-ratelimit-remaining-* = 0)."""
        until = self.clock() + min(max(0.0, seconds), self.max_pause_s)
        if until > self.paused_until:
            self.paused_until = until
            self.epoch += 1


class RateBudgetHandle(Protocol):
    """What a worker's limiter needs from the budget; the Ray actor's handle is wrapped in one."""

    def lease(self, want: int, tokens: float, token_debt: float) -> Awaitable[dict[str, Any]]: ...
    def slow_down(self, pause_s: float | None) -> None: ...  # fire and forget
    def pause(self, seconds: float) -> None: ...  # fire and forget


class LeasedLimiter:
    """A worker's Pacer (net.limiter): its pace comes from a shared budget. A local Limiter keeps
    its own pause and slowdown (the same policy as a local run's), so a 429 pauses this worker at
    once, before the budget's news reaches the others.

    `acquire` raises StopJob once `stop()` was called: the engine's workers then stop taking rows,
    as they do for a provider's stop, while requests already in flight finish.
    """

    def __init__(self, budget: RateBudgetHandle, limits: LimitsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.local = Limiter(limits.requests_per_minute, limits.tokens_per_minute, burst=limits.burst,
                             max_pause_s=limits.max_retry_after_s, clock=clock)
        self.clock = clock
        self.budget = budget
        # At most about LEASE_S of the cluster's pace per lease, and never more than this worker
        # can start at once (more would sit idle and expire).
        self.want = max(1, min(limits.workers, math.floor(self.local.rate_per_s * LEASE_S)))
        tokens = self.local.tokens
        self.counts_tokens = tokens is not None
        self.token_chunk = tokens.per_minute / 60.0 * TOKEN_LEASE_S if tokens is not None else 0.0
        self.slots: deque[float] = deque()
        self.tokens_left = 0.0
        self.tokens_at = 0.0
        self.token_debt = 0.0
        self.epoch = 0
        self.stop_reason: StopJob | None = None
        self._stopped = asyncio.Event()
        self._lock = asyncio.Lock()
        self._waiting = 0  # requests in acquire(): the most slots worth leasing now
        self.leases = 0

    # -- the Pacer -------------------------------------------------------------------------

    @property
    def paused_s(self) -> float:
        return self.local.paused_s

    def found(self) -> dict[str, dict[str, Any]]:
        return {}  # a cluster's limits are numbers ("auto" is found by one process)

    async def acquire(self, estimated_tokens: float = 0.0, *, stop: asyncio.Event | None = None) -> float | None:
        """The local Limiter's contract: the time the place was granted, None if `stop` came first."""
        if stop is not None and stop.is_set():
            return None
        requeued = False
        while True:
            self._waiting += 1
            try:
                async with self._lock:  # slots are taken in order, and one lease is asked for at a time
                    start = await self._slot()
                    if not requeued and self.counts_tokens and estimated_tokens > 0:
                        start = max(start, await self._tokens(estimated_tokens))
            finally:
                self._waiting -= 1
            await self._sleep(start - self.clock())
            now = self.clock()
            # Woken later than LATE_S past the slot (the loop was blocked: a GC pause, a thread
            # holding the GIL): sent now it would start beside other workers' later slots, a burst
            # the provider refuses. Given up and a fresh one taken, once, as the local Limiter does.
            if requeued or now - start <= LATE_S:
                return now
            requeued = True

    def settle(self, estimated_tokens: float, actual_tokens: int | None) -> None:
        if self.counts_tokens and actual_tokens is not None:
            self.token_debt += actual_tokens - estimated_tokens

    def slow_down(self, pause_s: float | None, *, sent_at: float | None = None) -> None:
        self.local.slow_down(pause_s, sent_at=sent_at)  # this worker pauses at once ...
        self.slots.clear()
        self.budget.slow_down(pause_s)  # ... and everyone from their next lease

    def observe(self, headers: dict[str, str]) -> None:
        before = self.local.paused_until
        self.local.observe(headers)
        if self.local.paused_until > before:
            self.slots.clear()
            self.budget.pause(self.local.paused_until - self.clock())

    # -- news from the budget --------------------------------------------------------------

    def release(self) -> None:
        """The worker is done: tokens leased and not spent go back with the next report."""
        self.token_debt -= self.tokens_left
        self.tokens_left = 0.0
        self.slots.clear()

    def take_token_debt(self) -> float:
        """What usage corrected since the last lease, for a report to carry to the budget now."""
        debt, self.token_debt = self.token_debt, 0.0
        return debt

    def hear(self, epoch: int) -> None:
        """The budget's epoch moved (a 429 or a pause elsewhere): slots held are at the old pace."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.slots.clear()

    def stop(self, reason: StopJob) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stopped.set()

    # -- inside ----------------------------------------------------------------------------

    async def _slot(self) -> float:
        while True:
            self._check_stop()
            now = self.clock()
            while self.slots and self.slots[0] < now - SLOT_EXPIRY_S:
                self.slots.popleft()  # too late to use without bunching with others' slots
            if self.slots:
                return self.slots.popleft()
            await self._sleep(self.local.paused_until - now)
            # Only as many slots as requests are waiting: a slot nobody takes is lost to everyone.
            await self._lease(min(self.want, self._waiting), 0.0)

    async def _tokens(self, estimate: float) -> float:
        if self.tokens_left < estimate:
            # Enough for the requests waiting now (one call for them all), or a slice of the minute.
            more = max(estimate * max(1, min(self.want, self._waiting)) - self.tokens_left, self.token_chunk)
            await self._lease(0, more)
            self.tokens_left += more
        self.tokens_left -= estimate
        return self.tokens_at

    async def _lease(self, want: int, tokens: float) -> None:
        debt = self.take_token_debt()
        try:
            grant = await self.budget.lease(want, tokens, debt)
        except Exception as exc:  # the budget is gone (its actor died): sending on would be blind
            self.stop(StopJob(f"lost the cluster's rate limiter ({type(exc).__name__}); run again to continue",
                              kind="rate_limiter_lost"))
            raise self._stop_error()  # the first reason given, this one or an earlier
        now = self.clock()
        self.leases += 1
        self.hear(grant["epoch"])
        self.slots.extend(now + d for d in grant["slots"])
        if grant["token_delay"] is not None:
            self.tokens_at = now + grant["token_delay"]

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await wait_event(self._stopped, seconds)
        self._check_stop()

    def _check_stop(self) -> None:
        if self.stop_reason is not None:
            raise self._stop_error()

    def _stop_error(self) -> StopJob:
        """A StopJob of its own for each worker that meets the stop."""
        assert self.stop_reason is not None
        return StopJob(str(self.stop_reason), kind=self.stop_reason.kind)
