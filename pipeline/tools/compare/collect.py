"""What a comparison shows, read from each job's output (nothing sent, nothing locked): the rows
joined by id, each job's answer beside the others', the label figures, and each job's totals.

    data = collect([job_a, job_b], max_bytes=20 * MB, redactor=redactor)
    data.jobs, data.fields, data.rows, data.sampling

Rows: the union of every output's ids, in the first job's order, then the ids only later jobs
have. A job without a result for an id shows it as missing; no row is dropped for it (a page over
its size cap keeps every row where the jobs disagree, one is missing or one failed, then an even
sample of the others, and says so). Label fields: those every job's `[labels]` has; a row counts
in a field's figures when every job answered it (status ok) with a value.

Each output is read a part file at a time, twice, as the report reads one: the first pass keeps of
each row only a few narrow columns (its id, status, model, figures, label values, how long its
texts are), from which the join, the figures, the flags and the sample are made; the second turns
only the rows the page holds into its cells. Memory grows by those columns per row (tens of bytes),
not by whole rows (bench: compare_scale).
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Hashable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...config import Job
from ...config.urls import display
from ...io.storage import PartStore
from ...redact import Redactor
from ...rows.files import LocalFiles
from ...rows.images import MB
from ..report.collect import TEXT_CHARS, THUMB_BYTES, cut_text, image_cells
from .agreement import tallied

__all__ = ["Comparison", "collect", "ROW_BYTES"]

ROW_BYTES = 300  # a row's JSON besides its texts and thumbnails, per job
IMAGES_SHOWN = 2
BATCH = 8192  # rows whose label values are made Python values at a time
_CUT = TEXT_CHARS + 60  # a cut text's length in the page, its note included
_TEXTS = ("answer", "reasoning", "error")


@dataclass
class Comparison:
    jobs: list[dict[str, Any]]  # per job: name, models, totals
    fields: list[dict[str, Any]]  # per label field: its figures and confusion counts per pair of jobs
    rows: list[dict[str, Any]]
    total: int  # rows in the union
    sampling: str | None
    labels: list[str] = field(default_factory=list)


class _Side:
    """One job's output as the first pass leaves it: per row (an id's first row, in output order)
    its id, status, error kind, model, figures, label values, text length and whether it has an image."""

    def __init__(self, job: Job, labels: list[str]) -> None:
        self.job, self.labels = job, labels
        self.store = PartStore.for_output(job.output)
        self.names = self.store.part_names()
        narrow = [self._narrow(part) for part in self.parts()]
        table = pa.concat_tables(narrow, promote_options="permissive") if narrow else self._narrow(pa.table({}))
        ids = table.column("id")
        unique = pc.unique(ids)
        if len(unique) < len(ids):  # an id twice (an output holds each once): its first row
            table = table.take(np.sort(pc.index_in(unique, value_set=ids).to_numpy(zero_copy_only=False)))
        self.table = table
        self.ids = table.column("id").combine_chunks()

    def parts(self) -> Iterator[pa.Table]:
        return self.store.parts(self.names)

    def row_ids(self, part: pa.Table) -> pa.ChunkedArray:
        id_column = self.job.input.id_column
        ids = [part.column(c).cast(pa.string()) for c in ("id", id_column) if c and c in part.column_names]
        if not ids:
            return pa.chunked_array([pa.nulls(part.num_rows, pa.string())])
        return pc.coalesce(*ids) if len(ids) > 1 else ids[0]

    def _narrow(self, part: pa.Table) -> pa.Table:
        n = part.num_rows

        def col(name: str, kind: pa.DataType) -> Any:
            return part.column(name).cast(kind) if name in part.column_names else pa.nulls(n, kind)

        lengths = [pc.min_element_wise(pc.fill_null(pc.utf8_length(col(t, pa.string())), 0), _CUT) for t in _TEXTS]
        image = self.job.input.image_column
        out = {"id": self.row_ids(part), "status": col("status", pa.string()), "error_kind": col("error_kind", pa.string()),
               "model": col("model", pa.string()), "latency_ms": col("latency_ms", pa.int64()),
               "total_tokens": col("total_tokens", pa.int64()), "cost": col("cost", pa.float64()),
               "reasoning_chars": pc.utf8_length(col("reasoning", pa.string())),
               "text": pc.add(pc.add(lengths[0], lengths[1]), lengths[2]),
               "image": _has_value(part.column(image)) if image and image in part.column_names else pa.nulls(n, pa.bool_())}
        for name in self.labels:
            out[f"label:{name}"] = part.column(name) if name in part.column_names else pa.nulls(n)
        return pa.table(out)


def _has_value(column: pa.ChunkedArray) -> Any:
    """Whether a cell holds something (an empty text or list is nothing)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.fill_null(pc.greater(pc.utf8_length(column), 0), False)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.fill_null(pc.greater(pc.list_value_length(column), 0), False)
    return pc.is_valid(column)


def collect(jobs: list[Job], max_bytes: int, redactor: Redactor) -> Comparison:
    labels = _common_labels(jobs)
    sides = [_Side(job, labels) for job in jobs]
    union = sides[0].ids
    for side in sides[1:]:  # then the ids only a later job has, in the first such job's order
        union = pa.concat_arrays([union, side.ids.filter(pc.invert(pc.is_in(side.ids, value_set=union)))])
    at = [pc.index_in(union, value_set=s.ids) for s in sides]  # per side: its row of each union id, or null
    present = np.stack([np.asarray(pc.is_valid(a).to_numpy(zero_copy_only=False)) for a in at])
    aligned = [s.table.take(a) for s, a in zip(sides, at)]
    ok = np.stack([np.asarray(pc.fill_null(pc.equal(t.column("status"), "ok"), False).to_numpy(zero_copy_only=False))
                   for t in aligned])
    failed = np.asarray(np.stack([np.asarray(pc.fill_null(pc.not_equal(t.column("status"), "ok"), False)
                                             .to_numpy(zero_copy_only=False)) for t in aligned]).any(axis=0))
    fields, disagree = [], np.zeros((len(labels), len(union)), dtype=bool)
    for k, name in enumerate(labels):
        values = [t.column(f"label:{name}") for t in aligned]
        fields.append(_field(name, _numeric(jobs[0], name), values, ok, disagree[k]))
    categories = [k for k, f in enumerate(fields) if f["kind"] == "category"]  # numbers differ always: never "disagree"
    missing = np.asarray(~present.all(axis=0))
    telling = np.asarray(missing | failed | disagree[categories].any(axis=0))
    sizes = _sizes(aligned, present, len(sides))
    chosen, sampling = _sample(telling, sizes, max_bytes)
    rows = _rows(sides, union, present, chosen, [labels[k] for k in categories], disagree[categories],
                 missing, failed, redactor)
    _thumbnails(rows, sides)
    return Comparison([_summary(side, len(union)) for side in sides], fields, rows, len(union), sampling, labels)


def _common_labels(jobs: list[Job]) -> list[str]:
    names = [list(job.labels.schema.get("properties", {})) if job.labels is not None else [] for job in jobs]
    return [n for n in names[0] if all(n in other for other in names[1:])]


def _numeric(job: Job, name: str) -> bool:
    assert job.labels is not None
    kind = job.labels.schema["properties"].get(name, {}).get("type")
    return kind == "number" or (isinstance(kind, list) and "number" in kind)


def _field(name: str, numeric: bool, values: list[pa.ChunkedArray], ok: np.ndarray, disagree: np.ndarray) -> dict[str, Any]:
    """A label's figures over the rows every job answered with a value; `disagree` is set for
    the rows (of a category) where the values differ."""
    valid = ok.all(axis=0) & np.stack([np.asarray(pc.is_valid(v).to_numpy(zero_copy_only=False)) for v in values]).all(axis=0)
    rated = np.flatnonzero(valid)
    out: dict[str, Any] = {"name": name, "kind": "number" if numeric else "category", "rows": len(rated)}
    if numeric:
        numbers = [np.asarray(pc.cast(v, pa.float64()).to_numpy(zero_copy_only=False))[rated] for v in values]
        diffs = [np.abs(a - b) for a, b in combinations(numbers, 2)]
        out["mean_abs_difference"] = float(np.mean(diffs)) if len(rated) and diffs else None
        return out
    tally: Counter[tuple[Hashable, ...]] = Counter()
    for start in range(0, len(rated), BATCH):
        batch = pa.array(rated[start:start + BATCH])
        for k, row in enumerate(zip(*[[_hashable(x) for x in v.take(batch).to_pylist()] for v in values])):
            tally[row] += 1
            disagree[rated[start + k]] = len({str(x) for x in row}) > 1
    figures = tallied(tally)
    out.update(agreement=figures.rate, kappa=figures.kappa, kappa_kind=figures.kappa_kind)
    out["pairs"] = [{"a": a, "b": b, "counts": [{"a": x, "b": y, "rows": n} for (x, y), n in
                                                 sorted(_pair(tally, a, b).items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))]}
                    for a, b in combinations(range(len(values)), 2)]
    return out


def _pair(tally: Counter[tuple[Hashable, ...]], a: int, b: int) -> Counter[tuple[Hashable, Hashable]]:
    """How often job a's value met job b's: the confusion counts, from the tally."""
    counts: Counter[tuple[Hashable, Hashable]] = Counter()
    for row, n in tally.items():
        counts[(row[a], row[b])] += n
    return counts


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _sizes(aligned: list[pa.Table], present: np.ndarray, jobs: int) -> np.ndarray:
    """What each row is reckoned to take in the page: every job's texts, a thumbnail when its first job's row has an image."""
    texts = sum(np.nan_to_num(np.asarray(t.column("text").to_numpy(zero_copy_only=False), dtype=np.float64)) for t in aligned)
    images = np.stack([np.asarray(pc.fill_null(t.column("image"), False).to_numpy(zero_copy_only=False)) for t in aligned])
    first = present.argmax(axis=0)  # the row's first job, whose image cell the page shows
    image = images[first, np.arange(present.shape[1])]
    return ROW_BYTES * jobs + np.floor(texts * 1.1) + np.where(image, THUMB_BYTES, 0)


def _sample(telling: np.ndarray, sizes: np.ndarray, max_bytes: int) -> tuple[np.ndarray, str | None]:
    """Which rows the page holds (their places in the union), and the rule when not all of them."""
    budget = max(0, max_bytes - 200_000)  # the page, its charts and the chart library's share
    if sizes.sum() <= budget:
        return np.arange(len(sizes)), None
    others = np.flatnonzero(~telling)
    left = budget - sizes[telling].sum()
    step = max(1, math.ceil(sizes[others].sum() / left)) if left > 0 else len(others) + 1
    kept = np.sort(np.concatenate([np.flatnonzero(telling), others[::step]]))
    return kept, (f"the page holds {len(kept):,} of {len(sizes):,} rows (the cap is {max_bytes / MB:g} MB): every row "
                  f"where the jobs disagree, one is missing or one failed, then every {step}th other row; the figures "
                  f"count every row")


def _text(value: Any, redactor: Redactor) -> str | None:
    return None if value is None else cut_text(redactor.scrub(str(value)))


def _cell(rec: dict[str, Any], labels: list[str], redactor: Redactor) -> dict[str, Any]:
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


def _rows(sides: list[_Side], union: pa.Array, present: np.ndarray, chosen: np.ndarray, categories: list[str],
          disagree: np.ndarray, missing: np.ndarray, failed: np.ndarray, redactor: Redactor) -> list[dict[str, Any]]:
    """The second pass: the rows the page holds, each job's cell of each, read a part at a time."""
    ids = union.take(pa.array(chosen, pa.int64())).to_pylist()
    source = dict(zip(ids, present[:, chosen].argmax(axis=0).tolist()))
    cells: list[dict[str, dict[str, Any]]] = [{} for _ in sides]
    extra: dict[str, tuple[str | None, Any]] = {}  # the prompt and image cell, from the row's first job
    for k, side in enumerate(sides):
        wanted = pa.array([i for i, here in zip(ids, present[k, chosen].tolist()) if here], pa.string())
        inp = side.job.input
        for part in side.parts():
            held = part.filter(pc.fill_null(pc.is_in(side.row_ids(part), value_set=wanted), False))
            for row_id, rec in zip(side.row_ids(held).to_pylist(), held.to_pylist()):
                if row_id in cells[k]:
                    continue  # an id twice: its first row, as the first pass took it
                cells[k][row_id] = _cell(rec, side.labels, redactor)
                if source[row_id] == k:
                    prompt = rec.get(inp.prompt_column) if inp.prompt_column else side.job.request.prompt
                    extra[row_id] = (_text(prompt, redactor), rec.get(inp.image_column) if inp.image_column else None)
    rows = []
    for place, row_id in zip(chosen.tolist(), ids):
        prompt, image = extra[row_id]
        rows.append({"id": row_id, "prompt": prompt, "cells": [c.get(row_id, {"missing": True}) for c in cells],
                     "disagree": [n for n, d in zip(categories, disagree[:, place].tolist()) if d],
                     "missing": bool(missing[place]), "failed": bool(failed[place]), "image": image,
                     "source": source[row_id]})
    return rows


def _thumbnails(rows: list[dict[str, Any]], sides: list[_Side]) -> None:
    """Each shown row's image cell (from the first job that has the row) as thumbnails or links."""
    files = [LocalFiles.at(s.job.files_base or s.job.input.local_base, s.job.images.allowed_roots)
             for s in sides]

    def images(row: dict[str, Any]) -> list[dict[str, str]]:
        k = row.pop("source")
        return image_cells(row.pop("image"), files[k], sides[k].job, IMAGES_SHOWN)

    with ThreadPoolExecutor(4) as pool:
        for row, got in zip(rows, list(pool.map(images, rows))):
            row["images"] = got


def _summary(side: _Side, union: int) -> dict[str, Any]:
    table = side.table
    ok = table.filter(pc.fill_null(pc.equal(table.column("status"), "ok"), False))

    def values(t: pa.Table, name: str) -> np.ndarray:
        return np.asarray(t.column(name).drop_null().to_numpy(zero_copy_only=False))

    served = ok.column("model").drop_null().value_counts().to_pylist()
    latency, reasoning, tokens, costs = (np.sort(values(ok, "latency_ms")), values(ok, "reasoning_chars"),
                                         values(ok, "total_tokens"), values(table, "cost"))
    job = side.job
    return {
        "name": job.name, "model": job.endpoint.model,
        "served": max(served, key=lambda v: v["counts"])["values"] if served else None,
        "api": str(job.endpoint.api), "output": display(job.output.path), "rows": table.num_rows, "ok": ok.num_rows,
        "failed": table.num_rows - ok.num_rows, "missing": union - table.num_rows,
        "tokens": int(tokens.sum()), "tokens_per_row": float(tokens.mean()) if len(tokens) else None,
        "cost": float(costs.sum()) if len(costs) else None,
        "latency_p50": float(np.median(latency)) if len(latency) else None,
        "latency_p90": float(latency[min(len(latency) - 1, int(0.9 * len(latency)))]) if len(latency) else None,
        "reasoning_chars": float(reasoning.mean()) if len(reasoning) else None,
    }
