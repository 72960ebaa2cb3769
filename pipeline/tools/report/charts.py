"""The report's charts: Vega-Lite specs made with Altair from every row's figures (binned as the
output is read, pipeline.tools.report.figures, so a million rows make a spec of a few kilobytes),
drawn in the page by vega-embed.

    specs = charts(data)            # {"title": ..., "spec": {...}} per chart, in the page's order
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import altair as alt
import numpy as np

from .collect import ReportData
from .figures import Figures

__all__ = ["charts", "card", "WIDTH"]

WIDTH = 380
HEIGHT = 180


def charts(data: ReportData) -> list[dict[str, Any]]:
    f = data.figures
    out = [
        card("Rows done over time", "rows answered per minute (every row with a time)", _throughput(f)),
        card("Latency", "per answered row, ms: p50, p90 and p99 marked", _latency(f)),
        card("Attempts per row", "requests a row took", _counts(f, "attempts", "attempts")),
        card("Errors by kind", "failed rows", _counts(f, "error_kind", "kind", horizontal=True, empty="no failed rows")),
        card("429s and pauses per run", "rate-limit answers and the time they paused every request", _pauses(data)),
        card("Tokens per row", "total tokens (prompt + completion)", _histogram(f, "total_tokens", "tokens")),
    ]
    if f.histogram("cost") is not None:
        out.append(card("Cost per row", "from [pricing], every attempt of the row", _histogram(f, "cost", "cost")))
    for name in data.labels:
        if name in f.floats:
            out.append(card(f"Label: {name}", "distribution of the label's values", _histogram(f, name, name)))
        elif f.counts(name) is not None:
            out.append(card(f"Label: {name}", "rows per value", _counts(f, name, name, horizontal=True)))
    return out


def _count_axis(most: int) -> alt.Axis:
    """Ticks on whole rows: no "0.5" of a row when the counts are small."""
    return alt.Axis(values=list(range(0, most + 1))) if most <= 8 else alt.Axis(tickMinStep=1, format="~s")


def card(title: str, note: str, chart: alt.TopLevelMixin, height: int = HEIGHT) -> dict[str, Any]:
    """A chart as the pages hold it (the report's and the comparison's): its title, note and spec."""
    spec = chart.properties(width=WIDTH, height=height).configure_view(stroke=None).to_dict()
    return {"title": title, "note": note, "spec": spec}


def _empty(what: str) -> alt.Chart:
    return alt.Chart(alt.Data(values=[{"text": what}])).mark_text(size=13, color="#888").encode(text="text:N")


def _throughput(f: Figures) -> alt.Chart:
    found = f.histogram("finished_at")
    if found is None:
        return _empty("no row has a time (written by an earlier version)")
    counts, edges = found
    start, end = float(edges[0]), float(edges[-2])
    width = float(edges[1] - edges[0])
    values = [{"time": datetime.fromtimestamp(e, timezone.utc).isoformat(), "per_min": c * 60.0 / width,
               "done": int(d)} for e, c, d in zip(edges[1:], counts, np.cumsum(counts))]
    fmt = "%H:%M:%S" if end - start < 86400 else "%b %d %H:%M"
    base = alt.Chart(alt.Data(values=values)).encode(x=alt.X("time:T", title="UTC", axis=alt.Axis(format=fmt, labelOverlap=True)))
    rate = base.mark_area(opacity=0.35, interpolate="step-before").encode(y=alt.Y("per_min:Q", title="rows / min"))
    done = base.mark_line(color="#444", point=len(values) < 3).encode(y=alt.Y("done:Q", title="rows done",
                                                                              axis=alt.Axis(tickMinStep=1)))
    return alt.layer(rate, done).resolve_scale(y="independent")


def _latency(f: Figures) -> alt.Chart | alt.LayerChart | alt.FacetChart:  # layer() hoists facets: none here
    if f.histogram("latency_ms") is None:
        return _empty("no answered row")
    hist = _histogram(f, "latency_ms", "ms")
    marks = [{"p": f"p{q}", "ms": ms} for q, ms in zip((50, 90, 99), f.percentiles("latency_ms", (50, 90, 99)))]
    rules = alt.Chart(alt.Data(values=marks)).mark_rule(color="#c0392b").encode(x="ms:Q", tooltip=["p:N", "ms:Q"])
    text = alt.Chart(alt.Data(values=marks)).mark_text(align="left", dx=3, dy=-60, color="#c0392b").encode(
        x="ms:Q", text="p:N")
    return alt.layer(hist, rules, text)


def _histogram(f: Figures, column: str, title: str) -> alt.Chart:
    found = f.histogram(column)
    if found is None:
        return _empty(f"no {title}")
    counts, edges = found
    rows = [{"from": float(a), "to": float(b), "rows": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]
    return alt.Chart(alt.Data(values=rows)).mark_bar(color="#4c78a8").encode(
        x=alt.X("from:Q", bin="binned", title=title), x2="to:Q",
        y=alt.Y("rows:Q", title="rows", axis=_count_axis(int(counts.max()))),
        tooltip=["from:Q", "to:Q", "rows:Q"])


def _counts(f: Figures, column: str, title: str, horizontal: bool = False, empty: str = "no rows") -> alt.Chart:
    counts = f.counts(column)
    if not counts:
        return _empty(empty)
    rows = [{"value": "(none)" if v is None else v, "rows": n} for v, n in counts]
    kind = "Q" if f.integer(column) and not horizontal else "N"
    value = alt.X(f"value:{'O' if kind == 'Q' else 'N'}", title=title, sort="-y" if not horizontal else None)
    chart = alt.Chart(alt.Data(values=rows)).mark_bar(color="#4c78a8")
    axis = _count_axis(max(n for _, n in counts))
    if horizontal:
        return chart.encode(y=alt.Y("value:N", title=None, sort="-x"), x=alt.X("rows:Q", title="rows", axis=axis),
                            tooltip=["value:N", "rows:Q"])
    return chart.encode(x=value, y=alt.Y("rows:Q", title="rows", axis=axis), tooltip=["value:N", "rows:Q"])


def _pauses(data: ReportData) -> alt.Chart | alt.LayerChart:
    runs = [{"run": f"#{i + 1}", "429s": r.get("rate_limited") or 0, "paused_s": r.get("paused_s") or 0.0}
            for i, r in enumerate(data.history)]
    if not runs:
        return _empty("no run recorded yet")
    base = alt.Chart(alt.Data(values=runs)).encode(x=alt.X("run:N", title="run", sort=None))
    bars = base.mark_bar(color="#e45756", opacity=0.8).encode(y=alt.Y("429s:Q", title="429 answers", axis=_count_axis(max(int(r["429s"]) for r in runs))),
                                                            tooltip=["run:N", "429s:Q", "paused_s:Q"])
    line = base.mark_line(point=True, color="#444").encode(y=alt.Y("paused_s:Q", title="paused, s"))
    return alt.layer(bars, line).resolve_scale(y="independent")
