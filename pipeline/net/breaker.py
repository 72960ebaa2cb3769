"""The circuit breaker: tells "the endpoint is down" or "the job is wrong" from "some rows fail".

    breaker = Breaker(max_failures=50, max_seconds=120, max_refusals=5)
    breaker.failure("server")          # True: trips, the endpoint looks down
    ticket = breaker.sent(); ...; breaker.done(ticket)               # every request, out and back
    breaker.refusal((400, "bad_request", "no_db_connection", "No connected db."))   # True: the job looks wrong
    breaker.holds("bad_request")       # hold this error row until the doubt is settled

Two ways to trip:
- Down: `max_failures` attempts in a row failed with an endpoint fault (server error, timeout,
  dropped connection, unusable body), or failures have gone on for `max_seconds` with no success.
  Row-specific failures (bad_request, input) never count: they say nothing of the endpoint's health.
- Wrong job: the run's first `max_refusals` refusals for good (a 400, 404 or 422 that is not
  retried) were all the same (status, kind, code and message) and no request was answered. A
  wrong gateway key (LiteLLM answers 400 `no_db_connection` to every request), a wrong model
  name or base URL look like this: every row would fail the same way, so the run stops with the
  rows pending instead of marking them all failed. Refusals that differ, or any answer, settle it:
  the rows are bad, not the job, and from then on refusals are ordinary error rows. So does
  evidence that the job worked before (`vouch`: answers of earlier runs, the request cache).
  A provider may refuse a bad row in milliseconds and answer a good one in seconds: the trip
  waits until every request sent by the time the refusals reached `max_refusals` has come back
  too (`sent`/`done` tickets), so fast refusals cannot outrun slow answers that would settle it.

While a trip is possible the engine holds error rows of the kinds concerned (`holds`) instead of
writing them: they stay pending if the breaker trips (a trip is final: an answer arriving after
it, during the stop, releases nothing), and are written once it is settled (`settled`) or the
run ends. The clock is a parameter, so tests are tables.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable

from ..errors import ErrorKind

__all__ = ["Breaker", "ENDPOINT_FAULTS", "REFUSAL_KINDS"]

ENDPOINT_FAULTS = frozenset(k.value for k in ErrorKind if k.endpoint_fault)
REFUSAL_KINDS = frozenset({ErrorKind.BAD_REQUEST.value})  # the endpoint refused a request for good


class Breaker:
    def __init__(self, max_failures: int, max_seconds: float, max_refusals: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.max_seconds = max_seconds
        self.max_refusals = max_refusals  # 0: a run's first refusals never stop it
        self.clock = clock
        self.streak = 0
        self.streak_started: float | None = None
        self.last_success: float | None = None  # clock time of the latest answer; None: none yet
        self.refusals = 0  # the first refusals, all alike so far
        self.tripped = False  # by refusals: final for the run
        self._first_refusal: Hashable | None = None
        self._mixed = False  # refusals differed, or the job was vouched for: refusals are the rows'
        self._tickets = 0  # requests sent so far
        self._in_flight: set[int] = set()  # their tickets, until answered or failed
        self._horizon: int | None = None  # requests sent when the refusals first reached max_refusals

    def success(self) -> None:
        self.streak = 0
        self.streak_started = None
        self.last_success = self.clock()

    def failure(self, kind: str) -> bool:
        """Record a failed attempt; True when the breaker trips (the endpoint looks down)."""
        if kind not in ENDPOINT_FAULTS:
            return False
        now = self.clock()
        if self.streak_started is None:
            self.streak_started = now
        self.streak += 1
        return self.streak >= self.max_failures or (self.streak > 1 and now - self.streak_started >= self.max_seconds)

    def sent(self) -> int:
        """A request leaves: its ticket, for `done` (0, untracked, once nothing is in doubt: the
        doubt never comes back, and this is on every request's path)."""
        if not self.doubting:
            return 0
        self._tickets += 1
        self._in_flight.add(self._tickets)
        return self._tickets

    def done(self, ticket: int) -> None:
        """The request of `ticket` came back (answered or failed; `success`/`refusal` say which)."""
        self._in_flight.discard(ticket)

    def vouch(self) -> None:
        """The job has been answered before (earlier runs, the request cache): refusals are the rows'."""
        self._mixed = True

    def refusal(self, key: Hashable) -> bool:
        """Record a request refused for good (call `done` for it first), `key` saying which refusal
        it is (status, kind, code, message); True when the breaker trips: the run's first
        refusals are all this one, and no request sent before enough of them came back is still out."""
        if self.tripped:
            return True
        if not self.doubting:
            return False
        if self._first_refusal is None:
            self._first_refusal = key
        elif key != self._first_refusal:
            self._mixed = True
            return False
        self.refusals += 1
        if self.refusals < self.max_refusals:
            return False
        if self._horizon is None:  # enough alike refusals: every request sent so far must come back first
            self._horizon = self._tickets
        self.tripped = min(self._in_flight, default=self._horizon + 1) > self._horizon
        return self.tripped

    @property
    def doubting(self) -> bool:
        """Whether refusals may still mean a wrong job: nothing answered, none differing."""
        return self.max_refusals > 0 and self.last_success is None and not self._mixed

    def holds(self, kind: str) -> bool:
        """Whether an error row of `kind` must wait: a trip now would mean it is not the row's fault."""
        return ((kind in ENDPOINT_FAULTS and self.streak > 0)
                or (kind in REFUSAL_KINDS and (self.doubting or self.tripped)))

    @property
    def settled(self) -> bool:
        """Nothing in doubt: rows held so far are the rows' own failures."""
        return self.streak == 0 and not self.doubting and not self.tripped

    def answered_since(self, since: float) -> bool:
        """Whether any request was answered at or after clock time `since`."""
        return self.last_success is not None and self.last_success >= since
