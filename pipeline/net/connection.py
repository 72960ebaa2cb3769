"""The connection pool: lean keep-alive HTTP/1.1 for the request path.

Why not aiohttp here: at thousands of rows a second on a small machine, aiohttp's request
machinery (URL and header objects, tracing hooks, timers, the cookie jar) cost about 0.2 ms of
CPU per request, most of what the pipeline spent per row (issue 7's profile). A chat completion is
one POST with a JSON body and a JSON answer, so this module does only that: one asyncio.Protocol
per connection, one request at a time on it, the answer framed by Content-Length, chunked
encoding or the end of the connection, gzip/deflate bodies decoded, TLS through the event loop.
Streamed answers and image fetches stay on aiohttp (`client.Client.post_stream`, `fetch.py`).

    pool = ConnectionPool("https://api.example.com/v1/chat/completions",
                          {"Authorization": "Bearer ..."}, max_connections=64, timeout_s=60)
    status, headers, body = await pool.post(b'{"model": "m", "messages": []}', max_bytes=64 << 20)
    await pool.close()

Bounded reads: a body is read in linear time and decoded as it arrives (`BoundedDecoder`, zlib
with `max_length`), and an answer over `max_bytes`, as sent or decompressed, stops the reading
and drops the connection (ResponseTooLarge); a Content-Length over it is refused at once.
Redirects are not followed: a 3xx is an answer like any other (client.translate says what to do).

Failures are builtin: ConnectionError and OSError (refused, reset, DNS, TLS), TimeoutError, and
`response`'s ResponseCut and MalformedResponse (both ConnectionError) and ResponseTooLarge;
`client.translate` is where they get their kind. Idle connections are kept LIFO, so a busy pool reuses warm ones, and
closed after KEEPALIVE_S idle: below uvicorn's 5 s default (vLLM), the shortest common server
keep-alive, so a request is not written into a connection the server is closing.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from .response import ACCEPT_ENCODING, BoundedDecoder, MalformedResponse, ResponseCut, ResponseTooLarge

__all__ = ["ConnectionPool", "KEEPALIVE_S"]

KEEPALIVE_S = 4.0
MAX_HEAD_BYTES = 64 * 1024  # a response head (or a chunk-size or trailer line) bigger than this is not an API's
USER_AGENT = "pipeline (bulk vision-LLM jobs)"

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _TO_EOF = range(7)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, parses its one response.

    Bytes are appended to one bytearray and consumed from its front (CPython makes that O(1));
    body bytes are counted against the cap as they arrive, and an encoded body is decoded as it
    arrives by a BoundedDecoder: linear time, never more than the cap held.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self.cap = 0
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()
        self.state = _HEAD
        self.status = 0
        self.headers: dict[str, str] = {}
        self.remaining = 0
        self.pieces: list[bytes | bytearray] = []
        self.decoder: BoundedDecoder | None = None  # for an encoded body (the head says so)
        self.taken = 0  # body bytes as sent
        self.received = 0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():  # bytes nobody asked for: the stream is unusable
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        self.received += len(data)
        self.buf += data
        try:
            self._parse()
        except (MalformedResponse, ResponseTooLarge) as exc:
            self._fail(exc)
        except ValueError as exc:  # a number that is not one (status, length, chunk size)
            self._fail(MalformedResponse(f"unreadable answer ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.state == _TO_EOF:
            try:
                self._complete()
            except MalformedResponse as bad:
                self._fail(bad)
        elif self.received == 0:
            self._fail(ConnectionResetError("the server closed the connection without answering"))
        else:
            self._fail(ResponseCut(f"the connection closed after {self.received} bytes of the answer"))

    # -- request / response ----------------------------------------------------------------

    def request(self, data: list[bytes], deadline: float, cap: int) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        assert self.transport is not None
        self.cap = cap
        self._reset()
        self.waiter = self.loop.create_future()
        self.timer = self.loop.call_at(deadline, self._on_timeout)
        self.transport.writelines(data)
        return self.waiter

    def _on_timeout(self) -> None:
        self._fail(TimeoutError("no answer within the timeout"))

    def _fail(self, exc: BaseException) -> None:
        # What arrived is dropped now: the exception's traceback refers to this connection (a cycle
        # through the waiter), which only the garbage collector would free, an answer's worth later.
        self.pieces = []
        del self.buf[:]
        self.reusable = False
        if self.timer is not None:
            self.timer.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()  # an answer over the cap: stop reading, drop the connection

    def _complete(self) -> None:
        if self.decoder is not None:
            self.decoder.finish()
        if self.timer is not None:
            self.timer.cancel()
        body = b"".join(self.pieces)
        self.pieces = []
        assert self.waiter is not None
        if not self.waiter.done():
            self.waiter.set_result((self.status, self.headers, body))

    def _take(self, n: int) -> None:
        """Move n bytes from the front of the buffer into the body."""
        buf = self.buf
        piece = buf[:n] if n < len(buf) else bytes(buf)
        del buf[:n]
        self.taken += n
        if self.taken > self.cap:  # chunked or until-close: nothing said how long it would be
            raise ResponseTooLarge(self.cap)
        if self.decoder is None:
            self.pieces.append(piece)
        else:
            self.pieces += self.decoder.decode(piece)

    def _line(self) -> bytes | None:
        """A CRLF-ended line from the front of the buffer (consumed), or None while incomplete."""
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                raise MalformedResponse(f"a chunk-size or trailer line is over {MAX_HEAD_BYTES} bytes")
            return None
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _parse(self) -> None:
        buf = self.buf
        while True:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise MalformedResponse(f"the response head is over {MAX_HEAD_BYTES} bytes")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                if self._head(head):
                    continue  # an interim 1xx response: the real one follows
                if self.state == _HEAD:  # no body (204, 304)
                    self._complete()
                    return
            elif state in (_LENGTH, _CHUNK_DATA):
                n = min(len(buf), self.remaining)
                if n:
                    self._take(n)
                    self.remaining -= n
                if self.remaining:
                    return
                if state == _CHUNK_DATA:
                    self.state = _CHUNK_END
                    continue
                if buf:
                    self.reusable = False  # extra bytes after the answer: never reuse this stream
                self._complete()
                return
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise MalformedResponse("a chunk does not end where its size says")
                del buf[:2]
                self.state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                line = self._line()
                if line is None:
                    return
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise MalformedResponse(f"a negative chunk size {line[:60]!r}")
                self.remaining = size
                self.state = _CHUNK_DATA if size else _TRAILERS
            elif state == _TRAILERS:  # optional trailer lines, then an empty one
                line = self._line()
                if line is None:
                    return
                if not line:
                    if buf:
                        self.reusable = False
                    self._complete()
                    return
            else:  # _TO_EOF: the body is everything until the server closes
                if buf:
                    self._take(len(buf))
                return

    def _head(self, head: bytes | bytearray) -> bool:
        """Parse a response head; True for an interim (1xx) response."""
        status_line, _, rest = head.partition(b"\r\n")
        version, _, rest_of_line = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise MalformedResponse(f"not an HTTP/1.x response: {bytes(status_line[:60])!r}")
        status = int(rest_of_line[:3])
        if 100 <= status < 200:
            if status == 101:
                raise MalformedResponse("the server switched protocols")
            return True
        headers: dict[str, str] = {}
        if rest:
            for line in rest.split(b"\r\n"):
                name, sep, value = line.partition(b":")
                if not sep:
                    raise MalformedResponse(f"bad header line {bytes(line[:60])!r}")
                key = name.strip().lower().decode("latin-1")
                text = value.strip().decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.status = status
        self.headers = headers
        encoding = headers.get("content-encoding")
        self.decoder = BoundedDecoder(encoding, self.cap) if encoding else None
        connection = headers.get("connection", "").lower()
        if "close" in connection or (version == b"HTTP/1.0" and "keep-alive" not in connection):
            self.reusable = False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = _CHUNK_SIZE
        elif "content-length" in headers:
            self.remaining = int(headers["content-length"])
            if self.remaining < 0:
                raise MalformedResponse(f"a negative Content-Length {headers['content-length'][:60]!r}")
            if self.remaining > self.cap:  # refused before reading a byte of it
                raise ResponseTooLarge(self.cap)
            self.state = _LENGTH
        elif status in (204, 304):
            self.state = _HEAD
        else:
            self.reusable = False
            self.state = _TO_EOF
        return False


class ConnectionPool:
    """POSTs to one URL over a pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, url: str, headers: dict[str, str], *, max_connections: int, timeout_s: float) -> None:
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
        lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", f"User-Agent: {USER_AGENT}",
                 "Accept: application/json", f"Accept-Encoding: {ACCEPT_ENCODING}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    async def post(self, body: bytes, *, max_bytes: int) -> tuple[int, dict[str, str], bytes]:
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
            _, conn = await loop.create_connection(
                lambda: _Connection(loop), self.host, self.port,
                ssl=self._ssl if self.tls else None, server_hostname=self.host if self.tls else None,
            )
        self._open.add(conn)
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

    def __repr__(self) -> str:  # never the head: it holds the key
        return f"ConnectionPool({'https' if self.tls else 'http'}://{self.host}:{self.port}, open={len(self._open)})"

    def __getstate__(self) -> Any:
        raise TypeError("a ConnectionPool holds the API key and open sockets; it is not picklable")
