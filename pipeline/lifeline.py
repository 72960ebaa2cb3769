"""Children die with their parent: what a run starts ends when the run ends, even by `kill -9`.

    die_with_parent(parent_pid)     # first thing in a child process (the `[serve]` endpoint)
    ProcessPoolExecutor(..., initializer=start_worker, initargs=(os.getpid(), nice))

Two guards, as each alone has a gap:
- Linux's `prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel kills the child the moment its parent
  dies, even while the child is busy in C code. The child arms it after it has started, so a
  parent that died in between is caught by comparing `os.getppid()` with the pid the parent
  passed. It fires when the parent's *thread* that started the child ends, not only its process:
  the pipeline starts its children from the event loop's thread, and they end (the pool is shut
  down, the endpoint stopped) before that loop does.
- a daemon thread polling `os.getppid()` every WATCH_INTERVAL_S: where there is no prctl (macOS)
  it is the guard; a parent that dies leaves its child to init or to a subreaper, either way a
  pid other than the one passed.
A child whose parent is gone kills itself with SIGKILL, as the kernel would: nothing of it is
worth finishing (the parent that wanted its results is dead).

multiprocessing's resource tracker, which the image pool starts, needs neither: it exits once the
last write end of its pipe closes, and only the parent and the pool's workers hold one (checked
by tests/test_orphans.py). Ray's own processes (raylet, its workers) are Ray's to manage and are
out of scope.

This module imports only os, signal, sys, threading and time (ctypes when arming): a pool worker runs
`start_worker` before it imports anything else of the pipeline, so it lowers its priority first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent", "start_worker", "WATCH_INTERVAL_S"]

WATCH_INTERVAL_S = 0.5  # the watchdog's poll: a child outlives its parent by at most this much
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def start_worker(parent_pid: int, nice: int) -> None:
    """A pool worker's initializer: lower its CPU priority, then tie it to the parent."""
    os.nice(nice)
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """End this process (SIGKILL) when the process `parent_pid` ends; at once if it already has."""
    _arm_death_signal()
    if os.getppid() != parent_pid:  # died before the signal was armed: nobody would send it
        _die()
    threading.Thread(target=_watch, args=(parent_pid,), name="pipeline-lifeline", daemon=True).start()


def _arm_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc (e.g. a static build): the watchdog remains
        pass


def _watch(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != parent_pid:
            _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
