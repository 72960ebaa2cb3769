"""The feed: a shard's rows as the engine takes them, without holding a shard's worth of bytes.

    feed = Feed(job, plan, columns)              # columns: those a request is built from
    rows = await feed.open(shard)                # ShardRows: what is held of the shard, ids, unreadable rows
    async for batch in feed.cells(shard, rows.table, send):   # [(position, cells)], a batch at a time
        ...

A media column holding image bytes (a Parquet binary column, HF's Image struct, a WebDataset's
image) is held as its references (what the part file will hold: pipeline.io.references), read a
window of rows at a time; the bytes a request needs are read again as its rows are queued,
MEDIA_ROWS at a time, so memory holds a batch of images, never a shard of them. With `[output]
keep_media` the part file holds the bytes, so they are held with the shard. Other columns are
held whole and turned into Python objects ROWS_PER_BATCH rows (and about BATCH_BYTES) at a time.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pyarrow as pa

from ..config import Job
from ..io.manifest import Plan, Shard, ShardRows, heavy_columns, plan_schema, read_rows, shard_batches
from .commit import media_columns

__all__ = ["Feed", "ROWS_PER_BATCH", "BATCH_BYTES", "MEDIA_ROWS"]

ROWS_PER_BATCH = 512  # manifest rows turned into Python objects at a time
BATCH_BYTES = 8 << 20  # ... and at most about this much of their cells (bytes held in a column)
MEDIA_ROWS = 64  # rows of image bytes read from the source at a time: 64 MB of 1 MB images


class Feed:
    def __init__(self, job: Job, plan: Plan, columns: list[str]) -> None:
        self.job, self.plan = job, plan
        self.refer = frozenset(media_columns(job)) & frozenset(heavy_columns(plan_schema(plan)))
        self.held = [c for c in columns if c not in self.refer]  # request columns held with the shard
        self.streamed = [c for c in columns if c in self.refer]  # ... and those read a batch at a time

    async def open(self, shard: Shard) -> ShardRows:
        """The shard's columns (media bytes as references), ids and unreadable rows (raises Unreadable)."""
        return await asyncio.to_thread(read_rows, self.job.input, self.plan, shard, None, self.refer)

    async def one(self, shard: Shard, table: pa.Table, i: int) -> dict[str, Any]:
        """The cells of row `i` alone (a probe's row, ahead of the producer)."""
        batches = self.cells(shard, table, [i])
        try:
            async for batch in batches:
                return batch[0][1]
        finally:
            await batches.aclose()  # type: ignore[attr-defined]
        raise AssertionError(f"row {i} of shard {shard.index} is not there")  # a plan's rows are

    async def cells(self, shard: Shard, table: pa.Table, send: list[int]) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
        """The cells of the rows at positions `send` (ascending), a batch at a time."""
        held = table.select(self.held)
        if not self.streamed:
            step = max(1, min(ROWS_PER_BATCH, BATCH_BYTES * max(1, held.num_rows) // max(1, held.nbytes)))
            for start in range(0, len(send), step):
                batch = send[start : start + step]
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
                    light = held.take(pa.array(mine, pa.int64())).to_pylist()
                    heavy = batch.take(pa.array([i - first for i in mine], pa.int64())).to_pylist()
                    yield [(i, {**a, **b}) for i, a, b in zip(mine, light, heavy)]
                first = last
        finally:
            await asyncio.to_thread(stream.close)  # type: ignore[attr-defined]
