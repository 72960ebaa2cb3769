"""Memory: image bytes in a manifest are held a batch of rows at a time, never a shard of them
(issues 23 and 25), by every path that reads them: the online run, batch mode, export-batch and
the dry run. A Parquet manifest of 1,500 rows x 100 KB of image bytes (150 MB, one shard) goes
through each as a real process; its peak RSS (the kernel's high-water mark) must stay within two
thirds of the images' size above what planning that manifest takes (imports, and the planner's own bounded
reads). Reading a whole shard's cells at once holds them twice (Arrow, then Python objects): 300
MB and more above it. The full-size figure (2 GB, target < 400 MB) is `make bench` media."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, job_dict, read_output, write_job

ROWS, IMAGE_KB = 1500, 100
IMAGES_MB = ROWS * IMAGE_KB / 1024
PLANNING = ("import sys; from pathlib import Path; from pipeline.engine.process import tune_memory; tune_memory(); "
            "import pipeline.cli, pipeline.engine.local, pipeline.engine.batch, pipeline.engine.batchfile, "
            "pipeline.tools.dryrun; from pipeline.config import load_job; from pipeline.io.manifest import plan_manifest; "
            "job = load_job(Path(sys.argv[1]), require_key=False); plan_manifest(job.input, job.run.shard_rows)")


def _peak_mb(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run `python ARGS` as the only child of a fresh process; its peak RSS in MB."""
    probe = ("import json, resource, subprocess, sys; r = subprocess.run([sys.executable, *sys.argv[1:]], "
             "capture_output=True, text=True); print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN)"
             ".ru_maxrss / 1024, r.returncode, r.stderr[-2000:]]))")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    peak, code, err = json.loads(out.stdout)
    return peak, subprocess.CompletedProcess(args, code, "", err)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("media") / "m.parquet"
    buf = io.BytesIO()
    Image.frombytes("RGB", (32, 32), random.Random(1).randbytes(32 * 32 * 3)).save(buf, "JPEG")
    rng = random.Random(2)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image", pa.binary())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, ROWS, 100):  # row groups of 100, as Hugging Face datasets writes images
            n = range(start, start + 100)
            w.write_table(pa.table({"id": [f"r{i:05d}" for i in n], "prompt": [f"Describe {i}." for i in n],
                                    "image": [buf.getvalue() + rng.randbytes(IMAGE_KB * 1024) for _ in n]}, schema=schema))
    return path


@pytest.mark.parametrize("how", ["run", "batch", "export-batch", "dry-run"])
def test_image_bytes_are_held_a_batch_at_a_time(how: str, manifest: Path, tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(analyze_images=False, batch_in_progress_s=0.2)
    run = {"mode": "batch", "poll_s": 0.2, "batch_max_mb": 5} if how == "batch" else {}
    data = job_dict(manifest, ep.base_url, tmp_path / "out", run=run, limits={"max_concurrency": 16})
    job = write_job(tmp_path / "job.toml", data)
    args = {"run": ["run", str(job)], "batch": ["run", str(job)], "dry-run": ["run", str(job), "--dry-run"],
            "export-batch": ["export-batch", str(job), str(tmp_path / "todo.jsonl")]}[how]
    baseline, planned = _peak_mb(["-c", PLANNING, str(job)])
    assert planned.returncode == 0, planned.stderr
    peak, done = _peak_mb(["-m", "pipeline", *args, "--no-progress"] if how in ("run", "batch") else ["-m", "pipeline", *args])
    assert done.returncode == 0, done.stderr
    assert peak - baseline < IMAGES_MB * 2 / 3, f"{how}: peak {peak:.0f} MB, {peak - baseline:.0f} MB above planning ({baseline:.0f})"
    if how in ("run", "batch"):
        rows = read_output(tmp_path / "out")
        assert len(rows) == ROWS and all(r["status"] == "ok" for r in rows)
        assert all(r["image"].startswith("sha256:") for r in rows)  # the output holds references, not the bytes
