"""Parts written by an earlier version, brought to the current layout before a run writes beside them.

    commits = upgrade_parts(job, ckpt, plan, commits, console)   # under the lock, the parts verified
    rec = adopted(store, rec)      # a part not as recorded that is that record's part, upgraded

A version that adds columns (`finished_at`, the usage details, `from_cache`; image bytes became
references) writes its new parts with them, and a folder whose older parts lack them reads wrong:
pandas and pyarrow.dataset take the first part's schema and drop the new columns without a word,
and DuckDB's `read_parquet('folder/*.parquet')` without union_by_name does the same. So each
committed part of another layout is rewritten in the current one (pipeline.io.writer.upgrade_part:
the new columns null, every value kept, atomically), then its commit record is appended with the
new size, digest, ETag and layout. A kill between the two leaves a part that is not as its record
says but names the record's part in its footer: the next run records it (`adopted`) instead of
taking it for damaged and rebuilding it. A part recorded in the current layout is not read at all;
one recorded before layouts were kept has its footer read once, and its layout recorded.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from ..config import Job
from ..crashpoints import crash_point
from ..errors import JobError
from ..io.checkpoint import Checkpoint
from ..io.manifest import Plan
from ..io.storage import PartStore
from ..io.writer import MADE_FROM, column_sources, layout_key, read_footer, upgrade_part
from ..records import CommitRecord
from .commit import Layout, part_layout
from .console import Console

__all__ = ["upgrade_parts", "adopted"]


def upgrade_parts(job: Job, ckpt: Checkpoint, plan: Plan, commits: dict[int, CommitRecord],
                  console: Console) -> dict[int, CommitRecord]:
    """The records of `commits` (parts in place), each part now in the current layout where it can be."""
    from .shard import make_labels

    layout: Layout | None = None
    store = PartStore.for_output(job.output)
    out = dict(commits)
    upgraded, left = 0, []
    for index, rec in sorted(commits.items()):
        if layout is None:
            layout = part_layout(job, plan, make_labels(job))
        if rec.layout == layout.key:
            continue
        have = read_footer(store, rec.file).schema.to_arrow_schema()
        if layout_key(have, layout.free) == layout.key:  # written in it by a version that did not say so
            new = dataclasses.replace(rec, layout=layout.key)
        else:
            target, sources = _target(have, layout)
            if sources is None:
                left.append(rec.file)
                continue
            try:
                written = upgrade_part(store, rec.file, target, sources, made_from(rec))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                left.append(rec.file)
                continue
            crash_point("after_upgrade")  # the part rewritten, its record not yet
            new = dataclasses.replace(rec, size=written.size, part_digest=written.digest, etag=written.etag,
                                      layout=layout.key)
            upgraded += 1
        ckpt.record_commit(new)
        out[index] = new
    if upgraded:
        console.say(f"note: {upgraded} part file(s) written by an earlier version now have this version's columns "
                    f"(those added since are null there)", event="upgraded", parts=upgraded)
    if left:
        console.say(f"note: {len(left)} part file(s) written by an earlier version keep their columns (a column "
                    f"there has no place in this job's output, or no safe conversion), e.g. {left[0]}; read the "
                    f"folder with DuckDB's union_by_name or pyarrow with a schema")
    return out


def _target(have: pa.Schema, layout: Layout) -> tuple[pa.Schema, dict[str, str | None] | None]:
    """The layout's columns for a part of schema `have`: its input columns keep the types it has."""
    sources = column_sources(have, layout.schema, layout.renamed)
    if sources is None:
        return layout.schema, None
    fields = [field.with_type(have.field(src).type) if field.name in layout.free and (src := sources[field.name])
              else field for field in layout.schema]
    return pa.schema(fields), sources


def made_from(rec: CommitRecord) -> str:
    """What an upgraded part's footer names of the part it was made from."""
    return rec.part_digest or rec.etag or f"{rec.file}:{rec.size}:{rec.at}"


def adopted(store: PartStore, rec: CommitRecord) -> CommitRecord | None:
    """The record of a part that is not as `rec` says but is `rec`'s part upgraded (a run died
    between the rewrite and its record); None for any other part."""
    try:
        footer = read_footer(store, rec.file)
    except (OSError, pa.ArrowInvalid, JobError):  # gone or damaged (a bucket's read failure is a JobError)
        return None
    if (footer.metadata or {}).get(MADE_FROM) != made_from(rec).encode() or footer.num_rows != rec.rows:
        return None
    entry = store.store.listing().get(rec.file)
    if entry is None:
        return None
    # its layout is found again by upgrade_parts (one footer read), as for a record without one
    return dataclasses.replace(rec, size=entry.size, part_digest=store.store.digest(rec.file), etag=entry.etag,
                               layout=None)
