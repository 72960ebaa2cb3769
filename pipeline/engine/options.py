"""What the person running a job chose besides the job file: the CLI's flags, the API's keywords."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import ERROR_KINDS, JobError

__all__ = ["RunOptions", "retry_kinds"]


@dataclass(frozen=True)
class RunOptions:
    retry_failed: frozenset[str] | None = None  # None: no retry; empty set: every failed kind
    restart: bool = False  # forget the checkpoint (and the part files made from it)
    progress: bool | None = None  # None: a bar when stderr is a terminal
    report: bool = False  # write the report at the end (also [output] report = true)
    cancel_batches: bool = False  # batch mode: cancel the running batches, collect what they did
    wait: bool | None = None  # batch mode: None: the job's [run] wait; False: submit, collect, exit 5
    no_cache: bool = False  # [run] cache: send every row (fresh answers are still stored)
    log_format: str | None = None  # "text" or "json"; None: PIPELINE_LOG_FORMAT, else text


def retry_kinds(value: bool | str | Iterable[str] | None, flag: str = "--retry-failed") -> frozenset[str] | None:
    """--retry-failed's value (or the API's retry_failed=): None or False: no retry; True or "":
    every failed kind; "a,b" or ["a", "b"]: those kinds, each checked."""
    if value is None or value is False:
        return None
    if value is True:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else list(value)
    kinds = frozenset(str(k).strip() for k in items if str(k).strip())
    unknown = kinds - set(ERROR_KINDS)
    if unknown:
        raise JobError(f"{flag}: unknown kind {sorted(unknown)[0]!r}; kinds: {', '.join(ERROR_KINDS)}")
    return kinds
