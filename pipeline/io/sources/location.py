"""Where a source's files are: one filesystem (fsspec's for a URL, plain os calls for a local
path), a root, and the files under it in sorted path order.

    place = Place(cfg)                        # [input] path, storage_options
    listing = place.listing(accept)           # Listing(single, files): names relative to the root
    with place.open(plan, "part-3.parquet") as f: ...

A path that names one file is a one-file source (`single`): its rows keep the ids they had before
sources existed (row numbers). Anything else (a folder, a glob, a list) is read as a set of files
named relative to a root: the folder, the fixed part of the glob, or the folder a list's items
share. In a folder, names starting with "." or "_" are skipped as pyarrow.dataset skips them
(`_SUCCESS`, `.crc` files, `_delta_log/`). The root is found from the path's text alone, so a Ray
worker reading one shard lists nothing.

A storage backend's failure (a missing bucket, refused credentials, an endpoint that does not
answer) becomes one JobError line with every secret scrubbed (pipeline.io.storage).
"""

from __future__ import annotations

import glob as globbing
import os
import posixpath
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, TypeVar

from ...config import InputConfig
from ...config.inputs import has_glob, is_hidden
from ...errors import JobError
from ..checks import short
from ..plan import FileInfo
from ..store import storage_failure

__all__ = ["Place", "Listing"]

T = TypeVar("T")


@dataclass(frozen=True)
class Listing:
    single: bool  # the path names one file
    files: list[FileInfo]  # sorted by name
    skipped: dict[str, int]  # suffix -> files of the folder not taken (the format reads other files)


class Place:
    """The files of an `[input]`: listed, opened, and the errors of their storage named once."""

    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg
        self._fs: Any = None

    # -- the filesystem --------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of a URL path (made on first use); None for a local path."""
        if self._fs is None and self.cfg.remote:
            import fsspec

            url = str(self.cfg.items[0])
            self._fs = self.call("reach", url, lambda: fsspec.core.url_to_fs(url, **self.cfg.storage_options)[0])
        return self._fs

    def _items(self) -> list[str]:
        """The path's items as paths of the filesystem (a URL without its protocol)."""
        if not self.cfg.remote:
            return [str(item) for item in self.cfg.items]
        return [self.fs._strip_protocol(str(item)).rstrip("/") for item in self.cfg.items]

    def call(self, what: str, where: str, op: Callable[[], T]) -> T:
        """Run a storage operation; its failure is one line naming it (FileNotFoundError passes)."""
        try:
            return op()
        except (JobError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - every backend's failure type is foreign here
            raise storage_failure("[input] path", what, where, exc, self.cfg.storage_options,
                                  "run again") from None

    def failure(self, what: str, where: str, exc: OSError) -> JobError:
        """A file that could not be read while planning: one line (a URL's with secrets scrubbed)."""
        if self.cfg.remote:
            return storage_failure("[input] path", what, where, exc, self.cfg.storage_options, "run again")
        return JobError(f"[input] path: could not {what} {where} ({exc.strerror or short(exc)})")

    # -- the root --------------------------------------------------------------------------

    def root(self, single: bool) -> str:
        """The folder names are relative to (for a one-file source, the file itself)."""
        items = self._items()
        if single:
            return items[0]
        if len(items) == 1 and not has_glob(items[0]):
            return items[0]  # a folder
        folders = [_fixed_part(i) if has_glob(i) else posixpath.dirname(i) for i in items]
        if len(items) == 1:
            return folders[0]
        return _common(folders)

    def path_of(self, single: bool, name: str) -> str:
        root = self.root(single)
        return root if single else f"{root.rstrip('/')}/{name}"

    def shown(self, single: bool, name: str) -> str:
        """A file as messages name it: its URL (without credentials) or its local path."""
        path = self.path_of(single, name)
        if not self.cfg.remote:
            return path
        protocol = str(self.cfg.items[0]).split("://", 1)[0]
        return f"{protocol}://{path}"

    # -- listing ---------------------------------------------------------------------------

    def listing(self, accept: Callable[[str], bool]) -> Listing:
        """Every file of the path that `accept` takes by its name, sorted; a folder's or a glob's
        other files are counted by suffix (for the message a mixed folder gets)."""
        items = self._items()
        if self.cfg.remote:  # a listing cached by an earlier run in this process would hide new files
            self.fs.invalidate_cache()
        found: dict[str, FileInfo] = {}
        skipped: dict[str, int] = {}
        single = False
        kinds = [self._kind(item) for item in items]
        if len(items) == 1 and kinds[0] == "file" and not isinstance(self.cfg.path, tuple):
            single = True
        root = self.root(single)
        for item, kind in zip(items, kinds):
            for path, size, stamp in self._files(item, kind):
                name = posixpath.basename(path) if single else posixpath.relpath(path, root)
                inside = posixpath.relpath(path, item if kind == "folder" else root)
                if kind != "file" and any(is_hidden(part) for part in inside.split("/")):
                    continue
                if kind != "file" and not accept(name):
                    suffix = os.path.splitext(name)[1].lower() or "(none)"
                    skipped[suffix] = skipped.get(suffix, 0) + 1
                    continue
                found[name] = FileInfo(name, size, stamp)
        return Listing(single, [found[n] for n in sorted(found)], skipped)

    def _kind(self, item: str) -> str:
        """"glob", "folder" or "file"; a JobError naming a path that is not there."""
        if has_glob(item):
            return "glob"
        if not self.cfg.remote:
            if os.path.isdir(item):
                return "folder"
            if os.path.exists(item):
                return "file"
            raise JobError(f"[input] path: {item} not found")
        fs = self.fs
        try:
            info = self.call("look up", self._url(item), lambda: fs.info(item))
        except FileNotFoundError:
            self._missing(item)
        return "folder" if info.get("type") == "directory" else "file"

    def _missing(self, item: str) -> None:
        bucket = item.split("/", 1)[0]
        fs = self.fs
        if bucket != item and not self.call("look up", self._url(bucket), lambda: fs.exists(bucket)):
            raise JobError(f"[input] path: the bucket {self._url(bucket)} does not exist (or these credentials "
                           f"cannot see it); fix [input] path or the credentials")
        raise JobError(f"[input] path: {self._url(item)} not found")

    def _url(self, path: str) -> str:
        return f"{str(self.cfg.items[0]).split('://', 1)[0]}://{path}"

    def _files(self, item: str, kind: str) -> list[tuple[str, int, str]]:
        """(path, size, stamp) of every file an item names."""
        if not self.cfg.remote:
            if kind == "folder":
                paths = _walk(item)
            elif kind == "glob":
                paths = [p for p in globbing.glob(item, recursive=True) if os.path.isfile(p)]
            else:
                paths = [item]
            return [(p, (st := os.stat(p)).st_size, str(st.st_mtime_ns)) for p in paths]
        fs = self.fs
        if kind == "folder":
            entries = self.call("list", self._url(item), lambda: fs.find(item, detail=True))
        elif kind == "glob":
            entries = self.call("list", self._url(item), lambda: fs.glob(item, detail=True))
        else:
            entries = {item: self.call("look up", self._url(item), lambda: fs.info(item))}
        return [(path.rstrip("/"), int(info.get("size") or 0), _stamp(info))
                for path, info in entries.items() if info.get("type", "file") == "file"]

    # -- reading ---------------------------------------------------------------------------

    def local_path(self, single: bool, name: str) -> str | None:
        """The OS path of a local file (pyarrow maps it), None for a URL."""
        return None if self.cfg.remote else self.path_of(single, name)

    def open(self, single: bool, name: str) -> BinaryIO:
        """A file for reading; a missing one raises FileNotFoundError, a storage failure a JobError."""
        path = self.path_of(single, name)
        if not self.cfg.remote:
            return open(path, "rb")
        fs = self.fs
        return self.call("open", self._url(path), lambda: fs.open(path, "rb"))


def _stamp(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "e_tag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("LastModified", "mtime", "last_modified", "updated"):
        if info.get(key):
            return str(info[key])
    return ""


def _fixed_part(pattern: str) -> str:
    """The folder of a glob before its first wildcard."""
    head = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _common(folders: list[str]) -> str:
    absolute = folders[0].startswith("/")
    common = os.path.commonpath([f.lstrip("/") or "." for f in folders]) if not absolute else os.path.commonpath(folders)
    return "" if common == "." else common


def _walk(folder: str) -> list[str]:
    """Every file under a local folder, hidden folders not entered."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        found += [os.path.join(top, f) for f in files]
    return found
