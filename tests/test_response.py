"""The response parser on its own: the same answer however the bytes are split, and what the end
of the connection means at each point of an answer. (Over real sockets: test_connection.py.)"""

from __future__ import annotations

import gzip
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.net.response import (
    MalformedResponse,
    ResponseCut,
    ResponseParser,
    ResponseTooLarge,
)

CAP = 1 << 20
BODY = b'{"choices": [{"message": {"content": "a picture of a cat"}}]}'
ZIPPED = gzip.compress(BODY)

# (the bytes a server sends, the answer, whether the connection may carry another request)
ANSWERS = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Ratelimit-Remaining-Requests: 7\r\n\r\n%s" % (len(BODY), BODY),
               (200, {"content-length": str(len(BODY)), "x-ratelimit-remaining-requests": "7"}, BODY), True),
    "chunked": ((b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\nRetry-After: 3\r\n\r\n"
                 b"4;ext=1\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\nTrailer: yes\r\n\r\n"),
                (429, {"transfer-encoding": "chunked", "retry-after": "3"}, b'{"a": 1}'), True),
    "gzip": (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
             % (len(ZIPPED), ZIPPED), (200, {"content-encoding": "gzip", "transfer-encoding": "chunked"}, BODY), True),
    "no body": (b"HTTP/1.1 204 No Content\r\nA: 1\r\nA: 2\r\n\r\n", (204, {"a": "1, 2"}, b""), True),
    "close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
              (200, {"connection": "close", "content-length": "2"}, b"{}"), False),
}


def _feed(data: bytes, cuts: list[int]) -> tuple[ResponseParser, list[object]]:
    """Every non-None result of feeding `data` split at `cuts`."""
    parser, results = ResponseParser(CAP), list[object]()
    edges = [0, *sorted(set(cuts)), len(data)]
    for start, end in pairwise(edges):
        if (result := parser.feed(data[start:end])) is not None:
            results.append(result)
    return parser, results


@pytest.mark.parametrize("name", sorted(ANSWERS))
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_an_answer_reads_the_same_however_its_bytes_are_split(name: str, cuts: list[int]) -> None:
    data, expected, reusable = ANSWERS[name]
    parser, results = _feed(data, [c for c in cuts if c < len(data)])
    assert results == [expected]  # once, whole, and not before its last byte
    assert parser.reusable is reusable


def test_bytes_after_the_answer_make_the_connection_unusable() -> None:
    data, expected, _ = ANSWERS["length"]
    parser = ResponseParser(CAP)
    assert parser.feed(data + b"HTTP/1.1 200 OK\r\n") == expected
    assert parser.reusable is False


def test_the_end_of_the_connection_completes_or_cuts_the_answer() -> None:
    to_eof = ResponseParser(CAP)
    assert to_eof.feed(b"HTTP/1.0 200 OK\r\n\r\n{\"b\":") is None
    assert to_eof.feed(b" 2}") is None
    assert to_eof.eof() == (200, {}, b'{"b": 2}') and to_eof.reusable is False

    cut = ResponseParser(CAP)
    cut.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
    with pytest.raises(ResponseCut, match="after 41 bytes"):
        cut.eof()
    with pytest.raises(ConnectionResetError):
        ResponseParser(CAP).eof()
    zipped_cut = ResponseParser(CAP)
    zipped_cut.feed(b"HTTP/1.0 200 OK\r\nContent-Encoding: gzip\r\n\r\n" + ZIPPED[:20])
    with pytest.raises(MalformedResponse, match="stops before its end"):
        zipped_cut.eof()


def test_an_answer_over_the_cap_is_refused_from_its_head() -> None:
    parser = ResponseParser(1000)
    with pytest.raises(ResponseTooLarge):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n")
    unsized = ResponseParser(1000)
    unsized.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(ResponseTooLarge):
        unsized.feed(b"7d1\r\n" + b"x" * 1001)


@pytest.mark.parametrize("data", [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                                  b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"])
def test_bytes_that_are_not_an_answer_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedResponse):
        ResponseParser(CAP).feed(data)
