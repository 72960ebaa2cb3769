"""A shard's journal as pieces in a store folder: immutable segments and one compact file.

    pieces = Pieces(store)                 # <checkpoint>/journal/shard-000003/
    table = pieces.read(schema)            # the compact file's lines, then every segment it has not absorbed
    name = pieces.segment_name(writer)     # 00000008-3f9a1c2b.jsonl: numbered after every piece there
    pieces.compact()                       # every line into one zstd file; the segments go
    journal = SegmentJournal(pieces_of, flush_s=2, flush_rows=2000)   # the bucket's Journal

    <shard folder>/00000007-3f9a1c2b.jsonl     a segment: whole JSON lines, written once, never changed
    <shard folder>/compact-00000012.jsonl.zst  every line of the pieces up to 12, zstd-compressed, after
                                               a first line naming the pieces it absorbed

An object store has no append: a bucket checkpoint's journal is one segment object per shard per
flush (every `checkpoint_flush_s`, or `flush_rows` rows, whichever first). A writer numbers its
segments after every piece it found, so reading them in order (number, then writer) makes the later
line win exactly as the local journal's appends do. A folder checkpoint seals its appended file into
this folder when it compacts (pipeline.io.ckpt_folder), so both are read the same way.

Compaction (after the shard's part is committed) writes the lines, as they are, into one zstd file
(a tenth of a millisecond per row, no parsing; every column kept, labels included) and then
removes what it absorbed. Nothing is dropped: a later `--retry-failed` needs the failed rows, a
damaged or deleted part is rebuilt from these lines, and every attempt's cost stays counted. A kill
at any point loses nothing: before the new file is whole, the old pieces are all there; after, a
reader skips the pieces the newest compact file names as absorbed, and the next compaction removes
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import pyarrow as pa

from ..crashpoints import crash_point
from ..errors import JobError
from ..records import ResultRow
from ..waits import wait_event
from .journal import parse_lines
from .store import Store

__all__ = ["Pieces", "SegmentJournal", "ObjectLog", "SEGMENT", "StoreWriteError", "wants_compaction"]

SEGMENT = re.compile(r"^(\d{8})-([0-9a-z]+)\.jsonl$")
RECORD = re.compile(r"^(\d{8})\.json$")
COMPACT = re.compile(r"^compact-(\d{8})\.jsonl\.zst$")
ZSTD_LEVEL = 3  # 7.7 MB of journal (10,000 rows) in ~5 ms, to 2.3% of it; level 9 saves 7% more at 10x the time


def wants_compaction(pieces: list[str]) -> bool:
    """Whether a shard's pieces still want a compaction: more than one, or one not compact."""
    return len(pieces) > 1 or bool(pieces) and not COMPACT.match(pieces[0])


class StoreWriteError(OSError):
    """A store's refusal (a JobError's one line) as the OSError the journal's contract names."""


@dataclass
class _Scan:
    compact: str | None = None  # the newest compact file
    older: list[str] = field(default_factory=list)  # compact files it supersedes
    segments: list[str] = field(default_factory=list)  # in reading order
    top: int = 0  # the highest number seen


@dataclass
class _Lines:
    data: bytes  # every whole line, in order
    scan: _Scan
    absorbed: set[str]  # pieces the compact file holds (skipped where still listed)
    fresh: list[str]  # the segments read beside it


class Pieces:
    """One shard's pieces. `top` is the highest number this object has seen or given out."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.top: int | None = None
        self._numbers = threading.Lock()  # a put's thread names a segment while another may list
        # the last read, kept for a compaction right after it (the commit's): pieces never change,
        # so the same names listed mean the same lines, and the compaction reads nothing again
        self._memo: tuple[tuple[str, ...], _Lines] | None = None

    def scan(self) -> _Scan:
        scan = _Scan()
        compacts = []
        for name in self.store.names():
            if m := SEGMENT.match(name):
                scan.segments.append(name)
                scan.top = max(scan.top, int(m.group(1)))
            elif m := COMPACT.match(name):
                compacts.append(name)
                scan.top = max(scan.top, int(m.group(1)))
        scan.segments.sort(key=lambda n: (int(n[:8]), n))
        if compacts:
            compacts.sort()
            scan.compact, scan.older = compacts[-1], compacts[:-1]
        with self._numbers:
            self.top = max(self.top or 0, scan.top)
        return scan

    def segment_name(self, writer: str) -> str:
        if self.top is None:
            self.scan()
        with self._numbers:
            self.top = (self.top or 0) + 1
            return f"{self.top:08d}-{writer}.jsonl"

    def read(self, schema: pa.Schema) -> pa.Table:
        """Every line, the compact file's first, as a table of `schema`; superseded lines included."""
        return parse_lines(self._lines().data, schema)

    def _lines(self) -> _Lines:
        for attempt in range(3):  # a piece removed between the listing and the read: a compaction meanwhile
            scan = self.scan()
            listed = (scan.compact or "", *scan.older, *scan.segments)
            if self._memo is not None and self._memo[0] == listed:
                return self._memo[1]
            compact, absorbed = self._compact(scan.compact)
            fresh = [n for n in scan.segments if n not in absorbed]
            data = self.store.read_many(fresh)
            if len(data) == len(fresh) or attempt == 2:
                # whole lines of each (a sealed local file may end torn: a crash mid-append)
                lines = _Lines(compact + b"".join(d[: d.rfind(b"\n") + 1] for n in fresh if (d := data.get(n))),
                               scan, absorbed, fresh)
                self._memo = (listed, lines)
                return lines
        raise AssertionError("unreachable")

    def _compact(self, name: str | None) -> tuple[bytes, set[str]]:
        raw = self.store.read(name) if name is not None else None
        if raw is None:
            return b"", set()
        head, _, lines = pa.CompressedInputStream(pa.BufferReader(raw), "zstd").read().partition(b"\n")
        return lines, set(json.loads(head).get("absorbed", []))

    def compact(self) -> bool:
        """Every line into one zstd file, then the pieces it absorbed removed. True when a file was
        written."""
        got = self._lines()
        self._memo = None  # what follows changes the pieces
        scan, absorbed, fresh = got.scan, got.absorbed, got.fresh
        leftovers = [n for n in scan.segments if n in absorbed] + scan.older
        if fresh:
            top = max([int(n[:8]) for n in fresh] + ([int(scan.compact[8:16])] if scan.compact else []))
            keep = sorted((absorbed & set(scan.segments)) | set(fresh))  # a leftover the old file absorbed stays skipped
            head = json.dumps({"absorbed": keep}).encode() + b"\n"
            name = f"compact-{top:08d}.jsonl.zst"
            self.store.write(name, pa.Codec("zstd", ZSTD_LEVEL).compress(head + got.data, asbytes=True))
            crash_point("mid_compaction")
            leftovers = keep + [c for c in [scan.compact, *scan.older] if c and c != name]
        self.store.remove_many(leftovers)
        return bool(fresh)


class SegmentJournal:
    """The Journal of a bucket checkpoint: lines gathered per shard, written as one segment per
    shard every `flush_s` (the run's `sync_forever`) or once `flush_rows` rows wait, whichever
    first; a shard's own lines at its commit (`close_shard`). The puts run in threads, in the
    order their lines were taken (a ticket each), so a commit reads every line taken before it.

    A kill -9 loses the lines not yet put: the rows answered within the last flush interval are
    sent again, beside those in flight. `fence` runs before each request and each put (the run's
    lease: a run that lost it stops at once). Failure contract as the local journal's."""

    def __init__(self, pieces: Callable[[int], Pieces], *, flush_s: float, flush_rows: int,
                 fence: Callable[[], None] | None = None,
                 on_failure: Callable[[OSError], None] | None = None) -> None:
        self.pieces, self.flush_s, self.flush_rows, self.fence = pieces, flush_s, flush_rows, fence
        self.on_failure = on_failure
        self.failure: OSError | None = None
        self.writer = os.urandom(4).hex()
        self.puts = 0  # segments written (the bench counts requests)
        self._pending: dict[int, list[bytes]] = {}
        self._rows = 0
        self._tickets = 0  # batches taken ...
        self._done = 0  # ... and put, in order
        self._turn = threading.Condition()
        self._wake: asyncio.Event | None = None
        self._told = False

    def append(self, shard: int, row: ResultRow) -> None:
        if self.failure is not None:
            raise self.failure
        self._pending.setdefault(shard, []).append(row.to_json() + b"\n")
        self._rows += 1
        if self._rows >= self.flush_rows:
            if self._wake is not None:
                self._wake.set()
            else:  # no run's loop (import-batch, tools): write now
                self.flush()

    def flush_before_send(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.fence is not None:
            try:
                self.fence()
            except OSError as exc:
                self._failed(exc)

    def _take(self, shards: list[int] | None = None) -> tuple[int, list[tuple[Pieces, bytes]]]:
        batch = []
        for shard in list(self._pending) if shards is None else [s for s in shards if s in self._pending]:
            lines = self._pending.pop(shard)
            self._rows -= len(lines)
            batch.append((self.pieces(shard), b"".join(lines)))
        self._tickets += 1
        return self._tickets - 1, batch

    def _put(self, taken: tuple[int, list[tuple[Pieces, bytes]]]) -> None:
        """In any thread: waits for the batches taken before it, then names (in that order: the
        later lines' segment sorts later) and puts its segments."""
        ticket, batch = taken
        with self._turn:
            self._turn.wait_for(lambda: self._done >= ticket)
        try:
            if self.failure is not None:
                raise self.failure
            for pieces, data in batch:
                if self.fence is not None:
                    self.fence()
                try:
                    pieces.store.create(pieces.segment_name(self.writer), data)
                except (JobError, FileExistsError) as exc:
                    raise StoreWriteError(errno.EIO, str(exc)) from None
                self.puts += 1
        except OSError as exc:
            self.failure = self.failure or exc  # seen by every later call, even if nobody awaits this put
            raise
        finally:
            with self._turn:
                self._done = ticket + 1
                self._turn.notify_all()

    def _failed(self, exc: OSError) -> NoReturn:
        """The first failure reaches `on_failure` once (from the loop's thread: a put's thread only records it)."""
        self.failure = self.failure or exc
        if not self._told and self.on_failure is not None:
            self._told = True
            self.on_failure(self.failure)
        raise self.failure

    def _write(self, taken: tuple[int, list[tuple[Pieces, bytes]]]) -> None:
        try:
            self._put(taken)
        except OSError as exc:
            self._failed(exc)

    def flush(self) -> None:
        if self.failure is not None:
            raise self.failure
        self._write(self._take())

    def sync(self) -> None:
        self.flush()  # a put that returned is durable

    async def close_shard(self, shard: int) -> None:
        """The shard's lines put before its commit reads them; not on the loop's thread: a put is a
        round trip (10-100 ms on S3) in which no answer would be read and no request sent."""
        if self.failure is not None:
            raise self.failure
        try:
            await self._put_in_thread(self._take([shard]))
        except OSError as exc:
            self._failed(exc)

    def close(self) -> None:
        self.flush()

    async def sync_forever(self) -> None:
        self._wake = wake = asyncio.Event()
        try:
            while True:
                await wait_event(wake, self.flush_s)
                wake.clear()
                if not self._pending:
                    continue
                try:
                    await self._put_in_thread(self._take())
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        self._failed(exc)
                    return
        finally:
            self._wake = None

    async def _put_in_thread(self, taken: tuple[int, list[tuple[Pieces, bytes]]]) -> None:
        """`_put` in a thread, the loop answering meanwhile. The lines taken hold a ticket every
        later put waits for, and an executor job cancelled before it starts never runs: a run
        ending (the flusher cancelled) just as a segment filled lost those lines and hung its
        commit. Once taken, the put is shielded from a cancellation and waited for before the
        cancellation goes on. It is handed to a thread now, not when a task first runs: a `sync()`
        on the loop in between (a second Ctrl-C's) waits for this ticket, and would wait for ever."""
        put = asyncio.get_running_loop().run_in_executor(None, self._put, taken)
        try:
            await asyncio.shield(put)
        except asyncio.CancelledError:
            while not put.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([put])
            if not put.cancelled():
                put.exception()  # seen: a failure is in self.failure, the journal's next call raises it
            raise


class ObjectLog:
    """An append-only log in a bucket folder (the run history, the batch ledger, tracebacks): one
    object per record, `00000042.json`, created only if absent: a writer whose number another took
    meanwhile lists again and takes the next, so every record has its place in one order."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.top: int | None = None

    def _names(self) -> list[str]:
        names = sorted(n for n in self.store.names() if RECORD.match(n))
        self.top = max([self.top or 0] + [int(n[:8]) for n in names])
        return names

    def append(self, data: bytes) -> None:
        if self.top is None:
            self._names()
        for _ in range(100):
            self.top = (self.top or 0) + 1
            try:
                self.store.create(f"{self.top:08d}.json", data)
                return
            except FileExistsError:
                self._names()  # another writer's: after every one there
        raise StoreWriteError(errno.EIO, f"{self.store}: could not find a free record number in 100 tries")

    def entries(self) -> list[bytes]:
        names = self._names()
        data = self.store.read_many(names)
        return [data[n] for n in names if n in data]
