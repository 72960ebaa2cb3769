"""Through an LLM gateway, and what a gateway changes: renamed rate-limit headers, rate-limit 429s
that must not spend a row's attempts, and a wrong key that every request meets the same way.

The pure parts are tables (pipeline.net.headers, pipeline.net.breaker); the run's behaviour is
tried against the built-in endpoint; and the whole path through a real LiteLLM proxy (the `litellm`
command of the test extra, no database) in front of the built-in endpoint: plain, streamed,
labels with `response_format` passed through, upstream 429s that reach us renamed
(`llm_provider-retry-after`), and a wrong gateway key (HTTP 400 `no_db_connection` to every request).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import Endpoint, job_dict, read_output, run_cli, start_endpoint, url_manifest, write_job, write_rows

from pipeline.engine import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED
from pipeline.net.breaker import Breaker
from pipeline.net.client import translate
from pipeline.net.headers import observed, unrenamed
from pipeline.net.retry import retry_delay, server_delay

# -- renamed headers (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({"llm_provider-retry-after": "7"}, 7.0),
        ({"llm_provider-retry-after-ms": "250"}, 0.25),
        ({"llm_provider-x-ratelimit-reset-requests": "9797ms", "x-ratelimit-remaining-requests": "0"}, 9.797),
        ({"llm_provider-x-ratelimit-reset-tokens": "1m30s", "llm_provider-x-ratelimit-remaining-tokens": "0"}, 90.0),
        ({"retry-after": "2", "llm_provider-retry-after": "30"}, 2.0),  # a plain header always wins
        ({"llm_provider-x-ratelimit-reset-requests": "3s"}, 3.0),  # on a 429, a reset alone is the wait
        ({"x-llm_provider-retry-after": "5"}, None),  # not the gateway's prefix
    ],
)
def test_a_gateways_renamed_delay_headers_are_read_where_plain_ones_are_missing(headers: dict[str, str],
                                                                               delay: float | None) -> None:
    assert server_delay(unrenamed(headers), now=0.0, rate_limited=True) == (pytest.approx(delay) if delay else None)
    err = translate(status=429, headers=headers, body=b'{"error": {"message": "slow down", "code": "429"}}')
    assert err.kind == "rate_limit"
    if delay is not None:  # translate, the one boundary, is where the renamed ones are read
        assert retry_delay(err, 1, now=0.0, jitter=0.0) == pytest.approx(delay)


def test_a_successs_renamed_headers_reach_the_limiter_and_plain_ones_win() -> None:
    got = observed({"x-ratelimit-limit-requests": "150", "llm_provider-x-ratelimit-limit-requests": "999",
                    "llm_provider-x-ratelimit-reset-requests": "10000ms", "llm_provider-x-secret": "no",
                    "x-ratelimit-remaining-requests": "4"})
    assert got == {"x-ratelimit-limit-requests": "150", "x-ratelimit-reset-requests": "10000ms",
                   "x-ratelimit-remaining-requests": "4"}


# -- the breaker's "wrong job" (pure, its clock a parameter) ----------------------------------

WRONG_KEY = (400, "bad_request", "no_db_connection", "No connected db.")


def _spread(b: Breaker) -> float:
    """The next refusal's row: each part of the run's rows in turn (the first from the first part)."""
    return (b.refusals % max(1, b.max_refusals)) / max(1, b.max_refusals)


def _refused(b: Breaker, key: tuple = WRONG_KEY) -> bool:
    b.done(b.sent())
    return b.refusal(key, _spread(b))


def test_the_first_refusals_all_alike_with_nothing_answered_trip_the_breaker() -> None:
    b = Breaker(50, 120.0, max_refusals=3, clock=lambda: 0.0)
    assert b.holds("bad_request") and not b.settled
    assert [_refused(b) for _ in range(3)] == [False, False, True]
    b.success()  # an answer in flight when it tripped, arriving during the stop: the trip is final
    assert (b.holds("bad_request"), b.settled, _refused(b, (400, "bad_request", None, "other"))) == (True, False, True)


def test_fast_refusals_wait_for_the_requests_sent_before_them() -> None:
    """A provider refuses bad rows in milliseconds and answers good ones in seconds: enough alike
    refusals back while requests sent before them are still out is no verdict yet."""
    b = Breaker(50, 120.0, max_refusals=3, clock=lambda: 0.0)
    slow = [b.sent() for _ in range(2)]  # good rows, slow
    fast = [b.sent() for _ in range(4)]  # bad rows, refused at once
    verdicts = []
    for ticket in fast:
        b.done(ticket)
        verdicts.append(b.refusal(WRONG_KEY, _spread(b)))
    assert verdicts == [False] * 4 and b.doubting  # 4 alike, but 2 sent before them are out
    late = b.sent()  # sent after the verdict was due: not waited for
    assert late > slow[-1]
    b.done(slow[0])
    b.success()  # one of them is answered: the job is right, the refused rows are bad
    assert b.settled and not _refused(b)


def test_alike_refusals_trip_once_the_older_requests_came_back_refused_too() -> None:
    b = Breaker(50, 120.0, max_refusals=3, clock=lambda: 0.0)
    tickets = [b.sent() for _ in range(5)]
    verdicts = []
    for ticket in tickets:
        b.done(ticket)
        verdicts.append(b.refusal(WRONG_KEY, _spread(b)))
    assert verdicts == [False, False, False, False, True]  # the third waited for the two still out

    b = Breaker(50, 120.0, max_refusals=3, clock=lambda: 0.0)
    first = [b.sent() for _ in range(3)]
    tripped = False
    for ticket in first:
        b.done(ticket)
        tripped = b.refusal(WRONG_KEY, _spread(b))
    assert tripped  # nothing else was out: a request sent after the verdict is not waited for


def test_a_job_vouched_for_never_trips_on_refusals() -> None:
    b = Breaker(50, 120.0, max_refusals=3, clock=lambda: 0.0)
    b.vouch()  # answered by an earlier run, or from the request cache
    assert not any(_refused(b) for _ in range(10)) and b.settled


@pytest.mark.parametrize(
    ("events", "trips"),
    [
        (["refused", "refused", "answered", "refused", "refused"], False),  # an answer: the job is right
        (["refused", "other", "refused", "refused", "refused"], False),  # refusals that differ are the rows'
        (["answered", "refused", "refused", "refused"], False),
    ],
)
def test_an_answer_or_a_different_refusal_settles_the_doubt_for_the_run(events: list[str], trips: bool) -> None:
    b = Breaker(50, 120.0, max_refusals=3, clock=lambda: 0.0)
    tripped = False
    for event in events:
        if event == "answered":
            b.success()
        else:
            tripped |= _refused(b, WRONG_KEY if event == "refused" else (400, "bad_request", None, "Invalid image"))
    assert tripped is trips
    assert not b.holds("bad_request") and b.settled  # held rows are the rows' own failures now


def test_no_refusal_trips_a_breaker_told_never_to() -> None:
    b = Breaker(50, 120.0, max_refusals=0)
    assert not any(_refused(b) for _ in range(100)) and not b.holds("bad_request")


def test_answered_since_tells_whether_anything_got_through_while_a_row_was_paced() -> None:
    now = [0.0]
    b = Breaker(50, 120.0, clock=lambda: now[0])
    assert not b.answered_since(0.0)
    now[0] = 5.0
    b.success()
    assert b.answered_since(4.0) and not b.answered_since(6.0)


# -- runs against the built-in endpoint -------------------------------------------------------


def _job(tmp_path: Path, base_url: str, rows: int, **sections: Any) -> Path:
    manifest = url_manifest(tmp_path / "m.csv", rows)
    return write_job(tmp_path / "job.toml", job_dict(manifest, base_url, tmp_path / "out", **sections))


def _status(job: Path) -> dict[str, Any]:
    result = run_cli("status", str(job), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_rate_limit_429s_do_not_spend_attempts_and_every_row_finishes(tmp_path: Path, endpoint_factory: Any) -> None:
    """max_attempts = 1 and an endpoint allowing 2 requests per second, hit by up to 8 at once with
    no pacing of our own: before, every row refused once was failed; now each waits its turn again.
    (2, not 5: on a loaded machine the run's first second held fewer than 6 requests, no 429.)"""
    ep = endpoint_factory(rate_limit=2, rate_window_s=1.0, rate_headers="retry-after-ms")
    job = _job(tmp_path, ep.base_url, 15, limits={"requests_per_minute": 60000, "max_concurrency": 8, "max_attempts": 1})
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_OK, result.stderr
    rows = read_output(tmp_path / "out")
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows)
    assert ep.stats()["statuses"].get("429", 0) > 0  # the endpoint did refuse
    assert any(r["attempts"] > 1 for r in rows)  # `attempts` still counts every request made


def test_a_provider_refusing_everything_for_its_rate_limit_stops_the_run_rows_pending(
        tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(faults={"429": 1.0}, fault_retry_after_s=0.2)
    job = _job(tmp_path, ep.base_url, 6, limits={"max_concurrency": 2, "max_rate_limit_wait_s": 1.0})
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_STOPPED, result.stderr
    assert "rate limit" in result.stderr and "max_rate_limit_wait_s" in result.stderr
    assert read_output(tmp_path / "out") == []  # not one row failed for the provider's pacing
    assert _status(job)["pending"] == 6


def test_the_same_refusal_for_the_first_requests_stops_the_run_once_rows_pending(
        tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(faults={"400": 1.0})
    job = _job(tmp_path, ep.base_url, 40, limits={"max_concurrency": 4})
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_STOPPED, result.stderr
    said = re.findall(r"refused (\d+) requests the same way, from every part of the run.s rows", result.stderr)
    assert len(said) == 1 and int(said[0]) >= 5, result.stderr  # once; 5, or the few more that were out
    assert "HTTP 400" in result.stderr and "breaker_refusals" in result.stderr
    assert read_output(tmp_path / "out") == []
    assert ep.stats()["requests"] < 40  # it stopped sending instead of failing every row
    assert _status(job)["pending"] == 40

    # the user says these rows really are bad: they fail as rows, exit 1
    job = _job(tmp_path, ep.base_url, 40, limits={"max_concurrency": 4, "breaker_refusals": 0})
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_FAILED_ROWS, result.stderr
    rows = read_output(tmp_path / "out")
    assert len(rows) == 40 and {r["error_kind"] for r in rows} == {"bad_request"}


def test_refusals_before_the_first_answer_are_held_then_written_as_the_rows_own(
        tmp_path: Path, endpoint_factory: Any) -> None:
    """The first rows are refused (alike) before any answer: held, not written, not a stop (4 < 5);
    the answers that follow settle it, and the refused rows are written as the failures they are."""
    bad = {f"row-{i:05d}" for i in range(4)}
    ep = endpoint_factory(row_faults={f"Describe picture {b}": "400" for b in bad})
    job = _job(tmp_path, ep.base_url, 30, limits={"max_concurrency": 1})
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_FAILED_ROWS, result.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert len(rows) == 30
    assert {i for i, r in rows.items() if r["status"] == "error"} == bad
    assert all(rows[b]["error_kind"] == "bad_request" for b in bad)


def _bad_rows_manifest(path: Path, n: int, bad: set[int]) -> Path:
    write_rows(path, [{"id": f"row-{i:05d}", "image": f"https://images.example/{i}.png",
                       "prompt": f"BADROW {i}" if i in bad else f"good picture {i}"} for i in range(n)], "csv")
    return path


def test_bad_rows_refused_fast_while_good_ones_answer_slowly_are_the_rows_own(
        tmp_path: Path, endpoint_factory: Any) -> None:
    """6 of the first 12 rows refused alike in milliseconds, the good ones between them answered in
    300 ms: a right job with bad rows (exit 1), not a wrong one; every row written exactly once."""
    bad = {0, 2, 4, 6, 8, 10}
    ep = endpoint_factory(row_faults={"BADROW": "400"}, row_latency_ms={"good": 300})
    manifest = _bad_rows_manifest(tmp_path / "m.csv", 24, bad=bad)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out", limits={"max_concurrency": 8}))
    result = run_cli("run", str(job))
    assert result.returncode == EXIT_FAILED_ROWS, result.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert len(rows) == 24 and {i for i, r in rows.items() if r["status"] == "error"} == {f"row-{i:05d}" for i in bad}


def test_retrying_and_re_running_rows_that_really_are_bad_is_no_wrong_job(tmp_path: Path, endpoint_factory: Any) -> None:
    """Refused rows met again (--retry-failed), or a re-run mostly answered from the request cache:
    the job has been answered before, so alike refusals are the rows' own, never a stop."""
    ep = endpoint_factory(row_faults={"BADROW": "400"})
    manifest = _bad_rows_manifest(tmp_path / "m.csv", 16, bad=set(range(10, 16)))
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out", limits={"max_concurrency": 1},
                                                    run={"cache": str(tmp_path / "cache")}))
    for args in ((), ("--retry-failed",), ("--restart",)):
        result = run_cli("run", str(job), *args)
        assert result.returncode == EXIT_FAILED_ROWS, (args, result.stderr)
        assert _status(job)["failed"] == 6 and _status(job)["pending"] == 0


def test_bad_requests_are_refused_with_the_providers_error(tmp_path: Path) -> None:
    err = translate(status=400, body=b'{"error":{"message":"No connected db.","type":"no_db_connection","code":"400"}}')
    assert err.kind == "bad_request" and err.code == "no_db_connection"


# -- through a real LiteLLM proxy -------------------------------------------------------------

GATEWAY_KEY = "sk-gateway-test-0123"
UPSTREAM_KEY = "sk-upstream-test-4567"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["cat", "dog"]},
                                           "confidence": {"type": "number"}}, "required": ["label", "confidence"]}


def _litellm() -> str | None:
    here = Path(sys.executable).parent / "litellm"
    return str(here) if here.exists() else shutil.which("litellm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    def __init__(self, url: str, plain: Endpoint, paced: Endpoint) -> None:
        self.url, self.plain, self.paced = url, plain, paced


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    exe = _litellm()
    if exe is None:
        pytest.skip("the LiteLLM proxy (`litellm`, pinned in the test extra) is not installed here")
    plain = start_endpoint(record=True)
    paced = start_endpoint(rate_limit=6, rate_window_s=1.0, rate_headers="retry-after")
    folder = tmp_path_factory.mktemp("gateway")
    models = [(name, ep) for name, ep in (("vision", plain), ("paced", paced))]
    config = "model_list:\n" + "".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: openai/test-vl\n"
        f"      api_base: {ep.base_url}\n      api_key: {UPSTREAM_KEY}\n" for name, ep in models)
    # No database, as the users ran it; no retries or cooldowns of its own, so what the
    # provider answers is what the pipeline meets.
    config += (f"general_settings:\n  master_key: {GATEWAY_KEY}\nlitellm_settings:\n  num_retries: 0\n"
               f"router_settings:\n  disable_cooldowns: true\n  num_retries: 0\n")
    (folder / "config.yaml").write_text(config)
    port = _free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "NO_PROXY": "*"}
    log = open(folder / "litellm.log", "wb")
    proc = subprocess.Popen([exe, "--config", str(folder / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health/liveliness", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the LiteLLM proxy did not start: {(folder / 'litellm.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield Gateway(url + "/v1", plain, paced)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for ep in (plain, paced):
            ep.proc.terminate()
            ep.proc.wait(10)


def _gateway_job(tmp_path: Path, gw: Gateway, rows: int, *, model: str = "vision", **sections: Any) -> Path:
    manifest = url_manifest(tmp_path / "m.csv", rows)
    job = job_dict(manifest, gw.url, tmp_path / "out", **sections)
    job["endpoint"] = {**job["endpoint"], "model": model, "api_key_env": "GATEWAY_KEY", **sections.get("endpoint", {})}
    return write_job(tmp_path / "job.toml", job)


def _run(job: Path, key: str = GATEWAY_KEY) -> subprocess.CompletedProcess:
    return run_cli("run", str(job), env={"GATEWAY_KEY": key}, timeout=180)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_answers_through_the_gateway(tmp_path: Path, gateway: Gateway, stream: bool) -> None:
    job = _gateway_job(tmp_path, gateway, 12, request={"max_tokens": 64, "stream": stream})
    result = _run(job)
    assert result.returncode == EXIT_OK, result.stderr
    rows = read_output(tmp_path / "out")
    assert len(rows) == 12
    for row in rows:
        assert row["status"] == "ok" and row["answer"].startswith("Answer to 'Describe picture"), row
        assert row["reasoning"] and row["total_tokens"] and row["attempts"] == 1
    assert GATEWAY_KEY not in result.stderr + result.stdout


def test_labels_pass_through_the_gateway_with_their_response_format(tmp_path: Path, gateway: Gateway) -> None:
    before = len(gateway.plain.requests())
    job = _gateway_job(tmp_path, gateway, 4, labels={"schema": SCHEMA})
    result = _run(job)
    assert result.returncode == EXIT_OK, result.stderr
    rows = read_output(tmp_path / "out")
    assert [(r["status"], r["label"], r["confidence"]) for r in rows] == [("ok", "cat", 0.5)] * 4
    sent = [json.loads(r["body"]) for r in gateway.plain.requests()[before:]]
    assert len(sent) == 4
    assert all(b["response_format"]["json_schema"]["schema"] == SCHEMA for b in sent)  # reached the provider


def test_upstream_429s_renamed_by_the_gateway_pace_the_run_and_fail_no_row(tmp_path: Path, gateway: Gateway) -> None:
    """The provider allows 6 requests a second; the job, told nothing of it, sends 8 at once with
    max_attempts = 2. Its 429s reach us as `llm_provider-retry-after`: every row ends ok."""
    job = _gateway_job(tmp_path, gateway, 20, model="paced",
                       limits={"requests_per_minute": 60000, "max_concurrency": 8, "max_attempts": 2})
    result = _run(job)
    assert result.returncode == EXIT_OK, result.stderr
    rows = read_output(tmp_path / "out")
    assert len(rows) == 20 and all(r["status"] == "ok" for r in rows)
    stats = gateway.paced.stats()
    assert stats["statuses"].get("429", 0) > 0  # the provider did refuse, through the gateway
    # Paced by the provider's delay, not by a retry storm: far fewer refusals than requests answered.
    assert stats["statuses"]["429"] < 20, stats["statuses"]


def test_a_wrong_gateway_key_stops_the_run_once_with_the_rows_pending(tmp_path: Path, gateway: Gateway) -> None:
    job = _gateway_job(tmp_path, gateway, 40, limits={"max_concurrency": 4})
    result = _run(job, key="sk-not-the-gateways-key")
    assert result.returncode == EXIT_STOPPED, result.stderr
    assert result.stderr.count("No connected db.") == 1, result.stderr  # the gateway's message, once
    assert "sk-not-the-gateways-key" not in result.stderr
    assert read_output(tmp_path / "out") == []
    assert _status(job)["pending"] == 40
