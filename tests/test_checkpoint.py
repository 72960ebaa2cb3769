"""Never lose a paid answer (issue 3): kills, crash points, leftovers, retries, changed jobs, locks."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    job_dict,
    read_output,
    run_cli,
    run_process,
    url_manifest,
    write_job,
)

from pipeline.io.storage import OWNER_FILE

N_ROWS = 400
CONCURRENCY = 8


def make_job(tmp_path: Path, base_url: str, n: int = N_ROWS, **over) -> Path:
    manifest = url_manifest(tmp_path / "m.csv", n)
    return write_job(tmp_path / "job.toml", job_dict(
        manifest, base_url, tmp_path / "out",
        limits={"max_concurrency": CONCURRENCY, **over.pop("limits", {})},
        run={"shard_rows": 50, **over.pop("run", {})}, **over,
    ))


def assert_exactly_once(tmp_path: Path, n: int = N_ROWS) -> list[dict]:
    rows = read_output(tmp_path / "out")
    ids = [r["id"] for r in rows]
    assert Counter(ids) == Counter(f"row-{i:05d}" for i in range(n)), "every id exactly once"
    for r in rows:
        assert r["status"] == "ok" and r["answer"].startswith(f"Answer to 'Describe picture {r['id']}'")
    stray = [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("part-") and p.name != OWNER_FILE]
    assert not stray, "no stray files"
    return rows


def resends(endpoint, runs: int) -> int:
    """Requests beyond one per row: each run may re-send at most the rows it had in flight."""
    per_row = endpoint.stats()["per_row"]
    extra = sum(c - 1 for c in per_row.values())
    assert extra <= runs * CONCURRENCY, f"{extra} rows sent again after {runs} interrupted runs"
    return extra


def test_kill_loop_every_row_exactly_once_and_no_answer_bought_twice(tmp_path: Path, endpoint_factory) -> None:
    # ~6 s of sending in all (400 rows, 8 in flight, ~125 ms each): five kills 0.4-1.2 s after each
    # start (start-up is ~0.5 s) cannot finish the job, so every run is killed, most mid-shard.
    ep = endpoint_factory(latency_ms=100, latency_jitter_ms=50, seed=3)
    job = make_job(tmp_path, ep.base_url)
    rng = random.Random(1)
    kills = 0
    for _ in range(5):
        proc = run_process(job)
        time.sleep(rng.uniform(0.4, 1.2))  # includes start-up: some kills land early, some mid-shard
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert kills == 5
    assert_exactly_once(tmp_path)
    resends(ep, kills)
    assert sum(ep.stats()["per_row"].values()) >= N_ROWS


@pytest.mark.parametrize("point", ["after_response:30", "mid_journal_line:30", "after_part_write:2", "after_rename:2",
                                   "after_seal:2", "mid_compaction:2"])
def test_crash_points_then_resume(tmp_path: Path, endpoint_factory, point: str) -> None:
    ep = endpoint_factory()
    job = make_job(tmp_path, ep.base_url)
    crashed = run_cli("run", str(job), env={"PIPELINE_CRASH_AT": point})
    assert crashed.returncode == 99, crashed.stderr  # died at the crash point
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert_exactly_once(tmp_path)
    resends(ep, 1)  # only what was in flight at the crash is bought twice


def test_planted_leftovers_are_cleaned_and_repaired(tmp_path: Path, endpoint) -> None:
    job = make_job(tmp_path, endpoint.base_url, n=120)
    assert run_cli("run", str(job)).returncode == 0
    out = tmp_path / "out"
    part = out / "part-000000.parquet"
    part.write_bytes(part.read_bytes()[:200])  # a truncated part file
    (out / ".part-000002.parquet.tmp").write_bytes(b"PAR1 half written")  # an orphan temporary file
    journal = tmp_path / ".pipeline" / "t" / "journal" / "shard-000000.jsonl"
    with open(journal, "ab") as f:
        f.write(b'{"id":"row-00001","answer":"tor')  # a torn last journal line in the same shard
    sent_before = endpoint.stats()["requests"]
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert "rebuilt from the journal" in r.stderr and "temporary file" in r.stderr
    assert_exactly_once(tmp_path, 120)
    assert endpoint.stats()["requests"] == sent_before  # all repaired from the journal, nothing re-bought
    assert not journal.exists() or journal.read_bytes().endswith(b"\n")  # cut, then compacted after the commit


def test_retry_failed_resends_only_failed_rows_and_replaces_them(tmp_path: Path, endpoint_factory) -> None:
    # rows 3x fail with 400 on their first request only; rows 7x time out once ("slow" past timeout)
    ep = endpoint_factory(row_faults={"picture row-00003": "400:1", "picture row-00013": "400:1", "picture row-00007": "slow:1"},
                          slow_ms=3000)
    job = make_job(tmp_path, ep.base_url, n=40, limits={"max_attempts": 1, "timeout_s": 1})
    first = run_cli("run", str(job))
    assert first.returncode == 1
    rows = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert {i for i, r in rows.items() if r["status"] == "error"} == {"row-00003", "row-00013", "row-00007"}
    assert rows["row-00007"]["error_kind"] == "timeout" and rows["row-00003"]["error_kind"] == "bad_request"

    only_timeouts = run_cli("run", str(job), "--retry-failed=timeout")
    assert only_timeouts.returncode == 1  # the bad_request rows are still failed
    per_row = ep.stats()["per_row"]
    assert per_row["Describe picture row-00007"] == 2 and per_row["Describe picture row-00003"] == 1

    again = run_cli("run", str(job), "--retry-failed")
    assert again.returncode == 0, again.stderr
    per_row = ep.stats()["per_row"]
    assert sum(per_row.values()) == 40 + 3  # only the three failed rows were sent again
    assert_exactly_once(tmp_path, 40)

    status = json.loads(run_cli("status", str(job), "--json").stdout)
    assert status["ok"] == 40 and status["failed"] == 0 and status["pending"] == 0
    assert status["last_run"]["exit_code"] == 0


def test_second_run_is_locked_out_and_stale_lock_is_taken_over(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(latency_ms=100)
    job = make_job(tmp_path, ep.base_url, n=200, limits={"max_concurrency": 2})
    first = run_process(job)
    time.sleep(1.0)
    second = run_cli("run", str(job))
    assert second.returncode == 75
    assert f"pid {first.pid}" in second.stderr and "already running" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = run_cli("run", str(job))
    assert third.returncode == 0, third.stderr
    assert f"took over the lock left by pid {first.pid}" in third.stderr
    assert_exactly_once(tmp_path, 200)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_commits_what_arrived_and_resumes(tmp_path: Path, endpoint_factory, sig: int, code: int) -> None:
    ep = endpoint_factory(latency_ms=50)
    job = make_job(tmp_path, ep.base_url, n=300, limits={"max_concurrency": 4, "grace_s": 5})
    proc = run_process(job)
    deadline = time.monotonic() + 60
    while ep.stats()["requests"] < 30 and time.monotonic() < deadline:  # mid-run, whatever the load
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "to continue: pipeline run" in err
    partial = read_output(tmp_path / "out")
    assert 0 < len(partial) < 300 and len({r["id"] for r in partial}) == len(partial)
    answered = ep.stats()["requests"]
    assert len(partial) == answered  # every answer that arrived was committed to the output
    assert run_cli("run", str(job)).returncode == 0
    assert_exactly_once(tmp_path, 300)
    assert ep.stats()["requests"] == 300  # the grace period let in-flight answers land: none re-sent


def test_finished_job_rerun_sends_nothing_and_writes_summary(tmp_path: Path, endpoint) -> None:
    job = make_job(tmp_path, endpoint.base_url, n=100)
    assert run_cli("run", str(job)).returncode == 0
    sent = endpoint.stats()["requests"]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    r = run_cli("run", str(job))
    assert r.returncode == 0 and endpoint.stats()["requests"] == sent
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    summary = json.loads((tmp_path / ".pipeline" / "t" / "last_run.json").read_text())
    assert summary["exit_code"] == 0 and summary["ok"] == 100 and summary["this_run"]["requests_sent"] == 0
    assert summary["tokens"]["total_tokens"] > 0 and summary["duration_s"] >= 0


def test_appended_rows_are_the_only_ones_sent(tmp_path: Path, endpoint) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 75)
    job = make_job(tmp_path, endpoint.base_url, n=75)  # rewrites the same manifest
    assert run_cli("run", str(job)).returncode == 0
    more = url_manifest(tmp_path / "more.csv", 110)
    with open(manifest, "a") as f:  # a nightly append: new rows at the end
        f.write("".join(more.read_text().splitlines(keepends=True)[76:]))
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    per_row = endpoint.stats()["per_row"]
    assert len(per_row) == 110 and max(per_row.values()) == 1
    assert_exactly_once(tmp_path, 110)


def test_edited_rows_or_changed_request_refused_unless_restart(tmp_path: Path, endpoint) -> None:
    job = make_job(tmp_path, endpoint.base_url, n=30)
    assert run_cli("run", str(job)).returncode == 0
    # a changed prompt shapes different answers: refuse, naming what changed
    text = job.read_text().replace('max_tokens = 64', 'max_tokens = 64\ntemperature = 0.2')
    job.write_text(text)
    r = run_cli("run", str(job))
    assert r.returncode == 2 and "params" in r.stderr and "--restart" in r.stderr
    # limits may change freely
    job.write_text(text.replace("temperature = 0.2\n", "").replace("max_concurrency = 8", "max_concurrency = 3"))
    assert run_cli("run", str(job)).returncode == 0
    # an edited row that was already answered: refuse
    manifest = tmp_path / "m.csv"
    manifest.write_text(manifest.read_text().replace("picture row-00004", "picture row-00004 again"))
    r = run_cli("run", str(job))
    assert r.returncode == 2 and "changed since they were processed" in r.stderr
    sent = endpoint.stats()["requests"]
    r = run_cli("run", str(job), "--restart")
    assert r.returncode == 0
    assert endpoint.stats()["requests"] == sent + 30
    rows = {x["id"]: x for x in read_output(tmp_path / "out")}
    assert len(rows) == 30 and "row-00004 again" in rows["row-00004"]["answer"]


def test_status_reads_checkpoint_without_sending(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(row_faults={"picture row-00002": "400"})
    job = make_job(tmp_path, ep.base_url, n=20)
    before = run_cli("status", str(job))
    assert before.returncode == 0 and "not started" in before.stdout
    assert run_cli("run", str(job)).returncode == 1
    sent = ep.stats()["requests"]
    human = run_cli("status", str(job))
    assert "19 ok, 1 failed (bad_request 1), 0 pending of 20 rows" in human.stdout
    data = json.loads(run_cli("status", str(job), "--json").stdout)
    assert data["failed_by_kind"] == {"bad_request": 1} and data["tokens"]["total_tokens"] > 0
    assert data["last_run"]["exit_code"] == 1 and data["last_run"]["ended"] >= data["last_run"]["started"]
    assert ep.stats()["requests"] == sent


def test_checkpoint_location_is_configurable(tmp_path: Path, endpoint) -> None:
    job = make_job(tmp_path, endpoint.base_url, n=10)
    job.write_text(job.read_text().replace("[output]\n", f"[output]\ncheckpoint = \"{tmp_path / 'ck'}\"\n"))
    assert run_cli("run", str(job)).returncode == 0
    assert (tmp_path / "ck" / "commits.jsonl").exists() and not (tmp_path / ".pipeline").exists()


def test_lost_journal_falls_back_to_part_files(tmp_path: Path, endpoint_factory) -> None:
    import shutil

    ep = endpoint_factory(row_faults={"picture row-00005": "400:1"})
    job = make_job(tmp_path, ep.base_url, n=60)
    assert run_cli("run", str(job)).returncode == 1
    shutil.rmtree(tmp_path / ".pipeline" / "t" / "journal")  # someone cleaned up the wrong folder
    r = run_cli("run", str(job), "--retry-failed")
    assert r.returncode == 0, r.stderr
    assert ep.stats()["requests"] == 61  # only the failed row was bought again
    assert_exactly_once(tmp_path, 60)


def test_status_takes_no_lock_and_repairs_nothing(tmp_path: Path, endpoint) -> None:
    """Beside a run that holds commits.jsonl's flock (a Ray worker appending), status reads at once,
    and a torn tail (a writer mid-append) is left for the run holding the job's lock to cut."""
    import fcntl

    job = make_job(tmp_path, endpoint.base_url, n=100)
    assert run_cli("run", str(job)).returncode == 0
    commits = tmp_path / ".pipeline" / "t" / "commits.jsonl"
    with open(commits, "ab") as f:
        f.write(b'{"shard": 1, "fi')  # an append under way
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        status = subprocess.run([sys.executable, "-m", "pipeline", "status", str(job)], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
    assert status.returncode == 0 and "100 ok, 0 failed" in status.stdout, status.stderr
    assert commits.read_bytes().endswith(b'{"shard": 1, "fi')


def test_a_finished_jobs_journal_is_compacted_and_still_rebuilds_and_retries(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(row_faults={"picture row-00007": "400:1"})
    job = make_job(tmp_path, ep.base_url, n=120)
    assert run_cli("run", str(job)).returncode == 1
    journal = tmp_path / ".pipeline" / "t" / "journal"
    kept = sorted(str(p.relative_to(journal)) for p in journal.rglob("*") if p.is_file() and p.suffix != ".lock")
    assert kept == [f"shard-{i:06d}/compact-00000001.jsonl.zst" for i in range(3)]  # no appended file left
    (tmp_path / "out" / "part-000001.parquet").unlink()  # someone deleted a part
    r = run_cli("run", str(job))
    assert r.returncode == 1 and ep.stats()["requests"] == 120  # rebuilt from the compacted journal, nothing bought
    r = run_cli("run", str(job), "--retry-failed")
    assert r.returncode == 0 and ep.stats()["requests"] == 121  # the failed row found in it, sent alone
    assert_exactly_once(tmp_path, 120)
    assert [p.name for p in (journal / "shard-000000").iterdir()] == ["compact-00000002.jsonl.zst"]


@pytest.mark.parametrize("point", ["after_seal:1", "mid_compaction:1"])
def test_a_kill_while_compacting_loses_nothing_and_counts_nothing_twice(tmp_path: Path, endpoint, point: str) -> None:
    import pyarrow as pa

    from pipeline.config import load_job
    from pipeline.io.checkpoint import open_checkpoint

    job = make_job(tmp_path, endpoint.base_url, n=120, run={"shard_rows": 40})
    crashed = run_cli("run", str(job), env={"PIPELINE_CRASH_AT": point})
    assert crashed.returncode == 99, crashed.stderr
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert_exactly_once(tmp_path, 120)
    resends(endpoint, 1)
    journal = tmp_path / ".pipeline" / "t" / "journal"
    assert not [p for p in journal.rglob("*.jsonl")]  # what the killed run left was compacted as the next started
    ckpt = open_checkpoint(load_job(job).output)
    for shard in range(3):
        ids = ckpt.journal_lines(shard, pa.schema([("id", pa.string())])).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 40


def test_a_stop_signal_after_every_row_had_its_result_ends_complete(tmp_path: Path, endpoint, capsys) -> None:
    """A Ctrl-C or SIGTERM that lands while the last shard commits (a scheduler's stop at the very
    end): the job is complete, so the exit code is 0, not 130/143 with "to continue" (a scheduler
    would run it again for nothing). The summary is what a finished run of that signal computes."""
    from pipeline.config import load_job
    from pipeline.engine.console import Console
    from pipeline.engine.counts import Counts
    from pipeline.engine.summary import finish
    from pipeline.io.checkpoint import open_checkpoint

    job_path = make_job(tmp_path, endpoint.base_url, n=20)
    assert run_cli("run", str(job_path)).returncode == 0
    job = load_job(job_path)
    ckpt = open_checkpoint(job.output)
    plan = ckpt.load_plan()
    assert plan is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        code, summary = finish(job, ckpt, plan, time.time(), Counts(), int(sig), Console.for_job(job))
        assert code == 0 and summary["exit_code"] == 0 and summary["pending"] == 0
        err = capsys.readouterr().err
        assert "the run is complete" in err and "to continue" not in err
    # a signal while rows are still pending stays a stop (test_signal_stops_commits_what_arrived_and_resumes)
