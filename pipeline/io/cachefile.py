"""Housekeeping of a request cache folder (`pipeline cache [DIR] stats|prune|clear`): what it holds,
and the space given back, safely while runs use it.

    stats(folder)                                  # entries, bytes, the file's size, hit rate of recent runs, oldest
    prune(folder, older_than_s=30 * 86400)         # entries not used in 30 days
    prune(folder, max_bytes=5 * 10**9)             # least recently used first, down to 5 GB
    clear(folder)                                  # every entry

Deleting runs in transactions of DELETE_BATCH entries (a run's writer waits for one, never for
all: its batch meets a busy file at worst and is written with the next one), then VACUUM rewrites
the file without the freed pages and a TRUNCATE checkpoint shrinks it and its WAL: the space is
really given back. SQLite's locking makes every step whole: a run reading meanwhile sees the
entries before or after a transaction, never half of one.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from .cache import CACHE_FILE

__all__ = ["stats", "prune", "clear", "RECENT_RUNS", "file_bytes"]

RECENT_RUNS = 10  # the hit rate of the last this many runs
DELETE_BATCH = 5000
CHECKPOINT_TRIES = 20
ADMIN_BUSY_S = 60.0  # a run's write in progress: how long a housekeeping step waits for it


class CacheMissing(FileNotFoundError):
    pass


def file_bytes(folder: Path) -> int:
    """The cache file and its WAL, on disk."""
    return sum((folder / (CACHE_FILE + suffix)).stat().st_size for suffix in ("", "-wal")
               if (folder / (CACHE_FILE + suffix)).exists())


def _connect(folder: Path) -> sqlite3.Connection:
    path = folder / CACHE_FILE
    if not path.exists():
        raise CacheMissing(f"no request cache in {folder} (no {CACHE_FILE})")
    conn = sqlite3.connect(path, timeout=ADMIN_BUSY_S, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def stats(folder: Path, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """What the cache holds and how well it served the last RECENT_RUNS runs."""
    conn = _connect(folder)
    try:
        n, size, oldest, newest, lru = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created), MAX(created), MIN(used) FROM entries").fetchone()
        runs = _recent_runs(conn)
    finally:
        conn.close()
    lookups = sum(r["lookups"] for r in runs)
    now = clock()
    return {"folder": str(folder), "entries": n, "bytes": size, "file_bytes": file_bytes(folder),
            "oldest_entry_age_s": None if oldest is None else round(now - oldest, 1),
            "newest_entry_age_s": None if newest is None else round(now - newest, 1),
            "least_recently_used_age_s": None if lru is None else round(now - lru, 1),
            "recent_runs": len(runs), "recent_hit_rate": round(sum(r["hits"] for r in runs) / lookups, 4) if lookups else None,
            "runs": runs}


def _recent_runs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    try:
        found = conn.execute("SELECT ended, lookups, hits, stored FROM runs ORDER BY ended DESC LIMIT ?",
                             (RECENT_RUNS,)).fetchall()
    except sqlite3.OperationalError:  # a cache made before runs were recorded
        return []
    return [{"ended": e, "lookups": lk, "hits": h, "stored": st} for e, lk, h, st in reversed(found)]


def prune(folder: Path, *, older_than_s: float | None = None, max_bytes: int | None = None,
          clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Delete the entries not used in `older_than_s`, then the least recently used past `max_bytes`;
    give the space back. Returns what was removed and the file's size before and after."""
    before = file_bytes(folder)
    conn = _connect(folder)
    removed = freed = 0
    try:
        if older_than_s is not None:
            r, f = _delete_where(conn, "used < ?", (clock() - older_than_s,))
            removed, freed = removed + r, freed + f
        if max_bytes is not None:
            r, f = _delete_past(conn, max_bytes)
            removed, freed = removed + r, freed + f
        _give_back(conn)
    finally:
        conn.close()
    return {"removed": removed, "freed_bytes": freed, "file_bytes_before": before, "file_bytes_after": file_bytes(folder)}


def clear(folder: Path) -> dict[str, Any]:
    """Every entry deleted and the space given back (the run history stays: it is the hit rate's)."""
    before = file_bytes(folder)
    conn = _connect(folder)
    try:
        removed, freed = _delete_where(conn, "1", ())
        _give_back(conn)
    finally:
        conn.close()
    return {"removed": removed, "freed_bytes": freed, "file_bytes_before": before, "file_bytes_after": file_bytes(folder)}


def _delete_where(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> tuple[int, int]:
    removed = freed = 0
    while True:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            doomed = conn.execute(f"SELECT key, size FROM entries WHERE {where} LIMIT ?", (*args, DELETE_BATCH)).fetchall()
            conn.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k, _ in doomed])
        removed += len(doomed)
        freed += sum(size for _, size in doomed)
        if len(doomed) < DELETE_BATCH:
            return removed, freed


def _delete_past(conn: sqlite3.Connection, max_bytes: int) -> tuple[int, int]:
    """Least recently used first, until the values' total is at most max_bytes."""
    removed = freed = 0
    while True:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
            excess = total - max_bytes
            if excess <= 0:
                return removed, freed
            doomed, gone = [], 0
            for key, size in conn.execute("SELECT key, size FROM entries ORDER BY used LIMIT ?", (DELETE_BATCH,)):
                if gone >= excess:
                    break
                doomed.append((key,))
                gone += size
            conn.executemany("DELETE FROM entries WHERE key = ?", doomed)
        removed, freed = removed + len(doomed), freed + gone


def _give_back(conn: sqlite3.Connection) -> None:
    """VACUUM (the file rewritten without its free pages), then the WAL folded in and truncated."""
    conn.execute("VACUUM")
    for _ in range(CHECKPOINT_TRIES):  # a run reading at that moment holds the WAL: try again shortly
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return
        time.sleep(0.1)
