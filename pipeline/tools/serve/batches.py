"""The Batch API's files and batches, as the built-in endpoint keeps them. A batch's status follows
from the time since it was created, read whenever it is asked for (no background task):
`validating` for `batch_validating_s`, then `failed` (its file's errors, or `batch_outcome =
"failed"`) or `in_progress` for `batch_in_progress_s` (its lines done evenly, in file order), then
`expired` (`batch_outcome = "expired"`: only `batch_expire_fraction` of them done) or `finalizing`
for `batch_finalizing_s` and `completed`. A cancel makes it `cancelling` for `batch_cancelling_s`,
then `cancelled` with the lines done by the cancel. Its output and error files are composed once,
on the first read after it ended (`settle`), in a thread.

The time is the store's batch clock (`now`): the wall clock plus what POST /admin/batch_clock
{"advance_s": N} moved it forward, so a test makes a day-long batch end without waiting for it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ...config.serve import ServeOptions
from .batchfile import Request, answer_lines, jsonl, line_fault, read_input

__all__ = ["Batch", "BatchStore", "StoredFile", "ENDED", "WINDOW_S"]

ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
WINDOW_S = 24 * 3600  # the only completion_window, "24h"
_TOKEN_LIMIT = ("Enqueued token limit reached for this model in organization. Please try again once some in_progress "
                "batches have been completed.")


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}


@dataclass
class Batch:
    id: str
    opts: ServeOptions
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created: float
    requests: list[Request]
    errors: list[dict[str, Any]]  # any: the batch fails once validated
    faulted: list[bool]  # per request: a line fault fails it
    cancelled: float | None = None  # when a cancel arrived
    output_file_id: str | None = None
    error_file_id: str | None = None
    final_counts: dict[str, int] | None = None  # once settled
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def settled(self) -> bool:
        """Its files and final counts are made (a call, asked again under the lock: another task may have)."""
        return self.final_counts is not None

    @property
    def custom_ids(self) -> list[str]:
        return [r.custom_id for r in self.requests]

    def _ends(self) -> tuple[float, float, float]:
        """When validating, in_progress and finalizing end."""
        o = self.opts
        validated = self.created + o.batch_validating_s
        return validated, validated + o.batch_in_progress_s, validated + o.batch_in_progress_s + o.batch_finalizing_s

    def status(self, now: float) -> str:
        validated, processed, finalized = self._ends()
        if self.cancelled is not None:  # only ever set before it ended
            return "cancelling" if now < self.cancelled + self.opts.batch_cancelling_s else "cancelled"
        if self.errors:
            return "validating" if now < validated else "failed"
        if now < validated:
            return "validating"
        if now < processed:
            return "in_progress"
        if self.opts.batch_outcome == "expired":
            return "expired"
        return "finalizing" if now < finalized else "completed"

    def done_at(self, t: float) -> int:
        """How many requests (in file order) were done by time `t`."""
        validated, processed, _ = self._ends()
        n = len(self.requests)
        last = int(n * self.opts.batch_expire_fraction) if self.opts.batch_outcome == "expired" else n
        if self.errors or t <= validated:
            return 0
        if t >= processed:
            return last
        return min(last, int(n * (t - validated) / self.opts.batch_in_progress_s))

    def done(self) -> int:
        """How many requests its output and error files answer, once it ended."""
        return self.done_at(self.cancelled if self.cancelled is not None else float("inf"))

    def counts(self, status: str, now: float) -> dict[str, int]:
        if status in ("validating", "failed"):
            return {"total": 0, "completed": 0, "failed": 0}
        if self.final_counts is not None:
            return self.final_counts
        k = self.done_at(min(now, self.cancelled) if self.cancelled is not None else now)
        failed = sum(self.faulted[:k])
        return {"total": len(self.requests), "completed": k - failed, "failed": failed}

    def to_dict(self, now: float) -> dict[str, Any]:
        """The Batch object, as OpenAI's is at `now`."""
        status = self.status(now)
        validated, processed, finalized = self._ends()
        cancelled = self.cancelled
        started = not self.errors and (cancelled is None or cancelled >= validated) and status != "validating"
        finalizing = status in ("finalizing", "completed") or (cancelled is not None and cancelled >= processed)
        settled = status in ENDED and self.final_counts is not None

        def at(t: float | None, when: bool) -> int | None:
            return int(t) if when and t is not None else None

        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if status == "failed" else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": status,
            "output_file_id": self.output_file_id if settled else None,
            "error_file_id": self.error_file_id if settled else None,
            "created_at": int(self.created), "in_progress_at": at(validated, started),
            "expires_at": int(self.created + WINDOW_S), "finalizing_at": at(processed, finalizing),
            "completed_at": at(finalized, status == "completed"), "failed_at": at(validated, status == "failed"),
            "expired_at": at(processed, status == "expired"), "cancelling_at": at(cancelled, cancelled is not None),
            "cancelled_at": at((cancelled or 0) + self.opts.batch_cancelling_s, status == "cancelled"),
            "request_counts": self.counts(status, now), "metadata": self.metadata,
        }


class BatchStore:
    """Every file uploaded or produced and every batch, until POST /stats/reset."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self.files_uploaded = 0
        self.batches_created = 0
        self.advanced = 0.0  # seconds the batch clock was moved ahead of the wall clock

    def now(self) -> float:
        """The batch clock: what every status, count and timestamp is read at."""
        return time.time() + self.advanced

    def advance(self, seconds: float) -> float:
        """Move the batch clock forward (never back: a batch's status never goes back either)."""
        self.advanced += max(0.0, seconds)
        return self.now()

    def add_file(self, filename: str, purpose: str, data: bytes, *, uploaded: bool = True) -> StoredFile:
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data, int(self.now()))
        self.files[stored.id] = stored
        self.files_uploaded += uploaded
        return stored

    def create(self, source: StoredFile, endpoint: str, completion_window: str,
               metadata: dict[str, Any] | None) -> Batch:
        requests, errors = read_input(source.data, endpoint, self.opts)
        if not errors and self.opts.batch_outcome == "failed":
            errors = [{"code": "token_limit_exceeded", "message": _TOKEN_LIMIT, "param": None, "line": None}]
        batch = Batch(f"batch_{uuid.uuid4().hex}", self.opts, source.id, endpoint, completion_window, metadata,
                      self.now(), requests, errors, [line_fault(r.prompt, self.opts) is not None for r in requests])
        self.batches[batch.id] = batch
        self.batches_created += 1
        return batch

    async def settle(self, batch: Batch, now: float) -> None:
        """Once it ended: its output and error files (none when empty, as OpenAI's), its final counts."""
        if batch.status(now) not in ENDED or batch.settled():
            return
        async with batch.lock:
            if batch.settled():
                return
            done, expired = batch.done(), batch.status(now) == "expired"
            output, errors = await asyncio.to_thread(answer_lines, batch.requests, self.opts, batch.id,
                                                     done=done, expired=expired)
            if output:
                batch.output_file_id = self.add_file(f"{batch.id}_output.jsonl", "batch_output", jsonl(output),
                                                     uploaded=False).id
            if errors:
                batch.error_file_id = self.add_file(f"{batch.id}_error.jsonl", "batch_output", jsonl(errors),
                                                    uploaded=False).id
            failed = len(errors)
            batch.final_counts = {"total": len(batch.requests), "completed": len(output), "failed": failed}

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "files_uploaded": self.files_uploaded,
            "batches_created": self.batches_created,
            "batches": [{"id": b.id, "status": b.status(now), "custom_ids": b.custom_ids} for b in self.batches.values()],
        }
