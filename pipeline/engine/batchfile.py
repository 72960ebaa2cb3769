"""Batch files by hand: `pipeline export-batch JOB FILE` writes the rows still to do as Batch JSONL
(the request bodies a run would send, for `vllm run-batch` or a manual upload), sending nothing;
`pipeline import-batch JOB FILE` merges a batch's output (or error) file into the dataset, as a
batch run collects one: answers journaled, complete shards committed.

    code = export_batch(job, Path("todo.jsonl"))
    code = import_batch(job, Path("done.jsonl"))

Both hold the job's lock, so neither races a run of the same job.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

from ..config import Job
from ..errors import InputError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.durable import atomic_file
from ..io.manifest import read_rows
from ..net.text import loads_json
from ..rows.batchlines import request_line, result_of
from ..rows.request import RequestBuilder, request_columns
from .book import Book
from .console import Console
from .counts import Counts
from .feed import Feed
from .options import RunOptions
from .prepare import Prepared, prepare
from .sender import error_row
from .shard import make_labels

__all__ = ["export_batch", "import_batch"]

T = TypeVar("T")


def _prepared(job: Job, console: Console, work: Callable[[Checkpoint, Prepared], Coroutine[Any, Any, T]]) -> T:
    """`work` under the job's lock, the job prepared as for a run, on an event loop of its own."""
    ckpt = open_checkpoint(job.output)
    with ckpt.locked(job.name):
        ready = prepare(job, ckpt, RunOptions(), console)
        return asyncio.run(work(ckpt, ready))


def export_batch(job: Job, path: Path) -> int:
    console = Console.for_job(job)
    count, skipped = _prepared(job, console, lambda ckpt, ready: _export(job, ckpt, ready, path, console))
    size = path.stat().st_size
    console.say(f"{job.name}: wrote {count} requests ({size / 2**20:.1f} MB) to {path}; {skipped} rows could not be "
                f"built (see `pipeline run --dry-run`)" if skipped else f"{job.name}: wrote {count} requests "
                f"({size / 2**20:.1f} MB) to {path}")
    if count > job.run.batch_max_requests or size > job.run.batch_max_mb * 2**20:
        console.say(f"note: over one batch's caps ([run] batch_max_requests = {job.run.batch_max_requests}, "
                    f"batch_max_mb = {job.run.batch_max_mb:g}): split it before uploading")
    return 0


async def _export(job: Job, ckpt: Checkpoint, ready: Prepared, path: Path, console: Console) -> tuple[int, int]:
    """The rows a run would send, decided as a run decides (the book: a committed part's rows are
    answered even where the journal lost them), their image bytes read a batch of rows at a time."""
    labels = make_labels(job)
    plan = ready.plan
    book = Book(job, ckpt, plan, ready.commits, retry=None, labels=labels)  # no journal: export writes none
    feed = Feed(job, plan, request_columns(job, plan.columns))
    builder = RequestBuilder(job, plan.columns, redactor=console.redactor, labels=labels)
    count = skipped = 0
    try:
        with atomic_file(path) as f:  # a file with every line, or none at all
            for shard in ready.todo:
                rows = await feed.open(shard)
                send = book.open(shard, rows.ids, await book.answers(shard))
                skipped += sum(1 for i in send if i in rows.errors)  # cannot be read: no request (a run writes its error row)
                cells = feed.cells(shard, rows.table, [i for i in send if i not in rows.errors])
                async with contextlib.aclosing(cells):
                    async for batch in cells:
                        for i, row in batch:
                            try:
                                built = await builder.build(row)
                            except InputError:
                                skipped += 1
                                continue
                            f.write(request_line(rows.ids[i], built.body, job.endpoint.api))
                            count += 1
    finally:
        await builder.aclose()
    return count, skipped


def import_batch(job: Job, path: Path) -> int:
    console = Console.for_job(job)
    counts, unknown = _prepared(job, console, lambda ckpt, ready: _import(job, ckpt, ready, path, console))
    note = f"; {unknown} lines name no row of this manifest (skipped)" if unknown else ""
    console.say(f"{job.name}: imported {counts.ok} answers and {counts.failed} failed requests from {path}{note}")
    return 0


async def _import(job: Job, ckpt: Checkpoint, ready: Prepared, path: Path, console: Console) -> tuple[Counts, int]:
    """A batch's output lines journaled and counted as a batch run collects them (the book); the
    shards answered whole committed."""
    labels = make_labels(job)
    shard_of: dict[str, int] = {}
    for shard in ready.plan.shards:  # the ids alone: no shard's cells are held
        for row_id in (await asyncio.to_thread(read_rows, job.input, ready.plan, shard, [])).ids:
            shard_of[row_id] = shard.index
    journal = ckpt.journal()
    counts = Counts()
    book = Book(job, ckpt, ready.plan, ready.commits, retry=None, labels=labels, journal=journal, counts=counts,
                scrub=console.redactor.scrub)
    unknown = 0
    touched: set[int] = set()
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    line = loads_json(raw)[0]  # never RecursionError: a hostile line is skipped
                except ValueError:
                    continue
                got = result_of(line, job, labels, console.redactor)
                index = shard_of.get(got.row_id)
                if index is None:
                    unknown += 1
                    continue
                row = got.row if got.row is not None else error_row(got.row_id, got.error, attempts=1)  # type: ignore[arg-type]  # no row: an error says why
                row.attempts = max(row.attempts, 1)
                book.settle(index, row)
                touched.add(index)
        journal.sync()
        for index in sorted(touched):
            shard = ready.plan.shard(index)
            if book.open_known(shard, await book.answers(shard), set()):
                await book.commit(shard)
    finally:
        journal.close()
    return counts, unknown
