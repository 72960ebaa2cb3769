import contextlib
import os
import sys

try:
    from .cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C before the run's own handler is installed (start-up, planning)
    print("interrupted before sending began; nothing was lost", file=sys.stderr)
    code = 130
# Everything the run wrote is already fsynced; skip interpreter teardown, where Arrow's thread
# pool has been seen to abort (SIGABRT, "terminate called without an active exception") and
# turn a clean exit code into -6.
# multiprocessing's own exit hook still runs, so the image workers' semaphores are released.
with contextlib.suppress(Exception):
    from multiprocessing import util

    util._exit_function()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
