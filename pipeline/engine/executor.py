"""Executors: the ways of running a job's shards, behind one base.

    code = LocalExecutor(job, options).run()      # this process (pipeline.engine.local)
    code = RayExecutor(job, options).run()        # Ray tasks over a cluster (pipeline.engine.ray)
    executor.summary                              # what last_run.json says, once run() returned (or how
                                                  # a run that ended before its summary ended)

The base does what every executor shares, the datatrove way: lock the job and prepare it (plan,
verified commits, shards to do), start the built-in endpoint for a job with `[serve]`, hand
signals over, show progress, and end with the one run summary (exit code, last_run.json). A
subclass says only how the shards still to do are sent: `execute(ckpt, ready)` returns this run's
counts and why it stopped early. Whether the run owns its process (the CLI) or is a caller's
guest (the Python API) is the host's business (pipeline.engine.host), not the executor's.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, AsyncIterator, Callable, Iterator

from ..config import Job
from ..errors import JobError, LocalFailure, LockedError, local_failure
from ..io.checkpoint import Checkpoint, open_checkpoint
from .commit import compact_loose, write_empty_dataset
from .console import Console
from .counts import Counts, Live
from .options import RunOptions
from .prepare import Prepared, prepare
from .host import Host, ProcessHost
from .shard import make_labels
from .process import EXIT_LOCAL_FAILURE, EXIT_LOCKED, EXIT_USAGE
from .summary import Stopped, finish

__all__ = ["Executor"]


class Executor:
    def __init__(self, job: Job, options: RunOptions = RunOptions(), *, host: Host | None = None,
                 stage: Callable[[Checkpoint], None] | None = None) -> None:
        self.job = job
        self.options = options
        self.host = host or ProcessHost()
        self.stage = stage  # under the lock, before planning: e.g. store an in-memory manifest
        self.console = Console.for_job(job, options.log_format)
        self.progress = False if self.console.json else options.progress  # JSON logs: never a bar
        self.summary: dict[str, Any] = {}
        self.ready: Prepared | None = None  # once prepared

    def run(self) -> int:
        """Run the job to its end or to a stop; returns the exit code. Never raises for row errors.
        The job's [notify] hears of every ending, those before the summary (a bad manifest, a
        lock held elsewhere) too."""
        self.host.tune()
        self.host.capture(self.console)
        try:
            code = self._run()
        except (JobError, LockedError, LocalFailure) as exc:
            self._notify(self._ended_early(exc))
            raise
        self._notify(self.summary)
        return code

    def _ended_early(self, exc: JobError | LockedError | LocalFailure) -> dict[str, Any]:
        """The summary of a run that ended before its own (a bad or edited manifest, a lock held
        elsewhere, a full disk), made once: the metrics and [notify] both tell how it ended."""
        if not self.summary:
            code = EXIT_USAGE if isinstance(exc, JobError) else EXIT_LOCKED if isinstance(exc, LockedError) \
                else EXIT_LOCAL_FAILURE
            self.summary = {"job": self.job.name, "exit_code": code, "ended": time.time(), "error": str(exc)}
        return self.summary

    def _run(self) -> int:
        job, console = self.job, self.console
        ckpt = open_checkpoint(job.output)
        late: list[int] = []
        with contextlib.ExitStack() as ending, ckpt.locked(job.name):
            if ckpt.took_over is not None:
                console.say(f"note: took over the lock left by {ckpt.took_over}", event="took_over")
            started = time.time()
            with self._metrics(ckpt, started) as metrics:
                try:  # a full or read-only disk is one line and exit 4, before anything is sent
                    if self.stage is not None:
                        self.stage(ckpt)
                    ready = prepare(job, ckpt, self.options, console)
                    compact_loose(ckpt, ready.plan, ready.commits)
                    self._started(ready)
                    if ready.plan.total_rows == 0:
                        write_empty_dataset(job, ready.plan, make_labels(job))
                        console.say(f"{job.name}: the manifest {job.input.display} has no rows; nothing to send", event="empty")
                except OSError as exc:
                    raise local_failure(exc, "preparing the run") from None
                self.ready = ready
                counts, stopped = self.execute(ckpt, ready) if ready.todo else (Counts(), None)
                late = ending.enter_context(self.host.ending())  # until the lock is released
                code, self.summary = finish(job, ckpt, ready.plan, started, counts, stopped, console, again=self.host.again,
                                            retrying=self.options.retry_failed is not None)
                if metrics is not None:
                    metrics.finish(self.summary)
        if late:
            console.say("note: a stop signal came as the run was ending; it ended as it was", event="late_signal")
        if self.options.report or job.output.report:
            self._report()
        return code

    def _started(self, ready: Prepared) -> None:
        """The start line (JSON logs only: the text console stays as it was)."""
        todo = sum(s.rows for s in ready.todo)
        self.console.say(f"{self.job.name}: starting: {ready.plan.total_rows} rows, {len(ready.todo)} shards to send "
                         f"({todo} rows in them)", event="start", text=False, rows=ready.plan.total_rows,
                         shards_to_send=len(ready.todo), rows_in_them=todo, engine=self.job.run.engine,
                         mode=self.job.run.mode, pid=os.getpid())

    @contextlib.contextmanager
    def _metrics(self, ckpt: Checkpoint, started: float) -> Iterator[Any]:
        """[run] metrics_port / metrics_file while the run lasts; None (and no prometheus_client
        import) when the job asks for neither."""
        if self.job.run.metrics_port is None and self.job.run.metrics_file is None:
            yield None
            return
        from .metrics import COMPLETED_CODES, RunMetrics

        try:
            ended = [r.get("ended") for r in ckpt.history() if r.get("exit_code") in COMPLETED_CODES]
        except OSError:
            ended = []
        metrics = RunMetrics(self.job, self.live, say=self.console.say, started=started,
                             last_success=ended[-1] if ended else None)
        metrics.start()
        try:
            yield metrics
        except (JobError, LocalFailure) as exc:  # no summary of its own: else the textfile says "running" for good
            metrics.finish(self._ended_early(exc))
            raise
        finally:
            metrics.close()

    def live(self) -> Live:
        """The run as it is now, for the metrics (called from their thread): an executor running
        rows says more."""
        ready = self.ready
        return Live(Counts(), remaining=None if ready is None else ready.plan.total_rows - self._done_before(ready))

    @staticmethod
    def _done_before(ready: Prepared) -> int:
        """Rows of shards not to be sent this run: committed whole before it."""
        return ready.plan.total_rows - sum(s.rows for s in ready.todo)

    def _notify(self, summary: dict[str, Any]) -> None:
        if self.job.notify is not None and summary:
            from .notify import notify

            notify(self.job, summary, self.console)

    def _report(self) -> None:
        """The report of the output as it now is; a report that cannot be made never changes the
        run's exit code (the answers are safe either way): it is one line saying why."""
        from ..tools.report import write_report

        try:
            self.console.say(f"report: {write_report(self.job)}", event="report")
        except Exception as exc:  # noqa: BLE001 - a missing extra, a full disk, a bug: never the run's result
            self.console.say(f"note: no report ({exc if isinstance(exc, (JobError, OSError)) else repr(exc)})")

    def execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        """Send the rows of `ready.todo`; this run's counts and why it stopped early (None: it did not)."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Job]:
        """The job as it is sent: with `[serve]`, to the built-in endpoint started here (in its own
        process, dying with this one) and stopped when the run ends."""
        if self.job.serve is None:
            yield self.job
            return
        from ..tools.serve import start_subprocess

        async with start_subprocess(self.job.serve) as base_url:
            yield self.job.with_base_url(base_url)
