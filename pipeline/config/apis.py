"""`[endpoint] api`: which of the provider's APIs a job's requests go to, as a typed value.

    Api.RESPONSES.path         # "/responses", beneath base_url
    Api.RESPONSES.batch_url    # "/v1/responses": a Batch line's url and the batch's endpoint
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Api"]


class Api(StrEnum):
    """Which of the provider's APIs a job's requests go to (the same rows and columns either way)."""

    CHAT = "chat"  # POST {base_url}/chat/completions
    RESPONSES = "responses"  # POST {base_url}/responses

    @property
    def path(self) -> str:
        """Beneath base_url (which ends in /v1)."""
        return "/chat/completions" if self is Api.CHAT else "/responses"

    @property
    def batch_url(self) -> str:
        """A Batch JSONL line's `url` and the batch's `endpoint`."""
        return "/v1" + self.path
