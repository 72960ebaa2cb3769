"""The answer's body and its failures: bounded gzip/deflate decoding, and the errors of a response.

A body is taken piece by piece (`BoundedDecoder`): gzip or deflate decoded with zlib's
`max_length`, never more than a cap of it as sent or as decoded, so a small gzip bomb cannot
inflate to gigabytes. Both request paths read bodies through it: the lean pool
(`connection.ConnectionPool`) and the streamed path on aiohttp (`client.Client.post_stream`), which
asks for exactly the codings it decodes (ACCEPT_ENCODING).

The failures are builtin-shaped, so `client.translate` can give them their kind: ResponseCut and
MalformedResponse are ConnectionErrors; ResponseTooLarge names the cap it stopped at.
"""

from __future__ import annotations

import zlib

__all__ = ["BoundedDecoder", "ResponseCut", "MalformedResponse", "ResponseTooLarge", "ACCEPT_ENCODING"]

ACCEPT_ENCODING = "gzip, deflate"  # what BoundedDecoder decodes; asked for on both paths
_COMPRESSED = frozenset({"gzip", "x-gzip", "deflate"})
DECODE_STEP = 1 << 20  # zlib's output per call: no transient copy of a whole big answer


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
