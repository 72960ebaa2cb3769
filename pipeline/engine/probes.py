"""Probes: rows from elsewhere in the run's rows, sent ahead of the producer when the breaker's
first refusals are all alike, so a verdict of "wrong job" is never drawn from one corner of the
manifest (net.breaker: `probes`, `cover`).

    probes = Probes(shards, breaker, open_shard=..., enqueue=..., tripped=...)
    work = await probes.work_for(shard)   # the producer's (and the probes') one opening of a shard
    probes.at(shard, i)                   # the row's place in the run's rows, 0 <= at < 1
    if not probes.taken(shard, i): probes.producing(shard, i)   # the producer takes row i now
    probes.ask(tasks)                     # after an alike refusal: a row from each part not tried yet
    await probes.drain()                  # before the producer says "no more rows"

The run's rows are the shards given to the engine, in order; a part is a `1 / breaker.max_refusals`
slice of them. The producer goes through them in order, so a part the producer has reached already
has rows out whose refusals (or answers) will come; one it has not reached gets a probe: the first
row there still to send, queued at once and skipped by the producer when it gets there. A part with
nothing left to send is covered as it is (`cover`): it has no row to settle the doubt with. A probe
may open a shard ahead of the producer, which then holds its table until the producer gets there:
at most one shard per part, and only in a run whose first refusals were alike.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left, bisect_right
from typing import Any, Awaitable, Callable, Coroutine, Generic, Protocol, TypeVar

from ..io.manifest import Shard
from ..net.breaker import Breaker

__all__ = ["Probes"]


class _Opened(Protocol):
    send: list[int]  # positions of the shard's rows still to send


W = TypeVar("W", bound=_Opened)


class Probes(Generic[W]):
    def __init__(self, shards: list[Shard], breaker: Breaker, *, open_shard: Callable[[Shard], Awaitable[W]],
                 enqueue: Callable[[W, int], Awaitable[None]], tripped: Callable[[], None]) -> None:
        self.shards, self.breaker = shards, breaker
        self.open_shard, self.enqueue, self.tripped = open_shard, enqueue, tripped
        self.offsets: dict[int, int] = {}
        total = 0
        for shard in shards:
            self.offsets[shard.index] = total
            total += shard.rows
        self.total = max(1, total)
        self._starts = [self.offsets[s.index] for s in shards]
        self.cursor = 0  # every place before it the producer has taken (or skipped as done before)
        self.taken_rows: set[tuple[int, int]] = set()  # (shard index, position) a probe took
        self.parts_sent: set[int] = set()  # parts some row was sent from while in doubt
        self.opening: dict[int, asyncio.Future[W]] = {}  # shards opened (or being opened), until produced
        self.running: set[asyncio.Task[None]] = set()

    # -- the producer's side ---------------------------------------------------------------

    async def work_for(self, shard: Shard) -> W:
        """The shard opened once, whether by the producer or by a probe ahead of it."""
        if shard.index not in self.opening:
            self.opening[shard.index] = asyncio.ensure_future(self.open_shard(shard))
        return await self.opening[shard.index]

    def at(self, shard: Shard, i: int) -> float:
        return (self.offsets[shard.index] + i) / self.total

    def taken(self, shard: Shard, i: int) -> bool:
        return bool(self.taken_rows) and (shard.index, i) in self.taken_rows

    def producing(self, shard: Shard, i: int) -> None:
        """The producer takes row `i` of `shard` now (it has skipped those before it that were done)."""
        place = self.offsets[shard.index] + i
        self.cursor = place + 1
        if self.breaker.doubting:
            self.parts_sent.add(self.breaker.part(place / self.total))

    def passed(self, shard: Shard) -> None:
        """The producer is done with `shard`."""
        self.cursor = max(self.cursor, self.offsets[shard.index] + shard.rows)
        self.opening.pop(shard.index, None)

    async def drain(self) -> None:
        while self.running:
            await asyncio.wait(self.running)

    def cancel(self) -> None:
        for task in list(self.running):
            task.cancel()

    # -- probing ---------------------------------------------------------------------------

    def ask(self, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]) -> None:
        """Send a probe for each part the breaker asks for now (none: nothing to do)."""
        parts = self.breaker.probes()
        if parts:
            task = spawn(self._send(parts))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _send(self, parts: list[int]) -> None:
        covered = await asyncio.gather(*(self._send_one(part) for part in parts))  # shards opened side by side
        if any(covered) and self.breaker.tripped:  # a part with nothing left to try there was the last one
            self.tripped()

    async def _send_one(self, part: int) -> bool:
        """A probe of `part`; True when it has no row left to send (covered as it is)."""
        if part in self.parts_sent:
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
                self.parts_sent.add(self.breaker.part(place / self.total))
                return i
        return None
