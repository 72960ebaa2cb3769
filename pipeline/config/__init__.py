"""The job's configuration: frozen tables declared once (fields.py), read from a TOML job file.

    job = load_job("jobs/captions.toml")     # raises JobError naming the file, the table and the key
    job.limits.requests_per_minute
"""

from .fields import AUTO, Auto, Table, keys_markdown, read_table, setting
from .job import Job, job_keys_markdown, load_job, parse_job
from .sections import (
    DEFAULT_OUTPUT_TOKENS,
    MANIFEST_FORMATS,
    EndpointConfig,
    ImagesConfig,
    InputConfig,
    LabelsConfig,
    LimitsConfig,
    OutputConfig,
    RequestConfig,
    RunConfig,
)
from .apis import Api
from .audio import AudioConfig, AudioFormat, AudioPart
from .pricing import ModelPrice, PricingConfig
from .serve import ServeOptions

__all__ = [
    "Api", "Job", "load_job", "parse_job", "job_keys_markdown", "Table", "setting", "read_table", "keys_markdown",
    "InputConfig", "EndpointConfig", "RequestConfig", "LimitsConfig", "ImagesConfig", "OutputConfig", "RunConfig",
    "LabelsConfig", "AudioConfig", "AudioPart", "AudioFormat", "PricingConfig", "ModelPrice", "ServeOptions",
    "MANIFEST_FORMATS", "DEFAULT_OUTPUT_TOKENS", "Auto", "AUTO",
]
