"""`python -m pipeline.config`: print every job-file key as markdown (the README's key list)."""

from .job import job_keys_markdown

print(job_keys_markdown(), end="")
