"""The request cache: answers kept by what was asked, so a request sent before is not bought again.

    cache = Cache.open(folder, ttl_s=7 * 86400, max_bytes=10 << 30, warn=console.say)   # None: unusable
    key = request_key(url, body)            # sha256 of the endpoint and the body exactly as sent
    value = cache.get(key)                  # the answer's JSON bytes, or None (missing, too old, off)
    cache.put(key, orjson.dumps(data))      # kept in memory; written by the writer task
    await cache.write_forever()             # a task of the run: a batch of entries every WRITE_EVERY_S
    cache.close()                           # the last batch written, the connections closed

One SQLite file (`cache.sqlite3` in the folder) in WAL mode: several processes may read and write
it at once (a busy timeout waits out another's write). The key covers the endpoint URL and the
request body as sent (model, messages with images as data: URIs or URLs, parameters); no header
and no API key is ever stored. The value is the decoded answer body.

Durability contract: entries are written as a batch, one transaction every WRITE_EVERY_S (or when
WRITE_BATCH entries wait), off the event loop, with `synchronous=NORMAL`: a killed process loses
the entries not yet written, a power cut may also lose the last transactions, and neither can
corrupt the file (SQLite's WAL rolls back what was not whole). Losing an entry costs a request
later, never an answer now: the journal keeps this run's answers.

Size: bounded by `max_bytes` over the values' lengths. Each entry has a last-used time (moved by a
hit when more than TOUCH_AFTER_S old, in the writer's batches: an update costs ~100 us of the
writer's time, so a re-run soon after the first writes none); past the cap, the least recently used entries are deleted
down to EVICT_TO of it, checked at open and after a write that may have crossed it. Freed pages
are reused by SQLite (the file does not shrink, nor grow past the cap plus its overhead);
`pipeline cache prune` and `clear` (pipeline.io.cachefile) give the space back, even while runs
use the file: a batch that meets their lock is written with the next one. Each run's lookups,
hits and stores are kept in the `runs` table at close (`pipeline cache stats`).

Failure contract: the cache never stops a run nor loses an answer. The first error (a damaged or
unwritable file, a full disk) is reported once through `warn` and the cache turns itself off for
the rest of the run: lookups miss, stores are dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["Cache", "request_key", "CACHE_FILE", "WRITE_EVERY_S", "WRITE_BATCH", "EVICT_TO"]

CACHE_FILE = "cache.sqlite3"
WRITE_EVERY_S = 0.5
WRITE_BATCH = 2000  # entries waiting that make the writer write before its time
EVICT_TO = 0.9  # past the cap, evict down to this share of it (not one entry per write)
BUSY_TIMEOUT_S = 5.0  # another process's write in progress: how long the writer waits
TOUCH_AFTER_S = 3600.0  # a hit moves an entry's last-used time only if older than this (LRU to the hour)
READ_TIMEOUT_S = 0.05  # a lookup on the event loop never waits longer: a busy file is a miss
_VERSION = b"pipeline-cache-1\n"
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
CREATE TABLE IF NOT EXISTS runs (
    ended REAL NOT NULL,
    lookups INTEGER NOT NULL,
    hits INTEGER NOT NULL,
    stored INTEGER NOT NULL
);
"""


def _busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the file a moment. The primary result code is the low byte:
    SQLITE_BUSY_SNAPSHOT is a kind of SQLITE_BUSY."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _BUSY


def request_key(url: str, body: bytes) -> bytes:
    """The cache key: the endpoint and the request body exactly as sent (images included, as their
    data: URIs' or URLs' bytes). A format version leads, so a changed encoding never matches."""
    h = hashlib.sha256(_VERSION)
    h.update(url.encode())
    h.update(b"\n")
    h.update(body)
    return h.digest()


class Cache:
    """One run's handle on the cache file: lookups on the caller's thread (one indexed read), writes
    batched by `write_forever` in a worker thread. `clock` is the time source (tests pass their own)."""

    def __init__(self, path: Path, *, ttl_s: float | None, max_bytes: int, warn: Callable[[str], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.path, self.ttl_s, self.max_bytes = path, ttl_s, max_bytes
        self.warn, self.clock = warn, clock
        self.failed = False
        self._pending: dict[bytes, bytes] = {}  # key -> value, to write
        self._used: set[bytes] = set()  # keys read since the last write: their last-used time moves
        self._size: int | None = None  # the values' total as this process last summed it
        self._written_since_sum = 0
        self._lock = threading.Lock()  # one write at a time; close waits for a write in progress
        self.lookups = self.hits = self.stored = 0  # this run's, kept in `runs` at close (`pipeline cache stats`)
        self._reader = self._connect(READ_TIMEOUT_S)
        self._writer = self._connect(BUSY_TIMEOUT_S)

    @classmethod
    def open(cls, folder: Path, *, ttl_s: float | None, max_bytes: int, warn: Callable[[str], None],
             clock: Callable[[], float] = time.time) -> Cache | None:
        """The cache in `folder` (made if missing), checked and trimmed to its cap; None (after one
        warning) when it cannot be used. Blocking: call it off the event loop."""
        path = folder / CACHE_FILE
        cache: Cache | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            cache = cls(path, ttl_s=ttl_s, max_bytes=max_bytes, warn=warn, clock=clock)
            cache._writer.executescript(_SCHEMA)
            cache._writer.execute("SELECT 1 FROM entries LIMIT 1").fetchall()  # a damaged file fails here
            with cache._lock:
                cache._evict_if_over()
            return cache
        except (sqlite3.Error, OSError) as exc:
            if cache is not None:
                cache.failed = True
                cache.close()
            warn(_warning(path, exc))
            return None

    def _connect(self, timeout: float) -> sqlite3.Connection:
        # check_same_thread off: the writer runs in to_thread's threads, one batch at a time.
        # The setup waits as a write does; only then does the connection take its own timeout (a
        # lookup's is short: a busy file is a miss).
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        return conn

    @staticmethod
    def _wal(conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL needs it alone, and SQLite answers "locked" at once, without
        # its busy handler, while another process opens the same new file: two runs sharing a fresh
        # cache folder met it. Asked again until BUSY_TIMEOUT_S, as a write would wait.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    # -- the event loop's side -------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The value stored for `key`, unless missing, older than the TTL, or the cache is off."""
        if self.failed:
            return None
        self.lookups += 1
        value = self._pending.get(key)
        if value is not None:
            self.hits += 1
            return value
        try:
            found = self._reader.execute("SELECT value, created, used FROM entries WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            if _busy(exc):
                return None  # another process holds it a moment: a miss costs one request
            self._fail(exc)
            return None
        if found is None:
            return None
        now = self.clock()
        if self.ttl_s is not None and now - found[1] > self.ttl_s:
            return None
        if now - found[2] > TOUCH_AFTER_S:
            self._used.add(key)
        self.hits += 1
        return bytes(found[0])

    def put(self, key: bytes, value: bytes) -> None:
        if not self.failed:
            self._pending[key] = value
            self.stored += 1

    @property
    def waiting(self) -> int:
        return len(self._pending) + len(self._used)

    async def write_forever(self) -> None:
        """The writer: a batch every WRITE_EVERY_S, sooner when WRITE_BATCH entries wait. Never raises
        for the cache's own failures (reported once, then the cache is off)."""
        waited = 0.0
        while not self.failed:
            await asyncio.sleep(0.05)
            waited += 0.05
            if (waited >= WRITE_EVERY_S and self.waiting) or len(self._pending) >= WRITE_BATCH:
                waited = 0.0
                await asyncio.to_thread(self.write)

    # -- the writer's side -----------------------------------------------------------------

    def write(self, *, closing: bool = False) -> None:
        """Write what waits, in one transaction; evict if the cap may have been crossed. Blocking.
        A file busy past BUSY_TIMEOUT_S (`pipeline cache prune` vacuuming it) keeps the batch for
        the next write; closing, the run's figures go in `runs` with it."""
        with self._lock:
            if self.failed or not (self.waiting or closing):
                return
            pending, self._pending = self._pending, {}
            used, self._used = self._used, set()
            try:
                now = self.clock()
                with self._writer:  # one transaction: BEGIN ... COMMIT (ROLLBACK on an error)
                    self._writer.execute("BEGIN IMMEDIATE")
                    self._writer.executemany(
                        "INSERT OR REPLACE INTO entries (key, value, size, created, used) VALUES (?, ?, ?, ?, ?)",
                        [(k, v, len(v), now, now) for k, v in pending.items()])
                    self._writer.executemany("UPDATE entries SET used = ? WHERE key = ?", [(now, k) for k in used])
                    if closing and self.lookups + self.stored:
                        self._writer.execute("INSERT INTO runs (ended, lookups, hits, stored) VALUES (?, ?, ?, ?)",
                                             (now, self.lookups, self.hits, self.stored))
                self._written_since_sum += sum(len(v) for v in pending.values())
                if self._size is None or self._size + self._written_since_sum > self.max_bytes:
                    self._evict_if_over()
            except sqlite3.OperationalError as exc:
                if closing or not _busy(exc):
                    self._fail(exc)
                    return
                self._pending = {**pending, **self._pending}  # not written: the next batch tries again
                self._used |= used
            except Exception as exc:  # noqa: BLE001 - the cache is optional: any failure turns it off, never the run
                self._fail(exc)

    def _evict_if_over(self) -> None:
        """Sum the values (the file may be shared: another process wrote too); past the cap, delete
        the least recently used down to EVICT_TO of it."""
        total = self._writer.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
        self._written_since_sum = 0
        if total > self.max_bytes:
            excess = total - int(self.max_bytes * EVICT_TO)
            with self._writer:
                self._writer.execute("BEGIN IMMEDIATE")
                doomed, freed = [], 0
                cursor = self._writer.execute("SELECT key, size FROM entries ORDER BY used")
                while freed < excess and (chunk := cursor.fetchmany(1000)):
                    for key, size in chunk:
                        if freed >= excess:
                            break
                        doomed.append((key,))
                        freed += size
                cursor.close()
                self._writer.executemany("DELETE FROM entries WHERE key = ?", doomed)
            total -= freed
        self._size = total

    def close(self) -> None:
        """Write what waits and close. Blocking; never raises for the cache's failures."""
        try:
            self.write(closing=True)
        finally:
            with self._lock:
                self._close_connections()

    def _close_connections(self) -> None:
        for conn in (self._reader, self._writer):
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _fail(self, exc: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self._pending.clear()
            self._used.clear()
            self.warn(_warning(self.path, exc))


def _warning(path: Path, exc: BaseException) -> str:
    return (f"warning: the request cache {path} cannot be used ({type(exc).__name__}: {exc}); this run goes on "
            f"without it (answers are still journaled and written); if the file is damaged, delete it")
