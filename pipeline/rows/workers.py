"""Workers: the pool that runs the blocking image work (reading, decoding, resizing, base64).

    workers = Workers(job.images)
    uri, size = await workers.run(value, local_image, files, value, cfg)   # fn(*args) in the pool
    workers.close()

Worker processes (`pool = "process"`, the default) or threads (`"thread"`), never the event loop,
so a batch of large images does not stall the requests in flight. Processes are spawned, start on
first use (a URL-only job starts none) and take their jobs by module path: a job is a top-level
function (images.py). They never import the caller's `__main__`: multiprocessing would run a
script that calls pipeline.run without an `if __name__ == "__main__":` guard once more in every
worker (a run inside each of them); workers need nothing from it, so it is hidden while one starts. Each new process first runs `lifeline.start_worker`, from a module that
imports nothing heavy, so it lowers its priority by WORKER_NICE before it imports the pipeline and
Pillow, and dies with the process that started it, even one killed with -9.

A worker that dies (killed, out of memory) breaks the whole pool: it is replaced and the job
tried once more; a second death fails that value with an InputError, not the run.
"""

from __future__ import annotations

import asyncio
import functools
import contextlib
import multiprocessing
import os
import sys
import types
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from ..config import ImagesConfig
from ..errors import InputError
from ..lifeline import start_worker
from .values import Value, show

__all__ = ["Workers", "WORKER_NICE", "all_in_order"]

WORKER_NICE = 10  # image worker processes yield the CPU to the process that runs the requests

T = TypeVar("T")


class Workers:
    """The image worker pool of one job; replaced whole when one of its processes dies."""

    def __init__(self, cfg: ImagesConfig) -> None:
        self.cfg = cfg
        self._pool = _make_pool(cfg)

    async def run(self, value: Value, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the pool; `value` names the row's value if the job cannot be done. A worker
        process that dies takes the pool with it: the pool is replaced and the call tried once
        more before the value fails."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, functools.partial(fn, *args))
            except BrokenExecutor:
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = _make_pool(self.cfg)
                if attempt == 2:
                    raise InputError(
                        f"the image worker process died while preparing this value (out of memory?): {show(value)}"
                    ) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop the pool without waiting; jobs not started are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _make_pool(cfg: ImagesConfig) -> Executor:
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.pool == "thread":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeline-media")
    # Worker processes share no GIL with the event loop and run at a lower CPU priority, so a
    # batch of large images cannot delay requests in flight (threads measured 100-300 ms stalls
    # on 2 cores where processes stayed far lower: bench/images.py). "spawn": never fork a process
    # that runs threads and an event loop. Processes start on first use: a URL-only job starts none.
    # The initializer lives in a module that imports nothing heavy, so a new worker lowers its
    # priority before it imports the pipeline (a second of CPU that must not compete with the loop),
    # and ties itself to this process: a run killed with -9 leaves no worker behind (lifeline.py).
    return _Processes(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_worker,
        initargs=(os.getpid(), WORKER_NICE),
    )


class _Processes(ProcessPoolExecutor):
    """A process pool whose new processes are not told the caller's `__main__`."""

    def _spawn_process(self) -> None:  # the one place the pool starts a process (CPython 3.9-3.14)
        with _main_hidden():
            super()._spawn_process()  # type: ignore[misc]  # private to CPython: typeshed leaves it out


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """While a process starts: a `__main__` with no file and no spec, so the new process has no
    main module to import (multiprocessing's spawn would run the caller's script in it)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


async def all_in_order(jobs: list[Awaitable[T]]) -> list[T]:
    """A row's parts worked on side by side; on failure the first one in the row's order is
    raised (a stable message)."""
    if len(jobs) == 1:  # the common row: no tasks to make
        return [await jobs[0]]
    results: list[T] = []
    for got in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(got, BaseException):
            raise got
        results.append(got)
    return results
