"""What the person running a job chose besides the job file: the CLI's flags, the API's keywords."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunOptions"]


@dataclass(frozen=True)
class RunOptions:
    retry_failed: frozenset[str] | None = None  # None: no retry; empty set: every failed kind
    restart: bool = False  # forget the checkpoint (and the part files made from it)
    progress: bool | None = None  # None: a bar when stderr is a terminal
