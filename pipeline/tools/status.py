"""Status: a job's progress read from its checkpoint alone; nothing is sent, locked or repaired
(a run may be going on: a folder's torn tail is left for the run to cut, a bucket's lease untouched)."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from ..config import Job
from ..config.urls import display
from ..errors import ErrorKind
from ..io.checkpoint import Checkpoint, dataset_state, open_checkpoint
from ..io.journal import latest_per_id
from ..io.ledger import TERMINAL

__all__ = ["job_status", "render", "token_detail", "tokens_line"]

_IDS = pa.schema([("id", pa.string())])


def job_status(job: Job) -> dict[str, Any]:
    ckpt = open_checkpoint(job.output)
    plan = ckpt.load_plan()
    if plan is None:
        return {"job": job.name, "started": False, "checkpoint": str(ckpt)}
    commits = ckpt.peek_commits()
    state = dataset_state(plan, commits)
    # Answers journaled but not yet in a part file (a killed run): count them as done-uncommitted.
    journaled = 0
    for shard in plan.shards:
        rec = commits.get(shard.index)
        if rec is None or rec.rows < shard.rows:
            answered = latest_per_id(ckpt.journal_lines(shard.index, _IDS)).num_rows
            journaled += max(0, answered - (rec.rows if rec else 0))
    return {
        "job": job.name,
        "started": True,
        "checkpoint": str(ckpt),
        "resume_bound": ckpt.bound,
        "output": display(job.output.path),
        **state,
        "journaled_uncommitted": journaled,
        "last_run": ckpt.last_summary(),
        "batches": [{"name": b.name, "batch_id": b.batch_id, "status": b.status or ("created" if b.batch_id else "planned"),
                     "rows": len(b.rows), "counts": b.counts, "collected": b.collected}
                    for b in ckpt.ledger().batches()],
    }


def render(report: dict[str, Any]) -> str:
    if not report["started"]:
        return f"{report['job']}: not started (no checkpoint at {report['checkpoint']})"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(report["failed_by_kind"].items())) or "none"
    lines = [
        f"{report['job']}: {report['ok']} ok, {report['failed']} failed ({kinds}), {report['pending']} pending of {report['rows']} rows",
        tokens_line(report["tokens"]),
    ]
    lines += _failed_kinds(report["failed_by_kind"])
    if report.get("spend"):
        lines.append(f"spent: {report['spend']:.4f} (from [pricing])")
    if report["journaled_uncommitted"]:
        lines.append(f"answers kept but not yet written to the output: {report['journaled_uncommitted']} (the next run writes them)")
    if report.get("resume_bound"):
        lines.append(f"checkpoint: {report['checkpoint']}; after a kill -9, a run sends again {report['resume_bound']}")
    last = report.get("last_run")
    if last:
        fmt = "%Y-%m-%d %H:%M:%S"
        lines.append(
            f"last run: {time.strftime(fmt, time.localtime(last['started']))} to {time.strftime(fmt, time.localtime(last['ended']))}, "
            f"exit code {last['exit_code']}"
        )
        if last.get("stopped"):
            lines.append(f"last run stopped: {last['stopped']['message']}")
        if (last.get("this_run") or {}).get("cached"):
            lines.append(f"last run: {last['this_run']['cached']} rows answered from the cache (no request, no cost)")
        for name, used in ((last.get("this_run") or {}).get("limits") or {}).items():
            lines.append(f"last run's {name} (auto): " + ", ".join(f"{k} {v}" for k, v in used.items() if k != "auto"))
    for b in report.get("batches") or []:
        counts = ", ".join(f"{k} {v}" for k, v in b["counts"].items()) or "no counts yet"
        state = "collected" if b["collected"] else "running" if b["status"] not in TERMINAL \
            else "ended, to collect"
        lines.append(f"batch {b['name']} ({b['batch_id'] or 'not created yet'}): {b['status']}, {b['rows']} requests "
                     f"({counts}); {state} (as last seen by a run)")
    lines.append(f"output: {report['output']}")
    return "\n".join(lines)


def token_detail(tokens: dict[str, Any], key: str) -> str:
    """One usage detail's total: `30 reasoning`, or `reasoning not reported` when no answer said
    (a checkpoint written before the details existed neither)."""
    # "cached" alone would read as the request cache's rows: these are the provider's prompt cache
    name = {"cached_tokens": "prompt-cached"}.get(key, key.removesuffix("_tokens"))
    value = tokens.get(key)
    return f"{name} not reported" if value is None else f"{value} {name}"


def tokens_line(tokens: dict[str, Any]) -> str:
    """The token totals with the usage details inside the count they belong to (cached and image
    tokens are prompt tokens, reasoning tokens completion tokens); images and audio only when reported."""
    of_prompt = [token_detail(tokens, "cached_tokens")]
    of_prompt += [token_detail(tokens, k) for k in ("image_tokens", "audio_tokens") if tokens.get(k) is not None]
    return (f"tokens: {tokens['prompt_tokens']} prompt ({', '.join(of_prompt)}), {tokens['completion_tokens']} completion "
            f"({token_detail(tokens, 'reasoning_tokens')}), {tokens['total_tokens']} total")


def _failed_kinds(by_kind: dict[str, int]) -> list[str]:
    """What each kind of failure means, from the ErrorKind enum, in its order."""
    known = {k.value: k for k in ErrorKind}
    lines = []
    for name in sorted(by_kind, key=lambda n: list(known).index(n) if n in known else len(known)):
        kind = known.get(name)
        lines.append(f"  {name} {by_kind[name]}: {kind.doc if kind else 'a kind this version does not know'}")
    if lines:
        lines.append("  (send them again with --retry-failed, or --retry-failed=KIND,...)")
    return lines
