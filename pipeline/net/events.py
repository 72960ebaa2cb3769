"""The Responses API's stream: its typed SSE events folded into the response a plain answer is.

    asm = StreamAssembler(redactor, ResponsesFold())   # the framing is stream.py's
    ...feed lines...
    body = asm.result()          # the response: parse_response(body, Api.RESPONSES)

A streamed response is a sequence of events named by their `type` (OpenAI's published
description): `response.created` and `response.in_progress` (the response so far), the output
items added and done, `response.reasoning_summary_text.delta`, `response.output_text.delta`, ...,
and one terminal event carrying the whole response, usage included: `response.completed`,
`response.incomplete` (cut by max_output_tokens: a truncated answer, as chat's "length") or
`response.failed` (its `error` then decides the row, as for a plain answer). An `error` event,
or a chat-style `{"error": ...}` chunk from a gateway, raises StreamError; a stream that stops
before a terminal event is cut (StreamError "cut"), retried like any transient failure.

The terminal event's response is the answer. A server whose terminal response lists no output
(some gateways send only the deltas' sum) gets one assembled from the text and reasoning deltas.

`to_events` goes the other way, a whole response into the events OpenAI sends for it: the
built-in endpoint streams with it.
"""

from __future__ import annotations

import json
from typing import Any

from ..redact import Redactor
from .stream import StreamError, pieces, raise_if_error, shown

__all__ = ["ResponsesFold", "to_events", "TERMINAL"]

TERMINAL = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}
_SNAPSHOTS = ("response.created", "response.in_progress", *TERMINAL.values())
_REASONING_DELTAS = ("response.reasoning_summary_text.delta", "response.reasoning_text.delta")
_MESSAGE_CAP = 500


class ResponsesFold:
    """Typed events into the response; complete once a terminal event arrived."""

    ending = "response.completed, response.incomplete or response.failed"

    def __init__(self) -> None:
        self.ended = False
        self._response: dict[str, Any] = {}  # the latest whole response an event carried
        self._texts: list[str] = []  # output_text deltas, in order
        self._thoughts: list[str] = []  # reasoning (summary) deltas, in order

    @property
    def complete(self) -> bool:
        return self.ended

    def take(self, event: dict[str, Any], redactor: Redactor) -> None:
        raise_if_error(event, redactor)  # a gateway's chat-style error chunk
        kind = event.get("type")
        if kind == "error":
            message, code = event.get("message") or "(no message)", event.get("code")
            raise StreamError(f"error in the stream: {redactor.cut(shown(message), _MESSAGE_CAP)}", reason="error_chunk",
                              code=redactor.cut(shown(code), _MESSAGE_CAP) if code is not None else None)
        if kind in _SNAPSHOTS and isinstance(event.get("response"), dict):
            self._response = event["response"]
            self.ended = kind in TERMINAL.values()
        elif kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            self._texts.append(event["delta"])
        elif kind in _REASONING_DELTAS and isinstance(event.get("delta"), str):
            self._thoughts.append(event["delta"])

    def result(self) -> dict[str, Any]:
        body = dict(self._response)
        if not body.get("output") and (self._texts or self._thoughts):
            output: list[dict[str, Any]] = []
            if self._thoughts:
                output.append({"type": "reasoning", "id": "rs_stream", "summary": [
                    {"type": "summary_text", "text": "".join(self._thoughts)}]})
            if self._texts:
                output.append({"type": "message", "id": "msg_stream", "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": "".join(self._texts), "annotations": []}]})
            body["output"] = output
        return body


def to_events(response: dict[str, Any], *, piece_chars: int = 24, max_pieces: int = 64) -> list[bytes]:
    """A whole response as the SSE events OpenAI streams it with (each `event:` and `data:` lines
    with their blank line): created, in progress, each output item with its deltas, the terminal
    event. No `[DONE]`: the Responses API's stream ends with its terminal event."""
    out: list[bytes] = []

    def event(kind: str, **fields: Any) -> None:
        data = json.dumps({"type": kind, **fields, "sequence_number": len(out)}, ensure_ascii=False)
        out.append(f"event: {kind}\ndata: {data}\n\n".encode())

    start = {**{k: v for k, v in response.items() if k != "usage"}, "status": "in_progress", "output": [],
             "incomplete_details": None, "error": None, "completed_at": None}
    event("response.created", response=start)
    event("response.in_progress", response=start)
    for index, item in enumerate(response.get("output") or []):
        at = {"item_id": item.get("id", ""), "output_index": index}
        if item.get("type") == "reasoning":
            event("response.output_item.added", output_index=index, item={**item, "summary": []})
            for n, part in enumerate(item.get("summary") or []):
                event("response.reasoning_summary_part.added", **at, summary_index=n, part={**part, "text": ""})
                for piece in pieces(part["text"], piece_chars, max_pieces):
                    event("response.reasoning_summary_text.delta", **at, summary_index=n, delta=piece)
                event("response.reasoning_summary_text.done", **at, summary_index=n, text=part["text"])
                event("response.reasoning_summary_part.done", **at, summary_index=n, part=part)
        elif item.get("type") == "message":
            event("response.output_item.added", output_index=index, item={**item, "content": [], "status": "in_progress"})
            for n, part in enumerate(item.get("content") or []):
                event("response.content_part.added", **at, content_index=n, part={**part, "text": ""})
                for piece in pieces(part["text"], piece_chars, max_pieces):
                    event("response.output_text.delta", **at, content_index=n, delta=piece, logprobs=[])
                event("response.output_text.done", **at, content_index=n, text=part["text"], logprobs=[])
                event("response.content_part.done", **at, content_index=n, part=part)
        event("response.output_item.done", output_index=index, item=item)
    event(TERMINAL.get(str(response.get("status")), "response.completed"), response=response)
    return out
