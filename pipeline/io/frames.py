"""In-memory manifests: a pandas DataFrame, a pyarrow Table, a Hugging Face `datasets.Dataset`, a
list of dicts (or anything speaking the Arrow C stream protocol, e.g. polars) made a manifest file.

    frame = Frame.of(df)                   # a JobError naming the accepted types for anything else
    frame.digest                           # of the content: the same rows, the same digest
    frame.store(ckpt.folder)               # <checkpoint>/manifest.parquet (+ .digest), rewritten only on a change

The stored file is the job's manifest from then on, so a frame resumes like a file: the same frame
again finds its answers and sends nothing (the file, its mtime and so the plan are untouched); a
frame with rows appended sends those; one whose answered rows changed is refused unless restarted
(pipeline.engine.prepare). The digest covers the values, names and types of the columns, not how
Arrow happens to chunk them, so a frame rebuilt the same way is the same frame.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import JobError

__all__ = ["Frame", "MANIFEST_FILE"]

MANIFEST_FILE = "manifest.parquet"  # in the checkpoint folder; --restart leaves it (the next run rewrites it)
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

    def store(self, folder: Path) -> Path:
        """The frame as <folder>/manifest.parquet, written (atomically) only if its content changed."""
        path = folder / MANIFEST_FILE
        digest_path = folder / (MANIFEST_FILE + DIGEST_SUFFIX)
        if path.exists() and _read(digest_path) == self.digest:
            return path
        folder.mkdir(parents=True, exist_ok=True)
        digest_path.unlink(missing_ok=True)
        _atomic(path, lambda f: pq.write_table(self.table, f, compression="zstd", row_group_size=_group_rows(self.table)))
        _atomic(digest_path, lambda f: f.write(self.digest.encode()))
        return path


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None  # none yet, or unreadable: written again
