"""Rate limits, retries and faults end to end: the whole pipeline against the built-in endpoint.

Each test starts `python -m pipeline serve` in its own process with faults injected (by seeded
chance or by row), runs a real job over loopback HTTP, and checks the Parquet output and what the
endpoint itself counted (GET /stats: requests per row, requests over its limit). Windows are
short (a rate limit per 2 s instead of per minute) so the suite stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import job_dict, read_output, run_cli, url_manifest, write_job

from pipeline.config import load_job
from pipeline.engine import (
    EXIT_FAILED_ROWS,
    EXIT_OK,
    EXIT_STOPPED,
    RunOptions,
    run,
)
from pipeline.errors import ERROR_KINDS


def make_job(tmp_path: Path, base_url: str, rows: int, *, name: str = "job.toml", **overrides: Any) -> Path:
    manifest = tmp_path / "manifest.csv"
    if not manifest.exists():
        url_manifest(manifest, rows)
    return write_job(tmp_path / name, job_dict(manifest, base_url, tmp_path / "out", **overrides))


def run_job(path: Path, **options: Any) -> int:
    return run(load_job(path), RunOptions(progress=False, **options))


def summary(tmp_path: Path) -> dict[str, Any]:
    return json.loads(next((tmp_path / ".pipeline").rglob("last_run.json")).read_text())


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {r["id"]: r for r in rows}
    assert len(out) == len(rows), "a row was written twice"
    return out


def prompt_of(row_id: str) -> str:
    return f"Describe picture {row_id}"


def rid(i: int) -> str:
    return f"row-{i:05d}"


def assert_own_answer(row: dict[str, Any]) -> None:
    """The built-in endpoint's answer quotes the prompt it was given: the row got its own answer."""
    assert row["status"] == "ok", row
    assert row["answer"].startswith(f"Answer to {prompt_of(row['id'])!r}"), row


# -- the acceptance run ----------------------------------------------------------------------

@pytest.mark.serial  # timeout_s 0.75: under CPU contention a 400 row's first try timed out (attempts 2)
def test_mixed_faults_under_a_rate_limit(tmp_path: Path, endpoint_factory: Any) -> None:
    """R requests per window with 5% 500, 5% 503, 3% drops, 2% slow, 2% broken bodies and rows
    that always get 400: every other row ends ok with its own answer, the 400 rows fail after one
    attempt, and the endpoint sees at most 1% of requests over its limit."""
    rows, per_window, window = 300, 80, 2.0
    bad = [rid(i) for i in (7, 61, 123, 188, 250, 299)]
    ep = endpoint_factory(
        rate_limit=per_window,
        rate_window_s=window,
        rate_headers="retry-after-ms",
        seed=4,
        faults={"500": 0.05, "503": 0.05, "drop": 0.03, "slow": 0.02, "broken": 0.01, "cut": 0.01},
        row_faults={b: "400" for b in bad},
        slow_ms=1500,
    )
    path = make_job(
        tmp_path, ep.base_url, rows,
        limits={"requests_per_minute": per_window * 60 / window, "max_concurrency": 8, "max_attempts": 8,
                "timeout_s": 0.75},
        run={"shard_rows": 64},
    )
    assert run_job(path) == EXIT_FAILED_ROWS

    out = by_id(read_output(tmp_path / "out"))
    assert len(out) == rows
    for row_id, row in out.items():
        if row_id in bad:
            assert (row["status"], row["error_kind"], row["attempts"]) == ("error", "bad_request", 1), row
            assert "HTTP 400" in row["error"] and "Invalid image" in row["error"]  # the provider's message
        else:
            assert_own_answer(row)
    assert any(r["attempts"] > 1 for r in out.values())  # faults were met and retried away

    stats = ep.stats()
    for fault in ("500", "503", "drop", "slow", "broken", "cut", "400"):
        assert stats["faults"].get(fault, 0) > 0, f"the run never met fault {fault}: {stats['faults']}"
    assert stats["over_limit"] <= 0.01 * stats["requests"], stats
    for b in bad:
        assert stats["per_row"][prompt_of(b)] == 1  # a 400 is never retried

    s = summary(tmp_path)
    assert (s["ok"], s["failed"], s["pending"]) == (rows - len(bad), len(bad), 0)
    assert s["failed_by_kind"] == {"bad_request": len(bad)}


# -- stops: quota, auth, endpoint down ------------------------------------------------------

def test_quota_stops_the_job_and_a_rerun_after_topping_up_finishes(tmp_path: Path, endpoint_factory: Any) -> None:
    rows = 80
    broke = endpoint_factory(row_faults={prompt_of(rid(40)): "quota"}, latency_ms=5)
    path = make_job(tmp_path, broke.base_url, rows, limits={"max_concurrency": 4}, run={"shard_rows": 16})
    first = run_cli("run", str(path))
    assert first.returncode == EXIT_STOPPED, first.stderr
    assert "quota" in first.stderr and "top it up" in first.stderr
    assert "to continue: pipeline run" in first.stderr
    stats = broke.stats()
    assert stats["statuses"].get("429", 0) >= 1
    assert len(stats["per_row"]) < rows  # it stopped sending, not burned through the rest

    done = by_id(read_output(tmp_path / "out"))
    assert done and all(r["status"] == "ok" for r in done.values())  # no error row for an unsent row
    for r in done.values():
        assert_own_answer(r)
    s = summary(tmp_path)
    assert s["stopped"]["kind"] == "quota" and s["failed"] == 0 and s["pending"] == rows - len(done)

    # "topped up": the same job (its base_url now the healthy endpoint) continues where it stopped
    healthy = endpoint_factory()
    make_job(tmp_path, healthy.base_url, rows, limits={"max_concurrency": 4}, run={"shard_rows": 16})
    assert run_job(path) == EXIT_OK
    out = by_id(read_output(tmp_path / "out"))
    assert len(out) == rows
    for r in out.values():
        assert_own_answer(r)
    per_row = healthy.stats()["per_row"]
    for row_id in out:
        expected = 0 if row_id in done else 1  # answered rows are not sent again; the rest once
        assert per_row.get(prompt_of(row_id), 0) == expected, row_id


def test_a_stop_does_not_wait_out_pauses_and_backoffs(tmp_path: Path, endpoint_factory: Any) -> None:
    """Row 1 gets a 429 asking for 30 s: row 1 backs off and the pool pauses, so the next rows
    wait for a place. Row 2's quota 429, sent before and answered after (0.5 s), stops the job:
    at once, not after the pause or the grace period (10 s)."""
    ep = endpoint_factory(row_faults={prompt_of(rid(1)): "429", prompt_of(rid(2)): "quota"},
                          row_latency_ms={prompt_of(rid(2)): 500}, fault_retry_after_s=30, latency_ms=20, record=True)
    path = make_job(tmp_path, ep.base_url, 30, limits={"max_concurrency": 3})
    assert run_job(path) == EXIT_STOPPED
    s = summary(tmp_path)
    assert s["stopped"]["kind"] == "quota"
    assert s["duration_s"] < 8.0, s  # the waiting workers were let go, not waited for
    assert s["failed"] == 0 and s["pending"] == 30 - s["ok"]
    # the stop came while the pool was paused: nothing was sent after the 429
    log = ep.requests()
    refused = next(e["t"] for e in log if e["row"] == prompt_of(rid(1)))
    assert [e["row"] for e in log if e["t"] > refused + 0.2] == []


def test_401_stops_at_once_without_error_rows_or_the_key_anywhere(tmp_path: Path, endpoint_factory: Any) -> None:
    secret = "sk-test-wrong-7d1c0ffee"
    ep = endpoint_factory(api_key="sk-the-right-one")  # echoes the key it was shown, as some providers do
    concurrency = 4
    path = make_job(tmp_path, ep.base_url, 50, endpoint={"api_key_env": "PIPELINE_TEST_KEY"},
                    limits={"max_concurrency": concurrency})
    proc = run_cli("run", str(path), env={"PIPELINE_TEST_KEY": secret})
    assert proc.returncode == EXIT_STOPPED, proc.stderr
    assert "refused the API key" in proc.stderr and "PIPELINE_TEST_KEY" in proc.stderr
    assert ep.stats()["requests"] <= concurrency  # at most the requests already in flight
    assert not [r for r in read_output(tmp_path / "out") if r["status"] == "error"]
    assert summary(tmp_path)["stopped"]["kind"] == "auth"
    assert summary(tmp_path)["failed"] == 0
    assert secret not in proc.stderr + proc.stdout
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"the key leaked into {f}"


@pytest.mark.parametrize("trip", ["count", "time"])
def test_breaker_stops_when_the_endpoint_is_down_and_the_rows_stay_pending(
    tmp_path: Path, endpoint_factory: Any, trip: str
) -> None:
    rows = 40
    down = endpoint_factory(faults={"503": 1.0})
    # max_attempts is low on purpose: rows run out of attempts before the breaker trips, and
    # must still not be written as failed (the endpoint is down, the rows are fine).
    breaker = {"breaker_failures": 24} if trip == "count" else {"breaker_failures": 100000, "breaker_seconds": 1.0}
    limits = {"max_concurrency": 8, "max_attempts": 2, **breaker}
    path = make_job(tmp_path, down.base_url, rows, limits=limits)
    assert run_job(path) == EXIT_STOPPED
    assert read_output(tmp_path / "out") == []  # no row burned into an error
    s = summary(tmp_path)
    assert s["stopped"]["kind"] == "endpoint_down" and s["pending"] == rows and s["failed"] == 0
    assert "HTTP 503" in s["stopped"]["message"]
    if trip == "count":
        assert down.stats()["requests"] <= 24 + 8

    up = endpoint_factory()
    make_job(tmp_path, up.base_url, rows, limits=limits)
    assert run_job(path) == EXIT_OK
    out = by_id(read_output(tmp_path / "out"))
    assert len(out) == rows and all(r["attempts"] == 1 for r in out.values())


def test_a_row_that_always_fails_on_a_healthy_endpoint_is_still_written(tmp_path: Path, endpoint_factory: Any) -> None:
    """The breaker's holding back of errors must not swallow a row that really fails."""
    ep = endpoint_factory(row_faults={prompt_of(rid(3)): "500", prompt_of(rid(11)): "drop"})
    path = make_job(tmp_path, ep.base_url, 12, limits={"max_concurrency": 2, "max_attempts": 2})
    assert run_job(path) == EXIT_FAILED_ROWS
    out = by_id(read_output(tmp_path / "out"))
    assert len(out) == 12
    assert (out[rid(3)]["error_kind"], out[rid(3)]["attempts"]) == ("server", 2)
    assert "HTTP 500" in out[rid(3)]["error"]
    assert (out[rid(11)]["error_kind"], out[rid(11)]["attempts"]) == ("connection", 2)
    # the last row to fail has no success after it: released at the end, not lost
    assert sum(r["status"] == "ok" for r in out.values()) == 10


# -- row-level outcomes ----------------------------------------------------------------------

def test_length_cutoff_is_truncated_keeps_reasoning_and_retries_on_request(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={prompt_of(rid(3)): "length:1"})
    path = make_job(tmp_path, ep.base_url, 8)
    assert run_job(path) == EXIT_FAILED_ROWS
    row = by_id(read_output(tmp_path / "out"))[rid(3)]
    assert (row["status"], row["error_kind"], row["finish_reason"], row["answer"]) == ("error", "truncated", "length", None)
    assert prompt_of(rid(3)) in row["reasoning"]  # the thinking so far is kept
    assert row["attempts"] == 1  # not retried blindly: the same max_tokens would cut it again
    assert summary(tmp_path)["failed_by_kind"] == {"truncated": 1}

    assert run_job(path, retry_failed=frozenset({"truncated"})) == EXIT_OK
    out = by_id(read_output(tmp_path / "out"))
    assert_own_answer(out[rid(3)])
    per_row = ep.stats()["per_row"]
    assert per_row[prompt_of(rid(3))] == 2
    assert all(per_row[prompt_of(r)] == 1 for r in out if r != rid(3))  # only the cut row went again


def test_x_should_retry_overrides_the_status(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(
        row_faults={prompt_of(rid(1)): "400:1", prompt_of(rid(2)): "500"},
        x_should_retry={"400": "true", "500": "false"},
    )
    path = make_job(tmp_path, ep.base_url, 5)
    assert run_job(path) == EXIT_FAILED_ROWS
    out = by_id(read_output(tmp_path / "out"))
    assert_own_answer(out[rid(1)])
    assert out[rid(1)]["attempts"] == 2  # a 400 the server said to retry
    assert (out[rid(2)]["status"], out[rid(2)]["error_kind"], out[rid(2)]["attempts"]) == ("error", "server", 1)
    assert ep.stats()["per_row"][prompt_of(rid(2))] == 1  # a 500 the server said not to retry


def test_error_rows_name_kind_status_and_message(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={prompt_of(rid(0)): "400", prompt_of(rid(1)): "broken",
                                      prompt_of(rid(2)): "nochoices", prompt_of(rid(3)): "slow",
                                      prompt_of(rid(4)): "cut"}, slow_ms=1500)
    path = make_job(tmp_path, ep.base_url, 6, limits={"max_attempts": 2, "timeout_s": 0.5, "max_concurrency": 6})
    assert run_job(path) == EXIT_FAILED_ROWS
    out = by_id(read_output(tmp_path / "out"))
    expect = {rid(0): "bad_request", rid(1): "invalid_response", rid(2): "invalid_response",
              rid(3): "timeout", rid(4): "connection"}
    for row_id, kind in expect.items():
        row = out[row_id]
        assert (row["status"], row["error_kind"]) == ("error", kind), row
        assert row["error"] and kind in ERROR_KINDS
    assert out[rid(0)]["error"].startswith("HTTP 400: ")
    assert_own_answer(out[rid(5)])
