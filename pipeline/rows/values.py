"""Values: what one media cell holds, which kind each value is, and how a value is named in errors.

    image_values('["a.jpg", "https://h/b.png"]')   # ["a.jpg", "https://h/b.png"]
    kind_of("data:image/png;base64,...")           # "url", "data" or "path"
    show(value)                                    # quoted, cut short: for error messages
    table = bytes_as_values(table, ["image"])      # image bytes (HF's Image feature) made data: URIs

A cell holds one value, a list (JSONL, Parquet) or a JSON array (CSV). A value is an http(s) URL,
a `data:` URI or a local path; any other scheme is refused here. Error messages quote a value
through `show`, so a megabyte data: URI never floods a log or an error row.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["image_values", "is_list_cell", "kind_of", "show", "bytes_as_values", "SHOW_CHARS"]

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


def bytes_as_values(table: pa.Table, columns: list[str | None]) -> pa.Table:
    """A manifest held in memory may carry its images as bytes: a binary column, or Hugging Face's
    `Image` feature (a struct of `bytes` and `path`), one or a list per cell. Those cells become
    values like any manifest's: a data: URI of the bytes (typed by their content), else the path."""
    import pyarrow as pa

    for name in columns:
        if name is None or name not in table.column_names:
            continue
        kind = table.schema.field(name).type
        many = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        item = kind.value_type if many else kind
        if not (_is_binary(item) or (pa.types.is_struct(item) and item.get_field_index("bytes") >= 0)):
            continue
        cells = table.column(name).to_pylist()
        values = [None if c is None else [_as_value(v) for v in c] if many else _as_value(c) for c in cells]
        typ = pa.list_(pa.large_string()) if many else pa.large_string()
        table = table.set_column(table.column_names.index(name), name, pa.array(values, typ))
    return table


def _is_binary(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _as_value(cell: Any) -> str | None:
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        return _data_uri(data) if data else path
    return _data_uri(cell) if cell else None


def _data_uri(data: bytes) -> str:
    from .images import sniff_mime, sniff_video

    mime = sniff_mime(data) or sniff_video(data) or "application/octet-stream"  # refused later, with a reason
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
