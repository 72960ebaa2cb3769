"""No orphans: every process a run starts dies with it, after `kill -9` as after a normal end.

A real `pipeline run` of a job with `[serve]` (the built-in endpoint as its child process) and
local images (so the image worker pool and multiprocessing's resource tracker start) is watched
with psutil; its descendants are collected while it runs, then it is killed or left to finish.
Ray's own processes are out of scope (see pipeline/lifeline.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import DATA, ROOT, job_dict, read_output, write_job, write_rows

GONE_AFTER_S = 5.0  # what the issue allows the children after their run is gone
START_TIMEOUT_S = 90.0  # generous: only to prove the run started its children (2 shared cores)


def _job(tmp_path: Path, rows: int, latency_ms: float) -> Path:
    (tmp_path / "images").mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "badge.png"):
        shutil.copy(DATA / "images" / name, tmp_path / "images" / name)
    names = sorted(os.listdir(tmp_path / "images"))
    manifest = tmp_path / "m.csv"
    write_rows(manifest, [{"id": f"r{i:04d}", "image": f"images/{names[i % 3]}", "prompt": f"Describe {i}"}
                          for i in range(rows)], "csv")
    job = job_dict(manifest, "http://127.0.0.1:1/v1", tmp_path / "out",
                   limits={"max_concurrency": 2},
                   images={"max_side": 64, "workers": 2})  # downscaling: real work in the worker processes
    job["endpoint"].pop("base_url")
    job["serve"] = {"latency_ms": latency_ms}
    return write_job(tmp_path / "job.toml", job)


def _kind(proc: psutil.Process) -> str:
    try:
        line = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return "gone"
    if "resource_tracker" in line:
        return "resource tracker"
    if "multiprocessing" in line:
        return "image worker"
    if "pipeline serve" in line:
        return "endpoint"
    return line


def _start(job: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _children_once_all_started(run: subprocess.Popen) -> dict[int, psutil.Process]:
    """The run's descendants, once the endpoint, image workers and resource tracker all run."""
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and run.poll() is None:
        try:
            seen.update({p.pid: p for p in psutil.Process(run.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            break
        if {"endpoint", "image worker", "resource tracker"} <= {_kind(p) for p in seen.values()}:
            return seen
        time.sleep(0.05)
    run.kill()
    run.wait(30)
    _kill_all(seen)
    pytest.fail(f"the run did not start all its children: {sorted(_kind(p) for p in seen.values())}; "
                f"exit {run.returncode}; {run.stderr.read().decode()[-2000:] if run.stderr else ''}")


def _alive(procs: dict[int, psutil.Process]) -> list[str]:
    """The ones still running; a zombie (dead, waiting for init to reap it) counts as gone."""
    out = []
    for p in procs.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{_kind(p)} (pid {p.pid})")
        except psutil.NoSuchProcess:
            pass
    return out


def _alive_after(procs: dict[int, psutil.Process], seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(procs)


def _kill_all(procs: dict[int, psutil.Process]) -> None:
    """Leave nothing behind even when the test fails (is_running checks the pid was not reused)."""
    for p in procs.values():
        try:
            if p.is_running():
                p.kill()
        except psutil.NoSuchProcess:
            pass


def test_kill_9_of_a_run_leaves_no_process_alive(tmp_path: Path) -> None:
    job = _job(tmp_path, rows=400, latency_ms=200)  # about a minute of work: killed well before its end
    run = _start(job)
    children: dict[int, psutil.Process] = {}
    try:
        children = _children_once_all_started(run)
        assert run.poll() is None, "the run ended before it could be killed mid-run"
        run.send_signal(signal.SIGKILL)
        assert run.wait(30) == -signal.SIGKILL
        left = _alive_after(children, GONE_AFTER_S)
        assert left == [], f"alive {GONE_AFTER_S:g} s after the run was killed: {left}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
        _kill_all(children)


def test_a_run_that_ends_normally_leaves_no_process_alive(tmp_path: Path) -> None:
    job = _job(tmp_path, rows=60, latency_ms=50)
    run = _start(job)
    children: dict[int, psutil.Process] = {}
    try:
        children = _children_once_all_started(run)
        assert run.wait(120) == 0, run.stderr.read().decode() if run.stderr else ""
        assert len(read_output(tmp_path / "out")) == 60
        left = _alive_after(children, GONE_AFTER_S)
        assert left == [], f"alive {GONE_AFTER_S:g} s after the run ended: {left}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
        _kill_all(children)


def test_an_endpoint_whose_parent_is_already_gone_exits_at_once(tmp_path: Path) -> None:
    """The parent may die while its child starts, before the child can ask to die with it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    serve = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", "0", "--parent-pid", str(gone.pid)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, _ = serve.communicate(timeout=60)  # it ends by itself; without the check it would serve for good
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(30)
    assert serve.returncode == -signal.SIGKILL  # as the kernel would end it, before serving anything
    assert out == b""
