"""What a report shows, read from a job's output and checkpoint (nothing is sent, nothing locked):
the gallery's rows (all of them, or a stated sample within the size cap), every row's figures for
the charts, the job's settings without secrets, and the run history. The output is read a part
file at a time, twice: memory stays flat in the number of rows (bench: report_scale).

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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...config import Job
from ...config.urls import display
from ...errors import PipelineError
from ...io.checkpoint import Checkpoint, dataset_state, open_checkpoint
from ...io.references import DIGEST_PREFIX, holds_bytes
from ...io.storage import PartStore
from ...redact import Redactor, secret_name
from ...rows.files import LocalFiles
from ...rows.images import MB, parse_data_uri
from ...rows.values import Blob, image_values, kind_of
from .figures import Figures

__all__ = ["ReportData", "collect", "cut_text", "image_cells", "thumbnail", "THUMB_PX", "THUMB_BYTES", "TEXT_CHARS"]

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
    figures: Figures  # every row's figures, gathered for the charts
    state: dict[str, Any]
    settings: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def collect(job: Job, max_bytes: int, redactor: Redactor, fixed_bytes: int = 0) -> ReportData:
    """`max_bytes`: the page's cap; `fixed_bytes`: what it holds besides (the chart library).
    Two streaming passes over the part files, one at a time: the first sizes the rows and finds the
    figures' ranges, the second bins the figures and takes the rows the page holds."""
    store = PartStore.for_output(job.output)
    names = store.part_names()
    ckpt = open_checkpoint(job.output)
    plan = ckpt.load_plan()
    labels = list(job.labels.schema.get("properties", {})) if job.labels is not None else []
    figures = Figures(labels)
    sizes = _Sizes()
    for part in store.parts(names):
        figures.first(part)
        sizes.add(part, job)
    figures.settle()
    pick = sizes.rule(max(0, max_bytes - fixed_bytes - PAGE_BYTES), max_bytes)
    rows: list[dict[str, Any]] = []
    for part in store.parts(names):
        figures.second(part)
        chosen = pick.take(part)
        if chosen:
            rows += _rows(part.take(pa.array(chosen, pa.int64())), job, labels, redactor)
    return ReportData(
        job=job.name, output=display(job.output.path), generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), rows=rows,
        total=sizes.n, sampling=pick.sampling, labels=[name for name in labels if name in figures.present],
        image_column=job.input.image_column, prompt_column=job.input.prompt_column, figures=figures,
        state=dataset_state(plan, ckpt.peek_commits()) if plan is not None else {},
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


def _row_sizes(table: pa.Table, job: Job) -> np.ndarray:
    """What each row is reckoned to take in the page: texts, a thumbnail or a link."""
    texts = pc.add(_lengths(table, "answer"), pc.add(_lengths(table, "reasoning"), _lengths(table, "error")))
    size = pc.add(pa.scalar(ROW_BYTES), pc.divide(texts, 10))
    if job.input.image_column and job.input.image_column in table.column_names and not holds_bytes(
            table.schema.field(job.input.image_column).type):  # bytes kept (keep_media): reckoned as thumbnails below
        cells = pc.cast(table.column(job.input.image_column), pa.string())  # a list cell: its text
        # a thumbnail for a local file or a data: URI; a URL is a link (its own length, in the texts' margin)
        thumbs = pc.fill_null(pc.and_(pc.greater(pc.utf8_length(cells), 0), pc.invert(pc.starts_with(cells, "http"))), False)
        size = pc.add(size, pc.add(pc.multiply(pc.cast(thumbs, pa.int64()), THUMB_BYTES),
                                   pc.fill_null(pc.min_element_wise(pc.utf8_length(cells), 2048), 0)))
    if isinstance(size, (pa.ChunkedArray, pa.Array)):
        return np.asarray(size.to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.full(table.num_rows, float(size.as_py()))


def _failed(table: pa.Table) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.not_equal(table.column("status"), "ok"), True).to_numpy(zero_copy_only=False))


class _Sizes:
    """The first pass's sums: rows, failed rows, and what each kind would take in the page."""

    def __init__(self) -> None:
        self.n = self.failed = 0
        self.failed_bytes = self.other_bytes = 0.0

    def add(self, part: pa.Table, job: Job) -> None:
        sizes, failed = _row_sizes(part, job), _failed(part)
        self.n += part.num_rows
        self.failed += int(failed.sum())
        self.failed_bytes += float(sizes[failed].sum())
        self.other_bytes += float(sizes[~failed].sum())

    def rule(self, budget: int, max_bytes: int) -> _Pick:
        """Every row when all fit; else every failed row (an even sample of them if even they do
        not fit), then an even sample of the others (every k-th, in manifest order)."""
        n, others = self.n, self.n - self.failed
        if self.failed_bytes + self.other_bytes <= budget:
            return _Pick(1, 1, None)
        cap = f"the page holds {{kept:,}} of {n:,} rows (the cap is {max_bytes / MB:g} MB): "
        if self.failed_bytes > budget:
            step = math.ceil(self.failed_bytes / budget) if budget else self.failed + 1
            return _Pick(step, 0, cap + f"every {_nth(step)} failed row, in manifest order; the charts count every row")
        left = budget - self.failed_bytes
        step = max(1, math.ceil(self.other_bytes / left)) if left > 0 else others + 1
        return _Pick(1, step, cap + f"all {self.failed:,} failed rows, then every {_nth(step)} other row in manifest "
                                    f"order; the charts count every row")


class _Pick:
    """The second pass's choice, part by part: every `failed_step`-th failed row and every
    `other_step`-th other row (0: none), counted across parts in manifest order."""

    def __init__(self, failed_step: int, other_step: int, rule: str | None) -> None:
        self.failed_step, self.other_step, self.rule = failed_step, other_step, rule
        self.failed_seen = self.others_seen = self.kept = 0

    def take(self, part: pa.Table) -> list[int]:
        chosen = []
        for i, failed in enumerate(_failed(part).tolist()):
            if failed:
                if self.failed_seen % self.failed_step == 0:
                    chosen.append(i)
                self.failed_seen += 1
            else:
                if self.other_step and self.others_seen % self.other_step == 0:
                    chosen.append(i)
                self.others_seen += 1
        self.kept += len(chosen)
        return chosen

    @property
    def sampling(self) -> str | None:
        return None if self.rule is None else self.rule.format(kept=self.kept)


def _nth(k: int) -> str:
    return {1: "", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def cut_text(value: Any) -> str | None:
    """A text as the page shows it: its first TEXT_CHARS characters, and how long it is when cut."""
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + f"… (cut here: {len(text):,} characters in the output)"


def _rows(table: pa.Table, job: Job, labels: list[str], redactor: Redactor) -> list[dict[str, Any]]:
    image_col, prompt_col = job.input.image_column, job.input.prompt_column
    files = LocalFiles.at(job.files_base or job.input.local_base, job.images.allowed_roots)
    out: list[dict[str, Any]] = []
    cells: list[Any] = []
    for rec in table.to_pylist():
        row = {
            "id": rec.get("id") if "id" in rec else rec.get(job.input.id_column or "", ""),
            "prompt": cut_text(rec.get(prompt_col)) if prompt_col else job.request.prompt,
            "answer": cut_text(rec.get("answer")), "reasoning": cut_text(rec.get("reasoning")),
            "status": rec.get("status"), "error": cut_text(rec.get("error")), "kind": rec.get("error_kind"),
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
        for row, images in zip(out, pool.map(lambda c: image_cells(c, files, job), cells)):
            row["images"] = images
    return out


def _label(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def image_cells(cell: Any, files: LocalFiles, job: Job, most: int = IMAGES_PER_ROW) -> list[dict[str, str]]:
    """Per value (the first `most`): a thumbnail (bytes kept in the output, a local file, a data:
    URI), a link (a URL: a page never fetches), or why there is none."""
    try:
        values = image_values(cell)
    except PipelineError as exc:
        return [{"note": str(exc)}]
    shown: list[dict[str, str]] = []
    for value in values[:most]:
        try:
            if isinstance(value, Blob):
                shown.append({"thumb": thumbnail(value.data)})
                continue
            kind = kind_of(value)
            if kind in ("url", "object"):
                shown.append({"link": value})  # an object URI: shown, never read (a page fetches nothing)
                continue
            if value.startswith(DIGEST_PREFIX):
                shown.append({"note": f"image bytes given in the manifest ({value[:23]}...; [output] keep_media keeps them)"})
                continue
            data = parse_data_uri(value)[1] if kind == "data" else files.read(
                value, int(job.images.max_source_mb * MB), "image", "over [images] max_source_mb")
            shown.append({"thumb": thumbnail(data)})
        except (PipelineError, OSError, ValueError) as exc:
            shown.append({"note": f"no thumbnail: {exc}"})
    if len(values) > most:
        shown.append({"note": f"and {len(values) - most} more"})
    return shown


def thumbnail(data: bytes) -> str:
    """A small JPEG (PNG where there is transparency) as a data: URI."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # a JPEG decodes at a fraction of its size: far faster
        img.thumbnail((THUMB_PX, THUMB_PX))
        alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
        small = img.convert("RGBA" if alpha else "RGB")
        buf = io.BytesIO()
        small.save(buf, "PNG" if alpha else "JPEG", **({} if alpha else {"quality": 72, "optimize": True}))
    mime = "image/png" if alpha else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


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
                                                       if not secret_name(k)},
        "serve": None if job.serve is None else {k: v for k, v in job.serve.items() if not secret_name(k)},
    }


def _run(summary: dict[str, Any]) -> dict[str, Any]:
    this = summary.get("this_run", {})
    return {"started": summary.get("started"), "duration_s": summary.get("duration_s"), "exit_code": summary.get("exit_code"),
            "sent": this.get("requests_sent"), "ok": this.get("ok"), "failed": this.get("failed"),
            "rate_limited": this.get("rate_limited"), "paused_s": this.get("paused_s"), "spent": this.get("spent"),
            "stopped": (summary.get("stopped") or {}).get("message")}

