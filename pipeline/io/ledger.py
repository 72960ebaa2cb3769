"""The batch ledger: what batch mode has done at the provider, durable before it is relied on.

    ledger = ckpt.ledger()
    path = ledger.write_file(name, data)    # the batch file, atomically, in the checkpoint
    data = ledger.read_file(path)           # ... and back, to upload it
    ledger.planned(name, rows, path)        # the batch file is written; its rows are spoken for
    ledger.uploaded(name, file_id)          # after POST /v1/files
    ledger.created(name, batch_id)          # after POST /v1/batches
    ledger.status(name, status, counts)     # a look at it
    ledger.collected(name)                  # its answers are journaled: it is over
    batches = ledger.batches()              # every batch, folded from the records, in order

One JSON record per event, durable before the step it records is built upon: in a folder
checkpoint a line of `<checkpoint>/batches.jsonl` (appended and fsynced), in a bucket one object
each (`<checkpoint>/ledger/`, numbered in order); the checkpoint gives the `Events` and the folder
of batch files. A crash between a provider call and its record is what resume must
allow for: a file uploaded but not recorded is uploaded again (files cost nothing), and a batch
created but not recorded is found again by its name in the batch's metadata, never created twice
(pipeline.engine.batch). A torn last line (a crash mid-append) is cut when the ledger is next read
(under the appenders' flock: only a dead writer's), so the next record starts on its own line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from .store import Store

__all__ = ["Ledger", "Batch", "Events", "TERMINAL"]

TERMINAL = ("completed", "failed", "expired", "cancelled")  # a batch in these states does no more work


@dataclass
class Batch:
    name: str  # unique: the job, a number and a digest of its rows; in the batch's metadata
    rows: list[tuple[int, str]]  # (shard, row id) of every request in it
    path: str  # the batch file, kept in the checkpoint until collected
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    cancel: bool = False
    collected: bool = False

    @property
    def active(self) -> bool:
        return not self.collected


class Events(Protocol):
    """An append-only log of records, durable when `append` returns, read back in order."""

    def append(self, data: bytes) -> None: ...
    def entries(self) -> list[bytes]: ...


class Ledger:
    def __init__(self, events: Events, files: Store) -> None:
        self.events = events  # the checkpoint's, as are its folder of batch files
        self.files = files
        self._folded: dict[str, Batch] | None = None  # read once; each append is folded in as written

    def _append(self, record: dict[str, Any]) -> None:
        self.events.append(json.dumps(record, ensure_ascii=False).encode())
        if self._folded is not None:
            _fold(self._folded, record)

    def write_file(self, name: str, data: bytes) -> str:
        """A batch file, written atomically before `planned` records it; returns its path."""
        self.files.write(name, data)
        return self.files.where(name)

    def read_file(self, path: str) -> bytes:
        """A batch file written by `write_file` (FileNotFoundError when it is gone)."""
        data = self.files.read(path.rsplit("/", 1)[-1])
        if data is None:
            raise FileNotFoundError(path)
        return data

    def planned(self, name: str, rows: list[tuple[int, str]], path: str) -> None:
        self._append({"event": "planned", "name": name, "rows": rows, "path": str(path)})

    def uploaded(self, name: str, file_id: str) -> None:
        self._append({"event": "uploaded", "name": name, "file_id": file_id})

    def created(self, name: str, batch_id: str) -> None:
        self._append({"event": "created", "name": name, "batch_id": batch_id})

    def status(self, name: str, status: str, counts: dict[str, int]) -> None:
        self._append({"event": "status", "name": name, "status": status, "counts": counts})

    def cancel_asked(self, name: str) -> None:
        self._append({"event": "cancel", "name": name})

    def collected(self, name: str) -> None:
        self._append({"event": "collected", "name": name})

    def batches(self) -> list[Batch]:
        """Every batch the job has planned, oldest first, with what is known of it. The file is read
        once; the ledger's own appends keep the fold current (one run holds the job's lock)."""
        if self._folded is None:
            self._folded = {}
            for line in self.events.entries():
                try:
                    _fold(self._folded, json.loads(line))
                except ValueError:
                    continue  # a torn last line: that step is done again
        return list(self._folded.values())

    def next_number(self) -> int:
        return len(self.batches()) + 1


def _fold(out: dict[str, Batch], rec: dict[str, Any]) -> None:
    """One record into the batches it describes."""
    name, event = rec.get("name"), rec.get("event")
    if event == "planned":
        out[str(name)] = Batch(str(name), [(int(s), str(i)) for s, i in rec["rows"]], rec["path"])
        return
    batch = out.get(str(name))
    if batch is None:
        return
    if event == "uploaded":
        batch.file_id = rec["file_id"]
    elif event == "created":
        batch.batch_id = rec["batch_id"]
    elif event == "status":
        batch.status, batch.counts = rec["status"], rec.get("counts") or {}
    elif event == "cancel":
        batch.cancel = True
    elif event == "collected":
        batch.collected = True
