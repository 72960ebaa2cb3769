"""The client: one POST per attempt, foreign errors translated.

Plain answers go through `connection.ConnectionPool` (lean keep-alive HTTP/1.1: the per-request
CPU of aiohttp's client was most of the engine's per-row cost); streamed answers through one
aiohttp session, opened on first use. `translate` is the single boundary where connection
errors (builtin or aiohttp's), timeouts and HTTP statuses become RequestError kinds; the rest of
the pipeline only sees RequestError.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson

from .connection import ConnectionPool, MalformedResponse, ResponseCut
from .errors import RequestError
from .retry import DASHSCOPE_THROTTLE
from .stream import StreamAssembler, StreamError

if TYPE_CHECKING:
    import aiohttp

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
        found = _kind_of(exc)
        if found is None:
            raise exc
        kind, message = found
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


def _kind_of(exc: BaseException) -> tuple[str, str] | None:
    """(kind, message) of a connection-level failure; None for what is not one (a bug: re-raised)."""
    # aiohttp is only imported for streamed answers and image fetches; if it was never imported,
    # no exception can be one of its.
    http = sys.modules.get("aiohttp")
    if isinstance(exc, asyncio.TimeoutError) or (http is not None and isinstance(exc, http.ServerTimeoutError)):
        return "timeout", "no answer within the timeout"
    if isinstance(exc, ResponseCut) or (http is not None and isinstance(exc, http.ClientPayloadError)):
        return "connection", f"response body cut off ({type(exc).__name__}: {exc})"
    if isinstance(exc, MalformedResponse):
        return "invalid_response", f"not an HTTP response ({exc})"
    if isinstance(exc, OSError) or (http is not None and isinstance(exc, http.ClientConnectionError)):
        return "connection", f"connection failed ({type(exc).__name__}: {exc})"
    if isinstance(exc, ValueError):
        return "invalid_response", f"response body is not JSON ({exc})"
    if http is not None and isinstance(exc, http.ClientError):
        return "connection", f"{type(exc).__name__}: {exc}"
    return None


def _scrub(message: str, secret: str | None) -> str:
    return message.replace(secret, "[key]") if secret else message


# What a successful answer's headers are read for (the limiter's view of the server's budget);
# copying every header of every answer into a dict cost more than the answer's JSON parse.
OBSERVED_HEADERS = (
    "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "content-type",
)


def _observed(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k in OBSERVED_HEADERS if (v := headers.get(k)) is not None}


class Client:
    """POSTs bodies to the endpoint. Use as `async with Client(...) as c: await c.post(body)`."""

    def __init__(self, url: str, api_key: str | None, *, timeout_s: float, max_connections: int) -> None:
        self.url = url
        self._key = api_key
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._pool: ConnectionPool | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Client":
        self._pool = ConnectionPool(self.url, self._headers, max_connections=self._max_connections, timeout_s=self._timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._session is not None:
            await self._session.close()

    async def post(self, body: bytes) -> tuple[Any, dict[str, str], float]:
        """(decoded JSON body, lower-cased headers, latency in ms); raises RequestError."""
        assert self._pool is not None, "use the client as an async context manager"
        started = time.monotonic()
        status: int | None = None
        headers: dict[str, str] = {}
        try:
            status, headers, raw = await self._pool.post(body)
            if status != 200:
                raise translate(status=status, headers=headers, body=raw, secret=self._key)
            headers = _observed(headers)  # only these are read from a success; the rest is not kept
            decoded = orjson.loads(raw)
        except RequestError:
            raise
        except Exception as exc:  # only translate() decides what a foreign error means
            raise translate(exc, status=status, headers=headers, secret=self._key) from None
        return decoded, headers, (time.monotonic() - started) * 1000.0

    def _streaming_session(self) -> "aiohttp.ClientSession":
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self._session

    async def post_stream(self, body: bytes) -> tuple[Any, dict[str, str], float]:
        """Like `post` for a body with `stream: true`: the SSE answer is assembled into the
        response body a non-streamed answer has (see pipeline.stream); raises RequestError."""
        assert self._pool is not None, "use the client as an async context manager"
        session = self._streaming_session()
        started = time.monotonic()
        status: int | None = None
        headers: dict[str, str] = {}
        try:
            async with session.post(self.url, data=body, headers=self._headers) as resp:
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
