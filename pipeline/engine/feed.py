"""The feed: a shard's rows as the engine takes them, without holding a shard's worth of bytes.

    feed = Feed(job, plan, columns)              # columns: those a request is built from
    rows = await feed.open(shard)                # ShardRows: what is held of the shard, ids, unreadable rows
    async for batch in feed.cells(shard, rows.table, send):   # [(position, cells)], a batch at a time
        ...

A media column holding image bytes (a Parquet binary column, HF's Image struct, a WebDataset's
image) is held as its references (what the part file will hold: pipeline.io.references), read a
window of rows at a time; the bytes a request needs are read as its rows are queued, MEDIA_ROWS
at a time, so memory holds a batch of images, never a shard of them. The producer's pass makes
the references from those same bytes (`filled` puts them in the table the part file is made from),
so a bucket bills a shard's image bytes once, not once for references and once to send. With
`[output] keep_media` the part file holds the bytes, so they are held with the shard. Other columns
are held whole and turned into Python objects ROWS_PER_BATCH rows (and about BATCH_BYTES) at a time.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncGenerator, Iterator

import pyarrow as pa

from ..config import Job
from ..io.manifest import (
    Plan,
    Shard,
    ShardRows,
    Unreadable,
    heavy_columns,
    plan_schema,
    read_rows,
    reference_type,
    shard_batches,
)
from ..io.references import referenced
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
        self.defer = bool(self.streamed)  # references made as the bytes are read to send
        self.made: dict[int, dict[str, pa.ChunkedArray]] = {}  # shard -> its references, made by its pass

    async def open(self, shard: Shard) -> ShardRows:
        """The shard's columns (media bytes as references, or nulls until its pass makes them), ids
        and unreadable rows (raises Unreadable)."""
        return await asyncio.to_thread(read_rows, self.job.input, self.plan, shard, None, self.refer, self.defer)

    def filled(self, shard: Shard, table: pa.Table) -> pa.Table:
        """The shard's table with its references, for its part file: those its pass made, else (a
        stop cut the pass short, no row was sent) read now. Blocking."""
        made = self.made.pop(shard.index, None)
        if not self.defer:
            return table
        if made is None:
            try:
                read = read_rows(self.job.input, self.plan, shard, sorted(self.refer), self.refer).table  # one pass
                made = {c: read.column(c) for c in self.refer}
            except Unreadable:  # gone since it was sent: the answers are kept, their references left null
                return table
        for c, column in made.items():
            table = table.set_column(table.schema.get_field_index(c), c, column)
        return table

    async def one(self, shard: Shard, table: pa.Table, i: int) -> dict[str, Any]:
        """The cells of row `i` alone (a probe's row, ahead of the producer)."""
        batches = self.cells(shard, table, [i])
        try:
            async for batch in batches:
                return batch[0][1]
        finally:
            await batches.aclose()
        raise AssertionError(f"row {i} of shard {shard.index} is not there")  # a plan's rows are

    async def cells(self, shard: Shard, table: pa.Table, send: list[int],
                    refer: bool = False) -> AsyncGenerator[list[tuple[int, dict[str, Any]]], None]:
        """The cells of the rows at positions `send` (ascending), a batch at a time; `refer` (the
        producer's pass): the whole shard is read, its references made for `filled`."""
        held = table.select(self.held)
        if not self.streamed:
            step = max(1, min(ROWS_PER_BATCH, BATCH_BYTES * max(1, held.num_rows) // max(1, held.nbytes)))
            for start in range(0, len(send), step):
                rows = send[start : start + step]
                yield list(zip(rows, held.take(pa.array(rows, pa.int64())).to_pylist()))
            return
        if not send:
            return
        refer = refer and self.defer
        made: dict[str, list[pa.Array]] = {c: [] for c in self.refer} if refer else {}
        read = [c for c in self.plan.columns if c in self.refer] if refer else self.streamed
        stream = shard_batches(self.job.input, self.plan, shard, read, MEDIA_ROWS)
        reading: asyncio.Future[tuple[pa.Table, dict[str, pa.ChunkedArray]] | None] | None = None
        try:
            first, k = 0, 0
            while k < len(send) or refer:
                reading = asyncio.ensure_future(asyncio.to_thread(_next, stream, list(made)))
                got = await asyncio.shield(reading)  # a stop cancels this await, never the thread's read
                if got is None:
                    break
                batch, refs = got
                for c, column in refs.items():
                    made[c] += column.chunks
                last = first + batch.num_rows
                mine = []
                while k < len(send) and send[k] < last:
                    mine.append(send[k])
                    k += 1
                if mine:
                    light = held.take(pa.array(mine, pa.int64())).to_pylist()
                    heavy = batch.select(self.streamed).take(pa.array([i - first for i in mine], pa.int64())).to_pylist()
                    yield [(i, {**a, **b}) for i, a, b in zip(mine, light, heavy)]
                first = last
            if refer and first == table.num_rows:
                schema = plan_schema(self.plan)
                self.made[shard.index] = {c: pa.chunked_array(chunks, reference_type(schema.field(c).type))
                                          for c, chunks in made.items()}
        finally:
            if reading is not None:  # a read cut short by a stop still runs the generator in its thread:
                await asyncio.wait([reading])  # closing it then would raise "generator already executing"
                if not reading.cancelled():
                    reading.exception()  # retrieved: the stop is what this ends with
            await asyncio.to_thread(stream.close)


def _next(stream: Iterator[pa.Table], refer: list[str]) -> tuple[pa.Table, dict[str, pa.ChunkedArray]] | None:
    """The stream's next batch and the references of its `refer` columns (hashed in this thread)."""
    batch = next(stream, None)
    return None if batch is None else (batch, {c: referenced(batch.column(c)) for c in refer})
