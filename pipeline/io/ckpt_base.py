"""What every checkpoint does, whichever backend keeps it: the interface, and the part both share.

A checkpoint is what a job has done, kept beside the output and read without sending anything. Two
backends fill the interface (pipeline.io.checkpoint picks one):

  operation                 FolderCheckpoint (a POSIX folder)   BucketCheckpoint (an fsspec URL)
  `locked` (one run)        flock on `lock`                     a lease object (pipeline.io.ownership)
  `shard_lock` (Ray)        flock per shard                     the lease's fence in every worker
  `journal`                 appended JSON lines per shard       one segment object per shard per flush
  `journal_lines`           sealed pieces + the appended file   compact file + segments (pipeline.io.segments)
  `compact`                 after a commit: one zstd file       the same
  `record_commit`           a line of commits.jsonl (flock)     a create-only object per shard and generation
  history, errors, ledger   lines appended to a file            one create-only object per record

Shared here, through the backend's store: the job's request shape (`job.json`), the plan
(`plan.json`), the last run's summary (`last_run.json`), --restart, and the place of an in-memory
manifest (always a local folder: the manifest readers read local files). Callers use these methods,
never a path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..errors import JobError
from ..records import CommitRecord
from .journal import Journal
from .ledger import Events, Ledger
from .manifest import Plan, load_plan_dict
from .ownership import Fence
from .storage import PartStore
from .store import LocalStore, Store
from .writer import remove_parts

if TYPE_CHECKING:
    from .frames import Frame

__all__ = ["Checkpoint", "parse_commit_lines", "dumps", "JOB", "PLAN", "SUMMARY", "MANIFEST", "JOURNAL",
           "BATCH_FILES"]

JOB, PLAN, SUMMARY, MANIFEST = "job.json", "plan.json", "last_run.json", "manifest.parquet"
JOURNAL, BATCH_FILES = "journal", "batches"


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1, default=str).encode()


def parse_commit_lines(lines: list[bytes]) -> dict[int, CommitRecord]:
    """The latest record per shard, from records in the order they were made."""
    out: dict[int, CommitRecord] = {}
    for line in lines:
        if line.strip():
            try:
                rec = CommitRecord.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn line (power cut) with a later append glued on: that shard is re-committed from its journal
            out[rec.shard] = rec
    return out


class Checkpoint:
    """The checkpoint's operations. `fence` is called before this process changes anything a run
    owns (a folder's is always open; a bucket's is the lease's); `took_over` names the run whose
    lock this one took over (for a note); `bound` says what a kill -9 costs on resume."""

    bound = "only the rows in flight"
    forget: tuple[str, ...] = ()  # what --restart removes besides the shared files ...
    forget_folders: tuple[str, ...] = (JOURNAL, BATCH_FILES)  # ... and folders

    def __init__(self, store: Store, manifest_folder: Path) -> None:
        self.store = store
        self.manifests = LocalStore(manifest_folder)
        self.manifest_path = manifest_folder / MANIFEST  # an in-memory manifest's file (the job's [input] path)
        self.fence = Fence.always()
        self.took_over: str | None = None

    def __str__(self) -> str:
        return str(self.store)

    def where(self, name: str) -> str:
        return self.store.where(name)

    # -- what each backend does its own way ----------------------------------------------

    def locked(self, job_name: str) -> contextlib.AbstractContextManager[None]:
        """One run per job: LockedError (exit 75) when another holds it."""
        raise NotImplementedError

    def shard_lock(self, shard: int) -> contextlib.AbstractAsyncContextManager[None]:
        """One writer per shard (the Ray engine), even while a killed driver's task is ending."""
        raise NotImplementedError

    def journal(self, on_failure: Callable[[OSError], None] | None = None) -> Journal:
        """The journal that answers go to as they arrive."""
        raise NotImplementedError

    def journal_lines(self, shard: int, schema: pa.Schema, *, repair: bool = False) -> pa.Table:
        """Every result of a shard in the order written (superseded ones too); `repair`: cut a torn
        tail first (a folder's, only while holding the job's lock)."""
        raise NotImplementedError

    def compact(self, shard: int) -> None:
        """After the shard's commit: its journal into one compressed file (pipeline.io.segments)."""
        raise NotImplementedError

    def loose(self) -> set[int]:
        """Shards whose journal is not one compact file (in one listing): a run killed between a
        commit and its compaction leaves one, which the next run compacts."""
        raise NotImplementedError

    def commits(self) -> dict[int, CommitRecord]:
        """The latest commit record per shard (a folder's torn tail cut: under the job's lock)."""
        raise NotImplementedError

    def peek_commits(self) -> dict[int, CommitRecord]:
        """The same, read only: no lock taken, nothing repaired (status, a dry run, the report)."""
        raise NotImplementedError

    def record_commit(self, record: CommitRecord) -> None:
        raise NotImplementedError

    def events(self, name: str) -> Events:
        """An append-only log: "runs" (every run's summary), "errors" (tracebacks), "ledger"."""
        raise NotImplementedError

    def log_error(self, text: str) -> None:
        """A bug's traceback (nothing is rebuilt from it)."""
        raise NotImplementedError

    @property
    def errors_where(self) -> str:
        raise NotImplementedError

    # -- the job's identity --------------------------------------------------------------

    def saved_job(self) -> bytes | None:
        """The job's record, as a run got as far as recording it (None: none did; see `forget_job`)."""
        return self.store.read(JOB)

    def forget_job(self) -> None:
        """A first run refused before anything was sent leaves no record of the job."""
        self.store.remove(JOB)

    def check_job(self, shape: dict[str, Any], shard_rows: int, raw: bytes | None) -> None:
        """Refuse to mix answers made with a different request shape (exit 2 unless --restart).
        `raw`: the record `saved_job` read (read once: in a bucket each read is a request)."""
        saved = self._parsed(JOB, raw)
        record = {"shape": shape, "shard_rows": shard_rows}
        if saved is None:
            self.store.write(JOB, dumps(record))
            return
        changed = sorted(k for k in set(shape) | set(saved.get("shape", {})) if shape.get(k) != saved["shape"].get(k))
        if saved.get("shard_rows") != shard_rows:
            changed.append("[run] shard_rows")
        if changed:
            raise JobError(
                f"the job changed since its checkpoint was made ({', '.join(changed)}); answers would mix; "
                f"revert the change or run again with --restart to start over"
            )

    def reset(self, output: PartStore) -> None:
        """--restart: forget every answer and remove the part files made from them (and batch
        mode's ledger: its batches are forgotten). An in-memory manifest stays: the run rewrites it."""
        for name in (JOB, PLAN, SUMMARY, *self.forget):
            self.store.remove(name)
        for name in self.forget_folders:
            self.store.child(name).clear()
        remove_parts(output)

    def save_manifest(self, frame: Frame) -> None:
        """An in-memory manifest as `manifest_path`, rewritten only when its content changed."""
        frame.store(self.manifests, MANIFEST)

    # -- the plan ------------------------------------------------------------------------

    def load_plan(self) -> Plan | None:
        data = self._read_json(PLAN)
        return load_plan_dict(data) if data else None

    def save_plan(self, plan: Plan) -> None:
        self.store.write(PLAN, dumps(plan.to_dict()))

    def _read_json(self, name: str) -> Any:
        return self._parsed(name, self.store.read(name))

    def _parsed(self, name: str, raw: bytes | None) -> Any:
        try:
            return None if raw is None else json.loads(raw)
        except ValueError:
            raise JobError(f"checkpoint file {self.store.where(name)} is damaged; run with --restart to start over") from None

    # -- summaries -----------------------------------------------------------------------

    @property
    def summary_where(self) -> str:
        return self.store.where(SUMMARY)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """last_run.json, and the same as a record of the history (a torn one is skipped by `history`)."""
        self.store.write(SUMMARY, dumps(summary))
        self.events("runs").append(json.dumps(summary, ensure_ascii=False, default=str).encode())

    def last_summary(self) -> dict[str, Any] | None:
        return self._read_json(SUMMARY)

    def history(self) -> list[dict[str, Any]]:
        """Every run's summary, oldest first (runs before the history was kept: the last one only)."""
        runs = []
        for line in self.events("runs").entries():
            with contextlib.suppress(ValueError):
                runs.append(json.loads(line))
        if not runs:
            last = self.last_summary()
            return [last] if last else []
        return runs

    def ledger(self) -> Ledger:
        """Batch mode's record of its files and batches."""
        return Ledger(self.events("ledger"), self.store.child(BATCH_FILES))

