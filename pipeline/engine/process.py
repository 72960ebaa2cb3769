"""The run's own process: its memory allocators, its event loop, its signals and its last resort.

    tune_memory()                          # before any thread starts
    run_loop = event_loop_runner()         # asyncio.run, on uvloop where installed
    with on_signals(loop, first=stop):     # Ctrl-C/SIGTERM: `first(sig)`; a second one exits at once
    deadline = Deadline(seconds, code)     # a stop that does not end by itself is ended

Every executor (local, Ray driver) and a Ray shard task use these, so a run behaves the same under
a signal wherever it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
from typing import Any, Callable, Coroutine, Iterator, Protocol, TypeVar

__all__ = ["tune_memory", "give_back_memory", "event_loop_runner", "warm_imports", "on_signals", "held_signals", "Deadline",
           "exit_process",
           "EXIT_OK", "EXIT_FAILED_ROWS", "EXIT_USAGE", "EXIT_STOPPED", "EXIT_LOCAL_FAILURE", "EXIT_LOCKED", "EXIT_SIGNAL", "EXIT_WAITING"]

# The process's exit codes (pipeline.engine.summary says when each is given).
EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_STOPPED, EXIT_LOCAL_FAILURE, EXIT_LOCKED = 0, 1, 2, 3, 4, 75
EXIT_WAITING = 5  # batch mode, not waiting: batches still running at the provider
EXIT_SIGNAL: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}  # keyed by the number a handler gets


def tune_memory() -> None:
    """Each shard commit allocates tens of MB for a moment; a long run's RSS must not keep them
    (bench: million). Arrow on the system allocator: jemalloc, its default pool, kept them (~40
    MB). glibc's malloc kept them too, with an arena per thread (reads and commits run in threads)
    and a mmap threshold that grows after large frees: two arenas, large buffers always mmapped
    (returned on free), and `give_back_memory` after each commit. Must run before the threads start."""
    import pyarrow as pa  # here: `pipeline serve` uses this module's loop and signals without Arrow

    pa.set_memory_pool(pa.system_memory_pool())
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed at 1 MB


@functools.cache  # loaded once, not at every shard commit
def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def give_back_memory() -> None:
    """Give the pages a shard commit freed back to the system."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


T = TypeVar("T")


class LoopRunner(Protocol):
    """asyncio.run's shape: a coroutine run to its end on a new loop, its result returned."""

    def __call__(self, main: Coroutine[Any, Any, T], /) -> T: ...


def event_loop_runner() -> LoopRunner:
    """uvloop where installed: the benchmarks show it cuts the event loop's cost per request.

    Set as the event loop policy, and only over the default one: a policy the host process chose
    (an embedding application, the image benchmark's stall monitor) is respected.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run


def warm_imports() -> None:
    """Imports that hold the GIL for 0.1-0.5 s happen now, before the first request, not in the
    first commit's thread while requests are out: there they stalled the loop, and the requests
    due meanwhile left together (429s from an endpoint counting per half second, tests/test_ray.py).
    Shard commits need pyarrow.compute; pyarrow's first pa.array of Python objects imports pandas
    where it is installed and not marked absent (cli.py does that for `pipeline run`; a Ray worker
    process, which may serve other tasks, keeps it)."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401

    pa.array([0])


@contextlib.contextmanager
def on_signals(loop: asyncio.AbstractEventLoop, first: Callable[[int], None],
               at_once: Callable[[int], None] | None = None) -> Iterator[None]:
    """Ctrl-C / SIGTERM call `first(sig)` (a graceful stop); a second one calls `at_once(sig)`
    (make what can be durable so) and exits the process with 130 / 143 at once."""
    seen: list[int] = []

    def handler(sig: int) -> None:
        if seen:
            if at_once is not None:
                at_once(sig)
            os._exit(EXIT_SIGNAL[sig])
        seen.append(sig)
        first(sig)

    for sig in EXIT_SIGNAL:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in EXIT_SIGNAL:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def held_signals() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM noted, not acted on, while a run that has sent its last request ends:
    its summary written, its lock released. A stop there could only spoil the end (a lease left
    held, a finished job's exit code 143); the signals that came are in the list."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came  # signal handlers are the main thread's to set
        return
    before = {sig: signal.signal(sig, lambda sig, _frame: came.append(sig)) for sig in EXIT_SIGNAL}
    try:
        yield came
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def exit_process(code: int) -> None:
    """What a deadline does in a process the run owns: end it (no teardown that could hang)."""
    os._exit(code)


class Deadline:
    """Calls `expire(code)` after `seconds` unless cancelled (by default: ends the process with
    `code`): a thread, not the loop (a blocked loop is one of the things it guards against).
    Everything journaled is on disk or in the OS's hands already when it fires."""

    def __init__(self, seconds: float, code: int, say: Callable[[str], None],
                 expire: Callable[[int], None] = exit_process) -> None:
        self._timer = threading.Timer(seconds, self._fire, args=(seconds, code, say, expire))
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _fire(seconds: float, code: int, say: Callable[[str], None], expire: Callable[[int], None]) -> None:
        say(f"error: the run did not end within {seconds:g}s of the stop; ending it now (everything journaled is kept)")
        expire(code)

    def cancel(self) -> None:
        self._timer.cancel()
