"""One row's attempts (engine/sender.py) against the built-in endpoint, with the sender's clock and
random source given by the test: waits that would take minutes are driven by a clock the test moves."""

from __future__ import annotations

import asyncio
import inspect
import random
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import job_dict, url_manifest

from pipeline.config import load_job
from pipeline.engine.sender import RowSender, RowState
from pipeline.engine.summary import Counts
from pipeline.errors import StopJob
from pipeline.net.breaker import Breaker
from pipeline.net.client import Client
from pipeline.net.limiter import Limiter
from pipeline.rows.pricing import SpendLimit
from pipeline.rows.request import RequestBuilder


class Ticking:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Draws(random.Random):
    """A seeded random source that counts its draws."""

    def __init__(self) -> None:
        super().__init__(7)
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()


def cells(i: int = 0) -> dict[str, Any]:
    return {"id": f"row-{i:05d}", "image": f"https://images.example/row/{i}.png", "prompt": f"Describe picture row-{i:05d}"}


async def send_one(tmp_path: Path, base_url: str, *, clock: Callable[[], float], rng: random.Random,
                   breaker: Breaker | None = None, **limits: Any) -> tuple[Any, RowState, Counts]:
    manifest = url_manifest(tmp_path / "m.csv", 1)
    job = load_job(job_dict(manifest, base_url, tmp_path / "out", limits=limits))
    counts = Counts()
    breaker = breaker or Breaker(50, 120, 0, clock=clock)
    stops: list[StopJob] = []
    async with Client(job.endpoint.url, None, timeout_s=10, max_connections=2) as client:
        builder = RequestBuilder(job, ["id", "image", "prompt"])
        sender = RowSender(job=job, builder=builder, client=client, limiter=Limiter(60000), spend=SpendLimit(job, 0.0),
                           breaker=breaker, counts=counts, stopping=asyncio.Event(), before_send=lambda: None,
                           on_stop=stops.append, clock=clock, wall_clock=lambda: 1.7e9, rng=rng)
        state = RowState("row-00000")
        try:
            result: Any = await asyncio.wait_for(sender.send(state, cells()), 30)
        except StopJob as stop:
            result = stop
        finally:
            await builder.aclose()
    return result, state, counts


def test_the_sender_takes_keyword_arguments_only() -> None:
    params = inspect.signature(RowSender).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    assert {"clock", "wall_clock", "rng", "on_stop", "before_send", "stopping"} <= {p.name for p in params}


async def test_a_row_refused_by_429s_past_its_wait_stops_the_run_by_the_senders_own_clock(
        tmp_path: Path, endpoint_factory: Any) -> None:
    """Every request refused for its rate limit, nothing answered: after max_rate_limit_wait_s the run
    stops with the row pending. Ten minutes of it pass on the sender's clock, not the test's."""
    ep = endpoint_factory(faults={"429ms": 1.0}, fault_retry_after_s=0.001)  # Retry-After-Ms: 1
    clock = Ticking(100.0)  # each read of the clock: a hundred seconds later
    rng = Draws()
    result, state, counts = await send_one(tmp_path, ep.base_url, clock=clock, rng=rng, max_rate_limit_wait_s=600)
    assert isinstance(result, StopJob) and result.kind == "rate_limit", result
    assert "for 600s" in str(result)
    # the first 429 starts the row's wait; each later one reads the clock once: 100 s more each
    assert state.rate_limited == state.attempts == 7
    assert counts.rate_limited == 7 and ep.stats()["statuses"] == {"429": 7}
    assert rng.draws == 6  # each retry's jitter came from the random source given


async def test_time_under_429_pacing_is_not_failing_time_for_the_endpoint_down_verdict(
        tmp_path: Path, endpoint_factory: Any) -> None:
    """A 500, minutes of 429s, two more 500s, then the answer: the endpoint was up and pacing us all
    along. Before, the first and the second 500 were 400 s apart on the clock, past breaker_seconds
    (120): "the endpoint looks down", the run stopped."""
    ep = endpoint_factory(row_faults={"picture": "500:1", "Describe": "429ms:4", "row-": "500:6"},
                          fault_retry_after_s=0.001)
    clock = Ticking(100.0)
    result, state, _ = await send_one(tmp_path, ep.base_url, clock=clock, rng=Draws(), max_attempts=5,
                                      breaker_failures=50, breaker_seconds=120)
    assert not isinstance(result, StopJob), result
    assert result.status == "ok" and state.attempts == 7 and state.rate_limited == 3
    assert ep.stats()["statuses"] == {"500": 3, "429": 3, "200": 1}
