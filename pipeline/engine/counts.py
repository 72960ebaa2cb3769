"""This run's counts, kept as rows settle and requests end; what the progress bar, the summary,
the metrics and a Ray cluster's coordinator read.

    counts = Counts()
    counts.settle(row)                  # a row's result: ok/failed, kind, tokens, cost, latency
    counts.answered(); counts.refused(429, "rate_limit")   # requests by HTTP status
    counts.to_dict(); Counts.merged([d1, d2])      # over the wire, summed over workers
    Live(counts, in_flight=3, remaining=120, ...)  # the run as it is now (pipeline.engine.metrics)

One place where a row's figures are counted (ShardEngine settles every row here), so metrics are
an observer of the engine's own counts, never calls sprinkled through it. Cheap by design: a
row costs a few integer additions and one bisect over LATENCY_BUCKETS_S (bench: metrics).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..records import ResultRow

__all__ = ["Counts", "Live", "LATENCY_BUCKETS_S", "TOKEN_KINDS"]

# Upper bounds (seconds) of the answer latency histogram; the last bucket is +Inf.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_BOUNDS_MS = tuple(b * 1000 for b in LATENCY_BUCKETS_S)
TOKEN_KINDS = ("prompt", "completion", "reasoning", "cached")
_SUMMED = ("ok", "failed", "sent", "cached", "spent", "rate_limited", "paused_s", "cost", "latency_sum_s",
           "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens")


@dataclass
class Counts:
    """This run's rows and requests (the output's totals come from the commit records)."""

    ok: int = 0
    failed: int = 0
    sent: int = 0  # HTTP requests made this run
    cached: int = 0  # rows answered from the request cache ([run] cache): no request, no cost
    spent: float = 0.0  # cost of this run's answers, from [pricing] (set when the run ends)
    rate_limited: int = 0  # 429 answers (the provider pacing us)
    paused_s: float = 0.0  # time every request waited because of them (Retry-After and the like)
    limits: dict[str, Any] = field(default_factory=dict)  # what "auto" limits came to
    by_kind: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)  # requests by HTTP status; "timeout" etc. without one
    prompt_tokens: int = 0  # TOKEN_KINDS over the settled rows (plain ints: a row adds to them cheaply)
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0  # the settled rows' cost, live (spent is the run's total, holds included)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))  # answers per bucket
    latency_sum_s: float = 0.0
    last_ok_at: float | None = None  # when the last row was answered (epoch seconds)

    def settle(self, row: ResultRow) -> None:
        """A row's result, once, as it is journaled."""
        if row.ok:
            self.ok += 1
            self.last_ok_at = row.finished_at
        else:
            self.failed += 1
            self.by_kind[row.error_kind or ""] += 1
        if row.prompt_tokens:
            self.prompt_tokens += row.prompt_tokens
        if row.completion_tokens:
            self.completion_tokens += row.completion_tokens
        if row.reasoning_tokens:
            self.reasoning_tokens += row.reasoning_tokens
        if row.cached_tokens:
            self.cached_tokens += row.cached_tokens
        if row.cost:
            self.cost += row.cost
        ms = row.latency_ms
        if ms is not None and row.ok:
            self.latency[bisect_left(_BOUNDS_MS, ms)] += 1
            self.latency_sum_s += ms / 1000.0

    @property
    def tokens(self) -> dict[str, int]:
        return {kind: getattr(self, f"{kind}_tokens") for kind in TOKEN_KINDS}

    def answered(self) -> None:
        """A request answered (any 2xx)."""
        self.by_status["2xx"] += 1

    def refused(self, status: int | None, kind: str) -> None:
        """A failed request: its HTTP status, or the error's kind when none came (timeout, connection)."""
        self.by_status[str(status) if status else str(kind)] += 1

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for a Ray worker's report."""
        return {**{k: getattr(self, k) for k in _SUMMED}, "by_kind": dict(self.by_kind),
                "by_status": dict(self.by_status), "latency": list(self.latency),
                "last_ok_at": self.last_ok_at}

    @classmethod
    def merged(cls, reports: Iterable[dict[str, Any]]) -> Counts:
        """The sum of several workers' to_dict()s: one set of counts for the cluster."""
        total = cls()
        for r in reports:
            for k in _SUMMED:
                setattr(total, k, getattr(total, k) + r.get(k, 0))
            total.by_kind.update(r.get("by_kind", {}))
            total.by_status.update(r.get("by_status", {}))
            for i, n in enumerate(r.get("latency", ())):
                total.latency[i] += n
            last = r.get("last_ok_at")
            if last is not None and (total.last_ok_at is None or last > total.last_ok_at):
                total.last_ok_at = last
        return total


@dataclass(frozen=True)
class Live:
    """The run as it is now, for the metrics: read from another thread, so only plain values."""

    counts: Counts
    in_flight: int = 0
    paused_s: float = 0.0  # time every request waited for 429 pauses so far
    remaining: int | None = None  # rows of the output with no result yet
    requests_per_minute: float | None = None  # the pace in force (an "auto" one as found)
    tokens_per_minute: float | None = None
    concurrency: int | None = None  # requests allowed in flight now
    auto: frozenset[str] = frozenset()  # which of the three limits are "auto"
    batches: dict[str, int] | None = None  # batch mode: batches by state
