"""A checkpoint in a POSIX folder: flock, appended journal files, commits.jsonl.

    <checkpoint>/lock            flock held by the running process (pid, host, start inside)
    <checkpoint>/job.json        the request shape the answers were made with
    <checkpoint>/plan.json       the manifest's shards (boundaries, digests, file size and mtime)
    <checkpoint>/journal/        shard-NNNNNN.jsonl: every result, appended as it arrives
                                 (pipeline.io.journal); shard-NNNNNN/: its sealed and compacted
                                 pieces (pipeline.io.segments); shard-NNNNNN.lock: the Ray task's flock
    <checkpoint>/commits.jsonl   one line per committed part file, written after its rename:
                                 the source of truth for what the output folder holds
    <checkpoint>/last_run.json   the last run's summary (counts, tokens, times, exit code)
    <checkpoint>/runs.jsonl      every run's summary, one line each (the report's history)
    <checkpoint>/errors.log      tracebacks of rows that met a bug (error_kind "internal")
    <checkpoint>/manifest.parquet  an in-memory manifest, stored (+ .digest; pipeline.io.frames)
    <checkpoint>/batches.jsonl   batch mode's ledger, and batches/ its batch files (pipeline.io.ledger)

Written through a LocalStore (pipeline.io.store: the one atomic write, the one durable append).
Every answer is written to the OS before the next request leaves (FileJournal.flush_before_send),
so a kill -9 costs only the rows in flight. The default checkpoint folder is
`<output's parent>/.pipeline/<job name>`, or, when the output is a URL, `<job file's folder>/.pipeline/<job name>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from ..crashpoints import crash_point
from ..errors import LockedError, local_failure
from ..records import CommitRecord
from .ckpt_base import JOURNAL, Checkpoint, parse_commit_lines
from .durable import durable_move
from .journal import FileJournal, journal_path, read_journal_table, shard_name
from .segments import Pieces, wants_compaction
from .store import LocalStore

__all__ = ["FolderCheckpoint", "LineLog"]

LOCK, COMMITS, ERRORS = "lock", "commits.jsonl", "errors.log"
EVENT_FILES = {"runs": "runs.jsonl", "ledger": "batches.jsonl", "errors": ERRORS}


class LineLog:
    """An append-only log as lines of one file (the durable append; `sync=False`: not fsynced).
    `repair`: appends hold the file's flock and a read cuts a torn last line under it (only a dead
    writer's), so the next record starts on its own line instead of gluing onto it and being lost
    (the batch ledger: a lost 'planned' would buy that batch's rows again)."""

    def __init__(self, store: LocalStore, name: str, sync: bool = True, repair: bool = False) -> None:
        self.store, self.name, self.sync, self.repair = store, name, sync, repair

    def append(self, data: bytes) -> None:
        self.store.append(self.name, data if data.endswith(b"\n") else data + b"\n", sync=self.sync,
                          exclusive=self.repair)

    def entries(self) -> list[bytes]:
        return (self.store.read_lines(self.name, repair=self.repair, exclusive=self.repair) or b"").splitlines()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderCheckpoint(Checkpoint):
    forget = (COMMITS, EVENT_FILES["runs"], EVENT_FILES["ledger"])

    def __init__(self, folder: Path) -> None:
        self.local = LocalStore(folder)
        super().__init__(self.local, folder)
        self.folder = folder
        self.journal_dir = folder / JOURNAL

    @contextmanager
    def locked(self, job_name: str) -> Iterator[None]:
        """One run per job. The kernel drops a flock when its process dies, so a lock left by a
        killed run is taken over without any guessing about stale pids."""
        made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # a refused first run removes them
        lock_path = self.folder / LOCK
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise local_failure(exc, "locking the job") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
                raise LockedError(f"job {job_name!r} is already running ({holder}); this run exits without sending") from None
            self._note_previous(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
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
                        lock_path.unlink()
                        for folder in made:  # deepest first; one that is not empty stays
                            folder.rmdir()
        finally:
            os.close(fd)  # releases the flock

    def _note_previous(self, previous: str) -> None:
        """A pid left in the lock file by a run that is gone: the lock was taken over from it."""
        if previous.startswith("pid "):
            try:
                old = int(previous.split()[1])
            except (IndexError, ValueError):
                return
            if old != os.getpid() and not _pid_alive(old):
                self.took_over = f"pid {old}, which is no longer running"

    @contextlib.asynccontextmanager
    async def shard_lock(self, shard: int) -> AsyncIterator[None]:
        """Waits (in a thread) until a process still holding the shard (a killed driver's task) is gone."""
        path = self.journal_dir / f"{shard_name(shard)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- answers -------------------------------------------------------------------------

    def journal(self, on_failure: Callable[[OSError], None] | None = None) -> FileJournal:
        return FileJournal(self.journal_dir, on_failure=on_failure)

    def _pieces(self, shard: int) -> Pieces:
        return Pieces(self.local.child(JOURNAL).child(shard_name(shard)))

    def journal_lines(self, shard: int, schema: pa.Schema, *, repair: bool = False) -> pa.Table:
        """The shard's compacted and sealed pieces, then its appended file's whole lines."""
        sealed = self._pieces(shard).read(schema)
        live = read_journal_table(self.journal_dir, shard, schema, repair=repair)
        return pa.concat_tables([sealed, live]) if sealed.num_rows else live

    def compact(self, shard: int) -> None:
        """The appended file is sealed into the shard's folder (renamed: the journal has closed
        it), then the folder compacted."""
        pieces, live = self._pieces(shard), journal_path(self.journal_dir, shard)
        try:
            size = live.stat().st_size
        except FileNotFoundError:
            size = None
        if size == 0:
            live.unlink()
        elif size is not None:
            folder = self.journal_dir / shard_name(shard)
            folder.mkdir(exist_ok=True)
            durable_move(live, folder / pieces.segment_name("local"))
            crash_point("after_seal")
        pieces.compact()

    def loose(self) -> set[int]:
        found: set[int] = set()
        try:
            entries = list(os.scandir(self.journal_dir))
        except FileNotFoundError:
            return found
        for e in entries:
            if e.name.startswith("shard-") and e.name.endswith(".jsonl"):
                found.add(int(e.name[6:12]))
            elif e.name.startswith("shard-") and e.is_dir() and wants_compaction(os.listdir(e.path)):
                found.add(int(e.name[6:12]))  # a sealed file not yet compacted, or beside the compact one
        return found

    # -- commits and logs ----------------------------------------------------------------

    def commits(self) -> dict[int, CommitRecord]:
        """Several processes may append at once (the Ray engine's workers): each append is one
        write under an exclusive flock, so a reader holding it sees whole lines, and a torn tail
        can only be a dead writer's, safe to cut."""
        return parse_commit_lines((self.local.read_lines(COMMITS, repair=True, exclusive=True) or b"").splitlines())

    def peek_commits(self) -> dict[int, CommitRecord]:
        return parse_commit_lines((self.local.read_lines(COMMITS) or b"").splitlines())

    def record_commit(self, record: CommitRecord) -> None:
        # under the flock: appends from several worker processes never interleave
        self.local.append(COMMITS, record.to_json() + b"\n", exclusive=True)

    def events(self, name: str) -> LineLog:
        return LineLog(self.local, EVENT_FILES[name], sync=name != "errors", repair=name == "ledger")

    def log_error(self, text: str) -> None:
        """Appended from the event loop, so not fsynced (nothing is rebuilt from it)."""
        self.events("errors").append(text.encode(errors="backslashreplace"))

    @property
    def errors_where(self) -> str:
        return str(self.folder / ERRORS)
