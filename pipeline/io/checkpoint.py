"""The checkpoint: what a job has done, kept beside the output, read without sending anything.

    <checkpoint>/lock            flock held by the running process (pid, host, start inside)
    <checkpoint>/job.json        the request shape the answers were made with
    <checkpoint>/plan.json       the manifest's shards (boundaries, digests, file size and mtime)
    <checkpoint>/journal/        shard-NNNNNN.jsonl: every result, appended as it arrives
                                 (pipeline.io.journal); shard-NNNNNN.lock: the Ray task's flock
    <checkpoint>/commits.jsonl   one line per committed part file, written after its rename:
                                 the source of truth for what the output folder holds
    <checkpoint>/last_run.json   the last run's summary (counts, tokens, times, exit code)
    <checkpoint>/runs.jsonl      every run's summary, one line each (the report's history)
    <checkpoint>/errors.log      tracebacks of rows that met a bug (error_kind "internal")
    <checkpoint>/manifest.parquet  an in-memory manifest, stored (+ .digest; pipeline.io.frames)
    <checkpoint>/batches.jsonl   batch mode's ledger, and batches/ its batch files (pipeline.io.ledger)

`Checkpoint` names every one of these paths: no other module builds one. Its files are written
through its store, a LocalStore (pipeline.io.store: the one atomic write, the one durable append).
The default checkpoint folder is `<output's parent>/.pipeline/<job name>`, or, when the output is
a URL, `<job file's folder>/.pipeline/<job name>`: the checkpoint is a POSIX path, for its
appends, fsync and flock, which an object store lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..errors import JobError, LockedError, local_failure
from ..records import DETAIL_TOKEN_COLUMNS, TOKEN_COLUMNS, CommitRecord
from .durable import atomic_write
from .journal import Journal, read_journal_table
from .ledger import Ledger
from .manifest import Plan, load_plan_dict
from .storage import PartStore
from .store import LocalStore
from .writer import remove_parts

if TYPE_CHECKING:
    from .frames import Frame

__all__ = ["Checkpoint", "write_json_atomic", "parse_commits", "dataset_state"]

JOB, PLAN, COMMITS, SUMMARY, HISTORY = "job.json", "plan.json", "commits.jsonl", "last_run.json", "runs.jsonl"
LOCK, JOURNAL, ERRORS, MANIFEST = "lock", "journal", "errors.log", "manifest.parquet"
LEDGER, BATCH_FILES = "batches.jsonl", "batches"


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1, default=str).encode()


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, _json(data))


def parse_commits(data: bytes) -> dict[int, CommitRecord]:
    """The latest record per shard from commits.jsonl's whole lines (read-only: see commits())."""
    out: dict[int, CommitRecord] = {}
    for line in data.splitlines():
        if line.strip():
            try:
                rec = CommitRecord.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn line (power cut) with a later append glued on: that shard is re-committed from its journal
            out[rec.shard] = rec
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Checkpoint:
    """The checkpoint's operations: the lock (`locked`, `shard_lock`), answers (`journal`,
    `journal_lines`), commits (`record_commit`, `commits`), the job, plan, summaries, errors log,
    stored manifest and batch ledger. Callers use these, never a path (the Path attributes are
    for messages and tests). A checkpoint in a bucket is a second implementation of these methods
    over an FsspecStore: a lease object for the locks, immutable journal segments, create-only
    commit objects."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.store = LocalStore(folder)
        self.journal_dir = folder / JOURNAL
        self.commits_path = folder / COMMITS
        self.plan_path = folder / PLAN
        self.job_path = folder / JOB
        self.summary_path = folder / SUMMARY
        self.history_path = folder / HISTORY
        self.lock_path = folder / LOCK
        self.errors_path = folder / ERRORS
        self.manifest_path = folder / MANIFEST  # an in-memory manifest's file (the job's [input] path)
        self.took_over_from: int | None = None

    @contextmanager
    def locked(self, job_name: str) -> Iterator[None]:
        """One run per job. The kernel drops a flock when its process dies, so a lock left by a
        killed run is taken over without any guessing about stale pids."""
        made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # a refused first run removes them
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise local_failure(exc, "locking the job") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
                raise LockedError(f"job {job_name!r} is already running ({holder}); this run exits without sending") from None
            previous = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            if previous.startswith("pid "):
                try:
                    old = int(previous.split()[1])
                except (IndexError, ValueError):
                    old = None
                if old is not None and old != os.getpid() and not _pid_alive(old):
                    self.took_over_from = old
            stamp = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, stamp.encode(), 0)
            except OSError as exc:  # the flock is held all the same; the stamp only informs
                raise local_failure(exc, "locking the job") from None
            try:
                yield
            finally:  # an exit, clean or refused (a bad job, exit 2), leaves no pid behind; a killed run's stays
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                if made and [p.name for p in self.folder.iterdir()] == [LOCK]:
                    with contextlib.suppress(OSError):  # nothing was written but the lock: nothing to keep
                        self.lock_path.unlink()
                        for folder in made:  # deepest first; one that is not empty stays
                            folder.rmdir()
        finally:
            os.close(fd)  # releases the flock

    @contextlib.asynccontextmanager
    async def shard_lock(self, shard: int) -> AsyncIterator[None]:
        """One process per shard (the Ray engine): a task of a killed driver may still be dying when
        the next run starts. Waits (in a thread) until that process is gone."""
        path = self.journal_dir / f"shard-{shard:06d}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- the job's identity --------------------------------------------------------------

    def has_job(self) -> bool:
        """Whether a run got as far as recording the job (see `forget_job`)."""
        return self.job_path.exists()

    def forget_job(self) -> None:
        """A first run refused before anything was sent leaves no record of the job."""
        self.store.remove(JOB)

    def check_job(self, shape: dict[str, Any], shard_rows: int) -> None:
        """Refuse to mix answers made with a different request shape (exit 2 unless --restart)."""
        saved = self._read_json(JOB)
        record = {"shape": shape, "shard_rows": shard_rows}
        if saved is None:
            self.store.write(JOB, _json(record))
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
        for name in (JOB, PLAN, COMMITS, SUMMARY, HISTORY, LEDGER):
            self.store.remove(name)
        for name in (JOURNAL, BATCH_FILES):
            self.store.child(name).clear()
        remove_parts(output)

    def save_manifest(self, frame: Frame) -> None:
        """An in-memory manifest as `manifest_path`, rewritten only when its content changed."""
        frame.store(self.store, MANIFEST)

    # -- the plan ------------------------------------------------------------------------

    def load_plan(self) -> Plan | None:
        data = self._read_json(PLAN)
        return load_plan_dict(data) if data else None

    def save_plan(self, plan: Plan) -> None:
        self.store.write(PLAN, _json(plan.to_dict()))

    def _read_json(self, name: str) -> Any:
        raw = self.store.read(name)
        try:
            return None if raw is None else json.loads(raw)
        except ValueError:
            raise JobError(f"checkpoint file {self.store.where(name)} is damaged; run with --restart to start over") from None

    # -- answers -------------------------------------------------------------------------

    def journal(self, on_failure: Callable[[OSError], None] | None = None) -> Journal:
        """The journal that answers are appended to as they arrive."""
        return Journal(self.journal_dir, on_failure=on_failure)

    def journal_lines(self, shard: int, schema: pa.Schema, *, repair: bool = False) -> pa.Table:
        """Every whole journal line of a shard (superseded ones too); `repair`: cut a torn tail
        from the file first (only while holding the job's lock)."""
        return read_journal_table(self.journal_dir, shard, schema, repair=repair)

    def log_error(self, text: str) -> None:
        """A bug's traceback appended to errors.log (`errors_path`); from the event loop, so not
        fsynced (nothing is rebuilt from it)."""
        self.store.append(ERRORS, text.encode(errors="backslashreplace"), sync=False)

    def ledger(self) -> Ledger:
        """Batch mode's record of its files and batches."""
        return Ledger(self.store, LEDGER, BATCH_FILES)

    # -- commits -------------------------------------------------------------------------

    def commits(self) -> dict[int, CommitRecord]:
        """Latest commit record per shard; a torn last line (crash mid-append) is cut off.

        Several processes may append at once (the Ray engine's workers): each append is one write
        under an exclusive flock, so a reader holding the lock sees whole lines, and a torn tail
        can only be a dead writer's, safe to cut.
        """
        return parse_commits(self.store.read_lines(COMMITS, repair=True, exclusive=True) or b"")

    def peek_commits(self) -> dict[int, CommitRecord]:
        """The same, read only: no lock taken, nothing repaired (a dry run, beside a running job)."""
        return parse_commits(self.store.read_lines(COMMITS) or b"")

    def record_commit(self, record: CommitRecord) -> None:
        # under the flock: appends from several worker processes never interleave
        self.store.append(COMMITS, record.to_json() + b"\n", exclusive=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """last_run.json, and the same as one line appended to runs.jsonl (a torn last line, from a
        crash mid-append, is skipped by `history`)."""
        self.store.write(SUMMARY, _json(summary))
        self.store.append(HISTORY, json.dumps(summary, ensure_ascii=False, default=str).encode() + b"\n")

    def last_summary(self) -> dict[str, Any] | None:
        return self._read_json(SUMMARY)

    def history(self) -> list[dict[str, Any]]:
        """Every run's summary, oldest first (runs before the history was kept: the last one only)."""
        data = self.store.read_lines(HISTORY)
        if data is None:
            last = self.last_summary()
            return [last] if last else []
        runs = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                runs.append(json.loads(line))
        return runs


def dataset_state(plan: Plan, commits: dict[int, CommitRecord]) -> dict[str, Any]:
    """Counts over the whole output, from the commit records alone (no answer is read)."""
    by_kind: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    ok = rows = 0
    spend = 0.0
    for rec in commits.values():
        spend += rec.spend or 0.0
        ok += rec.ok
        rows += rec.rows
        by_kind.update(rec.failed)
        tokens.update(rec.tokens)
    return {
        "rows": plan.total_rows,
        "ok": ok,
        "failed": sum(by_kind.values()),
        "failed_by_kind": dict(by_kind),
        "pending": max(0, plan.total_rows - rows),
        # A usage detail no record holds is None: no answer reported it (or every part predates it).
        "tokens": {k: tokens.get(k, None if k in DETAIL_TOKEN_COLUMNS else 0) for k in TOKEN_COLUMNS},
        "spend": round(spend, 6),  # from [pricing]; 0 without it
    }
