"""Shared fixtures: the built-in endpoint in its own process, job files, manifests, CLI runs.

Everything is real: the endpoint is `python -m pipeline serve` over loopback HTTP, the pipeline
writes real Parquet, and process tests start and kill real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo"
# A copy of ../shared/seed/000_4400dc17c2af3cde.txt, the provider page the project started from:
# the tests must not depend on a folder outside the repository.
SEED = ROOT / "tests" / "fixtures" / "seed_chatfire_qwen.txt"


@dataclass
class Endpoint:
    base_url: str
    proc: subprocess.Popen

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root + "/stats", timeout=10) as r:
            return json.loads(r.read())

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.root + "/requests", timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.root + "/stats/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()

    def advance_batches(self, seconds: float) -> None:
        """Move the endpoint's batch clock `seconds` ahead: its batches age without a test waiting."""
        req = urllib.request.Request(self.root + "/admin/batch_clock", data=json.dumps({"advance_s": seconds}).encode())
        urllib.request.urlopen(req, timeout=10).read()


def start_endpoint(**options: Any) -> Endpoint:
    proc = subprocess.Popen(
        # --parent-pid: a killed pytest leaves no endpoint behind
        [sys.executable, "-m", "pipeline", "serve", "--options-json", json.dumps(options), "--parent-pid", str(os.getpid())],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    assert line.startswith("serving on "), line
    return Endpoint(line.removeprefix("serving on "), proc)


@pytest.fixture
def endpoint_factory() -> Iterator[Any]:
    started: list[Endpoint] = []

    def make(**options: Any) -> Endpoint:
        ep = start_endpoint(**options)
        started.append(ep)
        return ep

    yield make
    for ep in started:
        ep.proc.terminate()
        ep.proc.wait(10)


@pytest.fixture
def endpoint(endpoint_factory: Any) -> Endpoint:
    return endpoint_factory(record=True)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def write_job(path: Path, sections: dict[str, Any]) -> Path:
    """Write a TOML job file from nested dicts: top-level scalars first, then [tables]."""
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def job_dict(manifest: Path, base_url: str, out: Path, **overrides: Any) -> dict[str, Any]:  # a table, or a top-level value (name)
    job: dict[str, Any] = {
        "name": "t",
        "input": {"path": str(manifest), "id_column": "id", "image_column": "image", "prompt_column": "prompt"},
        "endpoint": {"base_url": base_url, "model": "test-vl"},
        "request": {"max_tokens": 64},
        "limits": {"requests_per_minute": 60000, "max_concurrency": 8, "max_attempts": 4, "timeout_s": 10},
        "output": {"path": str(out)},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(job.get(section), dict):
            job[section] = {**job[section], **values}
            job[section] = {k: v for k, v in job[section].items() if v is not None}
        else:
            job[section] = values
    return job


def url_manifest(path: Path, n: int, *, fmt: str = "csv", prefix: str = "row") -> Path:
    """n rows, each with its own id, a distinct image URL and a prompt naming the row."""
    rows = [
        {"id": f"{prefix}-{i:05d}", "image": f"https://images.example/{prefix}/{i}.png", "prompt": f"Describe picture {prefix}-{i:05d}"}
        for i in range(n)
    ]
    write_rows(path, rows, fmt)
    return path


def write_rows(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout
    )


def run_process(job: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`pipeline run JOB ARGS` in its own process, its output piped: the run a test kills, races or watches."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job), *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def page_data(html: str) -> dict[str, Any]:
    """The data a report or comparison page holds (its JSON script element)."""
    import re

    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert m is not None
    return json.loads(m.group(1))


def start_run(job: Path, first_commit: Path, timeout: float = 60) -> subprocess.Popen:
    """`pipeline run JOB` in its own process, returned once its first shard is committed (or it
    ended, or `timeout` passed): the moment a test kills it, or changes its input under it."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (first_commit.exists() and first_commit.read_text().strip()) and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    return proc


def read_output(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist() if any(path.glob("*.parquet")) else []


@dataclass
class S3:
    """A real S3 (moto's server) in its own process, for outputs on `s3://` URLs (pipeline.io.storage)."""

    url: str
    proc: subprocess.Popen
    key: str = "AKIATESTKEY0000"  # moto accepts any credentials (and any presigned signature: bench/moto_s3.py)
    secret: str = "secret-0123456789abcdef"

    def env(self) -> dict[str, str]:
        """How a user points s3fs at an S3-compatible store: the usual environment variables."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.url,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def options(self) -> dict[str, str]:
        """The same as `[output] storage_options`: travels with the job (to Ray workers too)."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.url}

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.options(), skip_instance_cache=True)

    def new_bucket(self) -> str:
        name = f"b-{os.urandom(6).hex()}"
        self.fs().mkdir(name)
        return name

    def names(self, prefix: str) -> list[str]:
        fs = self.fs()
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(prefix)) if fs.exists(prefix) else []

    def read(self, prefix: str) -> list[dict[str, Any]]:
        fs = self.fs()
        return pq.read_table(prefix, filesystem=fs).to_pylist() if fs.exists(prefix) else []

    def _recorder(self, action: str) -> bytes:
        method = "GET" if action == "download-recording" else "POST"
        req = urllib.request.Request(f"{self.url}/moto-api/recorder/{action}", method=method,
                                     data=None if method == "GET" else b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            return bytes(r.read())

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, str]]]:
        """The requests the server answered meanwhile, as (method, path and query), in order: moto's
        own recorder (its file is this server's alone: start_moto)."""
        asked: list[tuple[str, str]] = []
        self._recorder("reset-recording")
        self._recorder("start-recording")
        try:
            yield asked
        finally:
            self._recorder("stop-recording")
            for line in self._recorder("download-recording").splitlines():
                rec = json.loads(line)
                asked.append((rec["method"], rec["url"].split("://", 1)[-1].partition("/")[2]))


def start_moto(env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
    """moto's S3 server in its own process on a free loopback port: (its URL, the process); `env`
    adds to its environment (e.g. INITIAL_NO_AUTH_ACTION_COUNT=0: it checks credentials)."""
    from bench.moto_s3 import start_moto_s3  # shared with the benchmarks

    # moto records into ./moto_recording by default: one file per server, outside the checkout
    recording = Path(tempfile.mkdtemp(prefix="moto-")) / "recording"
    proc, url = start_moto_s3(env={"MOTO_RECORDER_FILEPATH": str(recording), **(env or {})})
    return url, proc


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    pytest.importorskip("s3fs", reason="the s3 extra is not installed (pip install 'pipeline[s3]')")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'pipeline[test]')")
    from bench.moto_s3 import stop_moto_s3

    url, proc = start_moto()
    yield S3(url, proc)
    stop_moto_s3(proc)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()
