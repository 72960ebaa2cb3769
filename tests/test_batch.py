"""Batch mode ([run] mode = "batch") against the built-in endpoint's Batch API: the same rows as an
online run, kill -9 at every step and a resume that never creates a batch twice, failed and
expired batches, failed lines, splitting, --no-wait and --cancel-batches, status, and the
export-batch / import-batch round trip.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import job_dict, read_output, run_cli, run_process, url_manifest, write_job

COMPARED = ("id", "answer", "reasoning", "prompt_tokens", "completion_tokens", "total_tokens", "model", "status")
PRICES = {"input_per_million": 2.0, "output_per_million": 6.0}


def _job(tmp_path: Path, base_url: str, n: int = 10, name: str = "b", **overrides: Any) -> Path:
    manifest = tmp_path / "m.csv"
    if not manifest.exists():
        url_manifest(manifest, n)
    run = {"mode": "batch", "poll_s": 0.3, **overrides.pop("run", {})}
    data = {**job_dict(manifest, base_url, tmp_path / f"out-{name}", run=run, **overrides), "name": name}
    return write_job(tmp_path / f"{name}.toml", data)


def _batches(ep: Any) -> list[dict[str, Any]]:
    return ep.stats()["batches"]


def _exactly_once(out: Path, n: int) -> list[dict[str, Any]]:
    rows = read_output(out)
    assert sorted(r["id"] for r in rows) == [f"row-{i:05d}" for i in range(n)]
    return rows


def _when_batches(ep: Any, proc: subprocess.Popen, n: int) -> None:
    """Until the endpoint holds `n` batches (the run `proc` created them), within a deadline."""
    deadline = time.monotonic() + 60
    while len(_batches(ep)) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def _ctrl_c(proc: subprocess.Popen) -> str:
    """SIGINT to a run waiting for its batch, a polling round or two in; its stderr once it ended."""
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("Ctrl-C did not stop a run waiting for its batch") from None


def test_a_batch_run_gives_the_online_rows_at_the_batch_price(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(model="qvq-max-2025-03-25")
    online = write_job(tmp_path / "online.toml", {**job_dict(url_manifest(tmp_path / "m.csv", 12), ep.base_url,
                                                             tmp_path / "out-online", pricing=PRICES), "name": "online"})
    assert run_cli("run", str(online)).returncode == 0
    batch = _job(tmp_path, ep.base_url, 12, pricing=PRICES)
    r = run_cli("run", str(batch))
    assert r.returncode == 0, r.stderr
    by_id = {row["id"]: row for row in read_output(tmp_path / "out-online")}
    rows = _exactly_once(tmp_path / "out-b", 12)
    for row in rows:
        assert {k: row[k] for k in COMPARED} == {k: by_id[row["id"]][k] for k in COMPARED}
        assert row["cost"] == pytest.approx(by_id[row["id"]]["cost"] * 0.5)
        assert row["reasoning"] and row["attempts"] == 1
    assert len(_batches(ep)) == 1 and ep.stats()["requests"] == 12  # online's 12; the batch's lines are not requests
    status = run_cli("status", str(batch), "--json")
    (b,) = json.loads(status.stdout)["batches"]
    assert b["status"] == "completed" and b["collected"] and b["rows"] == 12


@pytest.mark.parametrize("point", ["batch_after_upload", "batch_after_create", "batch_after_poll", "batch_after_download"])
def test_kill_9_at_each_step_then_resume_creates_no_batch_twice(tmp_path: Path, endpoint_factory: Any, point: str) -> None:
    ep = endpoint_factory()
    job = _job(tmp_path, ep.base_url, 9)
    crashed = run_cli("run", str(job), env={"PIPELINE_CRASH_AT": point})
    assert crashed.returncode == 99, crashed.stderr
    resumed = run_cli("run", str(job))
    assert resumed.returncode == 0, resumed.stderr
    batches = _batches(ep)
    assert len(batches) == 1, batches  # found again after the crash, never created twice
    assert sorted(batches[0]["custom_ids"]) == [f"row-{i:05d}" for i in range(9)]
    assert all(r["status"] == "ok" for r in _exactly_once(tmp_path / "out-b", 9))


def test_a_job_over_batch_max_requests_splits(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    job = _job(tmp_path, ep.base_url, 10, run={"batch_max_requests": 4})
    assert run_cli("run", str(job)).returncode == 0
    sizes = sorted(len(b["custom_ids"]) for b in _batches(ep))
    assert sizes == [2, 4, 4]
    ids = [i for b in _batches(ep) for i in b["custom_ids"]]
    assert len(ids) == len(set(ids)) == 10  # no row in two batches
    _exactly_once(tmp_path / "out-b", 10)


def test_failed_lines_retry_only_what_online_would(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_line_faults={"picture row-00003": 400, "picture row-00005": 500})
    job = _job(tmp_path, ep.base_url, 8, limits={"max_attempts": 3})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr
    rows = {row["id"]: row for row in _exactly_once(tmp_path / "out-b", 8)}
    assert rows["row-00003"]["error_kind"] == "bad_request" and rows["row-00003"]["attempts"] == 1  # as online: not retried
    assert rows["row-00005"]["error_kind"] == "server" and rows["row-00005"]["attempts"] == 3  # retried, batch after batch
    assert sum(r["status"] == "ok" for r in rows.values()) == 6
    batches = _batches(ep)
    assert [len(b["custom_ids"]) for b in batches] == [8, 1, 1]  # only the 500 row went into the next batches


def test_expired_batches_send_their_undone_rows_again(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_outcome="expired", batch_expire_fraction=0.5)
    job = _job(tmp_path, ep.base_url, 8, limits={"max_attempts": 6})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr
    rows = {row["id"]: row for row in _exactly_once(tmp_path / "out-b", 8)}
    batches = _batches(ep)
    assert all(b["status"] == "expired" for b in batches)
    # each expired batch did the first half of its lines: the rest, and only the rest, went again
    assert [len(b["custom_ids"]) for b in batches] == [8, 4, 2, 1, 1, 1]
    assert [b["custom_ids"] for b in batches[1:3]] == [[f"row-{i:05d}" for i in range(4, 8)], ["row-00006", "row-00007"]]
    (failed,) = [row for row in rows.values() if row["status"] != "ok"]  # the one no batch got to, 6 times
    assert failed["id"] == "row-00007" and "expired" in failed["error"] and failed["attempts"] == 6
    assert [rows[f"row-{i:05d}"]["attempts"] for i in range(7)] == [1, 1, 1, 1, 2, 2, 3]


def test_failed_batches_end_as_error_rows_after_max_attempts(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_outcome="failed")
    job = _job(tmp_path, ep.base_url, 5, limits={"max_attempts": 2})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr
    assert len(_batches(ep)) == 2
    assert all(row["status"] == "error" and row["error_kind"] == "bad_request" and "the batch failed" in row["error"]
               for row in _exactly_once(tmp_path / "out-b", 5))


def test_no_wait_submits_and_exits_5_then_collects(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_in_progress_s=3600.0)  # an hour at the provider, passed on its batch clock
    job = _job(tmp_path, ep.base_url, 6)
    first = run_cli("run", str(job), "--no-wait")
    assert first.returncode == 5, first.stderr
    assert "still running at the provider" in first.stderr
    status = run_cli("status", str(job))
    assert "running" in status.stdout and "6 requests" in status.stdout
    again = run_cli("run", str(job), "--no-wait")  # nothing new: still running, nothing created twice
    assert again.returncode == 5 and len(_batches(ep)) == 1, again.stderr
    ep.advance_batches(3600 + 60)
    second = run_cli("run", str(job), "--no-wait")
    assert second.returncode == 0, second.stderr
    assert len(_batches(ep)) == 1
    _exactly_once(tmp_path / "out-b", 6)


def test_cancel_batches_keeps_what_was_done_and_a_rerun_finishes(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_in_progress_s=1000.0)
    job = _job(tmp_path, ep.base_url, 8)
    assert run_cli("run", str(job), "--no-wait").returncode == 5
    ep.advance_batches(0.2 + 500)  # validated, then half of the lines done (a slow CLI start moves it by seconds)
    cancelled = run_cli("run", str(job), "--cancel-batches")
    assert cancelled.returncode == 3, cancelled.stderr
    assert "cancelled as asked" in cancelled.stderr
    assert _batches(ep)[0]["status"] == "cancelled"
    journaled = json.loads(run_cli("status", str(job), "--json").stdout)
    kept = journaled["ok"] + journaled["journaled_uncommitted"]
    assert kept == 4  # the lines done before the cancel are kept
    assert run_cli("run", str(job), "--no-wait").returncode == 5  # the rows the cancel left, in a new batch ...
    ep.advance_batches(2000)  # ... done
    assert run_cli("run", str(job), "--no-wait").returncode == 0
    batches = _batches(ep)
    assert len(batches) == 2 and len(batches[1]["custom_ids"]) == 8 - kept  # only the rows the cancel left
    _exactly_once(tmp_path / "out-b", 8)


def test_cancel_batches_of_a_batch_that_already_ended_collects_it(tmp_path: Path, endpoint_factory: Any) -> None:
    """--cancel-batches after the batch completed (the ledger last saw it running): the provider
    answers 409 "Cannot cancel a batch with status 'completed'"; its answers are collected, exit 0."""
    ep = endpoint_factory(batch_in_progress_s=1000.0)
    job = _job(tmp_path, ep.base_url, 4)
    assert run_cli("run", str(job), "--no-wait").returncode == 5
    ep.advance_batches(2000)
    assert _batches(ep)[0]["status"] == "completed"
    result = run_cli("run", str(job), "--cancel-batches")
    assert result.returncode == 0, result.stderr
    _exactly_once(tmp_path / "out-b", 4)


def test_export_batch_is_accepted_by_the_endpoint_and_import_batch_merges_its_output(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    job = _job(tmp_path, ep.base_url, 7, run={"mode": "online"})
    exported = tmp_path / "todo.jsonl"
    r = run_cli("export-batch", str(job), str(exported))
    assert r.returncode == 0, r.stderr
    assert len(exported.read_bytes().splitlines()) == 7 and ep.stats()["requests"] == 0  # nothing sent
    output = _submit_by_hand(ep.base_url, exported)
    done = tmp_path / "done.jsonl"
    done.write_bytes(output)
    imported = run_cli("import-batch", str(job), str(done))
    assert imported.returncode == 0, imported.stderr
    assert "imported 7 answers" in imported.stderr
    assert all(row["status"] == "ok" for row in _exactly_once(tmp_path / "out-b", 7))
    assert run_cli("run", str(job)).returncode == 0 and ep.stats()["requests"] == 0  # nothing left to send


def _submit_by_hand(base_url: str, path: Path) -> bytes:
    """What a person does with an exported file: upload, create, wait, download (plain HTTP)."""
    boundary = "pipelinetest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"todo.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    file_id = _http(base_url + "/files", body, f"multipart/form-data; boundary={boundary}")["id"]
    batch = _http(base_url + "/batches", json.dumps({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                     "completion_window": "24h"}).encode(), "application/json")
    _http(base_url.removesuffix("/v1") + "/admin/batch_clock", b'{"advance_s": 60}', "application/json")  # a minute later
    batch = _http(f"{base_url}/batches/{batch['id']}")
    assert batch["status"] == "completed", batch
    with urllib.request.urlopen(f"{base_url}/files/{batch['output_file_id']}/content", timeout=10) as resp:
        return resp.read()


def _http(url: str, data: bytes | None = None, content_type: str | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if content_type else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_retry_failed_sends_only_the_failed_rows_in_a_new_batch(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_line_faults={"picture row-00002": 400})
    job = _job(tmp_path, ep.base_url, 5)
    assert run_cli("run", str(job)).returncode == 1
    assert run_cli("run", str(job)).returncode == 1 and len(_batches(ep)) == 1  # a rerun sends nothing
    again = run_cli("run", str(job), "--retry-failed")
    assert again.returncode == 1, again.stderr
    batches = _batches(ep)
    assert len(batches) == 2 and batches[1]["custom_ids"] == ["row-00002"]
    rows = {r["id"]: r for r in _exactly_once(tmp_path / "out-b", 5)}
    assert rows["row-00002"]["error_kind"] == "bad_request"


def test_a_ledger_record_after_a_torn_one_is_kept(tmp_path: Path) -> None:
    """A crash mid-append leaves a torn last line in batches.jsonl. The next run's record must not
    be glued onto it (and lost with it): a lost `planned` record re-buys that batch's rows."""
    from pipeline.io.checkpoint import FolderCheckpoint

    first = FolderCheckpoint(tmp_path / "ckpt").ledger()
    first.planned("b1", [(0, "r0")], "p1")
    with open(tmp_path / "ckpt" / "batches.jsonl", "ab") as f:
        f.write(b'{"event": "uploaded", "name": "b1", "fi')  # killed mid-append
    second = FolderCheckpoint(tmp_path / "ckpt").ledger()  # the next run
    assert [b.name for b in second.batches()] == ["b1"]
    second.planned("b2", [(0, "r1")], "p2")
    third = FolderCheckpoint(tmp_path / "ckpt").ledger()
    assert [(b.name, b.rows) for b in third.batches()] == [("b1", [(0, "r0")]), ("b2", [(0, "r1")])]


def test_ctrl_c_while_waiting_leaves_the_batch_at_the_provider_and_a_rerun_collects_it(tmp_path: Path,
                                                                                      endpoint_factory: Any) -> None:
    """Ctrl-C while a run waits for its batch: it exits 130 at once (not after the batch), saying
    the batch goes on; nothing is cancelled, nothing created twice; the rerun collects it."""
    ep = endpoint_factory(batch_in_progress_s=3600.0)  # an hour at the provider, passed on its batch clock
    job = _job(tmp_path, ep.base_url, 6)
    proc = run_process(job)
    _when_batches(ep, proc, 1)
    err = _ctrl_c(proc)
    assert proc.returncode == 130, err
    assert "the batches go on at the provider" in err and "to continue: pipeline run" in err
    (b,) = _batches(ep)
    assert b["status"] == "in_progress"  # not cancelled by the stop
    assert "running" in run_cli("status", str(job)).stdout
    ep.advance_batches(3600 + 60)
    again = run_cli("run", str(job))
    assert again.returncode == 0, again.stderr
    assert len(_batches(ep)) == 1 and ep.stats()["requests"] == 0  # collected: no second batch, nothing online
    _exactly_once(tmp_path / "out-b", 6)


def test_ctrl_c_while_a_retry_failed_batch_waits_is_a_stop_not_a_finished_run(tmp_path: Path,
                                                                             endpoint_factory: Any) -> None:
    """In a --retry-failed run every row has a result (the failed ones) before it sends anything:
    a Ctrl-C while its batch is out is a stop (130, "to continue"), not a complete run, else the
    paid batch is left uncollected (found by a review)."""
    ep = endpoint_factory(batch_line_faults={"picture row-00002": 400}, batch_in_progress_s=3600.0)
    job = _job(tmp_path, ep.base_url, 5)
    first = run_process(job)
    _when_batches(ep, first, 1)
    ep.advance_batches(3600 + 60)
    assert first.wait(timeout=60) == 1, first.communicate()  # one row refused
    retry = run_process(job, "--retry-failed")
    _when_batches(ep, retry, 2)
    err = _ctrl_c(retry)
    assert retry.returncode == 130, err
    assert "the run is complete" not in err and "to continue: pipeline run" in err
