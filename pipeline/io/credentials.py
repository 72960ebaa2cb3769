"""Storage credentials: what storage_options and the backends' environment hold that must never be
shown, and the one shape of a backend's failure (the output's store and the input's sources).

    storage_secrets(options)      # the values to scrub, the longer first
    storage_failure("[output] path", "write part-000003.parquet in", "s3://b/out", exc, options, "run again")

Credentials come from the backend's usual sources (AWS_*, ~/.aws, an instance role) or from
`storage_options`; either way their values are scrubbed from every message, file and page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import JobError
from ..redact import Redactor, storage_secrets

__all__ = ["storage_secrets", "storage_failure"]


def storage_failure(label: str, what: str, place: str, exc: BaseException, options: Mapping[str, Any],
                    then: str) -> JobError:
    """The one shape of a backend's failure: one line naming the setting, what was done where, the
    backend's own words with every secret scrubbed, and what to check (the output's store and the
    input's sources both say it so)."""
    if isinstance(exc, JobError):
        return exc
    detail = " ".join(str(exc).split()) or type(exc).__name__
    scrubbed = Redactor(storage_secrets(options), placeholder="[secret]").scrub(detail)
    return JobError(f"{label}: could not {what} {place}: {scrubbed} ({type(exc).__name__}); check the URL, the "
                    f"credentials and {label.split()[0]} storage_options, then {then}")

