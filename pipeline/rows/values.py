"""Values: what one media cell holds, which kind each value is, and how a value is named in errors.

    image_values('["a.jpg", "https://h/b.png"]')   # ["a.jpg", "https://h/b.png"]
    image_values(b"\\x89PNG...")                     # [Blob(b"\\x89PNG...", None)]
    image_values({"bytes": None, "path": "a.jpg"})  # ["a.jpg"]: Hugging Face's Image struct
    kind_of("s3://bucket/a.jpg")                    # "url", "data", "object", "path" or "bytes"
    show(value)                                     # quoted, cut short: for error messages

A cell holds one value or a list of them (JSONL, Parquet), or a JSON array (CSV). A value is an
http(s) URL, a `data:` URI, an object-store URI (`s3://`, `gs://`, `az://`: objects.py), a local
path, or image bytes: a binary cell, or the `bytes` of Hugging Face's `Image` struct
`{bytes, path}` (its `path` when it has no bytes). Any other scheme is refused here. Error
messages quote a value through `show`, so a megabyte data: URI or blob never floods a log or an
error row.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from ..config.urls import OBJECT_SCHEMES
from ..errors import InputError

__all__ = ["Blob", "Value", "image_values", "is_list_cell", "kind_of", "show", "SHOW_CHARS"]

SHOW_CHARS = 200  # of a value in an error message


class Blob(NamedTuple):
    """Image (or video) bytes held in the manifest itself; `name` is HF's `path`, for messages."""

    data: bytes
    name: str | None = None


Value = str | Blob


def show(value: Value) -> str:
    """A value as error messages show it: quoted, data URIs and long paths cut short, bytes by size."""
    if isinstance(value, Blob):
        named = f" ({value.name!r})" if value.name else ""
        return f"<{len(value.data):,} bytes in the manifest{named}>"
    if len(value) <= SHOW_CHARS:
        return repr(value)
    return repr(value[:SHOW_CHARS]) + f"... ({len(value)} characters)"


def image_values(cell: Any) -> list[Value]:
    """A cell as a list of values: a string, bytes, an HF Image struct, a list of those, or a JSON
    array held in a CSV cell. Empty values (None, "", b"") are no image."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return [v for item in cell for v in _one(item)]
    if isinstance(cell, str):
        text = cell.strip()
        if text.startswith("["):
            try:
                values = json.loads(text)
            except json.JSONDecodeError:
                raise InputError(f"cell is not a valid JSON list: {show(text)}") from None
            if not isinstance(values, list):
                raise InputError(f"cell is not a JSON list of values: {show(text)}")
            return image_values(values)
    return _one(cell)


def _one(item: Any) -> list[Value]:
    if item is None:
        return []
    if isinstance(item, (bytes, bytearray, memoryview)):
        return [Blob(bytes(item))] if len(item) else []
    if isinstance(item, dict):  # HF's Image feature: the bytes when present, else the path
        data, path = item.get("bytes"), item.get("path")
        if data:
            return [Blob(bytes(data), str(path) if path else None)]
        return _one(path) if "bytes" in item or "path" in item else [str(item)]
    text = str(item).strip()
    return [text] if text else []


def is_list_cell(cell: Any) -> bool:
    """Whether a cell is a list (of video frames, in a video column) rather than one value."""
    return isinstance(cell, (list, tuple)) or (isinstance(cell, str) and cell.strip().startswith("["))


def kind_of(value: Value) -> str:
    """"url", "data", "object", "path" or "bytes"; an InputError for any other scheme."""
    if isinstance(value, Blob):
        return "bytes"
    if value.startswith(("http://", "https://")):
        return "url"
    if value.startswith("data:"):
        return "data"
    scheme, sep, _ = value.partition("://")
    if sep:
        if scheme.lower() in OBJECT_SCHEMES:
            return "object"
        raise InputError("unsupported URL scheme (use http, https, data:, s3, gs, az or a local path): " + show(value))
    return "path"
