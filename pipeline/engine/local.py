"""The local executor: the job's shards in this process, one supervised worker pool.

    code = LocalExecutor(job, RunOptions()).run()
"""

from __future__ import annotations

import asyncio
import contextlib

from ..errors import JobError, local_failure
from ..io.checkpoint import Checkpoint
from ..net.limiter import Limiter
from .executor import Executor
from .prepare import Prepared
from .progress import PROGRESS_EVERY_S, Progress
from .shard import ShardEngine
from .summary import Counts, Stopped

__all__ = ["LocalExecutor"]


class LocalExecutor(Executor):
    def execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        return self.host.run_loop(self._execute(ckpt, ready))

    async def _execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        engine: ShardEngine | None = None
        try:
            async with self.serving() as job:
                limits = job.limits
                limiter = Limiter(limits.requests_per_minute, limits.tokens_per_minute, burst=limits.burst,
                                  max_pause_s=limits.max_retry_after_s)
                engine = ShardEngine(job, ckpt, ready.plan, limiter=limiter, console=self.console, options=self.options,
                                     committed_rows={i: c.rows for i, c in ready.commits.items()}, expire=self.host.expire)
                with self.host.signals(asyncio.get_running_loop(), engine.interrupt, engine.sync_journal):
                    stopped = await self._with_progress(engine, ready)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.host.cancelled() or engine is None or task is None:
                raise
            task.uncancel()  # the host ended the run at once (a second Ctrl-C, a stuck stop): still a summary
            stopped = engine.stopped
        except JobError:
            raise  # before anything was sent (a bad [serve] table, a prompt placeholder): exit 2
        except Exception as exc:  # noqa: BLE001 - the supervisor itself failed: still a truthful end
            stopped = local_failure(exc, "running the job")
            self.console.say(f"error: {stopped}")
        return (engine.counts if engine is not None else Counts()), stopped

    async def _with_progress(self, engine: ShardEngine, ready: Prepared) -> Stopped:
        with Progress(self.options.progress, total=ready.plan.total_rows, auto=self.host.auto_progress) as bar:
            def show() -> None:
                c = engine.counts
                spent = engine.spend.spent if self.job.pricing is not None else None
                bar.show(engine.done_before + c.ok + c.failed, ok=c.ok, failed=c.failed, spent=spent)

            async def tick() -> None:
                while True:
                    await asyncio.sleep(PROGRESS_EVERY_S)
                    show()

            ticker = asyncio.create_task(tick())
            try:
                return await engine.run(ready.todo)
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                show()
