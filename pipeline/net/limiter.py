"""The limiter: requests per minute and tokens per minute, paced smoothly, adapting to 429s.

    limiter = Limiter(requests_per_minute=600, tokens_per_minute=0)
    sent_at = await limiter.acquire(estimated_tokens)   # before each attempt
    limiter.settle(estimated_tokens, actual)            # after usage comes back
    limiter.slow_down(server_delay, sent_at=sent_at)    # on a 429: pauses and slows the whole pool
    limiter.observe(headers)                            # x-ratelimit-remaining-* from any answer

Requests are paced by a slot schedule (GCRA, the "virtual scheduling" form of a leaky bucket):
each acquire reserves the next start time, `interval` after the previous one, and up to `burst`
may start together after an idle spell. In any window of T seconds at most burst + T/interval
requests start; the interval is set from (rpm - burst) / 60 per second, trimmed by `SAFETY`, so
never more than rpm start in any sixty seconds and about rpm/60 (+ burst) in any one second: a
minute's quota is never fired in its first second.

Why a schedule and not aiolimiter's bucket: the adaptive rate changes while workers wait. A
schedule changes its spacing in place for every later reservation; replacing a bucket object
would let the waiters on the old one and the new one both go (twice the rate) and re-grant the
burst. A pause (a 429's Retry-After, a spent x-ratelimit-remaining) is checked again after each
reserved wait, so a worker that reserved a slot before the 429 arrived does not send during it.

"auto" limits (requests_per_minute or tokens_per_minute = "auto"): the first request goes alone;
the others wait for its answer, whose x-ratelimit-limit-requests / -tokens set the pace (the limit
less AUTO_MARGIN), so no place is booked at a guessed pace. Later answers that announce another
limit move the pace to it. An endpoint that announces none (or no answer within AUTO_PROBE_S)
leaves the pace at AUTO_START_RPM, adapting to 429s as always.

The clock is a parameter (the event loop's clock by default) so tests drive it virtually.
Concurrency (requests in flight) is not this module's business: it is the shard engine's worker count.

`Pacer` is what the engine asks of a rate source; `Limiter` is one, a Ray worker's share of the
cluster's budget (pipeline.engine.lease.LeasedLimiter) another.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Callable, Protocol

from ..config.fields import Auto
from ..durations import parse_duration
from ..waits import wait_event

__all__ = ["Limiter", "Pacer", "TokenBucket", "LATE_S", "SAFETY", "SLOWDOWN_FACTOR", "MIN_FACTOR", "RECOVER_STEP", "RECOVER_EVERY_S",
           "AUTO_START_RPM", "AUTO_MARGIN", "AUTO_PROBE_S"]

# A place due this soon is granted now: at high rates a sleep per request cost more than the
# request itself (20k-row bench). It adds at most rate x 2 ms to any window's count: under one
# request below 30,000 requests per minute.
SLACK_S = 0.002
# A place whose wait ended later than this (the loop was blocked: an import or a thread holding
# the GIL) is given up and the request queues again, once: else every request due during the
# block would start together when it ends, a burst an endpoint counting per second refuses.
LATE_S = 0.05
SAFETY = 0.995  # a hair under the limit: clocks and network jitter differ between us and the server
SLOWDOWN_FACTOR = 0.5  # a 429 halves the pace ...
MIN_FACTOR = 0.1
RECOVER_STEP = 0.1  # ... which then regains 10% of the limit per RECOVER_EVERY_S without a 429
RECOVER_EVERY_S = 2.0
AUTO_START_RPM = 60.0  # an "auto" pace before (or without) a limit announced by the provider
AUTO_MARGIN = 0.02  # an announced limit is paced at 98%: clocks and windows differ between us and the server
AUTO_PROBE_S = 10.0  # the longest the other requests wait for the first answer's headers


class TokenBucket:
    """Tokens per minute as a debt clock: each request pushes `free_at` forward by its cost.

    One second's worth of tokens (`capacity`) may start at once; the steady rate is what is left
    of the minute after it, so the estimates started in any sixty seconds never exceed the limit.
    Estimates are corrected when usage arrives (`adjust`): an underestimate slows later requests
    and an overestimate gives the difference back.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self.capacity = per_minute / 60.0
        self.rate = (per_minute - self.capacity) / 60.0 * SAFETY  # tokens per second
        self.clock = clock
        self.free_at = clock()

    def reserve(self, cost: float, not_before: float) -> float:
        """Charge `cost`; returns the time (>= not_before) at which the request may start.

        A request dearer than one second's worth waits for an empty bucket, then goes: else a
        big max_tokens could never start at all.
        """
        slack = max(self.capacity, cost) / self.rate
        start = max(self.free_at, not_before - slack)
        self.free_at = start + cost / self.rate
        return max(not_before, self.free_at - slack)

    def delay_for(self, cost: float) -> float:
        now = self.clock()
        return self.reserve(cost, now) - now

    def adjust(self, delta: float) -> None:
        self.free_at += delta / self.rate


class Pacer(Protocol):
    """What the engine asks of a rate source, before and after each attempt."""

    @property
    def paused_s(self) -> float:
        """How long every request was held by pauses, in all (for the run's summary)."""

    async def acquire(self, estimated_tokens: float = 0.0, *, stop: asyncio.Event | None = None) -> float | None:
        """Wait for a place to send; the time it was granted, or None when `stop` came first."""

    def settle(self, estimated_tokens: float, actual_tokens: int | None) -> None:
        """The usage an answer reported, against the estimate it was paced by."""

    def slow_down(self, pause_s: float | None, *, sent_at: float | None = None) -> None:
        """A 429: pause for the server's delay, then go slower."""

    def observe(self, headers: dict[str, str]) -> None:
        """An answer's x-ratelimit-* headers."""

    def found(self) -> dict[str, dict[str, Any]]:
        """What "auto" limits came to (for the summary and `pipeline status`); {} without any."""


class Limiter:
    def __init__(
        self,
        requests_per_minute: float | Auto,
        tokens_per_minute: float | Auto = 0.0,
        *,
        burst: int = 1,
        max_pause_s: float = 120.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.auto_requests = isinstance(requests_per_minute, Auto)
        self.auto_tokens = isinstance(tokens_per_minute, Auto)
        self.rpm = AUTO_START_RPM if isinstance(requests_per_minute, Auto) else float(requests_per_minute)
        self.known: asyncio.Event | None = None  # "auto": set once the first answer's headers were read
        self.probing = False
        self.burst = max(1, burst)
        self.max_pause_s = max_pause_s
        self.clock = clock or _loop_clock
        self.factor = 1.0
        self.paused_until = -math.inf
        self.paused_s = 0.0  # how long every request was held by pauses, in all (for the run's summary)
        self.last_slowdown = -math.inf
        self.recovered_at = -math.inf  # the last slowdown or recovery step
        self.slowdowns = 0
        self.next_slot = -math.inf  # GCRA's theoretical arrival time of the next request
        self.generation = 0  # bumped by each slowdown: slots reserved before it are given up
        tpm = 0.0 if isinstance(tokens_per_minute, Auto) else float(tokens_per_minute)
        self.tokens = TokenBucket(tpm, self.clock) if tpm > 0 else None

    def found(self) -> dict[str, dict[str, Any]]:
        used: dict[str, dict[str, Any]] = {}
        if self.auto_requests:
            used["requests_per_minute"] = {"auto": True, "paced_at": round(self.rpm, 1)}
        if self.auto_tokens:
            tokens = self.tokens
            used["tokens_per_minute"] = {"auto": True, "paced_at": round(tokens.per_minute, 1) if tokens else None}
        return used

    @property
    def rate_per_s(self) -> float:
        """The pace now, in requests per second."""
        # With a schedule of spacing 60/rpm, a sixty-second window holds rpm starts; the burst's
        # extra (burst - 1) places come off the steady rate so the window still holds rpm.
        steady = max(self.rpm - (self.burst - 1), self.rpm * 0.5) / 60.0
        return steady * SAFETY * self.factor

    @property
    def interval(self) -> float:
        return 1.0 / self.rate_per_s

    async def acquire(self, estimated_tokens: float = 0.0, *, stop: asyncio.Event | None = None) -> float | None:
        """Wait for a place to send; returns the time (on `clock`) the place was granted.

        With `stop`, the wait ends when that event is set and None is returned (nothing granted):
        a worker waiting out a 429's pause must not hold up a stop.
        """
        requeued = False
        if (self.auto_requests or self.auto_tokens) and not await self._probe(stop):
            return None
        while True:
            if stop is not None and stop.is_set():
                return None
            now = self.clock()
            if self.paused_until > now:
                await _sleep(self.paused_until - now, stop)
                continue
            self._recover(now)
            generation = self.generation
            slot = self._reserve(now)
            # The bucket charged is the one given back to: "auto" may replace self.tokens meanwhile.
            tokens = self.tokens if estimated_tokens > 0 else None
            if tokens is not None:
                slot = tokens.reserve(estimated_tokens, slot)
            if slot > now + SLACK_S and not await _sleep(slot - now, stop):
                if tokens is not None:
                    tokens.adjust(-estimated_tokens)
                return None
            now = self.clock()
            late = now - slot > LATE_S and not requeued
            if self.paused_until <= now and self.generation == generation and not late:
                return now
            # A 429 came while this one waited: its slot was spaced for the old pace (or falls in
            # the pause). Or the loop was blocked past it (LATE_S). Give its tokens back and queue
            # again at the current pace.
            requeued = requeued or late
            if tokens is not None:
                tokens.adjust(-estimated_tokens)

    async def _probe(self, stop: asyncio.Event | None) -> bool:
        """"auto": the first caller goes; the others wait for its answer's headers (False: a stop came)."""
        if self.known is None:
            self.known = asyncio.Event()
        if self.known.is_set():
            return True
        if not self.probing:
            self.probing = True
            return True
        waiter = asyncio.ensure_future(self.known.wait())
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            await asyncio.wait([f for f in (waiter, stopper) if f is not None], timeout=AUTO_PROBE_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if stopper is not None:
                stopper.cancel()
        if stop is not None and stop.is_set():
            return False
        self.known.set()  # announced, or not within AUTO_PROBE_S: go at the pace there is
        return True

    def _reserve(self, now: float) -> float:
        tolerance = (self.burst - 1) * self.interval
        slot = max(now, self.next_slot - tolerance)
        self.next_slot = max(self.next_slot, slot) + self.interval
        return slot

    def settle(self, estimated_tokens: float, actual_tokens: int | None) -> None:
        if self.tokens is not None and actual_tokens is not None and estimated_tokens > 0:
            self.tokens.adjust(actual_tokens - estimated_tokens)

    def slow_down(self, pause_s: float | None, *, sent_at: float | None = None) -> None:
        """A 429 anywhere: pause everyone for the server's delay (capped), then go slower.

        `sent_at` is what `acquire` returned for the refused request. A request sent before the
        last slowdown was paced at the old rate: its 429 is part of the same burst and does not
        halve the rate again (without it, eight 429s in flight at once would cut the pace 256x).
        """
        now = self.clock()
        if pause_s is not None and pause_s > 0:
            self.pause(pause_s)
        same_burst = (sent_at <= self.last_slowdown) if sent_at is not None else (now - self.last_slowdown <= self.interval)
        if not same_burst:
            self.factor = max(MIN_FACTOR, self.factor * SLOWDOWN_FACTOR)
            self.slowdowns += 1
            self.generation += 1
            self.last_slowdown = now
            resume = max(now, self.paused_until)
            self.recovered_at = resume  # recovery counts from the end of the pause
            self.next_slot = resume + self.interval
        elif sent_at is None:  # no send times: a burst lasts while 429s keep coming
            self.last_slowdown = now

    def pause(self, seconds: float) -> None:
        """No request starts for `seconds` (capped by max_pause_s)."""
        now = self.clock()
        until = max(self.paused_until, now + min(seconds, self.max_pause_s))
        self.paused_s += until - max(self.paused_until, now)  # overlapping pauses count once
        self.paused_until = until
        if self.factor < 1.0:  # a slowed pace recovers from the end of the pause, not during it
            self.recovered_at = max(self.recovered_at, self.paused_until)

    def observe(self, headers: dict[str, str]) -> None:
        """Keep under the server's real limit when it says so (x-ratelimit-remaining-*); with
        "auto" limits, pace at the limit it announces (x-ratelimit-limit-*)."""
        if self.auto_requests or self.auto_tokens:
            self._follow(headers)
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
                self.pause(wait)

    def _follow(self, headers: dict[str, str]) -> None:
        requests = _number(headers.get("x-ratelimit-limit-requests"))
        if self.auto_requests and requests and abs(requests * (1 - AUTO_MARGIN) - self.rpm) > 0.01 * self.rpm:
            self.rpm = requests * (1 - AUTO_MARGIN)
            self.generation += 1  # places booked at the old pace are booked again at this one
            self.next_slot = min(self.next_slot, self.clock() + self.interval)
        tokens = _number(headers.get("x-ratelimit-limit-tokens"))
        if self.auto_tokens and tokens and (self.tokens is None
                                            or abs(tokens * (1 - AUTO_MARGIN) - self.tokens.per_minute) > 0.01 * tokens):
            self.tokens = TokenBucket(tokens * (1 - AUTO_MARGIN), self.clock)
        if self.known is not None:
            self.known.set()

    def _recover(self, now: float) -> None:
        if self.factor >= 1.0:
            return
        steps = int((now - self.recovered_at) / RECOVER_EVERY_S)
        if steps > 0:
            self.factor = min(1.0, self.factor + RECOVER_STEP * steps)
            self.recovered_at += steps * RECOVER_EVERY_S


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 and math.isfinite(value) else None


async def _sleep(seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep; False when `stop` was set first."""
    if stop is None:
        await asyncio.sleep(seconds)
        return True
    return not await wait_event(stop, seconds)


def _loop_clock() -> float:
    """The running event loop's clock (time.monotonic outside a loop): what asyncio.sleep waits on."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
