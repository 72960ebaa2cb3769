"""The retry policy, the status classifier and the circuit breaker, as tables.

Pure functions with the clock and the jitter draw passed in: no sleeps, no server.
"""

from __future__ import annotations

import email.utils

import aiohttp
import pytest

from pipeline.errors import RequestError
from pipeline.net.breaker import Breaker
from pipeline.net.client import classify_status, translate
from pipeline.net.retry import (
    BASE_DELAY_S,
    LONG_BACKOFF_BASE_S,
    MAX_DELAY_S,
    parse_duration,
    retry_delay,
    server_delay,
    should_retry,
)

NOW = 1_750_000_000.0  # a fixed "now" (Unix seconds) for HTTP-date arithmetic


def err(kind: str, *, headers: dict[str, str] | None = None, should: bool | None = None, code: str | None = None,
        status: int | None = None) -> RequestError:
    return RequestError("m", kind=kind, status=status, headers=headers, should_retry=should, code=code)


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


# -- classify_status -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "status, code, kind",
    [
        (429, "rate_limit_exceeded", "rate_limit"),
        (429, "requests", "rate_limit"),
        (429, "tokens", "rate_limit"),
        (429, None, "rate_limit"),  # vLLM and gateways: a bare 429 is a rate limit
        (429, "insufficient_quota", "quota"),
        (429, "billing_hard_limit_reached", "quota"),
        (429, "spend_limit_reached", "quota"),
        (400, "billing_hard_limit_reached", "quota"),  # OpenAI sends this one as a 400 too
        (400, "Arrearage", "quota"),  # DashScope: account in arrears
        (429, "Throttling.AllocationQuota", "rate_limit"),  # quota wording, transient throttle
        (429, "Throttling.RateQuota", "rate_limit"),
        (402, None, "quota"),
        (401, "invalid_api_key", "auth"),
        (403, None, "auth"),
        (400, "invalid_request_error", "bad_request"),
        (404, None, "bad_request"),
        (413, None, "bad_request"),
        (422, None, "bad_request"),
        (408, None, "timeout"),
        (409, None, "server"),
        (500, "server_error", "server"),
        (502, None, "server"),
        (503, None, "server"),
        (504, None, "server"),
        (529, None, "server"),
    ],
)
def test_classify_status(status: int, code: str | None, kind: str) -> None:
    assert classify_status(status, code) == kind


@pytest.mark.parametrize(
    "body, kind, code",
    [
        (b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}',
         "quota", "insufficient_quota"),
        # quota named only in `type` (code null), as some OpenAI-compatible gateways send it
        (b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":null}}',
         "quota", "insufficient_quota"),
        # quota in `type` while `code` holds something generic
        (b'{"error":{"message":"quota","type":"insufficient_quota","code":"429"}}', "quota", "insufficient_quota"),
        (b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}',
         "rate_limit", "rate_limit_exceeded"),
        # DashScope native and compatible-mode shapes
        (b'{"code":"Throttling.AllocationQuota","message":"Allocated quota exceeded, please increase your quota limit."}',
         "rate_limit", "Throttling.AllocationQuota"),
        (b'{"error":{"code":"Throttling.AllocationQuota","message":"Allocated quota exceeded","type":"Throttling.AllocationQuota"}}',
         "rate_limit", "Throttling.AllocationQuota"),
        (b"<html>Too Many Requests</html>", "rate_limit", None),
        (b"", "rate_limit", None),
    ],
)
def test_translate_429_bodies(body: bytes, kind: str, code: str | None) -> None:
    e = translate(status=429, headers={}, body=body)
    assert (e.kind, e.code, e.status) == (kind, code, 429)
    assert e.message  # the provider's message (or the body text) is kept for the error row


@pytest.mark.parametrize(
    "headers, should",
    [
        ({"x-should-retry": "true"}, True),
        ({"x-should-retry": "false"}, False),
        ({"x-should-retry": "TRUE"}, True),
        ({"x-should-retry": "maybe"}, None),
        ({}, None),
    ],
)
def test_translate_reads_x_should_retry(headers: dict[str, str], should: bool | None) -> None:
    assert translate(status=400, headers=headers, body=b"{}").should_retry is should


@pytest.mark.parametrize(
    "exc, kind",
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("read timeout"), "timeout"),
        (aiohttp.ServerDisconnectedError(), "connection"),
        (aiohttp.ClientPayloadError("cut"), "connection"),
        (ConnectionResetError(104, "reset by peer"), "connection"),
        (ValueError("Expecting value"), "invalid_response"),
    ],
)
def test_translate_exceptions(exc: BaseException, kind: str) -> None:
    assert translate(exc).kind == kind


def test_translate_scrubs_the_key() -> None:
    e = translate(status=401, headers={}, body=b'{"error":{"message":"Incorrect API key provided: sk-secret-123"}}',
                  secret="sk-secret-123")
    assert "sk-secret-123" not in e.message and "sk-secret-123" not in e.describe()
    assert e.kind == "auth"


# -- parse_duration --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1s", 1.0),
        ("12ms", 0.012),
        ("6m0s", 360.0),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("0.5s", 0.5),
        ("2", 2.0),
        ("0.25", 0.25),
        (" 3s ", 3.0),
        ("-5", 0.0),
        ("soon", None),
        ("1x", None),
        ("", None),
        ("1s garbage", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    got = parse_duration(text)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


# -- server_delay: each header style, with a controlled `now` --------------------------------

@pytest.mark.parametrize(
    "headers, delay",
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise one wins
        ({"retry-after": http_date(NOW + 30)}, 30.0),
        ({"retry-after": http_date(NOW - 30)}, 0.0),  # a date in the past: go now
        ({"x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"x-ratelimit-reset-tokens": "1m0s"}, 60.0),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "500ms"}, 2.0),
        ({"retry-after": "3", "x-ratelimit-reset-requests": "20s"}, 3.0),
        ({"retry-after": "next tuesday"}, None),
        ({"retry-after-ms": "soon"}, None),
        ({"retry-after": "nan"}, None),
        ({}, None),
    ],
)
def test_server_delay(headers: dict[str, str], delay: float | None) -> None:
    got = server_delay(headers, NOW, rate_limited=True)  # as on a 429
    assert got == pytest.approx(delay) if delay is not None else got is None


def test_http_date_follows_the_clock_passed_in() -> None:
    headers = {"retry-after": http_date(NOW + 30)}
    assert server_delay(headers, NOW + 10) == pytest.approx(20.0)
    assert server_delay(headers, NOW + 45) == 0.0


def test_reset_headers_only_count_when_the_limit_is_spent() -> None:
    # Every OpenAI answer carries x-ratelimit-reset-*: on a 200 or a 500 with places left they
    # say when the window refills, not "wait". Only a spent limit (remaining 0) means wait.
    full = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "4s",
            "x-ratelimit-remaining-tokens": "9000", "x-ratelimit-reset-tokens": "6m0s"}
    assert server_delay(full, NOW) == pytest.approx(4.0)
    left = {"x-ratelimit-remaining-requests": "12", "x-ratelimit-reset-requests": "4s"}
    assert server_delay(left, NOW) is None
    assert server_delay(left, NOW, rate_limited=True) == pytest.approx(4.0)  # a 429: the server says wait


# -- retry_delay -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kind, code, attempt, jitter, expected",
    [
        ("server", None, 1, 1.0, BASE_DELAY_S),
        ("server", None, 2, 1.0, BASE_DELAY_S * 2),
        ("server", None, 3, 1.0, BASE_DELAY_S * 4),
        ("server", None, 10, 1.0, MAX_DELAY_S),  # capped
        ("server", None, 1, 0.0, BASE_DELAY_S * 0.75),  # jitter takes off up to a quarter
        ("timeout", None, 2, 0.5, BASE_DELAY_S * 2 * 0.875),
        ("connection", None, 1, 1.0, BASE_DELAY_S),
        ("invalid_response", None, 1, 1.0, BASE_DELAY_S),
        ("rate_limit", None, 1, 1.0, 1.0),
        ("rate_limit", None, 10, 1.0, 16.0),
        ("rate_limit", "Throttling.AllocationQuota", 1, 1.0, LONG_BACKOFF_BASE_S),  # the long backoff
        ("rate_limit", "Throttling.AllocationQuota", 3, 1.0, LONG_BACKOFF_BASE_S * 4),
        ("rate_limit", "Throttling.AllocationQuota", 20, 1.0, 60.0),
    ],
)
def test_retry_delay_backoff(kind: str, code: str | None, attempt: int, jitter: float, expected: float) -> None:
    assert retry_delay(err(kind, code=code), attempt, now=NOW, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": http_date(NOW + 42)}, 42.0),
        ({"x-ratelimit-reset-requests": "3s"}, 3.0),
        ({"retry-after": "3600"}, 120.0),  # capped by the default max_server_delay
        ({"retry-after": "0"}, 0.0),
    ],
)
def test_retry_delay_honours_the_server(headers: dict[str, str], expected: float) -> None:
    # jitter is not applied to what the server asked for: it knows when the window frees
    e = err("rate_limit", headers=headers, status=429)
    assert retry_delay(e, 1, now=NOW, jitter=0.0) == pytest.approx(expected)
    assert retry_delay(e, 4, now=NOW, jitter=0.0) == pytest.approx(expected)  # not multiplied either


def test_retry_delay_cap_is_configurable() -> None:
    e = err("rate_limit", headers={"retry-after": "90"})
    assert retry_delay(e, 1, now=NOW, jitter=1.0, max_server_delay=30.0) == 30.0
    assert retry_delay(e, 1, now=NOW, jitter=1.0, max_server_delay=300.0) == 90.0


def test_retry_delay_server_error_ignores_a_refill_time() -> None:
    # a 500 that carries the usual x-ratelimit-reset-tokens: 6m0s is not a request to wait 6 minutes
    e = err("server", headers={"x-ratelimit-remaining-tokens": "80000", "x-ratelimit-reset-tokens": "6m0s"})
    assert retry_delay(e, 1, now=NOW, jitter=1.0) == pytest.approx(BASE_DELAY_S)
    # but a Retry-After on a 503 is honoured
    e = err("server", headers={"retry-after": "4"})
    assert retry_delay(e, 1, now=NOW, jitter=1.0) == pytest.approx(4.0)


# -- should_retry ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kind, should, attempt, max_attempts, expected",
    [
        ("rate_limit", None, 1, 5, True),
        ("server", None, 1, 5, True),
        ("timeout", None, 1, 5, True),
        ("connection", None, 1, 5, True),
        ("invalid_response", None, 1, 5, True),
        ("server", None, 5, 5, False),  # attempts used up
        ("server", None, 4, 5, True),
        ("bad_request", None, 1, 5, False),
        ("truncated", None, 1, 5, False),  # recorded; --retry-failed=truncated sends it again
        ("quota", None, 1, 5, False),  # stops the job instead
        ("auth", None, 1, 5, False),
        # x-should-retry overrides the status-based verdict ...
        ("bad_request", True, 1, 5, True),
        ("server", False, 1, 5, False),
        ("rate_limit", False, 1, 5, False),
        # ... but not the attempt budget, nor a stop
        ("bad_request", True, 5, 5, False),
        ("quota", True, 1, 5, False),
        ("auth", True, 1, 5, False),
    ],
)
def test_should_retry(kind: str, should: bool | None, attempt: int, max_attempts: int, expected: bool) -> None:
    assert should_retry(err(kind, should=should), attempt, max_attempts) is expected


def test_every_status_end_to_end_through_translate_and_policy() -> None:
    """The issue's table, row by row: what came back -> retried or not."""
    cases = [
        (429, b'{"error":{"code":"rate_limit_exceeded"}}', {}, True),
        (429, b'{"code":"Throttling.AllocationQuota"}', {}, True),
        (401, b"{}", {}, False),
        (403, b"{}", {}, False),
        (400, b"{}", {}, False),
        (404, b"{}", {}, False),
        (413, b"{}", {}, False),
        (422, b"{}", {}, False),
        (408, b"{}", {}, True),
        (409, b"{}", {}, True),
        (500, b"{}", {}, True),
        (503, b"{}", {}, True),
        (500, b"{}", {"x-should-retry": "false"}, False),
        (400, b"{}", {"x-should-retry": "true"}, True),
    ]
    for status, body, headers, retried in cases:
        e = translate(status=status, headers=headers, body=body)
        assert should_retry(e, 1, 5) is retried, (status, body, headers)


# -- the circuit breaker ---------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_trips_on_a_streak_of_endpoint_faults() -> None:
    b = Breaker(max_failures=3, max_seconds=1000, clock=Clock())
    assert not b.failure("server")
    assert not b.failure("timeout")
    assert b.failure("connection")


def test_breaker_success_resets_the_streak() -> None:
    b = Breaker(max_failures=3, max_seconds=1000, clock=Clock())
    b.failure("server")
    b.failure("server")
    b.success()
    assert not b.failure("server")
    assert not b.failure("server")
    assert b.failure("server")


def test_breaker_ignores_row_faults_and_rate_limits() -> None:
    b = Breaker(max_failures=2, max_seconds=1000, clock=Clock())
    for kind in ("bad_request", "rate_limit", "truncated", "input"):
        for _ in range(10):
            assert not b.failure(kind)
    assert b.streak == 0


def test_breaker_trips_on_time_without_success() -> None:
    clock = Clock()
    b = Breaker(max_failures=1000, max_seconds=30, clock=clock)
    assert not b.failure("server")
    clock.t = 29.0
    assert not b.failure("server")
    clock.t = 30.0
    assert b.failure("server")
