"""Rate benchmark: how close to a provider's requests-per-minute limit the pipeline runs, without 429s.

    python -m bench.rate            # the 60 s run (about 65-70 s with start-up)
    python -m bench.rate 15         # a shorter run, same limit

The built-in endpoint enforces LIMIT requests per sliding 60-second window the way a provider
does (429 with Retry-After over it). The pipeline runs as its own process with
requests_per_minute = LIMIT and a minute's quota of rows (for `seconds` = 60; pro rata otherwise),
each answered after 100 +- 50 ms. Figures:

- pct_of_limit: the rate the endpoint saw, first request to last, as a % of LIMIT (target >= 97);
- 429s: requests the endpoint refused (target 0);
- end_to_end_pct: rows / wall time of the whole process (start-up and Parquet included), as a %.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .common import serving, write_job

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 3000  # requests per minute: 50 a second
CONCURRENCY = 16
LATENCY_MS, JITTER_MS = 100.0, 50.0

__all__ = ["run_rate_bench", "LIMIT"]


def _get(base_url: str, path: str) -> Any:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + path, timeout=60) as r:
        return json.loads(r.read())


def run_rate_bench(seconds: float = 60.0, limit: int = LIMIT) -> dict[str, Any]:
    rows = max(2, round(limit * seconds / 60.0))
    folder = Path(tempfile.mkdtemp(prefix="bench-rate-"))
    with serving(rate_limit=limit, rate_window_s=60.0, rate_headers="retry-after",
                 latency_ms=LATENCY_MS - JITTER_MS, latency_jitter_ms=2 * JITTER_MS,
                 analyze_images=False, record=True) as (base_url, _pid):
        manifest = folder / "manifest.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "image", "prompt"])
            w.writerows([f"r{i:06d}", f"https://images.example/{i}.png", f"Describe picture r{i:06d}"] for i in range(rows))
        job = write_job(folder / "job.toml", manifest, base_url, folder / "out", concurrency=CONCURRENCY, rpm=limit,
                        name="rate", max_tokens=64, max_attempts=5, timeout_s=30)
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        stats = _get(base_url, "/stats")
        arrivals = sorted(e["t"] for e in _get(base_url, "/requests") if e.get("status") == 200)
    shutil.rmtree(folder, ignore_errors=True)
    if run.returncode != 0:
        raise RuntimeError(f"the pipeline exited {run.returncode}: {run.stderr[-2000:]}")
    span = arrivals[-1] - arrivals[0]
    per_min = (len(arrivals) - 1) / span * 60.0 if span > 0 else 0.0
    return {
        "limit_per_min": limit,
        "rows": rows,
        "requests": stats["requests"],
        "seconds_first_to_last": round(span, 2),
        "achieved_per_min": round(per_min, 1),
        "pct_of_limit": 100.0 * per_min / limit,
        "429s": stats["statuses"].get("429", 0),
        "over_limit": stats["over_limit"],
        "wall_s": round(wall, 2),
        "end_to_end_pct": 100.0 * rows / wall * 60.0 / limit,
        "max_in_flight": stats["max_in_flight"],
    }


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 60.0
    r = run_rate_bench(seconds)
    print(f"limit {r['limit_per_min']}/min, {r['rows']} rows over {r['seconds_first_to_last']:.1f} s: "
          f"{r['achieved_per_min']:.0f}/min = {r['pct_of_limit']:.1f}% of the limit (target >= 97%); "
          f"{r['429s']} x 429 (target 0); end to end {r['end_to_end_pct']:.1f}% of the limit in {r['wall_s']:.1f} s wall")
    print(json.dumps(r))
    return 0 if r["pct_of_limit"] >= 97.0 and r["429s"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
