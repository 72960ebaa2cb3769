"""The command line: `pipeline run JOB`, `pipeline status JOB`, `pipeline report JOB`, `pipeline cache`,
`pipeline serve`.

Exit codes: 0 every row ok; 1 finished with failed rows; 2 bad job file or usage;
3 stopped by the provider (quota, key refused, endpoint down, budget), resumable; 5 batch mode
with --no-wait: batches still running at the provider, run again to collect; 4 stopped by a
local failure (disk full, output unwritable, an internal error in shared machinery), resumable
once the cause is fixed; 75 the job is already running; 130/143 stopped by Ctrl-C/SIGTERM, resumable.
`pipeline run JOB --dry-run` sends nothing: 0 the job is ready, 1 rows would fail or the job has a
problem (see pipeline/tools/dryrun.py), 2 the job file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import JobError, LocalFailure, LockedError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="Bulk vision-LLM jobs: manifest in, Parquet out.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job (resumes where the last run stopped)")
    r.add_argument("job", type=Path, help="the job file (TOML)")
    r.add_argument("--retry-failed", nargs="?", const="", default=None, metavar="KINDS",
                   help="send again the rows whose status is error (optionally only these kinds, comma-separated)")
    r.add_argument("--restart", action="store_true", help="forget the checkpoint and start over")
    r.add_argument("--no-cache", action="store_true",
                   help="[run] cache: send every row instead of reusing cached answers (fresh answers are still cached)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    r.add_argument("--report", action="store_true", help="write the report at the end (see `pipeline report`)")
    r.add_argument("--no-wait", dest="wait", action="store_false", default=None,
                   help='[run] mode "batch": submit what is new, collect what ended, exit (5 while batches run)')
    r.add_argument("--cancel-batches", action="store_true", help='[run] mode "batch": cancel the running batches, collect what they did')
    r.add_argument("--dry-run", action="store_true",
                   help="send nothing: check the job and every row, estimate tokens, cost and time (exit 0 ready, 1 not)")
    r.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="json: every stderr line one JSON object, no progress bar (default: $PIPELINE_LOG_FORMAT, else text)")

    g = sub.add_parser("report", help="write a self-contained HTML page of the output: gallery, charts, runs")
    g.add_argument("job", type=Path, help="the job file (TOML)")
    g.add_argument("--out", type=Path, default=None, help="where to write it (default: <output>/_report.html)")
    g.add_argument("--max-mb", type=float, default=None, help="the page's size cap; beyond it, a stated sample of rows")

    c = sub.add_parser("compare", help="one HTML page of several jobs' outputs side by side (one manifest, several models)")
    c.add_argument("jobs", type=Path, nargs="+", metavar="JOB", help="two job files or more (TOML)")
    c.add_argument("--out", type=Path, default=None, help="where to write it (default: ./compare-<names>.html)")
    c.add_argument("--max-mb", type=float, default=None, help="the page's size cap; beyond it, a stated sample of rows")

    e = sub.add_parser("export-batch", help="write the rows still to do as a Batch JSONL file, send nothing")
    e.add_argument("job", type=Path, help="the job file (TOML)")
    e.add_argument("file", type=Path, help="where to write the Batch JSONL")
    i = sub.add_parser("import-batch", help="merge a batch output (or error) JSONL file into the dataset")
    i.add_argument("job", type=Path, help="the job file (TOML)")
    i.add_argument("file", type=Path, help="a batch's output (or error) JSONL file")

    s = sub.add_parser("status", help="what a job has done, from its checkpoint (sends nothing)")
    s.add_argument("job", type=Path, help="the job file (TOML)")
    s.add_argument("--json", action="store_true", help="print JSON")

    c = sub.add_parser("cache", help="the request cache: what it holds, and space given back (safe while runs use it)")
    c.add_argument("folder", nargs="?", type=Path, default=None,
                   help="the cache folder, or a job file whose [run] cache it is (default: the user's, as cache = true)")
    c.add_argument("action", choices=("stats", "prune", "clear"),
                   help="stats: what it holds; prune: remove old or least recently used entries; clear: remove all")
    c.add_argument("--older-than", default=None, metavar="AGE", help='prune: entries not used in this long ("30d", "12h")')
    c.add_argument("--max-gb", type=float, default=None, help="prune: least recently used first, down to this size")
    c.add_argument("--json", action="store_true", help="print JSON")

    _serve_parser(sub)
    return p


def _serve_parser(sub: Any) -> None:
    v = sub.add_parser("serve", help="run the built-in OpenAI-compatible endpoint")
    v.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="the port (0: any free one; the first line printed says which)")
    v.add_argument("--latency-ms", type=float, default=0.0, help="every answer this much later")
    v.add_argument("--latency-jitter-ms", type=float, default=0.0, help="plus a seeded random delay up to this")
    v.add_argument("--rate-limit", type=int, default=0, help="requests per --rate-window-s (0: unlimited)")
    v.add_argument("--rate-window-s", type=float, default=60.0, help="the rate limit's sliding window, in seconds")
    v.add_argument("--rate-headers", default="retry-after",
                   help='how a 429 gives its delay: retry-after, retry-after-ms, http-date, reset or none')
    v.add_argument("--fault", action="append", default=[], metavar="NAME=P",
                   help="inject a fault by chance, e.g. --fault 500=0.05 --fault drop=0.03; hostile answers: null_text, "
                        "gzip_bomb, huge, bad_utf8, echo_key, redirect (all names and what they do: pipeline/tools/serve/; "
                        "an unknown name lists them)")
    v.add_argument("--row-fault", action="append", default=[], metavar="TEXT=FAULT[:N]",
                   help="rows whose prompt contains TEXT always get FAULT (or only their first N requests)")
    v.add_argument("--capacity", type=int, default=0, metavar="N",
                   help="a GPU server's model: at most N requests worked on at once, each for the latency, the rest "
                        "queued in arrival order (0: unlimited); change it while serving with POST /admin/capacity "
                        "{\"capacity\": N}")
    v.add_argument("--queue-limit", type=int, default=None, metavar="N",
                   help="with --capacity: a request arriving when N wait gets a 503 at once (0: no queue; "
                        "default: unbounded)")
    v.add_argument("--batch-latency-growth", type=float, default=0.0, metavar="G",
                   help="with --capacity: latency x (1 + G x (busy - 1) / capacity), as a batching GPU server slows")
    v.add_argument("--capacity-at", action="append", default=[], metavar="SECONDS=N",
                   help="the capacity from SECONDS after the start, e.g. --capacity-at 10=8 --capacity-at 25=32")
    v.add_argument("--slow-ms", type=float, default=5000.0, help="how late the 'slow' fault answers")
    v.add_argument("--fault-retry-after-s", type=float, default=1.0, help="the delay injected 429s ask for")
    v.add_argument("--answer-bytes", type=int, default=0, help="pad each answer to about this size (benchmarks)")
    v.add_argument("--seed", type=int, default=0, help="seeds the faults' chances and the latency's jitter")
    v.add_argument("--options-json", default=None, help="all options as a JSON object (as a job's [serve] table)")
    v.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="exit when process PID ends (a run's [serve] endpoint dies with the run, even after kill -9)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from .config import load_job
            from .engine import RunOptions, run
            from .engine.options import retry_kinds

            if args.dry_run:
                from .tools.dryrun import dry_run

                return dry_run(load_job(args.job, require_key=False))
            _without_pandas()
            options = RunOptions(retry_failed=retry_kinds(args.retry_failed), restart=args.restart, progress=args.progress, report=args.report, wait=args.wait,
                                 cancel_batches=args.cancel_batches, no_cache=args.no_cache, log_format=args.log_format)
            return run(load_job(args.job), options)
        if args.command in ("export-batch", "import-batch"):
            from .config import load_job
            from .engine.batchfile import export_batch, import_batch

            if args.command == "export-batch":
                return export_batch(load_job(args.job, require_key=False), args.file)
            return import_batch(load_job(args.job, require_key=False), args.file)
        if args.command == "report":
            from .config import load_job
            from .engine.process import tune_memory
            from .tools.report import MAX_MB, write_report

            tune_memory()  # this process is the report's: Arrow on the system allocator gives each part back

            print(write_report(load_job(args.job, require_key=False), args.out, max_mb=args.max_mb or MAX_MB))
            return 0
        if args.command == "compare":
            from .api import compare

            print(compare(*args.jobs, out=args.out, max_mb=args.max_mb))
            return 0
        if args.command == "cache":
            from .tools.housekeeping import cache_command

            return cache_command(args.folder, args.action, older_than=args.older_than, max_gb=args.max_gb,
                                 as_json=args.json)
        if args.command == "status":
            from .config import load_job
            from .tools.status import job_status, render

            report = job_status(load_job(args.job, require_key=False))
            print(json.dumps(report, indent=1) if args.json else render(report))
            return 0
        return _serve(args)
    except JobError as exc:
        _error(args, exc)
        return 2
    except LockedError as exc:
        _error(args, exc)
        return 75
    except LocalFailure as exc:  # before sending began: a full disk, an unwritable checkpoint
        _error(args, exc)
        return 4


def _error(args: argparse.Namespace, exc: Exception) -> None:
    """The one line an error before (or instead of) a run is: JSON when the run's logs are."""
    from .engine.console import Console, log_format

    try:
        as_json = args.command == "run" and log_format(getattr(args, "log_format", None)) == "json"
    except JobError:  # PIPELINE_LOG_FORMAT itself is wrong: say that, plainly
        as_json = False
    console = Console(json_lines=as_json, job=None)
    console.say(f"error: {exc}", event="error", kind=type(exc).__name__)


def _without_pandas() -> None:
    """The engine never uses pandas, but pyarrow imports it (48 MB of RSS, ~0.4 s) the first
    time it is handed Python objects, only to ask whether they are a pandas Series. Marking it
    absent in this process (the `pipeline run` command's own) keeps a long run's memory lean."""
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _NoPandas())


class _NoPandas:
    """An import finder that says pandas is not installed (pyarrow then skips its integration)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("pandas is not used by `pipeline run`", name=name)
        return None


def _serve(args: argparse.Namespace) -> int:
    if args.parent_pid is not None:
        from .lifeline import die_with_parent

        die_with_parent(args.parent_pid)  # first: a parent already gone must not get a server
    from .config.serve import ServeOptions
    from .engine.process import event_loop_runner
    from .tools.serve import serve_forever

    if args.options_json:
        opts = ServeOptions.from_dict(json.loads(args.options_json))
    else:
        faults = {}
        for spec in args.fault:
            name, _, p = spec.partition("=")
            try:
                faults[name] = float(p)
            except ValueError:
                raise JobError(f"--fault {spec!r}: use NAME=PROBABILITY, e.g. 500=0.05") from None
        opts = ServeOptions(
            host=args.host, port=args.port, latency_ms=args.latency_ms, latency_jitter_ms=args.latency_jitter_ms,
            rate_limit=args.rate_limit, rate_window_s=args.rate_window_s, rate_headers=args.rate_headers,
            faults=faults, answer_bytes=args.answer_bytes, seed=args.seed,
            row_faults=_row_faults(args.row_fault), slow_ms=args.slow_ms, fault_retry_after_s=args.fault_retry_after_s,
            capacity=args.capacity, queue_limit=args.queue_limit, batch_latency_growth=args.batch_latency_growth,
            capacity_schedule=_capacity_schedule(args.capacity_at),
        )
    try:
        event_loop_runner()(serve_forever(opts))
    except KeyboardInterrupt:
        pass
    return 0


def _capacity_schedule(specs: list[str]) -> tuple[tuple[float, int], ...]:
    steps = []
    for spec in specs:
        at, _, n = spec.partition("=")
        try:
            steps.append((float(at), int(n)))
        except ValueError:
            raise JobError(f"--capacity-at {spec!r}: use SECONDS=N, e.g. 10=8") from None
    return tuple(steps)


def _row_faults(specs: list[str]) -> dict[str, str]:
    faults = {}
    for spec in specs:
        text, _, fault = spec.rpartition("=")
        if not text or not fault:
            raise JobError(f"--row-fault {spec!r}: use TEXT=FAULT, e.g. --row-fault 'row-00007=400' or 'row-00003=503:2'")
        faults[text] = fault
    return faults
