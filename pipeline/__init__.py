"""pipeline: bulk vision-LLM jobs, a manifest of images and prompts in, a Parquet dataset out.

    from pipeline import load_job, run, RunOptions
    code = run(load_job("jobs/demo.toml"), RunOptions())

See ARCHITECTURE.md for how the modules fit together.
"""

from .config import Job, load_job
from .errors import InputError, JobError, LockedError, PipelineError, RequestError, RowError, StopJob
from .runner import RunOptions, run

__all__ = [
    "Job",
    "load_job",
    "run",
    "RunOptions",
    "PipelineError",
    "JobError",
    "LockedError",
    "RowError",
    "InputError",
    "RequestError",
    "StopJob",
]
__version__ = "0.1.0"
