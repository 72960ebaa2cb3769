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

from .crashpoints import crash_point

__all__ = ["Journal", "read_journal", "journal_path", "SYNC_INTERVAL_S"]

SYNC_INTERVAL_S = 0.2


def journal_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:06d}.jsonl"


def read_journal(folder: Path, shard: int, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Latest record per id. With `repair`, a torn tail is truncated away on disk too."""
    path = journal_path(folder, shard)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    records: dict[str, dict[str, Any]] = {}
    for line in data[:end].splitlines():
        if not line:
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line torn by a power cut before its fsync: the row will be sent again
        records[rec["id"]] = rec
    return records


class Journal:
    """Appends for many shards; one open file per shard in progress.

    Lines arriving in one turn of the event loop are gathered and written with one `write` per
    shard at the end of that turn (`loop.call_soon`): a per-row syscall costs more than the
    row's parsing, and the few microseconds a line waits are no different from a request in
    flight. `flush()` writes at once (the crash-point tests and shutdown use it).
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
