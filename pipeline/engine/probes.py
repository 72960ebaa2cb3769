"""Probes: rows from elsewhere in the run's rows, sent ahead of the producer when the breaker's
first refusals are all alike, so a verdict of "wrong job" is never drawn from one corner of the
manifest (net.breaker: `probes`, `cover`).

    probes = Probes(shards, breaker, open_shard=..., enqueue=..., tripped=..., spawn=...)
    work = await probes.work_for(shard)   # the producer's (and the probes') one opening of a shard
    probes.at(shard, i)                   # the row's place in the run's rows, 0 <= at < 1
    await probes.hold()                   # the producer waits while a verdict waits for the probes
    if not probes.taken(shard, i): probes.producing(shard, i)   # the producer takes row i now
    probes.ask()                          # after an alike refusal: a row from each part not tried yet
    probes.settled(shard, i, requested=row.attempts > 0)   # every row's result: one failed here is probed again
    await probes.drain()                  # before the producer says "no more rows"

The run's rows are the shards given to the engine, in order; a part is a `1 / breaker.max_refusals`
slice of them. The producer goes through them in order, so a part the producer has reached already
has rows out whose refusals (or answers) will come; one it has not reached gets a probe: the first
row there still to send, queued at once and skipped by the producer when it gets there. A part with
nothing left to send is covered as it is (`cover`): it has no row to settle the doubt with. A probe
may open a shard ahead of the producer, which then holds its table until the producer gets there:
at most one shard per part, and only in a run whose first refusals were alike. A row that settles
without a request (an input error such as a missing image; a cache hit) tried nothing: its part
counts as untried again, and a probe there takes the part's next row. A shard is opened in the
task that asks for it first (the producer's or a probe's, each owned by the engine's TaskGroup);
any other asking meanwhile waits for that opening. While the verdict waits for probes (enough
alike refusals, not from everywhere yet) the producer takes no more rows: they would only be
refused alike too, and however slowly the probes' rows come back (a loaded machine, image work),
a wrong job costs the first refusals, the requests then in flight and the probes.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left, bisect_right
from collections import Counter
from typing import Any, Awaitable, Callable, Coroutine, Generic, Protocol, TypeVar

from ..io.manifest import Shard
from ..net.breaker import Breaker

__all__ = ["Probes"]


class _Opened(Protocol):
    send: list[int]  # positions of the shard's rows still to send


W = TypeVar("W", bound=_Opened)


class Probes(Generic[W]):
    def __init__(self, shards: list[Shard], breaker: Breaker, *, open_shard: Callable[[Shard], Awaitable[W]],
                 enqueue: Callable[[W, int], Awaitable[None]], tripped: Callable[[], None],
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]) -> None:
        self.shards, self.breaker = shards, breaker
        self.open_shard, self.enqueue, self.tripped, self.spawn = open_shard, enqueue, tripped, spawn  # spawn: an owned task
        self.offsets: dict[int, int] = {}
        total = 0
        for shard in shards:
            self.offsets[shard.index] = total
            total += shard.rows
        self.total = max(1, total)
        self._starts = [self.offsets[s.index] for s in shards]
        self.cursor = 0  # every place before it the producer has taken (or skipped as done before)
        self.taken_rows: set[tuple[int, int]] = set()  # (shard index, position) a probe took
        self.out: Counter[int] = Counter()  # per part: rows taken while in doubt, less those settled without a request
        self.opening: dict[int, asyncio.Future[W]] = {}  # shards opened (or being opened), until produced
        self.running: set[asyncio.Task[None]] = set()
        self.news = asyncio.Event()  # a row settled: the verdict the producer may be waiting for moved

    # -- the producer's side ---------------------------------------------------------------

    async def work_for(self, shard: Shard) -> W:
        """The shard opened once, whether by the producer or by a probe ahead of it: in the task that
        asks first (no task of its own, which nothing would own); the others wait for its result."""
        opening = self.opening.get(shard.index)
        if opening is not None:
            return await opening
        opening = self.opening[shard.index] = asyncio.get_running_loop().create_future()
        try:
            work = await self.open_shard(shard)
        except BaseException as exc:
            del self.opening[shard.index]  # the next to ask opens it again
            if isinstance(exc, asyncio.CancelledError):
                opening.cancel()
            else:
                opening.set_exception(exc)
                opening.exception()  # retrieved: it is raised here; a task waiting on it gets it too
            raise
        opening.set_result(work)
        return work

    def at(self, shard: Shard, i: int) -> float:
        return (self.offsets[shard.index] + i) / self.total

    def taken(self, shard: Shard, i: int) -> bool:
        return bool(self.taken_rows) and (shard.index, i) in self.taken_rows

    def producing(self, shard: Shard, i: int) -> None:
        """The producer takes row `i` of `shard` now (it has skipped those before it that were done)."""
        place = self.offsets[shard.index] + i
        self.cursor = place + 1
        if self.breaker.doubting:
            self.out[self.breaker.part(place / self.total)] += 1

    async def hold(self) -> None:
        """Until no verdict waits for probes: enough alike refusals are in, not from every part."""
        breaker = self.breaker
        while breaker.doubting and breaker.refusals >= breaker.max_refusals and breaker.missing and not breaker.tripped:
            self.news.clear()
            await self.news.wait()

    def passed(self, shard: Shard) -> None:
        """The producer is done with `shard`."""
        self.cursor = max(self.cursor, self.offsets[shard.index] + shard.rows)
        self.opening.pop(shard.index, None)

    async def drain(self) -> None:
        while self.running:
            await asyncio.wait(self.running)

    def settled(self, shard: Shard, i: int, *, requested: bool) -> None:
        """Row `i` of `shard` has its result; `requested`: a request went out for it. One settled
        without (a missing image: an input error row; a cache hit) told the breaker nothing: when
        it was its part's last row out, the part is untried again, and probed again."""
        self.news.set()
        if requested or not self.breaker.doubting:
            return
        part = self.breaker.part(self.at(shard, i))
        self.out[part] = max(0, self.out[part] - 1)
        if not self.out[part] and part in self.breaker.missing:
            self.breaker.reprobe(part)
            self.ask()

    def cancel(self) -> None:
        for task in list(self.running):
            task.cancel()

    # -- probing ---------------------------------------------------------------------------

    def ask(self) -> None:
        """Send a probe for each part the breaker asks for now (none: nothing to do)."""
        parts = self.breaker.probes()
        if parts:
            task = self.spawn(self._send(parts))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _send(self, parts: list[int]) -> None:
        covered = await asyncio.gather(*(self._send_one(part) for part in parts))  # shards opened side by side
        if any(covered) and self.breaker.tripped:  # a part with nothing left to try there was the last one
            self.tripped()

    async def _send_one(self, part: int) -> bool:
        """A probe of `part`; True when it has no row left to send (covered as it is)."""
        if self.out[part]:
            return False  # rows of it are out already: their verdict will come
        low, high = self._bounds(part)
        low = max(low, self.cursor)
        for shard in self._shards_from(low, high):
            work = await self.work_for(shard)
            if (i := self._claim(shard, work.send, low, high)) is not None:
                await self.enqueue(work, i)
                return False
        self.breaker.cover(part)
        return True

    def _bounds(self, part: int) -> tuple[int, int]:
        """The places of `part`: [low, high)."""
        n, parts = self.total, self.breaker.max_refusals
        return -(-part * n // parts), -(-(part + 1) * n // parts)

    def _shards_from(self, place: int, high: int) -> list[Shard]:
        """The shards holding places in [place, high), in order."""
        first = max(0, bisect_right(self._starts, place) - 1)
        return [s for s in self.shards[first:] if place < self.offsets[s.index] + s.rows and self.offsets[s.index] < high]

    def _claim(self, shard: Shard, send: list[int], low: int, high: int) -> int | None:
        """The first row of `send` in places [low, high) the producer has not reached and no probe
        has taken; marked taken. None: there is none."""
        base = self.offsets[shard.index]
        for k in range(bisect_left(send, max(low, self.cursor) - base), len(send)):
            i = send[k]
            place = base + i
            if place >= high:
                break
            if place >= self.cursor and (shard.index, i) not in self.taken_rows:
                self.taken_rows.add((shard.index, i))
                self.out[self.breaker.part(place / self.total)] += 1
                return i
        return None
