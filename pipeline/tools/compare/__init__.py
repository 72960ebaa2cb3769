"""`pipeline compare JOB_A JOB_B [JOB_C ...]`: one offline page setting several jobs' outputs side
by side (a manifest run through several models), in the report's style: the rows joined by id,
each model's answer, labels, reasoning length, tokens, cost and latency beside the image; for
labeling jobs, per label field the agreement rate, Cohen's kappa (two jobs) or Fleiss' kappa
(three or more), a confusion matrix per pair of jobs, and a "models disagree" filter. A row one
job has no result for is shown as missing there, never dropped.

    path = write_compare([job_a, job_b])                   # compare-<a>-<b>.html in the working folder
    path = write_compare(jobs, out=Path("c.html"), max_mb=20)

Offline as the report is (pipeline.tools.report, whose Vega bundle and thumbnails it uses): the chart library inlined, images as thumbnails, remote images as links, a
Content-Security-Policy that lets nothing load. Nothing is sent and no job is locked: jobs may
still be running. Needs the `report` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...config import Job
from ...errors import JobError
from ...io.durable import atomic_write
from ...redact import Redactor
from ...rows.images import MB

__all__ = ["write_compare", "default_name", "MAX_MB"]

MAX_MB = 20.0


def default_name(jobs: list[Job]) -> str:
    return "compare-" + "-".join(job.name for job in jobs) + ".html"


def write_compare(jobs: list[Job], out: Path | None = None, *, max_mb: float = MAX_MB) -> str:
    """Write the page; returns its path."""
    if len(jobs) < 2:
        raise JobError("compare needs two jobs or more (one manifest run through several models)")
    names = [job.name for job in jobs]
    if len(set(names)) < len(names):
        raise JobError(f"compare: the jobs' names repeat ({', '.join(names)}); each job is told by its name")
    try:
        import jinja2  # noqa: F401 - here for the message below: page_writer renders with it

        from ..report import page_writer, script_safe, vega_bundle
        from .charts import charts
        from .collect import collect
    except ImportError as exc:
        raise JobError(f"compare needs the report extra ({exc.name} is missing): pip install -e '.[report]' in the "
                       f"clone (or 'pipeline[report]')") from None
    redactor = Redactor([s for job in jobs for s in job.secrets()])  # what every redactor of each job's runs hides
    bundle = script_safe(vega_bundle())
    data = collect(jobs, int(max_mb * MB) - len(bundle.encode()), redactor)
    page = {"jobs": data.jobs, "fields": data.fields, "labels": data.labels, "rows": data.rows, "total": data.total,
            "sampling": data.sampling, "charts": charts(data)}
    text = redactor.scrub(json.dumps(page, ensure_ascii=False, default=str))
    page_data = page_writer(Path(__file__).parent, text, bundle, title=" vs ".join(names))
    del text
    path = Path(out) if out is not None else Path.cwd() / default_name(jobs)
    atomic_write(path, page_data)
    return str(path)
