"""The response: an HTTP/1.1 answer read from bytes, its body bounded and decoded, its failures.

`ResponseParser` reads the one response to a request from a connection's bytes as they arrive:
interim 1xx answers skipped, the body framed by Content-Length, chunked encoding or the end of the
connection, and whether the connection may carry another request. `connection._Connection` feeds
it; it does no I/O itself.

    parser = ResponseParser(cap=64 << 20)
    response = parser.feed(data)            # (status, lower-cased headers, body) once whole, else None
    response = parser.eof()                 # the connection ended: whole, or ResponseCut

Bounded reads: a body is read in linear time and decoded as it arrives (`BoundedDecoder`, zlib
with `max_length`: a 2 MB gzip can inflate to gigabytes), and an answer over the cap, as sent or
decompressed, raises ResponseTooLarge; a Content-Length over it is refused at once. The streamed
path on aiohttp (`client.Client.post_stream`) decodes through BoundedDecoder too, and both paths
ask for exactly the codings it decodes (ACCEPT_ENCODING).

The failures are builtin-shaped, so `client.translate` can give them their kind: ResponseCut and
MalformedResponse are ConnectionErrors; ResponseTooLarge names the cap it stopped at.
"""

from __future__ import annotations

import zlib

__all__ = ["ResponseParser", "Response", "BoundedDecoder", "ResponseCut", "MalformedResponse", "ResponseTooLarge",
           "ACCEPT_ENCODING"]

ACCEPT_ENCODING = "gzip, deflate"  # what BoundedDecoder decodes; asked for on both paths
_COMPRESSED = frozenset({"gzip", "x-gzip", "deflate"})
DECODE_STEP = 1 << 20  # zlib's output per call: no transient copy of a whole big answer
MAX_HEAD_BYTES = 64 * 1024  # a response head (or a chunk-size or trailer line) bigger than this is not an API's

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _TO_EOF = range(7)


class ResponseCut(ConnectionError):
    """The connection ended before the whole answer arrived."""


class MalformedResponse(ConnectionError):
    """Bytes that are not an HTTP/1.1 response."""


class ResponseTooLarge(Exception):
    """An answer over `cap` bytes (as sent or decompressed): reading stopped at the cap."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"the answer is over {cap} bytes")
        self.cap = cap


class BoundedDecoder:
    """A body taken piece by piece: gzip/deflate decoded with zlib's `max_length`, never more
    than `cap` bytes of it as sent or as decoded (a 2 MB gzip can inflate to gigabytes)."""

    def __init__(self, encoding: str | None, cap: int) -> None:
        self.cap = cap
        self.raw = 0
        self.size = 0
        coding = (encoding or "").strip().lower()
        # wbits 47: a zlib or a gzip header, detected (servers label either as "deflate")
        self._zlib = zlib.decompressobj(wbits=47) if coding in _COMPRESSED else None

    def decode(self, data: bytes | bytearray) -> list[bytes | bytearray]:
        """The decoded pieces `data` gives (a list: joining them here would copy a big answer once
        more); ResponseTooLarge past the cap, MalformedResponse on bad data."""
        self.raw += len(data)
        if self.raw > self.cap:  # padding that decodes to nothing is bounded too
            raise ResponseTooLarge(self.cap)
        if self._zlib is None:
            self.size = self.raw
            return [data]
        out: list[bytes | bytearray] = []
        pending: bytes | bytearray = data
        while not self._zlib.eof:  # bytes after the end of the stream are ignored
            room = min(self.cap - self.size + 1, DECODE_STEP)  # at most one byte past the cap, a step at a time
            try:
                piece = self._zlib.decompress(pending, room)
            except zlib.error as exc:
                raise MalformedResponse(f"unreadable compressed answer ({exc})") from None
            self.size += len(piece)
            if self.size > self.cap:
                out.clear()  # the traceback keeps this frame: it must not keep the answer too
                raise ResponseTooLarge(self.cap)
            out.append(piece)
            pending = self._zlib.unconsumed_tail
            if not pending and len(piece) < room:  # input used up, and zlib holds nothing more back
                break
        return out

    def finish(self) -> None:
        """The body ended: a compressed one must have reached its end."""
        if self._zlib is not None and self.raw and not self._zlib.eof:
            raise MalformedResponse("the compressed answer stops before its end")


Response = tuple[int, dict[str, str], bytes]  # (status, lower-cased headers, body)


class ResponseParser:
    """One HTTP/1.1 response, read from a connection's bytes as they arrive (`feed`, then `eof` if
    the connection ends first); a new parser for every request.

    Bytes are appended to one bytearray and consumed from its front (CPython makes that O(1));
    body bytes are counted against the cap as they arrive, and an encoded body is decoded as it
    arrives by a BoundedDecoder: linear time, never more than the cap held. `reusable` turns False
    when the connection must not carry another request (Connection: close, HTTP/1.0, a body that
    ends with the connection, bytes after the answer).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.reusable = True
        self.buf = bytearray()
        self.state = _HEAD
        self.status = 0
        self.headers: dict[str, str] = {}
        self.remaining = 0
        self.pieces: list[bytes | bytearray] = []
        self.decoder: BoundedDecoder | None = None  # for an encoded body (the head says so)
        self.taken = 0  # body bytes as sent
        self.received = 0

    def feed(self, data: bytes) -> Response | None:
        """The response once `data` completes it, else None. MalformedResponse for bytes that are
        not an answer, ResponseTooLarge past the cap."""
        self.received += len(data)
        self.buf += data
        try:
            return self._parse()
        except ValueError as exc:  # a number that is not one (status, length, chunk size)
            raise MalformedResponse(f"unreadable answer ({exc})") from None

    def eof(self) -> Response:
        """The response, as the connection ends: whole if its body ends with the connection;
        otherwise ResponseCut, or ConnectionResetError if not a byte of it came."""
        if self.state == _TO_EOF:
            return self._complete()
        if self.received == 0:
            raise ConnectionResetError("the server closed the connection without answering")
        raise ResponseCut(f"the connection closed after {self.received} bytes of the answer")

    def discard(self) -> None:
        """Drop what arrived: a failure's traceback can keep this parser alive (through its
        frames) until the garbage collector runs, and it must not keep an answer's worth of bytes."""
        self.pieces = []
        del self.buf[:]

    def _complete(self) -> Response:
        if self.decoder is not None:
            self.decoder.finish()
        body = b"".join(self.pieces)
        self.pieces = []
        return self.status, self.headers, body

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

    def _parse(self) -> Response | None:
        buf = self.buf
        while True:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise MalformedResponse(f"the response head is over {MAX_HEAD_BYTES} bytes")
                    return None
                head = bytes(buf[:end])
                del buf[: end + 4]
                if self._head(head):
                    continue  # an interim 1xx response: the real one follows
                if self.state == _HEAD:  # no body (204, 304)
                    return self._complete()
            elif state in (_LENGTH, _CHUNK_DATA):
                n = min(len(buf), self.remaining)
                if n:
                    self._take(n)
                    self.remaining -= n
                if self.remaining:
                    return None
                if state == _CHUNK_DATA:
                    self.state = _CHUNK_END
                    continue
                if buf:
                    self.reusable = False  # extra bytes after the answer: never reuse this stream
                return self._complete()
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise MalformedResponse("a chunk does not end where its size says")
                del buf[:2]
                self.state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                line = self._line()
                if line is None:
                    return None
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise MalformedResponse(f"a negative chunk size {line[:60]!r}")
                self.remaining = size
                self.state = _CHUNK_DATA if size else _TRAILERS
            elif state == _TRAILERS:  # optional trailer lines, then an empty one
                line = self._line()
                if line is None:
                    return None
                if not line:
                    if buf:
                        self.reusable = False
                    return self._complete()
            else:  # _TO_EOF: the body is everything until the server closes
                if buf:
                    self._take(len(buf))
                return None

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


