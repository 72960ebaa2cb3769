"""A checkpoint in a bucket (issue 24): `[output] checkpoint = "s3://..."`, against a real S3 API
server (moto's server mode over HTTP, conftest's `s3`).

What the tests rely on is checked first: moto answers a second If-None-Match create and a stale
If-Match put with 412 (tests/test_store.py, at the HTTP level), and enforces a bucket policy that
denies PutObject (below). moto checks a condition then writes, without a lock, so a race it loses
is possible in theory (AWS's check is atomic); what the race test asserts is what S3 guarantees.

Runs that must die, race or be refused are real `pipeline run` processes. Every re-paid row is
checked against the stated bound: it was first sent in flight at a kill, or answered within the
last flush interval (`checkpoint_flush_s`, plus SLACK for the put itself) before one. The lease is
short here (`checkpoint_lease_s`): a killed run's is taken over LEASE_S * 1.25 after its last
renewal, so a test waits seconds, not a minute.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pytest
from conftest import S3, job_dict, run_cli, run_process, url_manifest, write_job

from pipeline.config import load_job
from pipeline.io.checkpoint import open_checkpoint

LEASE_S = 2.0
FLUSH_S = 0.5
SLACK_S = 1.0  # a segment's put, the scheduling of its thread, a loaded machine


def make_job(tmp_path: Path, base_url: str, s3: S3, n: int, *, name: str = "t", bucket: str | None = None,
             **over: Any) -> tuple[Path, str, str]:
    """A job whose output and checkpoint are both in a new bucket: (job file, output URL, checkpoint URL)."""
    bucket = bucket or s3.new_bucket()
    out, ckpt = f"s3://{bucket}/out", f"s3://{bucket}/pipeline/{name}"
    manifest = tmp_path / "m.csv"
    if not manifest.exists():
        url_manifest(manifest, n)
    output = {"path": out, "checkpoint": ckpt, "storage_options": s3.options(), "checkpoint_flush_s": FLUSH_S,
              "checkpoint_lease_s": LEASE_S, **over.pop("output", {})}
    job = job_dict(manifest, base_url, tmp_path / "unused", name=name,
                   limits={"max_concurrency": 8, **over.pop("limits", {})},
                   run={"shard_rows": 200, **over.pop("run", {})}, output=output, **over)
    return write_job(tmp_path / f"{name}.toml", job), out, ckpt


def keys(s3: S3, url: str) -> list[str]:
    fs = s3.fs()
    path = url.removeprefix("s3://")
    return sorted(p.removeprefix(path + "/") for p in fs.find(path))


def lease(s3: S3, ckpt: str) -> dict[str, Any] | None:
    fs = s3.fs()
    try:
        return json.loads(fs.cat_file(f"{ckpt.removeprefix('s3://')}/lock"))
    except FileNotFoundError:
        return None


def wait_for(what: Any, timeout: float = 60, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(every)


def wait_out_the_lease(s3: S3, ckpt: str) -> None:
    """Until a killed holder's lease may be taken over (its expiry plus the tolerated skew)."""
    held = lease(s3, ckpt)
    if held is not None and not held.get("released"):
        time.sleep(max(0.0, held["expires"] + LEASE_S / 4 - time.time()) + 0.2)


def assert_each_row_once_with_its_answer(s3: S3, out: str, n: int) -> None:
    rows = s3.read(out.removeprefix("s3://"))
    assert Counter(r["id"] for r in rows) == Counter(f"row-{i:05d}" for i in range(n)), "every id exactly once"
    for r in rows:
        assert r["status"] == "ok" and r["answer"].startswith(f"Answer to 'Describe picture {r['id']}'")


def assert_repaid_within_the_bound(ep: Any, windows: list[tuple[float, float]]) -> int:
    """Every row sent more than once was first sent within one of the (start, end) windows: in
    flight at a kill, or answered within the last flush interval before it. Returns the re-paid rows."""
    first: dict[str, list[float]] = {}
    for req in ep.requests():
        if "row" in req:
            first.setdefault(req["row"], []).append(req["t"])
    repaid = {row: min(ts) for row, ts in first.items() if len(ts) > 1}
    outside = {row: t for row, t in repaid.items() if not any(a <= t <= b for a, b in windows)}
    assert not outside, f"{len(outside)} of {len(repaid)} re-paid rows were answered long before any kill: {outside}"
    return len(repaid)


def test_moto_enforces_a_bucket_policy_denying_puts(s3: S3) -> None:
    """The refusal test below stands on it: a policy set on the server, not a patched function."""
    import boto3
    import botocore.exceptions

    bucket = s3.new_bucket()
    client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.key, aws_secret_access_key=s3.secret,
                          region_name="us-east-1")
    deny(client, bucket)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    client.delete_bucket_policy(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="k", Body=b"x")


def deny(client: Any, bucket: str) -> None:
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                      "Resource": f"arn:aws:s3:::{bucket}/*"}]}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


@pytest.mark.serial  # the bound's window is wall-clock: a starved flush thread would look like a lost answer
def test_kill_loop_every_row_once_re_paid_within_the_bound(tmp_path: Path, endpoint_factory, s3: S3) -> None:
    # 400 rows, 8 in flight, ~125 ms each: ~6 s of sending; six kills 0.1-0.9 s after each run's
    # first request cannot finish it. After a kill the next run waits out the lease.
    ep = endpoint_factory(latency_ms=100, latency_jitter_ms=50, seed=5, record=True)
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 400)
    rng = random.Random(11)
    windows: list[tuple[float, float]] = []
    while len(windows) < 6:
        sent = ep.stats()["requests"]
        proc = run_process(job)
        wait_for(lambda: ep.stats()["requests"] > sent or proc.poll() is not None)  # however long start-up takes
        time.sleep(rng.uniform(0.1, 0.9))
        assert proc.poll() is None, proc.communicate()[1]
        at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # a request sent between `at` and the kill landing is in flight too: the window ends once it is dead
        windows.append((at - FLUSH_S - SLACK_S - 0.15, time.time()))  # answered within the flush interval, or in flight
        wait_out_the_lease(s3, ckpt)
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert "took over the lock left by pid" in r.stderr  # the last one killed never released it
    assert_each_row_once_with_its_answer(s3, out, 400)
    repaid = assert_repaid_within_the_bound(ep, windows)
    assert repaid > 0  # the kills did land mid-run
    status = run_cli("status", str(job))
    assert "400 ok, 0 failed" in status.stdout and f"within the last {FLUSH_S:g}s" in status.stdout


def test_two_runs_racing_for_the_lease_exactly_one_runs(tmp_path: Path, endpoint_factory, s3: S3) -> None:
    ep = endpoint_factory(latency_ms=50)
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 200)
    procs = [run_process(job), run_process(job)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 75], results
    refused = next(err for code, err in results if code == 75)
    assert "is already running" in refused and len(refused.strip().splitlines()) == 1
    assert ep.stats()["requests"] == 200  # the refused run sent nothing
    assert_each_row_once_with_its_answer(s3, out, 200)


def test_a_killed_holders_lease_is_taken_over_after_expiry_never_before(tmp_path: Path, endpoint_factory,
                                                                         s3: S3) -> None:
    ep = endpoint_factory(latency_ms=300)
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 120, output={"checkpoint_lease_s": 6.0})
    holder = run_process(job)
    wait_for(lambda: any(k.startswith("journal/") for k in keys(s3, ckpt)))  # answers reached the bucket
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    held = lease(s3, ckpt)
    assert held is not None and not held["released"]
    too_soon = run_cli("run", str(job))
    assert time.time() < held["expires"] + 6.0 / 4, "the refused run came too late to prove anything"
    assert too_soon.returncode == 75 and "can be taken over in" in too_soon.stderr, too_soon.stderr
    assert lease(s3, ckpt) == held  # refused without touching it
    time.sleep(max(0.0, held["expires"] + 6.0 / 4 - time.time()) + 0.2)
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert f"took over the lock left by pid {holder.pid} on" in r.stderr
    assert_each_row_once_with_its_answer(s3, out, 120)
    freed = lease(s3, ckpt)
    assert freed is not None and freed["released"]  # a clean end frees it: the next run takes it at once
    assert run_cli("run", str(job)).returncode == 0


def test_a_run_whose_lease_is_taken_stops_at_once_and_writes_nothing_more(tmp_path: Path, endpoint_factory,
                                                                          s3: S3) -> None:
    """Another party takes the lease by compare-and-swap (as a run whose clock ran far ahead
    would): the holder's next renewal fails its If-Match, and it stops without another write."""
    ep = endpoint_factory(latency_ms=300)
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 400)
    holder = run_process(job)
    fs = s3.fs()
    path = f"{ckpt.removeprefix('s3://')}/lock"
    wait_for(lambda: any(k.startswith("journal/") for k in keys(s3, ckpt)))
    taken = {"holder": "a run elsewhere", "renewed": time.time(), "expires": time.time() + 600, "lease_s": 600,
             "released": False}
    deadline = time.monotonic() + 30
    while True:  # the holder renews every half second: a renewal between our read and our swap wins
        etag = fs.info(path, refresh=True)["ETag"]
        try:
            fs.pipe_file(path, json.dumps(taken).encode(), IfMatch=etag)
            break
        except OSError as exc:
            if "pre-conditions" not in str(exc) or time.monotonic() > deadline:
                raise
    code = holder.wait(timeout=30)
    err = holder.communicate()[1]
    assert code == 4, err
    assert "another run took over this job's lease" in err
    assert lease(s3, ckpt) == taken  # never overwritten, never released by the run that lost it
    assert "last_run.json" not in keys(s3, ckpt)  # not even its summary was written


def test_two_jobs_on_one_bucket_output_the_second_is_refused(tmp_path: Path, endpoint_factory, s3: S3) -> None:
    ep = endpoint_factory()
    bucket = s3.new_bucket()
    first, out, _ = make_job(tmp_path, ep.base_url, s3, 20, name="captions", bucket=bucket)
    second, _, ckpt = make_job(tmp_path, ep.base_url, s3, 20, name="labels", bucket=bucket)
    assert run_cli("run", str(first)).returncode == 0
    r = run_cli("run", str(second))
    assert r.returncode == 2 and "belongs to the job 'captions'" in r.stderr, r.stderr
    assert ep.stats()["requests"] == 20
    assert not [k for k in keys(s3, ckpt) if not k.startswith("lock")]  # refused before anything was recorded


@pytest.mark.serial  # the bound's window is wall-clock
def test_a_bucket_that_refuses_writes_mid_run_exit_4_nothing_lost(tmp_path: Path, endpoint_factory, s3: S3) -> None:
    import boto3

    ep = endpoint_factory(latency_ms=100, record=True)
    bucket = s3.new_bucket()
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 400, bucket=bucket)
    client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.key, aws_secret_access_key=s3.secret,
                          region_name="us-east-1")
    proc = run_process(job)
    wait_for(lambda: any(k.startswith("journal/") for k in keys(s3, ckpt)))
    denied = time.time()
    deny(client, bucket)
    try:
        code = proc.wait(timeout=60)
        stopped = time.time()
        err = proc.communicate()[1]
    finally:
        client.delete_bucket_policy(Bucket=bucket)
    assert code == 4, err
    assert "could not create" in err and "Traceback" not in err
    assert s3.secret not in err
    wait_out_the_lease(s3, ckpt)  # it could not release it: the bucket refused that write too
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert_each_row_once_with_its_answer(s3, out, 400)
    assert_repaid_within_the_bound(ep, [(denied - FLUSH_S - SLACK_S - 0.15, stopped)])


@pytest.mark.serial  # the bound's window is wall-clock
@pytest.mark.parametrize("point", ["mid_compaction:1", "after_rename:1"])
def test_a_kill_while_committing_or_compacting_loses_nothing(tmp_path: Path, endpoint_factory, s3: S3,
                                                             point: str) -> None:
    ep = endpoint_factory(record=True)
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 120, run={"shard_rows": 40})
    crashed = run_cli("run", str(job), env={"PIPELINE_CRASH_AT": point})
    died = time.time()
    assert crashed.returncode == 99, crashed.stderr
    wait_out_the_lease(s3, ckpt)
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert_each_row_once_with_its_answer(s3, out, 120)
    assert_repaid_within_the_bound(ep, [(died - FLUSH_S - SLACK_S - 0.15, died)])
    # every shard's journal is one compact file again (what the killed run left was compacted as
    # the next one started), each row read back once
    names = keys(s3, ckpt)
    checkpoint = open_checkpoint(load_job(job).output)
    for shard in range(3):
        pieces = [n.split("/")[-1] for n in names if n.startswith(f"journal/shard-{shard:06d}/")]
        assert len(pieces) == 1 and pieces[0].startswith("compact-"), pieces
        ids = checkpoint.journal_lines(shard, pa.schema([("id", pa.string())])).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 40


def test_retry_failed_restart_status_and_the_report_on_a_bucket_checkpoint(tmp_path: Path, endpoint_factory,
                                                                           s3: S3) -> None:
    ep = endpoint_factory(row_faults={"picture row-00005": "400:1", "picture row-00031": "400:1"})
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 60, run={"shard_rows": 20})
    first = run_cli("run", str(job))
    assert first.returncode == 1, first.stderr
    status = run_cli("status", str(job))
    assert "58 ok, 2 failed" in status.stdout
    retried = run_cli("run", str(job), "--retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert ep.stats()["requests"] == 62  # only the two failed rows were bought again
    assert_each_row_once_with_its_answer(s3, out, 60)
    report = run_cli("report", str(job))
    assert report.returncode == 0, report.stderr
    restarted = run_cli("run", str(job), "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert ep.stats()["requests"] == 122
    assert_each_row_once_with_its_answer(s3, out, 60)
    history = open_checkpoint(load_job(job).output).history()
    assert [h["exit_code"] for h in history] == [0]  # --restart forgot the runs before it


def test_the_python_api_and_batch_mode_on_a_bucket_checkpoint(tmp_path: Path, endpoint_factory, s3: S3,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # where a frame is stored beside a bucket checkpoint

    ep = endpoint_factory()
    bucket = s3.new_bucket()
    rows = [{"id": f"r{i}", "image": f"https://img.example/{i}.png", "prompt": f"Describe picture r{i}"} for i in range(30)]
    job = job_dict(tmp_path / "unused.csv", ep.base_url, tmp_path / "unused", name="api",
                   output={"path": f"s3://{bucket}/api-out", "checkpoint": f"s3://{bucket}/api-ckpt",
                           "storage_options": s3.options(), "checkpoint_lease_s": LEASE_S})
    del job["input"]["path"]  # the manifest comes in memory
    res = pipeline.run(job, manifest=rows)
    assert (res.exit_code, res.ok) == (0, 30)
    assert pipeline.run(job, manifest=rows).summary["this_run"]["requests_sent"] == 0
    assert list((tmp_path / "xdg" / "pipeline" / "manifests").glob("*/manifest.parquet"))
    batch, out, _ = make_job(tmp_path, ep.base_url, s3, 30, name="batch", run={"mode": "batch", "poll_s": 0.2})
    r = run_cli("run", str(batch))
    assert r.returncode == 0, r.stderr
    assert_each_row_once_with_its_answer(s3, out, 30)


def test_status_reads_a_bucket_checkpoint_without_the_lease_and_changes_nothing(tmp_path: Path, endpoint_factory,
                                                                               s3: S3) -> None:
    ep = endpoint_factory(latency_ms=300)
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 400)
    proc = run_process(job)
    wait_for(lambda: any(k.startswith("journal/") for k in keys(s3, ckpt)))
    live = run_cli("status", str(job))  # beside a running job: no lease needed
    assert live.returncode == 0 and "pending of 400 rows" in live.stdout, live.stderr
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _etags(s3, ckpt)
    status = run_cli("status", str(job))
    assert status.returncode == 0, status.stderr
    assert "answers kept but not yet written to the output" in status.stdout
    assert _etags(s3, ckpt) == before  # its lease, journal and records untouched


def _etags(s3: S3, url: str) -> dict[str, str]:
    fs = s3.fs()
    path = url.removeprefix("s3://")
    return {p.removeprefix(path + "/"): info["ETag"] for p, info in fs.find(path, detail=True).items()}


def test_a_checkpoint_url_without_conditional_writes_is_refused_in_one_line(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.toml", job_dict(url_manifest(tmp_path / "m.csv", 3), "http://127.0.0.1:9/v1",
                                                    tmp_path / "out", output={"checkpoint": "memory://ckpt"}))
    r = run_cli("run", str(job))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "memory:// cannot hold a checkpoint yet" in r.stderr and os.path.exists(tmp_path / "m.csv")


@pytest.mark.parametrize("shards", [1, 2])
def test_a_shard_whose_last_row_fills_a_segment_ends(tmp_path: Path, endpoint_factory, s3: S3, shards: int) -> None:
    """The last row of a run filling a segment (SEGMENT_ROWS rows waiting) woke the journal's
    flusher in the step the run cancelled it. One shard: asyncio.wait_for on 3.11 swallowed that
    cancellation and the finished run never exited (pipeline.waits). Two: the flusher's put, its
    lines taken, was cancelled before its thread started and the commit waited for it for ever."""
    from pipeline.io.ckpt_bucket import SEGMENT_ROWS

    ep = endpoint_factory()
    n = SEGMENT_ROWS * shards
    job, out, _ = make_job(tmp_path, ep.base_url, s3, n, run={"shard_rows": SEGMENT_ROWS},
                           limits={"max_concurrency": 64}, output={"checkpoint_flush_s": 30})
    proc = run_process(job)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"a finished run of {n} rows did not exit") from None
    assert proc.returncode == 0, err
    assert_each_row_once_with_its_answer(s3, out, n)
    assert ep.stats()["requests"] == n


def test_a_first_run_reaches_its_first_row_in_a_dozen_requests(tmp_path: Path, endpoint_factory, s3: S3) -> None:
    """Each request before the first row is a round trip to S3 (10-50 ms) on every run. The
    checkpoint's: the probe of conditional writes (3), the lease, job.json read once and written,
    plan.json read and written, one LIST per folder (commits twice, the journal, the shard's), no
    HEAD. The output's: its listing (the claim, then the parts in place) and its owner marker."""
    ep = endpoint_factory()
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 20)
    with s3.recording() as asked:
        r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    bucket, _, prefix = ckpt.removeprefix("s3://").partition("/")
    first = next(i for i, (m, path) in enumerate(asked) if m == "PUT" and f"{prefix}/journal/" in path)
    before = asked[:first]
    assert sum(1 for m, path in before if m == "GET" and path.endswith("/job.json")) == 1, before
    assert not any(m == "HEAD" for m, _ in before), before
    mine = [(m, path) for m, path in before if path.startswith(f"{bucket}/{prefix}/") or f"prefix={quote(prefix, safe='')}%2F" in path]
    assert len(mine) <= 12 and len(before) <= 15, "\n".join(map(str, before))
    assert_each_row_once_with_its_answer(s3, out, 20)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_after_the_summary_leaves_the_run_finished_and_its_lease_released(
        tmp_path: Path, endpoint_factory, s3: S3, sig: int) -> None:
    """A scheduler's stop that lands after the last request, while the summary is written and the
    lease released (a put to the bucket): the run ends as it was, 0 and the lease released, not
    killed by the signal's default (-15, a lease held for its full time) nor 130 with "interrupted
    before sending began" (found by a hostile probe: 6 of 6)."""
    import threading

    ep = endpoint_factory(latency_ms=20)
    job, out, ckpt = make_job(tmp_path, ep.base_url, s3, 200)
    proc = run_process(job)
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    wait_for(lambda: any("pending of 200 rows" in line for line in lines) or proc.poll() is not None, every=0.001)
    proc.send_signal(sig)  # the summary is out: the lease's release is under way (or done)
    assert proc.wait(timeout=30) == 0, "".join(lines)
    reader.join(10)
    held = lease(s3, ckpt)
    assert held is not None and held["released"], held
    assert "interrupted before sending began" not in "".join(lines)
    assert_each_row_once_with_its_answer(s3, out, 200)
