"""The answer: a response body (a chat completion, or the Responses API's response) turned into
the row's result fields.

    answer = parse_response(body)                   # chat: choices[0].message
    answer = parse_response(body, Api.RESPONSES)    # responses: the output items

Reasoning arrives three ways (see ../shared/notes/api-facts.md): a `<think>...</think>` block in
`content` (sometimes only the closing tag, when the template opened it), `reasoning_content`,
or `reasoning`. A response with `finish_reason == "length"` and no answer after the reasoning
is a truncated answer, not an empty one.

A body comes from a server that may be broken or hostile: `parse_response` raises nothing but
RequestError(kind="invalid_response"), whatever JSON value it is given (a content part whose
`text` is null is skipped; content parts without any text are no answer). A paid answer whose
bytes are not valid UTF-8 is kept (pipeline.net.text reads it, bad bytes replaced and counted).

A refusal is a paid, final answer, not a broken one: chat's `message.refusal` (or a content part of
type "refusal"), the Responses API's `refusal` content parts, and a content filter that withheld
the whole answer (finish_reason or incomplete reason "content_filter", no text) give an Answer
whose `answer` is None and whose `refusal` holds the model's words (`withheld` says so for the row).
Usage is read by itself (`usage_of`), never raising, so an attempt is costed before its answer is
judged: an unusable answer that reports usage was still paid for.

The Responses API's answer is the `output_text` of its `message` items, its reasoning the
`summary_text` of its `reasoning` items (or their `reasoning_text` content, as open models'
servers send it; a reasoning item holding only `encrypted_content` has no readable text);
`status` "completed" is finish_reason "stop", "incomplete" its `incomplete_details.reason`
("max_output_tokens": truncated, like chat's "length"), "failed" a RequestError by its code.
Usage: `input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`,
`output_tokens_details.reasoning_tokens` (and image or audio token details where a server adds them).

Usage details are kept as the provider reports them: `prompt_tokens_details.cached_tokens`,
`.image_tokens`, `.audio_tokens` and `completion_tokens_details.reasoning_tokens`. A detail that
is missing, null, or not a count (a string, a bool, a negative number, a details value that is
not an object) is None: unknown, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..config import Api
from ..errors import RequestError

__all__ = ["Answer", "Usage", "parse_response", "usage_of", "withheld", "split_think", "TRUNCATED", "FILTERED"]

_OPEN, _CLOSE = "<think>", "</think>"
TRUNCATED = frozenset({"length", "max_output_tokens"})  # finish reasons of an answer cut by its token cap
FILTERED = frozenset({"content_filter"})  # finish reasons of an answer a content filter withheld
# A failed response's error code -> the kind of failure (anything else: the request is at fault).
_FAILED_KINDS = {"server_error": "server", "rate_limit_exceeded": "rate_limit", "vector_store_timeout": "timeout"}
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
    refusal: str | None = None  # the model's refusal, as it worded it (chat's message.refusal, "refusal" parts)

    @property
    def truncated(self) -> bool:
        """Cut off by the token cap (chat's "length", the Responses API's "max_output_tokens")."""
        return self.finish_reason in TRUNCATED

    @property
    def refused(self) -> bool:
        """No answer because the model refused, or a content filter withheld it: final and paid."""
        return self.answer is None and (self.refusal is not None or self.finish_reason in FILTERED)


class Usage(NamedTuple):
    """What a response says was used (each None when it did not say): enough to cost it."""

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    image_tokens: int | None = None
    audio_tokens: int | None = None


def withheld(answer: Answer) -> tuple[str, str] | None:
    """(error_kind, error) of a paid answer that holds nothing to use but is final: cut by the
    token cap before the answer began, or refused (the refusal's own words kept as the error).
    None when there is an answer, or when there is none and no reason either (invalid_response)."""
    if answer.answer is not None:
        return None
    if answer.truncated:
        return "truncated", f"cut off by max_tokens before the answer began (finish_reason: {answer.finish_reason})"
    if answer.refusal is not None:
        return "refusal", answer.refusal.strip() or "the model refused without saying why"
    if answer.finish_reason in FILTERED:
        return "refusal", f"the provider's content filter withheld the answer (finish_reason: {answer.finish_reason})"
    return None


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


def _refusal(message: dict[str, Any]) -> str | None:
    """Chat's refusal: `message.refusal`, or the `refusal` of content parts of type "refusal"."""
    if isinstance(message.get("refusal"), str):
        return message["refusal"]
    parts = _typed_texts(message.get("content"), "refusal", "refusal")
    return "".join(parts) if parts else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    """A token count: an int (not a bool) that is not negative; anything else is not one."""
    number = _int(value)
    return number if number is not None and number >= 0 else None


def _details(usage: dict[str, Any], key: str) -> dict[str, Any]:
    details = usage.get(key)
    return details if isinstance(details, dict) else {}  # OpenAI-compatible servers often send null


def parse_response(body: Any, api: Api = Api.CHAT, usage: Usage | None = None) -> Answer:
    """Parse a decoded response body; an unusable one raises RequestError(kind=invalid_response).
    `usage`: the body's, where the caller read it already (`usage_of`: it costs the attempt first)."""
    usage = usage or usage_of(body, api)
    if api is Api.RESPONSES:
        return _parse_responses(body, usage)
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
    finish = choice.get("finish_reason")
    refusal = _refusal(message) if not answer else None  # a gateway may send content "" beside it
    return Answer(None if refusal is not None else answer, reasoning, finish_reason=finish if isinstance(finish, str) else None,
                  refusal=refusal, **usage._asdict())


def usage_of(body: Any, api: Api = Api.CHAT) -> Usage:
    """The usage a decoded response body reports, whatever else it holds (never raises)."""
    if not isinstance(body, dict):
        return Usage()
    model = body.get("model") if isinstance(body.get("model"), str) else None
    usage = _details(body, "usage")
    if api is Api.RESPONSES:
        inputs = _details(usage, "input_tokens_details")
        return Usage(model, _int(usage.get("input_tokens")), _int(usage.get("output_tokens")),
                     _int(usage.get("total_tokens")), _count(inputs.get("cached_tokens")),
                     _count(_details(usage, "output_tokens_details").get("reasoning_tokens")),
                     _count(inputs.get("image_tokens")), _count(inputs.get("audio_tokens")))
    prompt_details = _details(usage, "prompt_tokens_details")
    return Usage(model, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")),
                 _int(usage.get("total_tokens")), _count(prompt_details.get("cached_tokens")),
                 _count(_details(usage, "completion_tokens_details").get("reasoning_tokens")),
                 _count(prompt_details.get("image_tokens")), _count(prompt_details.get("audio_tokens")))


def _parse_responses(body: Any, usage: Usage) -> Answer:
    if not isinstance(body, dict):
        raise RequestError("response is JSON but not an object", kind="invalid_response")
    status = body.get("status")
    if status == "failed":
        raise _failed(body.get("error"))
    if status not in ("completed", "incomplete", None):  # None: a server that leaves status out
        raise RequestError(f"response is not finished (status {str(status)[:40]!r})", kind="invalid_response")
    output = body.get("output")
    if not isinstance(output, list):
        raise RequestError("response has no output", kind="invalid_response")
    texts: list[str] = []
    thoughts: list[str] = []
    refusals: list[str] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            texts += _typed_texts(item.get("content"), "output_text")
            refusals += _typed_texts(item.get("content"), "refusal", "refusal")
        elif item.get("type") == "reasoning":
            thoughts += _typed_texts(item.get("summary"), "summary_text") or _typed_texts(item.get("content"), "reasoning_text")
    answer, reasoning = split_think("".join(texts)) if texts else (None, None)
    if thoughts and "".join(thoughts).strip():
        reasoning = "\n\n".join(t.strip() for t in thoughts if t.strip())
    details = body.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    finish = "stop" if status != "incomplete" else reason if isinstance(reason, str) else "incomplete"
    refusal = "".join(refusals) if refusals and not answer else None
    return Answer(None if refusal is not None else answer, reasoning, finish_reason=finish, refusal=refusal,
                  **usage._asdict())


def _typed_texts(parts: Any, kind: str, key: str = "text") -> list[str]:
    """The string `key`s (`text`s) of the parts of type `kind` in a list (anything else: none)."""
    if not isinstance(parts, list):
        return []
    return [p[key] for p in parts if isinstance(p, dict) and p.get("type") == kind and isinstance(p.get(key), str)]


def _failed(error: Any) -> RequestError:
    """A response whose status is "failed": its error, by code (a server error is retried)."""
    error = error if isinstance(error, dict) else {}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else "the response failed"
    return RequestError(f"the response failed: {message[:500]}", kind=_FAILED_KINDS.get(code or "", "bad_request"),
                        code=code)
