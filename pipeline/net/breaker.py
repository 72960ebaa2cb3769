"""The circuit breaker: tells "the endpoint is down" or "the job is wrong" from "some rows fail".

    breaker = Breaker(max_failures=50, max_seconds=120, max_refusals=5)
    breaker.failure("server")          # True: trips, the endpoint looks down
    breaker.rate_limited()             # a 429: time under pacing is not failing time
    ticket = breaker.sent(); ...; breaker.done(ticket)               # every request, out and back
    breaker.refusal(refusal_key(err), at=0.37)   # True: the job looks wrong (at: the row's place in the run)
    breaker.probes()                   # parts of the manifest to try a row from before any verdict
    breaker.holds("bad_request")       # hold this error row until the doubt is settled

Two ways to trip:
- Down: `max_failures` attempts in a row failed with an endpoint fault (server error, timeout,
  dropped connection, unusable body), or failures have gone on for `max_seconds` with no success.
  Row-specific failures (bad_request, input) never count: they say nothing of the endpoint's health.
  Nor does time under rate-limit pacing: a 429 is the endpoint answering "slower", so the time
  around it is not failing time (a few 5xx spread over minutes of 429s are no outage).
- Wrong job: refusals for good (a 400, 404 or 422 that is not retried) all alike (`refusal_key`:
  status, kind, code and the message with ids, numbers and times masked), at least
  `max_refusals` of them, from rows in every part of the run's rows (the rows split into
  `max_refusals` equal parts), and no request answered. A wrong gateway key, model name or base
  URL refuses every row alike wherever it is: the run stops with the rows pending instead of
  marking them all failed. A manifest whose first rows share a defect (the largest images sorted
  first, all "image too large") is a right job: once `max_refusals` alike refusals are in, the
  engine sends a row from each part not tried yet (`probes`) and the verdict waits for them, so
  rows from elsewhere answer and settle it. Refusals that differ, or any answer, settle it: the rows
  are bad, not the job, and from then on refusals are ordinary error rows. So does evidence that
  the job worked before (`vouch`: answers of earlier runs, the request cache). A provider may
  refuse a bad row in milliseconds and answer a good one in seconds: the trip also waits until
  every request sent by the time the refusals reached `max_refusals` has come back (`sent`/`done`
  tickets), so fast refusals cannot outrun slow answers that would settle it.

While a trip is possible the engine holds error rows of the kinds concerned (`holds`) instead of
writing them: they stay pending if the breaker trips (a trip is final: an answer arriving after
it, during the stop, releases nothing), and are written once it is settled (`settled`) or the
run ends. The rerun of a tripped job starts with a fresh breaker: still wrong, it trips again
after its first alike refusals, nothing written; mended, it goes on. The clock is a parameter, so
tests are tables. On a Ray cluster the verdicts are the cluster's (`SharedBreaker`, `ClusterVerdict`).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Callable, Hashable

from ..errors import ErrorKind, RequestError, StopJob
from ..waits import wait_event

__all__ = ["Breaker", "SharedBreaker", "ClusterVerdict", "refusal_key", "wrong_job_message", "ENDPOINT_FAULTS",
           "REFUSAL_KINDS", "VERDICT_WAIT_S"]

ENDPOINT_FAULTS = frozenset(k.value for k in ErrorKind if k.endpoint_fault)
REFUSAL_KINDS = frozenset({ErrorKind.BAD_REQUEST.value})  # the endpoint refused a request for good
VERDICT_WAIT_S = 30.0  # a Ray worker done with its rows waits this long for the cluster's verdict; then they stay pending

# What differs between two rows refused for the same reason: times, ids (request ids, model
# versions, tool-call ids: any token with a digit), and plain numbers (sizes, lengths, indexes).
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?")
_ID = re.compile(r"[A-Za-z0-9_.-]*[0-9][A-Za-z0-9_.-]*")  # after _TIME; words with a digit, plain numbers too
_SPACE = re.compile(r"\s+")


def refusal_key(err: RequestError) -> tuple[Any, ...]:
    """What makes two refusals "the same": status, kind, code (the provider's code or type, as
    net.client reads them) and the message with its times, ids and numbers masked."""
    message = _ID.sub("#", _TIME.sub("#", err.message))
    return err.status, err.kind, err.code, _SPACE.sub(" ", message).strip()


class Breaker:
    def __init__(self, max_failures: int, max_seconds: float, max_refusals: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.max_seconds = max_seconds
        self.max_refusals = max_refusals  # 0: a run's first refusals never stop it
        self.clock = clock
        self.streak = 0
        self.failing_s = 0.0  # of the streak, the time between faults with no 429 between them
        self._last_fault: float | None = None  # None: the streak's clock waits for the next fault
        self.last_success: float | None = None  # clock time of the latest answer; None: none yet
        self.refusals = 0  # the first refusals, all alike so far
        self.tripped = False  # by refusals: final for the run
        self._first_refusal: Hashable | None = None
        self.said = ""  # the first alike refusal as the provider put it, for the stop's message
        self._mixed = False  # refusals differed, or the job was vouched for: refusals are the rows'
        self._tickets = 0  # requests sent so far
        self._in_flight: set[int] = set()  # their tickets, until answered or failed
        self._horizon: int | None = None  # requests sent when the refusals first reached max_refusals
        self._covered: set[int] = set()  # parts of the run's rows refused alike, or with nothing to try
        self._probed: set[int] = set()  # parts a probe was asked for

    # -- "the endpoint is down" ------------------------------------------------------------

    def success(self) -> None:
        self.streak = 0
        self.failing_s = 0.0
        self._last_fault = None
        self.last_success = self.clock()

    def failure(self, kind: str) -> bool:
        """Record a failed attempt; True when the breaker trips (the endpoint looks down)."""
        if kind not in ENDPOINT_FAULTS:
            return False
        now = self.clock()
        if self._last_fault is not None:
            self.failing_s += now - self._last_fault
        self._last_fault = now
        self.streak += 1
        return self.streak >= self.max_failures or (self.streak > 1 and self.failing_s >= self.max_seconds)

    def rate_limited(self) -> None:
        """A 429: the endpoint is up and pacing us; the time since the last fault, and until the next, is not failing."""
        self._last_fault = None

    def answered_since(self, since: float) -> bool:
        """Whether any request was answered at or after clock time `since`."""
        return self.last_success is not None and self.last_success >= since

    # -- "the job is wrong" ----------------------------------------------------------------

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

    def part(self, at: float) -> int:
        """Which part of the run's rows the place `at` (0 <= at < 1) is in."""
        return min(self.max_refusals - 1, max(0, int(at * self.max_refusals)))

    def refusal(self, key: Hashable, at: float, *, said: str = "") -> bool:
        """Record a request refused for good (call `done` for it first), `key` saying which refusal
        it is (`refusal_key`), `at` where its row is in the run's rows (0 <= at < 1), `said` how the
        error reads; True when the breaker trips (raise `stop()`): refusals alike, from every part of
        the rows, nothing answered, and no request sent before enough of them came back is still out."""
        if self.tripped:
            return True
        if not self.doubting:
            return False
        if self._first_refusal is None:
            self._first_refusal, self.said = key, said
        elif key != self._first_refusal:
            self._mixed = True
            return False
        self.refusals += 1
        self._covered.add(self.part(at))
        return self._verdict()

    def cover(self, part: int) -> bool:
        """The engine has no row left to try in `part` (all sent, or done before); True when that trips it."""
        self._covered.add(part)
        return self._verdict()

    def _verdict(self) -> bool:
        if self.tripped or not self.doubting or self.refusals < self.max_refusals:
            return self.tripped
        if self._horizon is None:  # enough alike refusals: every request sent so far must come back first
            self._horizon = self._tickets
        self.tripped = self.missing == [] and min(self._in_flight, default=self._horizon + 1) > self._horizon
        return self.tripped

    def stop(self) -> StopJob:
        """The wrong-job stop, for the run to raise once `refusal` or `cover` said it trips."""
        return StopJob(wrong_job_message(self.said, self.refusals), kind="refused")

    @property
    def missing(self) -> list[int]:
        """Parts of the run's rows with no alike refusal yet."""
        return [p for p in range(self.max_refusals) if p not in self._covered]

    def probes(self) -> list[int]:
        """Parts to send a row from now (each asked once): enough alike refusals are in, but not
        from everywhere. Empty while nothing is in doubt or fewer refusals are in."""
        if not self.doubting or self.refusals < self.max_refusals:
            return []
        asked = [p for p in self.missing if p not in self._probed]
        self._probed.update(asked)
        return asked

    def reprobe(self, part: int) -> None:
        """The row probing `part` settled without a request (it failed here: a missing image): the
        part is asked for again, so its next row is tried."""
        self._probed.discard(part)

    @property
    def doubting(self) -> bool:
        """Whether refusals may still mean a wrong job: nothing answered, none differing."""
        return self.max_refusals > 0 and self.last_success is None and not self._mixed

    # -- holding rows ----------------------------------------------------------------------

    def holds(self, kind: str) -> bool:
        """Whether an error row of `kind` must wait: a trip now would mean it is not the row's fault."""
        return ((kind in ENDPOINT_FAULTS and self.streak > 0)
                or (kind in REFUSAL_KINDS and (self.doubting or self.tripped)))

    @property
    def settled(self) -> bool:
        """Nothing in doubt: rows held so far are the rows' own failures."""
        return self.streak == 0 and not self.doubting and not self.tripped

    async def verdict(self) -> bool:
        """At the end of the run, with rows held: whether they are written (True) or stay pending.
        This breaker decides alone, so there is no verdict to wait for: unless it tripped, the run
        ended and what it holds is the rows' own."""
        return not self.tripped


class SharedBreaker(Breaker):
    """A Ray worker's breaker: it holds rows on its own evidence, but never trips; its events go
    to the coordinator's ClusterVerdict with each report (`take_events`), and the cluster's news
    come back (`hear`): an answer anywhere settles the doubt and ends a fault streak, refusals
    that differ anywhere settle it, and the cluster's trip (`trip`) is this worker's too."""

    def __init__(self, max_failures: int, max_seconds: float, max_refusals: int = 0,
                 clock: Callable[[], float] = time.monotonic, verdict_wait_s: float = VERDICT_WAIT_S) -> None:
        super().__init__(max_failures, max_seconds, max_refusals, clock)
        self.verdict_wait_s = verdict_wait_s
        self._log: list[str] = []  # "ok", "paced" or a fault's kind, in order; repeats of "ok" once
        self._keys: list[Hashable] = []  # refusal keys not yet reported
        self._suspect: Hashable | None = None  # the key this worker's own evidence would trip on
        self._vouched = False
        self._heard_answers = 0
        self._decided = asyncio.Event()

    def success(self) -> None:
        super().success()
        if not self._log or self._log[-1] != "ok":
            self._log.append("ok")

    def failure(self, kind: str) -> bool:
        super().failure(kind)
        if kind in ENDPOINT_FAULTS:
            self._log.append(kind)
        return False

    def rate_limited(self) -> None:
        super().rate_limited()
        self._log.append("paced")

    def vouch(self) -> None:
        super().vouch()
        self._vouched = True

    def refusal(self, key: Hashable, at: float, *, said: str = "") -> bool:
        if self.doubting:
            self._keys.append(key)
        if super().refusal(key, at, said=said):
            self.tripped = False  # not this worker's to decide: its suspicion goes to the cluster
            self._suspect = key
        return False

    def cover(self, part: int) -> bool:
        if super().cover(part):
            self.tripped, self._suspect = False, self._first_refusal
        return False

    def take_events(self) -> dict[str, Any]:
        """What happened here since the last report, for the cluster's verdict."""
        events = {"log": self._log, "keys": self._keys, "vouched": self._vouched,
                  "suspect": self._suspect if self.doubting else None}
        self._log, self._keys = [], []
        return events

    def hear(self, news: dict[str, Any]) -> None:
        """The cluster's news: answers anywhere (how many reports had some), whether its latest word
        is an answer (`up`: no fault since), and whether refusals differed."""
        answers = news.get("answers", 0)
        if answers > self._heard_answers:  # the job works and the provider answers: no doubt, and no
            self._heard_answers = answers  # "nothing answered meanwhile" for a row paced by 429s
            self.last_success = self.clock()
        if news.get("up"):  # the cluster's faults ended with an answer: this worker's are its rows'
            self.streak, self.failing_s, self._last_fault = 0, 0.0, None
        if news.get("mixed"):
            Breaker.vouch(self)  # not logged: it is the cluster's own news
        if not self.doubting:
            self._decided.set()

    def trip(self) -> None:
        """The cluster stopped the run (its verdict, or any other stop): what is held stays pending."""
        if self.doubting:
            self.tripped = True
        self._decided.set()

    async def verdict(self) -> bool:
        """Every row of this task's shard was sent and is back: if all its refusals are alike (and
        nothing answered), that is its vote, however few they are (a short last shard, a resumed
        shard's last rows: fewer than max_refusals, they could never vote otherwise, and the
        cluster could never trip). Then it waits for the cluster's verdict; none within
        `verdict_wait_s`: the cluster is still in doubt, and what is held stays pending."""
        if self.doubting and self.refusals > 0:
            self._suspect = self._first_refusal
            await wait_event(self._decided, self.verdict_wait_s)
        return not self.tripped and not (self.doubting and self.refusals > 0)


class ClusterVerdict:
    """The cluster's verdicts, in the Ray coordinator, from every worker's SharedBreaker events.

    Endpoint down: the workers' answers, faults and 429s replayed in report order into one Breaker.
    Wrong job: the task of every shard running (`running`, from the driver) suspects the same
    refusal (its own rows refused alike from every part of its shard, or all of them sent and
    refused alike however few), none differs, at least `max_refusals` alike over the cluster (as
    a local run needs), and nothing was answered anywhere: a task that has not reported yet (still
    starting), not refused yet, or still waiting for answers holds the verdict back. Every task
    voting so on all its rows with fewer alike in all, and no shard left to start: the rows' own
    (as at a local run's end), the doubt settled."""

    def __init__(self, max_failures: int, max_seconds: float, max_refusals: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.breaker = Breaker(max_failures, max_seconds, 0, clock)
        self.on = max_refusals > 0
        self.max_refusals = max_refusals
        self.answers = 0
        self.mixed = False
        self.first: Hashable | None = None
        self.refusals = 0
        self.votes: dict[int, Hashable | None] = {}  # running shard -> the key its task suspects, or None
        self.queued = 0  # shards not started yet

    def running(self, shards: list[int], queued: int = 0) -> None:
        """The shards whose tasks are running now (theirs are the votes), and how many wait to start."""
        self.votes = {shard: self.votes.get(shard) for shard in shards}
        self.queued = queued

    def hear(self, shard: int, events: dict[str, Any]) -> tuple[str, str] | None:
        """The events of the task running `shard`; (kind, message) of a stop when the cluster trips."""
        for event in events["log"]:
            if event == "ok":
                self.answers += 1
                self.breaker.success()
            elif event == "paced":
                self.breaker.rate_limited()
            elif self.breaker.failure(event):
                return "endpoint_down", (f"the endpoint looks down ({self.breaker.streak} failed attempts in a row "
                                         f"over the cluster's workers, last: {event})")
        for key in events["keys"]:
            self.first = key if self.first is None else self.first
            self.mixed |= key != self.first
            self.refusals += 1
        self.mixed |= events["vouched"]
        if shard in self.votes:
            self.votes[shard] = events["suspect"]
        if not self.on or self.mixed or self.answers or self.first is None:
            return None
        if not self.votes or any(key != self.first for key in self.votes.values()):
            return None
        if self.refusals < self.max_refusals:  # every task voted on all its rows, and no shard is left:
            self.mixed = not self.queued       # too few to call the job wrong; as a local run's end, the rows' own
            return None
        status, _, code, message = self.first if isinstance(self.first, tuple) else (None, None, None, self.first)
        said = f"HTTP {status}" + (f" {code}" if code else "") + f": {message}"
        return "refused", wrong_job_message(said, self.refusals, where="every worker's shard")

    def news(self) -> dict[str, Any]:
        return {"answers": self.answers, "up": self.answers > 0 and self.breaker.streak == 0, "mixed": self.mixed}


def wrong_job_message(said: str, count: int, *, where: str = "the run's rows") -> str:
    """The stop's one line: `said` the refusal (the error as described), `count` how many were alike."""
    return (f"the endpoint refused {count} requests the same way, from every part of {where}, and answered none "
            f"({said}): the job looks wrong, not its rows (the key a gateway expects, the model name, base_url); "
            f"fix it and run again (if these rows really are bad, set [limits] breaker_refusals = 0)")
