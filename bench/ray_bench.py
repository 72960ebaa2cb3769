"""Ray engine benchmark (issue 8): rows/s with 1 and 2 Ray workers on rows whose images are local
files inlined into the request (and resized, where the job format has `[images] max_side`).

    python -m bench.ray_bench          # needs the extra: pip install 'pipeline[ray]'

A local Ray with num_cpus=2 is started here (its start-up is reported apart, not in the figures);
the runs are `pipeline.run()` in this process against the built-in endpoint in its own process,
which answers at once and does not analyse images, so the figures are the pipeline's own cost.
Each figure is a whole run, Parquet written, timed after a warm-up run has started the workers.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import ray  # at import time: without the extra, `python -m bench` sees no ray scenario at all

from .common import serving, write_job

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "ray"
IMAGE_SIZE = (1600, 1200)  # a phone photo scaled down once: big enough that decoding and encoding cost CPU
DISTINCT_IMAGES = 24
MAX_SIDE = 512

__all__ = ["run_ray_bench"]


def run_ray_bench(rows: int = 1200, workers: tuple[int, ...] = (1, 2), concurrency: int = 16) -> dict[str, Any]:
    from pipeline.config import load_job
    from pipeline.engine import RunOptions, run

    WORK.mkdir(parents=True, exist_ok=True)
    manifest, warmup = _manifest(rows), _manifest(40)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    try:
        with serving(analyze_images=False, answer_bytes=300) as (base_url, server_pid):
            resized = _images_table_supported(base_url, manifest)

            def timed(name: str, engine: str, n_workers: int = 0, rows_from: Path = manifest) -> tuple[float, float, float]:
                """(wall s, the pipeline's CPU s, the endpoint's CPU s) of one whole run."""
                out = WORK / name
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(WORK / ".pipeline" / name, ignore_errors=True)
                job = _job(name, rows_from, base_url, engine=engine, ray_workers=n_workers, concurrency=concurrency, resized=resized)
                server, ours, t = _cpu_s(server_pid), _machine_cpu_s(), time.perf_counter()
                code = run(load_job(job), RunOptions(progress=False))
                wall = time.perf_counter() - t
                assert code == 0, f"{name}: exit code {code}"
                server_cpu = _cpu_s(server_pid) - server
                return wall, _machine_cpu_s() - ours - server_cpu, server_cpu

            local = timed("local", "local")
            timed("warmup", "ray", 2, warmup)  # starts the Ray worker processes; not counted
            figures = {w: timed(f"ray-{w}", "ray", w) for w in workers}
    finally:
        ray.shutdown()
    result: dict[str, Any] = {
        "rows": rows,
        "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG, {_image_bytes() // 1024} KiB on average",
        "preprocessing": f"decoded, resized to max_side {MAX_SIDE}, re-encoded" if resized
        else "none in this branch: read and sent as a base64 data URI",
        "in_flight_per_worker": concurrency,
        "cpus": os.cpu_count(),
        "load_avg_before": round(load_before, 1),  # other work on the machine skews the wall-clock figures
        "ray_start_s": round(ray_start_s, 1),
        "local_rows_per_s": round(rows / local[0], 1),
        "local_cpu_ms_per_row": round(1000 * local[1] / rows, 1),
        "local_endpoint_cpu_pct": round(100 * local[2] / local[0]),
    }
    for w, (wall, cpu, server_cpu) in figures.items():
        result[f"ray_{w}_workers_rows_per_s"] = round(rows / wall, 1)
        # CPU of everything but the endpoint (driver, Ray, workers, image processes): one core carries 1000 / this rows/s.
        result[f"ray_{w}_workers_cpu_ms_per_row"] = round(1000 * cpu / rows, 1)
        # The endpoint shares the same 2 cores.
        result[f"ray_{w}_workers_endpoint_cpu_pct"] = round(100 * server_cpu / wall)
    best = min(v for k, v in result.items() if k.endswith("cpu_ms_per_row") and k.startswith("ray_"))
    result["rows_per_s_per_worker_core"] = round(1000 / best)
    return result


def _machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine (Linux /proc/stat). Less the endpoint's, that is the
    pipeline's: the driver, Ray's own processes, the workers and their image processes, which
    come and go with each shard and would be missed by sampling processes."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """A process's user+system CPU seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _images_table_supported(base_url: str, manifest: Path) -> bool:
    """Whether this branch's job files know `[images] max_side` (image preprocessing, issue 5)."""
    from pipeline.config import load_job
    from pipeline.errors import JobError

    try:
        load_job(_job("probe", manifest, base_url, engine="local", ray_workers=0, concurrency=1, resized=True))
        return True
    except JobError:
        return False


def _job(name: str, manifest: Path, base_url: str, *, engine: str, ray_workers: int, concurrency: int, resized: bool) -> Path:
    # Shards of 300 rows: 4 shards, so 2 workers stay busy; each shard task starts its own image
    # process (~1 s of CPU), negligible at the 10,000+ rows a real shard has.
    run_table = f'engine = "{engine}"\n' + (f"ray_workers = {ray_workers}\n" if engine == "ray" else "")
    images = f"\n[images]\nmax_side = {MAX_SIDE}\n" if resized else ""
    return write_job(WORK / f"{name}.toml", manifest, base_url, WORK / name, concurrency=concurrency, rpm=1_000_000,
                     shard_rows=300, extra=run_table + images, name=name, timeout_s=120)


def _manifest(rows: int) -> Path:
    from PIL import Image

    folder = WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(DISTINCT_IMAGES):
        path = folder / f"photo-{i:02d}.jpg"
        if not path.exists():
            # Smooth gradients plus noise: compresses like a photo, not like a flat test card.
            base = Image.linear_gradient("L").resize(IMAGE_SIZE).convert("RGB")
            noise = Image.effect_noise(IMAGE_SIZE, 40 + i).convert("RGB")
            Image.blend(base, noise, 0.5).save(path, quality=90)
    manifest = WORK / f"manifest-{rows}.csv"
    if manifest.exists():
        return manifest
    with open(manifest, "w") as f:
        f.write("id,image,prompt\n")
        for i in range(rows):
            f.write(f"r{i:06d},images/photo-{i % DISTINCT_IMAGES:02d}.jpg,Describe photo {i} in one sentence.\n")
    return manifest


def _image_bytes() -> int:
    sizes = [p.stat().st_size for p in (WORK / "images").glob("*.jpg")]
    return sum(sizes) // max(1, len(sizes))


if __name__ == "__main__":
    figures = run_ray_bench()
    print(f"# Ray engine on {platform.machine()} with {figures['cpus']} cores")
    for key, value in figures.items():
        print(f"{key:32} {value}")
