"""The request: a manifest row turned into the body the job's API takes: the chat completion the
seed shows (here), or the Responses API's (responses.py, `[endpoint] api = "responses"`).

    {"model": ..., "messages": [{"role": "system", "content": ...},
        {"role": "user", "content": [{"type": "text", "text": prompt},
                                     {"type": "image_url", "image_url": {"url": ...}}, ...,
                                     {"type": "video_url", "video_url": {"url": ...}}]}],
     "max_tokens": ..., **other [request] keys}

    built = await builder.build(row)      # Built(prompt, media count, body bytes, cache key bytes); InputError
    await builder.aclose()

Prompts may hold `{column}` placeholders filled from the row; other braces (JSON examples in a
prompt) are left alone. The image and video parts come from media.py (files read, images
fetched and resized off the event loop).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from ..config import Api, Job
from ..errors import InputError, JobError
from ..redact import Redactor
from .media import MediaBuilder
from .responses import ResponsesBody
from .objects import Signed

if TYPE_CHECKING:
    from .labels import Labels

__all__ = ["RequestBuilder", "Built", "ChatBody", "placeholders", "request_columns"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENCODE_OFF_LOOP_BYTES = 1 << 20  # bodies with more inlined media than this are JSON-encoded in a thread


class Built(NamedTuple):
    prompt: str
    media: int  # image, video and audio parts, for the token estimate
    body: bytes
    cache_body: bytes  # what the request cache keys on: `body` with presigned URLs as their object URIs


def placeholders(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


def request_columns(job: Job, columns: list[str]) -> list[str]:
    """The manifest columns a request is built from (media, prompt, the prompt's placeholders), in
    the manifest's order: the only cells read into Python per row."""
    inp = job.input
    wanted = {c for c in (inp.image_column, inp.prompt_column, inp.video_column, inp.audio_column) if c}
    wanted.update(placeholders(job.request.prompt or ""))
    return [c for c in columns if c in wanted]


class RequestBuilder:
    def __init__(self, job: Job, columns: list[str], *, redactor: Redactor | None = None,
                 labels: Labels | None = None) -> None:
        self.job = job
        # A presigned URL outlives every attempt of its row (they share one body) by presign_expiry_s.
        presign_s = job.images.presign_expiry_s + job.limits.timeout_s * job.limits.max_attempts
        self.media = MediaBuilder(job.input, job.images, detail=job.request.image_detail, redactor=redactor,
                                  files_base=job.files_base, proxies=job.proxies(), presign_s=presign_s,
                                  audio=job.audio)
        req = job.request
        if req.prompt is not None:
            missing = [p for p in placeholders(req.prompt) if p not in columns]
            if missing:
                raise JobError(
                    f"{job.source}: [request] prompt: placeholder {{{missing[0]}}} is not a manifest column "
                    f"(columns: {', '.join(columns)})"
                )
        sent_format: Labels | None = None  # the labels whose schema goes with each request
        if job.labels is not None and job.labels.send_response_format:
            if labels is None:  # a tool without the run's compiled checker (the dry run)
                from .labels import Labels

                labels = Labels(job.labels)
            sent_format = labels
        self.shape = ResponsesBody(job, sent_format) if job.endpoint.api is Api.RESPONSES else ChatBody(job, sent_format)

    def prompt(self, row: dict[str, Any]) -> str:
        col = self.job.input.prompt_column
        if col is not None:
            value = row.get(col)
            if value is not None and str(value).strip():
                return str(value)
            if self.job.request.prompt is None:
                raise InputError(f"row has an empty {col!r} and [request] has no prompt to fall back on")
        template = self.job.request.prompt or ""
        return _PLACEHOLDER.sub(lambda m: _cell(row, m.group(1)), template)

    async def build(self, row: dict[str, Any]) -> Built:
        """The row's request body. Raises InputError for a row that cannot be sent."""
        prompt = self.prompt(row)
        parts = await self.media.parts(row)
        body = self.body(prompt, parts)
        if sum(_url_chars(p) for p in parts) > ENCODE_OFF_LOOP_BYTES:
            encoded = await asyncio.to_thread(self.encode, body)  # megabytes of base64: not on the loop
        else:
            encoded = self.encode(body)
        return Built(prompt, len(parts), encoded, _unsigned(encoded, parts))

    async def aclose(self) -> None:
        await self.media.aclose()

    def body(self, prompt: str, media: list[dict[str, Any]]) -> dict[str, Any]:
        """`media`: the row's image/video/audio parts (from media.py), after the text, in order."""
        return self.shape.body(prompt, media)

    def encode(self, body: dict[str, Any]) -> bytes:
        return orjson.dumps(body)  # compact UTF-8, as json.dumps(ensure_ascii=False) but ~10x faster


class ChatBody:
    """The body of one row's chat completion; everything but the row's own parts made once."""

    def __init__(self, job: Job, labels: Labels | None) -> None:
        req = job.request
        self.model = job.endpoint.model
        self._head: list[dict[str, Any]] = []
        if req.system_prompt:
            self._head.append({"role": "system", "content": req.system_prompt})
        self._tail: dict[str, Any] = {}
        if req.max_tokens is not None:
            self._tail["max_tokens"] = req.max_tokens
        if req.stream:  # usage comes only when asked for, in a last chunk (pipeline.net.stream)
            self._tail["stream"] = True
            self._tail["stream_options"] = {"include_usage": True}
        if labels is not None:
            self._tail["response_format"] = labels.response_format()
        self._tail.update(req.params)

    def body(self, prompt: str, media: list[dict[str, Any]]) -> dict[str, Any]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}, *media]
        return {"model": self.model, "messages": [*self._head, {"role": "user", "content": parts}], **self._tail}


def _unsigned(encoded: bytes, parts: list[dict[str, Any]]) -> bytes:
    """The encoded body with each presigned URL replaced by its object URI (a presigned URL is
    percent-encoded: its JSON text is the URL itself)."""
    for part in parts:
        inner = part.get(part.get("type", ""))
        urls = inner if isinstance(inner, list) else [inner.get("url")] if isinstance(inner, dict) else []
        for url in urls:
            if isinstance(url, Signed):
                encoded = encoded.replace(url.encode(), url.source.encode())
    return encoded


def _url_chars(part: dict[str, Any]) -> int:
    inner = part.get(part.get("type", ""))
    if isinstance(inner, dict):
        return len(inner.get("url", ""))
    if isinstance(inner, list):  # DashScope's {"type": "video", "video": [frames]}
        return sum(len(u) for u in inner)
    return 0


def _cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    return "" if value is None else str(value)
