"""The built-in endpoint's aiohttp app: its routes, and the order in which a chat completion
request meets the endpoint's checks. The key (a 401 echoing what was presented), the body, the
streaming-only refusal, the rate window (a 429), the capacity gate, the request's fault and its
latency come first, in that order; then a fault's refusal, or the composed completion sent as its
fault says.

The capacity gate (`capacity.py`) comes after the cheap refusals, as a server's front end answers
those without queueing them (a 429 never waits in the queue, nor counts in it), and before the
fault: a request waits in arrival order for a place, or gets the 503 of a full queue at once
(without drawing a fault: `faults` counts only what was served). The place is held from the fault
through the latency (jitter, `slow`, `row_latency_ms`, scaled by `batch_latency_growth`) to the
answer sent, refusals and drops included: a GPU server's time is spent on them too. Time in the
queue adds to what the client sees as latency; a client that gives up while queued frees its turn
(a 499 in /stats, nothing served).

    POST /v1/chat/completions   POST /v1/responses (responses.py)   GET /v1/models
    GET /stats[?brief]   POST /stats/reset
    POST /admin/capacity {"capacity": N}   (now; requests in service finish)
    GET /requests (with `record`)   POST /redirected/... (where the redirect fault points)
    /v1/files and /v1/batches: the Batch API (`batchroutes.py`)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, NamedTuple

import aiohttp
from aiohttp import web

from ...config import Api
from ...config.serve import ServeOptions
from .completion import Fetched, completion, user_parts
from .delivery import deliver
from .batchroutes import add_batch_routes
from .capacity import follow_schedule
from .faults import error_response, key_refusal, pick_fault, refusal
from .rate import retry_headers
from .responses import as_response, chat_view
from .state import STATE, ServeState

__all__ = ["make_app", "STATE", "ONLY_STREAM_MESSAGE", "OVERLOADED_MESSAGE"]

ONLY_STREAM_MESSAGE = "This model only support stream mode, please enable the stream parameter to access the model."
OVERLOADED_MESSAGE = "The server is overloaded or not ready yet."  # OpenAI's 503


def make_app(opts: ServeOptions) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = ServeState(opts)
    app.router.add_post("/v1/chat/completions", _completions)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/redirected/{tail:.*}", _followed)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/stats/reset", _reset)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/requests", _recorded)
    app.router.add_post("/admin/capacity", _set_capacity)
    add_batch_routes(app)
    if opts.capacity_schedule:
        app.cleanup_ctx.append(_scheduled)
    return app


async def _scheduled(app: web.Application) -> AsyncIterator[None]:
    """`capacity_schedule` followed while the app runs."""
    task = asyncio.create_task(follow_schedule(app[STATE].capacity))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _handled(request, Api.CHAT)


async def _responses(request: web.Request) -> web.StreamResponse:
    return await _handled(request, Api.RESPONSES)


async def _handled(request: web.Request, api: Api) -> web.StreamResponse:
    state = request.app[STATE]
    state.requests += 1
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    if request.transport is not None:
        state.peers.add(request.transport.get_extra_info("peername"))
    entry: dict[str, Any] = {"t": time.time()}
    if state.opts.record:
        state.recorded.append(entry)
    try:
        resp = await _answer(request, state, entry, api)
    finally:
        state.in_flight -= 1
    state.statuses[str(resp.status)] += 1
    entry["status"] = resp.status
    return resp


async def _answer(request: web.Request, state: ServeState, entry: dict[str, Any], api: Api) -> web.StreamResponse:
    opts = state.opts
    if opts.record:
        entry.update(headers=dict(request.headers), body=await request.text(), api=str(api))
    body = await _admitted_body(request, opts, api)
    if isinstance(body, web.StreamResponse):
        return body
    prompt, urls = user_parts(body.chat["messages"])
    key = entry["row"] = prompt
    state.per_row[key] += 1
    stream = body.get("stream") is True
    if opts.reasoning_only_stream and not stream:
        return error_response(400, ONLY_STREAM_MESSAGE, "invalid_parameter_error")
    allowed, rate_headers, free_in = state.rate.admit()
    if not allowed:
        state.over_limit += 1
        headers = {**rate_headers, **retry_headers(opts.rate_headers, free_in)}
        return error_response(429, "Rate limit reached for requests", "rate_limit_exceeded", headers)
    gate = state.capacity
    if not await gate.enter():
        return _overloaded(state)
    try:
        return await _served(request, state, body, (prompt, urls), rate_headers)
    finally:
        gate.leave()


async def _served(request: web.Request, state: ServeState, body: _Body, parts: tuple[str, list[Any]],
                  rate_headers: dict[str, str]) -> web.StreamResponse:
    """Holding a place: the fault, the latency, then the refusal or the completion sent. A client
    gone while its request waited is not served (as vLLM aborts it): a 499 in /stats, nginx's
    "client closed request", and the place passes on at once."""
    if request.transport is None or request.transport.is_closing():
        return web.Response(status=499)
    opts = state.opts
    prompt, urls = parts  # the prompt is the row's key
    if opts.fetch_images:
        fetched = await _fetch_images(urls)
        if isinstance(fetched, web.Response):
            return fetched
        urls = fetched
    stream = body.get("stream") is True
    fault = pick_fault(state, prompt)
    if fault:
        state.faults_fired[fault] += 1
    delay = _latency_ms(state, fault, prompt)
    if delay:
        await asyncio.sleep(delay / 1000)
    refused = refusal(request, opts, fault, stream=stream, rate_headers=rate_headers)
    if refused is not None:
        return refused
    payload = completion(body.chat, prompt, urls, opts, fault=fault, number=state.requests,
                         authorization=request.headers.get("Authorization", ""))
    response = as_response(payload, body.sent) if body.api is Api.RESPONSES else None
    return await deliver(request, state, payload, body.sent, fault, rate_headers, response)


FETCH_TIMEOUT_S = 10.0
FETCH_MAX_BYTES = 20 << 20  # OpenAI's per-image limit


async def _fetch_images(urls: list[Any]) -> list[Any] | web.Response:
    """`fetch_images`: each http(s) image URL fetched, as a provider does; the 400 a provider sends
    (naming the URL, as OpenAI's "Error while downloading ...") when one cannot be."""
    out: list[Any] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)) as session:
        for url in urls:
            if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
                out.append(url)
                continue
            try:
                async with session.get(url) as resp:
                    data = await resp.content.read(FETCH_MAX_BYTES + 1)
                    failed = f"HTTP {resp.status}" if resp.status != 200 else "too large" if len(data) > FETCH_MAX_BYTES else ""
            except (aiohttp.ClientError, TimeoutError) as exc:
                failed = type(exc).__name__
            if failed:
                return error_response(400, f"Error while downloading {url} ({failed}).", "invalid_image_url")
            out.append(Fetched(data))
    return out


def _overloaded(state: ServeState) -> web.Response:
    """The 503 of a full queue, in OpenAI's error shape; its delay (the rounds ahead x the latency)
    in the `rate_headers` style ("reset", a rate limit's own, becomes retry-after)."""
    style = "retry-after" if state.opts.rate_headers == "reset" else state.opts.rate_headers
    return error_response(503, OVERLOADED_MESSAGE, "server_error", retry_headers(style, state.capacity.retry_in()))


class _Body(NamedTuple):
    """A request's body as sent, and as the chat body it amounts to (the same for chat)."""

    api: Api
    sent: dict[str, Any]
    chat: dict[str, Any]

    def get(self, key: str) -> Any:
        return self.sent.get(key)


async def _admitted_body(request: web.Request, opts: ServeOptions, api: Api) -> _Body | web.Response:
    """The request's body, or the 401 or 400 refusing it."""
    unauthorized = key_refusal(request, opts)
    if unauthorized is not None:
        return unauthorized
    try:
        body = await request.json()
    except (ValueError, TypeError):
        body = None
    if api is Api.RESPONSES:
        chat = chat_view(body)
        if chat is None:
            return error_response(400, "body must be JSON with model and input", "invalid_request_error")
        return _Body(api, body, chat)
    if not isinstance(body, dict) or "messages" not in body or "model" not in body:
        return error_response(400, "body must be JSON with model and messages", "invalid_request_error")
    return _Body(api, body, body)


def _latency_ms(state: ServeState, fault: str | None, key: str) -> float:
    """How long this answer waits: the latency (grown with the batch in service), its seeded jitter,
    the slow fault, the row's own."""
    opts = state.opts
    delay = opts.latency_ms * state.capacity.growth() + (state.rng.random() * opts.latency_jitter_ms if opts.latency_jitter_ms else 0)
    if fault == "slow":
        delay += opts.slow_ms
    delay += sum(ms for needle, ms in opts.row_latency_ms.items() if needle in key)
    return delay


async def _set_capacity(request: web.Request) -> web.Response:
    """POST /admin/capacity {"capacity": N}: from now on at most N in service (0: unlimited)."""
    try:
        body = await request.json()
    except (ValueError, TypeError):
        body = None
    n = body.get("capacity") if isinstance(body, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return error_response(400, 'body must be JSON {"capacity": N}, N a whole number, 0 or more', "invalid_request_error")
    gate = request.app[STATE].capacity
    gate.set_limit(n)
    return web.json_response(gate.stats())


async def _stats(request: web.Request) -> web.Response:
    report = request.app[STATE].stats()
    if "brief" in request.query:  # without per_row: a million-row count every half second was the bench's main load
        del report["per_row"]
        for batch in report["batches"]:
            del batch["custom_ids"]
    return web.json_response(report)


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


async def _recorded(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].recorded)


async def _models(request: web.Request) -> web.Response:
    model = request.app[STATE].opts.model
    return web.json_response({"object": "list", "data": [{"id": model or "builtin", "object": "model"}]})


async def _followed(request: web.Request) -> web.Response:
    request.app[STATE].redirects_followed += 1
    return web.json_response({"error": {"message": "a client followed a redirect", "type": "followed"}}, status=418)
