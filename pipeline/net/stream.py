"""The stream: an answer sent as server-sent events, assembled into one response.

    asm = StreamAssembler()       # chat chunks; StreamAssembler(fold=ResponsesFold()): net/events.py
    for line in lines:            # bytes or str, one SSE line each (as aiohttp's reader yields)
        asm.feed(line)
        if asm.done:
            break
    body = asm.result()           # the shape a non-streamed answer has: parse_response(body)

Some models answer only as a stream (DashScope's QVQ family). The assembled body has the shape of
a non-streamed response (`choices[0].message` with `content` and the reasoning field the deltas
used, `usage`, `model`, `finish_reason`), so the output row is the same either way.

What the stream may hold (see ../shared/notes/api-facts.md):
- `data: {chunk}` lines, `data: [DONE]` at the end, `:` comment lines (keep-alives) to skip;
- deltas with `content` and `reasoning_content` or `reasoning`;
- with `stream_options: {"include_usage": true}` a last chunk whose `choices` is empty and which
  carries `usage`; a stream without it leaves the token counts unknown (None), never guessed;
- an error in the middle: `{"error": {...}}` (OpenAI) or `{"object": "error", ...}` (vLLM).

A stream is complete when `[DONE]` or a `finish_reason` arrived. Anything else (cut before both, an
error chunk, a chunk that is not JSON) raises StreamError; `pipeline.net.client.translate` turns it into
a retryable RequestError like any other transient failure. What a StreamError quotes of the stream is
scrubbed by the assembler's Redactor before it is cut (a provider may echo the key). Invalid UTF-8
in a line is decoded with U+FFFD and counted in `replaced` (the answer is kept, and flagged), and
`feed_bytes` splits lines in linear time; the caller bounds how many bytes it feeds.

The SSE framing is the assembler's; what the chunks mean is its `Fold`'s: `ChatFold` here, the
Responses API's typed events in events.py.

`to_sse` goes the other way, a full response into SSE lines: the built-in endpoint streams with it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Protocol

from ..redact import Redactor
from .text import decode_utf8, loads_json, text_warning

__all__ = ["StreamAssembler", "StreamError", "Fold", "ChatFold", "assemble", "to_sse", "shown", "pieces",
           "raise_if_error", "DONE"]

DONE = "[DONE]"
REASONING_KEYS = ("reasoning_content", "reasoning")
_MESSAGE_CAP = 500
_SNIPPET_CHARS = 80  # of a chunk quoted in an error


class StreamError(Exception):
    """A stream that cannot be used. `reason`: "cut", "error_chunk" or "not_json".

    Not a RequestError on purpose: foreign failures become RequestError only in client.translate.
    """

    def __init__(self, message: str, *, reason: str, code: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


class StreamAssembler:
    """Feeds SSE lines one at a time; `result()` is the assembled response body."""

    def __init__(self, redactor: Redactor | None = None, fold: Fold | None = None) -> None:
        self.done = False  # `data: [DONE]` (or the fold's own end) arrived: nothing more is read
        self.replaced = 0  # invalid UTF-8 bytes decoded as U+FFFD
        self.surrogates = 0  # escaped lone surrogates read as U+FFFD
        self._data: list[str] = []  # `data:` lines of the event being read (an event may span lines)
        self._tail: list[bytes] = []  # the pieces of a line not yet ended, from feed_bytes
        self._redactor = redactor or Redactor()
        self.fold: Fold = fold if fold is not None else ChatFold()

    # -- reading -------------------------------------------------------------------------

    def feed_bytes(self, data: bytes) -> None:
        """Raw bytes as they arrive, lines split here; stops at [DONE]. Each byte is copied a
        bounded number of times (a line's pieces are joined once, when its end arrives)."""
        end = data.find(b"\n")
        if end < 0:
            if data:
                self._tail.append(data)
            return
        first = b"".join([*self._tail, data[:end]]) if self._tail else data[:end]
        self._tail = []
        start = end + 1
        self.feed(first)
        while not self.done:
            end = data.find(b"\n", start)
            if end < 0:
                if start < len(data):
                    self._tail.append(data[start:])
                return
            self.feed(data[start:end])
            start = end + 1

    def feed(self, line: bytes | str) -> None:
        if isinstance(line, (bytes, bytearray)):
            text, bad = decode_utf8(line)
            self.replaced += bad
        else:
            text = line
        text = text.rstrip("\r\n")
        if not text:  # a blank line ends an event
            self._dispatch()
            return
        if text.startswith(":"):  # a comment: keep-alives, "OPENROUTER PROCESSING"
            return
        field, _, value = text.partition(":")
        if field != "data":  # event:, id:, retry: carry nothing we use
            return
        value = value[1:] if value.startswith(" ") else value
        if self._data and _is_json("\n".join(self._data)):
            self._dispatch()  # a server that leaves out the blank line between events
        self._data.append(value)
        if self._data[0].strip() == DONE:
            self._dispatch()

    def _dispatch(self) -> None:
        if not self._data:
            return
        data, self._data = "\n".join(self._data).strip(), []
        if self.done or not data:
            return
        if data == DONE:
            self.done = True
            return
        try:
            chunk, _, surrogates = loads_json(data)
        except ValueError:
            snippet = self._redactor.cut(data, _SNIPPET_CHARS)
            raise StreamError(f"stream chunk is not JSON: {snippet!r}", reason="not_json") from None
        self.surrogates += surrogates
        if not isinstance(chunk, dict):
            snippet = self._redactor.cut(shown(chunk), _SNIPPET_CHARS)
            raise StreamError(f"stream chunk is JSON but not an object: {snippet!r}", reason="not_json")
        self.fold.take(chunk, self._redactor)
        if self.fold.ended:
            self.done = True

    # -- the result ----------------------------------------------------------------------

    @property
    def warning(self) -> str | None:
        """What the row's `error` column says when the stream held bad text (None: it did not)."""
        return text_warning(self.replaced, self.surrogates)

    def result(self) -> dict[str, Any]:
        """The assembled body; raises StreamError when the stream stopped before its end."""
        if self._tail and not self.done:
            tail, self._tail = b"".join(self._tail), []
            self.feed(tail)
        self._dispatch()  # a last event without its blank line
        if not self.done and not self.fold.complete:
            raise StreamError(f"stream ended before {self.fold.ending} (cut off)", reason="cut")
        return self.fold.result()


class Fold(Protocol):
    """What a stream's chunks mean: chat completion chunks (ChatFold), or the Responses API's
    typed events (pipeline.net.events)."""

    @property
    def ended(self) -> bool:
        """The stream's own last event arrived: nothing more is read."""

    @property
    def complete(self) -> bool:
        """What arrived makes a usable answer, even if the stream stops now."""

    @property
    def ending(self) -> str:
        """What a complete stream ends with, for the "cut off" message."""

    def take(self, chunk: dict[str, Any], redactor: Redactor) -> None: ...

    def result(self) -> dict[str, Any]: ...


class ChatFold:
    """Chat completion chunks assembled into the body a non-streamed answer has."""

    ended = False  # `data: [DONE]` ends a chat stream, read by the assembler
    ending = "[DONE] or a finish_reason"

    def __init__(self) -> None:
        self._content: list[str] | None = None  # None: no content delta at all
        self._reasoning: dict[str, list[str]] = {}
        self._choice_seen = False
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._meta: dict[str, Any] = {}
        self._role = "assistant"

    @property
    def complete(self) -> bool:
        return self._finish is not None

    def take(self, chunk: dict[str, Any], redactor: Redactor) -> None:
        raise_if_error(chunk, redactor)
        for key in ("id", "created", "model", "object", "system_fingerprint", "service_tier"):
            if chunk.get(key) is not None and key not in self._meta:
                self._meta[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):  # OpenAI sends "usage": null on other chunks
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 is not used by the pipeline: only the first choice counts
            self._choice_seen = True
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            if isinstance(delta.get("role"), str):
                self._role = delta["role"]
            content = delta.get("content")
            if isinstance(content, str):
                (self._content if self._content is not None else self._start_content()).append(content)
            for key in REASONING_KEYS:
                if isinstance(delta.get(key), str):
                    self._reasoning.setdefault(key, []).append(delta[key])
            if isinstance(choice.get("finish_reason"), str):
                self._finish = choice["finish_reason"]

    def _start_content(self) -> list[str]:
        self._content = []
        return self._content

    def result(self) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        if self._choice_seen:
            message: dict[str, Any] = {
                "role": self._role,
                "content": "".join(self._content) if self._content is not None else None,
            }
            for key, parts in self._reasoning.items():
                message[key] = "".join(parts)
            choices.append({"index": 0, "finish_reason": self._finish, "message": message})
        return {**self._meta, "object": "chat.completion", "choices": choices, "usage": self._usage}


def raise_if_error(chunk: dict[str, Any], redactor: Redactor) -> None:
    err = chunk.get("error")
    if chunk.get("object") == "error":  # vLLM: {"object": "error", "message": ..., "code": 500}
        err = chunk
    if not err:
        return
    if isinstance(err, dict):
        message = err.get("message") or err
        code = err.get("code") if err.get("code") is not None else err.get("type")
    else:
        message, code = err, None
    raise StreamError(f"error in the stream: {redactor.cut(shown(message), _MESSAGE_CAP)}", reason="error_chunk",
                      code=redactor.cut(shown(code), _MESSAGE_CAP) if code is not None else None)


def shown(value: Any) -> str:
    """A JSON value as text for a message; str() of a hostile, deeply nested one would recurse too far."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError):
        return f"(a {type(value).__name__} too deeply nested to show)"


def _is_json(text: str) -> bool:
    try:
        loads_json(text)
    except ValueError:
        return False
    return True


def assemble(lines: Iterable[bytes | str], fold: Fold | None = None) -> dict[str, Any]:
    """A whole stream's lines into a response body (pure; raises StreamError)."""
    asm = StreamAssembler(fold=fold)
    for line in lines:
        asm.feed(line)
        if asm.done:
            break
    return asm.result()


def to_sse(
    response: dict[str, Any],
    *,
    include_usage: bool = True,
    piece_chars: int = 24,
    max_pieces: int = 64,
) -> list[bytes]:
    """A non-streamed response body as SSE lines, the way OpenAI-compatible servers stream it:
    a role chunk, reasoning deltas, content deltas, a finish chunk, a usage chunk, `[DONE]`.
    Each element is one `data: ...` event with its blank line."""
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    base = {k: response.get(k) for k in ("id", "created", "model", "system_fingerprint") if k in response}
    base["object"] = "chat.completion.chunk"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}, ensure_ascii=False).encode() + b"\n\n"

    def delta(d: dict[str, Any], finish: str | None = None) -> bytes:
        return event([{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}])

    out: list[bytes] = []
    if response.get("choices"):
        out.append(delta({"role": message.get("role") or "assistant", "content": ""}))
        for key in REASONING_KEYS:
            text = message.get(key)
            if isinstance(text, str) and text:
                out += [delta({key: p}) for p in pieces(text, piece_chars, max_pieces)]
        content = message.get("content")
        if isinstance(content, str):
            out += [delta({"content": p}) for p in pieces(content, piece_chars, max_pieces)]
        out.append(delta({}, choice.get("finish_reason")))
    if include_usage and isinstance(response.get("usage"), dict):
        out.append(event([], usage=response["usage"]))
    out.append(b"data: " + DONE.encode() + b"\n\n")
    return out


def pieces(text: str, size: int, most: int) -> list[str]:
    size = max(size, -(-len(text) // most))  # a long answer: bigger pieces, not thousands of events
    return [text[i:i + size] for i in range(0, len(text), size)]
