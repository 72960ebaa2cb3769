"""The feed: a shard's rows as the engine takes them, without holding a shard's worth of bytes.

    feed = Feed(job, plan, columns)              # columns: those a request is built from
    rows = await feed.open(shard)                # ShardRows: light columns, ids, unreadable rows
    async for batch in feed.cells(shard, rows.table, send):   # [(position, cells)], ROWS_PER_BATCH at a time
        ...

Columns holding bytes (a Parquet binary column, HF's Image struct, a WebDataset's image) are not
held with the shard's other columns: the ones a request needs are read again a batch at a time
as the rows are queued (MEDIA_ROWS at a time), so memory holds a batch of images, not a shard of
them. The part file of
a shard is made from the held (light) columns.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pyarrow as pa

from ..config import Job
from ..io.manifest import Plan, Shard, ShardRows, light_columns, read_rows, shard_batches

__all__ = ["Feed", "ROWS_PER_BATCH", "MEDIA_ROWS"]

ROWS_PER_BATCH = 512  # manifest rows turned into Python objects at a time
MEDIA_ROWS = 64  # ... when their cells hold bytes: 64 MB of 1 MB images, not 512 MB


class Feed:
    def __init__(self, job: Job, plan: Plan, columns: list[str]) -> None:
        self.job, self.plan = job, plan
        self.light = light_columns(plan)
        held = set(plan.columns if self.light is None else self.light)
        self.held = [c for c in columns if c in held]  # request columns read with the shard
        self.streamed = [c for c in columns if c not in held]  # ... and those read a batch at a time

    async def open(self, shard: Shard) -> ShardRows:
        """The shard's light columns, ids and unreadable rows (raises Unreadable)."""
        return await asyncio.to_thread(read_rows, self.job.input, self.plan, shard, self.light)

    async def cells(self, shard: Shard, table: pa.Table, send: list[int]) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
        """The cells of the rows at positions `send` (ascending), a batch at a time."""
        held = table.select(self.held)
        if not self.streamed:
            for start in range(0, len(send), ROWS_PER_BATCH):
                batch = send[start : start + ROWS_PER_BATCH]
                yield list(zip(batch, held.take(pa.array(batch, pa.int64())).to_pylist()))
            return
        if not send:
            return
        stream = shard_batches(self.job.input, self.plan, shard, self.streamed, MEDIA_ROWS)
        try:
            first, k = 0, 0
            while k < len(send):
                batch = await asyncio.to_thread(next, stream, None)
                if batch is None:
                    break
                last = first + batch.num_rows
                mine = []
                while k < len(send) and send[k] < last:
                    mine.append(send[k])
                    k += 1
                if mine:
                    at = pa.array(mine, pa.int64())
                    light = held.take(at).to_pylist()
                    heavy = batch.take(pa.array([i - first for i in mine], pa.int64())).to_pylist()
                    yield [(i, {**a, **b}) for i, a, b in zip(mine, light, heavy)]
                first = last
        finally:
            await asyncio.to_thread(stream.close)  # type: ignore[attr-defined]
