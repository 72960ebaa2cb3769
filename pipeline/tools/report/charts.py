"""The report's charts: Vega-Lite specs made with Altair from every row's figures (binned here with
NumPy, so a million rows make a spec of a few kilobytes), drawn in the page by vega-embed.

    specs = charts(data)            # {"title": ..., "spec": {...}} per chart, in the page's order
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import altair as alt
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .collect import ReportData

__all__ = ["charts", "WIDTH"]

WIDTH = 380
HEIGHT = 180
BINS = 40
MAX_LABEL_VALUES = 30  # a label with more distinct values (free text) gets no distribution chart


def charts(data: ReportData) -> list[dict[str, Any]]:
    t = data.figures
    out = [
        _chart("Rows done over time", "rows answered per minute (every row with a time)", _throughput(t)),
        _chart("Latency", "per answered row, ms: p50, p90 and p99 marked", _latency(t)),
        _chart("Attempts per row", "requests a row took", _counts(t, "attempts", "attempts")),
        _chart("Errors by kind", "failed rows", _counts(t.filter(pc.fill_null(pc.not_equal(t["status"], "ok"), True))
                                                        if t.num_rows else t, "error_kind", "kind", horizontal=True,
                                                        empty="no failed rows")),
        _chart("429s and pauses per run", "rate-limit answers and the time they paused every request", _pauses(data)),
        _chart("Tokens per row", "total tokens (prompt + completion)", _histogram(t, "total_tokens", "tokens")),
    ]
    if "cost" in t.column_names and t["cost"].null_count < t.num_rows:
        out.append(_chart("Cost per row", "from [pricing], every attempt of the row", _histogram(t, "cost", "cost")))
    for name in data.labels:
        col = t[name]
        if pa.types.is_floating(col.type):
            out.append(_chart(f"Label: {name}", "distribution of the label's values", _histogram(t, name, name)))
        elif len(pc.unique(col)) <= MAX_LABEL_VALUES:
            out.append(_chart(f"Label: {name}", "rows per value", _counts(t, name, name, horizontal=True)))
    return out


def _count_axis(most: int) -> alt.Axis:
    """Ticks on whole rows: no "0.5" of a row when the counts are small."""
    return alt.Axis(values=list(range(0, most + 1))) if most <= 8 else alt.Axis(tickMinStep=1, format="~s")


def _chart(title: str, note: str, chart: alt.TopLevelMixin) -> dict[str, Any]:
    spec = chart.properties(width=WIDTH, height=HEIGHT).configure_view(stroke=None).to_dict()
    return {"title": title, "note": note, "spec": spec}


def _empty(what: str) -> alt.Chart:
    return alt.Chart(alt.Data(values=[{"text": what}])).mark_text(size=13, color="#888").encode(text="text:N")


def _throughput(t: pa.Table) -> alt.Chart:
    if "finished_at" not in t.column_names or t["finished_at"].null_count == t.num_rows:
        return _empty("no row has a time (written by an earlier version)")
    times = t["finished_at"].drop_null().to_numpy()
    start, end = float(times.min()), float(times.max())
    width = max(0.01, (end - start) / BINS)  # a run of a second still gets its shape
    counts, edges = np.histogram(times, bins=np.arange(start, end + 2 * width, width))
    values = [{"time": datetime.fromtimestamp(e, timezone.utc).isoformat(), "per_min": c * 60.0 / width,
               "done": int(d)} for e, c, d in zip(edges[1:], counts, np.cumsum(counts))]
    fmt = "%H:%M:%S" if end - start < 86400 else "%b %d %H:%M"
    base = alt.Chart(alt.Data(values=values)).encode(x=alt.X("time:T", title="UTC", axis=alt.Axis(format=fmt, labelOverlap=True)))
    rate = base.mark_area(opacity=0.35, interpolate="step-before").encode(y=alt.Y("per_min:Q", title="rows / min"))
    done = base.mark_line(color="#444", point=len(values) < 3).encode(y=alt.Y("done:Q", title="rows done",
                                                                              axis=alt.Axis(tickMinStep=1)))
    return alt.layer(rate, done).resolve_scale(y="independent")


def _latency(t: pa.Table) -> alt.LayerChart | alt.Chart:
    ok = t.filter(pc.equal(t["status"], "ok")) if t.num_rows else t
    if "latency_ms" not in ok.column_names or ok["latency_ms"].null_count == ok.num_rows:
        return _empty("no answered row")
    hist = _histogram(ok, "latency_ms", "ms")
    lat = ok["latency_ms"].drop_null().to_numpy()
    marks = [{"p": f"p{q}", "ms": float(np.percentile(lat, q))} for q in (50, 90, 99)]
    rules = alt.Chart(alt.Data(values=marks)).mark_rule(color="#c0392b").encode(x="ms:Q", tooltip=["p:N", "ms:Q"])
    text = alt.Chart(alt.Data(values=marks)).mark_text(align="left", dx=3, dy=-60, color="#c0392b").encode(
        x="ms:Q", text="p:N")
    return alt.layer(hist, rules, text)


def _histogram(t: pa.Table, column: str, title: str) -> alt.Chart:
    if column not in t.column_names or t[column].null_count == t.num_rows:
        return _empty(f"no {title}")
    values = t[column].drop_null().to_numpy().astype(float)
    counts, edges = np.histogram(values, bins=min(BINS, max(1, len(np.unique(values)))))
    rows = [{"from": float(a), "to": float(b), "rows": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]
    return alt.Chart(alt.Data(values=rows)).mark_bar(color="#4c78a8").encode(
        x=alt.X("from:Q", bin="binned", title=title), x2="to:Q",
        y=alt.Y("rows:Q", title="rows", axis=_count_axis(int(counts.max()))),
        tooltip=["from:Q", "to:Q", "rows:Q"])


def _counts(t: pa.Table, column: str, title: str, horizontal: bool = False, empty: str = "no rows") -> alt.Chart:
    if column not in t.column_names or t.num_rows == 0:
        return _empty(empty)
    counts = pc.value_counts(pc.cast(t[column], pa.string()) if not pa.types.is_integer(t[column].type) else t[column])
    rows = [{"value": "(none)" if v["values"] is None else v["values"], "rows": v["counts"]} for v in counts.to_pylist()]
    kind = "Q" if pa.types.is_integer(t[column].type) and not horizontal else "N"
    value = alt.X(f"value:{'O' if kind == 'Q' else 'N'}", title=title, sort="-y" if not horizontal else None)
    chart = alt.Chart(alt.Data(values=rows)).mark_bar(color="#4c78a8")
    axis = _count_axis(max(r["rows"] for r in rows))
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
    bars = base.mark_bar(color="#e45756", opacity=0.8).encode(y=alt.Y("429s:Q", title="429 answers", axis=_count_axis(max(r["429s"] for r in runs))),
                                                            tooltip=["run:N", "429s:Q", "paused_s:Q"])
    line = base.mark_line(point=True, color="#444").encode(y=alt.Y("paused_s:Q", title="paused, s"))
    return alt.layer(bars, line).resolve_scale(y="independent")
