"""Benchmark: inline 1,000 local 12-megapixel JPEGs with max_side = 1024 against the built-in endpoint.

    python -m bench.images [N [process|thread]]    # or: from bench.images import run_image_bench

Reports images per second and the event loop's worst stall while the job runs (target: under
100 ms). The stall is measured inside the running pipeline process: a monitor task on the very
loop the run uses sleeps 10 ms at a time and records how late it wakes up. Nothing in the
pipeline is replaced or patched: the monitor rides in through the event loop policy, which
`asyncio.run` asks for the run's loop.

A control run follows: the same pipeline at the same pace sending image URLs (no image work at
all), so the stalls the machine and the rest of the pipeline cause can be told from the image
work's. On a shared machine both vary from run to run; the load average is reported.

The images are generated once (distinct 4000x3000 photos-like JPEGs: gradients, shapes and
sensor-like noise, ~3-4 MB each) into bench/work/images-12mp/ and reused by later runs.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
IMAGES = WORK / "images-12mp"
SIZE = (4000, 3000)  # 12 megapixels
MONITOR_PERIOD_S = 0.010
TARGET_STALL_MS = 100.0

__all__ = ["run_image_bench", "make_images"]


# -- the images ----------------------------------------------------------------------------

_NOISE: Any = None


def _make_one(index: int) -> int:
    """Write image `index` (a distinct 12-MP JPEG); returns its size. Runs in a worker process."""
    global _NOISE
    from PIL import Image, ImageChops, ImageDraw

    path = IMAGES / f"img-{index:05d}.jpg"
    if path.exists():
        return path.stat().st_size
    if _NOISE is None:  # sensor-like grain, made once per process and shifted per image
        _NOISE = Image.effect_noise(SIZE, 16).convert("RGB")
    w, h = SIZE
    ramp = Image.linear_gradient("L").resize(SIZE)
    r, g, b = ramp, ramp.rotate(90 + index % 180, expand=False).resize(SIZE), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    img = Image.merge("RGB", (r.point(lambda v: (v + index * 7) % 256), g, b))
    draw = ImageDraw.Draw(img)
    for k in range(12):
        x, y = (index * 131 + k * 337) % w, (index * 71 + k * 191) % h
        draw.ellipse((x - 300, y - 200, x + 300, y + 200), fill=((index * 13 + k * 40) % 256, (k * 60) % 256, (index * 3) % 256))
    img = ImageChops.add(img, ImageChops.offset(_NOISE, index * 17 % w, index * 29 % h), scale=1.0, offset=-16)
    tmp = path.with_suffix(".tmp")
    img.save(tmp, "JPEG", quality=88)
    os.replace(tmp, path)  # a killed generation leaves no half image under a real name
    return path.stat().st_size


def make_images(n: int) -> list[Path]:
    IMAGES.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n) if not (IMAGES / f"img-{i:05d}.jpg").exists()]
    if todo:
        print(f"generating {len(todo)} 12-megapixel JPEGs into {IMAGES} (once) ...", file=sys.stderr, flush=True)
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done, _ in enumerate(pool.map(_make_one, todo, chunksize=4), 1):
                if done % 100 == 0:
                    print(f"  {done}/{len(todo)}", file=sys.stderr, flush=True)
    return [IMAGES / f"img-{i:05d}.jpg" for i in range(n)]


# -- the loop monitor ----------------------------------------------------------------------


class _Monitor:
    def __init__(self) -> None:
        self.lateness: list[float] = []
        self.worst = 0.0
        self.worst_at = 0.0  # seconds into the run
        self.began = 0.0

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        self.began = loop.time()
        while True:
            start = loop.time()
            await asyncio.sleep(MONITOR_PERIOD_S)
            late = max(0.0, loop.time() - start - MONITOR_PERIOD_S)
            if late > self.worst:
                self.worst, self.worst_at = late, start - self.began
            self.lateness.append(late)


class _MonitoredPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new loop starts the monitor as its first task (asyncio.run cancels it at the end)."""

    def __init__(self, monitor: _Monitor) -> None:
        super().__init__()
        self.monitor = monitor

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.call_soon(lambda: loop.create_task(self.monitor.watch()))
        return loop


# -- the run -------------------------------------------------------------------------------


def _write_job(name: str, rows: list[str], *, inline: bool, max_side: int, concurrency: int, pool: str, rpm: float) -> Path:
    manifest = WORK / f"{name}.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "prompt"])
        for i, value in enumerate(rows):
            w.writerow([f"row-{i:05d}", value, "Describe the picture."])
    images = f'image_mode = "inline"\nmax_side = {max_side}\npool = "{pool}"' if inline else 'image_mode = "url"'
    job = WORK / f"{name}.toml"
    job.write_text(
        f"""name = "{name}"

[input]
path = "{manifest.name}"
id_column = "id"
image_column = "image"

[endpoint]
model = "bench-vl"

[request]
prompt = "Describe the picture."
max_tokens = 64

[images]
{images}

[limits]
requests_per_minute = {rpm}
burst = 8
max_concurrency = {concurrency}
timeout_s = 60

[output]
path = "out-{name}"

[serve]
analyze_images = false
""",
        encoding="utf-8",
    )
    return job


def _monitored_run(job_path: Path) -> tuple[int, float, dict[str, Any], _Monitor]:
    from pipeline.config import load_job
    from pipeline.engine import RunOptions, run
    from pipeline.io.checkpoint import open_checkpoint

    job = load_job(job_path)
    monitor = _Monitor()
    old_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_MonitoredPolicy(monitor))
    started = time.perf_counter()
    try:
        code = run(job, RunOptions(restart=True, progress=False))
    finally:
        asyncio.set_event_loop_policy(old_policy)
    elapsed = time.perf_counter() - started
    summary = open_checkpoint(job.output).last_summary() or {}  # the run's summary
    return code, elapsed, summary, monitor


def _stalls(monitor: _Monitor) -> dict[str, Any]:
    late_ms = sorted(x * 1000 for x in monitor.lateness) or [0.0]
    return {
        "worst_ms": round(late_ms[-1], 1),
        "worst_at_s": round(monitor.worst_at, 2),
        "p99_ms": round(late_ms[int(0.99 * (len(late_ms) - 1))], 1),
        "median_ms": round(statistics.median(late_ms), 2),
        "over_100ms": sum(1 for x in late_ms if x >= TARGET_STALL_MS),
        "samples": len(late_ms),
    }


def run_image_bench(
    n: int = 1000, *, max_side: int = 1024, concurrency: int = 8, pool: str = "process", control_rows: int = 300
) -> dict[str, Any]:
    """Run the benchmark; returns the figures (images/s, the event loop's stalls, ...).

    The control is the same pipeline at the same pace sending URLs (no image work at all): its
    stalls are what the machine and the rest of the pipeline cause, for comparison.
    """
    # Imported lazily by the run on its loop thread otherwise (pandas by pyarrow's first `take` in
    # the producer, aiohttp.web for the built-in endpoint): a one-time stall of about half a second
    # before any request is sent, which is not what this benchmark measures.
    import pandas  # noqa: F401
    from PIL import __version__ as pillow_version

    import pipeline.tools.serve  # noqa: F401

    paths = make_images(n)
    source_mb = sum(p.stat().st_size for p in paths) / (1 << 20)
    load_before = os.getloadavg()[0]
    rows = [str(p.relative_to(WORK)) for p in paths]
    code, elapsed, summary, monitor = _monitored_run(
        _write_job(f"bench-images-{n}", rows, inline=True, max_side=max_side, concurrency=concurrency, pool=pool, rpm=1e6)
    )
    ok = summary.get("ok", 0)
    rate = ok / elapsed if elapsed else 0.0
    result: dict[str, Any] = {
        "images": n,
        "ok": ok,
        "exit_code": code,
        "max_side": max_side,
        "max_concurrency": concurrency,
        "pool": pool,
        "source_mb": round(source_mb, 1),
        "seconds": round(elapsed, 2),
        "images_per_s": round(rate, 2),
        "loop_stall": _stalls(monitor),
        "stall_target_ms": TARGET_STALL_MS,
        "stall_target_met": max(monitor.lateness, default=0.0) * 1000 < TARGET_STALL_MS,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if control_rows and rate > 0:
        urls = [f"https://images.example/{i}.jpg" for i in range(control_rows)]
        _, _, _, control = _monitored_run(
            _write_job(f"bench-control-{control_rows}", urls, inline=False, max_side=max_side, concurrency=concurrency,
                       pool=pool, rpm=round(rate * 60, 1))
        )
        result["control_loop_stall"] = _stalls(control)  # same pace, no image work
    result.update(machine=_machine(), python=platform.python_version(), pillow=pillow_version)
    return result


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs {model}".strip() + f", {platform.system()} {platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 1000
    pool = args[1] if len(args) > 1 else "process"  # or "thread", to compare
    r = run_image_bench(n, pool=pool)
    print(json.dumps(r, indent=1))
    stall = r["loop_stall"]
    control = r.get("control_loop_stall")
    print(
        f"images: {r['ok']}/{n} 12-MP JPEGs inlined at max_side {r['max_side']} ({pool} pool) in {r['seconds']} s: "
        f"{r['images_per_s']} images/s; event loop worst stall {stall['worst_ms']} ms, p99 {stall['p99_ms']} ms, "
        f"{stall['over_100ms']} of {stall['samples']} ticks over {TARGET_STALL_MS:g} ms "
        f"(target < {TARGET_STALL_MS:g} ms: {'met' if r['stall_target_met'] else 'NOT met'})"
        + (f"; control without images: worst {control['worst_ms']} ms, p99 {control['p99_ms']} ms" if control else "")
        + f"; {r['machine']}, load average {r['load_average_before_after']}"
    )
    return 0 if r["ok"] == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
