"""The charts' figures over every row of an output, gathered a part file at a time, so a report's
memory stays flat in the number of rows (bench: report_scale).

    figures = Figures(labels)
    for part in parts: figures.first(part)      # ranges, distinct values (capped), value counts
    figures.settle()
    for part in parts: figures.second(part)     # histograms over the ranges the first pass found
    figures.histogram("total_tokens"); figures.counts("attempts"); figures.percentiles("latency_ms", (50, 90, 99))

What each chart reads: latency over the answered rows, error kinds over the failed ones, every
other figure over all rows. Histograms have BINS equal bins over the column's range (fewer when it
has fewer distinct values), as numpy.histogram over the whole column would; latency percentiles
come from a FINE-bin histogram (within range/FINE of the exact value).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Figures", "BINS", "MAX_LABEL_VALUES"]

BINS = 40
FINE = 20_000  # bins of the latency histogram the percentiles are read from
MAX_LABEL_VALUES = 30  # a label with more distinct values (free text) gets no distribution chart
NUMERIC = ("latency_ms", "total_tokens", "cost", "finished_at")
COUNTED = ("attempts", "error_kind")


def _values(part: pa.Table, column: str, ok: Any) -> np.ndarray:
    """A numeric column's non-null values (latency: of the answered rows only), as float64."""
    col = part.column(column)
    if column == "latency_ms":
        col = col.filter(ok)
    return col.drop_null().to_numpy().astype(np.float64) if col.null_count < len(col) else np.empty(0)


class Figures:
    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.rows = 0
        self.present: set[str] = set()  # columns some part holds
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.distinct: dict[str, set[float] | None] = {}  # None: more than BINS
        self.value_counts: dict[str, Counter[Any] | None] = {}  # None: more than MAX_LABEL_VALUES (a label)
        self.floats: set[str] = set()  # float labels: histograms, not counts
        self.hist: dict[str, np.ndarray] = {}
        self.edges: dict[str, np.ndarray] = {}
        self.fine: np.ndarray | None = None
        self.fine_edges: np.ndarray | None = None

    def _numeric(self) -> list[str]:
        return [c for c in (*NUMERIC, *sorted(self.floats)) if c in self.present]

    def first(self, part: pa.Table) -> None:
        self.rows += part.num_rows
        self.present |= set(part.column_names)
        ok = pc.fill_null(pc.equal(part.column("status"), "ok"), False) if "status" in part.column_names else None
        for name in self.labels:
            if name in part.column_names and pa.types.is_floating(part.column(name).type):
                self.floats.add(name)
        for column in self._numeric():
            if column not in part.column_names:
                continue
            values = _values(part, column, ok)
            if not len(values):
                continue
            self.low[column] = min(self.low.get(column, np.inf), float(values.min()))
            self.high[column] = max(self.high.get(column, -np.inf), float(values.max()))
            seen = self.distinct.setdefault(column, set())
            if seen is not None:
                seen.update(np.unique(values)[: BINS + 1].tolist())
                if len(seen) > BINS:
                    self.distinct[column] = None
        failed = pc.invert(ok) if ok is not None else None
        for column in (*COUNTED, *self.labels):
            if column not in part.column_names or column in self.floats:
                continue
            col = part.column(column)
            if column == "error_kind" and failed is not None:
                col = col.filter(failed)
            self._count(column, col, cap=MAX_LABEL_VALUES if column in self.labels else None)

    def _count(self, column: str, col: pa.ChunkedArray, cap: int | None) -> None:
        counts = self.value_counts.setdefault(column, Counter())
        if counts is None:
            return
        if not pa.types.is_integer(col.type) and not pa.types.is_string(col.type):
            col = pc.cast(col, pa.string())
        for item in pc.value_counts(col).to_pylist():
            counts[item["values"]] += item["counts"]
        if cap is not None and len(counts) > cap:
            self.value_counts[column] = None

    def settle(self) -> None:
        """Between the passes: each histogram's edges from the ranges found."""
        for column in self._numeric():
            if column not in self.low:
                continue
            low, high = self.low[column], self.high[column]
            if column == "finished_at":
                width = max(0.01, (high - low) / BINS)  # a run of a second still gets its shape
                edges = np.arange(low, high + 2 * width, width)
            else:
                seen = self.distinct.get(column)
                bins = BINS if seen is None else min(BINS, max(1, len(seen)))
                edges = np.histogram_bin_edges(np.array([low, high]), bins=bins)
            self.edges[column] = edges
            self.hist[column] = np.zeros(len(edges) - 1, dtype=np.int64)
        if "latency_ms" in self.low:
            self.fine_edges = np.histogram_bin_edges(np.array([self.low["latency_ms"], self.high["latency_ms"]]), bins=FINE)
            self.fine = np.zeros(FINE, dtype=np.int64)

    def second(self, part: pa.Table) -> None:
        ok = pc.fill_null(pc.equal(part.column("status"), "ok"), False) if "status" in part.column_names else None
        for column, edges in self.edges.items():
            if column not in part.column_names:
                continue
            values = _values(part, column, ok)
            if len(values):
                self.hist[column] += np.histogram(values, bins=edges)[0]
                if column == "latency_ms" and self.fine is not None and self.fine_edges is not None:
                    self.fine += np.histogram(values, bins=self.fine_edges)[0]

    # -- what the charts read ------------------------------------------------------------

    def histogram(self, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(counts, edges), or None when no row has the figure."""
        return (self.hist[column], self.edges[column]) if column in self.hist else None

    def counts(self, column: str) -> list[tuple[Any, int]] | None:
        """(value, rows) pairs; None when the column is missing or has too many values to chart."""
        counts = self.value_counts.get(column)
        return None if counts is None else sorted(counts.items(), key=lambda kv: -kv[1])

    def percentiles(self, column: str, qs: tuple[int, ...]) -> list[float]:
        assert column == "latency_ms" and self.fine is not None and self.fine_edges is not None
        cumulative = np.cumsum(self.fine)
        total = cumulative[-1]
        mids = (self.fine_edges[:-1] + self.fine_edges[1:]) / 2
        return [float(mids[min(len(mids) - 1, int(np.searchsorted(cumulative, q / 100 * total)))]) for q in qs]

    def integer(self, column: str) -> bool:
        return column in self.value_counts and all(isinstance(v, int) for v in (self.value_counts[column] or {}))
