"""`make bench`: every benchmark scenario, a table on stdout, figures in bench/results.json.

    python -m bench                 # all scenarios (about 15 minutes on 2 cores)
    python -m bench instant latency # only these

Each scenario runs the pipeline as its own process against the built-in endpoint in another
process; "end to end" is from process start to exit, Parquet written.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any, Callable

from .common import ROOT, machine

RESULTS = ROOT / "bench" / "results.json"


def _optional(module: str, func: str) -> Callable[[], dict[str, Any]] | None:
    try:
        return getattr(importlib.import_module(f"bench.{module}"), func)
    except (ImportError, AttributeError):
        return None


def scenarios() -> dict[str, Callable[[], dict[str, Any]] | None]:
    from . import throughput

    return {
        "instant": throughput.instant,
        "latency": throughput.latency,
        "rate": _optional("rate", "run_rate_bench"),
        "million": throughput.million,
        "images": _optional("images", "run_image_bench"),
        "ray": _optional("ray_bench", "run_ray_bench"),
        "report": _optional("report_bench", "run_report_bench"),
        "report_scale": _optional("report_scale", "run_report_scale_bench"),
        "compare_scale": _optional("compare_scale", "run_compare_scale_bench"),
        "metrics": _optional("metrics_cost", "run_metrics_bench"),
        "adaptive": _optional("adaptive", "run_adaptive_bench"),
        "sources": _optional("sources", "run_sources_bench"),
        "media": _optional("media", "run_media_bench"),
        "redact": _optional("redact_cost", "run_redact_bench"),
        "bucket": _optional("bucket", "run_bucket_bench"),
    }


TARGETS: dict[str, Callable[[dict[str, Any]], str]] = {
    "instant": lambda r: (f"{r['rows_per_s']:.0f} rows/s, median of {r['runs']} runs {r['rows_per_s_all']} (target >= 3000); "
                          f"{r['cpu_ms_per_row']:.3f} ms CPU/row (target <= 0.3)"),
    "latency": lambda r: (f"{r['pct_of_ideal']:.1f}% of in-flight/latency = {r['ideal_rows_per_s']:.0f} rows/s end to end (target >= 97%); "
                          f"first request after {r['first_request_after_s']:.2f}s; sending {r['sending_pct_of_ideal']:.1f}%, "
                          f"{r['sending_pct_of_floor']:.1f}% of the {r['rounds_floor_s']:.1f}s floor of whole rounds "
                          f"(ceiling {r['ceiling_pct_of_ideal']:.1f}%)"),
    "rate": lambda r: f"{r.get('pct_of_limit', 0):.1f}% of the limit, {r.get('429s', r.get('rate_limited', '?'))} x 429 (target >= 97%, 0)",
    "million": lambda r: (f"peak RSS {r['peak_rss_mb']:.0f} MB (target <= 200); RSS {r['rss_at_10pct_mb']:.0f} MB at 10% vs "
                          f"{r['rss_at_end_mb']:.0f} MB at the end (target within 20%); {r['rows_per_s']:.0f} rows/s; rerun "
                          f"{r['rerun_s']:.2f}s, {r['rerun_requests']} requests (target <= 2 s, 0); checkpoint "
                          f"{r.get('checkpoint_mb', 0):.0f} MB beside {r.get('output_mb', 0):.0f} MB of output = "
                          f"{r.get('checkpoint_per_output', 0):.2f}x (target < 1)"),
    "images": lambda r: (f"{r['images_per_s']:.1f} images/s; worst event-loop stall {r['loop_stall']['worst_ms']:.0f} ms "
                         f"over {r['loop_stall']['samples']} ticks (target < 100)"),
    "report": lambda r: (f"{r['rows']:,} rows: report {r['report_s']:.1f}s, {r['page_mb']:.1f} MB; in chromium: load "
                         f"{r['load_s']:.1f}s, filter {r['filter_ms']:.0f} ms, sort {r['sort_ms']:.0f} ms, page "
                         f"{r['page_turn_ms']:.0f} ms, search {r['search_ms_with_150ms_debounce']:.0f} ms (150 ms debounce)"),
    "report_scale": lambda r: "; ".join(
        f"{k.removeprefix('rows_')} rows: peak {v['peak_rss_mb']:.0f} MB (target < 300), {v['report_s']:.1f}s"
        for k, v in r.items() if isinstance(v, dict)),
    "compare_scale": lambda r: "; ".join(
        f"{k.removeprefix('rows_')} rows: peak {v['peak_rss_mb']:.0f} MB, {v['compare_s']:.1f}s"
        for k, v in r.items() if isinstance(v, dict)),
    "metrics": lambda r: (f"CPU per row {r['cost_pct_of_cpu']:+.1f}% with metrics (target < 5%); {r['rows_per_s_on']} rows/s "
                          f"with vs {r['rows_per_s_off']} without ({r['cost_pct_of_throughput']:.1f}%, wall-clock); "
                          f"counts {r['counts_settle_us_per_row']:.2f} us/row "
                          f"= {r['counts_settle_pct_of_row_cpu']:.1f}% of a row's CPU"),
    "adaptive": lambda r: (
        f"auto {r['auto_vs_sweep']['auto_rows_per_s']:.0f} rows/s = {r['auto_vs_sweep']['auto_pct_of_best']:.1f}% of the best fixed "
        f"(target >= 95%), p95 {r['auto_vs_sweep']['auto_p95_ms_after_warmup']:.0f} ms (target <= 300), "
        f"{r['auto_vs_sweep']['auto_timeouts']} timeouts; capacity 32->8->32: latency back "
        f"{r['capacity_change']['latency_back_after_drop_s']} s after the drop, throughput back "
        f"{r['capacity_change']['throughput_back_after_rise_s']} s after the rise (target <= 10), "
        f"{r['capacity_change']['timeouts']} timeouts; rate auto {r['auto_rate']['pct_of_limit']:.1f}% of 1200/min "
        f"(target >= 97%), {r['auto_rate']['429s']} x 429 (<= 2); 20k at 500 ms: {r['latency_20k']['pct_of_256']:.1f}% "
        f"of 256 rows/s (>= 97%); instant {r['instant_vs_bare']['pct_of_bare']:.1f}% of bare aiohttp end to end, "
        f"{r['instant_vs_bare'].get('sending_pct_of_bare', 0):.1f}% over the sending phase (>= 90%)"),
    "sources": lambda r: __import__("bench.sources", fromlist=["target_line"]).target_line(r),
    "media": lambda r: (
        f"{r['s3_vs_local']['s3']['images_per_s']:.0f} images/s inlined from S3 (moto) vs "
        f"{r['s3_vs_local']['local']['images_per_s']:.0f} from local disk; 20,000 x 100 KB Parquet bytes: peak RSS "
        f"{r['memory']['shard_rows_10000']['peak_rss_mb']} MB at shard_rows 10,000, "
        f"{r['memory']['shard_rows_1000']['peak_rss_mb']} MB at 1,000 (target < 400); output "
        f"{r['memory']['shard_rows_10000']['output_mb']:.1f} MB, checkpoint {r['memory']['shard_rows_10000']['checkpoint_mb']:.1f} MB "
        f"for {r['memory']['images_gb']:.1f} GB of images"),
    "redact": lambda r: "; ".join(f"{name}: {f['no_secret_us']:.2f} us ({f['with_key_us']:.2f} with the key)"
                                  for name, f in r.items() if isinstance(f, dict)) + " per 1 KB text",
    "bucket": lambda r: (
        f"{r['bucket_rows_per_s']} rows/s with the checkpoint in S3 (moto) vs {r['local_rows_per_s']} in a folder = "
        f"{r['bucket_pct_of_local']:.1f}% end to end (target >= 90%): first request after {r['bucket_first_request_s']:.2f}s vs "
        f"{r['local_first_request_s']:.2f}s, then {r['bucket_sending_rows_per_s']} vs {r['local_sending_rows_per_s']} rows/s "
        f"({r['bucket_sending_pct_of_local']:.1f}%); {r['requests_per_10k_rows']:.0f} S3 requests per 10,000 rows "
        f"({', '.join(f'{k} {v:g}' for k, v in r['requests_per_10k_by_kind'].items())}); finished checkpoint "
        f"{r['bucket_checkpoint_per_output']:.2f}x the output in S3, {r['local_checkpoint_per_output']:.2f}x in a folder "
        f"(target < 1)"),
    "ray": lambda r: ", ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.items() if "rows_per_s" in k),
}


def main(argv: list[str]) -> int:
    chosen = argv or list(scenarios())
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "scenarios": old.get("scenarios", {})}
    table = []
    for name in chosen:
        fn = scenarios().get(name)
        if fn is None:
            table.append((name, "not available in this checkout"))
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        figures = fn()
        figures["bench_seconds"] = round(time.perf_counter() - started, 1)
        results["scenarios"][name] = figures
        table.append((name, TARGETS[name](figures)))
        RESULTS.write_text(json.dumps(results, indent=1, default=str))
    width = max(len(n) for n, _ in table)
    print(f"machine: {results['machine']['cores']} cores, {results['machine']['cpu']}, Python {results['machine']['python']}")
    for name, line in table:
        print(f"{name:<{width}}  {line}")
    print(f"figures written to {RESULTS.relative_to(ROOT)}")
    return 0


sys.exit(main(sys.argv[1:]))
