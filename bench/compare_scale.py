"""`pipeline compare` at scale: two labeling jobs of 20,000 and of 100,000 rows each, the compare's
time and peak memory (the process's own high-water mark, ru_maxrss). Before the compare streamed
its parts it held every row of every job as Python dicts: 622 MB at 2 x 20k rows, 1.77 GB at 2 x 100k.

    python -m bench compare_scale [BEFORE]     # BEFORE: another checkout (PYTHONPATH), measured too

Each job is one real shard of 10,000 rows (a real run against the built-in endpoint: labels, ~2%
failed rows in one job, 300-byte answers), written again as every part of the bigger outputs with
the part's number in its ids, so the rows join by id as a real comparison's do.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .common import ROOT, WORK, endpoint, measure_command, url_manifest, write_job

SHARD = 10_000
SCALES = (20_000, 100_000)
LABELS = '''
[labels]
schema = { type = "object", required = ["label", "confidence"], properties = { label = { type = "string", enum = ["cat", "dog", "bird", "fish"] }, confidence = { type = "number" } } }
'''


def _one_shard(work: Path, name: str, faults: dict[str, float]) -> Path:
    """A real labeling run of one shard; returns its job file."""
    manifest = url_manifest(work / "m.csv", SHARD)
    job = work / f"{name}.toml"
    if (work / f"out-{name}" / "part-000000.parquet").exists() and job.exists():
        return job
    with endpoint(answer_bytes=300, analyze_images=False, vary_labels=True, faults=faults, seed=len(name)) as base_url:
        write_job(job, manifest, base_url, work / f"out-{name}", concurrency=64, shard_rows=SHARD, name=name,
                  max_attempts=1, extra=LABELS)
        subprocess.run([sys.executable, "-m", "pipeline", "run", str(job), "--restart", "--no-progress"], cwd=ROOT,
                       check=False, capture_output=True)
    return job


def _scaled(work: Path, job: Path, name: str, rows: int) -> Path:
    """An output of `rows` rows: the shard's part written once per shard, its ids numbered by part."""
    out = work / f"out-{name}-{rows}"
    out.mkdir(exist_ok=True)
    source = pq.read_table(work / f"out-{name}" / "part-000000.parquet")
    for i in range(rows // SHARD):
        target = out / f"part-{i:06d}.parquet"
        if not target.exists():
            ids = pc.binary_join_element_wise(pa.scalar(f"p{i}"), source.column("id"), "-")
            pq.write_table(source.set_column(source.schema.get_field_index("id"), "id", ids), target)
    text = re.sub(r'(?m)^path = ".*/out-[a-z]+"$', f'path = "{out}"\ncheckpoint = "{work / ".pipeline" / name}"',
                  job.read_text())
    scaled = work / f"{name}-{rows}.toml"
    scaled.write_text(text)
    return scaled


def _measure(jobs: list[Path], page: Path, python_path: str | None = None) -> dict[str, Any]:
    seconds, peak, code, size = measure_command(["compare", *map(str, jobs), "--out", str(page)], page, python_path)
    return {"compare_s": seconds, "peak_rss_mb": peak, "exit_code": code, "page_mb": size}


def run_compare_scale_bench(before: str | None = None) -> dict[str, Any]:
    work = WORK / "compare_scale"
    work.mkdir(parents=True, exist_ok=True)
    a, b = _one_shard(work, "a", {}), _one_shard(work, "b", {"500": 0.02})
    figures: dict[str, Any] = {}
    for rows in SCALES:
        jobs = [_scaled(work, a, "a", rows), _scaled(work, b, "b", rows)]
        figures[f"rows_2x{rows}"] = _measure(jobs, work / f"compare-{rows}.html")
        if before:
            figures[f"before_rows_2x{rows}"] = _measure(jobs, work / f"compare-before-{rows}.html", before)
    return figures


if __name__ == "__main__":
    print(run_compare_scale_bench(sys.argv[1] if len(sys.argv) > 1 else None))
