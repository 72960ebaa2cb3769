"""The connection pool: lean keep-alive HTTP/1.1 for the request path.

Why not aiohttp here: at thousands of rows a second on a small machine, aiohttp's request
machinery (URL and header objects, tracing hooks, timers, the cookie jar) cost about 0.2 ms of
CPU per request, most of what the pipeline spent per row (issue 7's profile). A chat completion is
one POST with a JSON body and a JSON answer, so this module does only that: one asyncio.Protocol
per connection, one request at a time on it, TLS through the event loop; the bytes that come back
are read by a `response.ResponseParser` (framing, gzip/deflate, the cap). Streamed answers and
image fetches stay on aiohttp (`client.Client.post_stream`, `fetch.py`).

    pool = ConnectionPool("https://api.example.com/v1/chat/completions",
                          {"Authorization": "Bearer ..."}, max_connections=64, timeout_s=60)
    status, headers, body = await pool.post(b'{"model": "m", "messages": []}', max_bytes=64 << 20)
    await pool.close()

Through a proxy (`proxy=`, a config.proxy.Proxy; chosen once, when the pool is made, so a pool
without one runs exactly as before): an http:// URL is sent to the proxy in absolute form
(`POST http://host/path`, with `Proxy-Authorization` when the proxy URL has credentials); an
https:// URL gets a tunnel per connection (`CONNECT host:443` to the proxy, then TLS to the
endpoint inside it, the endpoint's certificate checked as without a proxy), kept alive as usual.
A proxy that refuses the tunnel (407, 403, 502, ...) raises ProxyRefused with its status.

An answer over `max_bytes`, as sent or decompressed, stops the reading and drops the connection
(ResponseTooLarge). Redirects are not followed: a 3xx is an answer like any other
(client.translate says what to do).

Failures are builtin: ConnectionError and OSError (refused, reset, DNS, TLS), TimeoutError, and
`response`'s ResponseCut and MalformedResponse (both ConnectionError), ResponseTooLarge and
ProxyRefused (a ConnectionError);
`client.translate` is where they get their kind. Idle connections are kept LIFO, so a busy pool
reuses warm ones, and closed after KEEPALIVE_S idle: below uvicorn's 5 s default (vLLM), the
shortest common server keep-alive, so a request is not written into a connection the server is
closing.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from ..config.proxy import Proxy
from .response import (
    ACCEPT_ENCODING,
    MalformedResponse,
    Response,
    ResponseParser,
    ResponseTooLarge,
)

__all__ = ["ConnectionPool", "ProxyRefused", "KEEPALIVE_S"]

KEEPALIVE_S = 4.0
USER_AGENT = "pipeline (bulk vision-LLM jobs)"
_TUNNEL_HEAD_BYTES = 16 << 10  # a proxy's answer to CONNECT longer than this is not one


class ProxyRefused(ConnectionError):
    """A proxy answered CONNECT with something else than 2xx. Never holds its credentials."""

    def __init__(self, status: int, reason: str, proxy: Proxy, target: str) -> None:
        super().__init__(f"the proxy {proxy.url} ({proxy.source}) answered {status} {reason} to CONNECT {target}")
        self.status = status
        self.reason = reason
        self.proxy = proxy
        self.target = target


class _TunnelOpener(asyncio.Protocol):
    """Sends CONNECT on a new connection to a proxy and waits for the head of its answer; the
    connection then carries TLS to the endpoint (loop.start_tls), or is closed on a refusal."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head = loop.create_future()  # the answer's status line and headers, up to the blank line
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            self.head.set_result((bytes(self.buffer[:end]), len(self.buffer) > end + 4))
        elif len(self.buffer) > _TUNNEL_HEAD_BYTES:
            self.head.set_exception(MalformedResponse("the proxy's answer to CONNECT has no end"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionResetError("the proxy closed the connection before answering CONNECT"))

    async def status(self) -> tuple[int, str]:
        head, more = await self.head
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise MalformedResponse(f"not an HTTP answer to CONNECT: {line[:80]!r}")
        if more and 200 <= int(code) < 300:  # the endpoint speaks only after our TLS hello
            raise MalformedResponse("the proxy sent bytes after opening the tunnel")
        return int(code), reason.strip()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, hands the bytes of its one response to a
    ResponseParser, and resolves the request's future with the answer or the failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.parser: ResponseParser | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream's: asyncio.Protocol's signature says the base class

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.waiter is None or self.waiter.done():
            self.reusable = False  # bytes nobody asked for: the stream is unusable
            if self.transport is not None:
                self.transport.close()
            return
        try:
            response = parser.feed(data)
        except (MalformedResponse, ResponseTooLarge) as exc:
            self._fail(exc)
            return
        if response is not None:
            self._complete(response, parser.reusable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self.parser is None or self.waiter is None or self.waiter.done():
            return
        try:
            response = self.parser.eof()
        except ConnectionError as cut:  # cut, never begun, or a compressed body that stops short
            self._fail(cut)
            return
        self._complete(response, False)

    # -- request / response ----------------------------------------------------------------

    def request(self, data: list[bytes], deadline: float, cap: int) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.parser = ResponseParser(cap)
        self.waiter = self.loop.create_future()
        self.timer = self.loop.call_at(deadline, self._on_timeout)
        self.transport.writelines(data)
        return self.waiter

    def _on_timeout(self) -> None:
        self._fail(TimeoutError("no answer within the timeout"))

    def _fail(self, exc: BaseException) -> None:
        # What arrived is dropped now: the exception's traceback refers to the parser and this
        # connection (a cycle through the waiter), which only the garbage collector would free.
        if self.parser is not None:
            self.parser.discard()
        self.reusable = False
        if self.timer is not None:
            self.timer.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()  # an answer over the cap: stop reading, drop the connection

    def _complete(self, response: Response, reusable: bool) -> None:
        if not reusable:  # the answer said so (Connection: close, HTTP/1.0, a body ended by the close)
            self.reusable = False
        if self.timer is not None:
            self.timer.cancel()
        assert self.waiter is not None
        if not self.waiter.done():
            self.waiter.set_result(response)


class ConnectionPool:
    """POSTs to one URL over a pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, url: str, headers: dict[str, str], *, max_connections: int, timeout_s: float,
                 proxy: Proxy | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if default_port else f"{host}:{self.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.proxy = proxy
        self._tunnel: bytes | None = None  # the CONNECT request, when connections are tunnelled
        extra: list[str] = []
        if proxy is not None and self.tls:
            connect = [f"CONNECT {host}:{self.port} HTTP/1.1", f"Host: {host}:{self.port}", f"User-Agent: {USER_AGENT}"]
            connect += [f"Proxy-Authorization: {proxy.authorization}"] if proxy.authorization else []
            self._tunnel = ("\r\n".join(connect) + "\r\n\r\n").encode("latin-1")
        elif proxy is not None:  # plain http: the proxy gets the whole URL (absolute form)
            target = f"http://{authority}{target}"
            extra = [f"Proxy-Authorization: {proxy.authorization}"] if proxy.authorization else []
        lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", f"User-Agent: {USER_AGENT}",
                 "Accept: application/json", f"Accept-Encoding: {ACCEPT_ENCODING}"]
        lines += [f"{k}: {v}" for k, v in headers.items()] + extra
        self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    async def post(self, body: bytes, *, max_bytes: int) -> Response:
        """(status, lower-cased headers, body) of the answer to one POST of `body`. An answer over
        `max_bytes` (as sent or decompressed) raises ResponseTooLarge and its connection is dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        async with self._slots:
            conn = self._take_idle()
            if conn is None:
                conn = await self._connect(loop, deadline)
            data = [self._head, b"Content-Length: %d\r\n\r\n" % len(body), body]
            try:
                result = await conn.request(data, deadline, max_bytes)
            except BaseException:  # a timeout, a cut or a cancel: the stream's state is unknown
                self._drop(conn)
                raise
            if conn.reusable and not conn.closed:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                self._drop(conn)
            return result

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since > KEEPALIVE_S):
            self._drop(idle.popleft())  # the oldest first: they are the ones past keep-alive
        while idle:
            conn = idle.pop()  # the warmest
            if not conn.closed:
                return conn
            self._drop(conn)
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        async with asyncio.timeout_at(deadline):
            if self._tunnel is not None:
                conn = await self._connect_tunnel(loop)
            else:
                host, port = (self.proxy.host, self.proxy.port) if self.proxy is not None else (self.host, self.port)
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), host, port,
                    ssl=self._ssl if self.tls else None, server_hostname=self.host if self.tls else None,
                )
        self._open.add(conn)
        return conn

    async def _connect_tunnel(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """CONNECT through the proxy, then TLS to the endpoint inside the tunnel."""
        assert self.proxy is not None and self._tunnel is not None and self._ssl is not None
        raw, opener = await loop.create_connection(lambda: _TunnelOpener(loop), self.proxy.host, self.proxy.port)
        try:
            raw.write(self._tunnel)
            status, reason = await opener.status()
            if not 200 <= status < 300:
                raise ProxyRefused(status, reason, self.proxy, f"{self.host}:{self.port}")
            conn = _Connection(loop)
            # start_tls hands the connection to `conn` without calling connection_made
            conn.transport = await loop.start_tls(raw, conn, self._ssl, server_hostname=self.host)
        except BaseException:
            raw.abort()
            raise
        return conn

    def _drop(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.reusable = False
        if conn.transport is not None and not conn.closed:
            conn.transport.close()

    async def close(self) -> None:
        for conn in list(self._open):
            self._drop(conn)
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run

    def __repr__(self) -> str:  # never the head: it holds the key (and the proxy's credentials)
        via = f", via {self.proxy.url}" if self.proxy is not None else ""
        return f"ConnectionPool({'https' if self.tls else 'http'}://{self.host}:{self.port}{via}, open={len(self._open)})"

    def __getstate__(self) -> Any:
        raise TypeError("a ConnectionPool holds the API key and open sockets; it is not picklable")
