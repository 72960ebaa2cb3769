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
import subprocess
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from ...config import Job
from ...errors import JobError
from ...io.durable import atomic_write
from ...io.storage import PartStore
from ...redact import Redactor
from ...rows.images import MB

if TYPE_CHECKING:
    import jinja2

__all__ = ["write_report", "vega_bundle", "script_safe", "page_writer", "REPORT_NAME", "MAX_MB"]

REPORT_NAME = "_report.html"
MAX_MB = 20.0
_DATA = "/*pipeline-page-data*/"  # where the page's data goes, written in place rather than rendered in


def write_report(job: Job, out: Path | None = None, *, max_mb: float = MAX_MB) -> str:
    """Write the report; returns where it is (a path, or a URL for an object-store output)."""
    try:
        import jinja2  # noqa: F401 - here for the message below: page_writer renders with it

        from .charts import charts
        from .collect import collect
    except ImportError as exc:
        raise JobError(f"the report needs its extra ({exc.name} is missing): pip install -e '.[report]' in the clone "
                       f"(or 'pipeline[report]')") from None
    store = PartStore.for_output(job.output)
    redactor = Redactor(job.secrets())
    bundle = script_safe(vega_bundle())
    data = collect(job, int(max_mb * MB), redactor, fixed_bytes=len(bundle.encode()))
    page = {
        "rows": data.rows, "total": data.total, "sampling": data.sampling, "labels": data.labels,
        "charts": charts(data), "state": data.state, "settings": data.settings, "history": data.history,
    }
    text = json.dumps(page, ensure_ascii=False, default=str)
    del page
    data.rows = []  # the rows as Python objects go before the page is put together (peak memory)
    text = redactor.scrub(text)
    page_data = page_writer(Path(__file__).parent, text, bundle, job=data.job, output=data.output,
                            generated=data.generated)
    del text
    if out is not None:
        atomic_write(Path(out), page_data)
        return str(out)
    store.write(REPORT_NAME, page_data)
    return store.where(REPORT_NAME)


_BUNDLE = ("import sys, vl_convert; from altair.utils._importers import vl_version_for_vl_convert; "
           "sys.stdout.write(vl_convert.javascript_bundle(vl_version=vl_version_for_vl_convert()))")


def vega_bundle() -> str:
    """The Vega bundle, made in a child process: vl-convert's JavaScript engine keeps ~150 MB
    that this process would hold to its end (bench: report_scale)."""
    made = subprocess.run([sys.executable, "-c", _BUNDLE], capture_output=True, check=False)
    if made.returncode != 0:
        raise JobError(f"the report could not make the chart library (vl-convert: "
                       f"{made.stderr.decode('utf-8', 'replace').strip().splitlines()[-1:]})")
    return made.stdout.decode("utf-8")


def _page_template(folder: Path) -> jinja2.Template:
    """`folder`'s page.html, which may include the report's shared pieces (shared.js: the helpers,
    the charts, the thumbnails and the pager that the report's and the comparison's pages share)."""
    import jinja2

    loader = jinja2.FileSystemLoader([folder, Path(__file__).parent])
    return jinja2.Environment(loader=loader, autoescape=True).get_template("page.html")


def script_safe(js: str) -> str:
    """Script text that cannot end its <script> element early."""
    return js.replace("</script", "<\\/script")


def page_writer(folder: Path, text: str, bundle: str, **context: Any) -> Callable[[IO[bytes]], object]:
    """`folder`'s page rendered with `context` and the chart library (`bundle`, script-safe), the
    page's data (`text`, scrubbed JSON) placed in it as is rather than rendered in, and written piece
    by piece: never one more copy of the whole page (the report's and the comparison's)."""
    import markupsafe  # jinja2's own dependency

    html = _page_template(folder).render(**context, vega_bundle=markupsafe.Markup(bundle),
                                         data_json=markupsafe.Markup(_DATA))
    head, tail = html.split(_DATA, 1)
    del html
    body = [head.encode("utf-8"), text.replace("<", "\\u003c").encode("utf-8"), tail.encode("utf-8")]  # no "</script>" inside
    return lambda f: [f.write(piece) for piece in body]
