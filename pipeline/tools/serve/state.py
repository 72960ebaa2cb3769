"""What the built-in endpoint counts and keeps between requests: the figures GET /stats reports,
the requests GET /requests lists (with `record`), the seeded chance behind faults and jitter, the
rate window, the capacity gate (`capacity.py`), the gzip bomb once built, and the Batch API's
files and batches (`batches.py`). POST /stats/reset starts them afresh (the capacity gate keeps
the places of the requests holding one).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from aiohttp import web

from ...config.serve import ServeOptions
from .batches import BatchStore
from .capacity import Capacity
from .rate import RateWindow

__all__ = ["ServeState", "STATE"]


class ServeState:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.rate = RateWindow(opts)
        self.capacity = Capacity(opts)  # places in service and the queue (`capacity`)
        self.per_row: Counter[str] = Counter()  # keyed by the prompt text
        self.statuses: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self.requests = 0
        self.over_limit = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.recorded: list[dict[str, Any]] = []
        self.peers: set[Any] = set()  # (host, port) of each client connection seen
        self.redirects_followed = 0  # requests that arrived at a redirect fault's Location
        self.bombs: dict[bool, bytes] = {}  # the gzip bomb, plain and streamed: built once
        self.bomb_lock = asyncio.Lock()
        self.batches = BatchStore(opts)  # the Batch API's files and batches

    def reset(self) -> None:
        """Everything afresh, in place: requests in flight hold this object and count into it.
        The capacity gate stays (requests in service and waiting hold their places in it)."""
        capacity = self.capacity
        self.__dict__.update(ServeState(self.opts).__dict__)
        self.capacity = capacity
        capacity.restart()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "per_row": dict(self.per_row),
            "statuses": dict(self.statuses),
            "faults": dict(self.faults_fired),
            "over_limit": self.over_limit,
            "max_in_flight": self.max_in_flight,
            **self.capacity.stats(),
            "connections": len(self.peers),
            "redirects_followed": self.redirects_followed,
            **self.batches.stats(self.batches.now()),
        }


STATE = web.AppKey("state", ServeState)  # where the app keeps it
