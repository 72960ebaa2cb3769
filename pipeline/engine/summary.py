"""The run's end: its exit code, `last_run.json` and the summary lines, from the commit records.

    code, summary = finish(job, ckpt, plan, started, counts, stopped, console)   # summary: last_run.json

Counts over the output come from the commit records alone (no answer is read), so the printed
summary, `pipeline status` and `last_run.json` always agree; a run never exits 0 or 1 while a row
has no result.

Exit codes: 0 every row ok; 1 finished with failed rows; 2 bad job, manifest or usage (before
anything is sent); 3 stopped by the provider (quota, key refused, endpoint down, budget); 4 stopped
by a local failure (disk full, output unwritable, an internal error); 75 the job is already
running; 5 batch mode without waiting: batches still running at the provider (run again to
collect); 130 / 143 stopped by Ctrl-C / SIGTERM. 3, 4, 5, 130 and 143 are resumable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Union

from ..config import Job
from ..config.urls import display
from ..errors import JobError, LocalFailure, StopJob, local_failure
from ..io.checkpoint import Checkpoint, dataset_state
from ..io.manifest import Plan
from ..tools.status import token_detail
from .console import Console
from .counts import Counts
from .process import (
    EXIT_FAILED_ROWS,
    EXIT_LOCAL_FAILURE,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_SIGNAL,
    EXIT_STOPPED,
    EXIT_USAGE,
    EXIT_WAITING,
)

__all__ = ["Counts", "Stopped", "Waiting", "EXIT_WAITING", "finish", "exit_code", "EXIT_OK", "EXIT_FAILED_ROWS", "EXIT_USAGE",
           "EXIT_STOPPED", "EXIT_LOCAL_FAILURE", "EXIT_LOCKED", "EXIT_SIGNAL"]

@dataclass(frozen=True)
class Waiting:
    """Batch mode without waiting: batches submitted and still running at the provider (exit 5)."""

    batches: int
    rows: int

    def __str__(self) -> str:
        return (f"{self.batches} batch(es) with {self.rows} rows still running at the provider; "
                f"run again later to collect them (exit 5)")


Stopped = Union[StopJob, LocalFailure, Waiting, int, None]  # why a run ended early: the provider, this machine, a signal


def exit_code(stopped: Stopped, state: dict[str, Any]) -> int:
    if isinstance(stopped, LocalFailure):
        return EXIT_LOCAL_FAILURE
    if isinstance(stopped, Waiting):
        return EXIT_WAITING
    if isinstance(stopped, int):
        return EXIT_SIGNAL[stopped]
    if stopped is not None:
        return EXIT_STOPPED
    return EXIT_FAILED_ROWS if state["failed"] else EXIT_OK


def cli_again(job: Job, retry_failed: bool = False) -> str:
    return f"pipeline run {job.source}" + (" --retry-failed" if retry_failed else "")


def finish(job: Job, ckpt: Checkpoint, plan: Plan, started: float, counts: Counts, stopped: Stopped,
           console: Console, again: Callable[[Job, bool], str] = cli_again, *, retrying: bool = False
           ) -> tuple[int, dict[str, Any]]:
    """Write last_run.json, print the summary; the exit code and the summary. `again` says how
    the run is run again (a command, or a Python call); `retrying`: a --retry-failed run, whose
    rows all have a result (the failed ones) while it still sends them again."""
    try:
        state = dataset_state(plan, ckpt.commits())
    except (OSError, JobError) as exc:
        stopped = local_failure(exc, "reading the commit records")
        state = dataset_state(plan, {})
    if stopped is None and state["pending"]:  # never 0 (or 1) while a row has no result
        stopped = LocalFailure(f"{state['pending']} rows have no result although the run ended; run again to send them")
    if isinstance(stopped, int) and not state["pending"] and not retrying:
        # Ctrl-C or SIGTERM once every row had its result (the last commit under way): the job is
        # done; 130/143 and "to continue" would have a scheduler run it again for nothing. Not so
        # in a --retry-failed run: its rows had results before it began (its batch may be out)
        console.say("note: the stop signal came after every row had its result; the run is complete", event="late_signal")
        stopped = None
    code = exit_code(stopped, state)
    ended = time.time()
    summary = _summary(job, state, counts, started, ended, code)
    if isinstance(stopped, (StopJob, LocalFailure)):
        summary["stopped"] = {"kind": stopped.kind, "message": console.redactor.scrub(str(stopped)),
                              "local": isinstance(stopped, LocalFailure)}
    try:
        ckpt.write_summary(summary)  # last_run.json, and a line of runs.jsonl (the history a report shows)
    except (OSError, JobError) as exc:  # a full disk, a bucket that refuses the write
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        console.say(f"error: could not write {ckpt.summary_where} ({reason}); the summary is only printed below")
        code = EXIT_LOCAL_FAILURE if code in (EXIT_OK, EXIT_FAILED_ROWS) else code
    _say_summary(job, state, counts, ended - started, stopped, code, console, again, summary)
    return code, summary


def _summary(job: Job, state: dict[str, Any], counts: Counts, started: float, ended: float, code: int) -> dict[str, Any]:
    this_run: dict[str, Any] = {"requests_sent": counts.sent, "ok": counts.ok, "failed": counts.failed,
                                "failed_by_kind": dict(counts.by_kind), "rate_limited": counts.rate_limited,
                                "paused_s": round(counts.paused_s, 3)}
    if counts.limits:
        this_run["limits"] = counts.limits
    if job.run.cache is not None:
        this_run["cached"] = counts.cached
    summary = {"job": job.name, "started": started, "ended": ended, "duration_s": round(ended - started, 3),
               "exit_code": code, "output": display(job.output.path), "this_run": this_run, **state}
    if job.pricing is not None:
        this_run["spent"] = round(counts.spent, 6)
        summary["budget"] = job.pricing.budget
    return summary


def _limit_text(name: str, used: dict[str, Any]) -> str:
    if name == "max_concurrency":
        return f"max_concurrency auto: {used['last']} in flight at the end ({used['low']} to {used['high']} during the run)"
    paced = used.get("paced_at")
    return f"{name} auto: paced at {paced:g}/min" if paced else f"{name} auto: no limit announced"


def _say_summary(job: Job, state: dict[str, Any], counts: Counts, seconds: float, stopped: Stopped, code: int,
                 console: Console, again: Callable[[Job, bool], str], summary: dict[str, Any]) -> None:
    say = console.say
    failed = ", ".join(f"{k} {n}" for k, n in sorted(state["failed_by_kind"].items())) or "none"
    say(f"{job.name}: {state['ok']} ok, {state['failed']} failed ({failed}), {state['pending']} pending of {state['rows']} rows; "
        f"{counts.sent} requests this run in {seconds:.1f}s; {state['tokens']['total_tokens']} tokens in all "
        f"({token_detail(state['tokens'], 'reasoning_tokens')}, {token_detail(state['tokens'], 'cached_tokens')}); "
        f"results in {display(job.output.path)}", event="summary", level="error" if code >= 2 else "info", summary=summary)
    if counts.cached:
        say(f"{counts.cached} answered from the cache (no request, no cost)", event="cached")
    if counts.limits:
        say("limits found: " + "; ".join(_limit_text(name, used) for name, used in counts.limits.items()), event="limits_found")
    if job.pricing is not None:
        limit = f" of a budget of {job.pricing.budget:g}" if job.pricing.budget is not None else ""
        say(f"spent {state['spend']:.4f}{limit} in all ({counts.spent:.4f} this run)", event="spent")
    if isinstance(stopped, StopJob):
        say(f"stopped: {stopped}", event="stopped", kind=stopped.kind)
    elif isinstance(stopped, LocalFailure):
        say(f"stopped by a local failure: {stopped}", event="stopped", level="error", kind=stopped.kind)
    elif isinstance(stopped, Waiting):
        say(f"waiting: {stopped}", event="waiting")
    if code in (EXIT_STOPPED, EXIT_LOCAL_FAILURE, EXIT_WAITING, *EXIT_SIGNAL.values()) or state["pending"]:
        say(f"to continue: {again(job, False)}", event="hint")
    elif state["failed"]:
        say(f"to send the failed rows again: {again(job, True)}", event="hint")
