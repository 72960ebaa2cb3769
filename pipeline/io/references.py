"""References: what an output holds in place of the image bytes a manifest carried.

    column = referenced(table.column("image"))   # bytes and HF Image structs (or lists of them) -> text

A manifest may hold its images as bytes: a binary column, or Hugging Face's `Image` struct
`{bytes, path}`, one or a list per cell. Copied into every part file they would double the disk a
dataset takes, so the output holds a reference instead (unless `[output] keep_media`):

- a binary cell: "sha256:<hex>" of its bytes: the exact image the model was shown, whatever
  store it lives in, found again by hashing (the row's id leads back to the manifest row);
- an HF Image struct: its `path` when it has one (the name the dataset gives the image), else the
  digest of its bytes;
- a list of those: a list of references; null stays null. Any other column is returned as it is.

The bytes are hashed where Arrow holds them (no copy into Python objects; hashlib releases the
GIL), ~0.8 GB/s on one core of the bench machine.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["referenced", "holds_bytes", "DIGEST_PREFIX"]

DIGEST_PREFIX = "sha256:"


def holds_bytes(kind: pa.DataType) -> bool:
    """Whether a column of this type holds image bytes (binary, an HF Image struct, a list of either)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return _is_binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                                and _is_binary(kind.field("bytes").type))


def referenced(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column with its bytes replaced by references (see above); unchanged if it holds none."""
    if not holds_bytes(column.type):
        return column
    chunks = [_chunk(c) for c in column.chunks]
    many = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    return pa.chunked_array(chunks, pa.list_(pa.string()) if many else pa.string())


def _chunk(arr: pa.Array) -> pa.Array:
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_pylist()  # a null list: no items
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        items = _chunk(arr.flatten())  # the slice's items only, not a whole row group's
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items, mask=arr.is_null())
    if pa.types.is_struct(arr.type):
        fields = dict(zip((f.name for f in arr.type), arr.flatten()))  # flatten: offset and nulls applied
        paths = fields["path"].cast(pa.string()).to_pylist() if "path" in fields else [None] * len(arr)
        data = fields["bytes"]
        return pa.array([path if path else _digest(data, i) for i, path in enumerate(paths)], pa.string())
    return pa.array([_digest(arr, i) for i in range(len(arr))], pa.string())


def _digest(arr: pa.Array, i: int) -> str | None:
    scalar = arr[i]
    if not scalar.is_valid:
        return None
    return DIGEST_PREFIX + hashlib.sha256(scalar.as_buffer()).hexdigest()


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
