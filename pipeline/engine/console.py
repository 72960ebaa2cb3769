"""The console: the lines the person running a job reads, on stderr, never with a secret in them.

    console = Console.for_job(job)       # hides the API key and the storage credentials
    console.say("note: ...")
    row = console.redactor.scrub ...     # the same secrets, for what is written to files
"""

from __future__ import annotations

import sys

from ..config import Job
from ..io.storage import PartStore
from ..redact import Redactor, option_secrets

__all__ = ["Console"]


class Console:
    def __init__(self, redactor: Redactor | None = None) -> None:
        self.redactor = redactor if redactor is not None else Redactor()

    @classmethod
    def for_job(cls, job: Job) -> Console:
        """Every message, journal line, log and summary of this job's run is scrubbed of these."""
        return cls(Redactor([job.api_key(), *PartStore.for_output(job.output).secrets(), *job.proxies().secrets(),
                             *option_secrets(job.input.storage_options)]))

    def say(self, message: str) -> None:
        print(self.redactor.scrub(message), file=sys.stderr, flush=True)
