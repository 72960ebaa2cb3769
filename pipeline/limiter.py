"""The limiter: requests per minute and tokens per minute, paced smoothly, adapting to 429s.

    limiter = Limiter(requests_per_minute=600, tokens_per_minute=0)
    await limiter.acquire(estimated_tokens)      # before each attempt
    limiter.settle(estimated_tokens, actual)     # after usage comes back
    limiter.slow_down(server_delay)              # on a 429: pauses and slows the whole pool

Requests are paced with aiolimiter as a leaky bucket of `burst` places draining at
(rpm - burst) / 60 per second, trimmed by `SAFETY`: in any window of T seconds at most
burst + rate*T requests start, so never more than rpm in any sixty seconds and about rpm/60
in any one second. A minute's quota is never fired in its first second.

Concurrency (requests in flight) is not this module's business: it is the runner's worker count.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from aiolimiter import AsyncLimiter

from .retry import parse_duration

__all__ = ["Limiter", "TokenBucket"]

SAFETY = 0.995  # a hair under the limit: clocks and network jitter differ between us and the server
SLOWDOWN_FACTOR = 0.5  # a 429 halves the pace ...
MIN_FACTOR = 0.1
RECOVER_STEP = 0.1  # ... which then regains 10% of the limit per RECOVER_EVERY_S without a 429
RECOVER_EVERY_S = 2.0


class TokenBucket:
    """Tokens per minute as a debt clock: each request pushes `free_at` forward by its cost.

    Estimates are corrected when usage arrives (`settle`), so an underestimate slows later requests
    and an overestimate gives the difference back.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.rate = per_minute / 60.0
        self.capacity = per_minute / 60.0  # one second's worth may start at once
        self.clock = clock
        self.free_at = clock()

    def delay_for(self, cost: float) -> float:
        now = self.clock()
        start = max(self.free_at, now - self.capacity / self.rate)
        self.free_at = start + cost / self.rate
        return max(0.0, self.free_at - self.capacity / self.rate - now)

    def adjust(self, delta: float) -> None:
        self.free_at += delta / self.rate


class Limiter:
    def __init__(
        self,
        requests_per_minute: float,
        tokens_per_minute: float = 0.0,
        *,
        burst: int = 1,
        max_pause_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = requests_per_minute
        self.burst = max(1, burst)
        self.max_pause_s = max_pause_s
        self.clock = clock
        self.factor = 1.0
        self.paused_until = 0.0
        self.last_slowdown = -1e18
        self.slowdowns = 0
        self._pace = self._make_pace()
        self.tokens = TokenBucket(tokens_per_minute, clock) if tokens_per_minute > 0 else None

    @property
    def rate_per_s(self) -> float:
        """The pace now, in requests per second."""
        steady = max(self.rpm - self.burst, self.rpm * 0.5) / 60.0
        return steady * SAFETY * self.factor

    def _make_pace(self) -> AsyncLimiter:
        return AsyncLimiter(self.burst, self.burst / self.rate_per_s)

    async def acquire(self, estimated_tokens: float = 0.0) -> None:
        while True:
            wait = self.paused_until - self.clock()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        self._recover()
        await self._pace.acquire()
        if self.tokens is not None and estimated_tokens > 0:
            delay = self.tokens.delay_for(estimated_tokens)
            if delay > 0:
                await asyncio.sleep(delay)

    def settle(self, estimated_tokens: float, actual_tokens: int | None) -> None:
        if self.tokens is not None and actual_tokens is not None:
            self.tokens.adjust(actual_tokens - estimated_tokens)

    def slow_down(self, pause_s: float | None) -> None:
        """A 429 anywhere: pause everyone for the server's delay (capped), then go slower."""
        now = self.clock()
        if pause_s is not None and pause_s > 0:
            self.paused_until = max(self.paused_until, now + min(pause_s, self.max_pause_s))
        if now - self.last_slowdown > 1.0 / max(self.rate_per_s, 1e-9):  # one 429 burst = one step
            self.factor = max(MIN_FACTOR, self.factor * SLOWDOWN_FACTOR)
            self._pace = self._make_pace()
            self.slowdowns += 1
        self.last_slowdown = now

    def observe(self, headers: dict[str, str]) -> None:
        """Keep under the server's real limit when it says so (x-ratelimit-remaining-*)."""
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if remaining is None or reset is None:
                continue
            try:
                left = float(remaining)
            except ValueError:
                continue
            wait = parse_duration(reset)
            if left <= 0 and wait:
                self.paused_until = max(self.paused_until, self.clock() + min(wait, self.max_pause_s))

    def _recover(self) -> None:
        if self.factor >= 1.0:
            return
        now = self.clock()
        steps = int((now - self.last_slowdown) / RECOVER_EVERY_S)
        if steps > 0:
            self.factor = min(1.0, self.factor + RECOVER_STEP * steps)
            self.last_slowdown = now - (now - self.last_slowdown) % RECOVER_EVERY_S
            self._pace = self._make_pace()
