"""Shared bench helpers: the built-in endpoint in its own process, job files, process sampling."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"


@contextmanager
def serving(**options: Any) -> Iterator[tuple[str, int]]:
    """The built-in endpoint in its own process: (base URL, its pid, for its CPU time)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--options-json", json.dumps(options)],
        stdout=subprocess.PIPE, cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    try:
        if not line.startswith("serving on "):
            raise RuntimeError(f"the built-in endpoint did not start: {line!r}")
        yield line.removeprefix("serving on "), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def endpoint(**options: Any) -> Iterator[str]:
    with serving(**options) as (base_url, _pid):
        yield base_url


def stats(base_url: str, *, brief: bool = True) -> dict[str, Any]:
    query = "?brief=1" if brief else ""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats" + query, timeout=30) as r:
        return json.loads(r.read())


def recorded_times(base_url: str) -> list[float]:
    """When each request reached the endpoint (epoch seconds), for an endpoint started with record=True."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/requests", timeout=60) as r:
        return sorted(e["t"] for e in json.loads(r.read()))


def write_job(path: Path, manifest: Path, base_url: str, out: Path, *, concurrency: int, rpm: float = 1e7,
              shard_rows: int = 10_000, extra: str = "", name: str = "bench", max_tokens: int = 256,
              max_attempts: int = 3, timeout_s: float = 60) -> Path:
    """A bench job file; `extra` is appended after `[run] shard_rows` (more [run] keys, then tables)."""
    path.write_text(f"""name = "{name}"
[input]
path = "{manifest}"
id_column = "id"
image_column = "image"
prompt_column = "prompt"
[endpoint]
base_url = "{base_url}"
model = "bench-vl"
[request]
max_tokens = {max_tokens}
[limits]
requests_per_minute = {rpm}
max_concurrency = {concurrency}
max_attempts = {max_attempts}
timeout_s = {timeout_s}
[output]
path = "{out}"
[run]
shard_rows = {shard_rows}
{extra}
""")
    return path


def url_manifest(path: Path, n: int) -> Path:
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            if sum(1 for _ in f) == n + 1:
                return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("id,image,prompt\n")
        for i in range(n):
            f.write(f"r{i:08d},https://images.example/photos/{i % 5000}/{i}.jpg,\"Describe image {i}, in one sentence.\"\n")
    return path


def run_pipeline(job: Path, *, sample: bool = False, base_url: str | None = None) -> dict[str, Any]:
    """Run `pipeline run JOB` as a process; wall time, child CPU time, peak RSS, and optionally
    (rows answered, RSS) samples every 0.5 s (rows read from the endpoint's own count)."""
    # Bytecode caching as on any normal install: this machine sets PYTHONDONTWRITEBYTECODE, which
    # made every start recompile the package (~0.1 s that no user pays).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started_at = time.time()
    start = time.perf_counter()
    before = os.times()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    samples: list[tuple[int, int]] = []
    peak = 0
    while proc.poll() is None:
        rss = _rss_kb(proc.pid)
        peak = max(peak, rss)
        if sample and base_url:
            try:
                samples.append((stats(base_url)["requests"], rss))
            except OSError:
                pass
        time.sleep(0.5 if sample else 0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"exit_code": proc.returncode, "started_at": started_at, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 1024,
            "samples": samples, "stderr": err[-2000:]}


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine() -> dict[str, Any]:
    pkgs = {}
    for name in ("aiohttp", "pyarrow", "pandas", "pillow", "tqdm", "orjson", "uvloop", "ray"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform(),
            "packages": pkgs}


MEASURE = ("import resource, sys, time; from pipeline.cli import main; t = time.perf_counter(); "
           "code = main(sys.argv[1:]); print('figures', time.perf_counter() - t, "
           "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code)")


def measure_command(args: list[str], page: Path, python_path: str | None = None) -> tuple[float, float, int, float]:
    """`pipeline ARGS` in a process of its own: (seconds, peak RSS MB, exit code, MB of `page`).
    `python_path`: another checkout whose code runs instead (`python -c` puts its working folder
    first on sys.path, ahead of PYTHONPATH: the other checkout's folder, so its code is imported)."""
    env = {**os.environ, **({"PYTHONPATH": python_path} if python_path else {})}
    r = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=python_path or ROOT, capture_output=True,
                       text=True, env=env, check=False)
    line = next((x for x in r.stdout.splitlines() if x.startswith("figures ")), None)
    if line is None:
        raise RuntimeError(f"pipeline {args[0]} failed: {r.stderr[-2000:]}")
    _, seconds, rss_kb, code = line.split()
    return round(float(seconds), 2), round(int(rss_kb) / 1024, 1), int(code), round(page.stat().st_size / 2**20, 2)


def module_at(ref: str, path: str, folder: Path) -> ModuleType:
    """The module `path` (e.g. "pipeline/net/stream.py") as it is at git commit `ref`, for a
    before/after: written into `folder` and loaded as a sibling of this tree's module (named
    inside its package), so its relative imports resolve against this tree."""
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    package, stem = path.removesuffix(".py").rsplit("/", 1)
    copy = folder / f"{stem}_{ref}.py"
    copy.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"{package.replace('/', '.')}._bench_{stem}_{ref}", copy)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
