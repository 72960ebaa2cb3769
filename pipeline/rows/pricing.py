"""Pricing: what each answer cost, and a budget the run never passes.

    cost = row_cost(job, answer.model, prompt_tokens, completion_tokens, total_tokens, answer.cached_tokens)
    tokens = estimate_tokens(job, prompt_chars(job, prompt), media=1)   # the one estimate, before usage
    budget = SpendLimit.for_run(job, ckpt, commits, todo)  # the job's spend so far (its journals)
    held = await budget.hold(worst)                  # StopJob(kind="budget") if it could pass
    budget.settle(held, cost)                        # when the answer (or the failure) is in

Prices are per million tokens, from `[pricing]`: the answering model's price when listed, else the
asked-for model's, else the default. Reasoning tokens are billed as output: providers count them
inside `completion_tokens`. Cached prompt tokens (`prompt_tokens_details.cached_tokens`, counted
inside `prompt_tokens`) are billed at `cached_input_per_million` when it is set, else at the input
price:

    cost = ((prompt - cached) * input + cached * cached_input + completion * output) / 1e6

An answer without usage has an unknown cost (None), never a guess.

The job's spend is the sum of `cost` over every line of the journal, superseded attempts included
(a row sent again with --retry-failed was paid for twice). Commit records keep each shard's spend,
so a resumed run reads only the journals of shards it still works on.

The budget holds, for every request in flight, its worst case: the estimated input plus
`max_tokens` of output. A request is sent only when spend + holds + its own worst case stay within
the budget. When they do not, it waits for the requests in flight to settle (their real cost is
usually far below the worst case); when nothing is in flight and it still does not fit, the run
stops sending, commits and exits 3 (raise the budget to continue).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa

from ..config import DEFAULT_OUTPUT_TOKENS, Job
from ..errors import StopJob
from ..records import CommitRecord

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

__all__ = ["total_cost", "row_cost", "worst_case_cost", "estimate_tokens", "prompt_chars", "TokenEstimate", "shard_spend",
           "SpendLimit", "CHARS_PER_TOKEN"]

CHARS_PER_TOKEN = 4  # a rough average over English and code; CJK text runs nearer 1-2
_ROUND = 10  # decimals kept on costs: no float dust in the output
_COST = pa.schema([("cost", pa.float64())])  # the journal's one column a spend needs


def row_cost(job: Job, model: str | None, prompt: int | None, completion: int | None, total: int | None,
             cached: int | None = None) -> float | None:
    """The cost of one answer, or None when unknown (no [pricing], no price, or no usage).
    `cached`: the prompt tokens the provider read from its cache (None: it did not say, so none
    are assumed cached and all are billed at the input price)."""
    if job.pricing is None:
        return None
    price = job.pricing.price(model, job.endpoint.model)
    if price is None:
        return None
    if completion is None and total is not None and prompt is not None:
        completion = total - prompt
    if prompt is None or completion is None:
        return None
    # A provider claiming more cached tokens than the prompt had is not believed past the prompt.
    cached = min(cached or 0, max(prompt, 0))
    cached_price = price.input if price.cached_input is None else price.cached_input
    return round(((prompt - cached) * price.input + cached * cached_price + completion * price.output) / 1e6, _ROUND)


class TokenEstimate(NamedTuple):
    """Tokens a request may use before its usage is known: what the rate limiter paces
    tokens_per_minute by, the budget holds, and the dry run totals."""

    input: int
    output: int

    @property
    def total(self) -> int:
        return self.input + self.output


def prompt_chars(job: Job, prompt: str) -> int:
    """The text a request sends: its prompt and the system prompt."""
    return len(prompt) + len(job.request.system_prompt or "")


def estimate_tokens(job: Job, text_chars: int, media: int, rows: int = 1) -> TokenEstimate:
    """The one token estimate: text at CHARS_PER_TOKEN, each image or video at [limits]
    image_token_estimate, the output at max_tokens (DEFAULT_OUTPUT_TOKENS without it) per row.
    `text_chars` and `media` may be totals over `rows` rows (the dry run's)."""
    out = job.request.max_tokens or DEFAULT_OUTPUT_TOKENS
    return TokenEstimate(text_chars // CHARS_PER_TOKEN + media * job.limits.image_token_estimate, rows * out)


def worst_case_cost(job: Job, prompt: str, images: int) -> float:
    """The most one request may cost: estimated input, all of max_tokens as output."""
    assert job.pricing is not None
    price = job.pricing.price(None, job.endpoint.model)
    assert price is not None  # checked when the job was loaded
    tokens = estimate_tokens(job, prompt_chars(job, prompt), images)
    # Any input token may turn out cached: the dearer of the two input prices keeps the hold at or
    # above the real cost even for a cached price set above the input one.
    input_price = max(price.input, price.cached_input or 0.0)
    return (tokens.input * input_price + (job.request.max_tokens or 0) * price.output) / 1e6


def total_cost(lines: pa.Table) -> float:
    """The sum of `cost` over journal lines read as a table (superseded attempts included)."""
    return round(sum(filter(None, lines.column("cost").to_pylist())), _ROUND)


def shard_spend(ckpt: Checkpoint, shard: int) -> float:
    """The sum of `cost` over every journal line of a shard (superseded attempts included)."""
    return total_cost(ckpt.journal_lines(shard, _COST))


class SpendLimit:
    """The run's running spend and its holds on requests in flight. Single-threaded (asyncio)."""

    def __init__(self, job: Job, spent_before: float) -> None:
        self.job = job
        self.limit = job.pricing.budget if job.pricing is not None else None
        self.spent_before = spent_before
        self.spent_now = 0.0  # this run's spend
        self.held = 0.0
        self.in_flight = 0
        self._settled = asyncio.Event()

    @classmethod
    def for_run(cls, job: Job, ckpt: Checkpoint, commits: dict[int, CommitRecord], todo: list[int]) -> "SpendLimit":
        """`todo`: indices of the shards this run works on (their journal is read in full)."""
        spent = 0.0
        if job.pricing is not None:
            todo_set = set(todo)
            for index, rec in commits.items():
                if index not in todo_set:
                    spent += rec.spend or 0.0
            for index in todo_set:
                spent += shard_spend(ckpt, index)
        return cls(job, spent)

    @property
    def spent(self) -> float:
        """The job's spend so far, earlier runs included."""
        return self.spent_before + self.spent_now

    async def hold(self, worst: float) -> float:
        """Hold `worst` for a request about to be sent, waiting while requests in flight may free
        room; StopJob(kind="budget") when even with none in flight it could pass the budget."""
        if self.limit is None:
            return 0.0
        while self.spent + self.held + worst > self.limit and self.in_flight > 0:
            self._settled.clear()
            await self._settled.wait()
        if self.spent + self.held + worst > self.limit:
            raise StopJob(
                f"the budget of {self.limit:g} could be passed: {self.spent:.4f} spent so far and the next request "
                f"may cost up to {worst:.4f}; raise [pricing] budget in {self.job.source} and run again to continue",
                kind="budget",
            )
        self.held += worst
        self.in_flight += 1
        return worst

    def settle(self, held: float, cost: float | None) -> None:
        """The request is over: release its hold, add what it really cost (None: unknown, 0)."""
        if self.limit is not None:
            self.held = max(0.0, self.held - held)
            self.in_flight -= 1
        if cost:
            self.spent_now += cost
        self._settled.set()
