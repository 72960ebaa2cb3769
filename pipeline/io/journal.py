"""The journal: every result appended as it arrives, one JSON line per row, per shard.

`Journal` is what the engine writes answers through; a folder checkpoint's is `FileJournal`
(here), a bucket checkpoint's `SegmentJournal` (pipeline.io.segments: one object per shard per
flush). Both are read back as JSON lines by `parse_lines`, later lines winning.

Lines are written with one `write` straight to the file (in the OS's hands: a killed process
loses nothing written) and fsynced as a group every `SYNC_INTERVAL_S` (a power cut loses at most
that much): the durable append of pipeline.io.durable, its descriptors kept open and its fsyncs
gathered. The checkpoint (pipeline.io.checkpoint) says where the journal folder is. The journal is the source of truth for answers: part files are rebuilt from it, so it
is kept after a shard is committed, compacted (pipeline.io.segments). A torn last line (a crash
mid-write) is cut off on reading.
Later lines win: a retried row's new result replaces its old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Callable, NoReturn, Protocol

import orjson
import pyarrow as pa
import pyarrow.json as pajson

from ..crashpoints import crash_point
from ..records import ResultRow
from .durable import open_append, read_lines, write_all

__all__ = ["Journal", "FileJournal", "read_journal_table", "parse_lines", "latest_per_id", "journal_path", "shard_name",
           "SYNC_INTERVAL_S"]

SYNC_INTERVAL_S = 0.2


class Journal(Protocol):
    """Where answers go as they arrive. Failure contract (both kinds): the first failure is kept
    in `failure` (an OSError naming where) and handed to `on_failure`; every later call raises it."""

    failure: OSError | None

    def append(self, shard: int, row: ResultRow) -> None: ...
    def flush_before_send(self) -> None: ...  # before each request: what must be stored before one leaves
    def flush(self) -> None: ...
    def sync(self) -> None: ...  # everything appended is durable when it returns
    def sync_forever(self) -> Coroutine[Any, Any, None]: ...  # the run's background task
    async def close_shard(self, shard: int) -> None: ...  # the shard's lines durable, before its commit
    def close(self) -> None: ...


def shard_name(shard: int) -> str:
    """A shard's name in a checkpoint (its journal file, its folder of pieces, its lock), in both backends."""
    return f"shard-{shard:06d}"


def journal_path(folder: Path, shard: int) -> Path:
    return folder / f"{shard_name(shard)}.jsonl"


def read_journal_table(folder: Path, shard: int, schema: pa.Schema, *, repair: bool = False) -> pa.Table:
    """Every whole line of a shard's journal file as an Arrow table (superseded lines included);
    `repair`: the torn tail a crash left is cut from the file too (by its one writer only)."""
    return parse_lines(read_lines(journal_path(folder, shard), repair=repair), schema)


def parse_lines(data: bytes | None, schema: pa.Schema) -> pa.Table:
    """Whole JSON lines as an Arrow table of `schema` (other keys ignored, missing ones null).

    Parsed by Arrow in C++: a 10,000-row shard costs no Python object per row, which is what
    keeps a long run's memory flat. Falls back to line-by-line parsing if a line is damaged.
    """
    if not data:
        return pa.Table.from_batches([], schema=schema)  # not empty_table(): it imports pandas (~40 MB)
    try:
        return pajson.read_json(
            pa.BufferReader(data),
            read_options=pajson.ReadOptions(block_size=max(1 << 20, len(data) + 1)),
            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        rows = []
        for line in data.splitlines():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue  # damaged by a power cut before its fsync: that row is sent again
        return pa.Table.from_pylist(rows, schema=schema)


def latest_per_id(lines: pa.Table) -> pa.Table:
    """One row per id: its last line wins (a retried row's new result replaces the old).

    A dict over the ids rather than Arrow's group_by: the hash aggregation reserves ~50 MB per
    call, which the allocator then keeps for the rest of the run.
    """
    ids = lines.column("id").to_pylist()
    last = {row_id: i for i, row_id in enumerate(ids)}
    if len(last) == len(ids):
        return lines
    return lines.take(pa.array(sorted(last.values()), pa.int64()))


class FileJournal:
    """Appends for many shards; one open file per shard in progress.

    Lines arriving in one turn of the event loop are gathered and written with one `write` per
    shard at the end of that turn (`loop.call_soon`): a per-row syscall costs more than the
    row's parsing, and the few microseconds a line waits are no different from a request in
    flight. `flush()` writes at once (the crash-point tests and shutdown use it); the engine calls
    `flush_before_send()` before each request, so no new request leaves while an answer already
    received is only in memory (a kill then would lose it and buy it again, beyond the requests
    in flight).

    Failure contract: a write or fsync that fails (ENOSPC, EIO) is never retried or ignored. The
    first failure is kept in `failure` (an OSError naming the journal file) and handed to
    `on_failure` (the engine stops the run); every later `append`, `flush` or `sync` raises it
    again, so no caller can believe a line was stored. Lines already written stay valid: a torn
    last line is cut on the next run (`read_journal_table(..., repair=True)`).
    """

    def __init__(self, folder: Path, on_failure: Callable[[OSError], None] | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.on_failure = on_failure
        self.failure: OSError | None = None
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._pending: dict[int, list[bytes]] = {}
        self._flush_scheduled = False

    def append(self, shard: int, row: ResultRow) -> None:
        if self.failure is not None:
            raise self.failure
        line = row.to_json() + b"\n"
        self._pending.setdefault(shard, []).append(line)
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self._flush_soon)
                self._flush_scheduled = True
            except RuntimeError:  # no loop (tests, tools): write now
                self.flush()

    def flush_before_send(self) -> None:
        if self._pending or self.failure is not None:
            self.flush()

    def _flush_soon(self) -> None:
        """The end-of-turn flush: a loop callback has no caller to raise to, so a failure is
        recorded and reported (on_failure) instead of lost in the loop's exception handler."""
        try:
            self.flush()
        except OSError:
            pass  # recorded by flush

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.failure is not None:
            raise self.failure
        pending, self._pending = self._pending, {}
        for shard, lines in pending.items():
            path = journal_path(self.folder, shard)
            try:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._fds[shard] = open_append(path)
                for i, line in enumerate(lines):  # the crash test: earlier lines whole, this one torn
                    crash_point("mid_journal_line", lambda: os.write(fd, b"".join(lines[:i]) + line[: len(line) // 2]))
                write_all(fd, b"".join(lines))
                self._dirty.add(fd)
            except OSError as exc:
                self._failed(exc, path)

    def _failed(self, exc: OSError, path: Path) -> NoReturn:
        if self.failure is None:
            self.failure = exc if exc.filename else OSError(exc.errno, exc.strerror, str(path))
            if self.on_failure is not None:
                self.on_failure(self.failure)
        raise self.failure

    def sync(self) -> None:
        self.flush()
        dirty, self._dirty = self._dirty, set()
        for fd in dirty:
            self._fsync(fd)

    def _fsync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:  # the data may not be on disk (the page cache may already be clean)
            self._failed(exc, self._path_of(fd))

    def _path_of(self, fd: int) -> Path:
        shard = next((s for s, f in self._fds.items() if f == fd), None)
        return journal_path(self.folder, shard) if shard is not None else self.folder

    async def sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                self.flush()
            except OSError:
                return  # recorded and reported: nothing more can be made durable
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                failed = await asyncio.to_thread(_fsync_all, dirty)
                if failed is not None:
                    with contextlib.suppress(OSError):
                        self._failed(failed[1], self._path_of(failed[0]))
                    return

    async def close_shard(self, shard: int) -> None:
        self._close_shard(shard)  # one file's fsync: on the loop, as every sync of a shard's file

    def _close_shard(self, shard: int) -> None:
        self.flush()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fsync(fd)
            del self._fds[shard]
            self._dirty.discard(fd)
            os.close(fd)

    def close(self) -> None:
        """Sync and close every file. After a failure the files are closed and the failure raised."""
        try:
            self.sync()
            for shard in list(self._fds):
                self._close_shard(shard)
        finally:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()


def _fsync_all(fds: set[int]) -> tuple[int, OSError] | None:
    """fsync each; the first real failure is returned (EBADF: closed meanwhile by close_shard,
    which fsyncs it itself)."""
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                return fd, exc
    return None
