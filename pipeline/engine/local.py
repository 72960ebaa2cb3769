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
from .counts import Counts, Live
from .summary import Stopped

__all__ = ["LocalExecutor"]


PAUSE_NOTE_EVERY_S = 5.0  # JSON logs: at most one "paused" line this often


class LocalExecutor(Executor):
    engine: ShardEngine | None = None
    limiter: Limiter | None = None  # the engine's Pacer, kept as what it is: its pace is shown live

    def live(self) -> Live:
        engine, ready, limiter = self.engine, self.ready, self.limiter
        if engine is None or ready is None or limiter is None:
            return super().live()
        c = Counts.merged([engine.counts.to_dict()])  # a copy: the loop's thread goes on counting
        ctl = engine.gate.controller
        tokens = limiter.tokens.per_minute if limiter.tokens is not None else 0.0
        auto = {"requests_per_minute": limiter.auto_requests, "tokens_per_minute": limiter.auto_tokens,
                "max_concurrency": ctl is not None}
        return Live(c, in_flight=engine.gate.in_flight, paused_s=limiter.paused_s,
                    remaining=ready.plan.total_rows - self._done(engine, ready),
                    requests_per_minute=limiter.rpm * limiter.factor, tokens_per_minute=tokens,
                    concurrency=ctl.allowed if ctl is not None else engine.limits.workers,
                    auto=frozenset(k for k, on in auto.items() if on))

    def _done(self, engine: ShardEngine, ready: Prepared) -> int:
        c = engine.counts
        return self._done_before(ready) + engine.done_before + c.ok + c.failed

    def execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        return self.host.run_loop(self._execute(ckpt, ready))

    async def _execute(self, ckpt: Checkpoint, ready: Prepared) -> tuple[Counts, Stopped]:
        engine: ShardEngine | None = None
        try:
            async with self.serving() as job:
                limits = job.limits
                limiter = self.limiter = Limiter(limits.requests_per_minute, limits.tokens_per_minute, burst=limits.burst,
                                                 max_pause_s=limits.max_retry_after_s)
                engine = self.engine = ShardEngine(job, ckpt, ready.plan, limiter=limiter, console=self.console, options=self.options,
                                     committed_rows={i: c.rows for i, c in ready.commits.items()}, expire=self.host.expire)
                with self.host.signals(asyncio.get_running_loop(), engine.interrupt, engine.sync_journal):
                    stopped = await self._with_progress(engine, limiter, ready)
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

    async def _with_progress(self, engine: ShardEngine, limiter: Limiter, ready: Prepared) -> Stopped:
        with Progress(self.progress, total=ready.plan.total_rows, auto=self.host.auto_progress) as bar:
            def show() -> None:
                c = engine.counts
                spent = engine.spend.spent if self.job.pricing is not None else None
                bar.show(self._done(engine, ready), ok=c.ok, failed=c.failed, spent=spent)

            async def tick() -> None:
                noted = -PAUSE_NOTE_EVERY_S
                while True:
                    await asyncio.sleep(PROGRESS_EVERY_S)
                    show()
                    noted = self._note_pause(engine, limiter, noted)

            ticker = asyncio.create_task(tick())
            try:
                return await engine.run(ready.todo)
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                show()

    def _note_pause(self, engine: ShardEngine, limiter: Limiter, noted: float) -> float:
        """JSON logs: a pause of the whole pool for the provider's 429s is a line (at most one per
        PAUSE_NOTE_EVERY_S); returns when the last line was said."""
        now = limiter.clock()
        if limiter.paused_until <= now or now - noted < PAUSE_NOTE_EVERY_S:
            return noted
        wait = limiter.paused_until - now
        self.console.say(f"paused: every request waits {wait:.1f}s for the provider's rate limit "
                         f"({engine.counts.rate_limited} x 429 so far)", event="paused", level="warning", text=False,
                         seconds=round(wait, 3), rate_limited=engine.counts.rate_limited)
        return now
