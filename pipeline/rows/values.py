"""Values: what one media cell holds, which kind each value is, and how a value is named in errors.

    image_values('["a.jpg", "https://h/b.png"]')   # ["a.jpg", "https://h/b.png"]
    kind_of("data:image/png;base64,...")           # "url", "data" or "path"
    show(value)                                    # quoted, cut short: for error messages

A cell holds one value, a list (JSONL, Parquet) or a JSON array (CSV). A value is an http(s) URL,
a `data:` URI or a local path; any other scheme is refused here. Error messages quote a value
through `show`, so a megabyte data: URI never floods a log or an error row.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InputError

__all__ = ["image_values", "is_list_cell", "kind_of", "show", "SHOW_CHARS"]

SHOW_CHARS = 200  # of a value in an error message


def show(value: str) -> str:
    """A value as error messages show it: quoted, data URIs and long paths cut short."""
    if len(value) <= SHOW_CHARS:
        return repr(value)
    return repr(value[:SHOW_CHARS]) + f"... ({len(value)} characters)"


def image_values(cell: Any) -> list[str]:
    """A cell as a list of values: a string, a list, or a JSON array held in a CSV cell."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return [str(v).strip() for v in cell if v is not None and str(v).strip()]
    text = str(cell).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            raise InputError(f"cell is not a valid JSON list: {show(text)}") from None
        if not isinstance(values, list):
            raise InputError(f"cell is not a JSON list of values: {show(text)}")
        return image_values(values)
    return [text]


def is_list_cell(cell: Any) -> bool:
    """Whether a cell is a list (of video frames, in a video column) rather than one value."""
    return isinstance(cell, (list, tuple)) or (isinstance(cell, str) and cell.strip().startswith("["))


def kind_of(value: str) -> str:
    """"url", "data" or "path"; an InputError for any other scheme."""
    if value.startswith(("http://", "https://")):
        return "url"
    if value.startswith("data:"):
        return "data"
    if "://" in value:
        raise InputError(f"unsupported URL scheme (use http, https, data: or a local path): {show(value)}")
    return "path"

