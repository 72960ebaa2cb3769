"""A checkpoint in a bucket (an fsspec URL whose backend sends conditional writes: s3://).

    <checkpoint>/lock                      the job's lease (pipeline.io.ownership); lock.probe: the
                                           check that the server honours conditional writes
    <checkpoint>/job.json, plan.json, last_run.json   as in a folder (one put each, whole)
    <checkpoint>/journal/shard-NNNNNN/     the shard's segments and compact file (pipeline.io.segments)
    <checkpoint>/commits/NNNNNN-GGGGGG.json  shard N's commit record, generation G, created only if
                                           absent: two writers can never both commit one generation
    <checkpoint>/runs/, ledger/, errors/   one object per record (the history, batch mode's ledger,
                                           tracebacks), numbered in order
    <checkpoint>/batches/                  batch mode's batch files

Nothing needs a path every machine sees: a Ray worker opens the same URL and writes its shard's
segments, part and commit record itself, within the driver's lease (its fence). An object store
has no append: answers reach the bucket once per `[output] checkpoint_flush_s` (or SEGMENT_ROWS
rows) per shard, so a kill -9 costs the rows in flight and those answered within the last flush
interval. `pipeline status` reads it without the lease and changes nothing. An in-memory manifest
(the Python API) is stored in a local folder under the user's cache folder, keyed by the URL: the
manifest readers read local files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from ..config.sections import default_cache_folder
from ..errors import JobError
from ..records import CommitRecord
from .ckpt_base import BATCH_FILES, JOURNAL, Checkpoint
from .ownership import Fence, Lease
from .journal import shard_name
from .segments import ObjectLog, Pieces, SegmentJournal, StoreWriteError, wants_compaction
from .storage import PartStore
from .store import FsspecStore

__all__ = ["BucketCheckpoint", "SEGMENT_ROWS", "LABEL"]

LABEL = "[output] checkpoint"
LOCK, COMMITS = "lock", "commits"
COMMIT = re.compile(r"^(\d+)-(\d+)\.json$")
SEGMENT_ROWS = 2000  # a shard's answers waiting for a put, at most (besides every checkpoint_flush_s)
MAX_TRACEBACKS = 100  # objects per run: a bug met by every row must not cost a put per row
_RECORDS: dict[str, CommitRecord] = {}  # (object, ETag) -> its record: a commit object never changes


def _gen(name: str) -> int:
    return int(name.split("-")[1].split(".")[0])


class BucketCheckpoint(Checkpoint):
    forget = ()
    forget_folders = (JOURNAL, BATCH_FILES, COMMITS, "runs", "ledger", "errors")

    def __init__(self, url: str, options: dict[str, Any], *, flush_s: float, lease_s: float) -> None:
        fence = Fence()  # closed until the lease (or, in a Ray worker, the driver's) opens it
        self.root = FsspecStore(url, options, LABEL)  # the lease's own: not fenced
        self.bucket = FsspecStore(url, options, LABEL, guard=fence)
        key = hashlib.blake2b(self.bucket.url.encode(), digest_size=8).hexdigest()
        super().__init__(self.bucket, default_cache_folder() / "manifests" / key)
        self.fence = fence
        self.flush_s, self.lease_s = flush_s, lease_s
        self.bound = f"the rows in flight and those answered within the last {flush_s:g}s (checkpoint_flush_s)"
        self._pieces: dict[int, Pieces] = {}
        self._gens: dict[int, list[str]] | None = None  # commit record names per shard, oldest first
        self._errors: ObjectLog | None = None
        self._tracebacks = 0

    @contextmanager
    def locked(self, job_name: str) -> Iterator[None]:
        lease = Lease(self.root, LOCK, self.lease_s, self.fence)
        lease.probe()
        self.took_over = lease.acquire(job_name)
        lease.start()
        try:
            yield
        finally:
            lease.release()

    def shard_lock(self, shard: int) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # one run writes, its workers within its lease's fence; a commit is create-only

    # -- answers -------------------------------------------------------------------------

    def pieces(self, shard: int) -> Pieces:
        """One object per shard (it numbers the shard's segments), whichever thread asks first."""
        if shard not in self._pieces:
            self._pieces.setdefault(shard, Pieces(self.bucket.child(JOURNAL).child(shard_name(shard))))
        return self._pieces[shard]

    def journal(self, on_failure: Callable[[OSError], None] | None = None) -> SegmentJournal:
        return SegmentJournal(self.pieces, flush_s=self.flush_s, flush_rows=SEGMENT_ROWS, fence=self.fence,
                              on_failure=on_failure)

    def journal_lines(self, shard: int, schema: pa.Schema, *, repair: bool = False) -> pa.Table:
        return self.pieces(shard).read(schema)  # segments are whole: nothing to repair

    def compact(self, shard: int) -> None:
        self.pieces(shard).compact()

    def loose(self) -> set[int]:
        pieces: dict[int, list[str]] = {}
        for name in self.bucket.child(JOURNAL).walk():  # one listing of every shard's pieces
            folder, _, piece = name.rpartition("/")
            if folder.startswith("shard-"):
                pieces.setdefault(int(folder[6:12]), []).append(piece)
        return {shard for shard, names in pieces.items() if wants_compaction(names)}

    # -- commits -------------------------------------------------------------------------

    def commits(self) -> dict[int, CommitRecord]:
        """One listing, then the newest record of each shard (read once per process)."""
        folder = self.bucket.child(COMMITS)
        listing = folder.listing()
        gens: dict[int, list[str]] = {}
        for name in listing:
            if m := COMMIT.match(name):
                gens.setdefault(int(m.group(1)), []).append(name)
        for names in gens.values():
            names.sort(key=_gen)
        self._gens = gens
        keys = {names[-1]: f"{folder.where(names[-1])}#{listing[names[-1]].etag}" for names in gens.values()}
        unread = [name for name, key in keys.items() if key not in _RECORDS]
        for name, raw in folder.read_many(unread).items():
            with contextlib.suppress(ValueError, TypeError):
                _RECORDS[keys[name]] = CommitRecord.from_dict(json.loads(raw))
        return {rec.shard: rec for key in keys.values() if (rec := _RECORDS.get(key)) is not None}

    def peek_commits(self) -> dict[int, CommitRecord]:
        return self.commits()  # nothing to repair, no lock to take

    def record_commit(self, record: CommitRecord) -> None:
        """The next generation of the shard's record, created only if absent; the older ones go."""
        if self._gens is None:
            self.commits()
        assert self._gens is not None
        have = self._gens.setdefault(record.shard, [])
        name = f"{record.shard:06d}-{(_gen(have[-1]) if have else 0) + 1:06d}.json"
        folder = self.bucket.child(COMMITS)
        try:
            made = folder.create(name, record.to_json())
        except FileExistsError:
            raise StoreWriteError(errno.EEXIST, f"{folder.where(name)} was made by another writer meanwhile; this run "
                                                f"stops (the next run checks every part against its newest record)") from None
        _RECORDS[f"{folder.where(name)}#{made.etag}"] = record  # read back by this run's summary: no GET
        old, have[:] = list(have), [name]
        with contextlib.suppress(JobError, OSError):  # housekeeping: superseded records
            folder.remove_many(old)

    def reset(self, output: PartStore) -> None:
        super().reset(output)
        self._gens, self._pieces = None, {}

    # -- logs ----------------------------------------------------------------------------

    def events(self, name: str) -> ObjectLog:
        return ObjectLog(self.bucket.child(name))

    def log_error(self, text: str) -> None:
        if self._tracebacks >= MAX_TRACEBACKS:
            return
        self._tracebacks += 1
        if self._errors is None:
            self._errors = self.events("errors")
        self._errors.append(text.encode(errors="backslashreplace"))

    @property
    def errors_where(self) -> str:
        return str(self.bucket.child("errors"))
