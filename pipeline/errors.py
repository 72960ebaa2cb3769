"""The pipeline's errors: one root, a small tree.

    PipelineError
    ├── JobError            bad job file, bad flag, changed job: exit 2 before anything is sent
    ├── LockedError         another run of the same job holds the lock: exit 75
    ├── RowError            one row failed; becomes an error row, the run goes on
    │   ├── InputError      kind "input": missing/unreadable/refused image, bad template
    │   └── RequestError    an attempt failed; its `kind` is an ErrorKind (below): the retry
    │                       policy, the breaker, the status report and the README read the enum
    ├── StopJob             sending more is pointless (quota, auth, endpoint down, budget):
    │                       commit what arrived and exit 3, resumable
    └── LocalFailure        this machine failed the run: disk full, output unwritable, an
                            unexpected exception in shared machinery (journal, commit,
                            storage): commit what can be, exit 4, resumable

Foreign errors (socket and TLS errors, the HTTP response reader's ResponseCut/MalformedResponse,
aiohttp's, timeouts, HTTP statuses) become `RequestError` in exactly one place,
`pipeline.net.client.translate`; nothing else matches on foreign types or on error text. Storage
failures (fsspec backends) become `JobError` in one place, `pipeline.io.storage`.
"""

from __future__ import annotations

import errno
from enum import Enum

__all__ = [
    "PipelineError",
    "JobError",
    "LockedError",
    "RowError",
    "InputError",
    "RequestError",
    "StopJob",
    "LocalFailure",
    "local_failure",
    "ErrorKind",
    "ERROR_KINDS",
    "error_kinds_markdown",
]

class ErrorKind(str, Enum):
    """Why a row failed: its `error_kind` column. Each kind says whether another attempt may help
    (the retry policy reads it), whether it applies to every row and so stops the run, and
    whether it tells of the endpoint's health (the breaker counts those). The README's table of
    kinds is made from these docs."""

    doc: str
    retryable: bool
    stops: bool
    endpoint_fault: bool

    # value, what it means, retryable, stops the run, an endpoint fault
    INPUT = ("input", "the row cannot be sent: its image or prompt is missing, refused or broken")
    RATE_LIMIT = ("rate_limit", "HTTP 429 that clears by itself; the whole pool slows down", True)
    QUOTA = ("quota", "no credit left (insufficient_quota, billing limits): the run stops, exit 3", False, True)
    AUTH = ("auth", "the key was refused (401/403), or a proxy refused the run (407, 403): the run stops, exit 3", False, True)
    BAD_REQUEST = ("bad_request", "the provider refused this row (400, 404, 422, a redirect): not retried")
    SERVER = ("server", "5xx or 409", True, False, True)
    TIMEOUT = ("timeout", "no answer within timeout_s (or 408)", True, False, True)
    CONNECTION = ("connection", "refused, reset or cut connections", True, False, True)
    INVALID_RESPONSE = ("invalid_response", "a 200 that is not a usable answer (not JSON, no choices, over max_response_mb)",
                        True, False, True)
    TRUNCATED = ("truncated", "cut off by max_tokens before the answer began (finish_reason length)")
    REFUSAL = ("refusal", "the model refused (its words are the `error`), or a content filter withheld the answer: "
               "paid, and final")
    INVALID_OUTPUT = ("invalid_output", "the answer did not follow the [labels] schema after max_invalid_retries")
    INTERNAL = ("internal", "an exception the pipeline did not plan for (a bug); traceback in the checkpoint's errors.log")

    def __new__(cls, value: str, doc: str, retryable: bool = False, stops: bool = False,
                endpoint_fault: bool = False) -> "ErrorKind":
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        member.retryable = retryable
        member.stops = stops
        member.endpoint_fault = endpoint_fault
        return member

    def __str__(self) -> str:
        return self.value


ERROR_KINDS = tuple(k.value for k in ErrorKind)


def error_kinds_markdown() -> str:
    """The README's table of kinds (tests/test_layout.py keeps it in step)."""
    rows = ["| `error_kind` | what it means | retried |", "|---|---|---|"]
    for k in ErrorKind:
        retried = "stops the run" if k.stops else "yes" if k.retryable else "no"
        rows.append(f"| `{k.value}` | {k.doc} | {retried} |")
    return "\n".join(rows) + "\n"


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class JobError(PipelineError):
    """The job file, a flag or the checkpoint's record of the job is not usable (exit 2)."""


class LockedError(PipelineError):
    """Another live process runs this job (exit 75, EX_TEMPFAIL: try again later)."""


class RowError(PipelineError):
    """One row failed. `kind` is one of ERROR_KINDS; `message` never holds the API key."""

    kind = "input"

    def __init__(self, message: str, *, kind: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.status = status
        self.message = message

    def describe(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


class InputError(RowError):
    """The row cannot be sent: its image or prompt is missing, refused or broken."""

    kind = "input"


class RequestError(RowError):
    """An attempt at the endpoint failed.

    `should_retry` is the server's `x-should-retry` verdict (None when absent);
    `headers` are the response headers, lower-cased, for the retry policy and the limiter;
    `raw` keeps a failed answer (e.g. an invalid label) so it is not lost.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status: int | None = None,
        should_retry: bool | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
        result: object | None = None,
    ) -> None:
        super().__init__(message, kind=kind, status=status)
        self.code = code  # the provider's error code or type, e.g. "insufficient_quota"
        self.should_retry = should_retry
        self.headers = headers or {}
        self.result = result


class StopJob(PipelineError):
    """Stop sending: the cause applies to every remaining row. The run commits and exits 3."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class LocalFailure(PipelineError):
    """The run cannot go on because of this machine, not the provider or a row: ENOSPC, an
    unwritable output, an exception in shared machinery. The run stops sending, commits what it
    can and exits 4; nothing journaled is lost, and the next run continues once the cause is fixed.
    `kind` is "disk_full", "io" or "internal"."""

    def __init__(self, message: str, *, kind: str = "internal") -> None:
        super().__init__(message)
        self.kind = kind


_FULL = (errno.ENOSPC, errno.EDQUOT)
_RESUME = "then run the same command again (every answer journaled so far is kept)"


def local_failure(exc: BaseException, doing: str) -> LocalFailure:
    """The one place a failure of this machine's side (an OSError, a bug in shared machinery)
    becomes a LocalFailure with a one-line message: what was being done, where, and the fix."""
    if isinstance(exc, LocalFailure):
        return exc
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in _FULL:
            return LocalFailure(f"{doing}: no space left on the device{where}; free some space, {_RESUME}", kind="disk_full")
        reason = exc.strerror or str(exc) or type(exc).__name__
        return LocalFailure(f"{doing}: {reason}{where}; fix that, {_RESUME}", kind="io")
    if isinstance(exc, PipelineError):  # e.g. a storage JobError mid-run: already one line with its fix
        return LocalFailure(f"{doing}: {exc}", kind="io")
    detail = " ".join(str(exc).split())[:300]
    return LocalFailure(f"{doing}: internal error ({type(exc).__name__}: {detail}); please report it, {_RESUME}",
                        kind="internal")
