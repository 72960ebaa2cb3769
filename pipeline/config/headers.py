"""`[endpoint] headers`: extra HTTP headers sent with every request (chat completions, streams and
the Batch API), checked when the job is read; which of them hold a secret; which can change an
answer (those are part of the request cache's key).

    [endpoint.headers]
    "OpenAI-Project" = "proj_abc"          # billing only: not in the cache's key
    "x-litellm-tags" = "captions"          # a gateway's routing: in the key
    "x-portkey-api-key" = "pk-..."         # a secret (its name says so): hashed in the key, scrubbed everywhere

A header changes an answer unless it is one of NEUTRAL (billing, attribution, tracing), so the
cache errs towards a miss (paid once more) over a hit from another route. A header whose name
holds one of SECRET_WORDS (pipeline.redact, the one list) is a secret: its value goes into the key only as a SHA-256 digest, and
every message, log and file of the run is scrubbed of it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Mapping

from ..redact import SECRET_WORDS, secret_name
from .proxy import Proxy

__all__ = ["NEUTRAL", "RESERVED", "SECRET_WORDS", "headers_problem", "secret_values", "endpoint_secrets", "cache_scope"]

# Lower-case names that never change an answer: who pays, who is attributed, how it is traced.
NEUTRAL = frozenset({"openai-organization", "openai-project", "user-agent", "x-request-id", "x-client-request-id",
                     "traceparent", "tracestate", "http-referer", "x-title", "idempotency-key"})
# Set by the pipeline itself (the key comes from api_key_env, the proxy's from its URL).
RESERVED = frozenset({"authorization", "proxy-authorization", "content-type", "content-length", "content-encoding",
                      "accept-encoding", "host", "connection", "transfer-encoding", "te", "upgrade", "keep-alive"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's field-name


def headers_problem(headers: Mapping[str, object]) -> str | None:
    """What is wrong with `[endpoint] headers`, or None."""
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            return f"has {name!r}, which is not a header name"
        if name.lower() in RESERVED:
            return f"{name}: set by the pipeline (the API key: [endpoint] api_key_env)"
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            return f"{name}: its value must be one line of text"
    return None


def secret_values(headers: Mapping[str, str]) -> list[str]:
    """The values no output, message or cache may hold."""
    return [value for name, value in headers.items() if secret_name(name) and value]


def endpoint_secrets(api_key: str | None, proxy: Proxy | None, headers: Mapping[str, str]) -> list[str]:
    """What every request to the endpoint carries that no output may show: the key, the proxy's
    password, secret headers (Job.secrets() holds them; a Client used on its own hides these)."""
    return [s for s in (api_key, *(proxy.secrets() if proxy is not None else ()), *secret_values(headers)) if s]


def cache_scope(url: str, headers: Mapping[str, str]) -> str:
    """What the request cache keys an endpoint by, besides the body: its URL and the headers that
    can change an answer (names lower-cased and sorted; a secret's value as its SHA-256)."""
    lines = [url]
    for name in sorted(headers, key=str.lower):
        low = name.lower()
        if low in NEUTRAL:
            continue
        value = headers[name]
        shown = "sha256:" + hashlib.sha256(value.encode()).hexdigest() if secret_name(name) else value
        lines.append(f"{low}: {shown}")
    return "\n".join(lines)
