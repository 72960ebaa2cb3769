"""A nightly captioning task for an orchestrator, written as a plain function so that it runs (and
is tested, tests/test_scheduling.py) without one. In Airflow:

    from datetime import timedelta
    from airflow.decorators import task
    from nightly_task import caption_nightly, RetryLater

    @task(retries=4, retry_delay=timedelta(minutes=30))
    def captions() -> dict:
        return caption_nightly("/srv/jobs/captions.toml")     # the summary goes to XCom

In Prefect: `@task(retries=4, retry_delay_seconds=1800)` over the same call; in Dagster an op.
The orchestrator's retries are what "resumable" means here: a run that stopped (the provider's
quota, a Ctrl-C, a full disk) continues where it stopped, buying nothing twice.

What each ending means to a scheduler (pipeline.run's exit codes, as `pipeline run` exits):
    0        every row ok                             -> success
    1        finished, some rows failed               -> transient kinds sent once more; success if
                                                         few are left, else JobFailed (no retry helps)
    3        stopped by the provider (quota, key,     -> RetryLater (the orchestrator retries later)
             endpoint down, budget)
    4        a local failure (disk full, ...)         -> RetryLater (after a fix, the next try goes on)
    5        batch mode: batches still running        -> success: the next run collects them
    130/143  stopped by a signal                      -> RetryLater
    75       already running (LockedError)            -> skipped: the running one does the work
    2        a bad job or manifest (JobError)         -> raised as is: no retry helps
"""

from __future__ import annotations

import os
from typing import Any

import pipeline
from pipeline.errors import LockedError

__all__ = ["caption_nightly", "RetryLater", "JobFailed", "TRANSIENT"]

TRANSIENT = ("timeout", "server", "connection", "rate_limit")  # worth one more try the same night


class RetryLater(RuntimeError):
    """The run stopped before its end; the orchestrator's retry continues it."""


class JobFailed(RuntimeError):
    """The run ended, but too many rows failed for kinds a retry does not fix."""


def caption_nightly(job: str | os.PathLike[str] | dict[str, Any], *, max_failed_share: float = 0.01) -> dict[str, Any]:
    """Run the job to its end; returns its summary (last_run.json), raises what the scheduler acts on."""
    try:
        result = pipeline.run(job, progress=False)
    except LockedError as exc:
        return {"skipped": str(exc)}
    if result.exit_code == 1 and any(result.failed_by_kind.get(kind) for kind in TRANSIENT):
        result = pipeline.run(job, retry_failed=list(TRANSIENT), progress=False)
    if result.exit_code in (0, 5):
        return result.summary
    if result.exit_code == 1:
        share = result.failed / max(1, result.rows)
        if share <= max_failed_share:
            return result.summary
        raise JobFailed(f"{result.failed} of {result.rows} rows failed ({result.failed_by_kind}); "
                        f"see {result.output} and `pipeline report`")
    stopped = (result.summary.get("stopped") or {}).get("message", f"exit {result.exit_code}")
    raise RetryLater(f"stopped with exit {result.exit_code}: {stopped}; {result.pending} rows pending")
