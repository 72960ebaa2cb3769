"""Supervision (issue 12): every run ends, every row is there exactly once, the exit code tells
the truth, and nothing journaled is bought twice, when something the pipeline did not plan for
happens: a bug in one row's processing, in a shard commit or in the producer (fault points armed by
PIPELINE_FAULT_AT, as the crash points are), a full disk (a real tmpfs), a hung endpoint under
SIGTERM, a second job on the same output folder, a part file changed behind the job's back.

Each run is a real `pipeline run` process against the built-in endpoint; every subprocess has a
timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest
from conftest import (
    ROOT,
    job_dict,
    read_output,
    run_cli,
    url_manifest,
    write_job,
    write_rows,
)

from pipeline.io.journal import journal_path
from pipeline.io.storage import OWNER_FILE

ROWS = 120
RUN_TIMEOUT_S = 90


def make_job(tmp_path: Path, base_url: str, n: int = ROWS, name: str = "t", **over: Any) -> Path:
    manifest = tmp_path / "m.csv"
    if not manifest.exists():
        url_manifest(manifest, n)
    job = job_dict(manifest, base_url, tmp_path / "out", limits={"max_concurrency": 4, **over.pop("limits", {})},
                   run={"shard_rows": 30, **over.pop("run", {})}, **over)
    job["name"] = name
    return write_job(tmp_path / f"{name}.toml", job)


def last_run(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "last_run.json").read_text())


def checkpoint(tmp_path: Path, name: str = "t") -> Path:
    return tmp_path / ".pipeline" / name


def assert_every_row_once(tmp_path: Path, n: int = ROWS) -> dict[str, dict[str, Any]]:
    rows = read_output(tmp_path / "out")
    assert Counter(r["id"] for r in rows) == Counter(f"row-{i:05d}" for i in range(n)), "every id exactly once"
    return {r["id"]: r for r in rows}


def assert_no_row_bought_twice(endpoint: Any) -> None:
    per_row = endpoint.stats()["per_row"]
    assert max(per_row.values()) == 1, {k: v for k, v in per_row.items() if v > 1}


# -- a bug in one row: an error row, the run goes on -----------------------------------------

def test_an_unexpected_exception_in_one_row_is_an_internal_error_row(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    job = make_job(tmp_path, ep.base_url)
    r = run_cli("run", str(job), env={"PIPELINE_FAULT_AT": "row:7"}, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 1, r.stderr  # finished, with one failed row
    rows = assert_every_row_once(tmp_path)
    internal = [row for row in rows.values() if row["status"] == "error"]
    assert len(internal) == 1 and internal[0]["error_kind"] == "internal"
    assert "InjectedFault" in internal[0]["error"] and "injected fault at row" in internal[0]["error"]
    assert sum(row["status"] == "ok" for row in rows.values()) == ROWS - 1
    assert "internal error" in r.stderr and "errors.log" in r.stderr
    log = (checkpoint(tmp_path) / "errors.log").read_text()
    assert "Traceback" in log and internal[0]["id"] in log
    summary = last_run(checkpoint(tmp_path))
    assert (summary["exit_code"], summary["failed_by_kind"]) == (1, {"internal": 1})
    report = run_cli("status", str(job)).stdout  # the kind explained, from the ErrorKind enum
    assert "  internal 1: an exception the pipeline did not plan for" in report and "--retry-failed" in report

    # once the bug is fixed, only that row goes again
    again = run_cli("run", str(job), "--retry-failed=internal", timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr
    assert all(row["status"] == "ok" for row in assert_every_row_once(tmp_path).values())
    per_row = ep.stats()["per_row"]
    assert sum(per_row.values()) == ROWS  # the row that met the bug was not sent the first time


# -- a bug in shared machinery: a clean stop, exit 4, nothing lost ----------------------------

@pytest.mark.parametrize("point", ["commit:2", "produce:2"])
def test_an_unexpected_exception_in_shared_machinery_stops_cleanly(tmp_path: Path, endpoint_factory: Any, point: str) -> None:
    ep = endpoint_factory(latency_ms=5)
    job = make_job(tmp_path, ep.base_url)
    r = run_cli("run", str(job), env={"PIPELINE_FAULT_AT": point}, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 4, r.stderr
    assert "InjectedFault" in r.stderr and "to continue: pipeline run" in r.stderr
    summary = last_run(checkpoint(tmp_path))
    assert summary["exit_code"] == 4 and summary["stopped"]["local"] is True
    assert summary["stopped"]["kind"] == "internal" and "InjectedFault" in summary["stopped"]["message"]
    committed = {row["id"] for row in read_output(tmp_path / "out")}
    assert summary["pending"] == ROWS - len(committed) > 0  # the summary counts what the output holds
    status = json.loads(run_cli("status", str(job), "--json").stdout)
    assert (status["ok"], status["pending"]) == (summary["ok"], summary["pending"])
    assert status["last_run"]["exit_code"] == 4
    assert "last run stopped: " in run_cli("status", str(job)).stdout  # and why, in the plain report

    # the lock was released; the next run finishes and buys nothing twice
    again = run_cli("run", str(job), timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr
    assert_every_row_once(tmp_path)
    assert_no_row_bought_twice(ep)


# -- SIGTERM always ends the run -------------------------------------------------------------

def test_sigterm_ends_a_run_whose_requests_never_answer(tmp_path: Path, endpoint_factory: Any) -> None:
    """The endpoint holds every request for a minute: the stop waits grace_s for them, then
    cancels them, commits and exits 143, with the lock released."""
    ep = endpoint_factory(latency_ms=60_000)
    job = make_job(tmp_path, ep.base_url, limits={"grace_s": 1.0, "timeout_s": 120})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while ep.stats()["requests"] < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ep.stats()["requests"] >= 4, "the run never sent"
    sent_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert time.monotonic() - sent_term < 1.0 + 10.0  # grace_s + the stop's deadline, at most
    assert last_run(checkpoint(tmp_path))["pending"] == ROWS
    assert run_cli("status", str(job)).returncode == 0  # nothing holds the lock


# -- a full disk: a clean stop naming the path; freed, the next run finishes ----------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): the full-disk test needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(mount: Path, leave: int) -> Path:
    """Take all of the tmpfs but about `leave` bytes with one file, so a run fills it soon."""
    st = os.statvfs(mount)
    filler = mount / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def journaled_ids(ckpt: Path, shards: int) -> set[str]:
    ids = set()
    for i in range(shards):
        path = journal_path(ckpt / "journal", i)
        if path.exists():
            for line in path.read_bytes().split(b"\n"):
                try:
                    ids.add(json.loads(line)["id"])
                except ValueError:
                    pass  # the torn last line a full disk left
    return ids


@pytest.mark.parametrize("where", ["checkpoint", "output"])
def test_a_full_disk_stops_cleanly_and_the_next_run_buys_nothing_journaled_again(
    tmp_path: Path, endpoint_factory: Any, small_tmpfs: Path, where: str
) -> None:
    ep = endpoint_factory(answer_bytes=600)
    over: dict[str, Any] = {"output": {"path": str(tmp_path / "out"), "checkpoint": str(small_tmpfs / "ckpt")}}
    if where == "output":
        over = {"output": {"path": str(small_tmpfs / "out"), "checkpoint": str(tmp_path / "ckpt")}}
    job = make_job(tmp_path, ep.base_url, **over)
    ckpt = Path(over["output"]["checkpoint"])
    out = Path(over["output"]["path"])
    filler = fill(small_tmpfs, leave=40_000 if where == "checkpoint" else 8_000)

    r = run_cli("run", str(job), timeout=RUN_TIMEOUT_S)
    assert r.returncode == 4, r.stderr
    error = r.stderr.splitlines()[0]
    assert error.startswith("error: ") and "no space left on the device" in error and "free some space" in error
    full = ckpt / "journal" / "shard-000000.jsonl" if where == "checkpoint" else out / "part-000000.parquet"
    assert f"({full})" in error  # the path that could not be written
    before = journaled_ids(ckpt, 4)
    assert before, "some answers were journaled before the disk filled"

    filler.unlink()  # space freed
    again = run_cli("run", str(job), timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr
    rows = pq.read_table(out).to_pylist()
    assert Counter(row["id"] for row in rows) == Counter(f"row-{i:05d}" for i in range(ROWS))
    per_row = ep.stats()["per_row"]
    for row_id in before:  # what was journaled is not bought again
        assert per_row[f"Describe picture {row_id}"] == 1, row_id


# -- one output folder, one job --------------------------------------------------------------

def test_a_second_job_on_the_same_output_folder_is_refused(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    first = make_job(tmp_path, ep.base_url, name="captions")
    assert run_cli("run", str(first)).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert OWNER_FILE in before and json.loads(before[OWNER_FILE])["job"] == "captions"

    other = make_job(tmp_path, ep.base_url, name="labels")  # another job, the same [output] path
    sent = ep.stats()["requests"]
    r = run_cli("run", str(other))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "belongs to the job 'captions'" in r.stderr and "choose another [output] path" in r.stderr
    assert ep.stats()["requests"] == sent  # nothing sent
    assert run_cli("run", str(other), "--restart").returncode == 2  # --restart removes nothing of another job's
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_part_changed_in_place_is_rebuilt_from_the_journal(tmp_path: Path, endpoint_factory: Any) -> None:
    """Same size, same row count in its footer, other bytes: only the digest tells."""
    ep = endpoint_factory()
    job = make_job(tmp_path, ep.base_url)
    assert run_cli("run", str(job)).returncode == 0
    part = tmp_path / "out" / "part-000001.parquet"
    good = part.read_bytes()
    data = bytearray(good)
    data[8] ^= 0xFF  # in the first data page, after the magic: the footer is untouched
    part.write_bytes(bytes(data))
    assert pq.read_metadata(part).num_rows == 30  # the footer still reads

    sent = ep.stats()["requests"]
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert "part-000001.parquet does not match its commit record; it is rebuilt from the journal" in r.stderr
    assert ep.stats()["requests"] == sent  # rebuilt, not bought again
    assert_every_row_once(tmp_path)


# -- an empty manifest -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_empty_manifest_gives_an_empty_readable_dataset(tmp_path: Path, endpoint_factory: Any, fmt: str) -> None:
    ep = endpoint_factory()
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        manifest.write_text("id,image,prompt\n", encoding="utf-8")
    else:
        import pyarrow as pa

        pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.string()),
                                 "prompt": pa.array([], pa.string())}), manifest)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out"))
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert "has no rows; nothing to send" in r.stderr
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 0
    assert {"id", "image", "prompt", "answer", "reasoning", "status", "error", "error_kind"} <= set(table.column_names)
    assert ep.stats()["requests"] == 0

    # rows appended later are sent, and the empty part gives way to the first shard's
    write_rows(manifest, [{"id": "a", "image": "https://x.example/a.png", "prompt": "Describe a"}], fmt)
    assert run_cli("run", str(job)).returncode == 0
    assert [row["id"] for row in read_output(tmp_path / "out")] == ["a"]
