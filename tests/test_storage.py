"""The output on object storage (issue 8): `[output] path = "s3://bucket/prefix"` through fsspec.

A real S3 (moto's server, conftest's `s3`) runs in its own process on a loopback port; the
pipeline talks HTTP to it through s3fs, pointed there by AWS_ENDPOINT_URL as a user would (or by
`[output] storage_options`). Runs that must die are real `pipeline run` processes; the others call
the CLI's `main` in this process (no start-up cost). The dataset is read back from S3 with pyarrow
over s3fs. Skipped, saying why, when the s3 extra or moto is not installed (except the tests of
those very errors). The Ray engine writing to S3 is tested in test_ray.py, on its running Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, S3, job_dict, read_output, run_cli, url_manifest, write_job

from pipeline.cli import main
from pipeline.errors import JobError
from pipeline.io.store import storage_failure
from pipeline.io.storage import OWNER_FILE, PartStore
from pipeline.redact import Redactor, option_secrets

CONCURRENCY = 4


def make_job(tmp_path: Path, base_url: str, out: str | Path, n: int, *, name: str = "t", **over: Any) -> Path:
    manifest = tmp_path / "m.csv"
    if not manifest.exists():
        url_manifest(manifest, n)
    job = job_dict(manifest, base_url, tmp_path / "unused", name=name,
                   limits={"max_concurrency": CONCURRENCY, **over.pop("limits", {})},
                   run={"shard_rows": 50, **over.pop("run", {})},
                   output={"path": str(out), **over.pop("output", {})}, **over)
    return write_job(tmp_path / f"{name}.toml", job)


def cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """`pipeline ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def aws(s3: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    """The AWS_* variables pointing at the moto server, here and in the processes started from here."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


def assert_exactly_once(rows: list[dict], n: int) -> None:
    assert Counter(r["id"] for r in rows) == Counter(f"row-{i:05d}" for i in range(n)), "every id exactly once"


def key(r: dict) -> tuple:
    return (r["id"], r["answer"], r["status"], r["error_kind"], r["attempts"], r["prompt"], r["image"])


def test_s3_output_holds_the_same_rows_as_local_and_status_reads_it(tmp_path: Path, endpoint_factory, aws: S3, capsys) -> None:
    faults = {"picture row-00007": "400"}
    ep_local, ep = endpoint_factory(row_faults=faults), endpoint_factory(row_faults=faults)
    n, bucket = 120, aws.new_bucket()
    local = make_job(tmp_path, ep_local.base_url, tmp_path / "out", n, name="local")
    remote = make_job(tmp_path, ep.base_url, f"s3://{bucket}/captions", n, name="remote")
    assert cli(capsys, "run", str(local))[0] == 1  # one failed row
    code, _, err = cli(capsys, "run", str(remote))
    assert code == 1, err
    assert f"results in s3://{bucket}/captions" in err

    assert aws.names(f"{bucket}/captions") == [OWNER_FILE] + [f"part-{i:06d}.parquet" for i in range(3)]  # and nothing else
    rows = aws.read(f"{bucket}/captions")
    assert_exactly_once(rows, n)
    assert sorted(map(key, rows)) == sorted(map(key, read_output(tmp_path / "out")))
    checkpoint = tmp_path / ".pipeline" / "remote"  # beside the job file: a URL has no local parent
    assert (checkpoint / "commits.jsonl").exists() and (checkpoint / "journal").is_dir()

    code, out, _ = cli(capsys, "status", str(remote))
    assert code == 0 and "119 ok, 1 failed (bad_request 1), 0 pending of 120 rows" in out
    assert f"output: s3://{bucket}/captions" in out
    assert json.loads(cli(capsys, "status", str(remote), "--json")[1])["checkpoint"] == str(checkpoint)

    sent = ep.stats()["requests"]
    code, _, err = cli(capsys, "run", str(remote))  # the parts are found on S3 as committed
    assert code == 1 and ep.stats()["requests"] == sent and "rebuilt" not in err


def test_killed_run_resumes_on_s3_without_buying_answers_twice(tmp_path: Path, endpoint_factory, aws: S3, capsys) -> None:
    ep = endpoint_factory(latency_ms=40)
    n, bucket = 300, aws.new_bucket()
    job = make_job(tmp_path, ep.base_url, f"s3://{bucket}/out", n)
    commits = tmp_path / ".pipeline" / "t" / "commits.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (commits.exists() and commits.read_text().strip()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(aws.read(f"{bucket}/out")) < n, "the kill did not land mid-job"
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    rows = aws.read(f"{bucket}/out")
    assert_exactly_once(rows, n)
    assert all(x["status"] == "ok" and x["answer"].startswith(f"Answer to 'Describe picture {x['id']}'") for x in rows)
    extra = sum(c - 1 for c in ep.stats()["per_row"].values())
    assert extra <= CONCURRENCY, f"{extra} rows bought twice; only the killed run's {CONCURRENCY} in flight may be"


def test_crash_after_the_put_before_the_commit_record(tmp_path: Path, endpoint, aws: S3, capsys) -> None:
    bucket = aws.new_bucket()
    job = make_job(tmp_path, endpoint.base_url, f"s3://{bucket}/out", 100)
    crashed = run_cli("run", str(job), env={"PIPELINE_CRASH_AT": "after_rename"})
    assert crashed.returncode == 99, crashed.stderr  # died with the part on S3 and no commit record
    assert aws.names(f"{bucket}/out") == [OWNER_FILE, "part-000000.parquet"]
    assert not (tmp_path / ".pipeline" / "t" / "commits.jsonl").exists()
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert_exactly_once(aws.read(f"{bucket}/out"), 100)
    extra = sum(c - 1 for c in endpoint.stats()["per_row"].values())
    assert extra <= CONCURRENCY  # shard 0 was written again from its journal, not bought again


def test_lost_journal_damaged_part_and_restart_on_s3(tmp_path: Path, endpoint_factory, aws: S3, capsys) -> None:
    ep = endpoint_factory(row_faults={"picture row-00005": "400:1"})
    n, bucket = 80, aws.new_bucket()
    job = make_job(tmp_path, ep.base_url, f"s3://{bucket}/out", n)
    assert cli(capsys, "run", str(job))[0] == 1
    checkpoint = tmp_path / ".pipeline" / "t"

    # The journal is gone: --retry-failed learns the answered rows from the parts on S3.
    shutil.rmtree(checkpoint / "journal")
    code, _, err = cli(capsys, "run", str(job), "--retry-failed")
    assert code == 0, err
    assert ep.stats()["requests"] == n + 1  # only the failed row was bought again
    assert_exactly_once(aws.read(f"{bucket}/out"), n)

    # A part replaced by a damaged object: rebuilt from the journal, nothing bought.
    aws.fs().pipe_file(f"{bucket}/out/part-000000.parquet", b"PAR1 not a parquet file")
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert "part-000000.parquet does not match its commit record; it is rebuilt from the journal" in err
    assert ep.stats()["requests"] == n + 1
    rows = aws.read(f"{bucket}/out")
    assert_exactly_once(rows, n)
    assert all(x["status"] == "ok" for x in rows)

    # --restart removes the parts on S3 with the checkpoint, then buys every row again.
    code, _, err = cli(capsys, "run", str(job), "--restart")
    assert code == 0, err
    assert ep.stats()["requests"] == 2 * n + 1
    assert_exactly_once(aws.read(f"{bucket}/out"), n)


def test_storage_options_reach_s3_and_never_its_secret(tmp_path: Path, endpoint, s3: S3, capsys, monkeypatch) -> None:
    for k in [k for k in os.environ if k.startswith("AWS_")]:  # endpoint and credentials from the job alone
        monkeypatch.delenv(k)
    bucket = s3.new_bucket()
    job = make_job(tmp_path, endpoint.base_url, f"s3://{bucket}/out", 60, output={"storage_options": s3.options()})
    code, out, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert_exactly_once(s3.read(f"{bucket}/out"), 60)
    for p in (tmp_path / ".pipeline").rglob("*"):
        if p.is_file():
            assert s3.secret not in p.read_text(errors="replace"), p
    assert s3.secret not in out + err

    # A bucket that does not exist: one line, exit 2, before anything is sent, no secret in it.
    job.write_text(job.read_text().replace(f"s3://{bucket}/out", "s3://no-such-bucket-here/out"))
    sent = endpoint.stats()["requests"]
    code, _, err = cli(capsys, "run", str(job))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no-such-bucket-here does not exist" in err and "create it" in err and s3.secret not in err
    assert endpoint.stats()["requests"] == sent
    code, out, _ = cli(capsys, "run", str(job), "--dry-run")
    assert code == 1 and "job problem: [output] path: no-such-bucket-here does not exist" in out


def test_secrets_are_scrubbed_from_storage_messages() -> None:
    # Whatever a backend's failure says, storage_options' credentials never reach the user's screen.
    options = {"key": "AKIA1234", "secret": "s3cr3t-value", "client_kwargs": {"endpoint_url": "http://h:9"}}
    failed = OSError("refused key AKIA1234 with secret s3cr3t-value at http://h:9")
    message = str(storage_failure("[output] path", "write part-000000.parquet in", "s3://bucket/out", failed, options,
                                  "run again"))
    assert "AKIA1234" not in message and "s3cr3t-value" not in message and "[secret]" in message
    assert "http://h:9" in message  # a place, not a secret: kept, it helps the fix


def test_storage_option_settings_are_not_secrets_that_rewrite_text() -> None:
    # Every journaled answer passes the job's redactor: a setting taken for a secret rewrites them
    # all ("private" in an answer became "[key]" with acl = "private").
    secrets = option_secrets({"key": "AKIAREALKEY123", "secret": "real/secret+value", "acl": "private",
                              "default_cache_type": "none", "config_kwargs": {"signature_version": "s3v4"},
                              "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "FQoGZXIvYXdz",
                                                "headers": {"x-api-key": "hdr-secret-9", "user-agent": "anonymized"}}})
    assert Redactor(secrets).scrub("An anonymous man in a private garden, none around, eu-west-1 anonymized") == \
        "An anonymous man in a private garden, none around, eu-west-1 anonymized"
    assert sorted(secrets) == sorted(["AKIAREALKEY123", "real/secret+value", "FQoGZXIvYXdz", "hdr-secret-9"])
    # gcsfs: a token that names a way to authenticate is a setting; a token given as a dict holds keys
    assert option_secrets({"token": "anon", "project": "vision"}) == []
    assert option_secrets({"token": {"type": "service_account", "private_key": "-----BEGIN KEY-----x",
                                     "client_email": "a@b.iam"}}) == ["-----BEGIN KEY-----x"]
    # adlfs
    assert sorted(option_secrets({"account_name": "photos", "account_key": "acct-KEY==", "sas_token": "sv=2020&sig=x",
                                  "connection_string": "DefaultEndpointsProtocol=https;AccountKey=y"})) == \
        sorted(["acct-KEY==", "sv=2020&sig=x", "DefaultEndpointsProtocol=https;AccountKey=y"])


@pytest.mark.parametrize("output, expected", [
    ({"path": "gcs://bucket/out"}, "[output] path: gcs:// URLs need their fsspec backend: pip install gcsfs"),
    ({"path": "nosuchproto://bucket/out"}, "[output] path: no fsspec backend knows nosuchproto:// URLs"),
    ({"path": "s3://bucket/out", "checkpoint": "memory://ckpt"},
     "[output] checkpoint: memory:// cannot hold a checkpoint yet (it needs a create-if-absent and a compare-and-swap "
     "write the server checks, wired here for S3 only); use an s3:// URL or a folder"),
    ({"path": "out", "storage_options": {"anon": True}},
     "[output] storage_options: only used when [output] path or checkpoint is a URL"),
])
def test_output_url_problems_are_one_line_naming_the_fix(tmp_path: Path, output: dict, expected: str, capsys) -> None:
    job = make_job(tmp_path, "http://127.0.0.1:9/v1", "out", 5, output=output)
    code, _, err = cli(capsys, "run", str(job))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / ".pipeline").exists()  # refused before anything was planned or sent


def test_s3_without_fsspec_names_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if the s3 extra were not installed
    job = make_job(tmp_path, "http://127.0.0.1:9/v1", "s3://bucket/out", 5)
    code, _, err = cli(capsys, "run", str(job))
    assert code == 2
    assert err.strip().splitlines() == [f"error: {job}: [output] path: s3:// URLs need fsspec and its backend: pip install -e '.[s3]' in the clone (or 'pipeline[s3]')"]


def test_two_jobs_claiming_one_bucket_folder_at_once_one_wins(s3: S3) -> None:
    """The owner marker is a create-only put (If-None-Match): of two jobs claiming the same
    folder at the same moment, one owns it and the other is refused, never both."""
    import threading

    url = f"s3://{s3.new_bucket()}/out"
    outcome: dict[str, str] = {}
    start = threading.Barrier(2)

    def claim(job: str) -> None:
        parts = PartStore(url, s3.options())
        parts.names()  # reach the bucket before the barrier: the claims race, not the set-up
        start.wait(timeout=30)
        try:
            outcome[job] = "owner" if parts.claim(job, f"/ckpt/{job}") else "again"
        except JobError as exc:
            outcome[job] = str(exc)

    threads = [threading.Thread(target=claim, args=(job,)) for job in ("captions", "labels")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    owner = [job for job, result in outcome.items() if result == "owner"]
    assert len(owner) == 1, outcome
    other = "labels" if owner == ["captions"] else "captions"
    assert f"belongs to the job {owner[0]!r}" in outcome[other]
    assert json.loads(s3.fs().cat_file(f"{url.removeprefix('s3://')}/{OWNER_FILE}"))["job"] == owner[0]
