"""Adaptive concurrency (`max_concurrency = "auto"`): how many requests to keep in flight against a
server that publishes no limits (a team's vLLM or SGLang), found from what its answers show.

    ctl = Gradient(cap=256)
    ctl.answered(latency_s, in_flight, now)   # every answer: its latency, and how many were out
    ctl.dropped(now)                          # a 503, a timeout, a cut connection: the server is full
    ctl.limit                                 # requests allowed in flight now
    gate = Gate(ctl)                          # the engine's: `async with gate:` around each request

A server works on so many requests at once and queues the rest; queued requests show up as
latency above what an unloaded server takes (TCP Vegas' insight, and Netflix's concurrency-limits
Gradient). Every WINDOW_S the controller compares the window's median latency with the no-load
latency (the lowest window median of the last NO_LOAD_WINDOWS windows, so it follows a server
that really got slower):
  - ratio below GROW_BELOW (1.2), and the limit was reached in the window: grow, by sqrt(limit)
    until the first queue is seen and again after BOLD_AFTER clean windows in a row (a GPU
    server's capacity is tens to hundreds, and may come back), else by one (near the capacity);
  - ratio above SHRINK_ABOVE (1.3): a queue is forming: 10% fewer; past SEVERE (2x, the server
    lost capacity) in proportion (limit x TARGET/ratio), by at most half per window;
  - a drop (503, timeout, cut connection) in the window: halve;
  - in between: hold.
It settles a little above the server's capacity (a short queue keeps it busy), follows a
capacity that changes, and stays within [MIN_LIMIT, cap]. Time is given (`now`), never read: the
tests drive it with tables.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Gradient", "Gate", "Places", "START", "WINDOW_S", "QUANTILE", "GROW_BELOW", "SHRINK_ABOVE", "TARGET", "MIN_LIMIT", "PROBE_EVERY_S",
           "PROBE_WINDOWS", "MIN_SAMPLES"]

START = 8.0  # the first limit: what a fixed default would be
MIN_LIMIT = 1.0
WINDOW_S = 0.5  # a decision per half second (at 40 answers/s: 20 samples)
MIN_SAMPLES = 10  # a window with fewer answers waits for more before deciding
QUANTILE = 95  # the window's latency is its 95th percentile: a queue that delays only the last
# few of every round (k behind N slots delay k of N + k by up to a whole service time) shows there
# long before it moves the median, and p95 is what a user of the server feels
GROW_BELOW = 1.2  # p95 latency under 1.2x the no-load one: no queue worth the name
SHRINK_ABOVE = 1.3  # over 1.3x: requests wait at the server
EASE = 0.9  # a queue seen: 10% fewer in flight (a queue of a few behind the slots costs little) ...
SEVERE = 2.0  # ... but past 2x (the server lost capacity) shrink in proportion, by at most half
TARGET = 1.1  # shrinking in proportion aims at this ratio
BOLD_AFTER = 4  # clean windows in a row after which growth is by sqrt(limit) again, not by one
MAX_SHRINK = 0.5  # by at most half per window
DROP_FACTOR = 0.5
PROBE_EVERY_S = 30.0  # the no-load latency is measured afresh this often ...
PROBE_WINDOWS = 2  # ... at half the limit: the first window drains the queue, the second measures


@dataclass
class Gradient:
    cap: int
    limit: float = START
    samples: list[float] = field(default_factory=list)
    busiest: int = 0  # most requests in flight seen in the window
    drops: int = 0
    window_start: float | None = None
    no_load: float = math.inf  # the latency of an unqueued request
    probe_at: float | None = None  # when the next probe starts
    probing: int = 0  # windows of the probe still to go
    resume: float = START  # the limit before the probe
    starting: bool = True  # growth by sqrt(limit) until the first queue is seen (TCP's slow start)
    clean: int = 0  # windows in a row that grew the limit
    low: float = math.inf  # the least limit the run has used (for the summary)
    high: float = 0.0

    def __post_init__(self) -> None:
        self.limit = min(float(self.cap), max(MIN_LIMIT, self.limit))
        self.low = self.high = self.limit

    @property
    def allowed(self) -> int:
        return max(1, int(self.limit))

    def answered(self, latency_s: float, in_flight: int, now: float) -> None:
        self._start(now)
        self.samples.append(latency_s)
        self.busiest = max(self.busiest, in_flight)
        self._maybe_decide(now)

    def dropped(self, now: float) -> None:
        self._start(now)
        self.drops += 1
        self._maybe_decide(now)

    def _start(self, now: float) -> None:
        if self.window_start is None:
            self.window_start = now

    def _maybe_decide(self, now: float) -> None:
        assert self.window_start is not None
        if now - self.window_start < WINDOW_S or (len(self.samples) < MIN_SAMPLES and not self.drops):
            return
        self.decide(now)
        self.samples, self.busiest, self.drops, self.window_start = [], 0, 0, now

    def decide(self, now: float = 0.0) -> None:
        """The window's verdict on the limit (public for the tests' tables)."""
        if self.probing:
            self._probe_window()
            return
        if self.drops:
            self._set(self.limit * DROP_FACTOR)
            return
        if not self.samples:
            return
        latency = _quantile(self.samples)
        self.no_load = min(self.no_load, latency)
        ratio = latency / self.no_load if self.no_load > 0 else 1.0
        if ratio > SHRINK_ABOVE:
            self.starting, self.clean = False, 0
            self._set(self.limit * (max(MAX_SHRINK, TARGET / ratio) if ratio > SEVERE else EASE))
        elif ratio < GROW_BELOW and self.busiest >= self.allowed - 1:
            self.clean += 1
            bold = self.starting or self.clean > BOLD_AFTER
            self._set(self.limit + (math.sqrt(self.limit) if bold else 1.0))
        if self.probe_at is None:
            self.probe_at = now + PROBE_EVERY_S
        elif now >= self.probe_at:
            self.resume, self.probing = self.limit, PROBE_WINDOWS
            self.limit = max(MIN_LIMIT, self.limit / 2)  # not _set: a probe is not a limit the run chose
            self.probe_at = now + PROBE_EVERY_S

    def _probe_window(self) -> None:
        self.probing -= 1
        if self.probing:
            return  # the queue drains
        if self.samples and not self.drops:
            self.no_load = _quantile(self.samples)  # afresh: it may have risen
        self.limit = self.resume

    def _set(self, limit: float) -> None:
        self.limit = min(float(self.cap), max(MIN_LIMIT, limit))
        self.low, self.high = min(self.low, self.limit), max(self.high, self.limit)


def _quantile(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * QUANTILE / 100))]


class Places:
    """Places taken in arrival order. A freed place is taken for the oldest waiter before it is
    woken, so a newcomer, or a holder that leaves and comes straight back, queues behind it instead
    of taking the place again. Subclasses say how many there are (`free`); the Gate and the built-in
    endpoint's GPU-server model (tools/serve/capacity.py) are two."""

    def __init__(self) -> None:
        self.busy = 0  # places taken (handed to a waiter included)
        self.waiting: deque[asyncio.Future[None]] = deque()

    def free(self) -> bool:
        """Whether one more place may be taken now."""
        raise NotImplementedError

    def _take(self) -> None:
        self.busy += 1

    async def take(self) -> None:
        """Wait for a place, in arrival order."""
        if not self.waiting and self.free():
            self._take()
            return
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(place)
        try:
            await place  # the place is already taken for it when this returns
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():
                self.leave()  # handed a place just as it was cancelled: pass it on
            elif place in self.waiting:
                self.waiting.remove(place)
            raise

    def leave(self) -> None:
        self.busy -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free places to the oldest waiters (after a place was freed or the number raised)."""
        while self.waiting and self.free():
            place = self.waiting.popleft()
            if not place.done():
                self._take()
                place.set_result(None)


class Gate(Places):
    """Requests in flight, at most the controller's limit (no controller: no gate, the workers'
    count is the limit; it only counts). Waiters go in arrival order (Places); a raised limit
    lets more in at once."""

    def __init__(self, controller: Gradient | None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.controller = controller
        self.clock = clock

    @property
    def in_flight(self) -> int:
        return self.busy

    def free(self) -> bool:
        return self.controller is None or self.busy < self.controller.allowed

    async def __aenter__(self) -> Gate:
        await self.take()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.leave()

    def answered(self, latency_s: float) -> None:
        if self.controller is not None:
            self.controller.answered(latency_s, self.busy, self.clock())
            self.wake()

    def dropped(self) -> None:
        if self.controller is not None:
            self.controller.dropped(self.clock())
