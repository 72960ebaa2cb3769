"""A store: a folder, local or in a bucket, behind which the output and the checkpoint live.

    store = open_store(job.output.path, job.output.storage_options)   # LocalStore or FsspecStore
    store.write("part-000003.parquet", data)    # whole or not at all: Written(size, digest, etag)
    store.create("_pipeline_job.json", data)    # only if absent, else FileExistsError
    store.read("plan.json")                     # bytes, None when missing
    store.listing()                             # {name: Entry(size, etag)} of the files in it
    with store.open("part-000003.parquet") as f: pq.read_table(f)    # FileNotFoundError: missing
    store.remove(name); store.child("journal"); store.clear()

`LocalStore` is a POSIX folder (pipeline.io.durable: temporary name, fsync, rename, fsync of the
folder; O_EXCL for a create). It alone can also append durably (`append`: O_APPEND of whole lines
and fsync, under a flock where several processes append) and cut a torn tail (`read_lines`).

`FsspecStore` is an fsspec URL (s3://, gs://, az://, memory://, ...). An object is visible whole
or not at all, so a write is one put of the complete bytes (a multipart upload above 100 MB is
still whole-or-nothing) and needs no temporary name. A create is a conditional put
(`pipe_file(mode="create")`: S3 `If-None-Match: *`, GCS generation-match 0, Azure
`If-None-Match`); a failed condition (HTTP 412) is FileExistsError. What a bucket cannot do: there
is no append (a log becomes immutable objects, one per flush, read back by listing them), no fsync
(a put that returned is durable; nothing is durable before), no flock and no rename (a lock becomes
a lease object: created conditionally, renewed by compare-and-swap on its ETag). fsspec's
generic `pipe_file(mode="create")` checks existence then writes, which is not atomic: only
backends that send the condition to the server (s3fs, gcsfs, adlfs 2024.12+) make a create safe
between two machines. Listings carry the ETag, and a write returns it, so a compare-and-swap
replace (S3 `If-Match`, GCS `ifGenerationMatch`) has what it needs: s3fs passes a single-part
`pipe_file`'s extra keywords to `put_object` (`IfMatch=etag`), and its 412 then comes back as an
OSError(EINVAL), not FileExistsError (s3fs maps only the If-None-Match condition).

fsspec and its backend are imported only for a URL. Credentials come from the backend's usual
sources (AWS_*, ~/.aws, ...) or from `storage_options`; those values are scrubbed from every
message, and a bucket's failures become a one-line JobError in ONE place, `FsspecStore._call`
(a local folder's failures stay OSErrors: the engine words a full disk as a local failure).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, ContextManager, NamedTuple, Protocol, TypeVar

from ..config.urls import check_url, display
from ..errors import JobError
from ..redact import Redactor, storage_secrets
from .durable import Written, atomic_write, bytes_digest, create_exclusive, durable_append, file_digest, read_lines

__all__ = ["Store", "LocalStore", "FsspecStore", "Entry", "Written", "Data", "open_store", "storage_failure"]

T = TypeVar("T")
Data = bytes | Callable[[IO[bytes]], object]  # the bytes, or a function writing them into a file


class Entry(NamedTuple):
    size: int
    etag: str | None  # an object store's (None for a file)


class Store(Protocol):
    """A folder of named objects, flat (a sub-folder is a `child` store). Missing is an answer,
    not a failure: `read` gives None, `open` raises FileNotFoundError, `remove` does nothing."""

    def __str__(self) -> str: ...
    def where(self, name: str) -> str: ...  # the object's place, as shown to a person
    def child(self, name: str) -> Store: ...
    def make(self) -> bool: ...  # True when this call made the folder (a bucket has none: False)
    def unmake(self) -> None: ...  # the folder goes if it is empty (a bucket: nothing to do)
    def names(self) -> list[str]: ...  # the objects directly in it, sorted (no child folders)
    def listing(self) -> dict[str, Entry]: ...  # the same with sizes and ETags, in one listing
    def read(self, name: str) -> bytes | None: ...
    def open(self, name: str) -> ContextManager[Any]: ...  # a binary file pyarrow reads
    def write(self, name: str, data: Data, *, digest: bool = False,
              before_replace: Callable[[], None] | None = None) -> Written: ...  # whole or not at all
    def create(self, name: str, data: bytes) -> None: ...  # whole, only if absent: else FileExistsError
    def remove(self, name: str) -> None: ...
    def clear(self) -> None: ...  # every object in it (a child's too, locally)
    def digest(self, name: str) -> str | None: ...  # of its bytes where reading them is cheap; None in a bucket
    def secrets(self) -> list[str]: ...
    def scrub(self, message: str) -> str: ...


def open_store(location: Path | str, options: Mapping[str, Any] | None = None, label: str = "[output] path") -> Store:
    """A Path is a local folder, a str an fsspec URL (the job loader told them apart)."""
    if isinstance(location, str):
        return FsspecStore(location, options, label)
    return LocalStore(location, options)


def storage_failure(label: str, what: str, place: str, exc: BaseException, options: Mapping[str, Any],
                    then: str) -> JobError:
    """The one shape of a backend's failure: one line naming the setting, what was done where, the
    backend's own words with every secret scrubbed, and what to check (the output's store and the
    input's sources both say it so)."""
    if isinstance(exc, JobError):
        return exc
    detail = " ".join(str(exc).split()) or type(exc).__name__
    scrubbed = Redactor(storage_secrets(options), placeholder="[secret]").scrub(detail)
    return JobError(f"{label}: could not {what} {place}: {scrubbed} ({type(exc).__name__}); check the URL, the "
                    f"credentials and {label.split()[0]} storage_options, then {then}")


class _Secrets:
    _options: dict[str, Any]

    def secrets(self) -> list[str]:
        return storage_secrets(self._options)

    def scrub(self, message: str) -> str:
        return Redactor(self.secrets(), placeholder="[secret]").scrub(message)


class LocalStore(_Secrets):
    """A POSIX folder, made on the first write."""

    def __init__(self, folder: Path, options: Mapping[str, Any] | None = None) -> None:
        self.folder = folder
        self._options = dict(options or {})

    def __str__(self) -> str:
        return str(self.folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def where(self, name: str) -> str:
        return str(self.folder / name)

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.folder / name, self._options)

    def make(self) -> bool:
        made = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        return made

    def unmake(self) -> None:
        with contextlib.suppress(OSError):
            self.folder.rmdir()

    def _files(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.folder) as entries:
                # sorted, as a bucket lists its keys; a child folder is no object of this one
                return sorted((e for e in entries if e.is_file()), key=lambda e: e.name)
        except FileNotFoundError:
            return []

    def names(self) -> list[str]:
        return [e.name for e in self._files()]

    def listing(self) -> dict[str, Entry]:
        out = {}
        for e in self._files():
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                out[e.name] = Entry(e.stat().st_size, None)
        return out

    def read(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def open(self, name: str) -> ContextManager[Any]:
        import pyarrow as pa  # Arrow's own file: pyarrow reads it without a Python file object

        return pa.OSFile(str(self.folder / name), "r")  # FileNotFoundError when missing

    def write(self, name: str, data: Data, *, digest: bool = False,
              before_replace: Callable[[], None] | None = None) -> Written:
        return atomic_write(self.folder / name, data, digest=digest, before_replace=before_replace)

    def create(self, name: str, data: bytes) -> None:
        create_exclusive(self.folder / name, data)

    def append(self, name: str, data: bytes, *, exclusive: bool = False, sync: bool = True) -> None:
        """Whole lines, durable when it returns (pipeline.io.durable.durable_append)."""
        durable_append(self.folder / name, data, exclusive=exclusive, sync=sync)

    def read_lines(self, name: str, *, repair: bool = False, exclusive: bool = False) -> bytes | None:
        return read_lines(self.folder / name, repair=repair, exclusive=exclusive)

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def digest(self, name: str) -> str | None:
        return file_digest(self.folder / name)


class FsspecStore(_Secrets):
    """A folder in an fsspec filesystem (`s3://bucket/prefix`), reached on first use."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, label: str = "[output] path") -> None:
        self.url = url.rstrip("/")
        self.label = label  # which setting the messages name
        self._options = dict(options or {})
        self._fs: Any = None
        self._root = ""

    def __str__(self) -> str:
        return display(self.url)

    def where(self, name: str) -> str:
        return f"{self}/{name}"

    def child(self, name: str) -> FsspecStore:
        return FsspecStore(f"{self.url}/{name}", self._options, self.label)

    def make(self) -> bool:
        return False  # a bucket has no folders: the first object makes the prefix

    def unmake(self) -> None:
        pass

    def _remote(self) -> tuple[Any, str]:
        """(fsspec filesystem, folder path in it), made on first use."""
        if self._fs is None:
            check_url(self.url, self.label)
            import fsspec

            self._fs, root = self._call("reach", lambda: fsspec.core.url_to_fs(self.url, **self._options))
            self._root = root.rstrip("/")
        return self._fs, self._root

    def _call(self, what: str, op: Callable[[], T], answers: tuple[type[Exception], ...] = ()) -> T:
        """Every backend call goes through here (or `open`), and so through `_translated`.
        `answers`: failures that are the caller's answer (missing, a failed condition), passed on."""
        try:
            return op()
        except answers:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend's failure type is foreign here
            raise self._translated(what, exc) from None

    def _translated(self, what: str, exc: Exception) -> JobError:
        """The one place a backend's failure becomes a one-line JobError, its secrets scrubbed."""
        return storage_failure(self.label, what, str(self), exc, self._options,
                               "run again (answers so far are kept in the checkpoint)")

    def _path(self, name: str) -> str:
        return f"{self._remote()[1]}/{name}"

    def names(self) -> list[str]:
        return list(self.listing())

    def listing(self) -> dict[str, Entry]:
        fs, root = self._remote()

        def listing() -> dict[str, Entry]:
            try:  # refresh: another process (a Ray worker) may have written since the last listing
                entries = fs.ls(root, detail=True, refresh=True)
            except FileNotFoundError:
                bucket = root.split("/")[0]
                if bucket and bucket != root and not fs.exists(bucket):
                    raise JobError(f"{self.label}: {bucket} does not exist at {self}; create it (or fix the URL), "
                                   f"then run again") from None
                return {}  # the folder is made by the first write
            found = {e["name"].rstrip("/").rsplit("/", 1)[-1]: Entry(int(e.get("size") or 0), _etag_of(e))
                     for e in entries if e.get("type") == "file"}
            return dict(sorted(found.items()))

        return self._call("list", listing)

    def read(self, name: str) -> bytes | None:
        fs, path = self._remote()[0], self._path(name)
        try:
            return self._call(f"read {name} in", lambda: fs.cat_file(path), (FileNotFoundError,))
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Any]:
        """Failures while the caller reads are translated too (a damaged object, a dropped connection)."""
        fs, path = self._remote()[0], self._path(name)
        try:
            with fs.open(path, "rb") as f:
                yield f
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - every backend's failure type is foreign here
            raise self._translated(f"read {name} in", exc) from None

    def write(self, name: str, data: Data, *, digest: bool = False,
              before_replace: Callable[[], None] | None = None) -> Written:
        """One put of the whole object; `before_replace` never runs (a put has no moment between
        written and visible)."""
        body = _bytes_of(data)
        fs, path = self._remote()[0], self._path(name)
        reply = self._call(f"write {name} in", lambda: fs.pipe_file(path, body))
        etag = _etag_of(reply) if isinstance(reply, Mapping) else None
        if etag is None:  # a multipart upload (or a backend) that does not say: ask
            etag = _etag_of(self._call(f"look up {name} in", lambda: fs.info(path, refresh=True)))
        return Written(len(body), bytes_digest(body) if digest else None, etag)

    def create(self, name: str, data: bytes) -> None:
        fs, path = self._remote()[0], self._path(name)
        self._call(f"create {name} in", lambda: fs.pipe_file(path, data, mode="create"), (FileExistsError,))

    def remove(self, name: str) -> None:
        fs, path = self._remote()[0], self._path(name)
        with contextlib.suppress(FileNotFoundError):
            self._call(f"remove {name} from", lambda: fs.rm_file(path), (FileNotFoundError,))

    def clear(self) -> None:
        for name in self.names():
            self.remove(name)

    def digest(self, name: str) -> str | None:
        return None  # reading every object back would cost a download each; an ETag stands in


def _bytes_of(data: Data) -> bytes:
    if not callable(data):
        return data
    import pyarrow as pa  # an in-memory sink pyarrow writes into without a Python file object

    sink = pa.BufferOutputStream()
    data(sink)
    return bytes(sink.getvalue().to_pybytes())


def _etag_of(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "e_tag"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None
