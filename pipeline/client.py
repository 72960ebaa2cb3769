"""The client: one keep-alive aiohttp session, one POST per attempt, foreign errors translated.

`translate` is the single boundary where aiohttp exceptions, asyncio timeouts and HTTP statuses
become RequestError kinds; the rest of the pipeline only sees RequestError.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import orjson

from .errors import RequestError
from .retry import DASHSCOPE_THROTTLE
from .stream import StreamAssembler, StreamError

__all__ = ["Client", "translate", "classify_status"]

# 429 bodies that mean "no money left", not "too fast": retrying cannot help.
# Checked on any 4xx: OpenAI sends billing_hard_limit_reached as a 400, DashScope "Arrearage"
# (account in arrears) as a 400; either way every further row would fail the same way.
QUOTA_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "spend_limit_reached", "quota_exceeded",
     "Arrearage"}
)
_MESSAGE_CAP = 500


def classify_status(status: int, code: str | None) -> str:
    if 400 <= status < 500 and code in QUOTA_CODES:
        return "quota"
    if status == 429:  # any other 429, DashScope's quota-worded AllocationQuota included, clears by itself
        return "rate_limit"
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "quota"
    if status == 408:
        return "timeout"
    if status == 409 or status >= 500:
        return "server"
    return "bad_request"


def _error_fields(raw: bytes) -> tuple[str, str | None]:
    """(message, code) from an OpenAI- or DashScope-shaped error body, or its text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:_MESSAGE_CAP] or "(empty body)", None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = err.get("message") or text
        fields = (err.get("code"), err.get("type"))
    elif isinstance(body, dict):
        message = body.get("message") or (err if isinstance(err, str) else text)
        fields = (body.get("code"), body.get("type"))
    else:
        return text[:_MESSAGE_CAP], None
    names = [str(f) for f in fields if f not in (None, "")]
    # A quota may be named in `type` while `code` holds something generic: the telling one wins.
    telling = [n for n in names if n in QUOTA_CODES or n == DASHSCOPE_THROTTLE]
    code = (telling or names or [None])[0]
    return str(message)[:_MESSAGE_CAP], code


def translate(
    exc: BaseException | None = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    secret: str | None = None,
) -> RequestError:
    """The one place foreign failures become RequestError. The key is scrubbed from messages."""
    headers = headers or {}
    should = headers.get("x-should-retry")
    should_retry = {"true": True, "false": False}.get(should.lower()) if should else None
    if exc is not None:
        if isinstance(exc, StreamError):  # a stream cut, or an error sent mid-stream: transient
            kind = {"cut": "connection", "error_chunk": "server"}.get(exc.reason, "invalid_response")
            return RequestError(_scrub(str(exc), secret), kind=kind, status=status, headers=headers,
                                code=exc.code, should_retry=should_retry)
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            kind, message = "timeout", "no answer within the timeout"
        elif isinstance(exc, aiohttp.ClientPayloadError):
            kind, message = "connection", f"response body cut off ({type(exc).__name__})"
        elif isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError)):
            kind, message = "connection", f"connection failed ({type(exc).__name__}: {exc})"
        elif isinstance(exc, ValueError):
            kind, message = "invalid_response", f"response body is not JSON ({exc})"
        elif isinstance(exc, aiohttp.ClientError):
            kind, message = "connection", f"{type(exc).__name__}: {exc}"
        else:
            raise exc
        return RequestError(_scrub(message, secret), kind=kind, status=status, headers=headers, should_retry=should_retry)
    assert status is not None
    message, code = _error_fields(body)
    return RequestError(
        _scrub(message, secret),
        kind=classify_status(status, code),
        status=status,
        headers=headers,
        code=code,
        should_retry=should_retry,
    )


def _scrub(message: str, secret: str | None) -> str:
    return message.replace(secret, "[key]") if secret else message


# What a successful answer's headers are read for (the limiter's view of the server's budget);
# copying every header of every answer into a dict cost more than the answer's JSON parse.
OBSERVED_HEADERS = (
    "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "content-type",
)


def _headers(resp: aiohttp.ClientResponse, *, full: bool) -> dict[str, str]:
    if full:
        return {k.lower(): v for k, v in resp.headers.items()}
    found = resp.headers
    return {k: v for k in OBSERVED_HEADERS if (v := found.get(k)) is not None}


class Client:
    """POSTs bodies to the endpoint. Use as `async with Client(...) as c: await c.post(body)`."""

    def __init__(self, url: str, api_key: str | None, *, timeout_s: float, max_connections: int) -> None:
        self.url = url
        self._key = api_key
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Client":
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, body: bytes) -> tuple[Any, dict[str, str], float]:
        """(decoded JSON body, lower-cased headers, latency in ms); raises RequestError."""
        assert self._session is not None, "use the client as an async context manager"
        started = time.monotonic()
        status: int | None = None
        headers: dict[str, str] = {}
        try:
            async with self._session.post(self.url, data=body, headers=self._headers) as resp:
                status = resp.status
                headers = _headers(resp, full=status != 200)
                raw = await resp.read()
            if status != 200:
                raise translate(status=status, headers=headers, body=raw, secret=self._key)
            decoded = orjson.loads(raw)
        except RequestError:
            raise
        except Exception as exc:  # only translate() decides what a foreign error means
            raise translate(exc, status=status, headers=headers, secret=self._key) from None
        return decoded, headers, (time.monotonic() - started) * 1000.0

    async def post_stream(self, body: bytes) -> tuple[Any, dict[str, str], float]:
        """Like `post` for a body with `stream: true`: the SSE answer is assembled into the
        response body a non-streamed answer has (see pipeline.stream); raises RequestError."""
        assert self._session is not None, "use the client as an async context manager"
        started = time.monotonic()
        status: int | None = None
        headers: dict[str, str] = {}
        try:
            async with self._session.post(self.url, data=body, headers=self._headers) as resp:
                status = resp.status
                headers = {k.lower(): v for k, v in resp.headers.items()}
                if status != 200:
                    raise translate(status=status, headers=headers, body=await resp.read(), secret=self._key)
                if not headers.get("content-type", "").startswith("text/event-stream"):
                    decoded = json.loads(await resp.read())  # a server that ignored `stream: true`
                else:
                    assembler = StreamAssembler()
                    async for data in resp.content.iter_any():
                        assembler.feed_bytes(data)
                        if assembler.done:
                            break
                    decoded = assembler.result()
        except RequestError:
            raise
        except Exception as exc:  # only translate() decides what a foreign error means
            raise translate(exc, status=status, headers=headers, secret=self._key) from None
        return decoded, headers, (time.monotonic() - started) * 1000.0
