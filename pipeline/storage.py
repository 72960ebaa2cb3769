"""Where part files live: a local folder or an fsspec URL (`s3://bucket/prefix`).

    store = PartStore.for_output(job.output)     # [output] path and storage_options
    store.write("part-000003.parquet", data)     # a URL: one put of the complete file
    store.names()                                # the files in the folder
    store.read_table("part-000003.parquet", ["id", "status"])  # None when it is not there

Only the part files may be remote. The checkpoint stays a POSIX path: it needs appends, fsync
and flock, which object stores lack (pipeline.checkpoint).

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

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import JobError
from .redact import Redactor

__all__ = ["PartStore", "is_url", "check_url", "display"]

# Keys of storage_options that name a place, not a secret: kept in messages (they help the fix).
PLAIN_OPTIONS = frozenset({"endpoint_url", "region_name", "region", "anon", "use_ssl", "profile", "project"})
# Credentials the backends read from the environment: scrubbed too, should a message echo one.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN")
_USERINFO = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@]*@")
T = TypeVar("T")


def is_url(text: str) -> bool:
    return "://" in text


def display(location: Path | str) -> str:
    """The output's place as shown in messages and summaries: a URL without user:password@."""
    return _USERINFO.sub(r"\1", location) if isinstance(location, str) else str(location)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _install_hint(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return "pip install 'pipeline[s3]'"
    try:
        from fsspec.registry import known_implementations
    except ImportError:
        return "pip install fsspec and the fsspec backend for it"
    known = known_implementations.get(protocol)
    if known is None:
        return "pip install fsspec and the fsspec backend for it"
    package = known["class"].split(".")[0]
    return f"pip install {package}" if package != "fsspec" else known.get("err", "install its fsspec backend")


def check_url(url: str, where: str) -> None:
    """At job load, before anything is sent: fsspec and the URL's backend are installed."""
    protocol = _protocol(url)
    try:
        import fsspec
    except ImportError:
        raise JobError(f"{where}: {protocol}:// URLs need fsspec and its backend: {_install_hint(protocol)}") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        raise JobError(f"{where}: {protocol}:// URLs need their fsspec backend: {_install_hint(protocol)}") from None
    except ValueError:
        raise JobError(f"{where}: no fsspec backend knows {protocol}:// URLs; "
                       f"use a local folder or a URL such as s3://bucket/prefix") from None


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

    def in_place(self, expected: Mapping[str, tuple[int, int]]) -> set[str]:
        """Names of the parts that are as recorded: {name: (size in bytes, rows)}.

        A local part is checked by size and by the rows its Parquet footer records (a torn or
        truncated file fails). A remote part by the size one listing gives: an object is written
        whole or not at all, and reading every footer would cost a request per part per run.
        """
        if self.local is None:
            sizes = self._listing()
            return {name for name, (size, _) in expected.items() if sizes.get(name) == size}
        good = set()
        for name, (size, rows) in expected.items():
            path = self.local / name
            try:
                if path.stat().st_size == size and pq.read_metadata(path).num_rows == rows:
                    good.add(name)
            except (OSError, pa.ArrowInvalid):
                pass
        return good

    def _listing(self) -> dict[str, int]:
        """name -> size of every object directly in the remote folder."""
        fs, root = self._remote()

        def listing() -> dict[str, int]:
            try:  # refresh: another process (a Ray worker) may have written since the last listing
                entries = fs.ls(root, detail=True, refresh=True)
            except FileNotFoundError:
                bucket = root.split("/")[0]
                if bucket and bucket != root and not fs.exists(bucket):
                    raise JobError(f"[output] path: {bucket} does not exist at {self}; create it (or fix the URL), "
                                   f"then run again") from None
                return {}  # the folder is made by the first write
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                    for e in entries if e.get("type") == "file"}

        return self._call("list", listing)

    def read_table(self, name: str, columns: list[str]) -> pa.Table | None:
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

    def remove(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
            return
        fs, root = self._remote()
        self._call(f"remove {name} from", lambda: fs.rm_file(f"{root}/{name}"))

    def secrets(self) -> list[str]:
        """Values that must never be shown: storage_options' credentials and the backends' env vars."""
        found: list[str] = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]

        def walk(value: Any, key: str) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(v, str(k))
            elif isinstance(value, str) and key not in PLAIN_OPTIONS and len(value) >= 4:
                found.append(value)

        walk(self._options, "")
        return sorted(set(found), key=len, reverse=True)  # a secret inside a longer one: the longer first

    def scrub(self, message: str) -> str:
        return Redactor(self.secrets(), placeholder="[secret]").scrub(message)


def _translate(store: PartStore, what: str, exc: BaseException) -> JobError:
    """The one place a storage backend's failure becomes a JobError: one line, secrets scrubbed."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return JobError(
        f"[output] path: could not {what} {store}: {store.scrub(detail)} ({type(exc).__name__}); check the URL, "
        f"the credentials and [output] storage_options, then run again (answers so far are kept in the checkpoint)"
    )
