"""Who owns the process a run is in: the command line (the run is the process) or a caller (the
run is a guest in a notebook, a script, a thread or an async app).

    host = ProcessHost()                  # `pipeline run`: signals, allocators, a stuck stop exits
    host = CallerHost()                   # pipeline.run / arun: the run's own thread and event loop
    host.interrupt(signal.SIGINT)         # CallerHost, from any thread: a Ctrl-C for the run

An executor asks its host for five things and does not care which it has: `tune()` (the
process's allocators), `run_loop(coro)` (an event loop to run on), `signals(loop, first,
at_once)` (how a Ctrl-C reaches the run), `expire(code)` (what a stop that does not end by itself
comes to) and the hints the summary prints.

A caller's process is not the run's: CallerHost leaves its allocators and signal handlers alone
(the API installs a SIGINT handler only where the caller owns the main thread, and only while
the run lasts), never ends the process (a stuck stop cancels the run's task instead), and runs
on a loop of its own, so a notebook's or an app's running loop is neither blocked nor needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from typing import Any, Callable, ContextManager, Coroutine, Iterator, TypeVar

from ..config import Job
from .console import Console
from .process import event_loop_runner, exit_process, held_signals, on_signals, tune_memory
from .summary import cli_again

__all__ = ["Host", "ProcessHost", "CallerHost"]

Handler = Callable[[int], None]
T = TypeVar("T")


class Host:
    """The command line's way (ProcessHost is this class under its own name)."""

    auto_progress = False  # a plain tqdm bar on a terminal; tqdm.auto picks a notebook widget

    def tune(self) -> None:
        tune_memory()

    def capture(self, console: Console) -> None:
        """JSON logs: what else reaches stderr (warnings, library logs, a crash) as JSON lines too."""
        console.capture_process_output()

    def run_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return event_loop_runner()(coro)

    def signals(self, loop: asyncio.AbstractEventLoop, first: Handler, at_once: Handler | None) -> ContextManager[None]:
        return on_signals(loop, first, at_once)

    def ending(self) -> ContextManager[list[int]]:
        """While a run that sent its last request ends (summary, lock released): the stop signals
        that came, noted instead of acted on."""
        return held_signals()

    def expire(self, code: int) -> None:
        exit_process(code)

    def cancelled(self) -> bool:
        """Whether the run's task was cancelled by this host (a second interrupt, a deadline)."""
        return False

    def again(self, job: Job, retry_failed: bool = False) -> str:
        """How the person running the job runs it again (printed in the summary)."""
        return cli_again(job, retry_failed)


ProcessHost = Host


class CallerHost(Host):
    """A run inside someone else's process: its own thread and event loop, Ctrl-C by `interrupt()`."""

    auto_progress = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._handlers: tuple[asyncio.AbstractEventLoop, Handler, Handler | None] | None = None
        self._interrupts: list[int] = []
        self._cancelled = False
        self.expired_at: float | None = None  # when a stop's deadline cancelled the run (time.monotonic)

    def tune(self) -> None:
        pass  # the caller's allocators are the caller's: no arena limits, no Arrow pool swap

    def capture(self, console: Console) -> None:
        pass  # the caller's warnings, loggers and hooks are the caller's

    def run_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """On a new loop in this (the run's) thread; the process-wide loop policy is left alone."""
        with asyncio.Runner(loop_factory=_new_loop()) as runner:
            return runner.run(self._owned(coro))

    async def _owned(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            return await coro
        finally:
            with self._lock:
                self._loop = self._task = None

    @contextlib.contextmanager
    def signals(self, loop: asyncio.AbstractEventLoop, first: Handler, at_once: Handler | None) -> Iterator[None]:
        with self._lock:
            self._handlers = (loop, first, at_once)
            early = list(self._interrupts)
        if early:  # a Ctrl-C while the run was planning: it stops as soon as it can
            loop.call_soon(first, early[0])
        try:
            yield
        finally:
            with self._lock:
                self._handlers = None

    def ending(self) -> ContextManager[list[int]]:
        return contextlib.nullcontext([])  # the caller's process signals are the caller's

    def interrupt(self, sig: int = signal.SIGINT) -> None:
        """A Ctrl-C for the run, from any thread: the first finishes what is in flight and commits;
        a second makes the journal durable and cancels the run at once. Either way the run ends
        with its summary and the exit code of the signal."""
        with self._lock:
            self._interrupts.append(sig)
            handlers, n = self._handlers, len(self._interrupts)
        if handlers is None:
            return  # not sending yet: `signals()` delivers it when sending starts
        loop, first, at_once = handlers
        if n == 1:
            loop.call_soon_threadsafe(first, sig)
            return
        if at_once is not None:
            loop.call_soon_threadsafe(at_once, sig)
        self._cancel()

    @property
    def interrupted(self) -> bool:
        return bool(self._interrupts)

    def expire(self, code: int) -> None:
        self.expired_at = time.monotonic()
        self._cancel()

    def cancelled(self) -> bool:
        return self._cancelled

    def _cancel(self) -> None:
        with self._lock:
            loop, task = self._loop, self._task
            self._cancelled = True
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the run is over
                loop.call_soon_threadsafe(task.cancel)

    def again(self, job: Job, retry_failed: bool = False) -> str:
        return "the same pipeline.run(...) call" + (" with retry_failed=True" if retry_failed else "")


def _new_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop
