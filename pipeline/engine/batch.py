"""The batch executor: the job's rows through the provider's Batch API, half price, answers within
`batch_window`, with the online run's manifest, output, checkpoint and guarantees.

    [run]
    mode = "batch"
    batch_max_requests = 50000     # per batch file; and batch_max_mb (200) per file
    poll_s = 60                    # the longest wait between two looks at a running batch
    wait = true                    # false: submit what is new, collect what ended, exit 5 (cron)

A round: look at every batch not yet collected (resuming a step a crash interrupted), collect
those that ended (their answers journaled, their shards committed), then plan new batches for the
rows with no answer and no batch (the request bodies built exactly as online: images inlined,
resized, confined), upload and create them. Rounds go on, each after a longer wait (up to poll_s),
until no batch is running and no row is left; with wait = false after one round.

What makes a resume safe is the ledger (pipeline.io.ledger): a batch's rows are written down
before its file is uploaded, its file id before the batch is created, its batch id as soon as it
is known; a batch created by a run killed before writing its id down is found again by its name
(in its metadata), never created twice. A failed line whose error would be retried online (429,
5xx, timeout), and the rows of an expired or cancelled batch, go into the next batch, up to
max_attempts batches; others are written as error rows, as online.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any, AsyncGenerator

from ..crashpoints import crash_point
from ..errors import InputError, LocalFailure, RequestError, RowError, StopJob, local_failure
from ..io.checkpoint import Checkpoint
from ..io.ledger import TERMINAL, Batch
from ..io.manifest import Shard
from ..net.batchapi import BatchAPI
from ..net.retry import STOP_KINDS, should_retry
from ..net.text import loads_json
from ..records import ResultRow
from ..rows.batchlines import request_line, result_of
from ..rows.request import RequestBuilder, request_columns
from .book import Book
from .executor import Executor
from .feed import Feed
from .prepare import Prepared
from .progress import Progress
from .sender import error_row
from .shard import make_labels
from .counts import Counts, Live
from .summary import Stopped, Waiting
from ..waits import wait_event

__all__ = ["BatchExecutor"]

FIRST_POLL_S = 1.0  # the first look at a new batch; each later wait is longer by POLL_GROWTH, up to poll_s
POLL_GROWTH = 1.5


class BatchExecutor(Executor):
    batch_run: _BatchRun | None = None

    def live(self) -> Live:
        run = self.batch_run
        if run is None:
            return super().live()
        return Live(Counts.merged([run.counts.to_dict()]), remaining=run.remaining, batches=dict(run.states))

    def execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        return self.host.run_loop(self._execute(ckpt, ready))

    async def _execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        run = self.batch_run = _BatchRun(self, ckpt, ready)
        try:
            async with self.serving() as job:
                run.job = job
                with self.host.signals(asyncio.get_running_loop(), run.interrupt, None), \
                        Progress(self.progress, total=ready.plan.total_rows, auto=self.host.auto_progress) as bar:
                    run.bar = bar
                    await run.rounds()
        except (StopJob, LocalFailure) as stop:
            run.stopped = stop
        except OSError as exc:
            run.stopped = local_failure(exc, "running the batches")
        finally:
            await run.close()
        return run.counts, run.stopped


class _BatchRun:
    def __init__(self, executor: BatchExecutor, ckpt: Checkpoint, ready: Prepared) -> None:
        self.job = executor.job
        self.options, self.console, self.ckpt, self.ready = executor.options, executor.console, ckpt, ready
        self.ledger = ckpt.ledger()
        self.journal = ckpt.journal()
        self.labels = make_labels(executor.job)
        self.counts = Counts()
        self.stopped: Stopped = None
        self.stopping = asyncio.Event()
        self.bar: Progress | None = None
        # Which rows to send, and each shard's rows still waiting, kept between rounds: a shard is
        # read again only when some of its rows came back for another batch.
        self.book = Book(executor.job, ckpt, ready.plan, ready.commits, retry=executor.options.retry_failed,
                         labels=self.labels, journal=self.journal, counts=self.counts,
                         scrub=executor.console.redactor.scrub)
        self.feed = Feed(executor.job, ready.plan, request_columns(executor.job, ready.plan.columns))
        self.shards = {s.index: s for s in ready.plan.shards}
        self.tries: dict[str, int] = {}  # row id -> batches that held it (the row's attempts)
        self.unanswered = 0  # rows of collected batches that got no result (they wait for another batch)
        self.cancel = executor.options.cancel_batches
        self.states: dict[str, int] = {}  # batches by state, as last looked at (the metrics read it)
        self.remaining: int | None = None
        self.wait = executor.job.run.wait if executor.options.wait is None else executor.options.wait

    def interrupt(self, sig: int) -> None:
        self.console.say("\nstopping: the batches go on at the provider; run again to collect them")
        self.stopped = sig
        self.stopping.set()

    async def close(self) -> None:
        self.journal.close()

    # -- rounds ---------------------------------------------------------------------------

    async def rounds(self) -> None:
        job = self.job
        for batch in self.ledger.batches():
            for _, row_id in batch.rows:
                self.tries[row_id] = self.tries.get(row_id, 0) + 1
        wait_s = min(FIRST_POLL_S, job.run.poll_s)
        async with BatchAPI(job.endpoint.base_url or "", job.api_key(), timeout_s=job.limits.timeout_s,
                            max_attempts=job.limits.max_attempts, proxy=job.endpoint_proxy(),
                            headers=job.endpoint.headers, redactor=self.console.redactor) as api:
            builder = RequestBuilder(job, self.ready.plan.columns, redactor=self.console.redactor, labels=self.labels)
            try:
                while not self.stopping.is_set():
                    await self._look(api)
                    if not self.cancel and not self.stopping.is_set():
                        await self._submit(api, builder)
                    running = [b for b in self.ledger.batches() if b.active]
                    self._show()
                    if not running:
                        await self._commit_complete()
                        if self.cancel and self.stopped is None and self.unanswered:
                            self.stopped = StopJob("the batches were cancelled as asked; the rows they did not answer have "
                                                   "none yet: run again (without --cancel-batches) to send them", kind="cancelled")
                        return
                    if not self.wait:
                        self.stopped = Waiting(len(running), sum(len(b.rows) for b in running))
                        return
                    await wait_event(self.stopping, wait_s)
                    wait_s = min(job.run.poll_s, wait_s * POLL_GROWTH)
            finally:
                await builder.aclose()

    def _show(self) -> None:
        states: dict[str, int] = {}
        for b in self.ledger.batches():
            state = "collected" if b.collected else (b.status or "submitting")
            states[state] = states.get(state, 0) + 1
        self.states, self.remaining = states, self._left()
        if self.bar is not None:
            c = self.counts
            self.bar.show(self.ready.plan.total_rows - self.remaining, ok=c.ok, failed=c.failed)

    def _left(self) -> int:
        return sum(len(b.rows) for b in self.ledger.batches() if b.active)

    # -- looking at batches: resume, poll, cancel, collect ---------------------------------

    async def _look(self, api: BatchAPI) -> None:
        for batch in self.ledger.batches():
            if not batch.active or self.stopping.is_set():
                continue
            if batch.file_id is None:
                await self._upload(api, batch)
            if batch.batch_id is None:
                await self._create(api, batch)
            if self.cancel and not batch.cancel and batch.status not in TERMINAL:
                await api.cancel(batch.batch_id or "")  # None: it ended since the last look; collected below
                self.ledger.cancel_asked(batch.name)
            state = await api.get(batch.batch_id or "")
            status, counts = str(state.get("status")), dict(state.get("request_counts") or {})
            if (status, counts) != (batch.status, batch.counts):
                self.ledger.status(batch.name, status, counts)
                crash_point("batch_after_poll")
            if status in TERMINAL:
                await self._collect(api, batch, state)

    async def _upload(self, api: BatchAPI, batch: Batch, data: bytes | None = None) -> None:
        """`data`: the file's bytes as just written; else (a resumed batch) read back."""
        if data is None:
            data = await asyncio.to_thread(self.ledger.read_file, batch.path)
        batch.file_id = await api.upload(f"pipeline-{self.job.name}-{batch.name}.jsonl", data)
        crash_point("batch_after_upload")
        self.ledger.uploaded(batch.name, batch.file_id)

    async def _create(self, api: BatchAPI, batch: Batch) -> None:
        found = await api.find(batch.name)  # created by a run that died before writing its id down
        if found is None:
            found = await api.create(batch.file_id or "", self.job.endpoint.api.batch_url, self.job.run.batch_window,
                                     {"pipeline_job": self.job.name, "pipeline_batch": batch.name})
            crash_point("batch_after_create")
        batch.batch_id = str(found["id"])
        self.ledger.created(batch.name, batch.batch_id)
        self.console.say(f"batch {batch.name}: {len(batch.rows)} requests, {batch.batch_id}")

    async def _collect(self, api: BatchAPI, batch: Batch, state: dict[str, Any]) -> None:
        """An ended batch's lines into result rows; rows it did not answer wait for the next batch."""
        lines: list[bytes] = []
        for key in ("output_file_id", "error_file_id"):
            if state.get(key):
                lines += (await api.content(str(state[key]))).splitlines()
        crash_point("batch_after_download")
        shard_of = {row_id: shard for shard, row_id in batch.rows}
        seen: set[str] = set()
        journaled: set[str] = set()
        touched: set[int] = set()
        for raw in lines:
            try:
                line = loads_json(raw)[0]  # never RecursionError: a hostile line is skipped, not the run
            except ValueError:
                continue
            got = result_of(line, self.job, self.labels, self.console.redactor)
            if got.row_id not in shard_of or got.row_id in seen:
                continue
            seen.add(got.row_id)
            if self._settle(shard_of[got.row_id], got.row_id, got.row, got.error):
                touched.add(shard_of[got.row_id])
                journaled.add(got.row_id)
        status = str(state.get("status"))
        why, kind = f"the batch ended {status} without an answer for this request", "server"
        if status == "failed":  # refused whole (its file, its quota): every row counts a try
            why = "; ".join(str(e.get("message")) for e in ((state.get("errors") or {}).get("data") or [])) or "the batch failed"
            why, kind = f"the batch failed: {self.console.redactor.scrub(why)}", "bad_request"
            self.console.say(f"batch {batch.name} failed at the provider: {why}")
        for row_id in set(shard_of) - seen:  # no line at all: as a failed attempt, retried while tries are left
            err = RequestError(self.console.redactor.cut(why, 500), kind=kind, should_retry=True)
            if self._settle(shard_of[row_id], row_id, None, err):
                touched.add(shard_of[row_id])
                journaled.add(row_id)
        self.unanswered += len(shard_of) - len(journaled)
        self.journal.sync()
        self.ledger.collected(batch.name)
        await self._commit_ready(touched)

    def _settle(self, shard: int, row_id: str, row: ResultRow | None, err: RequestError | None) -> bool:
        """Journal the row's result (through the book), or leave it for the next batch; True when journaled."""
        tries = self.tries.get(row_id, 1)
        if err is not None and err.kind in STOP_KINDS:
            self.stopped = StopJob(f"the provider refused a request of the batch: {err.describe()}", kind=err.kind)
            self.stopping.set()
            return False
        if err is not None:
            retry = should_retry(err, tries, self.job.limits.max_attempts)
            if err.kind == "invalid_output" and self.labels is not None:
                retry = tries <= self.labels.config.max_invalid_retries
            if retry:
                return False  # no result yet: the next batch asks again
            if row is None:
                row = error_row(row_id, err, attempts=tries)
        assert row is not None
        row.attempts = tries
        self.book.settle(shard, row)
        return True

    async def _commit_ready(self, shards: set[int]) -> None:
        """Commit those of `shards` whose every row is answered."""
        for index in sorted(shards):
            if self.book.complete(index):
                await self.book.commit(self.shards[index])

    async def _commit_complete(self) -> None:
        """No batch runs: commit every shard answered whole (by this run, or by an earlier one that
        died before committing it), from the journal and commit records alone."""
        for shard in self.ready.todo:
            if not self.book.is_open(shard.index) and shard.index not in self.book.committed:
                self.book.open_known(shard, await self.book.answers(shard), set())
        await self._commit_ready({s.index for s in self.ready.todo})

    # -- planning and submitting new batches ------------------------------------------------

    async def _submit(self, api: BatchAPI, builder: RequestBuilder) -> None:
        held: dict[int, set[str]] = {}  # rows waiting in a batch, by shard
        for b in self.ledger.batches():
            if b.active:
                for shard_index, row_id in b.rows:
                    held.setdefault(shard_index, set()).add(row_id)
        lines: list[bytes] = []
        rows: list[tuple[int, str]] = []
        size = 0
        cap_bytes, cap_lines = int(self.job.run.batch_max_mb * 1024 * 1024), self.job.run.batch_max_requests
        touched: set[int] = set()
        for shard in self.ready.todo:
            async with contextlib.aclosing(self._pending(shard, held.get(shard.index, set()), touched)) as pending:
                async for row_id, cells in pending:
                    if self.stopping.is_set():
                        return
                    try:
                        built = await builder.build(cells)
                    except InputError as err:  # as online: an error row, never sent
                        self._settle(shard.index, row_id, error_row(row_id, err, attempts=0), None)
                        touched.add(shard.index)
                        continue
                    line = request_line(row_id, built.body, self.job.endpoint.api)
                    if rows and (len(rows) >= cap_lines or size + len(line) > cap_bytes):
                        await self._send(api, rows, lines)
                        lines, rows, size = [], [], 0
                    lines.append(line)
                    rows.append((shard.index, row_id))
                    size += len(line)
        if rows:
            await self._send(api, rows, lines)
        if touched:
            self.journal.sync()
            await self._commit_ready(touched)

    async def _pending(self, shard: Shard, held: set[str],
                       touched: set[int]) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """The shard's rows with no result and no batch, with the cells a request needs, their image
        bytes read a batch of rows at a time (pipeline.engine.feed). The shard is read only when it
        has such rows: the book knows the others from the journal and the ledger. Rows that cannot
        be read are journaled as error rows, their shard added to `touched`."""
        book = self.book
        if shard.index in book.committed:
            return
        if book.is_open(shard.index):
            want = book.waiting(shard.index) - held
            if not want:
                return  # every row answered, or waiting in a batch
            rows = await self.feed.open(shard)
            send = [i for i, row_id in enumerate(rows.ids) if row_id in want]
        else:
            answers = await book.answers(shard)
            if book.open_known(shard, answers, held):
                touched.add(shard.index)  # answered whole: committed with the others
                return
            rows = await self.feed.open(shard)
            send = book.open(shard, rows.ids, answers, held)
        ids = rows.ids
        for i in [i for i in send if i in rows.errors]:  # unreadable: an error row of kind "input", never sent
            self._settle(shard.index, ids[i], error_row(ids[i], RowError(rows.errors[i], kind="input"), attempts=0), None)
            touched.add(shard.index)
        cells = self.feed.cells(shard, rows.table, [i for i in send if i not in rows.errors])
        async with contextlib.aclosing(cells):
            async for batch in cells:
                for i, row in batch:
                    yield ids[i], row

    async def _send(self, api: BatchAPI, rows: list[tuple[int, str]], lines: list[bytes]) -> None:
        data = b"".join(lines)
        number = self.ledger.next_number()
        name = f"b{number:06d}-{hashlib.blake2b(data, digest_size=4).hexdigest()}"
        path = await asyncio.to_thread(self.ledger.write_file, f"{name}.jsonl", data)
        self.ledger.planned(name, rows, path)
        for _, row_id in rows:
            self.tries[row_id] = self.tries.get(row_id, 0) + 1
        batch = Batch(name, rows, str(path))
        await self._upload(api, batch, data)
        await self._create(api, batch)
