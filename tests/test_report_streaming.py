"""The report's streaming pass (issue 27): over an output of many part files, the figures count
every row exactly as one pass over the whole table would, and the page's sample follows its rule
across parts (every failed row, then every k-th other row in manifest order). Its memory at 1M and
10M rows is measured in `make bench` (report_scale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import job_dict, run_cli, write_job, write_rows

pytest.importorskip("altair", reason="the report extra is not installed")

from pipeline.config import load_job  # noqa: E402
from pipeline.redact import Redactor  # noqa: E402
from pipeline.tools.report.charts import charts  # noqa: E402
from pipeline.tools.report.collect import collect  # noqa: E402
from pipeline.tools.report.figures import FINE  # noqa: E402

N = 450


def test_figures_and_sample_over_many_parts(tmp_path: Path, endpoint_factory: Any) -> None:
    failed_ids = {f"row-{i:05d}" for i in range(3, N, 29)}
    ep = endpoint_factory(row_faults={f"picture {i}": "400" for i in failed_ids}, answer_bytes=1200,
                          latency_ms=5, latency_jitter_ms=40, seed=9)
    rows = [{"id": f"row-{i:05d}", "image": f"https://images.example/{i}.png", "prompt": f"Describe picture row-{i:05d}"}
            for i in range(N)]
    write_rows(tmp_path / "m.csv", rows, "csv")
    job_file = write_job(tmp_path / "job.toml", job_dict(tmp_path / "m.csv", ep.base_url, tmp_path / "out",
                                                         run={"shard_rows": 37}))
    assert run_cli("run", str(job_file)).returncode == 1
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 13

    job = load_job(job_file, require_key=False)
    data = collect(job, 400_000, Redactor())
    table = pq.read_table(tmp_path / "out")
    whole = {name: table.column(name).to_pylist() for name in ("id", "status", "error_kind", "attempts", "latency_ms",
                                                               "total_tokens", "finished_at")}
    f = data.figures
    assert data.total == N and f.rows == N
    ok_latency = np.array([ms for ms, s in zip(whole["latency_ms"], whole["status"]) if s == "ok"], dtype=float)
    latency, tokens_hist, errors, attempts = (f.histogram("latency_ms"), f.histogram("total_tokens"), f.counts("error_kind"),
                                              f.counts("attempts"))
    assert latency is not None and tokens_hist is not None and errors is not None and attempts is not None
    counts, edges = latency
    assert counts.sum() == len(ok_latency) == N - len(failed_ids)
    assert np.array_equal(counts, np.histogram(ok_latency, bins=len(edges) - 1)[0])  # as one pass would bin them
    tokens, _ = tokens_hist
    assert tokens.sum() == sum(1 for t in whole["total_tokens"] if t is not None)
    finished = f.histogram("finished_at")
    assert finished is not None and finished[0].sum() == N
    assert dict(errors) == {"bad_request": len(failed_ids)}
    assert sum(n for _, n in attempts) == N
    span = ok_latency.max() - ok_latency.min()
    for q, found in zip((50, 90, 99), f.percentiles("latency_ms", (50, 90, 99))):
        assert abs(found - np.percentile(ok_latency, q)) <= max(1.0, 2 * span / FINE) + 1, q
    assert {c["title"] for c in charts(data)} >= {"Latency", "Errors by kind", "Tokens per row", "Rows done over time"}

    shown = [row["id"] for row in data.rows]
    assert failed_ids <= set(shown) and len(shown) < N and shown == sorted(shown)
    others = [r for r in whole["id"] if r not in failed_ids]
    kept = [r for r in shown if r not in failed_ids]
    step = others.index(kept[1]) - others.index(kept[0])
    assert kept == others[::step] and step > 1  # every k-th other row, counted across the parts
    assert data.sampling is not None
    assert f"all {len(failed_ids)} failed rows, then every" in data.sampling and f"{len(shown):,} of {N}" in data.sampling
