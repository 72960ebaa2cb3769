"""`pipeline report`: one self-contained HTML page of a job's output, to look at instead of a
Parquet file. Offline by construction: the chart library is inlined, images are thumbnails
inlined as data: URIs, a remote image is a link (the report never fetches), and the page's
Content-Security-Policy lets nothing load from anywhere.

    path = write_report(job)                     # <output>/_report.html (or `out`), returned
    path = write_report(job, out=Path("r.html"), max_mb=20)

The page: a gallery of the rows (thumbnails, answer, folded reasoning, labels, tokens, cost,
latency, status and error; filters by status, error kind and label value, search, sorting,
pages of 50), charts over every row (collect.py's figures, charts.py's specs), the run history
and the job's settings without secrets. `_report.html`: the leading underscore keeps Parquet
readers of the output folder (`pd.read_parquet(folder)`) from taking it for a part.

Needs the `report` extra (Altair, vl-convert for the inlined Vega bundle, Jinja2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...config import Job
from ...errors import JobError
from ...io.storage import PartStore
from ...redact import Redactor, option_secrets
from ...rows.images import MB

__all__ = ["write_report", "REPORT_NAME", "MAX_MB"]

REPORT_NAME = "_report.html"
MAX_MB = 20.0


def write_report(job: Job, out: Path | None = None, *, max_mb: float = MAX_MB) -> str:
    """Write the report; returns where it is (a path, or a URL for an object-store output)."""
    try:
        import jinja2

        from .charts import charts
        from .collect import collect
    except ImportError as exc:
        raise JobError(f"the report needs its extra ({exc.name} is missing): pip install -e '.[report]' in the clone "
                       f"(or 'pipeline[report]')") from None
    store = PartStore.for_output(job.output)
    redactor = Redactor([job.api_key(), *store.secrets(), *option_secrets(job.input.storage_options)])
    bundle = _script_safe(_vega_bundle())
    data = collect(job, int(max_mb * MB), redactor, fixed_bytes=len(bundle.encode()))
    page = {
        "rows": data.rows, "total": data.total, "sampling": data.sampling, "labels": data.labels,
        "charts": charts(data), "state": data.state, "settings": data.settings, "history": data.history,
    }
    text = redactor.scrub(json.dumps(page, ensure_ascii=False, default=str))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True)
    html = env.get_template("page.html").render(
        job=data.job, output=data.output, generated=data.generated,
        vega_bundle=jinja2.utils.markupsafe.Markup(bundle),
        data_json=jinja2.utils.markupsafe.Markup(text.replace("<", "\\u003c")),  # no "</script>" inside
    )
    body = html.encode("utf-8")
    if out is not None:
        _write(Path(out), body)
        return str(out)
    if store.local is not None:
        path = store.local / REPORT_NAME
        _write(path, body)
        return str(path)
    store.write(REPORT_NAME, body)
    return f"{str(job.output.path).rstrip('/')}/{REPORT_NAME}"


def _vega_bundle() -> str:
    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    return str(vl_convert.javascript_bundle(vl_version=vl_version_for_vl_convert()))


def _script_safe(js: str) -> str:
    return js.replace("</script", "<\\/script")


def _write(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

