"""The Python API (pipeline.api): run / arun / load_job / RunResult, against the real built-in
endpoint, from a script, a thread, a running event loop, a script without a `__main__` guard (a
real subprocess with local images, so real image worker processes), a signal mid-run, and every
manifest type. A notebook with a real Jupyter kernel is in tests/test_notebook.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

import pipeline
from pipeline import JobError, LockedError, RunResult
from pipeline.io.checkpoint import open_checkpoint

from conftest import DATA, ROOT, job_dict, read_output, run_cli, url_manifest, write_job

COMPARED = ["id", "image", "prompt", "answer", "status", "error_kind", "prompt_tokens", "completion_tokens"]


def _rows(n: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i:05d}", "image": f"https://images.example/{prefix}/{i}.png",
             "prompt": f"Describe picture {prefix}-{i:05d}"} for i in range(n)]


def _job(tmp_path: Path, base_url: str, **overrides: Any) -> dict[str, Any]:
    job = job_dict(tmp_path / "unused.csv", base_url, tmp_path / "out", **overrides)
    del job["input"]["path"]  # the manifest comes in memory
    return job


def _sent(endpoint: Any) -> int:
    return endpoint.stats()["requests"]


def test_output_frame_matches_the_cli_for_the_same_job(tmp_path: Path, endpoint) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 30)
    cli_job = write_job(tmp_path / "cli.toml", job_dict(manifest, endpoint.base_url, tmp_path / "cli-out", run={"shard_rows": 7}))
    r = run_cli("run", str(cli_job))
    assert r.returncode == 0, r.stderr
    api_job = _job(tmp_path, endpoint.base_url, run={"shard_rows": 7})
    api_job["name"] = "api"
    res = pipeline.run(api_job, manifest=pd.read_csv(manifest), progress=False)
    assert isinstance(res, RunResult)
    assert (res.exit_code, res.ok, res.failed, res.pending, res.rows) == (0, 30, 0, 0, 30)
    assert res.output == str(tmp_path / "out")
    mine = res.to_pandas()[COMPARED]
    theirs = pd.read_parquet(tmp_path / "cli-out")[COMPARED]
    pd.testing.assert_frame_equal(mine, theirs)
    assert res.to_arrow().num_rows == 30


def _dataset(rows: list[dict[str, Any]]) -> Any:
    datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("kind", ["pandas", "arrow", "list", "datasets"])
def test_each_manifest_type_runs_and_a_rerun_sends_nothing(tmp_path: Path, endpoint, kind: str) -> None:
    rows = _rows(12)
    manifest = {"pandas": lambda: pd.DataFrame(rows), "arrow": lambda: pa.Table.from_pylist(rows),
                "list": lambda: [dict(r) for r in rows], "datasets": lambda: _dataset(rows)}[kind]
    job = pipeline.load_job(_job(tmp_path, endpoint.base_url))
    res = pipeline.run(job, manifest=manifest())
    assert (res.exit_code, res.ok, res.pending) == (0, 12, 0)
    assert res.to_pandas()["id"].tolist() == [r["id"] for r in rows]
    sent = _sent(endpoint)
    assert sent == 12
    again = pipeline.run(job, manifest=manifest())  # the same cell run again, the frame rebuilt
    assert (again.exit_code, again.ok, again.summary["this_run"]["requests_sent"]) == (0, 12, 0)
    assert _sent(endpoint) == sent
    stored = open_checkpoint(job.output).manifest_path
    assert stored.exists()
    if kind == "datasets":
        assert again.to_dataset().num_rows == 12


def test_a_changed_frame_is_an_edited_manifest(tmp_path: Path, endpoint) -> None:
    job = _job(tmp_path, endpoint.base_url, run={"shard_rows": 5})
    first = pipeline.run(job, manifest=pd.DataFrame(_rows(8)))
    assert first.ok == 8 and _sent(endpoint) == 8
    grown = pipeline.run(job, manifest=pd.DataFrame(_rows(11)))  # rows appended: only they are sent
    assert (grown.exit_code, grown.ok, grown.summary["this_run"]["requests_sent"]) == (0, 11, 3)
    assert _sent(endpoint) == 11
    edited = _rows(11)
    edited[2]["prompt"] = "something else"
    with pytest.raises(JobError, match=r"rows 0-4 changed.*restart=True"):
        pipeline.run(job, manifest=pd.DataFrame(edited))
    redone = pipeline.run(job, manifest=pd.DataFrame(edited), restart=True)
    assert (redone.exit_code, redone.ok) == (0, 11)
    out = redone.to_pandas().set_index("id")
    assert "something else" in out.loc["row-00002", "answer"]


def test_named_index_and_relative_paths_of_a_dict_job(tmp_path: Path, endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dict job resolves relative paths against the working directory; so do a frame's local
    image paths; a named index (df.set_index("id")) is kept as a column."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(DATA / "images", tmp_path / "images")
    job = _job(tmp_path, endpoint.base_url)
    job["output"] = {"path": "results"}
    df = pd.DataFrame({"id": ["a", "b"], "image": ["images/chelsea.jpg", "images/badge.png"], "prompt": ["x", "y"]})
    res = pipeline.run(job, manifest=df.set_index("id"))
    assert (res.exit_code, res.ok) == (0, 2)
    assert res.output == str(tmp_path / "results")
    out = res.to_pandas().set_index("id")
    assert "JPEG image, 451x300 pixels" in out.loc["a", "answer"] and "PNG image" in out.loc["b", "answer"]


async def test_arun_inside_a_running_loop_keeps_the_loop_free(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(latency_ms=100)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    started = time.monotonic()
    res = await pipeline.arun(_job(tmp_path, ep.base_url), manifest=_rows(16))
    took = time.monotonic() - started
    t.cancel()
    assert (res.exit_code, res.ok) == (0, 16)
    assert ticks > took / 0.01 / 4  # the caller's loop kept running while the job did (the run has its own)
    # the sync call works from inside a running loop too (a notebook cell calling run())
    assert pipeline.run(_job(tmp_path, ep.base_url), manifest=_rows(16)).summary["this_run"]["requests_sent"] == 0


async def test_cancelling_arun_stops_the_run_cleanly_and_a_rerun_finishes(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(latency_ms=300)
    job = _job(tmp_path, ep.base_url, limits={"max_concurrency": 2})
    task = asyncio.create_task(pipeline.arun(job, manifest=_rows(40), progress=False))
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = json.loads(Path(open_checkpoint(pipeline.load_job(job).output).summary_where).read_text())
    assert last["exit_code"] == 130 and 0 < last["ok"] < 40 and last["pending"] > 0
    res = pipeline.run(job, manifest=_rows(40))
    assert (res.exit_code, res.ok) == (0, 40)
    assert res.to_pandas()["id"].tolist() == [r["id"] for r in _rows(40)]  # every row exactly once


def test_run_from_a_thread(tmp_path: Path, endpoint) -> None:
    box: dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.update(res=pipeline.run(_job(tmp_path, endpoint.base_url), manifest=_rows(9))))
    th.start()
    th.join(120)
    assert box["res"].exit_code == 0 and box["res"].ok == 9


def test_errors_are_exceptions_from_the_tree_never_systemexit(tmp_path: Path, endpoint) -> None:
    job = _job(tmp_path, endpoint.base_url)
    with pytest.raises(JobError, match=r"\[limits\] max_concurency: unknown key"):
        pipeline.load_job({**job, "limits": {"max_concurency": 3}})
    with pytest.raises(JobError, match="has no manifest file; pass manifest="):
        pipeline.run(job)
    with pytest.raises(JobError, match="cannot be a manifest"):
        pipeline.run(job, manifest={"id": [1]})
    with pytest.raises(JobError, match="item 1 of the list is a str"):
        pipeline.run(job, manifest=[{"id": "a"}, "b"])
    with pytest.raises(JobError, match="retry_failed: unknown kind 'nope'"):
        pipeline.run(job, manifest=_rows(2), retry_failed="nope")
    with pytest.raises(JobError, match="job file not found"):
        pipeline.load_job(tmp_path / "missing.toml")
    ckpt = open_checkpoint(pipeline.load_job(job).output)
    with ckpt.locked("t"):  # another process's run of the job holds the lock: same flock
        with pytest.raises(LockedError, match="already running"):
            _run_in_child(job)
    assert _sent(endpoint) == 0


def _run_in_child(job: dict[str, Any]) -> None:
    """The lock is a flock, per open file: another process sees it held."""
    code = ("import json, sys, pipeline\n"
            "try:\n    pipeline.run(json.loads(sys.argv[1]), manifest=[{'id': 'a', 'image': 'https://x/1.png', 'prompt': 'p'}])\n"
            "except pipeline.LockedError as e:\n    print('LockedError:', e); sys.exit(7)\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    if r.returncode == 7:
        raise LockedError(r.stdout)
    raise AssertionError(r.stdout + r.stderr)


def test_dry_run_and_retry_failed_keywords(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(row_faults={"row-00003": "400"})
    job = _job(tmp_path, ep.base_url)
    dry = pipeline.run(job, manifest=_rows(6), dry_run=True)
    assert dry.exit_code == 0 and ep.stats()["requests"] == 0
    res = pipeline.run(job, manifest=_rows(6))
    assert (res.exit_code, res.ok, res.failed, res.failed_by_kind) == (1, 5, 1, {"bad_request": 1})
    again = pipeline.run(job, manifest=_rows(6), retry_failed=True)
    assert again.summary["this_run"]["requests_sent"] == 1 and again.exit_code == 1


UNGUARDED = """
import os, sys
import pandas as pd
import pipeline

with open("body-ran.txt", "a") as f:      # once per import of this script
    f.write(f"{os.getpid()}\\n")
images = sorted(os.listdir("images"))
df = pd.DataFrame({"id": [f"r{i}" for i in range(12)], "image": [f"images/{images[i % len(images)]}" for i in range(12)],
                   "prompt": ["what is it?"] * 12})
job = {"name": "unguarded", "input": {"id_column": "id", "image_column": "image", "prompt_column": "prompt"},
       "endpoint": {"model": "m", "base_url": sys.argv[1]}, "images": {"workers": 2, "max_side": 64},
       "limits": {"requests_per_minute": 60000}, "output": {"path": "out"}}
res = pipeline.run(job, manifest=df)
print("RESULT", res.exit_code, res.ok, res.failed)
"""


def test_a_script_without_main_guard_runs_once_with_image_worker_processes(tmp_path: Path, endpoint) -> None:
    shutil.copytree(DATA / "images", tmp_path / "images")
    (tmp_path / "script.py").write_text(textwrap.dedent(UNGUARDED))
    r = subprocess.run([sys.executable, "script.py", endpoint.base_url], capture_output=True, text=True, cwd=tmp_path,
                       timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "RESULT 0 12 0" in r.stdout, r.stdout + r.stderr
    assert len((tmp_path / "body-ran.txt").read_text().split()) == 1  # no worker imported the script
    for req in endpoint.requests():  # the images were really prepared (resized to 64 px) by the workers
        assert json.loads(req["body"])["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/")


INTERRUPTED = """
import sys, pipeline
job = {"name": "ctrlc", "input": {"id_column": "id", "image_column": "image", "prompt_column": "prompt"},
       "endpoint": {"model": "m", "base_url": sys.argv[1]}, "limits": {"requests_per_minute": 60000, "max_concurrency": 2},
       "output": {"path": "out"}}
rows = [{"id": f"r{i:03d}", "image": f"https://x/{i}.png", "prompt": f"p{i}"} for i in range(60)]
print("READY", flush=True)
res = pipeline.run(job, manifest=rows, progress=False)
print("RESULT", res.exit_code, res.ok, res.pending, flush=True)
"""


def test_ctrl_c_in_a_script_stops_like_sigint_and_a_rerun_finishes(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(latency_ms=250)
    (tmp_path / "script.py").write_text(textwrap.dedent(INTERRUPTED))
    cmd = [sys.executable, "script.py", ep.base_url]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    deadline = time.monotonic() + 60
    while ep.stats()["requests"] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err  # the script went on after the run returned
    code, ok, pending = (int(x) for x in out.split("RESULT", 1)[1].split())
    assert code == 130 and ok >= 4 and pending > 0 and ok + pending == 60, out + err
    assert "stopping: finishing requests in flight" in err
    assert "to continue: the same pipeline.run(...) call" in err
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert "RESULT 0 60 0" in r.stdout, r.stdout + r.stderr
    ids = [row["id"] for row in read_output(tmp_path / "out")]
    assert ids == [f"r{i:03d}" for i in range(60)]  # every row exactly once


def test_a_hugging_face_image_dataset_sends_its_image_bytes(tmp_path: Path, endpoint) -> None:
    """HF's Image feature holds bytes (or a path): the bytes go as a data: URI typed by content."""
    datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    from PIL import Image

    png = (DATA / "images" / "badge.png").read_bytes()
    jpeg = (DATA / "images" / "chelsea.jpg").read_bytes()
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(), "prompt": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"id": ["png", "jpeg"], "image": [{"bytes": png, "path": "badge.png"},
                                                                     {"bytes": jpeg, "path": None}],
                                     "prompt": ["what?", "what?"]}, features=features)
    assert isinstance(ds[0]["image"], Image.Image)  # it really is HF's Image feature
    res = pipeline.run(_job(tmp_path, endpoint.base_url), manifest=ds)
    assert (res.exit_code, res.ok) == (0, 2)
    out = res.to_pandas().set_index("id")
    assert "PNG image" in out.loc["png", "answer"] and "JPEG image, 451x300 pixels" in out.loc["jpeg", "answer"]
    again = pipeline.run(_job(tmp_path, endpoint.base_url), manifest=ds)
    assert again.summary["this_run"]["requests_sent"] == 0
