"""Where part files live: a local folder or an fsspec URL (`s3://bucket/prefix`).

    store = PartStore.for_output(job.output)     # [output] path and storage_options
    store.write("part-000003.parquet", data)     # a URL: one put of the complete file
    store.names()                                # the files in the folder
    store.read_table("part-000003.parquet", ["id", "status"])  # None when it is not there

Only the part files may be remote. The checkpoint stays a POSIX path: it needs appends, fsync
and flock, which object stores lack (pipeline.io.checkpoint).

A local folder is written by `writer.write_part` itself (temporary name, fsync, rename, fsync of
the folder) and never goes through fsspec. On an object store an object is visible whole or not
at all, so a part is one put of the complete file (a multipart upload above 100 MB is still
whole-or-nothing): no temporary name, no rename, nothing a crash can leave behind.

fsspec and its backend (s3fs for `s3://`) are imported only for a URL. Credentials come from the
backend's usual sources (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws, ...) or from `[output]
storage_options`; those values are scrubbed from every message (like the API key), and storage
failures become a one-line JobError in ONE place, `_translate`.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from ..config.urls import check_url, display
from ..errors import JobError
from ..records import CommitRecord
from ..redact import Redactor, option_secrets

__all__ = ["PartStore", "file_digest", "bytes_digest", "storage_secrets", "storage_failure", "OWNER_FILE", "DIGEST_BYTES"]

# Credentials the backends read from the environment: scrubbed too, should a message echo one.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN")
T = TypeVar("T")
# Which job owns the folder. The leading underscore hides it from pyarrow.dataset and pandas
# (they skip "_" and "." names) and a DuckDB `*.parquet` glob does not match it.
OWNER_FILE = "_pipeline_job.json"
DIGEST_BYTES = 16
_READ_BLOCK = 1 << 20


def file_digest(path: Path) -> str:
    """The digest a commit record keeps of a part file's bytes (blake2b, streamed)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


class PartStore:
    """A folder of part files, local (`Path`) or remote (an fsspec URL, `str`)."""

    def __init__(self, location: Path | str, options: Mapping[str, Any] | None = None) -> None:
        self.location = location
        self.local: Path | None = None if isinstance(location, str) else location
        self._options = dict(options or {})
        self._fs: Any = None
        self._root = ""

    @classmethod
    def for_output(cls, output: Any) -> PartStore:
        """The store of a job's `[output]` (an OutputConfig: path, storage_options)."""
        return cls(output.path, output.storage_options)

    def __str__(self) -> str:
        return display(self.location)

    # -- the remote side -------------------------------------------------------------------

    def _remote(self) -> tuple[Any, str]:
        """(fsspec filesystem, folder path in it), made on first use."""
        if self._fs is None:
            assert isinstance(self.location, str)
            check_url(self.location, "[output] path")
            import fsspec

            self._fs, root = self._call("reach", lambda: fsspec.core.url_to_fs(self.location, **self._options))
            self._root = root.rstrip("/")
        return self._fs, self._root

    def _call(self, what: str, op: Callable[[], T]) -> T:
        try:
            return op()
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend's failure type is foreign here
            raise _translate(self, what, exc) from None

    # -- the interface ---------------------------------------------------------------------

    def write(self, name: str, data: bytes) -> int:
        """A remote part: the complete file in one put. Returns its size."""
        fs, root = self._remote()
        self._call(f"write {name} in", lambda: fs.pipe_file(f"{root}/{name}", data))
        return len(data)

    def names(self) -> list[str]:
        """Every file directly in the folder; [] when the folder does not exist yet."""
        if self.local is not None:
            return [p.name for p in self.local.iterdir()] if self.local.is_dir() else []
        return list(self._listing())

    def in_place(self, expected: Mapping[str, CommitRecord]) -> set[str]:
        """Names of the parts that are as their commit records say: {name: record}.

        A local part must have the recorded size and the recorded digest of its bytes (a part
        written over by anything else fails, even with the same size and row count); records from
        before digests were kept are checked by size and the rows in the Parquet footer. A remote
        part by the size and ETag one listing gives: reading every part back would cost a
        download per part per run, and an object is written whole or not at all.
        """
        if self.local is None:
            listing = self._listing(detail=True)
            return {name for name, rec in expected.items()
                    if (got := listing.get(name)) is not None and got["size"] == rec.size
                    and (rec.etag is None or got.get("etag") == rec.etag)}
        good = set()
        for name, rec in expected.items():
            path = self.local / name
            try:
                if path.stat().st_size != rec.size:
                    continue
                if rec.part_digest is not None:
                    ok = file_digest(path) == rec.part_digest
                else:
                    ok = pq.read_metadata(path).num_rows == rec.rows
            except (OSError, pa.ArrowInvalid):
                continue
            if ok:
                good.add(name)
        return good

    def etag(self, name: str) -> str | None:
        """A remote object's ETag as the store reports it (None locally, or when it has none)."""
        if self.local is not None:
            return None
        fs, root = self._remote()
        info = self._call(f"look up {name} in", lambda: fs.info(f"{root}/{name}", refresh=True))
        return _etag_of(info)

    # -- which job owns the folder ---------------------------------------------------------

    def claim(self, job_name: str, checkpoint: Path) -> bool:
        """Make sure this folder belongs to this job (recording it on first use); a folder that
        another job writes is refused, before anything is sent or removed: two jobs in one folder
        delete each other's temporary files and take each other's part files for their own.
        True when this call recorded it (see `unclaim`)."""
        # The name is the identity: a job whose files moved (and its checkpoint path with them)
        # still owns its folder; the checkpoint is recorded to tell the user where the owner lives.
        text = json.dumps({"job": job_name, "checkpoint": str(checkpoint),
                           "claimed": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n"
        # Remotely, one listing first: it names a missing bucket plainly, and spares a GET.
        found = self._read_owner() if self.local is not None or OWNER_FILE in self._listing() else None
        if found is None:
            found = self._create_owner(text)
            if found is None:
                return True
        if found.get("job") != job_name:
            raise JobError(
                f"[output] path: {self} belongs to the job {found.get('job')!r} (checkpoint {found.get('checkpoint')}); "
                f"two jobs cannot share an output folder: choose another [output] path, or delete "
                f"{OWNER_FILE} there if that job and its checkpoint are gone"
            )
        return False

    def unclaim(self, created_folder: bool) -> None:
        """Undo a claim made by a run refused before it sent anything: the owner file goes, and the
        folder too if the claim made it and it is empty (a refused run leaves nothing behind)."""
        self.remove(OWNER_FILE)
        if created_folder and self.local is not None:
            with contextlib.suppress(OSError):
                self.local.rmdir()

    def _read_owner(self) -> dict[str, Any] | None:
        if self.local is not None:
            try:
                raw = (self.local / OWNER_FILE).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise JobError(f"[output] path: cannot read {self.local / OWNER_FILE} ({exc.strerror})") from None
        else:
            fs, root = self._remote()

            def read() -> bytes | None:
                try:
                    return fs.cat_file(f"{root}/{OWNER_FILE}")
                except FileNotFoundError:
                    return None

            raw = self._call(f"read {OWNER_FILE} in", read)
            if raw is None:
                return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise JobError(f"[output] path: {OWNER_FILE} in {self} is damaged; delete it if this folder is this job's")
        return data

    def _create_owner(self, text: str) -> dict[str, Any] | None:
        """Write the owner file; None when this call made it, else the owner another process
        recorded first (locally O_EXCL decides; an object store has no such thing: last put wins)."""
        if self.local is None:
            self.write(OWNER_FILE, text.encode())
            return None
        self.local.mkdir(parents=True, exist_ok=True)
        path = self.local / OWNER_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return self._read_owner()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return None

    def _listing(self, detail: bool = False) -> dict[str, Any]:
        """name -> size (or, with `detail`, {"size", "etag"}) of every object directly in the remote folder."""
        fs, root = self._remote()

        def listing() -> dict[str, Any]:
            try:  # refresh: another process (a Ray worker) may have written since the last listing
                entries = fs.ls(root, detail=True, refresh=True)
            except FileNotFoundError:
                bucket = root.split("/")[0]
                if bucket and bucket != root and not fs.exists(bucket):
                    raise JobError(f"[output] path: {bucket} does not exist at {self}; create it (or fix the URL), "
                                   f"then run again") from None
                return {}  # the folder is made by the first write
            out: dict[str, Any] = {}
            for e in entries:
                if e.get("type") == "file":
                    name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                    size = int(e.get("size") or 0)
                    out[name] = {"size": size, "etag": _etag_of(e)} if detail else size
            return out

        return self._call("list", listing)

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        """A part's columns; None when the part is not there."""
        if self.local is not None:
            path = self.local / name
            return pq.read_table(path, columns=columns) if path.exists() else None
        fs, root = self._remote()

        def read() -> pa.Table | None:
            try:
                with fs.open(f"{root}/{name}", "rb") as f:
                    return pq.read_table(f, columns=columns)
            except FileNotFoundError:
                return None

        return self._call(f"read {name} in", read)

    def read_all(self) -> pa.Table:
        """Every part file's rows, in shard order (the manifest's): the output dataset read back."""
        names = sorted(n for n in self.names() if n.startswith("part-") and n.endswith(".parquet"))
        parts = [t for name in names if (t := self.read_table(name)) is not None]
        return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})

    def remove(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
            return
        fs, root = self._remote()
        self._call(f"remove {name} from", lambda: fs.rm_file(f"{root}/{name}"))

    def secrets(self) -> list[str]:
        """Values that must never be shown: storage_options' credentials and the backends' env vars."""
        return storage_secrets(self._options)

    def scrub(self, message: str) -> str:
        return Redactor(self.secrets(), placeholder="[secret]").scrub(message)


def storage_secrets(options: Mapping[str, Any]) -> list[str]:
    """Values that must never be shown: `options`' credentials (redact.option_secrets) and the
    backends' environment variables; the longer first."""
    found = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)] + option_secrets(dict(options))
    return sorted(set(found), key=len, reverse=True)  # a secret inside a longer one: the longer first


def storage_failure(key: str, what: str, place: str, exc: BaseException, options: Mapping[str, Any], then: str) -> JobError:
    """The one shape of a storage backend's failure: one line naming the key, what was done where,
    the backend's own words with every secret scrubbed, and what to check."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    scrubbed = Redactor(storage_secrets(options), placeholder="[secret]").scrub(detail)
    return JobError(f"{key}: could not {what} {place}: {scrubbed} ({type(exc).__name__}); check the URL, the "
                    f"credentials and {key.split()[0]} storage_options, then {then}")


def _etag_of(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "e_tag"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None


def _translate(store: PartStore, what: str, exc: BaseException) -> JobError:
    """The one place a storage backend's failure becomes a JobError: one line, secrets scrubbed."""
    return storage_failure("[output] path", what, str(store), exc, store._options,
                           "run again (answers so far are kept in the checkpoint)")
