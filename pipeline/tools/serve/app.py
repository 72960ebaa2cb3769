"""The built-in endpoint: an OpenAI-compatible /v1/chat/completions to rehearse a job for free.

    pipeline serve --port 8000 --latency-ms 200
    python -c "from pipeline.tools.serve import ServeOptions, make_app"   # tests start it in-process

It answers in the seed's response shape, a `<think>` block first, describing what it can really
see: for inlined images their format, size and main colours (Pillow); for URLs only the URL, as
it has no network; for video parts (`video_url`, DashScope's `video`) their kind and size. It can behave like a real provider under load or failing:

- `rate_limit` requests per `rate_window_s`, enforced over a sliding window: over it, a 429 whose
  delay is given in the `rate_headers` style, with x-ratelimit-* headers on every answer;
- faults by seeded chance (`faults = {"500": 0.05, "drop": 0.03, ...}`) or by row
  (`row_faults = {"text in the prompt": "400"}`, or `"503:2"` for the first two requests only).
  Fault names: 400, 401, 500, 503, 429 (Retry-After seconds), 429ms, 429date, 429reset,
  429bare (no delay header at all), quota, throttle (DashScope's AllocationQuota), drop
  (connection closed, no answer), cut (body cut midway), broken (200, not JSON), nochoices, slow
  (answer after `slow_ms`), length (thinking cut off by max_tokens). Injected 429s ask for
  `fault_retry_after_s`; `x_should_retry = {"500": "false"}` adds that header to a fault's answers;
  `row_latency_ms = {"text in the prompt": 500}` answers those rows (any answer) that much later;
- streaming (`"stream": true` in the request): the same answer as SSE with `:` comment lines and,
  when `stream_options.include_usage`, a last usage chunk; faults `cut` (connection closed midway),
  `stream_end` (the stream ends cleanly before finish_reason and [DONE]), `stream_error` (an OpenAI
  `{"error": ...}` chunk midway), `stream_error_vllm` (vLLM's `{"object": "error"}`), `no_usage` (no
  usage chunk; without streaming, no usage field). `reasoning_only_stream` refuses requests without
  streaming with a 400, as DashScope does for its QVQ models;
- hostile answers, to prove the client's bounds (`pipeline/net/client.py`): `null_text` (content parts,
  one with `"text": null`, then the answer's text part; streamed: a delta whose content is such a
  list), `gzip_bomb` (a ~1 MB gzip body, sent whatever the request accepts, that inflates to
  `bomb_mb` MB of zeros inside a JSON string; built once, in a thread), `huge` (an answer of
  `huge_mb` MB, over the client's default cap, written in 64 KB pieces: chunked, or with its
  Content-Length under `transfer = "length"`), `bad_utf8` (a 200 whose answer text ends with the
  invalid bytes FF FE FD), `answer_echoes_key` (a 200 whose answer quotes the presented Authorization header),
  `echo_key` (a 400 whose message echoes the presented Authorization
  header, padded so it straddles the 500th character, where clients cut messages), `redirect` (a
  307 to /redirected/... on this server, which counts in /stats `redirects_followed` whoever
  follows it);
- labeling: a request with a `json_schema` response_format is answered with a JSON object built from
  the schema (first enum value, 0.5, a short text...), after the think block, in a ```json fence with
  `fence_json`; fault `invalid_json` answers values of the wrong kinds instead;
- GET /stats: requests per row (keyed by the prompt text), statuses, requests over the limit;
  with `record`, GET /requests lists each request with its arrival time, row and status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import io
import json
import math
import os
import random
import struct
import sys
import time
import zlib
from collections import Counter, deque
from typing import Any, AsyncIterator, NamedTuple

from aiohttp import web

from ...config.serve import ServeOptions
from ...errors import JobError
from ...net.stream import to_sse

__all__ = ["ServeOptions", "make_app", "serve_forever", "start_subprocess"]

HOSTILE_ANSWERS = frozenset({"null_text", "gzip_bomb", "huge", "bad_utf8"})  # a 200 the client must survive
BAD_UTF8_MARK = "\ue000"  # one character (so no SSE piece splits it), swapped for BAD_UTF8 in the bytes sent
BAD_UTF8 = b"\xff\xfe\xfd"  # three invalid bytes: a client keeping the answer replaces 3 bytes
MESSAGE_CUT = 500  # where clients commonly cut error messages: echo_key puts the key across it
PIECE = 64 * 1024
ONLY_STREAM_MESSAGE = "This model only support stream mode, please enable the stream parameter to access the model."


class _State:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.window: deque[float] = deque()
        self.per_row: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self.requests = 0
        self.over_limit = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.recorded: list[dict[str, Any]] = []
        self.peers: set[Any] = set()  # (host, port) of each client connection seen
        self.redirects_followed = 0  # requests that arrived at a redirect fault's Location
        self.bombs: dict[bool, bytes] = {}  # the gzip bomb, plain and streamed: built once
        self.bomb_lock = asyncio.Lock()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "per_row": dict(self.per_row),
            "statuses": dict(self.statuses),
            "faults": dict(self.faults_fired),
            "over_limit": self.over_limit,
            "max_in_flight": self.max_in_flight,
            "connections": len(self.peers),
            "redirects_followed": self.redirects_followed,
        }

    def rate_check(self) -> tuple[bool, dict[str, str], float]:
        """(allowed, headers, seconds until a place frees) under the sliding window."""
        o = self.opts
        if o.rate_limit <= 0:
            return True, {}, 0.0
        now = time.monotonic()
        while self.window and self.window[0] <= now - o.rate_window_s:
            self.window.popleft()
        allowed = len(self.window) < o.rate_limit
        if allowed:
            self.window.append(now)
        free_in = max((self.window[0] + o.rate_window_s - now) if self.window else 0.0, 0.001)
        if o.rate_headers == "none":  # like vLLM and many gateways: nothing to go by
            return allowed, {}, free_in
        headers = {
            "x-ratelimit-limit-requests": str(o.rate_limit),
            "x-ratelimit-remaining-requests": str(max(0, o.rate_limit - len(self.window))),
            "x-ratelimit-reset-requests": _ms(free_in),
        }
        return allowed, headers, free_in


def _ms(seconds: float) -> str:
    """A duration in whole milliseconds, rounded up: a client waiting this long finds a place."""
    return f"{max(1, math.ceil(seconds * 1000))}ms"


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": code, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _retry_headers(style: str, delay: float) -> dict[str, str]:
    if style == "retry-after":
        return {"retry-after": str(max(1, math.ceil(delay)))}
    if style == "retry-after-ms":
        return {"retry-after-ms": str(max(1, math.ceil(delay * 1000)))}
    if style == "http-date":
        # whole seconds, rounded up: a client that waits until then finds a place
        return {"retry-after": email.utils.formatdate(math.ceil(time.time() + max(1.0, delay)), usegmt=True)}
    if style == "reset":
        return {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": _ms(delay)}
    return {}


def describe_image(url: str, analyze: bool) -> str:
    if not url.startswith("data:"):
        return f"an image at {url[:200]} (not fetched: the built-in endpoint has no network)"
    head, _, payload = url.partition(",")
    mime = head[5:].split(";")[0] or "unknown type"
    if not analyze:
        return f"an inlined {mime} image of {len(payload) * 3 // 4} bytes"
    try:
        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(payload)))
        w, h = img.size
        small = img.convert("RGB").resize((24, 24))
        colours = small.quantize(colors=3).convert("RGB").getcolors(24 * 24) or []
        top = ", ".join("#%02x%02x%02x" % c for _, c in sorted(colours, reverse=True)[:3])
        return f"a {img.format or mime} image, {w}x{h} pixels, main colours {top}"
    except Exception as exc:  # a broken image is an answer too: say so, as a model would
        return f"an inlined {mime} that could not be decoded ({type(exc).__name__})"


class Video(NamedTuple):
    """A video part: a URL or data URI (`video_url`), or a list of frames (DashScope's `video`)."""

    value: str | list[str]


def describe_video(video: Video, analyze: bool) -> str:
    v = video.value
    if isinstance(v, list):
        return f"a video of {len(v)} frames given one by one"
    if not v.startswith("data:"):
        return f"a video at {v[:200]} (not fetched: the built-in endpoint has no network)"
    head, _, payload = v.partition(",")
    mime = head[5:].split(";")[0] or "unknown type"
    if mime == "video/jpeg":  # vLLM's frames, base64 JPEGs joined by commas
        frames = payload.split(",")
        first = describe_image("data:image/jpeg;base64," + frames[0], analyze) if analyze else "not analysed"
        return f"a video of {len(frames)} JPEG frames (the first: {first})"
    return f"an inlined {mime} video of {len(payload) * 3 // 4} bytes"


def _pick_fault(state: _State, key: str) -> str | None:
    for needle, spec in state.opts.row_faults.items():
        if needle in key:
            name, _, limit = spec.partition(":")
            if not limit or state.per_row[key] <= int(limit):
                return name
    roll = state.rng.random()
    for name, p in state.opts.faults.items():
        if roll < p:
            return name
        roll -= p
    return None


def make_app(opts: ServeOptions) -> web.Application:
    state = _State(opts)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["state"] = state

    async def completions(request: web.Request) -> web.StreamResponse:
        state.requests += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        if request.transport is not None:
            state.peers.add(request.transport.get_extra_info("peername"))
        entry: dict[str, Any] = {"t": time.time()}
        if opts.record:
            state.recorded.append(entry)
        try:
            resp = await _answer(request, entry)
        finally:
            state.in_flight -= 1
        state.statuses[str(resp.status)] += 1
        entry["status"] = resp.status
        return resp

    async def _answer(request: web.Request, entry: dict[str, Any]) -> web.StreamResponse:
        if opts.record:
            entry.update(headers=dict(request.headers), body=await request.text())
        if opts.api_key is not None and request.headers.get("Authorization") != f"Bearer {opts.api_key}":
            # Like some providers, echo what was presented: the client must scrub it from its messages.
            presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return _error(401, f"Incorrect API key provided: {presented}", "invalid_api_key")
        try:
            body = await request.json()
            messages = body["messages"]
            model = body["model"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "body must be JSON with model and messages", "invalid_request_error")
        prompt, urls = _user_parts(messages)
        key = entry["row"] = prompt
        state.per_row[key] += 1
        stream = body.get("stream") is True
        if opts.reasoning_only_stream and not stream:
            return _error(400, ONLY_STREAM_MESSAGE, "invalid_parameter_error")
        allowed, rate_headers, free_in = state.rate_check()
        if not allowed:
            state.over_limit += 1
            headers = {**rate_headers, **_retry_headers(opts.rate_headers, free_in)}
            return _error(429, "Rate limit reached for requests", "rate_limit_exceeded", headers)
        fault = _pick_fault(state, key)
        if fault:
            state.faults_fired[fault] += 1
        delay = opts.latency_ms + (state.rng.random() * opts.latency_jitter_ms if opts.latency_jitter_ms else 0)
        if fault == "slow":
            delay += opts.slow_ms
        delay += sum(ms for needle, ms in opts.row_latency_ms.items() if needle in key)
        if delay:
            await asyncio.sleep(delay / 1000)
        if fault in ("400", "401", "500", "503", "quota", "throttle") or (fault or "").startswith("429"):
            resp = _fault_response(fault, rate_headers)
            if fault in opts.x_should_retry:
                resp.headers["x-should-retry"] = opts.x_should_retry[fault]
            return resp
        if not stream and fault in ("stream_error", "stream_error_vllm"):
            return _fault_response("500", rate_headers)
        if fault in ("echo_key", "redirect"):
            return _refusal(request, fault)
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=599)  # never reaches the client
        max_tokens = body.get("max_tokens")
        answer = _json_answer(body, prompt, opts, valid=fault != "invalid_json")
        if fault == "answer_echoes_key":  # a model that repeats what it was sent, headers included
            answer = f"Answer to {prompt!r}: your request said Authorization: {request.headers.get('Authorization', '')}"
        content, reasoning = _compose(prompt, urls, opts, length_cut=fault == "length", answer=answer)
        message: dict[str, Any] = {"content": content, "refusal": None, "role": "assistant", "annotations": None,
                                   "audio": None, "function_call": None, "tool_calls": None}
        if opts.reasoning_field != "content":
            message[opts.reasoning_field] = reasoning
        prompt_tokens = len(prompt) // 4 + 8 + 85 * len(urls)
        completion_tokens = max(1, (len(content) + len(reasoning if opts.reasoning_field != "content" else "")) // 4)
        if fault == "length" and isinstance(max_tokens, int):
            completion_tokens = max_tokens
        payload = {
            "id": f"chatcmpl-{state.requests}",
            "choices": [] if fault == "nochoices" else [
                {"finish_reason": "length" if fault == "length" else "stop", "index": 0, "logprobs": None, "message": message}
            ],
            "created": int(time.time()),
            "model": opts.model or model,
            "object": "chat.completion",
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "completion_tokens": completion_tokens,
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens_details": None,
                "prompt_tokens_details": None,
            },
        }
        if fault in HOSTILE_ANSWERS:
            return await _hostile_answer(request, state, fault, payload, stream)
        if stream and fault != "broken":
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True and fault != "no_usage"
            return await _stream(request, payload, fault, usage, rate_headers)
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
        if opts.transfer != "length":
            resp.enable_chunked_encoding()
        if opts.transfer == "gzip":
            resp.enable_compression(web.ContentCoding.gzip)  # only when the request accepts gzip
        return resp

    def _fault_response(fault: str, rate_headers: dict[str, str]) -> web.Response:
        if fault == "400":
            return _error(400, "Invalid image: the provider could not read it", "invalid_request_error")
        if fault == "401":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if fault == "500":
            return _error(500, "The server had an error processing your request", "server_error", rate_headers)
        if fault == "503":
            return _error(503, "The engine is currently overloaded", "server_error")
        if fault == "quota":
            return _error(429, "You exceeded your current quota, please check your plan and billing details.",
                          "insufficient_quota")
        if fault == "throttle":
            return web.json_response({"code": "Throttling.AllocationQuota", "message": "Allocated quota exceeded, please increase your quota limit."},
                                     status=429)
        style = {"429": "retry-after", "429ms": "retry-after-ms", "429date": "http-date", "429reset": "reset",
                 "429bare": "none"}[fault]
        return _error(429, "Rate limit reached for requests", "rate_limit_exceeded",
                      {**rate_headers, **_retry_headers(style, opts.fault_retry_after_s)})

    async def stats(request: web.Request) -> web.Response:
        report = state.stats()
        if "brief" in request.query:  # without per_row: a million-row count every half second was the bench's main load
            del report["per_row"]
        return web.json_response(report)

    async def reset(request: web.Request) -> web.Response:
        app["state"] = fresh = _State(opts)
        state.__dict__.update(fresh.__dict__)
        return web.json_response({"reset": True})

    async def recorded(request: web.Request) -> web.Response:
        return web.json_response(state.recorded)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": opts.model or "builtin", "object": "model"}]})

    async def followed(request: web.Request) -> web.Response:
        state.redirects_followed += 1
        return web.json_response({"error": {"message": "a client followed a redirect", "type": "followed"}}, status=418)

    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/redirected/{tail:.*}", followed)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/requests", recorded)
    return app


def _refusal(request: web.Request, fault: str) -> web.Response:
    """echo_key: a 400 echoing the presented Authorization across the message cut; redirect: a 307."""
    if fault == "redirect":
        return web.Response(status=307, headers={"Location": f"http://{request.host}/redirected{request.path}"})
    presented = request.headers.get("Authorization", "")
    lead = "The request was refused for the credentials presented: "
    filler = max(0, MESSAGE_CUT - len(lead) - len(presented) // 2)
    return _error(400, ("Refused. " * (filler // 9 + 1))[:filler] + lead + presented, "invalid_request_error")


async def _hostile_answer(
    request: web.Request, state: _State, fault: str, payload: dict[str, Any], stream: bool
) -> web.StreamResponse:
    """A 200 that is hard to read: see HOSTILE_ANSWERS and the module docstring."""
    message = payload["choices"][0]["message"] if payload["choices"] else {}
    kind = "text/event-stream" if stream else "application/json"
    if fault == "gzip_bomb":
        async with state.bomb_lock:
            if stream not in state.bombs:
                state.bombs[stream] = await asyncio.to_thread(_bomb, stream, state.opts.bomb_mb)
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


def _bomb(stream: bool, mb: int) -> bytes:
    """A gzip body of ~1 KB per MB that inflates to `mb` MB of zeros inside an answer's JSON string.
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


async def _stream(
    request: web.Request, payload: dict[str, Any], fault: str | None, usage: bool, rate_headers: dict[str, str]
) -> web.StreamResponse:
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


def _json_answer(body: dict[str, Any], prompt: str, opts: ServeOptions, *, valid: bool) -> str | None:
    """For a labeling request (response_format json_schema): a JSON answer built from its schema."""
    rf = body.get("response_format")
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        return None
    from ...rows.labels import (
        example_for_schema,  # here: the server starts without pyarrow and jsonschema
    )

    schema = (rf.get("json_schema") or {}).get("schema")
    text = json.dumps(example_for_schema(schema, valid=valid, text=f"about {prompt[:60]}"), ensure_ascii=False)
    return f"```json\n{text}\n```" if opts.fence_json else text


def _user_parts(messages: list[dict[str, Any]]) -> tuple[str, list[str | Video]]:
    texts, urls = [], []
    for m in messages:
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                urls.append((part.get("image_url") or {}).get("url", ""))
            elif part.get("type") == "video_url":
                urls.append(Video((part.get("video_url") or {}).get("url", "")))
            elif part.get("type") == "video":
                urls.append(Video([str(f) for f in part.get("video") or []]))
    return "\n".join(texts), urls


def _compose(
    prompt: str, urls: list[str | Video], opts: ServeOptions, *, length_cut: bool, answer: str | None = None
) -> tuple[str, str]:
    seen = [describe_video(u, opts.analyze_images) if isinstance(u, Video) else describe_image(u, opts.analyze_images)
            for u in urls]
    reasoning = f"The user asks: {prompt!r}. I am shown {len(urls)} image(s); I describe each briefly."
    if length_cut:
        content = f"<think>\n{reasoning} Let me look more closely at" if opts.reasoning_field == "content" else ""
        return content, reasoning
    if answer is None:
        answer = f"Answer to {prompt!r}: " + ("; ".join(f"image {i + 1} is {d}" for i, d in enumerate(seen)) or "no image given") + "."
    if opts.answer_bytes and len(answer.encode()) < opts.answer_bytes:
        answer += " " + "x" * (opts.answer_bytes - len(answer.encode()) - 1)
    if opts.reasoning_field == "content":
        return f"<think>\n{reasoning}\n</think>\n\n{answer}", reasoning
    return answer, reasoning


async def serve_forever(opts: ServeOptions) -> None:
    runner = web.AppRunner(make_app(opts), access_log=None, keepalive_timeout=opts.keepalive_s)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"serving on http://{opts.host}:{port}/v1", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def start_subprocess(options: dict[str, Any]) -> AsyncIterator[str]:
    """Start `pipeline serve` in its own process for a job's `[serve]` table; yields its base URL.
    The endpoint dies with this process, even when it is killed with -9 (`--parent-pid`)."""
    ServeOptions.from_dict(options)  # report a bad [serve] table before starting anything
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "serve", "--options-json", json.dumps(options),
        "--parent-pid", str(os.getpid()),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if not line.startswith("serving on "):
            raise JobError(f"[serve] the built-in endpoint did not start ({line or 'no output'})")
        yield line.removeprefix("serving on ")
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
