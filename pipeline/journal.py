"""The journal: every result appended as it arrives, one JSON line per row, per shard.

Lines are written with one `write` straight to the file (in the OS's hands: a killed process
loses nothing written) and fsynced as a group every `SYNC_INTERVAL_S` (a power cut loses at most
that much). The journal is the source of truth for answers: part files are rebuilt from it, so it
is kept after a shard is committed. A torn last line (a crash mid-write) is cut off on reading.
Later lines win: a retried row's new result replaces its old one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pajson

from .crashpoints import crash_point

__all__ = ["Journal", "repair_tail", "read_journal_table", "latest_per_id", "journal_path", "SYNC_INTERVAL_S"]

SYNC_INTERVAL_S = 0.2


def journal_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:06d}.jsonl"


def repair_tail(folder: Path, shard: int) -> None:
    """Cut a torn last line (a crash mid-append) so the next append starts on a fresh line."""
    path = journal_path(folder, shard)
    try:
        with open(path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            data = path.read_bytes()
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())
    except FileNotFoundError:
        pass


def read_journal_table(folder: Path, shard: int, schema: pa.Schema) -> pa.Table:
    """Every whole line of a shard's journal as an Arrow table (superseded lines included).

    Parsed by Arrow in C++: a 10,000-row shard costs no Python object per row, which is what
    keeps a long run's memory flat. Falls back to line-by-line parsing if a line is damaged.
    """
    path = journal_path(folder, shard)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return pa.Table.from_batches([], schema=schema)  # not empty_table(): it imports pandas (~40 MB)
    data = data[: data.rfind(b"\n") + 1]
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


class Journal:
    """Appends for many shards; one open file per shard in progress.

    Lines arriving in one turn of the event loop are gathered and written with one `write` per
    shard at the end of that turn (`loop.call_soon`): a per-row syscall costs more than the
    row's parsing, and the few microseconds a line waits are no different from a request in
    flight. `flush()` writes at once (the crash-point tests and shutdown use it); the engine calls
    `flush_before_send()` before each request, so no new request leaves while an answer already
    received is only in memory (a kill then would lose it and buy it again, beyond the requests
    in flight).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._pending: dict[int, list[bytes]] = {}
        self._flush_scheduled = False

    def append(self, shard: int, record: dict[str, Any]) -> None:
        line = orjson.dumps(record) + b"\n"
        self._pending.setdefault(shard, []).append(line)
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._flush_scheduled = True
            except RuntimeError:  # no loop (tests, tools): write now
                self.flush()

    def flush_before_send(self) -> None:
        if self._pending:
            self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for shard, lines in pending.items():
            fd = self._fds.get(shard)
            if fd is None:
                fd = os.open(journal_path(self.folder, shard), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._fds[shard] = fd
            for i, line in enumerate(lines):  # the crash test: earlier lines whole, this one torn
                crash_point("mid_journal_line", lambda: os.write(fd, b"".join(lines[:i]) + line[: len(line) // 2]))
            os.write(fd, b"".join(lines))
            self._dirty.add(fd)

    def sync(self) -> None:
        self.flush()
        dirty, self._dirty = self._dirty, set()
        for fd in dirty:
            os.fsync(fd)

    async def sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            self.flush()
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                await asyncio.to_thread(_fsync_all, dirty)

    def close_shard(self, shard: int) -> None:
        self.flush()
        fd = self._fds.pop(shard, None)
        if fd is not None:
            os.fsync(fd)
            self._dirty.discard(fd)
            os.close(fd)

    def close(self) -> None:
        self.sync()
        for shard in list(self._fds):
            self.close_shard(shard)


def _fsync_all(fds: set[int]) -> None:
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError:  # closed meanwhile by close_shard, which fsyncs it itself
            pass
