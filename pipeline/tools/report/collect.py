"""What a report shows, read from a job's output and checkpoint (nothing is sent, nothing locked):
the gallery's rows (all of them, or a stated sample within the size cap), every row's figures for
the charts, the job's settings without secrets, and the run history.

    data = collect(job, max_bytes=20 * MB)
    data.rows, data.sampling, data.figures, data.settings, data.history

Sampling, when the rows would not fit the cap: every failed row first (an even sample of them if
even they do not fit), then an even sample of the others (every k-th, in manifest order). The
charts always count every row.
"""

from __future__ import annotations

import base64
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ...config import Job
from ...config.urls import display
from ...errors import PipelineError
from ...io.checkpoint import Checkpoint, dataset_state
from ...io.references import DIGEST_PREFIX, holds_bytes
from ...io.storage import PartStore
from ...redact import Redactor
from ...rows.files import LocalFiles
from ...rows.images import MB, parse_data_uri
from ...rows.values import Blob, image_values, kind_of

__all__ = ["ReportData", "collect", "THUMB_PX", "TEXT_CHARS"]

THUMB_PX = 192  # the longer side of a thumbnail
THUMB_BYTES = 9_000  # what a thumbnail is reckoned to take in the page, before it is made
IMAGES_PER_ROW = 4  # thumbnails (or links) shown per row; a row of more says how many more
TEXT_CHARS = 8_000  # of an answer, reasoning or error shown in the page (the output keeps all)
ROW_BYTES = 420  # a row's JSON besides its texts and thumbnails
PAGE_BYTES = 150_000  # the page without rows and the chart library: charts, settings, history, markup
THUMB_WORKERS = 4  # Pillow releases the GIL while decoding and scaling


@dataclass
class ReportData:
    job: str
    output: str
    generated: str
    rows: list[dict[str, Any]]
    total: int  # rows in the output
    sampling: str | None  # how the rows shown were chosen, when not all are
    labels: list[str]
    image_column: str | None
    prompt_column: str | None
    figures: pa.Table  # every row's figures, for the charts
    state: dict[str, Any]
    settings: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def collect(job: Job, max_bytes: int, redactor: Redactor, fixed_bytes: int = 0) -> ReportData:
    """`max_bytes`: the page's cap; `fixed_bytes`: what it holds besides (the chart library)."""
    table = PartStore.for_output(job.output).read_all()
    ckpt = Checkpoint(job.output.checkpoint)
    plan = ckpt.load_plan()
    labels = list(job.labels.schema.get("properties", {})) if job.labels is not None else []
    chosen, sampling = _sample(table, job, max_bytes, fixed_bytes)
    rows = _rows(table.take(pa.array(chosen, pa.int64())) if table.num_rows else table, job, labels, redactor)
    keep = [c for c in ("status", "error_kind", "attempts", "latency_ms", "prompt_tokens", "completion_tokens",
                        "total_tokens", "cost", "finished_at", *labels) if c in table.column_names]
    return ReportData(
        job=job.name, output=display(job.output.path), generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), rows=rows,
        total=table.num_rows, sampling=sampling, labels=[name for name in labels if name in table.column_names],
        image_column=job.input.image_column, prompt_column=job.input.prompt_column, figures=table.select(keep),
        state=dataset_state(plan, ckpt.commits()) if plan is not None else {},
        settings=settings(job), history=[_run(r) for r in ckpt.history()],
    )


def _lengths(table: pa.Table, name: str) -> Any:
    if name not in table.column_names:
        return pa.scalar(0)
    col = table.column(name)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    # bytes, not characters (UTF-8), and a tenth more for JSON's escapes
    return pc.multiply(pc.min_element_wise(pc.fill_null(pc.binary_length(col), 0), TEXT_CHARS * 4), 11)


def _sample(table: pa.Table, job: Job, max_bytes: int, fixed_bytes: int = 0) -> tuple[list[int], str | None]:
    """Which rows the page holds (positions), and the rule when not all of them."""
    n = table.num_rows
    if n == 0:
        return [], None
    texts = pc.add(_lengths(table, "answer"), pc.add(_lengths(table, "reasoning"), _lengths(table, "error")))
    size = pc.add(pa.scalar(ROW_BYTES), pc.divide(texts, 10))
    if job.input.image_column and job.input.image_column in table.column_names and not holds_bytes(
            table.schema.field(job.input.image_column).type):  # bytes kept (keep_media): reckoned as thumbnails below
        cells = pc.cast(table.column(job.input.image_column), pa.string())  # a list cell: its text
        # a thumbnail for a local file or a data: URI; a URL is a link (its own length, in the texts' margin)
        thumbs = pc.fill_null(pc.and_(pc.greater(pc.utf8_length(cells), 0), pc.invert(pc.starts_with(cells, "http"))), False)
        size = pc.add(size, pc.add(pc.multiply(pc.cast(thumbs, pa.int64()), THUMB_BYTES),
                                   pc.fill_null(pc.min_element_wise(pc.utf8_length(cells), 2048), 0)))
    sizes = size.to_numpy(zero_copy_only=False) if isinstance(size, pa.ChunkedArray) else [int(size.as_py())] * n
    budget = max(0, max_bytes - fixed_bytes - PAGE_BYTES)
    if sum(sizes) <= budget:
        return list(range(n)), None
    failed_mask = pc.fill_null(pc.not_equal(table.column("status"), "ok"), True).to_pylist()
    failed = [i for i in range(n) if failed_mask[i]]
    others = [i for i in range(n) if not failed_mask[i]]
    f_size = sum(sizes[i] for i in failed)
    if f_size > budget:  # even the failed rows do not fit: an even sample of them, nothing else
        step = math.ceil(f_size / budget) if budget else len(failed) + 1
        kept = failed[::step]
        return kept, (f"the page holds {len(kept):,} of {n:,} rows (the cap is {max_bytes / MB:g} MB): every "
                      f"{_nth(step)} failed row, in manifest order; the charts count every row")
    left = budget - f_size
    o_size = sum(sizes[i] for i in others)
    step = max(1, math.ceil(o_size / left)) if left > 0 else len(others) + 1
    kept = sorted(failed + others[::step])
    return kept, (f"the page holds {len(kept):,} of {n:,} rows (the cap is {max_bytes / MB:g} MB): all "
                  f"{len(failed):,} failed rows, then every {_nth(step)} other row in manifest order; "
                  f"the charts count every row")


def _nth(k: int) -> str:
    return {1: "", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + f"… (cut here: {len(text):,} characters in the output)"


def _rows(table: pa.Table, job: Job, labels: list[str], redactor: Redactor) -> list[dict[str, Any]]:
    image_col, prompt_col = job.input.image_column, job.input.prompt_column
    files = LocalFiles.for_manifest(job.input.path, job.images.allowed_roots, base=job.files_base or job.input.local_base)
    out: list[dict[str, Any]] = []
    cells: list[Any] = []
    for rec in table.to_pylist():
        row = {
            "id": rec.get("id") if "id" in rec else rec.get(job.input.id_column or "", ""),
            "prompt": _text(rec.get(prompt_col)) if prompt_col else job.request.prompt,
            "answer": _text(rec.get("answer")), "reasoning": _text(rec.get("reasoning")),
            "status": rec.get("status"), "error": _text(rec.get("error")), "kind": rec.get("error_kind"),
            "attempts": rec.get("attempts"), "latency": rec.get("latency_ms"), "tokens": rec.get("total_tokens"),
            "prompt_tokens": rec.get("prompt_tokens"), "completion_tokens": rec.get("completion_tokens"),
            "cost": rec.get("cost"), "finished": rec.get("finished_at"),
            "cached": rec.get("cached_tokens"), "reasoning_tokens": rec.get("reasoning_tokens"),  # null: not reported
            "labels": {name: _label(rec.get(name)) for name in labels if name in rec},
        }
        for key in ("prompt", "answer", "reasoning", "error"):
            if row[key]:
                row[key] = redactor.scrub(row[key])
        if row["id"] is None and job.input.id_column:
            row["id"] = rec.get(job.input.id_column)
        row["id"] = str(row["id"])
        out.append(row)
        cells.append(rec.get(image_col) if image_col else None)
    with ThreadPoolExecutor(THUMB_WORKERS) as pool:
        for row, images in zip(out, pool.map(lambda c: _images(c, files, job), cells)):
            row["images"] = images
    return out


def _label(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _images(cell: Any, files: LocalFiles, job: Job) -> list[dict[str, str]]:
    """Per value: a thumbnail (a local file, a data: URI), a link (a URL: the report never fetches),
    or why there is none."""
    try:
        values = image_values(cell)
    except PipelineError as exc:
        return [{"note": str(exc)}]
    shown: list[dict[str, str]] = []
    for value in values[:IMAGES_PER_ROW]:
        try:
            kind = kind_of(value)
            if kind in ("url", "object"):
                shown.append({"link": value})  # an object URI: shown, never read (the report fetches nothing)
                continue
            if isinstance(value, str) and value.startswith(DIGEST_PREFIX):
                shown.append({"note": f"image bytes given in the manifest ({value[:23]}...; [output] keep_media keeps them)"})
                continue
            data = value.data if isinstance(value, Blob) else parse_data_uri(value)[1] if kind == "data" else files.read(
                value, int(job.images.max_source_mb * MB), "image", "over [images] max_source_mb")
            shown.append({"thumb": thumbnail(data)})
        except (PipelineError, OSError, ValueError) as exc:
            shown.append({"note": f"no thumbnail: {exc}"})
    if len(values) > IMAGES_PER_ROW:
        shown.append({"note": f"and {len(values) - IMAGES_PER_ROW} more"})
    return shown


def thumbnail(data: bytes) -> str:
    """A small JPEG (PNG where there is transparency) as a data: URI."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # a JPEG decodes at a fraction of its size: far faster
        img.thumbnail((THUMB_PX, THUMB_PX))
        alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
        img = img.convert("RGBA" if alpha else "RGB")
        buf = io.BytesIO()
        img.save(buf, "PNG" if alpha else "JPEG", **({} if alpha else {"quality": 72, "optimize": True}))
    mime = "image/png" if alpha else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def settings(job: Job) -> dict[str, Any]:
    """The job as it was run, for the page: what shapes a request, the limits, where things are.
    Never the key (only the name of its variable) nor storage options or the endpoint's own key."""
    shape = job.request_shape()
    return {
        "name": job.name, "job file": str(job.source), "manifest": job.input.display, "output": display(job.output.path),
        "checkpoint": str(job.output.checkpoint), "endpoint": job.endpoint.base_url if job.serve is None else "built-in ([serve])",
        "model": job.endpoint.model, "key variable": job.endpoint.api_key_env,
        "request": {k: v for k, v in shape.items() if k not in ("model", "labels", "images")},
        "labels": shape["labels"], "images": shape["images"],
        "limits": {k: v for k, v in vars(job.limits).items()},
        "run": {k: v for k, v in vars(job.run).items()},
        "pricing": None if job.pricing is None else {k: v for k, v in vars(job.pricing).items()
                                                       if not any(w in k for w in _SECRET_WORDS)},
        "serve": None if job.serve is None else {k: v for k, v in job.serve.items() if not any(w in k for w in _SECRET_WORDS)},
    }


def _run(summary: dict[str, Any]) -> dict[str, Any]:
    this = summary.get("this_run", {})
    return {"started": summary.get("started"), "duration_s": summary.get("duration_s"), "exit_code": summary.get("exit_code"),
            "sent": this.get("requests_sent"), "ok": this.get("ok"), "failed": this.get("failed"),
            "rate_limited": this.get("rate_limited"), "paused_s": this.get("paused_s"), "spent": this.get("spent"),
            "stopped": (summary.get("stopped") or {}).get("message")}

