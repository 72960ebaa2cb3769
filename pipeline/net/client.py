"""The client: one POST per attempt, foreign errors translated.

Plain answers go through `connection.ConnectionPool` (lean keep-alive HTTP/1.1: the per-request
CPU of aiohttp's client was most of the engine's per-row cost); streamed answers through one
aiohttp session, opened on first use. From the answer's head on, both take one path
(`Client._attempt`): a non-200 is refused with its body, a 200 decoded, and only the headers the
limiter reads are kept. `translate` is the single boundary where connection errors (builtin or
aiohttp's), timeouts and HTTP statuses become RequestError kinds; the rest of the pipeline only
sees RequestError.

    async with Client(url, key, timeout_s=60, max_connections=8) as client:
        reply = await client.post(body, max_bytes=64 << 20)   # Reply(body, headers, latency_ms, warning)

What a hostile or broken endpoint cannot do here:
- send more than `max_bytes` (as sent or decompressed; [limits] max_response_mb): reading stops,
  the connection is dropped and the attempt fails as `invalid_response`, naming the cap;
- redirect the request (and its Authorization header) elsewhere: redirects are never followed on
  either path; a 3xx fails the row as `bad_request` (not retried: the same URL redirects again),
  telling the user to set [endpoint] base_url to the final URL;
- get a paid answer bought again for invalid UTF-8: it is decoded with U+FFFD and kept, and the
  Reply's `warning` says so (the sender puts it in the ok row's `error` column);
- see the key in a message: every text from the endpoint is scrubbed by a Redactor before it is
  cut (pipeline.redact).

Through a proxy (`proxy=`, chosen by config.proxy): plain answers over the pool's absolute-form
requests or CONNECT tunnels, streamed ones with aiohttp's `proxy=` per request (`aiohttp_proxy`,
which fetch.py uses too). A proxy's refusal is told apart by type and status, never by text: a
407 (from the pool's CONNECT, aiohttp's ClientHttpProxyError, or an answer) stops the run naming
the proxy's credentials; another 4xx (the proxy forbids the endpoint) stops it too; a 5xx (the
proxy could not reach the endpoint) is a retried `connection` failure. The proxy's password is
one of the Redactor's secrets.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import orjson

from ..config import Api, LimitsConfig
from ..config.headers import secret_values
from ..config.proxy import Proxy
from ..errors import RequestError
from ..redact import Redactor
from .connection import ConnectionPool, ProxyRefused
from .headers import observed, unrenamed
from .response import (
    ACCEPT_ENCODING,
    BoundedDecoder,
    MalformedResponse,
    ResponseCut,
    ResponseTooLarge,
)
from .retry import DASHSCOPE_THROTTLE
from .events import ResponsesFold
from .stream import ChatFold, Fold, StreamAssembler, StreamError
from .text import loads_json, text_warning

if TYPE_CHECKING:
    import aiohttp

__all__ = ["Client", "Reply", "translate", "classify_status", "aiohttp_proxy", "DEFAULT_MAX_RESPONSE_BYTES",
           "PROXY_REFUSED"]

# 429 bodies that mean "no money left", not "too fast": retrying cannot help.
# Checked on any 4xx: OpenAI sends billing_hard_limit_reached as a 400, DashScope "Arrearage"
# (account in arrears) as a 400; either way every further row would fail the same way.
QUOTA_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "spend_limit_reached", "quota_exceeded",
     "Arrearage"}
)
_MESSAGE_CAP = 500
_LOCATION_CAP = 200
MB = 1 << 20
DEFAULT_MAX_RESPONSE_BYTES = LimitsConfig().max_response_bytes
PROXY_REFUSED = "proxy_refused"  # the `code` of a RequestError that a proxy, not the endpoint, caused


class Reply(NamedTuple):
    """A successful answer: its decoded JSON body, the headers the limiter reads, the latency, and
    a warning for the row (bad text replaced) or None."""

    body: Any
    headers: dict[str, str]
    latency_ms: float
    warning: str | None


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
    """(message, code) from an OpenAI- or DashScope-shaped error body, or its text; not cut."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = orjson.loads(text)  # not json.loads: a deeply nested body must not raise RecursionError
    except orjson.JSONDecodeError:
        return text or "(empty body)", None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = err.get("message") or text
        fields = (err.get("code"), err.get("type"))
    elif isinstance(body, dict):
        message = body.get("message") or (err if isinstance(err, str) else text)
        fields = (body.get("code"), body.get("type"))
    else:
        return text, None
    names = [f for f in fields if isinstance(f, (str, int)) and not isinstance(f, bool) and f != ""]
    # A gateway (LiteLLM) puts the HTTP status in `code` and the name in `type`: a name says more.
    names = sorted((str(n) for n in names), key=str.isdigit)
    # A quota may be named in `type` while `code` holds something generic: the telling one wins.
    telling = [n for n in names if n in QUOTA_CODES or n == DASHSCOPE_THROTTLE]
    code = (telling or names or [None])[0]
    return message if isinstance(message, str) else text, code


def translate(
    exc: BaseException | None = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    secret: str | None = None,
    redactor: Redactor | None = None,
    proxy: Proxy | None = None,
) -> RequestError:
    """The one place foreign failures become RequestError. Messages are scrubbed of the key
    (`redactor`, or one made from `secret`) before they are cut; `proxy`, the one the request went
    through (if any), is named when it refused."""
    headers = unrenamed(headers) if headers else {}  # a gateway's renamed Retry-After is the provider's
    hide = redactor if redactor is not None else Redactor([secret])
    should = headers.get("x-should-retry")
    should_retry = {"true": True, "false": False}.get(should.lower()) if should else None
    if exc is not None:
        if isinstance(exc, StreamError):  # a stream cut, or an error sent mid-stream: transient
            kind = {"cut": "connection", "error_chunk": "server"}.get(exc.reason, "invalid_response")
            return RequestError(hide.cut(str(exc), _MESSAGE_CAP), kind=kind, status=status, headers=headers,
                                code=exc.code, should_retry=should_retry)
        refused = _proxy_refusal(exc)
        if refused is not None:
            status, reason, known = refused
            return _proxy_error(status, reason, known or proxy, headers, hide)
        found = _kind_of(exc)
        if found is None:
            raise exc
        kind, message = found
        return RequestError(hide.cut(message, _MESSAGE_CAP), kind=kind, status=status, headers=headers,
                            should_retry=should_retry)
    assert status is not None
    if status == 407:  # only a proxy asks for its own credentials (an http:// URL sent in absolute form)
        return _proxy_error(407, "Proxy Authentication Required", proxy, headers, hide)
    if 300 <= status < 400:
        return RequestError(_redirect_message(headers, hide), kind="bad_request", status=status, headers=headers,
                            should_retry=False)
    message, code = _error_fields(body)
    return RequestError(
        hide.cut(message, _MESSAGE_CAP),
        kind=classify_status(status, code),
        status=status,
        headers=headers,
        code=hide.cut(code, _MESSAGE_CAP) if code is not None else None,
        should_retry=should_retry,
    )


def _proxy_refusal(exc: BaseException) -> tuple[int, str, Proxy | None] | None:
    """(status, reason, proxy if known) of a proxy's refusal to open a tunnel; None for anything else."""
    if isinstance(exc, ProxyRefused):
        return exc.status, exc.reason, exc.proxy
    http = sys.modules.get("aiohttp")
    if http is not None and isinstance(exc, http.ClientHttpProxyError):
        return exc.status, str(exc.message or ""), None
    return None


def _proxy_error(status: int, reason: str, proxy: Proxy | None, headers: dict[str, str], hide: Redactor) -> RequestError:
    which = f" {proxy.url}" if proxy is not None else ""
    where = proxy.source if proxy is not None else "[endpoint] proxy or the HTTPS_PROXY/HTTP_PROXY variable"
    answer = reason or "no reason given"  # the status is the error's own (describe() shows it)
    if status == 407:
        kind, message = "auth", (f"the proxy{which} refused its credentials ({answer}): check the user and password "
                                 f"in {where} (percent-encode @ : / in them)")
    elif 400 <= status < 500:
        kind, message = "auth", (f"the proxy{which} refused to connect to the endpoint ({answer}): have it allowed, "
                                 f"or name the host in NO_PROXY to reach it directly")
    else:
        kind, message = "connection", f"the proxy{which} could not reach the endpoint ({answer})"
    return RequestError(hide.cut(message, _MESSAGE_CAP), kind=kind, status=status, headers=headers, code=PROXY_REFUSED)


@functools.lru_cache(maxsize=16)
def aiohttp_proxy(proxy: Proxy | None) -> dict[str, Any]:
    """The keyword arguments that send one aiohttp request through `proxy` (none: directly).
    Passed per request, so `[endpoint] proxy` and NO_PROXY decide on every path, not trust_env.
    Made once per proxy (a Proxy is frozen): a streamed row or a fetch hop asks for it each time.
    Callers unpack it with ** and never change it."""
    if proxy is None:
        return {}
    import aiohttp

    auth = None
    if proxy.authorization is not None:
        auth = aiohttp.BasicAuth(proxy.username or "", proxy.password or "", encoding="utf-8")
    return {"proxy": proxy.url, "proxy_auth": auth}


def _redirect_message(headers: dict[str, str], hide: Redactor) -> str:
    location = headers.get("location")
    where = f" to {hide.cut(location, _LOCATION_CAP)}" if location else ""
    return (f"the endpoint redirected the request{where}; redirects are not followed (they would carry the "
            f"request and its key elsewhere): set [endpoint] base_url to the final URL")


def _kind_of(exc: BaseException) -> tuple[str, str] | None:
    """(kind, message) of a connection-level failure; None for what is not one (a bug: re-raised)."""
    # aiohttp is only imported for streamed answers and image fetches; if it was never imported,
    # no exception can be one of its.
    http = sys.modules.get("aiohttp")
    if isinstance(exc, ResponseTooLarge):
        return "invalid_response", (f"the answer is larger than the {exc.cap / MB:g} MB cap; raise [limits] "
                                    f"max_response_mb if answers this large are expected")
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


def _decode(raw: bytes) -> tuple[Any, str | None]:
    """(JSON value, warning) of a 200's body; bad text is replaced and flagged, not refused."""
    value, bad, surrogates = loads_json(raw)
    return value, text_warning(bad, surrogates)


async def _read_body(resp: "aiohttp.ClientResponse", decoder: BoundedDecoder) -> bytes:
    """A whole aiohttp body through `decoder` (bounded: ResponseTooLarge past its cap)."""
    pieces: list[bytes | bytearray] = []
    async for data in resp.content.iter_any():
        pieces += decoder.decode(data)
    decoder.finish()
    return b"".join(pieces)


class _Streamed:
    """A streamed answer over aiohttp: its SSE events assembled into the body a plain answer has
    (a server that ignored `stream: true` answers plainly, and is read so). Entered, the answer's
    head is known (`status`, lower-cased `headers`); then `read` gives a refusal's whole body,
    `answer` a 200's decoded JSON and warning, both within `max_bytes`."""

    def __init__(self, session: "aiohttp.ClientSession", url: str, headers: dict[str, str], body: bytes,
                 max_bytes: int, redactor: Redactor, via: dict[str, Any], fold: Fold) -> None:
        self.body = body
        self.fold = fold  # what the stream's events mean (chat chunks or the Responses API's events)
        self.via = via  # aiohttp's proxy arguments (none: directly)
        self.max_bytes = max_bytes
        self.status: int | None = None  # until the head arrives
        self.headers: dict[str, str] = {}
        self.session = session
        self.url = url
        self.request_headers = {**headers, "Accept-Encoding": ACCEPT_ENCODING}
        self.redactor = redactor

    async def __aenter__(self) -> "_Streamed":
        # redirects never followed: they would carry the request and its key elsewhere
        self.request = self.session.post(self.url, data=self.body, allow_redirects=False, headers=self.request_headers,
                                         **self.via)
        self.resp = await self.request.__aenter__()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.headers.items()}
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.request.__aexit__(*exc)

    def _decoder(self) -> BoundedDecoder:
        if self.resp.content_length is not None and self.resp.content_length > self.max_bytes:
            raise ResponseTooLarge(self.max_bytes)  # refused before reading a byte of it
        return BoundedDecoder(self.headers.get("content-encoding"), self.max_bytes)

    async def read(self) -> bytes:
        return await _read_body(self.resp, self._decoder())

    async def answer(self) -> tuple[Any, str | None]:
        decoder = self._decoder()
        if not self.headers.get("content-type", "").startswith("text/event-stream"):
            return _decode(await _read_body(self.resp, decoder))
        assembler = StreamAssembler(self.redactor, self.fold)
        async for data in self.resp.content.iter_any():
            for piece in decoder.decode(data):
                assembler.feed_bytes(piece)
            if assembler.done:
                break
        else:
            decoder.finish()
        return assembler.result(), assembler.warning


class Client:
    """POSTs bodies to the endpoint. Use as `async with Client(...) as c: await c.post(body)`."""

    def __init__(self, url: str, api_key: str | None, *, timeout_s: float, max_connections: int,
                 proxy: Proxy | None = None, headers: Mapping[str, str] | None = None, api: Api = Api.CHAT) -> None:
        self.url = url
        self.api = api  # how a streamed answer is read
        self.proxy = proxy
        extra = dict(headers or {})  # [endpoint] headers
        self.redactor = Redactor([api_key, *(proxy.secrets() if proxy is not None else ()), *secret_values(extra)])
        self._headers = {**extra, "Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._pool: ConnectionPool | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Client":
        self._pool = ConnectionPool(self.url, self._headers, max_connections=self._max_connections, timeout_s=self._timeout_s,
                                    proxy=self.proxy)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._session is not None:
            await self._session.close()

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"Client({self.url!r})"

    async def post(self, body: bytes, *, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> Reply:
        """The answer to one POST of `body`, at most `max_bytes` of it; raises RequestError.

        The per-row hot path: the same steps as `_attempt` (refusal, decoding, translation, in
        the same helpers), without an exchange object and its context-manager calls, which cost
        ~5% of a row's CPU in instruction counts (callgrind, bench "million")."""
        assert self._pool is not None, "use the client as an async context manager"
        started = time.monotonic()
        status: int | None = None
        headers: dict[str, str] = {}
        try:
            status, headers, raw = await self._pool.post(body, max_bytes=max_bytes)
            if status != 200:
                raise self._refusal(status, headers, raw)
            headers = observed(headers)  # only these are read from a success (or kept by its failure)
            decoded, warning = _decode(raw)
        except RequestError:
            raise
        except Exception as exc:  # only translate() decides what a foreign error means
            raise translate(exc, status=status, headers=headers, redactor=self.redactor, proxy=self.proxy) from None
        return Reply(decoded, headers, (time.monotonic() - started) * 1000.0, warning)

    def _refusal(self, status: int, headers: dict[str, str], body: bytes) -> RequestError:
        return translate(status=status, headers=headers, body=body, redactor=self.redactor, proxy=self.proxy)

    async def post_stream(self, body: bytes, *, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> Reply:
        """Like `post` for a body with `stream: true`: the SSE answer is assembled into the
        response body a non-streamed answer has (see pipeline.net.stream); raises RequestError."""
        assert self._pool is not None, "use the client as an async context manager"
        fold = ResponsesFold() if self.api is Api.RESPONSES else ChatFold()
        return await self._attempt(_Streamed(self._streaming_session(), self.url, self._headers, body, max_bytes,
                                             self.redactor, aiohttp_proxy(self.proxy), fold))

    async def _attempt(self, exchange: _Streamed) -> Reply:
        """A streamed exchange: a non-200 is refused with its body, a 200 decoded, anything foreign
        translated; the head's status and headers go with any failure (as in `post`)."""
        started = time.monotonic()
        headers: dict[str, str] = {}
        try:
            async with exchange:
                headers = exchange.headers
                if exchange.status != 200:
                    raise self._refusal(exchange.status or 0, headers, await exchange.read())
                headers = observed(headers)  # only these are read from a success (or kept by its failure)
                decoded, warning = await exchange.answer()
        except RequestError:
            raise
        except Exception as exc:  # only translate() decides what a foreign error means
            raise translate(exc, status=exchange.status, headers=headers, redactor=self.redactor,
                            proxy=self.proxy) from None
        return Reply(decoded, headers, (time.monotonic() - started) * 1000.0, warning)

    def _streaming_session(self) -> "aiohttp.ClientSession":
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
            # auto_decompress off: bodies are decoded by BoundedDecoder, within the cap
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self._session
