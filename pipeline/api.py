"""The Python API: a job and a manifest in, a RunResult out, from a script, a thread, a notebook
cell or an async app.

    import pipeline
    job = pipeline.load_job("jobs/captions.toml")       # or a dict shaped like the TOML file
    res = pipeline.run(job, manifest=df)                # DataFrame, pyarrow Table, datasets.Dataset, list of dicts
    res = await pipeline.arun(job, manifest=df)         # inside a running event loop
    res.exit_code, res.ok, res.failed, res.pending, res.output
    res.to_pandas(); res.to_arrow(); res.to_dataset()
    pipeline.compare(job_a, job_b, out="ab.html")       # several models' outputs side by side

The semantics of `pipeline run`: the same checkpoint, resume, summary and exit codes (in
`res.exit_code`). What differs, because the process is the caller's: the run has a thread and an
event loop of its own (a loop running in the calling thread is neither needed nor blocked); a
Ctrl-C (a kernel interrupt) is caught only where the caller is on the main thread, only while
the run lasts, and stops the run as SIGINT does (a second one stops it at once); errors before
sending are exceptions of the pipeline's tree (JobError, LockedError, LocalFailure), never
SystemExit; and the process is never ended (a stop that hangs cancels the run instead).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

from . import config
from .config import Job
from .engine import RunOptions, executor_for
from .engine.host import CallerHost
from .engine.options import retry_kinds
from .engine.shard import STOP_DEADLINE_S
from .errors import JobError, LocalFailure
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.frames import Frame

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["load_job", "run", "arun", "compare", "RunResult"]

T = TypeVar("T")
JobLike = Job | str | os.PathLike[str] | dict[str, Any]


def load_job(job: JobLike, *, require_key: bool = True) -> Job:
    """A job from a TOML file's path or a dict shaped like one (its relative paths resolve against
    the working directory). `[input] path` may be left out when the manifest is given to run().
    Every problem is a JobError naming the file (or dict), the table and the key."""
    if isinstance(job, Job):
        return job
    return config.load_job(job, require_key=require_key, input_optional=True)


def compare(*jobs: JobLike, out: str | os.PathLike[str] | None = None, max_mb: float | None = None) -> str:
    """`pipeline compare`: one offline HTML page of these jobs' outputs side by side (a manifest
    run through several models), rows joined by id; returns its path (default:
    compare-<names>.html in the working folder). Sends nothing, locks nothing."""
    from .tools.compare import MAX_MB, write_compare

    loaded = [load_job(job, require_key=False) for job in jobs]
    return write_compare(loaded, Path(out) if out is not None else None, max_mb=max_mb or MAX_MB)


@dataclass(frozen=True)
class RunResult:
    """How a run ended; the counts are over the whole output (every run of the job so far)."""

    exit_code: int  # as `pipeline run` exits: 0 all ok, 1 failed rows, 3 provider stop, 4 local failure, 130 Ctrl-C
    ok: int
    failed: int
    pending: int  # rows without a result yet: run again to send them
    rows: int
    output: str  # the Parquet dataset's folder (or URL)
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict, repr=False)  # last_run.json; {} for a dry run
    job: Job | None = field(default=None, repr=False, compare=False)

    def to_arrow(self) -> pa.Table:
        """The output's rows (manifest columns and answers), in manifest order."""
        from .io.storage import PartStore

        if self.job is None:
            raise JobError("this RunResult has no job to read the output of")
        return PartStore.for_output(self.job.output).read_all()

    def to_pandas(self) -> pd.DataFrame:
        return self.to_arrow().to_pandas()

    def to_dataset(self) -> Any:
        """The output as a Hugging Face `datasets.Dataset` (the `hf` extra)."""
        try:
            import datasets
        except ImportError:
            raise JobError("to_dataset() needs Hugging Face datasets: pip install -e '.[hf]' in the clone (or 'pipeline[hf]')") from None
        return datasets.Dataset(self.to_arrow())

    def report(self, out: str | os.PathLike[str] | None = None, *, max_mb: float | None = None) -> str:
        """Write the output's report (`pipeline report`); returns where it is (the `report` extra)."""
        from .tools.report import MAX_MB, write_report

        if self.job is None:
            raise JobError("this RunResult has no job to report on")
        return write_report(self.job, Path(out) if out is not None else None, max_mb=max_mb or MAX_MB)

    @classmethod
    def of(cls, job: Job, code: int, summary: dict[str, Any]) -> RunResult:
        from .config.urls import display

        return cls(exit_code=code, ok=summary.get("ok", 0), failed=summary.get("failed", 0),
                   pending=summary.get("pending", 0), rows=summary.get("rows", 0), output=display(job.output.path),
                   failed_by_kind=dict(summary.get("failed_by_kind", {})), summary=summary, job=job)



def _options(retry_failed: bool | str | Iterable[str] | None, **flags: Any) -> RunOptions:
    """run()'s and arun()'s keywords as the engine's RunOptions (one place for both)."""
    return RunOptions(retry_failed=retry_kinds(retry_failed, "retry_failed"), **flags)

def run(job: JobLike, manifest: Any = None, *, retry_failed: bool | str | Iterable[str] | None = None,
        restart: bool = False, dry_run: bool = False, progress: bool | None = None, report: bool = False,
        wait: bool | None = None, cancel_batches: bool = False, no_cache: bool = False) -> RunResult:
    """Run the job (to its end or a stop) and say how it ended; resumes where the last run stopped.

    `manifest`: the rows in memory instead of `[input] path`; stored once in the checkpoint folder,
    keyed by content, so the same call again sends nothing. Or a path, folder, glob or URL (or a
    list of them) as `[input] path` takes: read where it is. `retry_failed`: True (every failed
    kind), a kind or a list of kinds. `wait=False` / `cancel_batches=True`: batch mode's --no-wait
    and --cancel-batches. `no_cache=True`: --no-cache ([run] cache: send every row, store the fresh
    answers). Never raises for failed rows; raises JobError for a bad job, LockedError
    when the job runs elsewhere."""
    work, host = _work(job, manifest, _options(retry_failed, restart=restart, progress=progress, report=report, wait=wait,
                                               cancel_batches=cancel_batches, no_cache=no_cache), dry_run)
    return _wait(host, _start(work))


async def arun(job: JobLike, manifest: Any = None, *, retry_failed: bool | str | Iterable[str] | None = None,
               restart: bool = False, dry_run: bool = False, progress: bool | None = None, report: bool = False,
               wait: bool | None = None, cancel_batches: bool = False, no_cache: bool = False) -> RunResult:
    """run() for a running event loop (a notebook cell, an async app): awaits the run, which has
    its own thread and loop. Cancelling the awaiting task stops the run as Ctrl-C does, waits for
    it to end, and re-raises the cancellation."""
    work, host = _work(job, manifest, _options(retry_failed, restart=restart, progress=progress, report=report, wait=wait,
                                               cancel_batches=cancel_batches, no_cache=no_cache), dry_run)
    with _interrupts_to(host):
        waiter = asyncio.wrap_future(_start(work))
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            host.interrupt(signal.SIGINT)
            with contextlib.suppress(Exception):
                await asyncio.shield(waiter)
            raise


def _work(job: JobLike, manifest: Any, options: RunOptions, dry_run: bool) -> tuple[Callable[[], RunResult], CallerHost]:
    """What the run's thread will do, checked here first: a bad job or manifest raises in the caller."""
    the_job = load_job(job)
    stage: Callable[[Checkpoint], None] | None = None
    if _is_location(manifest):  # a file, folder, glob or URL (or a list of them): read where it is
        the_job = replace(the_job, input=the_job.input.at(manifest, Path.cwd()), in_memory=False)
    elif manifest is not None:
        the_job, stage = _with_manifest(the_job, manifest)
    elif the_job.in_memory:
        raise JobError("[input] path: the job has no manifest file; pass manifest= (a DataFrame, a pyarrow Table, "
                       "a datasets.Dataset or a list of dicts) or set [input] path")
    host = CallerHost()
    if dry_run:
        return (lambda: _dry_run(the_job, stage)), host

    def work() -> RunResult:
        executor = executor_for(the_job, options, host=host, stage=stage)
        code = executor.run()
        return RunResult.of(the_job, code, executor.summary)

    return work, host


def _is_location(manifest: Any) -> bool:
    places = manifest if isinstance(manifest, (list, tuple)) and manifest else [manifest]
    return all(isinstance(p, (str, os.PathLike)) for p in places)


def _with_manifest(job: Job, manifest: Any) -> tuple[Job, Callable[[Checkpoint], None]]:
    # Image bytes (a binary column, HF's Image struct) are stored as they are, once: the run reads
    # them per shard like a Parquet manifest's, and the output holds references (io/references.py).
    frame = Frame.of(manifest)
    assert job.output.checkpoint is not None  # set by the loader
    stored = replace(job.input, path=open_checkpoint(job.output).manifest_path, format="parquet")
    base = job.files_base or Path.cwd()  # relative image paths in a frame: from where the caller is
    return replace(job, input=stored, in_memory=True, files_base=base), lambda ckpt: _store(frame, ckpt)


def _store(frame: Frame, ckpt: Checkpoint) -> None:
    try:
        ckpt.save_manifest(frame)
    except OSError as exc:
        from .errors import local_failure

        raise local_failure(exc, "storing the manifest") from None


def _dry_run(job: Job, stage: Callable[[Checkpoint], None] | None) -> RunResult:
    from .tools.dryrun import dry_run
    from .tools.status import job_status

    if stage is not None:
        ckpt = open_checkpoint(job.output)
        with ckpt.locked(job.name):
            stage(ckpt)
    code = dry_run(job)
    state = job_status(job)
    return RunResult.of(job, code, {k: state.get(k, 0) for k in ("ok", "failed", "pending", "rows", "failed_by_kind")}
                        if state.get("started") else {})


def _start(work: Callable[[], T]) -> concurrent.futures.Future[T]:
    """`work()` on a thread of its own: its result (or exception) in the future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def body() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
            future.set_exception(exc)

    threading.Thread(target=body, name="pipeline-run", daemon=True).start()
    return future


def _wait(host: CallerHost, future: concurrent.futures.Future[T]) -> T:
    """The run's result; a Ctrl-C meanwhile goes to the run. If a stop did not end the run within
    its deadline and the cancellation did not either (something below blocks its loop), give up
    waiting rather than hang the caller."""
    with _interrupts_to(host):
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if host.expired_at is not None and time.monotonic() - host.expired_at > STOP_DEADLINE_S:
                    raise LocalFailure(
                        f"the run did not end within {STOP_DEADLINE_S:g}s of being cancelled; its thread is left "
                        f"behind (everything journaled is kept); restart this process before running the job again"
                    ) from None


@contextlib.contextmanager
def _interrupts_to(host: CallerHost) -> Iterator[None]:
    """While the run lasts, Ctrl-C (and SIGTERM, if nobody handles it) go to the run; only where
    the caller owns the main thread (elsewhere Python cannot take a signal), and put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = [signal.SIGINT] + ([signal.SIGTERM] if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else [])
    before = {sig: signal.getsignal(sig) for sig in caught}
    for sig in caught:
        signal.signal(sig, lambda sig, frame: host.interrupt(sig))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
