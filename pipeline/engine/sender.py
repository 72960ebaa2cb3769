"""The sender: one row's way from its manifest cells to a result row, attempt by attempt.

    sender = RowSender(job=job, builder=builder, client=client, limiter=limiter, spend=spend, breaker=breaker,
                       counts=counts, stopping=stopping, before_send=journal.flush_before_send, on_stop=engine.stop)
    row = await sender.send(RowState("r1"), {"image": ..., "prompt": ...})   # None: a stop came first

Each attempt: wait for a place (the limiter paces requests and tokens), hold the attempt's worst
case against the budget, send, cost it by the usage it reports (before judging the answer: an
unusable answer was paid for too, and counts in the row's cost and the spend), parse. A refusal
(or a content filter's) is an answer: final, paid, an error row of kind "refusal", never retried
and never an endpoint fault. A failed attempt is retried as the pure policy says
(pipeline.net.retry), pausing the whole pool on a 429; quota and auth failures and a tripped
breaker raise StopJob (they apply to every row). An answer that fails the `[labels]` schema is
asked again up to max_invalid_retries, and the last one is kept (it was paid for). Its clocks and
its random source (retry jitter) are parameters, as the breaker's and the retry policy's are.

With the request cache (`[run] cache`, pipeline.io.cache), a built request is first looked up by
its key: a hit is parsed and checked as a live answer would be and becomes the row's result at once
(`from_cache`, attempts 0, no cost), taking no limiter slot, no concurrency place, no budget hold.
A final ok answer (the `[labels]` check passed) is stored, its secrets scrubbed; errors never are.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import orjson

from ..config import Job
from ..config.headers import cache_scope
from ..crashpoints import fault_point
from ..errors import InputError, RequestError, RowError, StopJob, local_failure
from ..io.cache import Cache, request_key
from ..net.breaker import REFUSAL_KINDS, Breaker, refusal_key
from ..net.client import PROXY_REFUSED, Client
from ..net.concurrency import Gate
from ..net.limiter import Pacer
from ..net.retry import STOP_KINDS, retry_delay, server_delay, should_retry
from ..records import ResultRow
from ..rows.answer import Answer, Usage, parse_response, usage_of, withheld
from ..rows.pricing import (
    SpendLimit,
    estimate_tokens,
    prompt_chars,
    row_cost,
    worst_case_cost,
)
from ..rows.request import Built, RequestBuilder
from .summary import Counts
from ..waits import wait_event

if TYPE_CHECKING:
    from ..rows.labels import Labels

__all__ = ["RowSender", "RowState", "CacheUse", "error_row", "FULL_KINDS"]

FULL_KINDS = ("server", "timeout", "connection")  # what a full server answers: "auto" concurrency backs off
HASH_OFF_LOOP = 64 << 10  # a body this large (inline images) is hashed in a thread: sha256 ~100 us per 64 KB


@dataclass(frozen=True)
class CacheUse:
    """The request cache as one run uses it."""

    cache: Cache
    url: str  # the endpoint and the [endpoint] headers that can change an answer: part of every key
    read: bool  # False (--no-cache): every row is sent; fresh answers are still stored
    scrub: Callable[[dict[str, Any]], dict[str, Any]]  # a secret echoed in an answer is never stored

    @classmethod
    async def open(cls, job: Job, *, read: bool, warn: Callable[[str], None],
                   scrub: Callable[[dict[str, Any]], dict[str, Any]]) -> CacheUse | None:
        """The job's request cache (`[run] cache`); None when off or unusable (warned once: the run goes on)."""
        run = job.run
        if run.cache is None:
            return None
        cache = await asyncio.to_thread(Cache.open, run.cache, ttl_s=run.cache_ttl,
                                        max_bytes=int(run.cache_max_gb * 1e9), warn=warn)
        if cache is None:
            return None
        # the built-in endpoint ([serve]) has a new port each run: keyed by its options instead
        url = job.endpoint.url if job.serve is None else "serve:" + json.dumps(job.serve, sort_keys=True, default=str)
        return cls(cache, cache_scope(url, job.endpoint.headers), read, scrub)


class RowState:
    """What one row's sending has done so far: an unexpected failure still reports it truly."""

    __slots__ = ("row_id", "at", "attempts", "spent", "rate_limited", "paced_since", "data")

    def __init__(self, row_id: str, at: float = 0.0) -> None:
        self.row_id = row_id
        self.at = at  # the row's place in the run's rows, 0 <= at < 1 (where its refusal comes from)
        self.attempts = 0  # requests made, rate-limit 429s included (the `attempts` column)
        self.spent: float | None = None  # this row's cost over its attempts
        self.rate_limited = 0  # of those, refused by a rate-limit 429: they spend no max_attempts
        self.paced_since: float | None = None  # the sender's clock at the row's first 429
        self.data: Any = None  # the last answer's decoded body (what the cache stores)

    @property
    def tries(self) -> int:
        """The attempts max_attempts counts: a 429 is the provider pacing the pool, not a fault of the row."""
        return self.attempts - self.rate_limited


def error_row(row_id: str, err: RowError, *, attempts: int, cost: float | None = None) -> ResultRow:
    return ResultRow(row_id, status="error", error=err.describe(), error_kind=str(err.kind), attempts=attempts, cost=cost)


class RowSender:
    def __init__(self, *, job: Job, builder: RequestBuilder, client: Client, limiter: Pacer, spend: SpendLimit,
                 breaker: Breaker, counts: Counts, stopping: asyncio.Event, before_send: Callable[[], None],
                 on_stop: Callable[[StopJob], None], labels: Labels | None = None, gate: Gate | None = None,
                 cache: CacheUse | None = None, clock: Callable[[], float] | None = None,
                 wall_clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        """`stopping`: set when the run stops (a wait ends at once, no new attempt starts);
        `before_send`: answers already received are journaled before a request leaves;
        `on_stop`: a budget stop while a paid (invalid) answer is in hand: the run stops, the answer is kept;
        `clock`: how long a row has been paced by 429s (the breaker's, whose answer times it is compared with);
        `wall_clock`: the Unix time, for a Retry-After given as a date; `rng`: the retry delays' jitter."""
        self.job, self.limits = job, job.limits
        self.builder, self.client, self.limiter, self.spend, self.breaker = builder, client, limiter, spend, breaker
        self.labels = labels
        self.stopping = stopping
        self.before_send = before_send
        self.counts = counts
        self.on_stop = on_stop
        self.clock = clock if clock is not None else breaker.clock
        self.wall_clock = wall_clock
        self.rng = rng if rng is not None else random.Random()
        self.post = client.post_stream if job.request.stream else client.post
        self.gate = gate if gate is not None else Gate(None)  # "auto" concurrency: requests in flight, found
        self.cache = cache

    async def send(self, state: RowState, cells: dict[str, Any]) -> ResultRow | None:
        """The row's result; None when a stop came before an answer (the row stays pending).
        Raises StopJob (the run must stop) and LocalFailure."""
        try:
            built = await self.builder.build(cells)  # files, fetches and Pillow work run off the loop
        except InputError as err:
            return error_row(state.row_id, err, attempts=0)
        fault_point("row")
        key = await self._key(built.cache_body) if self.cache is not None else None  # presigned URLs keyed by URI
        if key is not None and self.cache is not None and self.cache.read:
            hit = self._from_cache(state, key)
            if hit is not None:
                return hit
        invalid: ResultRow | None = None  # the last answer that failed the [labels] schema
        invalid_count = 0
        while not self.stopping.is_set():
            try:
                row = await self._answer(state, built)
            except StopJob as stop:
                if invalid is None:
                    raise
                self.on_stop(stop)
                break
            if row is None:
                break
            if not row.ok or self.labels is None:
                return self._remember(key, state, row)
            try:
                row.labels = self.labels.check(row.answer or "")
                return self._remember(key, state, row)
            except RequestError as err:  # invalid_output: ask again, up to max_invalid_retries
                invalid = ResultRow(**{**row.to_dict(), "status": "error", "error_kind": str(err.kind),
                                       "error": err.describe()})
                invalid_count += 1
                if invalid_count > self.labels.config.max_invalid_retries:
                    return invalid
        return invalid  # a paid answer that failed the schema is kept; else the row stays pending

    async def _key(self, body: bytes) -> bytes:
        assert self.cache is not None
        if len(body) >= HASH_OFF_LOOP:
            return await asyncio.to_thread(request_key, self.cache.url, body)
        return request_key(self.cache.url, body)

    def _from_cache(self, state: RowState, key: bytes) -> ResultRow | None:
        """The row answered from the cache, parsed and checked as a live answer; None: a miss (not
        there, too old, or no longer usable: unparseable, truncated, failing today's [labels])."""
        assert self.cache is not None
        value = self.cache.cache.get(key)
        if value is None:
            return None
        try:
            answer = parse_response(orjson.loads(value), self.job.endpoint.api)
            if answer.answer is None:
                return None
            labels = self.labels.check(answer.answer) if self.labels is not None else None
        except (RequestError, orjson.JSONDecodeError):
            return None
        state.spent = 0.0 if self.job.pricing is not None else None
        self.breaker.vouch()  # this request was answered before: a refusal now is the row's, not the job's
        row = _answer_row(state, answer, None, None)
        row.labels, row.from_cache = labels, True
        self.counts.cached += 1
        return row

    def _remember(self, key: bytes | None, state: RowState, row: ResultRow) -> ResultRow:
        """Store a final ok answer in the cache (never an error or a truncated answer)."""
        if key is not None and self.cache is not None and row.ok and isinstance(state.data, dict):
            self.cache.cache.put(key, orjson.dumps(self.cache.scrub(state.data)))
        return row

    async def _answer(self, state: RowState, built: Built) -> ResultRow | None:
        """Attempts until an answer or an error out of attempts; None when a stop came first."""
        tokens = estimate_tokens(self.job, prompt_chars(self.job, built.prompt), built.media).total \
            if self.limits.counts_tokens else 0.0
        worst = worst_case_cost(self.job, built.prompt, built.media) if self.spend.limit is not None else 0.0
        while not self.stopping.is_set():
            state.attempts += 1
            sent_at = await self.limiter.acquire(tokens, stop=self.stopping)  # None: a stop came first
            if sent_at is None:
                return None
            held = await self.spend.hold(worst)  # may wait for requests in flight; StopJob at the budget
            async with self.gate:
                outcome = await self._attempt(state, built.body, held, sent_at, tokens)
            if not isinstance(outcome, float):
                return outcome
            await wait_event(self.stopping, outcome)  # a stop ends the wait at once
        return None

    async def _attempt(self, state: RowState, body: bytes, held: float, sent_at: float,
                       tokens: float) -> ResultRow | float | None:
        """One request: the row's result, the seconds to wait before trying again, or None when a
        stop came before sending. The budget's hold is released on every path (a leaked hold
        would make later rows wait forever)."""
        cost: float | None = None
        try:
            if self.stopping.is_set():
                return None
            self.counts.sent += 1
            try:
                self.before_send()
            except OSError as exc:
                raise local_failure(exc, "journaling answers") from None
            ticket = self.breaker.sent()
            try:
                try:
                    data, headers, latency, warning = await self.post(body, max_bytes=self.limits.max_response_bytes)
                finally:
                    self.breaker.done(ticket)
                state.data = data
                self.gate.answered(latency / 1000.0)
                self.limiter.observe(headers)
                use = usage_of(data, self.job.endpoint.api)
                cost = self._paid(state, use)  # before judging the answer: an unusable one was paid too
                answer = parse_response(data, self.job.endpoint.api, use)
                if answer.answer is None and withheld(answer) is None:
                    raise RequestError("response has no answer content", kind="invalid_response")
            except RequestError as err:
                return self._failed(state, err, sent_at)
            self.breaker.success()  # a refusal too: the endpoint answered
            self.counts.answered()
            self.limiter.settle(tokens, answer.total_tokens)
            return _answer_row(state, answer, latency, warning)
        finally:
            self.spend.settle(held, cost)

    def _paid(self, state: RowState, use: Usage) -> float | None:
        """What an answered attempt cost by the usage its body reports, added to the row's cost."""
        cost = row_cost(self.job, use.model, use.prompt_tokens, use.completion_tokens, use.total_tokens,
                        use.cached_tokens)
        state.spent = cost if state.spent is None else state.spent + (cost or 0.0)
        return cost

    def _failed(self, state: RowState, err: RequestError, sent_at: float) -> ResultRow | float:
        self.counts.refused(err.status, err.kind)
        if err.kind in STOP_KINDS:
            raise StopJob(_stop_message(err, self.job.endpoint.api_key_env), kind=err.kind) from None
        self.limiter.observe(err.headers)
        if err.kind in FULL_KINDS:
            self.gate.dropped()
        if err.kind == "rate_limit":  # the whole pool pauses and slows, not just this row
            self.counts.rate_limited += 1
            self.breaker.rate_limited()  # paced, not failing: no time towards "the endpoint looks down"
            self.limiter.slow_down(server_delay(err.headers, self.wall_clock(), rate_limited=True), sent_at=sent_at)
            if err.should_retry is not False:
                return self._paced(state, err)
        if self.breaker.failure(err.kind):
            raise StopJob(
                f"the endpoint looks down ({self.breaker.streak} failed attempts in a row, last: {err.describe()})",
                kind="endpoint_down",
            ) from None
        if not should_retry(err, state.tries, self.limits.max_attempts):
            if err.kind in REFUSAL_KINDS and self.breaker.refusal(refusal_key(err), state.at, said=err.describe()):
                raise self.breaker.stop() from None
            return error_row(state.row_id, err, attempts=state.attempts, cost=state.spent)
        return float(retry_delay(err, state.tries, now=self.wall_clock(), jitter=self.rng.random(),
                                 max_server_delay=self.limits.max_retry_after_s))

    def _paced(self, state: RowState, err: RequestError) -> ResultRow | float:
        """A rate-limit 429: the row waits its turn again, for up to max_rate_limit_wait_s in all.
        Past that it fails as rate_limit, unless nothing at all was answered meanwhile: then the
        provider is refusing everyone (a spent daily quota, say) and the run stops, rows pending."""
        state.rate_limited += 1
        now = self.clock()
        if state.paced_since is None:
            state.paced_since = now
        waited = now - state.paced_since
        if waited < self.limits.max_rate_limit_wait_s:
            return float(retry_delay(err, state.rate_limited, now=self.wall_clock(), jitter=self.rng.random(),
                                     max_server_delay=self.limits.max_retry_after_s))
        if not self.breaker.answered_since(state.paced_since):
            raise StopJob(f"the provider refused every request for its rate limit for {waited:.0f}s "
                          f"([limits] max_rate_limit_wait_s), answering none (last: {err.describe()}); "
                          f"the rows stay pending: run again later to continue", kind="rate_limit") from None
        return error_row(state.row_id, err, attempts=state.attempts, cost=state.spent)


def _answer_row(state: RowState, answer: Answer, latency: float | None, warning: str | None) -> ResultRow:
    # Positional, in ResultRow's field order: keywords made this a tenth of the row's own CPU.
    row = ResultRow(
        state.row_id, answer.answer, answer.reasoning, answer.prompt_tokens, answer.completion_tokens,
        answer.total_tokens, answer.model, answer.finish_reason,
        "ok", warning,  # status; on an ok row, `error` is a warning: the answer held bad text, replaced
        None, state.attempts, None if latency is None else round(latency), state.spent,  # error_kind, attempts, latency_ms, cost
        None,  # finished_at: set as the row settles
        answer.cached_tokens, answer.reasoning_tokens, answer.image_tokens, answer.audio_tokens,
    )
    reason = withheld(answer)  # truncated before the thinking ended, or refused: paid, final
    if reason is not None:
        row.status, (row.error_kind, row.error) = "error", reason
    return row


def _stop_message(err: RequestError, key_env: str | None) -> str:
    if err.code == PROXY_REFUSED:  # the proxy, not the provider: its message says what to check
        return f"{err.describe()}; then run again to continue"
    if err.kind == "quota":
        return (f"the provider says the account is out of quota or credit (HTTP {err.status}: {err.message}); "
                f"top it up, then run the same command again to continue")
    where = (f"check the key in the variable {key_env} ([endpoint] api_key_env)" if key_env
             else "no key was sent: set [endpoint] api_key_env to the variable that holds it")
    return f"the provider refused the API key (HTTP {err.status}: {err.message}); {where}, then run again to continue"
