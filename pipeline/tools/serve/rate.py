"""The built-in endpoint's rate limit: `rate_limit` requests per `rate_window_s` over a sliding
window, the x-ratelimit-* headers every answer carries, and the styles in which a 429 says how
long to wait (`rate_headers`; injected 429 faults use them too).

    window = RateWindow(opts)
    allowed, headers, free_in = window.admit()
    if not allowed:
        headers |= retry_headers(opts.rate_headers, free_in)
"""

from __future__ import annotations

import email.utils
import math
import time
from collections import deque

from ...config.serve import ServeOptions

__all__ = ["RateWindow", "retry_headers"]


class RateWindow:
    """The arrival times of the requests let through in the last `rate_window_s` seconds."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.times: deque[float] = deque()

    def admit(self) -> tuple[bool, dict[str, str], float]:
        """(allowed, headers, seconds until a place frees); an allowed request takes a place."""
        o = self.opts
        if o.rate_limit <= 0:
            return True, {}, 0.0
        now = time.monotonic()
        while self.times and self.times[0] <= now - o.rate_window_s:
            self.times.popleft()
        allowed = len(self.times) < o.rate_limit
        if allowed:
            self.times.append(now)
        free_in = max((self.times[0] + o.rate_window_s - now) if self.times else 0.0, 0.001)
        if o.rate_headers == "none":  # like vLLM and many gateways: nothing to go by
            return allowed, {}, free_in
        headers = {
            "x-ratelimit-limit-requests": str(o.rate_limit),
            "x-ratelimit-remaining-requests": str(max(0, o.rate_limit - len(self.times))),
            "x-ratelimit-reset-requests": _ms(free_in),
        }
        return allowed, headers, free_in


def retry_headers(style: str, delay: float) -> dict[str, str]:
    """How a 429 asks for `delay` seconds, in one of the `rate_headers` styles."""
    if style == "retry-after":
        return {"retry-after": str(max(1, math.ceil(delay)))}
    if style == "retry-after-ms":
        return {"retry-after-ms": str(max(1, math.ceil(delay * 1000)))}
    if style == "http-date":
        # whole seconds, rounded up: a client that waits until then finds a place
        return {"retry-after": email.utils.formatdate(math.ceil(time.time() + max(1.0, delay)), usegmt=True)}
    if style == "reset":
        return {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": _ms(delay)}
    return {}


def _ms(seconds: float) -> str:
    """A duration in whole milliseconds, rounded up: a client waiting this long finds a place."""
    return f"{max(1, math.ceil(seconds * 1000))}ms"
