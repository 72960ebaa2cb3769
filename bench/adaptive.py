"""Finding the right speed by itself (issue 17), against the built-in endpoint's server model.

    python -m bench adaptive

- auto vs a sweep: `max_concurrency = "auto"` against --capacity 32 --latency-ms 200 (10,000 rows),
  beside fixed max_concurrency 16..64 (3,000 rows each: the rate of a point is steady long before
  that); p95 latency after the first 10% of rows; timeouts.
- capacity 32 -> 8 -> 32 mid-run: how long until latency is back near the no-load value after the
  drop, and until throughput is back near 160 rows/s after the rise; timeouts.
- requests_per_minute = "auto" against an endpoint enforcing 1,200/min (60 s window) and
  announcing it: requests started in the first 60 s, and 429s.
- 20,000 rows at 500 ms latency, 128 in flight: rows/s end to end against 256.
- 20,000 rows, instant endpoint, 64 in flight: the pipeline's rows/s against a bare aiohttp
  client's requests/s in the same bench.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .common import WORK, endpoint, run_pipeline, stats, url_manifest, write_job

LATENCY_MS = 200
CAPACITY = 32


def _run(name: str, rows: int, *, concurrency: Any, rpm: Any = 1e7, timeout_s: float = 60, **serve: Any) -> dict[str, Any]:
    folder = WORK / "adaptive" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    manifest = url_manifest(WORK / f"urls-{rows}.csv", rows)
    with endpoint(answer_bytes=300, analyze_images=False, **serve) as url:
        started = time.time()  # the server model's schedule counts from its start
        job = write_job(folder / "job.toml", manifest, url, folder / "out", concurrency=1, rpm=1, timeout_s=timeout_s)
        text = job.read_text()
        text = text.replace("\nmax_concurrency = 1\n", f"\nmax_concurrency = {json.dumps(concurrency)}\nmax_concurrency_cap = 256\n")
        text = text.replace("\nrequests_per_minute = 1\n", f"\nrequests_per_minute = {json.dumps(rpm)}\n")
        job.write_text(text)
        r = run_pipeline(job, base_url=url)
        assert r["exit_code"] == 0, r["stderr"][-2000:]
        r["endpoint"] = stats(url)
        r["endpoint_started"] = started
    t = pq.read_table(folder / "out", columns=["latency_ms", "finished_at", "error_kind"])
    r["table"] = t
    r["timeouts"] = sum(1 for k in t.column("error_kind").to_pylist() if k == "timeout")
    return r


def _after_warmup_p95(t: Any) -> float:
    order = np.argsort(t.column("finished_at").to_numpy())
    lat = t.column("latency_ms").to_numpy()[order]
    return float(np.percentile(lat[len(lat) // 10:], 95))


def auto_vs_sweep() -> dict[str, Any]:
    sweep = {}
    for n in (16, 24, 32, 40, 48, 64):
        r = _run(f"fixed-{n}", 3000, concurrency=n, capacity=CAPACITY, latency_ms=LATENCY_MS, queue_limit=512)
        sweep[n] = round(3000 / r["wall_s"], 1)
    auto = _run("auto", 10_000, concurrency="auto", capacity=CAPACITY, latency_ms=LATENCY_MS, queue_limit=512)
    best = max(sweep.values())
    rate = 10_000 / auto["wall_s"]
    return {"sweep_rows_per_s": sweep, "best_fixed_rows_per_s": best, "auto_rows_per_s": round(rate, 1),
            "auto_pct_of_best": round(100 * rate / best, 1), "auto_p95_ms_after_warmup": round(_after_warmup_p95(auto["table"]), 1),
            "auto_timeouts": auto["timeouts"], "auto_statuses": auto["endpoint"]["statuses"]}


def capacity_change() -> dict[str, Any]:
    drop_at, rise_at = 20.0, 45.0
    rows = int(160 * drop_at + 40 * (rise_at - drop_at) + 160 * 20)
    r = _run("change", rows, concurrency="auto", capacity=CAPACITY, latency_ms=LATENCY_MS, queue_limit=512,
             capacity_schedule=[[drop_at, 8], [rise_at, CAPACITY]])
    t = r["table"]
    done = t.column("finished_at").to_numpy()
    lat = t.column("latency_ms").to_numpy()
    started = done - lat / 1000.0 - r["endpoint_started"]  # when each request was sent, from the server's start
    ended = done - r["endpoint_started"]

    def settled(s: float) -> bool:  # requests sent in [drop + s, drop + s + 1) see no queue worth the name
        m = (started >= drop_at + s) & (started < drop_at + s + 1)
        return m.sum() > 5 and float(np.median(lat[m])) < 1.5 * LATENCY_MS

    follow_down = next((float(s) for s in np.arange(0, 20, 0.5) if settled(s)), None)
    follow_up = next((float(s) for s in np.arange(0, 20, 0.5)
                      if ((ended >= rise_at + s) & (ended < rise_at + s + 1)).sum() >= 0.9 * 160), None)
    return {"rows": rows, "latency_back_after_drop_s": follow_down, "throughput_back_after_rise_s": follow_up,
            "timeouts": r["timeouts"], "statuses": r["endpoint"]["statuses"]}


def auto_rate() -> dict[str, Any]:
    r = _run("rate", 1400, concurrency=32, rpm="auto", rate_limit=1200, rate_window_s=60.0)
    t = r["table"]
    done = np.sort(t.column("finished_at").to_numpy())
    first_minute = int(((done - done[0]) < 60.0).sum()) + 1
    return {"limit_per_min": 1200, "answered_in_first_60s": first_minute, "pct_of_limit": round(100 * first_minute / 1200, 1),
            "429s": r["endpoint"]["statuses"].get("429", 0)}


def long_latency() -> dict[str, Any]:
    r = _run("latency", 20_000, concurrency=128, latency_ms=500)
    rate = 20_000 / r["wall_s"]
    return {"rows_per_s": round(rate, 1), "pct_of_256": round(100 * rate / 256, 1)}


def instant_vs_bare(repeats: int = 3) -> dict[str, Any]:
    """Medians of `repeats` runs of each, interleaved: a bare loop on this VM varied by 27% run to run."""
    rows = 20_000
    ours, sending, bare = [], [], []
    for _ in range(repeats):
        r = _run("instant", rows, concurrency=64)
        ours.append(rows / r["wall_s"])
        done = r["table"].column("finished_at").to_numpy()
        sending.append(rows / float(done.max() - done.min()))  # as the bare loop is timed: requests only
        with endpoint(answer_bytes=300, analyze_images=False) as url:
            bare.append(asyncio.run(_bare(url, rows, 64)))
    rate, floor, send = float(np.median(ours)), float(np.median(bare)), float(np.median(sending))
    return {"pipeline_rows_per_s": round(rate, 1), "bare_aiohttp_requests_per_s": round(floor, 1),
            "pct_of_bare": round(100 * rate / floor, 1), "sending_rows_per_s": round(send, 1),
            "sending_pct_of_bare": round(100 * send / floor, 1),
            "runs": {"pipeline": [round(x) for x in ours], "sending": [round(x) for x in sending],
                     "bare": [round(x) for x in bare]}}


async def _bare(url: str, n: int, concurrency: int) -> float:
    """The floor any client pays: aiohttp POSTs of a typical body, `concurrency` at a time, no pipeline."""
    import aiohttp

    body = {"model": "bench-vl", "max_tokens": 256, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe image 1, in one sentence."},
        {"type": "image_url", "image_url": {"url": "https://images.example/photos/1/1.jpg"}}]}]}
    left = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            for _ in left:
                async with session.post(url + "/chat/completions", json=body) as resp:
                    await resp.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def run_adaptive_bench() -> dict[str, Any]:
    return {"auto_vs_sweep": auto_vs_sweep(), "capacity_change": capacity_change(), "auto_rate": auto_rate(),
            "latency_20k": long_latency(), "instant_vs_bare": instant_vs_bare()}


if __name__ == "__main__":
    print(json.dumps(run_adaptive_bench(), indent=1))
