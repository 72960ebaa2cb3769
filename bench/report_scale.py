"""The report at nightly scale: `pipeline report` of a 1,000,000-row and a 10,000,000-row output,
its time and its peak memory (the process's own high-water mark, ru_maxrss). Target: under 300 MB
at 1M rows, and the same at 10M (flat in rows).

    python -m bench report_scale

The outputs are one real shard of 10,000 rows (a real run against the built-in endpoint, about 1%
failed rows, 300-byte answers) hard-linked as every part of the bigger outputs: the report reads
and parses every row of every part, as it would a real output of that size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import ROOT, WORK, endpoint, measure_command, url_manifest, write_job

SHARD = 10_000
SCALES = (1_000_000, 10_000_000)


def _one_shard(work: Path) -> Path:
    """A real run of one shard; returns its job file."""
    manifest = url_manifest(work / "m.csv", SHARD)
    job = work / "job.toml"
    if (work / "out" / "part-000000.parquet").exists() and job.exists():
        return job
    with endpoint(answer_bytes=300, analyze_images=False, row_faults={"image 77": "400"}) as base_url:
        write_job(job, manifest, base_url, work / "out", concurrency=64, shard_rows=SHARD, name="report-scale")
        subprocess.run([sys.executable, "-m", "pipeline", "run", str(job), "--restart", "--no-progress"], cwd=ROOT,
                       check=False, capture_output=True)
    return job


def _scaled(work: Path, job: Path, rows: int) -> Path:
    """An output of `rows` rows: the shard's part hard-linked once per shard."""
    out = work / f"out-{rows}"
    out.mkdir(exist_ok=True)
    source = work / "out" / "part-000000.parquet"
    for i in range(rows // SHARD):
        target = out / f"part-{i:06d}.parquet"
        if not target.exists():
            os.link(source, target)
    text = job.read_text()
    text = re.sub(r'(?m)^path = ".*/out"$', f'path = "{out}"\ncheckpoint = "{work / ".pipeline" / "report-scale"}"', text)
    scaled = work / f"job-{rows}.toml"
    scaled.write_text(text)
    return scaled


def _measure(job: Path, page: Path, python_path: str | None = None) -> dict[str, Any]:
    seconds, peak, code, size = measure_command(["report", str(job), "--out", str(page)], page, python_path)
    return {"report_s": seconds, "peak_rss_mb": peak, "exit_code": code, "page_mb": size}


def run_report_scale_bench(before: str | None = None) -> dict[str, Any]:
    """`before`: a checkout of another version (PYTHONPATH) measured at 1M rows too."""
    work = WORK / "report_scale"
    work.mkdir(parents=True, exist_ok=True)
    job = _one_shard(work)
    figures: dict[str, Any] = {}
    for rows in SCALES:
        figures[f"rows_{rows}"] = _measure(_scaled(work, job, rows), work / f"report-{rows}.html")
    if before:
        figures["before_rows_1000000"] = _measure(_scaled(work, job, SCALES[0]), work / "report-before.html", before)
    return figures


if __name__ == "__main__":
    print(run_report_scale_bench(sys.argv[1] if len(sys.argv) > 1 else None))
