"""A timed wait keeps every cancellation (pipeline.waits): on Python 3.11 asyncio.wait_for lost one
that arrived as the awaited finished, and a bucket run whose last row woke its journal's flusher as
the run cancelled it never ended."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline.waits import wait_event

ROOT = Path(__file__).resolve().parent.parent


def test_a_cancellation_arriving_as_the_event_is_set_is_kept() -> None:
    async def main() -> None:
        event = asyncio.Event()
        rounds = 0

        async def flusher() -> None:  # the shape of the journal's sync_forever
            nonlocal rounds
            while True:
                await wait_event(event, 5.0)
                event.clear()
                rounds += 1

        task = asyncio.create_task(flusher())
        await asyncio.sleep(0)  # the flusher waits
        event.set()  # the last row wakes it ...
        task.cancel()  # ... in the same step as the run cancels it
        async with asyncio.timeout(5):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert rounds == 0

    asyncio.run(main())


def test_a_wait_ends_by_its_event_or_its_deadline() -> None:
    async def main() -> tuple[bool, bool, bool]:
        event = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, event.set)
        first = await wait_event(event, 5.0)
        timed_out = await wait_event(asyncio.Event(), 0.01)
        return first, timed_out, await wait_event(event, 0)

    assert asyncio.run(main()) == (True, False, True)


def test_no_module_waits_with_asyncio_wait_for() -> None:
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
             if "asyncio.wait_for(" in p.read_text(encoding="utf-8")]
    assert not found, f"asyncio.wait_for loses cancellations on 3.11; use pipeline.waits: {found}"
