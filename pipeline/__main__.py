import contextlib
import os
import signal
import sys

try:
    from .cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C before the run's own handler is installed (start-up, planning)
    print("interrupted before sending began; nothing was lost", file=sys.stderr)
    code = 130
# The command is over and its exit code known: a stop signal now could only replace that code
# (a finished run's 0 by 143) while the process ends.
for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, signal.SIG_IGN)
# Everything the run wrote is already fsynced; skip interpreter teardown, where Arrow's thread
# pool has been seen to abort (SIGABRT, "terminate called without an active exception") and
# turn a clean exit code into -6.
# multiprocessing's own exit hook still runs, so the image workers' semaphores are released. It
# joins every child without a timeout, and run before the pool's manager thread has told its
# workers to stop (the queue's feeder closed first) that join never ended: twice in seven loaded
# test runs a finished run hung here. The run is over, so what is left of its workers is ended first.
with contextlib.suppress(Exception):
    import multiprocessing
    from multiprocessing import util

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join(5)
    util._exit_function()  # type: ignore[attr-defined]  # the exit hook atexit runs; typeshed leaves private names out
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
