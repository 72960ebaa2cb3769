"""JSON logs (issue 27): with --log-format json (or PIPELINE_LOG_FORMAT=json) every stderr line of a
run is one JSON object (timestamp, level, event, fields), faults, 429 pauses and Ctrl-C included,
no line carries the key, and the summary line holds what last_run.json holds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import ROOT, job_dict, run_cli, url_manifest, write_job

KEY = "sk-nightly-0123456789-secret"


def lines(stderr: str) -> list[dict[str, Any]]:
    parsed = []
    for line in stderr.splitlines():
        assert line.strip(), "no blank line on stderr"
        record = json.loads(line)  # every line, or the test fails here naming it
        assert isinstance(record, dict) and {"ts", "level", "event", "message"} <= set(record), line
        parsed.append(record)
    return parsed


def test_every_line_of_a_run_with_faults_pauses_and_ctrl_c_is_json_without_the_key(tmp_path: Path,
                                                                                    endpoint_factory: Any) -> None:
    ep = endpoint_factory(api_key=KEY, latency_ms=40, faults={"500": 0.05, "429": 0.08}, fault_retry_after_s=1.0,
                          row_faults={"row-00005": "echo_key", "row-00009": "400"}, seed=5)
    manifest = url_manifest(tmp_path / "m.csv", 600)
    job = write_job(tmp_path / "job.toml", job_dict(
        manifest, ep.base_url, tmp_path / "out", endpoint={"api_key_env": "NIGHTLY_KEY"},
        limits={"max_concurrency": 4, "grace_s": 3, "max_attempts": 3}, run={"shard_rows": 50}))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**_env(), "NIGHTLY_KEY": KEY, "PIPELINE_LOG_FORMAT": "json"})
    deadline = time.monotonic() + 60
    while ep.stats()["requests"] < 250 and time.monotonic() < deadline:  # past a few 429 pauses
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert KEY not in err + out and "0123456789-secret" not in err
    records = lines(err)
    events = [r["event"] for r in records]
    assert events[0] == "start" and "paused" in events and "stopping" in events, events
    assert all(r["job"] == "t" for r in records)
    summary = next(r for r in records if r["event"] == "summary")
    last_run = json.loads((tmp_path / ".pipeline" / "t" / "last_run.json").read_text())
    assert summary["summary"] == last_run and last_run["exit_code"] == 130
    assert next(r for r in records if r["event"] == "hint")["message"].startswith("to continue: pipeline run")
    paused = next(r for r in records if r["event"] == "paused")
    assert paused["level"] == "warning" and paused["seconds"] > 0 and paused["rate_limited"] >= 1
    assert not any("\x1b" in line or "\r" in line for line in err.splitlines())  # no progress bar


def test_errors_before_a_run_are_json_lines_too(tmp_path: Path, endpoint: Any) -> None:
    job = write_job(tmp_path / "job.toml", job_dict(tmp_path / "missing.csv", endpoint.base_url, tmp_path / "out"))
    r = run_cli("run", str(job), "--log-format", "json")
    assert r.returncode == 2
    (record,) = lines(r.stderr)
    assert record["level"] == "error" and "missing.csv" in record["message"]
    bad = run_cli("run", str(job), env={"PIPELINE_LOG_FORMAT": "yaml"})
    assert bad.returncode == 2 and 'PIPELINE_LOG_FORMAT must be "text" or "json"' in bad.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
