"""The comparison's charts, Vega-Lite specs made with Altair as the report's are: a confusion
matrix per label field and pair of jobs (how often one job's value met the other's), and the
jobs side by side (tokens per answered row, latency).

    specs = charts(data)      # {"title", "note", "spec"} per chart, in the page's order
"""

from __future__ import annotations

from typing import Any

import altair as alt

from ..report.charts import card
from .collect import Comparison

__all__ = ["charts"]

HEIGHT = 200
MAX_VALUES = 30  # a field with more distinct values (free text) gets no matrix: it would be unreadable


def charts(data: Comparison) -> list[dict[str, Any]]:
    names = [j["name"] for j in data.jobs]
    out = []
    for f in data.fields:
        for pair in f.get("pairs", []):
            values = {str(c["a"]) for c in pair["counts"]} | {str(c["b"]) for c in pair["counts"]}
            if not pair["counts"] or len(values) > MAX_VALUES:
                continue
            a, b = names[pair["a"]], names[pair["b"]]
            out.append(card(f"Confusion: {f['name']}, {a} vs {b}",
                            f"rows by {a}'s value (down) and {b}'s (across); the diagonal agrees",
                            _matrix(pair["counts"], a, b), HEIGHT))
    out.append(card("Tokens per answered row", "mean total tokens (prompt + completion)",
                    _bars(data.jobs, "tokens_per_row", "tokens"), HEIGHT))
    out.append(card("Latency", "median (p50) and p90 of answered rows, ms", _latency(data.jobs), HEIGHT))
    return out


def _matrix(counts: list[dict[str, Any]], a: str, b: str) -> alt.LayerChart | alt.FacetChart:  # layer() hoists facets: none here
    rows = [{"a": str(c["a"]), "b": str(c["b"]), "rows": c["rows"], "same": c["a"] == c["b"]} for c in counts]
    order = sorted({r["a"] for r in rows} | {r["b"] for r in rows})
    base = alt.Chart(alt.Data(values=rows)).encode(
        x=alt.X("b:N", title=b, sort=order), y=alt.Y("a:N", title=a, sort=order))
    cells = base.mark_rect(stroke="#fff").encode(
        color=alt.Color("rows:Q", scale=alt.Scale(scheme="blues"), legend=None),
        tooltip=[alt.Tooltip("a:N", title=a), alt.Tooltip("b:N", title=b), "rows:Q"])
    text = base.mark_text(fontSize=13).encode(
        text="rows:Q", color=alt.condition(alt.datum.same, alt.value("#000"), alt.value("#c62828")))
    return alt.layer(cells, text)


def _bars(jobs: list[dict[str, Any]], key: str, title: str) -> alt.Chart:
    rows = [{"job": j["name"], "value": j[key] or 0} for j in jobs]
    return alt.Chart(alt.Data(values=rows)).mark_bar(color="#4c78a8").encode(
        y=alt.Y("job:N", title=None, sort=None), x=alt.X("value:Q", title=title), tooltip=["job:N", "value:Q"])


def _latency(jobs: list[dict[str, Any]]) -> alt.Chart:
    rows = [{"job": j["name"], "which": which, "ms": j[key] or 0}
            for j in jobs for which, key in (("p50", "latency_p50"), ("p90", "latency_p90"))]
    return alt.Chart(alt.Data(values=rows)).mark_bar().encode(
        y=alt.Y("job:N", title=None, sort=None), yOffset="which:N", x=alt.X("ms:Q", title="ms"),
        color=alt.Color("which:N", title=None, scale=alt.Scale(range=["#4c78a8", "#9ecae9"])),
        tooltip=["job:N", "which:N", "ms:Q"])
