"""The built-in endpoint's POST /v1/responses: the Responses API in OpenAI's published shapes, its
answers composed exactly as chat's (`completion.py`), so one manifest gives the same answers,
reasoning and token counts through either API.

    chat = chat_view(body)                      # the request restated as a chat body (None: not valid)
    payload = completion(chat, ...)             # composed as for /v1/chat/completions
    response = as_response(payload, body)       # the `response` object (reasoning and message items)
    await stream_response(request, response, fault, rate_headers)   # typed events (plain: delivery.py)

The request's `input` (a string, or items with `input_text`/`input_image` content) and
`instructions` become chat messages, `max_output_tokens` max_tokens, a `text.format` json_schema
the response_format. The answer: a `reasoning` item whose summary is the reasoning text, a
`message` item with one `output_text` part, usage in the Responses names (`input_tokens`,
`input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens`); a `length` cut is
`status = "incomplete"` with `incomplete_details.reason = "max_output_tokens"`, its message
missing when the thinking never ended. Sent plainly by delivery.py as chat's answers are (its
`transfer`, `cut`, `broken`, `no_usage`), or streamed here with net/events.py's `to_events`; the stream
faults: `cut` (connection closed midway), `stream_end` (ends before the terminal event),
`stream_error` (an `error` event midway), `stream_error_vllm` (a `response.failed` terminal
event with a server_error), `no_usage` (a response without usage). The hostile answers are
chat-shaped bytes (hostile.py), the caps they test the same.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from ...net.events import to_events
from ...rows.answer import split_think

__all__ = ["chat_view", "as_response", "stream_response"]


def chat_view(body: Any) -> dict[str, Any] | None:
    """The chat body a /v1/responses request amounts to; None when it is not one (no model, no input)."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or "input" not in body:
        return None
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, dict) and item.get("role") in ("user", "system", "developer"):
            messages.append({"role": item["role"] if item["role"] == "user" else "system", "content": _parts(item.get("content"))})
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "stream": body.get("stream") is True}
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return chat


def _parts(content: Any) -> Any:
    """Input content items as chat parts (text and images; other items are left out)."""
    if not isinstance(content, list):
        return content
    parts = []
    for item in content:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "input_text":
            parts.append({"type": "text", "text": item.get("text", "")})
        elif item.get("type") == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": item.get("image_url") or ""}})
    return parts


def as_response(payload: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion `payload` restated as the response to `body`."""
    choices = payload.get("choices") or []
    message = choices[0]["message"] if choices else {}
    content = message.get("content") or ""
    answer, reasoning = split_think(content)
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str):
            reasoning = message[key]
    number = str(payload.get("id", "")).rsplit("-", 1)[-1]
    output: list[dict[str, Any]] = []
    if reasoning:
        output.append({"type": "reasoning", "id": f"rs_{number}", "summary": [{"type": "summary_text", "text": reasoning}]})
    incomplete = bool(choices) and choices[0].get("finish_reason") == "length"
    if answer is not None and choices:
        output.append({"type": "message", "id": f"msg_{number}", "role": "assistant",
                       "status": "incomplete" if incomplete else "completed",
                       "content": [{"type": "output_text", "text": answer, "annotations": [], "logprobs": []}]})
    now = int(time.time())
    return {
        "id": f"resp_{number}", "object": "response", "created_at": payload.get("created", now),
        "status": "incomplete" if incomplete else "completed", "completed_at": None if incomplete else now,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
        "max_output_tokens": body.get("max_output_tokens") if isinstance(body.get("max_output_tokens"), int) else None,
        "model": payload.get("model"), "output": output, "parallel_tool_calls": True,
        "reasoning": body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None,
        "text": body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
        "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto", "tools": [], "metadata": {},
        **({"usage": _usage(payload["usage"])} if isinstance(payload.get("usage"), dict) else {}),
    }


def _usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None  # left out of the response (the description has no null usage)
    prompt = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": prompt.get("cached_tokens") or 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": completion.get("reasoning_tokens") or 0}}


async def stream_response(request: web.Request, response: dict[str, Any], fault: str | None,
                          rate_headers: dict[str, str]) -> web.StreamResponse:
    """`response` as typed SSE events, spoilt as the stream `fault` says."""
    if fault in ("no_usage", "stream_error_vllm"):
        response.pop("usage", None)
    if fault == "stream_error_vllm":  # a response that failed on the server's side, as its terminal event
        response.update(status="failed", output=[], completed_at=None,
                        error={"code": "server_error", "message": "The server had an error while processing your request"})
    events = to_events(response)
    if fault in ("cut", "stream_end", "stream_error"):
        events = events[:max(2, (len(events) - 1) // 2)]
    resp = web.StreamResponse(status=200, headers={**rate_headers, "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b": keep-alive\n\n")
    await resp.write(b"".join(events))
    if fault == "cut":
        assert request.transport is not None
        request.transport.close()
        return resp
    if fault == "stream_error":
        error = {"type": "error", "code": "server_error", "param": None, "sequence_number": len(events),
                 "message": "The server had an error while processing your request"}
        await resp.write(b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n")
    await resp.write_eof()
    return resp
