"""pipeline: bulk vision-LLM jobs, a manifest of images and prompts in, a Parquet dataset out.

    import pipeline
    job = pipeline.load_job("jobs/demo.toml")          # or a dict shaped like the TOML file
    res = pipeline.run(job)                            # or run(job, manifest=df); await arun(...) in a loop
    res.exit_code, res.ok, res.failed, res.pending; res.to_pandas()
    pipeline.compare(job_a, job_b)                     # several models' outputs side by side, one HTML page

See ARCHITECTURE.md for how the modules fit together. Names are imported on first use, so
`pipeline serve` and `pipeline status` start without loading the engine's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Job",
    "load_job",
    "run",
    "arun",
    "compare",
    "RunResult",
    "PipelineError",
    "JobError",
    "LockedError",
    "RowError",
    "InputError",
    "RequestError",
    "StopJob",
    "LocalFailure",
    "ErrorKind",
]
__version__ = "0.1.0"

_HOME = {
    "Job": "config", "load_job": "api", "run": "api", "arun": "api", "compare": "api", "RunResult": "api",
    **{name: "errors" for name in ("PipelineError", "JobError", "LockedError", "RowError", "InputError", "RequestError", "StopJob", "LocalFailure", "ErrorKind")},
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
