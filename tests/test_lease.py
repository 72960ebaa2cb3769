"""The cluster's one rate limit (issue 8), as a table of times: no Ray, no sleeping, a fake clock."""

from __future__ import annotations

import asyncio
import bisect
import random

import pytest

from pipeline.config import LimitsConfig
from pipeline.engine.lease import SLOT_EXPIRY_S, LeasedLimiter, RateBudget
from pipeline.errors import StopJob


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def most_in_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max(bisect.bisect_left(starts, s + window) - i for i, s in enumerate(starts))


def simulate(budget: RateBudget, clock: Clock, workers: int, seconds: float, *, rng: random.Random, want: int = 5) -> list[float]:
    """Workers lease at random moments and use every slot exactly at its time, as a greedy worker does."""
    starts: list[float] = []
    held = [0.0] * workers  # when each worker's last slot runs out
    end = clock.t + seconds
    while clock.t < end:
        clock.t += rng.uniform(0.0, 0.05)
        w = rng.randrange(workers)
        if held[w] <= clock.t:  # out of slots: lease more
            grant = budget.lease(want)
            times = [clock.t + d for d in grant["slots"]]
            starts += times
            held[w] = times[-1]
    return [s for s in starts if s < end]


@pytest.mark.parametrize("workers", [1, 2, 4, 16])
def test_many_workers_together_never_pass_the_limit_in_any_window(workers: int) -> None:
    clock = Clock()
    budget = RateBudget(600, clock=clock)
    starts = simulate(budget, clock, workers, 180.0, rng=random.Random(workers))
    assert most_in_window(starts, 60.0) <= 600
    assert most_in_window(starts, 1.0) <= 10  # about rpm/60 in any second: no minute fired at once
    assert len(starts) >= 0.98 * 600 * 3  # and the budget is not starved: close to the limit


def test_burst_is_shared_too() -> None:
    clock = Clock()
    budget = RateBudget(120, burst=5, clock=clock)
    first = [budget.lease(1)["slots"][0] for _ in range(8)]  # eight workers ask at the same instant
    assert first[:5] == [0.0] * 5 and all(d > 0 for d in first[5:])
    starts = simulate(budget, clock, 4, 120.0, rng=random.Random(7))
    assert most_in_window(starts, 60.0) <= 120


def test_a_429_anywhere_pauses_and_slows_everyone_then_recovers() -> None:
    clock = Clock()
    budget = RateBudget(600, clock=clock)
    budget.lease(10)
    epoch = budget.epoch
    clock.t += 1.0
    budget.slow_down(3.0)  # one worker saw a 429 with retry-after 3
    assert budget.epoch == epoch + 1  # holders are told to drop their slots
    grant = budget.lease(10)
    assert grant["epoch"] == budget.epoch
    assert grant["slots"][0] >= 3.0  # nobody starts before the server's delay
    gaps = [b - a for a, b in zip(grant["slots"], grant["slots"][1:])]
    assert min(gaps) == pytest.approx(2 * 60 / (600 * 0.995), rel=1e-6)  # half the pace
    budget.slow_down(3.0)  # the same burst of 429s: one step, not two
    assert budget.factor == 0.5
    clock.t += 60.0  # a quiet minute: back to full pace
    grant = budget.lease(3)
    gaps = [b - a for a, b in zip(grant["slots"], grant["slots"][1:])]
    assert gaps[0] == pytest.approx(60 / (600 * 0.995), rel=1e-6)


def test_server_saying_none_left_pauses_everyone() -> None:
    clock = Clock()
    budget = RateBudget(600, clock=clock)
    budget.pause(5.0)
    assert budget.lease(1)["slots"][0] == pytest.approx(5.0)
    budget.pause(1.0)  # a shorter pause does not shorten the longer one
    assert budget.lease(1)["slots"][0] > 5.0


def test_tokens_per_minute_hold_across_leases_and_are_corrected_by_usage() -> None:
    clock = Clock()
    budget = RateBudget(100_000, tokens_per_minute=60_000, clock=clock)  # 1000 tokens/s
    delays = [budget.lease(0, tokens=500)["token_delay"] for _ in range(10)]  # 5000 tokens asked at once
    # one second's worth at once, then paced: never faster than the limit (the shared TokenBucket
    # keeps a small safety margin under it, so a little slower than the bare 4.0 s)
    assert delays[0] == 0.0 and 4.0 <= delays[-1] <= 4.2
    late = budget.lease(0, tokens=500, token_debt=2000)["token_delay"]  # they really used 2000 more
    assert 6.5 <= late <= 6.5 * 1.05 and late - delays[-1] >= 2.5 - 1e-9


def limits(**kw) -> LimitsConfig:
    return LimitsConfig(**{"requests_per_minute": 600, "max_concurrency": 4, **kw})


class LocalBudget:
    """A RateBudget in this process with the face of the actor's handle; a lease yields once, as a call would."""

    def __init__(self, budget: RateBudget) -> None:
        self.budget = budget
        self.slowdowns: list[float | None] = []
        self.asked: list[int] = []

    async def lease(self, want: int, tokens: float, token_debt: float) -> dict:
        self.asked.append(want)
        await asyncio.sleep(0)
        return self.budget.lease(want, tokens, token_debt)

    def slow_down(self, pause_s: float | None) -> None:
        self.slowdowns.append(pause_s)
        self.budget.slow_down(pause_s)

    def pause(self, seconds: float) -> None:
        self.budget.pause(seconds)


async def leave_one_slot_over(limiter: LeasedLimiter, shared: LocalBudget) -> None:
    """Three requests wait; the second leases for itself and the third, which then stops waiting."""
    first, second, gives_up = (asyncio.ensure_future(limiter.acquire()) for _ in range(3))
    asked = len(shared.asked)
    for _ in range(10_000):  # a bound, not a wait: each turn of the loop lets the acquires run
        if len(shared.asked) >= asked + 2:
            break
        await asyncio.sleep(0)
    else:
        pytest.fail(f"the waiting requests asked for {len(shared.asked) - asked} leases, not 2")
    gives_up.cancel()  # e.g. its run is stopping
    await asyncio.gather(first, second)
    assert len(limiter.slots) == 1


async def test_worker_leases_for_waiting_requests_only_and_never_sends_on_stale_slots() -> None:
    clock = Clock()
    shared = LocalBudget(RateBudget(6000, clock=clock))
    limiter = LeasedLimiter(shared, limits(requests_per_minute=6000), clock=clock)
    await asyncio.gather(*(limiter.acquire() for _ in range(4)))
    assert shared.asked == [1, 3] and not limiter.slots  # the first alone, then the three that queued behind it

    await leave_one_slot_over(limiter, shared)
    clock.t += 1.0 + SLOT_EXPIRY_S  # a second later that slot would bunch with others' slots
    await limiter.acquire()
    assert shared.asked[-1] == 1 and not limiter.slots  # so it was dropped and a fresh one leased

    await leave_one_slot_over(limiter, shared)
    limiter.hear(limiter.epoch + 1)  # a 429 elsewhere: what is held is at the old pace
    assert not limiter.slots


async def test_a_worker_woken_late_past_its_slot_gives_it_up_for_a_fresh_one_once() -> None:
    """The worker's loop was blocked past its slot: sent then, the request would start beside other
    workers' later slots. It takes a fresh slot instead (once: a loop that keeps stalling still sends)."""
    clock = Clock()
    shared = LocalBudget(RateBudget(600, clock=clock))  # a slot every 0.1 s
    limiter = LeasedLimiter(shared, limits(max_concurrency=1), clock=clock)
    await limiter.acquire()

    def stall() -> None:
        clock.t += 0.5  # the loop is blocked until well past the slot being waited for

    before = len(shared.asked)
    asyncio.get_running_loop().call_later(0.02, stall)
    granted = await limiter.acquire()  # waits ~0.1 s (real) for its slot, waking 0.5 s late
    assert len(shared.asked) == before + 2  # the late slot given up, a fresh one leased
    assert granted == clock.t


async def test_worker_429_goes_to_the_budget_and_a_stop_ends_acquire() -> None:
    clock = Clock()
    shared = LocalBudget(RateBudget(600, clock=clock))
    limiter = LeasedLimiter(shared, limits(), clock=clock)
    await limiter.acquire()
    limiter.slow_down(2.0)
    assert shared.slowdowns == [2.0] and not limiter.slots and shared.budget.factor == 0.5
    limiter.stop(StopJob("the provider says the account is out of quota", kind="quota"))
    with pytest.raises(StopJob) as err:
        await limiter.acquire()
    assert err.value.kind == "quota"


async def test_worker_leases_tokens_for_the_waiting_requests_and_gives_back_what_it_did_not_spend() -> None:
    clock = Clock()
    shared = LocalBudget(RateBudget(60_000, tokens_per_minute=600_000, clock=clock))  # 10 000 tokens/s
    limiter = LeasedLimiter(shared, limits(requests_per_minute=60_000, tokens_per_minute=600_000), clock=clock)
    await asyncio.gather(*(limiter.acquire(1000) for _ in range(4)))
    tokens = shared.budget.tokens
    assert tokens is not None
    free_at = tokens.free_at
    limiter.settle(1000, 400)  # a request used 600 fewer tokens than estimated
    limiter.release()  # and the worker ends with tokens leased but unspent
    # One token lease served all four (a slice of 5000: 4000 spent, 1000 left over).
    assert len([a for a in shared.asked if a == 0]) == 1
    debt = limiter.take_token_debt()
    assert debt == -600 - 1000
    shared.budget.correct(debt)
    assert tokens.free_at == pytest.approx(free_at - 0.16, abs=0.005)  # got them back (at the bucket's safety-trimmed rate)


def test_the_lease_and_the_local_limiter_fill_the_one_pacer_interface() -> None:
    """The engine is given either; both declare every member of net.limiter.Pacer with its signature,
    and the lease is not a Limiter borrowed for its shape."""
    import inspect

    from pipeline.net.limiter import Limiter, Pacer

    members = [name for name, member in vars(Pacer).items() if not name.startswith("_") and callable(member)]  # paused_s: a property
    assert set(members) >= {"acquire", "settle", "slow_down", "observe", "found"}
    lease = LeasedLimiter(LocalBudget(RateBudget(600, clock=Clock())), limits(), clock=Clock())
    local = Limiter(600)
    for pacer in (lease, local):
        for name in members:
            want = inspect.signature(getattr(Pacer, name))
            assert inspect.signature(getattr(type(pacer), name)).parameters.keys() == want.parameters.keys(), name
        assert pacer.paused_s == 0.0
    assert not isinstance(lease, Limiter)
    assert lease.found() == {} and local.found() == {}
    lease.slow_down(3.0)  # a 429 here: this worker's pause is counted for the summary
    assert lease.paused_s == pytest.approx(3.0)
