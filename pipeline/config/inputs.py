"""`[input]`: where the rows come from. One file, a folder, a glob (`**` recursive), a `.tar`, a
list of any of these, or an fsspec URL of them (`s3://`, `gs://`, `az://`, `file://`), in a
format the path says or `format` names.

    cfg = InputConfig(path=Path("ds"))       # a local folder of Parquet parts: format "parquet"
    cfg.items                                # ("/abs/ds",): the locations, local paths or URLs
    cfg.local_base                           # where relative image paths in its rows resolve

The format is decided here without reading a row: `format` when given; else the suffix of the
file, of the glob's last part, or of every item of a list; else, for a local folder, the first
recognisable file under it. A bucket prefix without a suffix is listed when planned
(pipeline.io.sources). An image folder or WebDataset's image is in the column "image", which
`image_column` then defaults to.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import JobError
from .fields import Table, one_of, setting
from .urls import check_url, display, is_url

__all__ = ["InputConfig", "FORMATS", "MANIFEST_FORMATS", "SUFFIXES", "IMAGE_SUFFIXES", "format_of", "is_hidden",
           "has_glob"]

FORMATS = ("csv", "jsonl", "parquet", "images", "webdataset")
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
SUFFIXES = {**MANIFEST_FORMATS, ".pq": "parquet", ".tar": "webdataset", **{s: "images" for s in IMAGE_SUFFIXES}}
IMAGE_COLUMN = "image"  # where an image folder's or a WebDataset's image is
_LOOK_ENTRIES = 10_000  # directory entries a local folder is looked through for its format


def has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def is_hidden(name: str) -> bool:
    """Skipped in a folder, as pyarrow.dataset does: `_SUCCESS`, `.crc`, `_delta_log/`, `.DS_Store`."""
    return name.startswith((".", "_"))


def format_of(name: str) -> str | None:
    """The format a file's name (or a glob's last part) says, if any."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return SUFFIXES.get(os.path.splitext(base)[1].lower()) if "." in base else None


def _one_location(value: Any, where: str, base: Path) -> Path | str:
    if not isinstance(value, str) or not value:
        raise JobError(f"{where} must be a path, a glob or a URL (or a list of them), not {value!r}")
    value = value.removeprefix("file://")
    if is_url(value):
        check_url(value, where)
        return value
    return (base / value).resolve() if not has_glob(value) else Path(os.path.abspath(base / value))


def _input_path(value: Any, where: str, base: Path) -> Path | str | tuple[Path | str, ...]:
    if not isinstance(value, list):
        return _one_location(value, where, base)
    if not value:
        raise JobError(f"{where} is an empty list; name at least one file, folder or glob")
    items = tuple(_one_location(v, where, base) for v in value)
    kinds = {v.split("://", 1)[0].lower() if isinstance(v, str) else "local" for v in items}
    if len(kinds) > 1:
        raise JobError(f"{where}: a list must stay on one filesystem (it mixes {', '.join(sorted(kinds))})")
    return items


def _look(folder: Path) -> str | None:
    """The format of the first recognisable file under a local folder (breadth first, hidden
    names skipped); None when there is none among the first entries, or no such folder."""
    queue, seen = deque([folder]), 0
    while queue and seen < _LOOK_ENTRIES:
        try:
            entries = sorted(os.scandir(queue.popleft()), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if is_hidden(entry.name):
                continue
            if entry.is_dir():
                queue.append(Path(entry.path))
            elif (fmt := format_of(entry.name)) is not None:
                return fmt
    return None


@dataclass(frozen=True)
class InputConfig(Table):
    TABLE = "input"
    path: Path | str | tuple[Path | str, ...] = setting(
        parse=_input_path, kind="path, glob or URL, or a list of them", doc="the rows: a .csv, .jsonl, .parquet or .tar file, a folder, a glob (** recursive), a "
                               "list of these, or an fsspec URL of them (s3://, gs://, az://, file://)")
    format: str | None = setting(None, check=one_of(*FORMATS),
                                 doc='"csv", "jsonl", "parquet", "images" or "webdataset"; none: what the path says')
    storage_options: dict[str, Any] = setting(default_factory=dict, doc="passed to fsspec to read s3://, gs://, az:// "
                                              "paths and image URIs (may hold credentials: scrubbed everywhere)")
    id_column: str | None = setting(None, doc="a row's id; without it, its row number (file:row for several files; "
                                              "an image's path; shard:key in a WebDataset)")
    image_column: str | None = setting(None, doc="an http(s) URL, data: URI, local path (relative to the manifest), "
                                                 "object URI (s3://), image bytes or HF Image struct, or a list of them; "
                                                 "\"image\" for an image folder or a WebDataset")
    prompt_column: str | None = setting(None, doc="a row's own prompt")
    video_column: str | None = setting(None, doc="a video (URL, data: URI, local file) or a list of frame images")
    audio_column: str | None = setting(None, doc="an audio clip (local file, URL, data: URI, object URI, bytes) or a list of them; see [audio]")
    inferred: bool = setting(False, key=False, doc="")  # set here: `format` was not given

    def validate(self) -> None:
        if self.format is None:
            found = self._format_from_path()
            object.__setattr__(self, "format", found)
            object.__setattr__(self, "inferred", True)
        if self.format in ("images", "webdataset") and self.image_column is None:
            object.__setattr__(self, "image_column", IMAGE_COLUMN)

    def _format_from_path(self) -> str | None:
        said = {format_of(str(item)) for item in self.items}
        if len(said) == 1 and None not in said:
            return said.pop()
        if len(said) > 1 and None not in said:
            raise JobError(f"[input] path names files of several formats ({', '.join(sorted(s for s in said if s))}); "
                           f"one job reads one format: list files of one kind, or set [input] format")
        one = self.items[0]
        if len(self.items) == 1 and isinstance(one, Path) and not has_glob(str(one)):
            if one.is_dir():
                return _look(one)
            if one.suffix:  # a file the suffix does not name
                raise JobError(f"[input] path unsupported manifest type {one.suffix!r}; use .csv, .jsonl, .parquet, "
                               f".tar or a folder, or set [input] format")
        return None  # a bucket prefix, a glob without a suffix: decided when its files are listed

    @property
    def items(self) -> tuple[Path | str, ...]:
        return self.path if isinstance(self.path, tuple) else (self.path,)

    @property
    def remote(self) -> bool:
        return isinstance(self.items[0], str)

    @property
    def display(self) -> str:
        """The path as messages show it: without credentials; a long list shortened."""
        shown = [display(item) for item in self.items]
        return shown[0] if len(shown) == 1 else ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")

    @property
    def local_base(self) -> Path:
        """Where relative local paths in the rows resolve: the manifest's folder, the folder named,
        the fixed part of a glob, or what a list's items share (a URL's rows: the working directory)."""
        if self.remote:
            return Path.cwd()
        folders = []
        for item in self.items:
            text = str(item)
            if has_glob(text):
                folders.append(text[: next(i for i, c in enumerate(text) if c in "*?[")].rsplit("/", 1)[0] or "/")
            else:
                folders.append(text if Path(text).is_dir() else os.path.dirname(text))
        return Path(os.path.commonpath(folders))

    def at(self, value: Any, base: Path) -> InputConfig:
        """This table with another path (the Python API's manifest="s3://b/ds/*.parquet"): the
        format is found again unless the job names it."""
        if isinstance(value, (list, tuple)):
            value = [os.fspath(v) for v in value]
        where = "manifest="
        path = _input_path(os.fspath(value) if isinstance(value, os.PathLike) else value, where, base)
        return replace(self, path=path, format=None if self.inferred else self.format, inferred=False)

    def __repr__(self) -> str:  # storage_options may hold credentials
        return f"InputConfig(path={self.path!r}, format={self.format!r}, id_column={self.id_column!r})"
