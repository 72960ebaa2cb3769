"""In-memory manifests: a pandas DataFrame, a pyarrow Table, a Hugging Face `datasets.Dataset`, a
list of dicts (or anything speaking the Arrow C stream protocol, e.g. polars) made a manifest file.

    frame = Frame.of(df)                   # a JobError naming the accepted types for anything else
    frame.digest                           # of the content: the same rows, the same digest
    ckpt.save_manifest(frame)              # <checkpoint>/manifest.parquet (+ .digest), rewritten only on a change

The stored file is the job's manifest from then on, so a frame resumes like a file: the same frame
again finds its answers and sends nothing (the file, its mtime and so the plan are untouched); a
frame with rows appended sends those; one whose answered rows changed is refused unless restarted
(pipeline.engine.prepare). The digest covers the values, names and types of the columns, not how
Arrow happens to chunk them, so a frame rebuilt the same way is the same frame.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import JobError
from .store import Store

__all__ = ["Frame"]

# The content digest sits beside the file, not in its metadata: the plan's shard digests cover a
# Parquet manifest's schema metadata, and rows appended must leave the earlier shards' digests as
# they were. Written after the file: a crash between the two only means one rewrite too many.
DIGEST_SUFFIX = ".digest"
GROUP_BYTES = 64 << 20  # of data per row group of the stored file


@dataclass(frozen=True)
class Frame:
    table: pa.Table
    digest: str

    @classmethod
    def of(cls, data: Any) -> Frame:
        """The digest is of the rows as given: an unchanged frame costs a hash, never a conversion."""
        table = _as_table(data).replace_schema_metadata(None)  # pandas' or HF's metadata is not content
        return cls(table, _digest(table))

    def store(self, store: Store, name: str) -> None:
        """The frame as `name` in `store` (the checkpoint names it), written (atomically) only if
        its content changed."""
        digest_name = name + DIGEST_SUFFIX
        if _text(store.read(digest_name)) == self.digest and name in store.names():
            return
        store.remove(digest_name)
        store.write(name, lambda f: pq.write_table(self.table, f, compression="zstd", row_group_size=_group_rows(self.table)))
        store.write(digest_name, self.digest.encode())


def _group_rows(table: pa.Table) -> int:
    """Rows per row group: ~GROUP_BYTES of data each, so a run reading one shard of a frame with
    image bytes reads that much, not the whole frame (one group is Parquet's default)."""
    per_row = table.nbytes // max(1, table.num_rows)
    return max(1, min(1 << 20, GROUP_BYTES // max(1, per_row)))


def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    module = type(data).__module__.split(".")[0]
    if module == "pandas" and type(data).__name__ == "DataFrame":
        # A named index (df.set_index("id")) is data the user means: it becomes columns.
        keep_index = any(name is not None for name in data.index.names)
        return pa.Table.from_pandas(data, preserve_index=keep_index)
    if module == "datasets":
        if type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
            raise JobError(f"manifest=: a {type(data).__name__} holds several splits; pass one, e.g. ds[{next(iter(data), 'train')!r}]")
        if type(data).__name__ == "Dataset":
            return data.with_format("arrow")[:]  # honours select/shuffle/filter (its indices), zero-copy otherwise
    if isinstance(data, list):
        bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
        if bad is not None:
            raise JobError(f"manifest=: item {bad} of the list is a {type(data[bad]).__name__}, not a dict; "
                           f"pass a list of dicts, one per row")
        return pa.Table.from_pylist(data)
    if hasattr(data, "__arrow_c_stream__"):  # polars, DuckDB relations, ...
        return pa.table(data)
    raise JobError(f"manifest=: a {type(data).__module__}.{type(data).__name__} cannot be a manifest; pass a pandas "
                   f"DataFrame, a pyarrow Table, a datasets.Dataset or a list of dicts (or a path in [input] path)")


def _digest(table: pa.Table) -> str:
    """blake2b over the schema and each column's values, one column at a time (memory: a column)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(table.schema.to_string(show_schema_metadata=False).encode())
    h.update(str(table.num_rows).encode())
    for name in table.column_names:
        one = pa.table({name: table.column(name).combine_chunks()})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, one.schema) as writer:
            writer.write_table(one)
        h.update(sink.getvalue())
    return h.hexdigest()


def _text(raw: bytes | None) -> str | None:
    try:
        return raw.decode("ascii").strip() if raw is not None else None
    except UnicodeDecodeError:
        return None  # unreadable: written again
