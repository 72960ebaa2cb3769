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
import time
from pathlib import Path

from ..config import Job
from ..errors import InputError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.durable import atomic_file
from ..io.manifest import Plan, read_rows
from ..net.text import loads_json
from ..rows.batchlines import request_line, result_of
from ..rows.request import RequestBuilder, request_columns
from .commit import answers_so_far, commit_shard, media_columns
from .console import Console
from .options import RunOptions
from .prepare import prepare
from .sender import error_row
from .shard import make_labels

__all__ = ["export_batch", "import_batch"]


def export_batch(job: Job, path: Path) -> int:
    console = Console.for_job(job)
    ckpt = open_checkpoint(job.output)
    with ckpt.locked(job.name):
        ready = prepare(job, ckpt, RunOptions(), console)
        count, skipped = asyncio.run(_export(job, ckpt, ready.plan, path, console))
    size = path.stat().st_size
    console.say(f"{job.name}: wrote {count} requests ({size / 2**20:.1f} MB) to {path}; {skipped} rows could not be "
                f"built (see `pipeline run --dry-run`)" if skipped else f"{job.name}: wrote {count} requests "
                f"({size / 2**20:.1f} MB) to {path}")
    if count > job.run.batch_max_requests or size > job.run.batch_max_mb * 2**20:
        console.say(f"note: over one batch's caps ([run] batch_max_requests = {job.run.batch_max_requests}, "
                    f"batch_max_mb = {job.run.batch_max_mb:g}): split it before uploading")
    return 0


async def _export(job: Job, ckpt: Checkpoint, plan: Plan, path: Path, console: Console) -> tuple[int, int]:
    labels = make_labels(job)
    builder = RequestBuilder(job, plan.columns, redactor=console.redactor, labels=labels)
    columns = request_columns(job, plan.columns)
    count = skipped = 0
    try:
        with atomic_file(path) as f:  # a file with every line, or none at all
            for shard in plan.shards:
                done, _ = answers_so_far(job, ckpt, shard, 0, labels)
                rows = read_rows(job.input, plan, shard)
                cells = rows.table.select(columns).to_pylist()
                for i, (row_id, row) in enumerate(zip(rows.ids, cells)):
                    if row_id in done:
                        continue
                    if i in rows.errors:  # cannot be read: no request (a run writes its error row)
                        skipped += 1
                        continue
                    try:
                        built = await builder.build(row)
                    except InputError:
                        skipped += 1
                        continue
                    f.write(request_line(row_id, built.body, job.endpoint.api))
                    count += 1
    finally:
        await builder.aclose()
    return count, skipped


def import_batch(job: Job, path: Path) -> int:
    console = Console.for_job(job)
    ckpt = open_checkpoint(job.output)
    labels = make_labels(job)
    with ckpt.locked(job.name):
        ready = prepare(job, ckpt, RunOptions(), console)
        shard_of: dict[str, int] = {}
        held = {}
        for shard in ready.plan.shards:
            held[shard.index] = read_rows(job.input, ready.plan, shard, None, media_columns(job))
            for row_id in held[shard.index].ids:
                shard_of[row_id] = shard.index
        journal = ckpt.journal()
        ok = failed = unknown = 0
        touched: set[int] = set()
        with open(path, "rb") as f:
            for raw in f:
                try:
                    line = loads_json(raw)[0]  # never RecursionError: a hostile line is skipped
                except ValueError:
                    continue
                got = result_of(line, job, labels, console.redactor)
                shard = shard_of.get(got.row_id)
                if shard is None:
                    unknown += 1
                    continue
                row = got.row if got.row is not None else error_row(got.row_id, got.error, attempts=1)  # type: ignore[arg-type]
                row.attempts = max(row.attempts, 1)
                row.finished_at = time.time()
                journal.append(shard, row.scrubbed(console.redactor.scrub))
                ok, failed = (ok + 1, failed) if row.ok else (ok, failed + 1)
                touched.add(shard)
        journal.sync()
        for index in sorted(touched):
            shard = ready.plan.shard(index)
            done, _ = answers_so_far(job, ckpt, shard, 0, labels)
            if len(done) >= shard.rows:
                journal.close_shard(index)
                commit_shard(job, ckpt, shard, held[index].table, held[index].ids, labels)
        journal.close()
    note = f"; {unknown} lines name no row of this manifest (skipped)" if unknown else ""
    console.say(f"{job.name}: imported {ok} answers and {failed} failed requests from {path}{note}")
    return 0
