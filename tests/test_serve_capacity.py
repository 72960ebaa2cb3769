"""The built-in endpoint as a GPU server (`capacity`): at most N requests in service at once, the
rest queued in arrival order, a 503 past the queue bound, latency growing with the batch, and the
capacity changed while serving (POST /admin/capacity, `capacity_schedule`). Real endpoint
processes, concurrent requests over aiohttp; the gate itself also in-process, for its order."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, Endpoint

from pipeline.config import ServeOptions
from pipeline.errors import JobError
from pipeline.tools.serve.capacity import Capacity

pytestmark = pytest.mark.serial  # sub-second time bounds: run alone, never beside other workers


def _body(prompt: str = "Describe") -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}]}


async def _post(session: aiohttp.ClientSession, ep: Endpoint, prompt: str = "Describe") -> tuple[int, float, Any, Any]:
    """(status, seconds, the error body or None, the response's headers)."""
    t = time.monotonic()
    async with session.post(ep.base_url + "/chat/completions", json=_body(prompt)) as r:
        body = await r.json()
        return r.status, time.monotonic() - t, (body if r.status != 200 else None), r.headers


async def _burst(ep: Endpoint, n: int) -> tuple[float, list[tuple[int, float, Any, Any]]]:
    """n requests at once: (the time until the last answer, each answer)."""
    async with aiohttp.ClientSession() as session:
        t = time.monotonic()
        answers = await asyncio.gather(*(_post(session, ep, f"row {i}") for i in range(n)))
        return time.monotonic() - t, answers


async def _set_capacity(ep: Endpoint, body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(ep.root + "/admin/capacity", json=body) as r:
        return r.status, await r.json()


async def test_capacity_4_serves_12_requests_in_3_rounds(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=4, latency_ms=200)
    took, answers = await _burst(ep, 12)
    assert [a[0] for a in answers] == [200] * 12
    assert took >= 0.55  # three rounds of 200 ms, not one
    assert sorted(round(a[1], 1) for a in answers) == [0.2] * 4 + [0.4] * 4 + [0.6] * 4  # time queued is latency seen
    stats = ep.stats()
    assert stats["max_in_service"] == 4 and stats["max_queued"] == 8 and stats["capacity"] == 4
    assert stats["in_service"] == stats["queued_now"] == stats["queue_rejected"] == 0 and stats["max_in_flight"] == 12


async def test_capacity_0_is_todays_endpoint(endpoint_factory: Any) -> None:
    ep = endpoint_factory(latency_ms=200)
    took, answers = await _burst(ep, 12)
    assert [a[0] for a in answers] == [200] * 12 and took < 1.0  # not one at a time (2.4 s); max_in_service below says one round
    stats = ep.stats()
    assert stats["capacity"] == 0 and stats["max_queued"] == stats["queue_rejected"] == 0
    assert stats["max_in_service"] == 12  # counted all the same: a capacity set later counts them


async def test_past_the_queue_bound_a_503_at_once_in_openais_shape(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=2, queue_limit=2, latency_ms=300, faults={"500": 0.0})
    _, answers = await _burst(ep, 8)
    refused = [a for a in answers if a[0] == 503]
    assert sorted(a[0] for a in answers) == [200] * 4 + [503] * 4
    for _, seconds, body, headers in refused:
        assert seconds < 0.28  # at once, not after waiting (a wait is at least the 300 ms latency)
        assert body == {"error": {"message": "The server is overloaded or not ready yet.", "type": "server_error",
                                  "code": "server_error"}}
        assert headers["retry-after"] == "1"  # whole seconds: two rounds of 300 ms ahead
    stats = ep.stats()
    assert stats["queue_rejected"] == 4 and stats["max_queued"] == 2 and stats["statuses"] == {"200": 4, "503": 4}
    assert stats["faults"] == {}  # a refused request draws no fault


async def test_queue_limit_0_refuses_past_capacity_and_rate_headers_none_gives_no_delay(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=1, queue_limit=0, latency_ms=200, rate_headers="none")
    _, answers = await _burst(ep, 3)
    assert sorted(a[0] for a in answers) == [200, 503, 503]
    assert all("retry-after" not in a[3] for a in answers)


async def test_requests_sent_in_order_are_served_in_order(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=1, latency_ms=60)
    done: list[int] = []

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        await _post(session, ep, f"row {i}")
        done.append(i)

    async with aiohttp.ClientSession() as session:
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(one(session, i)))
            await asyncio.sleep(0.015)  # arrivals in this order, all while the first is in service
        await asyncio.gather(*tasks)
    assert done == list(range(6))
    assert ep.stats()["max_queued"] >= 3


async def test_a_client_gone_while_queued_is_not_served(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=1, latency_ms=300)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_post(session, ep, "first"))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_post(session, ep, "gives up"), 0.1)
        third = asyncio.create_task(_post(session, ep, "third"))
        answers = await asyncio.gather(first, third)
    assert [a[0] for a in answers] == [200, 200]
    assert answers[1][1] < 0.55  # the third waited for the first only, not for the one that gave up
    stats = ep.stats()
    assert stats["statuses"] == {"200": 2, "499": 1} and stats["max_in_service"] == 1


async def test_the_gate_hands_a_freed_place_to_the_oldest_waiter_never_a_newcomer() -> None:
    gate = Capacity(ServeOptions(capacity=1))
    order: list[str] = []

    async def use(name: str, hold: float) -> None:
        assert await gate.enter()
        order.append(name)
        await asyncio.sleep(hold)
        gate.leave()

    first = asyncio.create_task(use("first", 0.05))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(use(f"w{i}", 0.01)) for i in range(3)]
    await asyncio.sleep(0.01)
    cancelled = asyncio.create_task(use("cancelled", 0.01))
    await asyncio.sleep(0.01)
    cancelled.cancel()  # leaves the queue without a trace
    await asyncio.sleep(0.035)  # first leaves about now
    newcomer = asyncio.create_task(use("newcomer", 0.01))  # arrives while w0 holds the place
    await asyncio.gather(first, newcomer, *waiters)
    assert order == ["first", "w0", "w1", "w2", "newcomer"]
    assert gate.busy == 0 and not gate.waiting and gate.max_queued == 4


async def test_a_freed_place_is_taken_for_the_waiter_before_it_runs_and_passed_on_if_it_is_cancelled() -> None:
    gate = Capacity(ServeOptions(capacity=1))
    assert await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gate.leave()
    assert gate.busy == 1 and not gate.waiting  # the waiter's place, though it has not run yet
    newcomer = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    assert await waiter and not newcomer.done() and len(gate.waiting) == 1
    gate.leave()  # handed to the newcomer...
    newcomer.cancel()  # ...cancelled before it ran: the place is not lost
    with pytest.raises(asyncio.CancelledError):
        await newcomer
    assert gate.busy == 0 and not gate.waiting and await gate.enter()


async def test_latency_grows_with_the_batch_in_service(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=4, latency_ms=100, batch_latency_growth=1.0)
    _, alone = await _burst(ep, 1)
    _, batch = await _burst(ep, 4)
    assert alone[0][1] < 0.15
    # the 4th in service: 100 x (1 + 1.0 x 3 / 4) = 175 ms
    assert max(a[1] for a in batch) >= 0.165


async def test_post_admin_capacity_applies_to_new_admissions_while_those_in_service_finish(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=1, latency_ms=200)
    assert await _set_capacity(ep, {"capacity": 4}) == (200, {"capacity": 4, "in_service": 0, "max_in_service": 0,
                                                             "queued_now": 0, "max_queued": 0, "queue_rejected": 0})
    took, _ = await _burst(ep, 4)
    assert took < 0.7 and ep.stats()["max_in_service"] == 4  # one round (one at a time would be 0.8 s)

    async with aiohttp.ClientSession() as session:
        t = time.monotonic()
        first = [asyncio.create_task(_post(session, ep, f"a{i}")) for i in range(4)]
        await asyncio.sleep(0.08)
        assert (await _set_capacity(ep, {"capacity": 1}))[1]["in_service"] == 4  # they keep their places
        later = [asyncio.create_task(_post(session, ep, f"b{i}")) for i in range(2)]
        done = await asyncio.gather(*first, *later)
        took = time.monotonic() - t
    assert [d[0] for d in done] == [200] * 6
    assert max(d[1] for d in done[:4]) < 0.7  # the four in service finished as they were (held: 0.8 s and more)
    assert took >= 0.55  # then one at a time: 200 + 200 + 200 ms
    for bad in ({"capacity": -1}, {"capacity": "8"}, {"capacity": True}, [8]):
        status, body = await _set_capacity(ep, bad)
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert ep.stats()["capacity"] == 1


async def test_the_schedule_changes_the_capacity_from_the_start_or_a_reset(endpoint_factory: Any) -> None:
    ep = endpoint_factory(capacity=2, capacity_schedule=[[0.3, 5]])
    await asyncio.sleep(0.5)
    assert ep.stats()["capacity"] == 5
    ep.reset()  # the configured capacity again, and the schedule's clock restarted
    assert ep.stats()["capacity"] == 2
    await asyncio.sleep(0.5)
    assert ep.stats()["capacity"] == 5


def test_the_options_are_checked_and_the_flags_map_to_them() -> None:
    with pytest.raises(JobError, match=r"capacity_schedule must be a list of \[seconds, capacity\] pairs"):
        ServeOptions.from_dict({"capacity_schedule": [[10, "eight"]]})
    with pytest.raises(JobError, match=r"capacity_schedule must give \[seconds, capacity\] pairs in time order"):
        ServeOptions.from_dict({"capacity_schedule": [[10, 8], [5, 32]]})
    with pytest.raises(JobError, match=r"\[serve\] capacity must be zero or more"):
        ServeOptions(capacity=-1)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", "0", "--capacity", "1", "--queue-limit",
                             "0", "--batch-latency-growth", "0.5", "--capacity-at", "30=8", "--latency-ms", "300"],
                            stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        ep = Endpoint(proc.stdout.readline().decode().strip().removeprefix("serving on "), proc)
        _, answers = asyncio.run(_burst(ep, 2))
        assert sorted(a[0] for a in answers) == [200, 503]
        assert ep.stats()["capacity"] == 1
    finally:
        proc.terminate()
        proc.wait(10)
