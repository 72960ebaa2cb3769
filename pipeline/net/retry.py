"""Retry: a pure policy. Should this failed attempt be retried, and after how long?

    retry = should_retry(err, attempt=2, max_attempts=5)
    delay = retry_delay(err, attempt=2, now=time.time(), jitter=random.random())

No I/O, no clock of its own: the caller passes `now` and the jitter draw, so tests are tables.
Constants mirror the OpenAI SDK's policy (see ../shared/notes/api-facts.md) where it is right.
"""

from __future__ import annotations

import email.utils

from ..durations import finite as _number
from ..durations import parse_duration
from ..errors import ErrorKind, RequestError

__all__ = [
    "RETRYABLE_KINDS",
    "STOP_KINDS",
    "BASE_DELAY_S",
    "MAX_DELAY_S",
    "RATE_LIMIT_BASE_DELAY_S",
    "LONG_BACKOFF_BASE_S",
    "should_retry",
    "retry_delay",
    "server_delay",
    "parse_duration",
]

RETRYABLE_KINDS = frozenset(k.value for k in ErrorKind if k.retryable)
STOP_KINDS = frozenset(k.value for k in ErrorKind if k.stops)  # apply to every row: stop the job, no row fails
BASE_DELAY_S = 0.5
MAX_DELAY_S = 8.0
RATE_LIMIT_BASE_DELAY_S = 1.0
LONG_BACKOFF_BASE_S = 5.0  # DashScope's Throttling.AllocationQuota: a per-minute throttle
LONG_BACKOFF_MAX_S = 60.0
JITTER_LOW = 0.75  # delay *= JITTER_LOW + (1 - JITTER_LOW) * jitter draw
DEFAULT_MAX_SERVER_DELAY_S = 120.0
DASHSCOPE_THROTTLE = "Throttling.AllocationQuota"



def should_retry(err: RequestError, attempt: int, max_attempts: int) -> bool:
    """`attempt` is the number of the attempt that just failed (1-based)."""
    if attempt >= max_attempts or err.kind in STOP_KINDS:
        return False
    if err.should_retry is not None:  # x-should-retry overrides the status-based verdict
        return err.should_retry
    return err.kind in RETRYABLE_KINDS


def server_delay(headers: dict[str, str], now: float, *, rate_limited: bool = False) -> float | None:
    """The delay the server asked for, in seconds, from any header style; None when it gave none.

    `headers` keys are lower-case. `now` is the Unix time, for Retry-After given as an HTTP date.
    `x-ratelimit-reset-*` say when a window refills and ride on every answer (a 200, a 500), so
    they mean "wait" only where that limit is spent (remaining 0) or the answer is a 429
    (`rate_limited`), where the spent ones are preferred.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None and (value := _number(ms)) is not None:
        return max(0.0, value / 1000.0)
    ra = headers.get("retry-after")
    if ra is not None:
        value = _number(ra)
        if value is not None:
            return max(0.0, value)
        try:
            when = email.utils.parsedate_to_datetime(ra)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - now)
    spent: list[float] = []
    others: list[float] = []
    for kind in ("requests", "tokens"):
        reset = headers.get(f"x-ratelimit-reset-{kind}")
        wait = parse_duration(reset) if reset is not None else None
        if wait is None:
            continue
        left = _number(headers.get(f"x-ratelimit-remaining-{kind}", ""))
        (spent if left is not None and left <= 0 else others).append(wait)
    if spent:
        return max(spent)
    if rate_limited and others:
        return max(others)
    return None


def retry_delay(
    err: RequestError,
    attempt: int,
    *,
    now: float,
    jitter: float,
    max_server_delay: float = DEFAULT_MAX_SERVER_DELAY_S,
) -> float:
    """Seconds to wait before the next attempt. `jitter` is a draw in [0, 1)."""
    asked = server_delay(err.headers, now, rate_limited=err.kind == "rate_limit")
    if asked is not None:
        return min(asked, max_server_delay)
    if err.kind == "rate_limit" and err.code == DASHSCOPE_THROTTLE:
        base, cap = LONG_BACKOFF_BASE_S, LONG_BACKOFF_MAX_S
    elif err.kind == "rate_limit":
        base, cap = RATE_LIMIT_BASE_DELAY_S, MAX_DELAY_S * 2
    else:
        base, cap = BASE_DELAY_S, MAX_DELAY_S
    delay = min(base * 2 ** min(attempt - 1, 30), cap)  # a row paced by a thousand 429s: no OverflowError
    return delay * (JITTER_LOW + (1 - JITTER_LOW) * jitter)
