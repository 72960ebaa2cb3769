"""How the built-in endpoint sends a composed chat.completion: as plain JSON (framed by
`transfer`: a Content-Length, chunked, or gzip-compressed), or as SSE when the request streams
(comment lines between events, a usage chunk when asked for), and the faults that spoil it on the
way: `broken` (a 200 that is not JSON), `cut` (the connection closed midway), `no_usage`,
`stream_end`, `stream_error`, `stream_error_vllm`. The hostile answers go to `hostile.py`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ...net.stream import to_sse
from .hostile import HOSTILE_ANSWERS, hostile_answer
from .responses import stream_response
from .state import ServeState

__all__ = ["deliver"]


async def deliver(request: web.Request, state: ServeState, payload: dict[str, Any], body: dict[str, Any],
                  fault: str | None, rate_headers: dict[str, str], response: dict[str, Any] | None = None) -> web.StreamResponse:
    """Send `payload`, the completion answering `body`, as its fault says; with `response` (the
    same answer as a /v1/responses request gets it), that instead."""
    if fault in HOSTILE_ANSWERS:  # chat-shaped bytes either way: what they test is the client's caps
        return await hostile_answer(request, state, fault, payload, body.get("stream") is True)
    if response is not None:
        if body.get("stream") is True and fault != "broken":
            return await stream_response(request, response, fault, rate_headers)
        payload = response
    if body.get("stream") is True and fault != "broken":
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True and fault != "no_usage"
        return await _stream(request, payload, fault, usage, rate_headers)
    return await _plain(request, payload, fault, state.opts.transfer, rate_headers)


async def _plain(request: web.Request, payload: dict[str, Any], fault: str | None, transfer: str,
                 rate_headers: dict[str, str]) -> web.StreamResponse:
    if fault == "no_usage":
        del payload["usage"]
    raw = json.dumps(payload, ensure_ascii=False).encode()
    if fault == "broken":
        return web.Response(body=b"<html><body>502 Bad Gateway</body></html>", status=200,
                            content_type="application/json", headers=rate_headers)
    if fault == "cut":
        resp = web.StreamResponse(status=200, headers={**rate_headers, "Content-Type": "application/json",
                                                       "Content-Length": str(len(raw))})
        await resp.prepare(request)
        await resp.write(raw[: len(raw) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp
    resp = web.Response(body=raw, content_type="application/json", headers=rate_headers)
    if transfer != "length":
        resp.enable_chunked_encoding()
    if transfer == "gzip":
        resp.enable_compression(web.ContentCoding.gzip)  # only when the request accepts gzip
    return resp


async def _stream(
    request: web.Request, payload: dict[str, Any], fault: str | None, usage: bool, rate_headers: dict[str, str]
) -> web.StreamResponse:
    """`payload` as SSE, with comment lines between events; the stream faults end it early."""
    events = to_sse(payload, include_usage=usage)
    resp = web.StreamResponse(status=200, headers={**rate_headers, "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b": keep-alive\n\n")
    finish = len(events) - (2 if usage else 1) - 1  # the finish_reason chunk
    midway = max(1, finish // 2)
    if fault in ("cut", "stream_end", "stream_error", "stream_error_vllm"):
        events = events[:midway]
    for i, event in enumerate(events):
        await resp.write(event)
        if i == 0:
            await resp.write(b": still thinking\n\n")  # comments may come between events too
    if fault == "cut":
        assert request.transport is not None
        request.transport.close()
        return resp
    if fault == "stream_error":
        error = {"error": {"message": "The server had an error while processing your request", "type": "server_error",
                           "param": None, "code": "server_error"}}
        await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
    elif fault == "stream_error_vllm":
        error = {"object": "error", "message": "Internal server error while generating", "type": "InternalServerError",
                 "param": None, "code": 500}
        await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
    await resp.write_eof()
    return resp
