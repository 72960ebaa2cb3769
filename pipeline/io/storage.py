"""The output's folder of part files, on a store (pipeline.io.store: a local folder or an fsspec URL).

    parts = PartStore.for_output(job.output)    # [output] path and storage_options
    parts.claim(job.name, checkpoint)           # this job's folder (_pipeline_job.json), or refused
    parts.write("part-000003.parquet", data)    # whole or not at all (pipeline.io.writer)
    parts.in_place({name: record})              # the parts that are as their commit records say
    parts.read_table("part-000003.parquet", ["id", "status"])  # None when it is not there
    for part in parts.parts(): ...              # each part with rows, one at a time, in shard order

Nothing here knows whether the folder is local or in a bucket: that is the store's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import JobError
from ..records import CommitRecord
from .durable import DIGEST_BYTES, Written, bytes_digest, file_digest
from .store import Data, Entry, LocalStore, Store, open_store

__all__ = ["PartStore", "file_digest", "bytes_digest", "OWNER_FILE", "DIGEST_BYTES"]

# Which job owns the folder. The leading underscore hides it from pyarrow.dataset and pandas
# (they skip "_" and "." names) and a DuckDB `*.parquet` glob does not match it.
OWNER_FILE = "_pipeline_job.json"


class PartStore:
    """A folder of part files and the marker of the job that owns it."""

    def __init__(self, location: Path | str, options: Mapping[str, Any] | None = None) -> None:
        self.store: Store = open_store(location, options)
        self._made_folder = False  # by this claim: an unclaim takes it back

    @classmethod
    def for_output(cls, output: Any) -> PartStore:
        """The store of a job's `[output]` (an OutputConfig: path, storage_options)."""
        return cls(output.path, output.storage_options)

    def __str__(self) -> str:
        return str(self.store)

    def where(self, name: str) -> str:
        return self.store.where(name)

    def write(self, name: str, data: Data, *, digest: bool = False,
              before_replace: Callable[[], None] | None = None) -> Written:
        return self.store.write(name, data, digest=digest, before_replace=before_replace)

    def names(self) -> list[str]:
        """Every file directly in the folder; [] when the folder does not exist yet."""
        return self.store.names()

    def remove(self, name: str) -> None:
        self.store.remove(name)

    def in_place(self, expected: Mapping[str, CommitRecord]) -> set[str]:
        """Names of the parts that are as their commit records say: {name: record}.

        A part must have the recorded size, and the recorded ETag where the store keeps one (an
        object is written whole or not at all; reading every part back would cost a download per
        part per run); elsewhere the recorded digest of its bytes (a part written over by anything
        else fails, even with the same size and row count), or for records from before digests
        were kept, the rows in the Parquet footer. One listing for all of them.
        """
        listing = self.store.listing() if expected else {}
        return {name for name, rec in expected.items() if self._as_recorded(name, rec, listing.get(name))}

    def _as_recorded(self, name: str, rec: CommitRecord, got: Entry | None) -> bool:
        if got is None or got.size != rec.size:
            return False
        if rec.etag is not None:
            return got.etag == rec.etag
        try:
            if rec.part_digest is not None:
                digest = self.store.digest(name)  # None where reading it back costs a download
                return digest is None or digest == rec.part_digest
            if not isinstance(self.store, LocalStore):
                return True  # a record without a digest: its footer would be a download
            with self.store.open(name) as f:  # no digest to compare: the footer's row count, not a hash of it all
                return pq.read_metadata(f).num_rows == rec.rows
        except (OSError, pa.ArrowInvalid):
            return False

    # -- which job owns the folder ---------------------------------------------------------

    def claim(self, job_name: str, checkpoint: Path | str) -> bool:
        """Make sure this folder belongs to this job (recording it on first use); a folder that
        another job writes is refused, before anything is sent or removed: two jobs in one folder
        delete each other's temporary files and take each other's part files for their own.
        True when this call recorded it (see `unclaim`). The record is a create-only write, so
        of two jobs claiming one folder at once, one wins and the other is refused."""
        # The name is the identity: a job whose files moved (and its checkpoint path with them)
        # still owns its folder; the checkpoint is recorded to tell the user where the owner lives.
        text = json.dumps({"job": job_name, "checkpoint": str(checkpoint),
                           "claimed": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n"
        # One listing first: in a bucket it names a missing bucket plainly, and spares a GET.
        found = self._read_owner() if OWNER_FILE in self.store.names() else None
        for _ in range(2):  # twice: a claim that won the race may be taken back (unclaim) meanwhile
            if found is not None:
                break
            made = self.store.make()
            try:
                self.store.create(OWNER_FILE, text.encode())
            except FileExistsError:  # another process recorded its job first
                found = self._read_owner()
                continue
            self._made_folder = made
            return True
        found = found or {}
        if found.get("job") != job_name:
            raise JobError(
                f"[output] path: {self} belongs to the job {found.get('job')!r} (checkpoint {found.get('checkpoint')}); "
                f"two jobs cannot share an output folder: choose another [output] path, or delete "
                f"{OWNER_FILE} there if that job and its checkpoint are gone"
            )
        return False

    def unclaim(self) -> None:
        """Undo a claim made by a run refused before it sent anything: the owner file goes, and the
        folder too if the claim made it and it is empty (a refused run leaves nothing behind)."""
        self.store.remove(OWNER_FILE)
        if self._made_folder:
            self.store.unmake()

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            raw = self.store.read(OWNER_FILE)
        except OSError as exc:
            raise JobError(f"[output] path: cannot read {self.where(OWNER_FILE)} ({exc.strerror})") from None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise JobError(f"[output] path: {OWNER_FILE} in {self} is damaged; delete it if this folder is this job's")
        return data

    # -- reading the parts -----------------------------------------------------------------

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        """A part's columns; None when the part is not there."""
        try:
            with self.store.open(name) as f:
                return pq.read_table(f, columns=columns)
        except FileNotFoundError:
            return None

    def part_names(self) -> list[str]:
        """The part files, in shard order (the manifest's)."""
        return sorted(n for n in self.names() if n.startswith("part-") and n.endswith(".parquet"))

    def parts(self, names: list[str] | None = None) -> Iterator[pa.Table]:
        """The part files (`names`, else all) with rows, one at a time, in shard order; what decoding
        one took goes back to the pool before the next: memory stays flat in the parts read."""
        pool = pa.default_memory_pool()
        for name in self.part_names() if names is None else names:
            part = self.read_table(name)
            if part is not None and part.num_rows:
                yield part
            del part
            pool.release_unused()

    def read_all(self) -> pa.Table:
        """Every part file's rows, in shard order: the output dataset read back."""
        parts = [t for name in self.part_names() if (t := self.read_table(name)) is not None]
        return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})
