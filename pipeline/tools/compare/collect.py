"""What a comparison shows, read from each job's output (nothing sent, nothing locked): the rows
joined by id, each job's answer beside the others', the label figures, and each job's totals.

    data = collect([job_a, job_b], max_bytes=20 * MB, redactor=redactor)
    data.jobs, data.fields, data.rows, data.sampling

Rows: the union of every output's ids, in the first job's order, then the ids only later jobs
have. A job without a result for an id shows it as missing; no row is dropped for it (a page over
its size cap keeps every row where the jobs disagree, one is missing or one failed, then an even
sample of the others, and says so). Label fields: those every job's `[labels]` has; a row counts
in a field's figures when every job answered it (status ok) with a value.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from ...config import Job
from ...config.urls import display
from ...errors import PipelineError
from ...io.storage import PartStore
from ...redact import Redactor
from ...rows.files import LocalFiles
from ...rows.images import MB, parse_data_uri
from ...rows.values import image_values, kind_of
from ..report.collect import TEXT_CHARS, thumbnail
from .agreement import agreement, confusion, mean_abs_difference

__all__ = ["Comparison", "collect", "ROW_BYTES"]

ROW_BYTES = 300  # a row's JSON besides its texts and thumbnails, per job
THUMB_BYTES = 9_000
IMAGES_SHOWN = 2


@dataclass
class Comparison:
    jobs: list[dict[str, Any]]  # per job: name, models, totals
    fields: list[dict[str, Any]]  # per label field: its figures and confusion counts per pair of jobs
    rows: list[dict[str, Any]]
    total: int  # rows in the union
    sampling: str | None
    labels: list[str] = field(default_factory=list)


@dataclass
class _Side:
    job: Job
    records: dict[str, dict[str, Any]]  # id -> output row
    order: list[str]


def collect(jobs: list[Job], max_bytes: int, redactor: Redactor) -> Comparison:
    sides = [_side(job) for job in jobs]
    ids = list(dict.fromkeys(i for side in sides for i in side.order))
    labels = _common_labels(jobs)
    fields = [_field(name, _numeric(jobs[0], name), sides, ids) for name in labels]
    categories = [f["name"] for f in fields if f["kind"] == "category"]  # numbers differ always: never "disagree"
    rows = [_row(i, sides, labels, categories, redactor) for i in ids]
    chosen, sampling = _sample(rows, max_bytes)
    shown = [rows[k] for k in chosen]
    _thumbnails(shown, sides)
    return Comparison([_summary(side, len(ids)) for side in sides], fields, shown, len(ids), sampling, labels)


def _side(job: Job) -> _Side:
    table = PartStore.for_output(job.output).read_all()
    records: dict[str, dict[str, Any]] = {}
    for rec in table.to_pylist():
        row_id = rec.get("id") if rec.get("id") is not None else rec.get(job.input.id_column or "")
        records[str(row_id)] = rec
    return _Side(job, records, list(records))


def _common_labels(jobs: list[Job]) -> list[str]:
    names = [list(job.labels.schema.get("properties", {})) if job.labels is not None else [] for job in jobs]
    return [n for n in names[0] if all(n in other for other in names[1:])]


def _numeric(job: Job, name: str) -> bool:
    assert job.labels is not None
    kind = job.labels.schema["properties"].get(name, {}).get("type")
    return kind == "number" or (isinstance(kind, list) and "number" in kind)


def _value(side: _Side, row_id: str, name: str) -> Any:
    rec = side.records.get(row_id)
    if rec is None or rec.get("status") != "ok":
        return None
    return rec.get(name)


def _field(name: str, numeric: bool, sides: list[_Side], ids: list[str]) -> dict[str, Any]:
    ratings = [values for i in ids if None not in (values := [_value(s, i, name) for s in sides])]
    out: dict[str, Any] = {"name": name, "kind": "number" if numeric else "category", "rows": len(ratings)}
    if numeric:
        out["mean_abs_difference"] = mean_abs_difference([[float(v) for v in r] for r in ratings])
        return out
    ratings = [[_hashable(v) for v in r] for r in ratings]
    figures = agreement(ratings)
    out.update(agreement=figures.rate, kappa=figures.kappa, kappa_kind=figures.kappa_kind)
    out["pairs"] = [{"a": a, "b": b, "counts": [{"a": x, "b": y, "rows": n} for (x, y), n in
                                                 sorted(confusion([r[a] for r in ratings], [r[b] for r in ratings]).items(),
                                                        key=lambda kv: (str(kv[0][0]), str(kv[0][1])))]}
                    for a, b in combinations(range(len(sides)), 2)]
    return out


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _text(value: Any, redactor: Redactor) -> str | None:
    if value is None:
        return None
    text = redactor.scrub(str(value))
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + f"… (cut here: {len(text):,} characters in the output)"


def _cell(rec: dict[str, Any] | None, labels: list[str], redactor: Redactor) -> dict[str, Any]:
    if rec is None:
        return {"missing": True}
    reasoning = rec.get("reasoning")
    return {
        "status": rec.get("status"), "kind": rec.get("error_kind"), "model": rec.get("model"),
        "answer": _text(rec.get("answer"), redactor), "error": _text(rec.get("error"), redactor),
        "reasoning": _text(reasoning, redactor), "reasoning_chars": len(reasoning) if isinstance(reasoning, str) else None,
        "tokens": rec.get("total_tokens"), "prompt_tokens": rec.get("prompt_tokens"),
        "completion_tokens": rec.get("completion_tokens"), "reasoning_tokens": rec.get("reasoning_tokens"),
        "cost": rec.get("cost"), "latency": rec.get("latency_ms"),
        "labels": {n: _hashable(rec.get(n)) if rec.get(n) is not None else None for n in labels if n in rec},
    }


def _row(row_id: str, sides: list[_Side], labels: list[str], categories: list[str], redactor: Redactor) -> dict[str, Any]:
    cells = [_cell(side.records.get(row_id), labels, redactor) for side in sides]
    first = next(s for s in sides if row_id in s.records)
    rec, inp = first.records[row_id], first.job.input
    disagree = [n for n in categories if all(c.get("status") == "ok" and c["labels"].get(n) is not None for c in cells)
                and len({str(c["labels"][n]) for c in cells}) > 1]
    return {"id": row_id, "prompt": _text(rec.get(inp.prompt_column) if inp.prompt_column else first.job.request.prompt, redactor),
            "cells": cells, "disagree": disagree, "missing": any(c.get("missing") for c in cells),
            "failed": any(c.get("status") not in (None, "ok") for c in cells),
            "image": rec.get(inp.image_column) if inp.image_column else None, "source": sides.index(first)}


def _size(row: dict[str, Any]) -> int:
    texts = sum(len(c.get(k) or "") for c in row["cells"] for k in ("answer", "reasoning", "error"))
    return ROW_BYTES * len(row["cells"]) + int(texts * 1.1) + (THUMB_BYTES if row["image"] else 0)


def _sample(rows: list[dict[str, Any]], max_bytes: int) -> tuple[list[int], str | None]:
    """Which rows the page holds, and the rule when not all of them."""
    sizes = [_size(r) for r in rows]
    budget = max(0, max_bytes - 200_000)  # the page, its charts and the chart library's share
    if sum(sizes) <= budget:
        return list(range(len(rows))), None
    telling = [k for k, r in enumerate(rows) if r["disagree"] or r["missing"] or r["failed"]]
    kept_size = sum(sizes[k] for k in telling)
    others = [k for k, r in enumerate(rows) if not (r["disagree"] or r["missing"] or r["failed"])]
    left = budget - kept_size
    step = max(1, math.ceil(sum(sizes[k] for k in others) / left)) if left > 0 else len(others) + 1
    kept = sorted(telling + others[::step])
    return kept, (f"the page holds {len(kept):,} of {len(rows):,} rows (the cap is {max_bytes / MB:g} MB): every row "
                  f"where the jobs disagree, one is missing or one failed, then every {step}th other row; the figures "
                  f"count every row")


def _thumbnails(rows: list[dict[str, Any]], sides: list[_Side]) -> None:
    """Each shown row's image cell (from the first job that has the row) as thumbnails or links."""
    files = [LocalFiles.for_manifest(s.job.input.path, s.job.images.allowed_roots, base=s.job.files_base or s.job.input.local_base)
             for s in sides]

    def images(row: dict[str, Any]) -> list[dict[str, str]]:
        cell, side = row.pop("image"), sides[row["source"]]
        try:
            values = image_values(cell)
        except PipelineError as exc:
            return [{"note": str(exc)}]
        shown: list[dict[str, str]] = []
        for value in values[:IMAGES_SHOWN]:
            try:
                if kind_of(value) == "url":
                    shown.append({"link": value})
                    continue
                data = parse_data_uri(value)[1] if kind_of(value) == "data" else files[row["source"]].read(
                    value, int(side.job.images.max_source_mb * MB), "image", "over [images] max_source_mb")
                shown.append({"thumb": thumbnail(data)})
            except (PipelineError, OSError, ValueError) as exc:
                shown.append({"note": f"no thumbnail: {exc}"})
        return shown

    with ThreadPoolExecutor(4) as pool:
        for row, got in zip(rows, pool.map(images, rows)):
            row["images"] = got
            del row["source"]


def _summary(side: _Side, union: int) -> dict[str, Any]:
    recs = list(side.records.values())
    ok = [r for r in recs if r.get("status") == "ok"]
    served = Counter(r.get("model") for r in ok if r.get("model"))
    latency = sorted(r["latency_ms"] for r in ok if r.get("latency_ms") is not None)
    reasoning = [len(r["reasoning"]) for r in ok if isinstance(r.get("reasoning"), str)]
    costs = [r["cost"] for r in recs if r.get("cost") is not None]
    tokens = [r["total_tokens"] for r in ok if r.get("total_tokens") is not None]
    job = side.job
    return {
        "name": job.name, "model": job.endpoint.model, "served": served.most_common(1)[0][0] if served else None,
        "api": str(job.endpoint.api), "output": display(job.output.path), "rows": len(recs), "ok": len(ok),
        "failed": len(recs) - len(ok), "missing": union - len(recs),
        "tokens": sum(tokens), "tokens_per_row": statistics.fmean(tokens) if tokens else None,
        "cost": sum(costs) if costs else None,
        "latency_p50": statistics.median(latency) if latency else None,
        "latency_p90": latency[min(len(latency) - 1, int(0.9 * len(latency)))] if latency else None,
        "reasoning_chars": statistics.fmean(reasoning) if reasoning else None,
    }
