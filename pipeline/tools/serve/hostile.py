"""The built-in endpoint's hostile answers: 200s built to exhaust or confuse a client, to prove
its bounds (`pipeline/net/client.py`). `null_text` (content parts, one with `"text": null`),
`gzip_bomb` (a small gzip body that inflates to `bomb_mb` MB), `huge` (an answer of `huge_mb` MB,
written piece by piece) and `bad_utf8` (answer text ending in invalid bytes).
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from typing import Any

from aiohttp import web

from ...net.stream import to_sse
from .state import ServeState

__all__ = ["hostile_answer", "gzip_bomb", "HOSTILE_ANSWERS", "BAD_UTF8"]

HOSTILE_ANSWERS = frozenset({"null_text", "gzip_bomb", "huge", "bad_utf8"})  # a 200 the client must survive
BAD_UTF8_MARK = "\ue000"  # one character (so no SSE piece splits it), swapped for BAD_UTF8 in the bytes sent
BAD_UTF8 = b"\xff\xfe\xfd"  # three invalid bytes: a client keeping the answer replaces 3 bytes
PIECE = 64 * 1024


async def hostile_answer(
    request: web.Request, state: ServeState, fault: str, payload: dict[str, Any], stream: bool
) -> web.StreamResponse:
    """`payload` (a chat.completion) sent as the hostile answer `fault` (one of HOSTILE_ANSWERS)."""
    message = payload["choices"][0]["message"] if payload["choices"] else {}
    kind = "text/event-stream" if stream else "application/json"
    if fault == "gzip_bomb":
        async with state.bomb_lock:
            if stream not in state.bombs:
                state.bombs[stream] = await asyncio.to_thread(gzip_bomb, stream, state.opts.bomb_mb)
        return web.Response(body=state.bombs[stream], headers={"Content-Type": kind, "Content-Encoding": "gzip"})
    if fault == "huge":
        return await _huge(request, stream, int(state.opts.huge_mb * 1024 * 1024), state.opts.transfer == "length")
    if fault == "bad_utf8":
        message["content"] = f"{message.get('content') or ''} {BAD_UTF8_MARK}"
    elif not stream:  # null_text
        message["content"] = [{"type": "text", "text": None}, {"type": "image_url", "image_url": None},
                              {"type": "text", "text": message.get("content")}]
    if not stream:
        raw = json.dumps(payload, ensure_ascii=False).encode().replace(BAD_UTF8_MARK.encode(), BAD_UTF8)
        return web.Response(body=raw, headers={"Content-Type": kind})
    events = to_sse(payload)
    if fault == "null_text":
        nulls = {"choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": None}]}, "finish_reason": None}]}
        events.insert(1, b"data: " + json.dumps(nulls).encode() + b"\n\n")
    resp = web.StreamResponse(status=200, headers={"Content-Type": kind})
    await resp.prepare(request)
    await resp.write(b"".join(events).replace(BAD_UTF8_MARK.encode(), BAD_UTF8))
    await resp.write_eof()
    return resp


def gzip_bomb(stream: bool, mb: int) -> bytes:
    """A gzip body of ~1 KB per MB that inflates to `mb` MB of zeros inside an answer's JSON string
    (an SSE stream's when `stream`).
    After a full flush deflate starts afresh, so one compressed MB of zeros is repeated `mb` times
    (built in a second, not compressed for minutes); the trailer's CRC is computed over it all."""
    if stream:
        head, tail = b'data: {"choices":[{"index":0,"delta":{"content":"', b'"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    else:
        head, tail = b'{"object":"chat.completion","choices":[{"index":0,"finish_reason":"stop","message":{"content":"', b'"}}]}'
    zeros = b"0" * (1024 * 1024)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = deflate.compress(tail) + deflate.flush()
    crc = zlib.crc32(head)
    for _ in range(mb):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(tail, crc)
    size = (len(head) + mb * len(zeros) + len(tail)) & 0xFFFFFFFF
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return gzip_header + first + block * mb + last + struct.pack("<II", crc, size)


async def _huge(request: web.Request, stream: bool, size: int, declared: bool) -> web.StreamResponse:
    """An answer of `size` bytes of text, written piece by piece (never held whole here)."""
    if stream:
        head = b'data: {"choices":[{"index":0,"delta":{"content":"'
        tail = b'"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    else:
        head, tail = b'{"object":"chat.completion","choices":[{"index":0,"finish_reason":"stop","message":{"content":"', b'"}}]}'
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream" if stream else "application/json"})
    if declared:
        resp.content_length = len(head) + size + len(tail)
    else:
        resp.enable_chunked_encoding()
    piece = b"x" * PIECE
    try:
        await resp.prepare(request)
        await resp.write(head)
        for start in range(0, size, PIECE):
            await resp.write(piece[: min(PIECE, size - start)])
        await resp.write(tail)
        await resp.write_eof()
    except ConnectionError:  # the client stopped reading at its cap and dropped the connection
        pass
    return resp
