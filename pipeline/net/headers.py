"""The provider's response headers: which ones are read, and a gateway's renamed ones.

    observed(headers)     # a success's headers the limiter reads, gateway-renamed ones standing in
    unrenamed(headers)    # a refusal's headers, `llm_provider-retry-after` also as `retry-after`

LiteLLM's proxy, the most used LLM gateway, passes the provider's headers on renamed with the
prefix `llm_provider-` (`llm_provider-retry-after`, `llm_provider-x-ratelimit-reset-requests`), by
design, and keeps only some under their own names. Read as they come, a 429 through it carries
no delay and the client falls back to its own backoff; so where a plain name is missing, its
renamed twin stands in for it (a plain header, the gateway's own, always wins).
"""

from __future__ import annotations

__all__ = ["OBSERVED_HEADERS", "GATEWAY_PREFIX", "observed", "unrenamed"]

# What a successful answer's headers are read for (the limiter's view of the server's budget);
# copying every header of every answer into a dict cost more than the answer's JSON parse.
OBSERVED_HEADERS = (
    "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "content-type",
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",  # "auto" limits pace at what these announce
)


GATEWAY_PREFIX = "llm_provider-"


_PAIRS = tuple((k, GATEWAY_PREFIX + k) for k in OBSERVED_HEADERS)  # made once: observed() runs per answer


def observed(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, renamed in _PAIRS
            if (v := headers.get(k)) is not None or (v := headers.get(renamed)) is not None}


def unrenamed(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with each gateway-renamed header also under its plain name, where that is missing."""
    cut = len(GATEWAY_PREFIX)
    twins = {k[cut:]: v for k, v in headers.items() if k.startswith(GATEWAY_PREFIX) and k[cut:] not in headers}
    return {**headers, **twins} if twins else headers
