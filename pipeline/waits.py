"""Waiting with a deadline, without losing a cancellation.

    if await wait_event(stopping, 2.5): ...      # True: set; False: 2.5 s passed first
    async with asyncio.timeout(30): ...          # a coroutine with a deadline (never asyncio.wait_for)

On Python 3.11, `asyncio.wait_for` runs the awaited in a task of its own; when that task finishes
in the same loop step as the waiter is cancelled, the cancellation is swallowed and the waiter
goes on as if nothing was asked. A bucket run whose last row set the journal's flush event just as
the run cancelled its flusher never ended (the flusher looped on). `asyncio.timeout` awaits in the
waiter's own task, so a cancellation always arrives; every timed wait here goes through it.
"""

from __future__ import annotations

import asyncio

__all__ = ["wait_event"]


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """True once `event` is set, False when `timeout` seconds passed first (None: no deadline)."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
