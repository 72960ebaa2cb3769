"""`max_concurrency = "auto"`: the gradient policy driven with tables of latencies (time is given,
never read), the gate that applies it, and the limiter's "auto" rates read from headers."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from pipeline.config import AUTO
from pipeline.net.concurrency import GROW_BELOW, PROBE_WINDOWS, SHRINK_ABOVE, START, WINDOW_S, Gate, Gradient
from pipeline.net.limiter import AUTO_MARGIN, AUTO_START_RPM, Limiter


def _window(ctl: Gradient, t: float, latency: float, in_flight: int, n: int = 10) -> float:
    """n answers of `latency` spread over one window starting at t; returns the next window's start."""
    for i in range(n):
        ctl.answered(latency, in_flight, t + i * WINDOW_S / n)
    ctl.answered(latency, in_flight, t + WINDOW_S)  # closes the window
    return t + WINDOW_S + 0.001


def _server(limit: float, capacity: int, service_s: float) -> float:
    """What a FIFO server of `capacity` slots answers in, with `limit` requests kept in flight."""
    return service_s * max(1.0, limit / capacity)


@pytest.mark.parametrize("case, windows, expect", [
    # (latency ratio to no-load, in flight at the limit?) per window -> what the limit does
    ("flat latency, limit reached: grows", [(1.0, True)] * 3, "up"),
    ("flat latency, limit not reached (app-limited): holds", [(1.0, False)] * 3, "same"),
    ("latency 1.25x: holds", [(1.0, True), (1.25, True)], "same-after-first"),
    ("latency 2x: shrinks", [(1.0, True), (2.0, True)], "down"),
])
def test_the_verdict_of_a_window(case: str, windows: list[tuple[float, bool]], expect: str) -> None:
    ctl = Gradient(cap=256, limit=16)
    t, limits = 0.0, []
    for ratio, busy in windows:
        t = _window(ctl, t, 0.2 * ratio, ctl.allowed if busy else 2)
        limits.append(ctl.limit)
    if expect == "up":
        assert limits[-1] > 16 and limits == sorted(limits)
    elif expect == "same":
        assert limits[-1] == 16
    elif expect == "same-after-first":
        assert limits[-1] == limits[0] > 16  # the first window grew it; 1.25x is between the thresholds
    else:
        assert limits[-1] < limits[0]
    assert GROW_BELOW < 1.25 < SHRINK_ABOVE


def test_a_drop_halves_and_the_cap_and_floor_hold() -> None:
    ctl = Gradient(cap=20, limit=16)
    t = _window(ctl, 0.0, 0.2, 16)
    assert ctl.limit == 20  # 16 + 4, capped
    ctl.dropped(t)
    ctl.dropped(t + WINDOW_S)
    assert ctl.limit == 10
    for i in range(10):
        ctl.dropped(t + WINDOW_S * (i + 2))
    assert ctl.limit == 1 and ctl.low == 1 and ctl.high == 20


@pytest.mark.parametrize("capacity", [8, 32, 100])
def test_it_settles_just_above_the_servers_capacity(capacity: int) -> None:
    ctl = Gradient(cap=256)
    t = 0.0
    seen = []
    for _ in range(200):  # 100 s of windows against the model of a FIFO server
        t = _window(ctl, t, _server(ctl.allowed, capacity, 0.2), ctl.allowed)
        seen.append(ctl.allowed)
    settled = seen[-120:]  # the last minute
    below = [n for n in settled if n < capacity]
    assert len(below) <= 2 * PROBE_WINDOWS, settled  # only the probes (the limit halved to measure the no-load latency)
    assert max(settled) <= capacity * SHRINK_ABOVE + math.sqrt(capacity) + 1, settled  # at most one growth step over


def test_a_server_that_really_got_slower_is_followed_not_starved() -> None:
    ctl = Gradient(cap=256)
    t = 0.0
    for _ in range(100):
        t = _window(ctl, t, _server(ctl.allowed, 32, 0.2), ctl.allowed)
    for _ in range(200):  # every request now takes twice as long (longer prompts), capacity the same
        t = _window(ctl, t, _server(ctl.allowed, 32, 0.4), ctl.allowed)
    assert ctl.allowed >= 32  # a probe measured the new no-load latency: not shrunk to nothing


def test_it_follows_a_capacity_that_shrinks_and_grows_within_ten_seconds() -> None:
    ctl = Gradient(cap=256, limit=START)
    t = 0.0
    for _ in range(60):
        t = _window(ctl, t, _server(ctl.allowed, 32, 0.2), ctl.allowed)
    assert 32 <= ctl.allowed <= 41
    for step in range(20):  # capacity 32 -> 8: within 10 s (20 windows) it is near 8
        t = _window(ctl, t, _server(ctl.allowed, 8, 0.2), ctl.allowed)
    assert 8 <= ctl.allowed <= 11
    for step in range(20):  # and back to 32
        t = _window(ctl, t, _server(ctl.allowed, 32, 0.2), ctl.allowed)
    assert ctl.allowed >= 32


def test_a_burst_of_503s_then_recovery() -> None:
    ctl = Gradient(cap=256, limit=64)
    t = 0.0
    for _ in range(4):
        for i in range(5):
            ctl.dropped(t + i * 0.1)
        t += WINDOW_S + 0.01
    assert ctl.allowed <= 10  # halved at each window with drops
    for _ in range(20):
        t = _window(ctl, t, 0.2, ctl.allowed)
    assert ctl.allowed >= 40  # flat latency again: grows back


async def test_the_gate_lets_in_only_the_limit_and_more_when_it_rises() -> None:
    ctl = Gradient(cap=64, limit=2)
    gate = Gate(ctl, clock=lambda: 0.0)
    inside = 0
    most = 0
    release = asyncio.Event()

    async def request() -> None:
        nonlocal inside, most
        async with gate:
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(request()) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert inside == 2 and gate.in_flight == 2
    ctl.limit = 5
    gate.wake()  # a raised limit lets waiters in at once (answered() does this after each answer)
    await asyncio.sleep(0.01)
    assert inside == 5
    release.set()
    await asyncio.gather(*tasks)
    assert most == 5 and gate.in_flight == 0


async def test_without_a_controller_the_gate_never_holds_a_request() -> None:
    """Fixed max_concurrency: the workers' count is the limit, the gate only counts."""
    gate = Gate(None, clock=lambda: 0.0)
    entered, release = asyncio.Event(), asyncio.Event()
    inside = 0

    async def request() -> None:
        nonlocal inside
        async with gate:
            inside += 1
            if inside == 50:
                entered.set()
            await release.wait()

    tasks = [asyncio.create_task(request()) for _ in range(50)]
    await asyncio.wait_for(entered.wait(), 5)  # all fifty inside at once
    assert gate.in_flight == 50
    release.set()
    await asyncio.gather(*tasks)
    assert gate.in_flight == 0


async def test_the_gate_hands_a_freed_place_to_the_oldest_waiter() -> None:
    """Limit 1: A holds the place, B waits; A leaves and comes straight back. B goes next, then A:
    a newcomer never takes a place a waiter was woken for (before, B ran after A went three times)."""
    gate = Gate(Gradient(cap=1, limit=1), clock=lambda: 0.0)
    order: list[str] = []

    async def worker(name: str, times: int) -> None:
        for _ in range(times):
            async with gate:
                order.append(name)
                await asyncio.sleep(0)  # a request's await: the others run meanwhile

    a = asyncio.create_task(worker("A", 3))  # runs first: inside, then at its await ...
    b = asyncio.create_task(worker("B", 3))  # ... B queues
    await asyncio.wait_for(asyncio.gather(a, b), 5)
    assert order == ["A", "B", "A", "B", "A", "B"]
    assert gate.in_flight == 0


async def test_the_gate_admits_in_arrival_order_under_churn() -> None:
    """Twelve workers over a limit of three, each going round twenty times: places are granted in
    exactly the order they were asked for, so nobody waits longer than the queue ahead of it."""
    gate = Gate(Gradient(cap=3, limit=3), clock=lambda: 0.0)
    asked: list[tuple[int, int]] = []
    granted: list[tuple[int, int]] = []
    inside = 0

    async def worker(me: int) -> None:
        nonlocal inside
        for turn in range(20):
            asked.append((me, turn))
            async with gate:
                granted.append((me, turn))
                inside += 1
                assert inside <= 3
                for _ in range(me % 3 + 1):  # service times differ: the order of leaving churns
                    await asyncio.sleep(0)
                inside -= 1

    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(12))), 10)
    assert granted == asked
    assert gate.in_flight == 0


async def test_a_waiter_cancelled_as_it_is_handed_a_place_passes_it_on() -> None:
    gate = Gate(Gradient(cap=1, limit=1), clock=lambda: 0.0)
    entered: list[str] = []

    async def request(name: str) -> None:
        async with gate:
            entered.append(name)
            await asyncio.sleep(0)

    await gate.__aenter__()  # the place is taken
    b = asyncio.create_task(request("B"))
    c = asyncio.create_task(request("C"))
    await asyncio.sleep(0)  # both queue
    await gate.__aexit__()  # the place is handed to B ...
    b.cancel()  # ... cancelled before it resumed: C must get it, not lose it
    await asyncio.wait_for(c, 5)
    with pytest.raises(asyncio.CancelledError):
        await b
    assert entered == ["C"] and gate.in_flight == 0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_auto_rate_waits_for_the_first_answer_then_paces_at_the_announced_limit() -> None:
    clock = _Clock()
    limiter = Limiter(AUTO, clock=clock)
    assert limiter.rpm == AUTO_START_RPM
    first = await limiter.acquire()
    assert first is not None
    second = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not second.done()  # waits for the first answer's headers
    limiter.observe({"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "1199"})
    assert await asyncio.wait_for(second, 1) is not None
    assert limiter.rpm == pytest.approx(1200 * (1 - AUTO_MARGIN))
    limiter.observe({"x-ratelimit-limit-requests": "600"})  # the provider lowered it: followed
    assert limiter.rpm == pytest.approx(600 * (1 - AUTO_MARGIN))


async def test_auto_rate_without_headers_goes_on_at_the_starting_pace() -> None:
    limiter = Limiter(AUTO, AUTO)
    assert await limiter.acquire() is not None
    limiter.observe({})  # an answer with no x-ratelimit-*: the others may go
    assert await asyncio.wait_for(limiter.acquire(), 2) is not None
    assert (limiter.rpm, limiter.tokens) == (AUTO_START_RPM, None)  # compared whole: no narrowing past observe()
    limiter.observe({"x-ratelimit-limit-tokens": "100000"})
    assert limiter.tokens is not None and limiter.tokens.per_minute == pytest.approx(100000 * (1 - AUTO_MARGIN))


# -- against the built-in endpoint's server model -----------------------------------------------

def _auto_job(tmp_path: Any, base_url: str, n: int, **limits: Any) -> Any:
    from conftest import job_dict, url_manifest, write_job

    manifest = url_manifest(tmp_path / "m.csv", n)
    return write_job(tmp_path / "job.toml", job_dict(manifest, base_url, tmp_path / "out",
                                                     limits={"requests_per_minute": 60000, **limits}))


@pytest.mark.serial  # follows measured latencies and pace against wall-clock bounds
def test_auto_concurrency_finds_a_servers_capacity_without_timeouts(tmp_path: Any, endpoint_factory: Any) -> None:
    import json

    from conftest import read_output, run_cli

    ep = endpoint_factory(capacity=8, latency_ms=100, queue_limit=64)
    job = _auto_job(tmp_path, ep.base_url, 500, max_concurrency="auto", max_concurrency_cap=64)
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert len(read_output(tmp_path / "out")) == 500
    stats = ep.stats()
    assert set(stats["statuses"]) == {"200"}  # no 503, no timeout
    used = json.loads(run_cli("status", str(job), "--json").stdout)["last_run"]["this_run"]["limits"]["max_concurrency"]
    assert used["high"] >= 8  # it grew to the capacity ...
    assert 8 <= used["last"] <= 16, used  # ... and settled just above it, not at the cap of 64
    assert "max_concurrency auto:" in r.stderr


@pytest.mark.serial  # follows measured latencies and pace against wall-clock bounds
def test_auto_rate_paces_at_the_announced_limit_with_no_429(tmp_path: Any, endpoint_factory: Any) -> None:
    import json
    import time

    from conftest import run_cli

    ep = endpoint_factory(rate_limit=300, rate_window_s=60)  # announces x-ratelimit-limit-requests: 300
    job = _auto_job(tmp_path, ep.base_url, 40, requests_per_minute="auto", max_concurrency=16)
    started = time.monotonic()
    r = run_cli("run", str(job))
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert ep.stats()["over_limit"] == 0 and "429" not in ep.stats()["statuses"]
    used = json.loads(run_cli("status", str(job), "--json").stdout)["last_run"]["this_run"]["limits"]
    assert used["requests_per_minute"]["paced_at"] == pytest.approx(300 * (1 - AUTO_MARGIN))
    assert 6.5 < took < 14  # 40 requests at 4.9/s: the announced pace, neither the 1/s start nor unpaced


@pytest.mark.serial  # follows measured latencies and pace against wall-clock bounds
def test_auto_concurrency_backs_off_when_the_capacity_shrinks(tmp_path: Any, endpoint_factory: Any) -> None:
    import json

    from conftest import read_output, run_cli

    ep = endpoint_factory(capacity=8, latency_ms=100, queue_limit=64, capacity_schedule=[[4.0, 2]])
    job = _auto_job(tmp_path, ep.base_url, 420, max_concurrency="auto", max_concurrency_cap=64)
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert len(read_output(tmp_path / "out")) == 420
    assert set(ep.stats()["statuses"]) == {"200"}
    used = json.loads(run_cli("status", str(job), "--json").stdout)["last_run"]["this_run"]["limits"]["max_concurrency"]
    assert used["high"] >= 8 and used["low"] <= 4 and used["last"] <= 5, used  # grew to 8, then followed 8 -> 2
