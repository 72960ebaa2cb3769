"""What metrics cost (issue 27; target: under 5% of the instant-endpoint throughput).

    python -m bench metrics

Three figures: whole runs of the instant scenario (20,000 rows, 64 in flight, answers at once) with
`[run] metrics_port` and `metrics_file` and without, alternated so the machine's drift falls on
both (medians): their throughput and their CPU per row (what bounds the throughput on this
endpoint, and steadier when other work shares the cores); and the engine's own per-row cost of keeping the counts metrics read
(`Counts.settle`, paid with metrics off too), in microseconds against the CPU a row takes.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from .common import WORK, endpoint, run_pipeline, url_manifest, write_job
from .throughput import ANSWER, _fresh


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settle_us(n: int = 200_000) -> float:
    from pipeline.engine.counts import Counts
    from pipeline.records import ResultRow

    rows = [ResultRow(f"r{i}", "a", None, 30, 20, 50, "m", "stop", "ok", None, None, 1, 40 + i % 900, 0.001, time.time(),
                      None, 5, None, None) for i in range(1000)]
    counts = Counts()
    started = time.perf_counter()
    for i in range(n):
        counts.settle(rows[i % 1000])
    return (time.perf_counter() - started) / n * 1e6


def run_metrics_bench(rows: int = 20_000, concurrency: int = 64, repeats: int = 3) -> dict[str, Any]:
    manifest = url_manifest(WORK / f"urls-{rows}.csv", rows)
    folder = _fresh("metrics")
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    with endpoint(**ANSWER) as url:
        plain = write_job(folder / "off.toml", manifest, url, folder / "out", concurrency=concurrency)
        watched = write_job(folder / "on.toml", manifest, url, folder / "out", concurrency=concurrency,
                            extra=f'metrics_port = {_port()}\nmetrics_host = "127.0.0.1"\n'
                                  f'metrics_file = "{folder / "textfile" / "bench.prom"}"')
        for _ in range(repeats):
            for name, job in (("off", plain), ("on", watched)):
                _fresh("metrics")
                r = run_pipeline(job)
                assert r["exit_code"] == 0, r["stderr"]
                runs[name].append((rows / r["wall_s"], 1000 * r["cpu_s"] / rows))
    median = {name: (sorted(x[0] for x in got)[len(got) // 2], sorted(x[1] for x in got)[len(got) // 2])
              for name, got in runs.items()}
    settle = _settle_us()
    cpu_row_ms = median["off"][1]
    return {"rows": rows, "runs_each": repeats,
            "rows_per_s_off": round(median["off"][0]), "rows_per_s_on": round(median["on"][0]),
            "rows_per_s_all": {k: [round(x[0]) for x in v] for k, v in runs.items()},
            "cost_pct_of_throughput": round(100 * (1 - median["on"][0] / median["off"][0]), 2),
            "cpu_ms_per_row_off": round(cpu_row_ms, 4), "cpu_ms_per_row_on": round(median["on"][1], 4),
            # the run's own CPU per row: what bounds the instant endpoint's throughput, and steadier
            # than wall-clock when other work shares the cores
            "cost_pct_of_cpu": round(100 * (median["on"][1] / cpu_row_ms - 1), 2),
            "counts_settle_us_per_row": round(settle, 3),
            "counts_settle_pct_of_row_cpu": round(100 * settle / 1000 / cpu_row_ms, 2)}


if __name__ == "__main__":
    print(run_metrics_bench())
