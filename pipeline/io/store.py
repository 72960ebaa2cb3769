"""A store: a folder, local or in a bucket, behind which the output and the checkpoint live.

    store = open_store(job.output.path, job.output.storage_options)   # LocalStore or FsspecStore
    store.write("part-000003.parquet", data)    # whole or not at all: Written(size, digest, etag)
    store.create("_pipeline_job.json", data)    # only if absent, else FileExistsError
    store.read("plan.json")                     # bytes, None when missing
    store.read_many(names)                      # {name: bytes} of those there (a bucket: at once)
    store.listing()                             # {name: Entry(size, etag)} of the files in it
    with store.open("part-000003.parquet") as f: pq.read_table(f)    # FileNotFoundError: missing
    store.remove(name); store.remove_many(names); store.child("journal"); store.clear()
    bucket.replace("lock", data, if_match=etag); bucket.stat(name); bucket.walk()   # FsspecStore only

`LocalStore` is a POSIX folder (pipeline.io.durable: temporary name, fsync, rename, fsync of the
folder; O_EXCL for a create). It alone can also append durably (`append`: O_APPEND of whole lines
and fsync, under a flock where several processes append) and cut a torn tail (`read_lines`).

`FsspecStore` is an fsspec URL (s3://, gs://, az://, memory://, ...). A write is one put of the
whole bytes, visible whole or not at all; a create a conditional put (S3 `If-None-Match: *`, a 412
is FileExistsError); `replace` a compare-and-swap (s3fs hands `pipe_file`'s extra keywords to
`put_object`: `IfMatch=etag`; its 412, an OSError(EINVAL), is made a `Conflict` here). fsspec's
generic create checks then writes: `conditional` says whether the backend sends both conditions to
its server (`SWAPS`). A `guard` runs before every change (a bucket checkpoint's lease fence).

fsspec and its backend are imported only for a URL. Credentials (pipeline.io.credentials) are
scrubbed from every message, and a bucket's failures become a one-line JobError in ONE place,
`FsspecStore._call` (a local folder's failures stay OSErrors: the engine words a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, ContextManager, NamedTuple, Protocol, TypeVar

from ..config.urls import check_url, display
from ..errors import JobError
from .credentials import storage_failure, storage_secrets
from .durable import Written, atomic_write, bytes_digest, create_exclusive, durable_append, file_digest, read_lines

__all__ = ["Store", "LocalStore", "FsspecStore", "Entry", "Written", "Data", "Conflict", "open_store", "storage_secrets",
           "storage_failure"]

T = TypeVar("T")
Data = bytes | Callable[[IO[bytes]], object]  # the bytes, or a function writing them into a file
# What an fsspec backend can be asked, by its filesystem class. SWAPS: it sends If-None-Match and
# If-Match to the server (a create and a compare-and-swap another machine can rely on). ONE_GET: the
# read arguments that make a whole-object read one GET (s3fs asks the size first otherwise: a HEAD,
# and for a missing object a listing too). ONE_LIST: a folder is listed by its one-listing call
# (s3fs's `_lsdir`), as its `ls` of an empty folder lists the parent too and `find` adds a HEAD and a
# listing: a folder not made yet (a first run's commits, a new shard's journal) costs one LIST.
S3FS = "s3fs.core.S3FileSystem"
SWAPS, ONE_LIST = (S3FS,), (S3FS,)
ONE_GET: dict[str, dict[str, Any]] = {S3FS: {"max_concurrency": 1}}
_SEEN: set[str] = set()  # buckets found to exist


class Conflict(Exception):
    """A compare-and-swap found the object changed (or gone) since its ETag was read: HTTP 412."""


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
    def create(self, name: str, data: bytes) -> Written: ...  # whole, only if absent: else FileExistsError
    def read_many(self, names: list[str]) -> dict[str, bytes]: ...  # those there; a bucket fetches them at once
    def remove(self, name: str) -> None: ...
    def remove_many(self, names: list[str]) -> None: ...
    def clear(self) -> None: ...  # every object in it (a child's too, locally)
    def digest(self, name: str) -> str | None: ...  # of its bytes where reading them is cheap; None in a bucket


def open_store(location: Path | str, options: Mapping[str, Any] | None = None) -> Store:
    """A Path is a local folder, a str an fsspec URL (the job loader told them apart)."""
    if isinstance(location, str):
        return FsspecStore(location, options)
    return LocalStore(location)


class LocalStore:
    """A POSIX folder, made on the first write."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __str__(self) -> str:
        return str(self.folder)

    def where(self, name: str) -> str:
        return str(self.folder / name)

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.folder / name)

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

    def create(self, name: str, data: bytes) -> Written:
        create_exclusive(self.folder / name, data)
        return Written(len(data))

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        return {name: data for name in names if (data := self.read(name)) is not None}

    def append(self, name: str, data: bytes, *, exclusive: bool = False, sync: bool = True) -> None:
        """Whole lines, durable when it returns (pipeline.io.durable.durable_append)."""
        durable_append(self.folder / name, data, exclusive=exclusive, sync=sync)

    def read_lines(self, name: str, *, repair: bool = False, exclusive: bool = False) -> bytes | None:
        return read_lines(self.folder / name, repair=repair, exclusive=exclusive)

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def remove_many(self, names: list[str]) -> None:
        for name in names:
            self.remove(name)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def digest(self, name: str) -> str | None:
        return file_digest(self.folder / name)


class FsspecStore:
    """A folder in an fsspec filesystem (`s3://bucket/prefix`), reached on first use."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, label: str = "[output] path",
                 guard: Callable[[], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.label = label  # which setting the messages name
        self._options = dict(options or {})
        self._fs: Any = None
        self._root = self._kind = ""
        self.guard = guard  # runs before every change (raises to refuse it)

    def __str__(self) -> str:
        return display(self.url)

    def where(self, name: str) -> str:
        return f"{self}/{name}"

    def child(self, name: str) -> FsspecStore:
        return FsspecStore(f"{self.url}/{name}", self._options, self.label, self.guard)

    @property
    def conditional(self) -> bool:
        """Whether its backend sends If-None-Match and If-Match to the server (see SWAPS)."""
        return self._remote()[2] in SWAPS

    def _entries(self, *, below: bool = False) -> list[dict[str, Any]]:
        """The objects in the folder (`below`: under it, child folders' too), asked of the server
        now (another process, a Ray worker, may have written since); not a child folder, nor a key
        ending in "/" (a console's folder placeholder). FileNotFoundError: the folder (a bucket: the
        bucket itself) is not there."""
        fs, root, kind = self._remote()
        if kind in ONE_LIST:
            from fsspec.asyn import sync

            found = sync(fs.loop, fs._lsdir, root, refresh=True, delimiter="" if below else "/")
        elif below:
            fs.invalidate_cache(root)
            found = fs.find(root, detail=True).values()
        else:
            found = fs.ls(root, detail=True, refresh=True)
        return [e for e in found if e.get("type") == "file" and not e["name"].endswith("/")]

    def _change(self) -> None:
        if self.guard is not None:
            self.guard()

    def make(self) -> bool:
        return False  # a bucket has no folders: the first object makes the prefix

    def unmake(self) -> None:
        pass

    def _remote(self) -> tuple[Any, str, str]:
        """(fsspec filesystem, folder path in it, its class: see SWAPS), made on first use."""
        if self._fs is None:
            check_url(self.url, self.label)
            import fsspec

            self._fs, root = self._call("reach", lambda: fsspec.core.url_to_fs(self.url, **self._options))
            self._root, self._kind = root.rstrip("/"), f"{type(self._fs).__module__}.{type(self._fs).__qualname__}"
        return self._fs, self._root, self._kind

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
        fs, root, _ = self._remote()

        def listing() -> dict[str, Entry]:
            try:
                entries = self._entries()
            except FileNotFoundError:
                bucket = root.split("/")[0]
                if bucket and bucket != root and bucket not in _SEEN and not fs.exists(bucket):
                    raise JobError(f"{self.label}: {bucket} does not exist at {self}; create it (or fix the URL), "
                                   f"then run again") from None
                _SEEN.add(bucket)  # asked once per process (a checkpoint lists many folders not made yet)
                return {}  # the folder is made by the first write
            found = {e["name"].rsplit("/", 1)[-1]: Entry(int(e.get("size") or 0), _etag_of(e)) for e in entries}
            return dict(sorted(found.items()))

        return self._call("list", listing)

    def read(self, name: str) -> bytes | None:
        fs, root, kind = self._remote()
        try:
            return self._call(f"read {name} in", lambda: fs.cat_file(f"{root}/{name}", **ONE_GET.get(kind, {})),
                              (FileNotFoundError,))
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

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """Fetched side by side (fsspec's `cat` of a list); those missing are left out."""
        fs, root, kind = self._remote()
        got = self._call("read", lambda: fs.cat([f"{root}/{n}" for n in names], on_error="return",
                                                **ONE_GET.get(kind, {}))) if names else {}
        out = {path.rsplit("/", 1)[-1]: data for path, data in got.items() if not isinstance(data, FileNotFoundError)}
        if (bad := next((d for d in out.values() if isinstance(d, Exception)), None)) is not None:
            raise self._translated("read objects in", bad)
        return out

    def write(self, name: str, data: Data, *, digest: bool = False,
              before_replace: Callable[[], None] | None = None) -> Written:
        """One put of the whole object; `before_replace` never runs (a put has no moment between
        written and visible)."""
        body = _bytes_of(data)
        fs, path = self._remote()[0], self._path(name)
        self._change()
        reply = self._call(f"write {name} in", lambda: fs.pipe_file(path, body))
        return self._written(name, path, body, reply, digest)

    def _written(self, name: str, path: str, body: bytes, reply: Any, digest: bool = False) -> Written:
        etag = _etag_of(reply) if isinstance(reply, Mapping) else None  # else (a multipart upload): ask
        etag = etag or _etag_of(self._call(f"look up {name} in", lambda: self._remote()[0].info(path, refresh=True)))
        return Written(len(body), bytes_digest(body) if digest else None, etag)

    def create(self, name: str, data: bytes) -> Written:
        fs, path = self._remote()[0], self._path(name)
        self._change()
        reply = self._call(f"create {name} in", lambda: fs.pipe_file(path, data, mode="create"), (FileExistsError,))
        return self._written(name, path, data, reply)

    def replace(self, name: str, data: bytes, *, if_match: str) -> Written:
        """Write `name` only if its ETag is still `if_match` (S3 If-Match on one put), else Conflict."""
        fs, path = self._remote()[0], self._path(name)
        self._change()
        try:
            reply = fs.pipe_file(path, data, IfMatch=f'"{if_match}"')
        except Exception as exc:  # noqa: BLE001 - every backend's failure type is foreign here
            if _precondition_failed(exc):
                raise Conflict(f"{self.where(name)} changed since it was read") from None
            if isinstance(exc, FileNotFoundError):  # gone: no ETag can match
                raise Conflict(f"{self.where(name)} is gone") from None
            raise self._translated(f"replace {name} in", exc) from None
        return self._written(name, path, data, reply)

    def stat(self, name: str) -> Entry | None:
        """Its size and ETag, asked of the server now (None when missing)."""
        fs, path = self._remote()[0], self._path(name)
        try:
            info = self._call(f"look up {name} in", lambda: fs.info(path, refresh=True), (FileNotFoundError,))
        except FileNotFoundError:
            return None
        return Entry(int(info.get("size") or 0), _etag_of(info))

    def walk(self) -> list[str]:
        """Every object under it, child folders' too, relative to it, in one (paged) listing."""
        root = self._remote()[1]
        try:
            entries = self._call("list", lambda: self._entries(below=True), (FileNotFoundError,))
        except FileNotFoundError:
            return []
        return sorted(e["name"][len(root) + 1:] for e in entries)

    def remove(self, name: str) -> None:
        fs, path = self._remote()[0], self._path(name)
        self._change()
        with contextlib.suppress(FileNotFoundError):
            self._call(f"remove {name} from", lambda: fs.rm_file(path), (FileNotFoundError,))

    def remove_many(self, names: list[str]) -> None:
        """One request per thousand names where the backend can (S3 DeleteObjects)."""
        fs, root, _ = self._remote()
        if not names:
            return
        self._change()
        with contextlib.suppress(FileNotFoundError):
            self._call("remove objects from", lambda: fs.rm([f"{root}/{n}" for n in names]), (FileNotFoundError,))

    def clear(self) -> None:
        """Every object under it, child folders' too."""
        fs, root, _ = self._remote()
        self._change()
        fs.invalidate_cache(root)  # another process (a Ray worker) may have written since
        with contextlib.suppress(FileNotFoundError):
            self._call("clear", lambda: fs.rm(root, recursive=True), (FileNotFoundError,))

    def digest(self, name: str) -> str | None:
        return None  # reading every object back would cost a download each; an ETag stands in


def _bytes_of(data: Data) -> bytes:
    if not callable(data):
        return data
    import pyarrow as pa  # an in-memory sink pyarrow writes into without a Python file object

    sink = pa.BufferOutputStream()
    data(sink)
    return bytes(sink.getvalue().to_pybytes())


def _precondition_failed(exc: BaseException) -> bool:
    """A failed If-Match, as s3fs raises it: OSError(EINVAL) caused by a PreconditionFailed (412)."""
    response = getattr(exc.__cause__, "response", None)
    if isinstance(response, Mapping):
        return (response.get("Error") or {}).get("Code") == "PreconditionFailed"
    return isinstance(exc, OSError) and exc.errno == errno.EINVAL and "pre-condition" in str(exc).lower()


def _etag_of(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "e_tag"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None
