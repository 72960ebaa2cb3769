"""The limiter's pacing and adaptivity, on a virtual clock.

The tests run real asyncio tasks (several workers sharing one Limiter) on an event loop whose
clock only moves when every task is waiting: it jumps to the next timer instead of sleeping.
Minutes of pacing take milliseconds, and the counts are exact, not timing-dependent.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable, Coroutine

import pytest

from pipeline.net.limiter import RECOVER_EVERY_S, SAFETY, Limiter


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time() is virtual: when nothing is ready it jumps to the next timer."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 1000.0
        selector = self._selector  # type: ignore[attr-defined]  # the selector loop's own, unnamed in typeshed
        real_select = selector.select

        def select(timeout: float | None = None) -> list[Any]:
            events = real_select(0)
            if events or timeout == 0:
                return events
            if timeout is None:
                raise RuntimeError("deadlock: every task waits and no timer is set")
            self._now += timeout
            return events

        selector.select = select

    def time(self) -> float:
        return self._now


def run_virtual(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main())


async def drive(
    limiter: Limiter,
    until: float,
    *,
    workers: int = 8,
    cost: float = 0.0,
    on_grant: Callable[[float, int], None] | None = None,
    events: dict[float, Callable[[], None]] | None = None,
) -> list[float]:
    """`workers` tasks acquire in a loop until `until` (seconds from start); the grant times, from 0.

    `events` maps a time (from start) to a call made then (a 429 arriving, headers observed).
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    grants: list[float] = []

    async def worker() -> None:
        while True:
            await limiter.acquire(cost)
            now = loop.time() - t0
            if now >= until:
                return
            grants.append(now)
            if on_grant is not None:
                on_grant(now, len(grants))
            await asyncio.sleep(0)

    async def fire(at: float, call: Callable[[], None]) -> None:
        await asyncio.sleep(at)
        call()

    extra = [asyncio.create_task(fire(at, call)) for at, call in (events or {}).items()]
    await asyncio.gather(*(worker() for _ in range(workers)), *extra)
    return sorted(grants)


def max_in_window(times: list[float], window: float, weights: list[float] | None = None) -> float:
    """Most starts (or summed weights) in any half-open window of `window` seconds.

    The same rule as the built-in endpoint's sliding window: a start older than `window` has left.
    """
    order = sorted(range(len(times)), key=times.__getitem__)
    w = [1.0] * len(times) if weights is None else [weights[i] for i in order]
    t = [times[i] for i in order]
    best = total = 0.0
    lo = 0
    for hi in range(len(t)):
        total += w[hi]
        while t[lo] <= t[hi] - window:
            total -= w[lo]
            lo += 1
        best = max(best, total)
    return best


def count_between(times: list[float], a: float, b: float) -> int:
    return sum(1 for t in times if a <= t < b)


# -- pacing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rpm, burst", [(600, 1), (600, 5), (3000, 1), (3000, 10), (30, 1), (90, 3)])
def test_pacing_never_exceeds_rpm_in_60s_nor_rpm_over_60_in_1s(rpm: int, burst: int) -> None:
    minutes = 3

    async def main() -> list[float]:
        return await drive(Limiter(rpm, burst=burst), until=60.0 * minutes, workers=8)

    grants = run_virtual(main)
    assert max_in_window(grants, 60.0) <= rpm
    assert max_in_window(grants, 1.0) <= math.ceil(rpm / 60) + burst
    # and the limit is used: smooth is not slow
    assert len(grants) >= 0.98 * rpm * minutes - (burst - 1) * minutes


def test_first_second_is_not_a_burst_of_the_minutes_quota() -> None:
    async def main() -> list[float]:
        return await drive(Limiter(6000, burst=1), until=1.0, workers=64)

    grants = run_virtual(main)
    assert len(grants) <= 6000 / 60 + 1
    assert len(grants) >= 0.98 * 6000 / 60


def test_burst_starts_together_after_idle_then_paces() -> None:
    async def main() -> list[float]:
        return await drive(Limiter(600, burst=5), until=1.0, workers=8)

    grants = run_virtual(main)
    assert count_between(grants, 0.0, 1e-9) == 5  # the burst, at once
    assert len(grants) <= 600 / 60 + 5


# -- adaptivity: a 429 ----------------------------------------------------------------------

def test_slow_down_pauses_everyone_then_recovers_gradually() -> None:
    rpm = 600
    full = rpm / 60 * SAFETY * RECOVER_EVERY_S  # starts per recovery step at the full pace
    limiter = Limiter(rpm, burst=1)

    async def main() -> list[float]:
        return await drive(limiter, until=60.0, workers=8, events={20.0: lambda: limiter.slow_down(5.0)})

    grants = run_virtual(main)
    # nobody starts during the server's delay, not even workers that had reserved a slot before it
    assert count_between(grants, 20.0 + 1e-6, 25.0) == 0
    # then the pace comes back step by step, from half ...
    steps = [count_between(grants, 25.0 + RECOVER_EVERY_S * k, 25.0 + RECOVER_EVERY_S * (k + 1)) for k in range(8)]
    assert steps[0] <= 0.55 * full + 1
    assert all(b >= a - 1 for a, b in zip(steps, steps[1:])), steps
    assert steps[1] > steps[0] and steps[3] > steps[1]
    # ... to full, without overshooting the limit
    assert steps[-1] >= 0.95 * full
    assert max_in_window(grants, 60.0) <= rpm
    assert max_in_window(grants, 1.0) <= rpm / 60 + 1


def test_pause_is_capped_by_max_pause() -> None:
    limiter = Limiter(600, burst=1, max_pause_s=10.0)

    async def main() -> list[float]:
        return await drive(limiter, until=40.0, workers=4, events={5.0: lambda: limiter.slow_down(3600.0)})

    grants = run_virtual(main)
    assert count_between(grants, 5.0 + 1e-6, 15.0) == 0
    assert count_between(grants, 15.0, 17.0) > 0  # back after the cap, not after an hour


def test_a_burst_of_429s_from_requests_in_flight_slows_once() -> None:
    async def main() -> Limiter:
        limiter = Limiter(600, burst=1)
        sent = [await limiter.acquire() for _ in range(8)]  # eight requests in flight at once
        for s in sent:  # all come back 429
            limiter.slow_down(None, sent_at=s)
        assert limiter.factor == pytest.approx(0.5)
        # a request sent after the slowdown that is refused too: the pace really is too high
        later = await limiter.acquire()
        limiter.slow_down(None, sent_at=later)
        assert limiter.factor == pytest.approx(0.25)
        return limiter

    assert run_virtual(main).slowdowns == 2


def test_slow_down_without_a_delay_still_slows_the_pace() -> None:
    rpm = 600
    limiter = Limiter(rpm, burst=1)

    async def main() -> list[float]:
        return await drive(limiter, until=12.0, workers=8, events={10.0: lambda: limiter.slow_down(None)})

    grants = run_virtual(main)
    before = count_between(grants, 8.0, 10.0)
    after = count_between(grants, 10.0 + 1e-6, 12.0)
    assert after <= 0.55 * before + 1


# -- adaptivity: x-ratelimit-remaining -------------------------------------------------------

@pytest.mark.parametrize("kind", ["requests", "tokens"])
def test_observe_remaining_zero_pauses_until_reset(kind: str) -> None:
    limiter = Limiter(600, burst=1)
    headers = {f"x-ratelimit-remaining-{kind}": "0", f"x-ratelimit-reset-{kind}": "3s"}

    async def main() -> list[float]:
        return await drive(limiter, until=10.0, workers=8, events={4.0: lambda: limiter.observe(headers)})

    grants = run_virtual(main)
    assert count_between(grants, 4.0 + 1e-6, 7.0) == 0
    assert count_between(grants, 7.0, 8.0) >= 9
    assert limiter.factor == 1.0  # a spent window is not a 429: the pace is not cut


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "3s"},
        {"x-ratelimit-remaining-requests": "0"},  # no reset given: nothing to wait for
        {"x-ratelimit-reset-requests": "3s"},
        {"x-ratelimit-remaining-requests": "zero", "x-ratelimit-reset-requests": "3s"},
        {},
    ],
)
def test_observe_without_a_spent_limit_does_not_pause(headers: dict[str, str]) -> None:
    limiter = Limiter(600, burst=1)

    async def main() -> list[float]:
        return await drive(limiter, until=6.0, workers=8, events={2.0: lambda: limiter.observe(headers)})

    grants = run_virtual(main)
    assert count_between(grants, 2.0, 4.0) >= 19


def test_observe_keeps_a_too_high_configured_limit_under_the_servers() -> None:
    """Configured 6000/min, the server allows 20 per 2 s window and says so in its headers."""
    limit, window = 20, 2.0
    limiter = Limiter(6000, burst=1)
    accepted: list[float] = []
    refused = 0

    def server(now: float, _: int) -> None:
        nonlocal refused
        while accepted and accepted[0] <= now - window:
            accepted.pop(0)
        if len(accepted) >= limit:
            refused += 1
            return
        accepted.append(now)
        left = limit - len(accepted)
        reset_ms = math.ceil((accepted[0] + window - now) * 1000)  # rounded up, as a server must
        limiter.observe({"x-ratelimit-remaining-requests": str(left), "x-ratelimit-reset-requests": f"{reset_ms}ms"})

    async def main() -> list[float]:
        return await drive(limiter, until=60.0, workers=1, on_grant=server)

    grants = run_virtual(main)
    assert refused == 0
    assert len(grants) >= 0.9 * limit * 60.0 / window


# -- tokens per minute -----------------------------------------------------------------------

def test_tokens_per_minute_paces_the_estimates() -> None:
    tpm, cost = 60_000, 5_000.0

    async def main() -> list[float]:
        return await drive(Limiter(6000, tpm), until=300.0, workers=8, cost=cost)

    grants = run_virtual(main)
    assert max_in_window(grants, 60.0, [cost] * len(grants)) <= tpm
    assert len(grants) * cost >= 0.95 * tpm * 5


def test_tokens_settle_gives_back_an_overestimate() -> None:
    tpm, estimate, actual = 60_000, 5_000.0, 1_000

    async def main() -> tuple[list[float], list[float]]:
        limiter = Limiter(6000, tpm)
        grants = await drive(limiter, until=300.0, workers=1, cost=estimate,
                             on_grant=lambda now, n: limiter.settle(estimate, actual))
        plain = await drive(Limiter(6000, tpm), until=300.0, workers=1, cost=estimate)
        return grants, plain

    settled, plain = run_virtual(main)
    assert len(settled) >= 4 * len(plain)  # the real usage is a fifth of the estimate
    assert max_in_window(settled, 60.0, [float(actual)] * len(settled)) <= tpm + estimate


def test_tokens_settle_charges_an_underestimate() -> None:
    tpm, estimate, actual = 60_000, 1_000.0, 5_000

    async def main() -> list[float]:
        limiter = Limiter(6000, tpm)
        return await drive(limiter, until=300.0, workers=1, cost=estimate,
                           on_grant=lambda now, n: limiter.settle(estimate, actual))

    grants = run_virtual(main)
    # the real usage stays under the limit: each underestimate is paid back before the next start
    assert max_in_window(grants, 60.0, [float(actual)] * len(grants)) <= tpm + actual
    assert len(grants) <= 1.05 * tpm * 5 / actual + 2


def test_a_request_dearer_than_a_second_of_tokens_still_goes() -> None:
    async def main() -> list[float]:
        return await drive(Limiter(6000, 6_000), until=120.0, workers=2, cost=3_000.0)

    grants = run_virtual(main)
    assert grants and grants[0] == 0.0
    assert max_in_window(grants, 60.0, [3_000.0] * len(grants)) <= 6_000 + 3_000


def test_without_tokens_per_minute_estimates_are_ignored() -> None:
    async def main() -> list[float]:
        limiter = Limiter(600)
        grants = await drive(limiter, until=10.0, workers=4, cost=1e9,
                             on_grant=lambda now, n: limiter.settle(1e9, 5))
        return grants

    assert len(run_virtual(main)) >= 95


def test_a_stop_ends_the_wait_for_a_place() -> None:
    async def main() -> tuple[list[Any], float]:
        loop = asyncio.get_running_loop()
        limiter = Limiter(60, 60_000, burst=1)
        stop = asyncio.Event()
        assert await limiter.acquire(10.0, stop=stop) is not None  # the first place is free
        limiter.pause(3600.0)
        t0 = loop.time()
        waiting = [asyncio.create_task(limiter.acquire(5_000.0, stop=stop)) for _ in range(3)]
        await asyncio.sleep(5.0)
        stop.set()
        got = await asyncio.gather(*waiting)
        return got, loop.time() - t0

    got, waited = run_virtual(main)
    assert got == [None, None, None]  # nothing granted
    assert waited < 6.0  # not the hour's pause


def test_recovery_does_not_run_down_during_a_later_pause() -> None:
    rpm = 600
    full = rpm / 60 * SAFETY * RECOVER_EVERY_S
    limiter = Limiter(rpm, burst=1)

    def second_429() -> None:  # a later 429 of the same burst asks for a longer pause
        limiter.slow_down(20.0, sent_at=-1.0)

    async def main() -> list[float]:
        return await drive(limiter, until=50.0, workers=8,
                           events={10.0: lambda: limiter.slow_down(1.0), 10.5: second_429})

    grants = run_virtual(main)
    assert limiter.slowdowns == 1
    assert count_between(grants, 10.0 + 1e-6, 30.5) == 0
    # back at half the pace after the long pause, not at full pace recovered during it
    assert count_between(grants, 30.5, 30.5 + RECOVER_EVERY_S) <= 0.55 * full + 1


def test_requests_due_while_the_loop_was_blocked_do_not_start_together() -> None:
    # 600/min = one every 0.1 s. At t=2 the loop is blocked for 0.5 s (an import or a thread holding
    # the GIL): the five requests due meanwhile must not all start the moment it ends.
    async def main() -> list[float]:
        limiter = Limiter(600)
        loop = asyncio.get_running_loop()

        def block() -> None:
            loop._now += 0.5  # type: ignore[attr-defined]  # time passes, no task runs

        return await drive(limiter, 6.0, workers=8, events={2.0: block})

    grants = run_virtual(main)
    worst = max(sum(1 for g in grants if t <= g < t + 0.2) for t in grants)
    assert worst <= 3, f"{worst} requests started within 0.2 s at 10/s"
    after = [g for g in grants if g >= 2.5]
    assert len(after) >= 0.95 * 10 * (6.0 - 2.5)  # the pace resumes at once
