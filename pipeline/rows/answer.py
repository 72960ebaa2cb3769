"""The answer: a chat-completion response body turned into the row's result fields.

Reasoning arrives three ways (see ../shared/notes/api-facts.md): a `<think>...</think>` block in
`content` (sometimes only the closing tag, when the template opened it), `reasoning_content`,
or `reasoning`. A response with `finish_reason == "length"` and no answer after the reasoning
is a truncated answer, not an empty one.

A body comes from a server that may be broken or hostile: `parse_response` raises nothing but
RequestError(kind="invalid_response"), whatever JSON value it is given (a content part whose
`text` is null is skipped; content parts without any text are no answer). A paid answer whose
bytes are not valid UTF-8 is kept (pipeline.net.text reads it, bad bytes replaced and counted).

Usage details are kept as the provider reports them: `prompt_tokens_details.cached_tokens`,
`.image_tokens`, `.audio_tokens` and `completion_tokens_details.reasoning_tokens`. A detail that
is missing, null, or not a count (a string, a bool, a negative number, a details value that is
not an object) is None: unknown, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError

__all__ = ["Answer", "parse_response", "split_think"]

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
    # Usage details, each None when the provider did not say (many servers send none of them).
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    image_tokens: int | None = None
    audio_tokens: int | None = None


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


def _count(value: Any) -> int | None:
    """A token count: an int (not a bool) that is not negative; anything else is not one."""
    number = _int(value)
    return number if number is not None and number >= 0 else None


def _details(usage: dict[str, Any], key: str) -> dict[str, Any]:
    details = usage.get(key)
    return details if isinstance(details, dict) else {}  # OpenAI-compatible servers often send null


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
    prompt_details = _details(usage, "prompt_tokens_details")
    return Answer(
        answer=answer,
        reasoning=reasoning,
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        total_tokens=_int(usage.get("total_tokens")),
        model=body.get("model") if isinstance(body.get("model"), str) else None,
        finish_reason=finish if isinstance(finish, str) else None,
        cached_tokens=_count(prompt_details.get("cached_tokens")),
        reasoning_tokens=_count(_details(usage, "completion_tokens_details").get("reasoning_tokens")),
        image_tokens=_count(prompt_details.get("image_tokens")),
        audio_tokens=_count(prompt_details.get("audio_tokens")),
    )
