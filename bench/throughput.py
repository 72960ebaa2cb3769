"""Engine throughput and memory scenarios (issue 7), each against the built-in endpoint."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .common import (
    WORK,
    endpoint,
    recorded_times,
    run_pipeline,
    stats,
    url_manifest,
    write_job,
)

ANSWER = {"answer_bytes": 300, "analyze_images": False}


def _fresh(name: str) -> Path:
    folder = WORK / name
    shutil.rmtree(folder / "out", ignore_errors=True)
    shutil.rmtree(folder / ".pipeline", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def instant(rows: int = 20_000, concurrency: int = 64, repeats: int = 3) -> dict[str, Any]:
    """The median of `repeats` whole runs: wall-clock on a shared VM varies by tens of percent."""
    folder = _fresh("instant")
    manifest = url_manifest(WORK / f"urls-{rows}.csv", rows)
    runs = []
    with endpoint(**ANSWER) as url:
        job = write_job(folder / "job.toml", manifest, url, folder / "out", concurrency=concurrency)
        for _ in range(repeats):
            _fresh("instant")
            r = run_pipeline(job)
            assert r["exit_code"] == 0, r["stderr"]
            runs.append((rows / r["wall_s"], 1000 * r["cpu_s"] / rows, r["wall_s"]))
        sent = stats(url)["requests"]
    rates = sorted(x[0] for x in runs)
    cpus = sorted(x[1] for x in runs)
    return {"rows": rows, "in_flight": concurrency, "runs": repeats, "rows_per_s": rates[len(rates) // 2],
            "rows_per_s_all": [round(x) for x in rates], "wall_s": sorted(x[2] for x in runs)[len(runs) // 2],
            "cpu_ms_per_row": cpus[len(cpus) // 2], "cpu_ms_per_row_all": [round(x, 3) for x in cpus],
            "requests": sent, "requests_per_run": sent / repeats}


def latency(rows: int = 3_000, concurrency: int = 128, latency_ms: float = 500) -> dict[str, Any]:
    folder = _fresh("latency")
    manifest = url_manifest(WORK / f"urls-{rows}.csv", rows)
    with endpoint(latency_ms=latency_ms, record=True, **ANSWER) as url:
        job = write_job(folder / "job.toml", manifest, url, folder / "out", concurrency=concurrency)
        r = run_pipeline(job)
        times = recorded_times(url)
    assert r["exit_code"] == 0, r["stderr"]
    latency_s = latency_ms / 1000
    ideal = concurrency / latency_s
    sending_s = times[-1] + latency_s - times[0]  # first request sent to last answer received
    # Requests cannot be split: at best ceil(rows / in flight) back-to-back rounds of `latency`.
    floor_s = math.ceil(rows / concurrency) * latency_s
    return {"rows": rows, "in_flight": concurrency, "latency_ms": latency_ms, "rows_per_s": rows / r["wall_s"],
            "ideal_rows_per_s": ideal, "pct_of_ideal": 100 * rows / r["wall_s"] / ideal, "wall_s": r["wall_s"],
            "first_request_after_s": times[0] - r["started_at"], "sending_s": sending_s,
            "sending_pct_of_ideal": 100 * rows / sending_s / ideal,
            "rounds_floor_s": floor_s, "ceiling_pct_of_ideal": 100 * rows / floor_s / ideal,
            "sending_pct_of_floor": 100 * floor_s / sending_s}


def _median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2] if values else 0


def million(rows: int = 1_000_000, concurrency: int = 64) -> dict[str, Any]:
    folder = _fresh("million")
    manifest = url_manifest(WORK / f"urls-{rows}.csv", rows)
    with endpoint(**ANSWER) as url:
        job = write_job(folder / "job.toml", manifest, url, folder / "out", concurrency=concurrency)
        r = run_pipeline(job, sample=True, base_url=url)
        assert r["exit_code"] == 0, r["stderr"]
        # Medians over the samples around 10% and over the last 10%: a sample may land on a shard
        # commit's brief peak (~15 MB) in either window; the peak is reported on its own.
        at_100k = _median([rss for done, rss in r["samples"] if rows // 10 <= done < rows * 15 // 100])
        at_end = _median([rss for done, rss in r["samples"] if done >= rows * 9 // 10])
        again = run_pipeline(job)
        sent_again = stats(url)["requests"] - rows
    # What a finished job keeps (issue 25: its journals compacted): the checkpoint beside the output.
    checkpoint, output = (sum(p.stat().st_size for p in (folder / f).rglob("*") if p.is_file())
                          for f in (".pipeline", "out"))
    return {
        "checkpoint_mb": checkpoint / 1e6, "output_mb": output / 1e6, "checkpoint_per_output": checkpoint / output,
        "rows": rows, "rows_per_s": rows / r["wall_s"], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
        "rss_at_10pct_mb": at_100k / 1024, "rss_at_end_mb": at_end / 1024,
        "rss_growth_pct": 100 * (at_end - at_100k) / at_100k if at_100k else None,
        "rerun_s": again["wall_s"], "rerun_exit_code": again["exit_code"], "rerun_requests": sent_again,
    }
