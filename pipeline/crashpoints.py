"""Crash and fault points: make the process die hard, or raise, at a named point, for the tests
of crash safety and of supervision. Off (one string compare) unless a variable is set.

    PIPELINE_CRASH_AT=after_rename        # die (os._exit 99) the first time that point is reached
    PIPELINE_CRASH_AT=after_response:25   # die the 25th time
    PIPELINE_FAULT_AT=row:3               # raise InjectedFault (a RuntimeError) at the 3rd row

Crash points: after_response (answer in hand, not journaled), mid_journal_line (half a line
written), after_part_write (part file written and fsynced, not renamed), after_rename (renamed, no
commit record yet), after_upgrade (an older part rewritten in the current columns, its new
commit record not yet written), after_seal (a folder's journal file sealed into its shard's folder, not yet
compacted), mid_compaction (a compact file written, the pieces it absorbed not yet removed); batch mode: batch_after_upload (a file uploaded, its id not written down),
batch_after_create (a batch created, its id not written down), batch_after_poll (a status written
down), batch_after_download (an ended batch's lines downloaded, nothing journaled). Fault points stand for a bug: row (inside one row's processing, after its
request is built), commit (a shard commit, before its part file is written), produce (the
producer, after reading a shard).
"""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["crash_point", "fault_point", "InjectedFault", "POINTS", "FAULT_POINTS"]

POINTS = ("after_response", "mid_journal_line", "after_part_write", "after_rename", "after_upgrade", "after_seal",
          "mid_compaction",
          "batch_after_upload", "batch_after_create", "batch_after_poll", "batch_after_download")
FAULT_POINTS = ("row", "commit", "produce")
EXIT_CODE = 99


def _armed(variable: str) -> tuple[str, int]:
    name, _, nth = os.environ.get(variable, "").partition(":")
    return name, int(nth) if nth else 1


_name, _left = _armed("PIPELINE_CRASH_AT")
_fault, _fault_left = _armed("PIPELINE_FAULT_AT")


class InjectedFault(RuntimeError):
    """Raised by an armed fault point: an exception the pipeline did not plan for."""


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


def fault_point(point: str) -> None:
    """Raise InjectedFault here if armed for this point and this is the chosen hit (only that hit)."""
    global _fault_left
    if _fault != point:
        return
    _fault_left -= 1
    if _fault_left == 0:
        raise InjectedFault(f"injected fault at {point} (PIPELINE_FAULT_AT)")
