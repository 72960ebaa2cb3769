"""Crash points: make the process die hard at a named point, for the crash-safety tests.

    PIPELINE_CRASH_AT=after_rename        # die the first time that point is reached
    PIPELINE_CRASH_AT=after_response:25   # die the 25th time

Points: after_response (answer in hand, not journaled), mid_journal_line (half a line written),
after_part_write (part file written and fsynced, not renamed), after_rename (renamed, no commit
record yet). Off (one dict lookup) unless the variable is set.
"""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["crash_point", "POINTS"]

POINTS = ("after_response", "mid_journal_line", "after_part_write", "after_rename")
_spec = os.environ.get("PIPELINE_CRASH_AT", "")
_name, _, _nth = _spec.partition(":")
_left = int(_nth) if _nth else 1
EXIT_CODE = 99


def crash_point(point: str, last_act: Callable[[], object] | None = None) -> None:
    """Die here if armed for this point and this is the chosen hit; `last_act` runs first."""
    global _left
    if _name != point:
        return
    _left -= 1
    if _left <= 0:
        if last_act is not None:
            last_act()
        os._exit(EXIT_CODE)
