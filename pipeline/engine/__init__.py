"""Running a job: the shard engine and the executors that run it (local, Ray).

    code = run(load_job("jobs/demo.toml"), RunOptions())     # the process exit code

Shape of a run (pipeline.engine.executor): lock the job and prepare it (plan the manifest's
shards, verify the committed parts); the executor sends the shards still to do through
ShardEngine (pipeline.engine.shard: a producer, a bounded queue, workers, commits); the run ends
with one summary (pipeline.engine.summary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .options import RunOptions
from .process import (
    EXIT_FAILED_ROWS,
    EXIT_LOCAL_FAILURE,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_SIGNAL,
    EXIT_STOPPED,
    EXIT_USAGE,
    EXIT_WAITING,
)

__all__ = ["run", "executor_for", "RunOptions", "EXIT_OK", "EXIT_FAILED_ROWS", "EXIT_USAGE", "EXIT_STOPPED", "EXIT_LOCAL_FAILURE",
           "EXIT_LOCKED", "EXIT_SIGNAL", "EXIT_WAITING"]


if TYPE_CHECKING:
    from ..config import Job
    from ..io.checkpoint import Checkpoint
    from .executor import Executor
    from .host import Host


def run(job: Job, options: RunOptions = RunOptions()) -> int:
    """Run the job to its end or to a stop; returns the exit code. Never raises for row errors."""
    return executor_for(job, options).run()


def executor_for(job: Job, options: RunOptions = RunOptions(), *, host: Host | None = None,
                 stage: Callable[[Checkpoint], None] | None = None) -> Executor:
    """The executor the job asks for ([run] engine), not started."""
    if job.run.mode == "batch":
        from .batch import BatchExecutor

        return BatchExecutor(job, options, host=host, stage=stage)
    if job.run.engine == "ray":
        from .ray import (
            RayExecutor,  # the optional extra: a JobError naming it when Ray is missing
        )

        return RayExecutor(job, options, host=host, stage=stage)
    from .local import LocalExecutor

    return LocalExecutor(job, options, host=host, stage=stage)
