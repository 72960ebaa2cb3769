"""Benchmarks of image cells (`make bench` scenario "media"; alone: python -m bench.media [memory|memory1000|s3]).

memory: a Parquet manifest of 20,000 rows x ~100 KB embedded JPEGs (2 GB; row groups of 100 rows,
  as Hugging Face `datasets` writes image data) run end to end against the built-in endpoint, at
  the default shard_rows (10,000) and at 1,000. Reported: the peak RSS of the run's own process
  and of its whole tree (the image worker processes included), sampled every 0.2 s; the sizes of
  the output and the checkpoint (neither must grow by the images' 2 GB). Target: peak < 400 MB.

s3: the same images inlined from moto's S3 server (s3:// cells) and from local disk (paths), one
  run each; images/s end to end. Where the time goes: each process's CPU seconds (the run, its
  image workers, moto, the endpoint) and the raw read rates without the pipeline (fsspec's
  cat_file from moto with the run's fetch threads; local reads).

Files are made once under bench/work/media/ and reused.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import ROOT, WORK, serving
from .moto_s3 import start_moto_s3, stop_moto_s3

HERE = WORK / "media"
ROWS = 20_000
DISTINCT = 200  # distinct base images; each row's bytes are made unique by a trailer past the JPEG's end
SIDE = 203  # seeded-noise JPEG at quality 95, no chroma subsampling: ~100 KB
GROUP_ROWS = 100  # Hugging Face datasets' row group size for image data
S3_IMAGES = 2000
KEY, SECRET = "AKIABENCHKEY0000", "bench-secret-0123456789"

__all__ = ["run_media_bench", "memory", "s3_vs_local"]


def _base(i: int) -> bytes:
    from PIL import Image

    img = Image.frombytes("RGB", (SIDE, SIDE), random.Random(i).randbytes(SIDE * SIDE * 3))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _manifest(rows: int = ROWS) -> tuple[Path, int]:
    """The 2 GB manifest (made once): id, prompt, image bytes; returns (path, bytes of images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = HERE / f"bytes-{rows}.parquet"
    bases = [_base(i) for i in range(DISTINCT)]
    total = sum(len(bases[i % DISTINCT]) + 8 for i in range(rows))
    if path.exists():
        return path, total
    HERE.mkdir(parents=True, exist_ok=True)
    print(f"writing {path} ({total / 1e9:.1f} GB of images, once) ...", file=sys.stderr, flush=True)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image", pa.binary())])
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, use_dictionary=["id", "prompt"], compression="snappy") as w:
        for start in range(0, rows, GROUP_ROWS):
            n = range(start, min(rows, start + GROUP_ROWS))
            w.write_table(pa.table({"id": [f"r{i:06d}" for i in n], "prompt": [f"Describe image {i}." for i in n],
                                    "image": [bases[i % DISTINCT] + i.to_bytes(8, "big") for i in n]}, schema=schema),
                          row_group_size=GROUP_ROWS)
    os.replace(tmp, path)
    return path, total


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += _tree(int(child))
    except OSError:
        pass
    return out


def _rss_mb(pid: int, field: str = "VmRSS:") -> float:
    """A process's resident memory now (VmHWM: its peak so far, a spike between samples included)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _run(job: Path, env: dict[str, str] | None = None, plan: Path | None = None) -> dict[str, Any]:
    """`pipeline run JOB` as a process: wall time, exit code, peak RSS of it (its kernel-kept
    high-water mark) and of its tree (sampled every 0.2 s), the sampled peak while planning (until
    `plan` is written) and after, and the CPU seconds of the run and of its children."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_main = peak_tree = 0.0
    phases = {"planning": 0.0, "sending": 0.0}
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        pids = _tree(proc.pid)
        peak_main = max(peak_main, _rss_mb(proc.pid, "VmHWM:"))
        phase = "sending" if plan is not None and plan.exists() else "planning"
        phases[phase] = max(phases[phase], _rss_mb(proc.pid))
        peak_tree = max(peak_tree, sum(_rss_mb(p) for p in pids))
        for p in pids:
            cpu[p] = max(cpu.get(p, 0.0), _cpu_s(p))
        time.sleep(0.2)
    _, err = proc.communicate()
    workers = sum(v for p, v in cpu.items() if p != proc.pid)
    return {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(peak_main), "peak_tree_rss_mb": round(peak_tree),
            "sampled_peak_planning_mb": round(phases["planning"]), "sampled_peak_sending_mb": round(phases["sending"]),
            "cpu_run_s": round(cpu.get(proc.pid, 0.0), 1), "cpu_workers_s": round(workers, 1), "stderr": err[-1500:]}


def _job(name: str, manifest: Path, base_url: str, *, shard_rows: int = 10_000, input_extra: str = "",
         images_extra: str = "") -> Path:
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    job = folder / "job.toml"
    job.write_text(f"""name = "{name}"
[input]
path = "{manifest}"
id_column = "id"
image_column = "image"
prompt_column = "prompt"
{input_extra}
[endpoint]
base_url = "{base_url}"
model = "bench-vl"
[request]
max_tokens = 32
[limits]
requests_per_minute = 1e7
max_concurrency = 32
timeout_s = 60
[images]
{images_extra}
[output]
path = "{folder / 'out'}"
[run]
shard_rows = {shard_rows}
""")
    return job


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 2)


def memory(rows: int = ROWS, shard_sizes: tuple[int, ...] = (10_000, 1_000)) -> dict[str, Any]:
    manifest, image_bytes = _manifest(rows)
    out: dict[str, Any] = {"rows": rows, "images_gb": round(image_bytes / 1e9, 2), "row_group_rows": GROUP_ROWS,
                           "manifest_gb": round(manifest.stat().st_size / 1e9, 2)}
    with serving(analyze_images=False) as (url, _):
        for shard_rows in shard_sizes:
            name = f"mem-{shard_rows}"
            r = _run(_job(name, manifest, url, shard_rows=shard_rows), plan=HERE / name / ".pipeline" / name / "plan.json")
            assert r["exit_code"] == 0, r["stderr"]
            folder = HERE / name
            out[f"shard_rows_{shard_rows}"] = {
                **{k: v for k, v in r.items() if k != "stderr"}, "images_per_s": round(rows / r["wall_s"], 1),
                "output_mb": _size_mb(folder / "out"), "checkpoint_mb": _size_mb(folder / ".pipeline"),
            }
    return out


# -- S3 vs local disk ------------------------------------------------------------------------


def _read_rate(read: Any, names: list[str], threads: int) -> float:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(len(b) for b in pool.map(read, names))
    assert total > 0
    return round(len(names) / (time.perf_counter() - start), 1)


def s3_vs_local(n: int = S3_IMAGES, threads: int = 8) -> dict[str, Any]:
    import s3fs

    folder = HERE / "s3-local-images"
    folder.mkdir(parents=True, exist_ok=True)
    images = [_base(i % DISTINCT) + i.to_bytes(8, "big") for i in range(n)]
    for i, data in enumerate(images):
        (folder / f"{i:05d}.jpg").write_bytes(data)
    moto, s3_url = start_moto_s3()
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        fs = s3fs.S3FileSystem(endpoint_url=s3_url, skip_instance_cache=True)
        fs.mkdir("bench-images")
        for i, data in enumerate(images):
            fs.pipe_file(f"bench-images/{i:05d}.jpg", data)
        local_csv, s3_csv = HERE / "local.csv", HERE / "s3.csv"
        local_csv.write_text("id,prompt,image\n" + "".join(f"r{i},Describe {i}.,{folder}/{i:05d}.jpg\n" for i in range(n)))
        s3_csv.write_text("id,prompt,image\n" + "".join(f"r{i},Describe {i}.,s3://bench-images/{i:05d}.jpg\n" for i in range(n)))
        out: dict[str, Any] = {"images": n, "image_kb": round(sum(map(len, images)) / n / 1024, 1)}
        with serving(analyze_images=False) as (url, endpoint_pid):
            for name, manifest, extra in (
                ("local", local_csv, f'allowed_roots = ["{folder}"]'),
                ("s3", s3_csv, f'allowed_buckets = ["s3://bench-images/"]\nfetch_concurrency = {threads}'),
            ):
                inp = f'storage_options = {{ endpoint_url = "{s3_url}" }}' if name == "s3" else ""
                moto_before, ep_before = _cpu_s(moto.pid), _cpu_s(endpoint_pid)
                r = _run(_job(f"inline-{name}", manifest, url, input_extra=inp, images_extra=extra), env)
                assert r["exit_code"] == 0, r["stderr"]
                out[name] = {"images_per_s": round(n / r["wall_s"], 1), "wall_s": r["wall_s"], "cpu_run_s": r["cpu_run_s"],
                             "cpu_workers_s": r["cpu_workers_s"], "cpu_moto_s": round(_cpu_s(moto.pid) - moto_before, 1),
                             "cpu_endpoint_s": round(_cpu_s(endpoint_pid) - ep_before, 1)}
        out["raw_read_per_s"] = {
            "s3_fsspec": _read_rate(lambda p: fs.cat_file(p, start=0, end=50 << 20), [f"bench-images/{i:05d}.jpg" for i in range(n)], threads),
            "local": _read_rate(lambda p: Path(p).read_bytes(), [str(folder / f"{i:05d}.jpg") for i in range(n)], threads),
        }
        return out
    finally:
        stop_moto_s3(moto)


def run_media_bench() -> dict[str, Any]:
    return {"s3_vs_local": s3_vs_local(), "memory": memory()}


if __name__ == "__main__":
    import json

    which = sys.argv[1:] or ["s3", "memory"]
    results = {w: (s3_vs_local() if w == "s3" else memory(shard_sizes=(1_000,)) if w == "memory1000" else memory())
               for w in which}
    print(json.dumps(results, indent=1))
