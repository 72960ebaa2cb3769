"""The circuit breaker: tells "the endpoint is down" from "some rows fail".

Trips when `max_failures` attempts in a row failed with an endpoint fault (server error,
timeout, dropped connection, unusable body) or when failures have gone on for `max_seconds` with
no success. Row-specific failures (bad_request, input) never count: they say nothing of the
endpoint's health.
"""

from __future__ import annotations

import time
from typing import Callable

from ..errors import ErrorKind

__all__ = ["Breaker", "ENDPOINT_FAULTS"]

ENDPOINT_FAULTS = frozenset(k.value for k in ErrorKind if k.endpoint_fault)


class Breaker:
    def __init__(self, max_failures: int, max_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.max_seconds = max_seconds
        self.clock = clock
        self.streak = 0
        self.streak_started: float | None = None

    def success(self) -> None:
        self.streak = 0
        self.streak_started = None

    def failure(self, kind: str) -> bool:
        """Record a failed attempt; True when the breaker trips."""
        if kind not in ENDPOINT_FAULTS:
            return False
        now = self.clock()
        if self.streak_started is None:
            self.streak_started = now
        self.streak += 1
        return self.streak >= self.max_failures or (self.streak > 1 and now - self.streak_started >= self.max_seconds)
