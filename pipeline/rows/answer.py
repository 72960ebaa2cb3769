"""The answer: a chat-completion response body turned into the row's result fields.

Reasoning arrives three ways (see ../shared/notes/api-facts.md): a `<think>...</think>` block in
`content` (sometimes only the closing tag, when the template opened it), `reasoning_content`,
or `reasoning`. A response with `finish_reason == "length"` and no answer after the reasoning
is a truncated answer, not an empty one.

A body comes from a server that may be broken or hostile: `parse_response` raises nothing but
RequestError(kind="invalid_response"), whatever JSON value it is given (a content part whose
`text` is null is skipped; content parts without any text are no answer). A paid answer whose
bytes are not valid UTF-8 is kept: `loads_json` replaces the bad bytes (and escaped lone
surrogates, which no Parquet or journal line can hold) with U+FFFD and counts them, and
`text_warning` is what the row's `error` column then says (its status stays "ok").
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import RequestError

__all__ = ["Answer", "parse_response", "split_think", "decode_utf8", "loads_json", "text_warning"]

_OPEN, _CLOSE = "<think>", "</think>"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Answer:
    answer: str | None
    reasoning: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    model: str | None
    finish_reason: str | None


def split_think(content: str) -> tuple[str | None, str | None]:
    """(answer, reasoning) from content that may hold a think block. answer None: cut off."""
    close = content.find(_CLOSE)
    if close >= 0:
        head = content[:close]
        open_ = head.find(_OPEN)
        reasoning = head[open_ + len(_OPEN):] if open_ >= 0 else head
        return content[close + len(_CLOSE):].strip(), reasoning.strip() or None
    open_ = content.find(_OPEN)
    if open_ >= 0:  # thinking never finished: there is no answer
        return None, content[open_ + len(_OPEN):].strip() or None
    return content.strip(), None


def decode_utf8(raw: bytes | bytearray | memoryview) -> tuple[str, int]:
    """(text, number of invalid bytes) of UTF-8 bytes, each invalid sequence read as U+FFFD."""
    try:
        return codecs.utf_8_decode(raw, "strict", True)[0], 0
    except UnicodeDecodeError:
        pass
    view = memoryview(raw)
    parts: list[str] = []
    bad = 0
    pos = 0
    while True:  # decode up to the next bad sequence, again and again: linear in the length
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            return "".join(parts), bad
        except UnicodeDecodeError as exc:
            parts.append(codecs.utf_8_decode(view[pos : pos + exc.start], "strict", True)[0])
            parts.append("\ufffd")
            bad += exc.end - exc.start
            pos += exc.end


def loads_json(raw: bytes | bytearray | str) -> tuple[Any, int, int]:
    """(value, invalid UTF-8 bytes, lone surrogates) of a JSON document, both kinds of bad text
    read as U+FFFD. Raises ValueError (only) when it is not JSON, too deeply nested included."""
    try:
        return orjson.loads(raw), 0, 0  # the fast path: valid UTF-8, no lone surrogate
    except orjson.JSONDecodeError:
        pass
    text, bad = decode_utf8(raw) if not isinstance(raw, str) else (raw, 0)
    if bad:
        try:
            return orjson.loads(text), bad, 0
        except orjson.JSONDecodeError:
            pass
    try:
        value = json.loads(text)  # orjson refuses "\ud800"; the standard library reads it
    except (ValueError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    value, surrogates = _without_surrogates(value)
    if not (bad or surrogates):
        raise ValueError("not JSON")  # orjson's refusal was for something the standard library allows
    return value, bad, surrogates


def _without_surrogates(value: Any) -> tuple[Any, int]:
    """`value` with lone surrogates in its strings replaced, and how many (no recursion: a hostile
    document may be nested as deep as the standard library's parser allows)."""
    count = 0

    def clean(text: str) -> str:
        nonlocal count
        fixed, n = _SURROGATE.subn("\ufffd", text)
        count += n
        return fixed

    root = [value]
    stack: list[list[Any] | dict[Any, Any]] = [root]
    while stack:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for key, item in items:
            if isinstance(item, str):
                node[key] = clean(item)
            elif isinstance(item, (list, dict)):
                stack.append(item)
    return root[0], count


def text_warning(bad_bytes: int, surrogates: int = 0) -> str | None:
    """The warning an ok row carries in its `error` column when its answer held bad text; None if not."""
    if bad_bytes and not surrogates:
        return f"warning: the answer held invalid UTF-8; {bad_bytes} byte{'s' if bad_bytes != 1 else ''} replaced by U+FFFD"
    if surrogates:
        also = f" and {bad_bytes} bytes of invalid UTF-8" if bad_bytes else ""
        return f"warning: the answer held {surrogates} lone surrogate escape(s){also}; replaced by U+FFFD"
    return None


def _content_text(content: Any) -> str | None:
    """The text of `content`: a string, or a list of parts whose string `text`s are joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "".join(texts) if texts else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_response(body: Any) -> Answer:
    """Parse a decoded response body; an unusable one raises RequestError(kind=invalid_response)."""
    if not isinstance(body, dict):
        raise RequestError("response is JSON but not an object", kind="invalid_response")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RequestError("response has no choices", kind="invalid_response")
    choice = choices[0]
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        raise RequestError("response choice has no message object", kind="invalid_response")
    content = _content_text(message.get("content"))  # some servers return content parts
    answer, reasoning = split_think(content) if content is not None else (None, None)
    for key in ("reasoning_content", "reasoning"):
        field = message.get(key)
        if isinstance(field, str) and field.strip():
            reasoning = field.strip()
            break
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    finish = choice.get("finish_reason")
    return Answer(
        answer=answer,
        reasoning=reasoning,
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        total_tokens=_int(usage.get("total_tokens")),
        model=body.get("model") if isinstance(body.get("model"), str) else None,
        finish_reason=finish if isinstance(finish, str) else None,
    )
