"""Durations as servers and job files write them, read by one grammar.

    parse_duration("1h30m")   # 5400.0
    parse_duration("7d")      # 604800.0 (a cache_ttl)
    parse_duration("12ms")    # 0.012 (an x-ratelimit-reset-* header)
    parse_duration("0.5")     # 0.5 (a bare number is seconds)
    parse_duration("soon")    # None
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration", "finite"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float | None:
    """'1s', '6m0s', '12ms', '7d', '0.5' (seconds) -> seconds; None when unparseable."""
    text = text.strip()
    seconds = finite(text)
    if seconds is not None:
        return max(0.0, seconds)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


def finite(text: str) -> float | None:
    """A finite float, or None ("nan" and "inf" are not durations)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
