"""The Responses API's request: a row as the body of POST /v1/responses (OpenAI's published shape).

    shape = ResponsesBody(job, labels)
    body = shape.body(prompt, parts)      # parts: media.py's chat parts, here as input items

    {"model": ..., "instructions": system_prompt,
     "input": [{"role": "user", "content": [{"type": "input_text", "text": prompt},
                                            {"type": "input_image", "image_url": URL or data URI,
                                             "detail": "auto"}, ...]}],
     "max_output_tokens": ..., "text": {"format": {"type": "json_schema", ...}},   # with [labels]
     "stream": true, **other [request] keys (reasoning = {effort, summary}, temperature, ...)}

The same rows as chat: media.py makes the image parts (files confined, images checked and
resized as for chat) and they are restated as input items; `detail` is required by the
description, so "auto" stands in when [request] image_detail is unset. The Responses API takes
no video or audio input: a job asking for them is refused when it is read (config/job.py).
The answer's side is answer.py (`parse_response(body, Api.RESPONSES)`), the stream's
net/events.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import Job
from ..errors import InputError

if TYPE_CHECKING:
    from .labels import Labels

__all__ = ["ResponsesBody", "input_content"]


class ResponsesBody:
    """The body of one row's POST /v1/responses; everything but the row's own parts made once."""

    def __init__(self, job: Job, labels: Labels | None) -> None:
        req = job.request
        self.model = job.endpoint.model
        self.detail = req.image_detail or "auto"
        self._head: dict[str, Any] = {"instructions": req.system_prompt} if req.system_prompt else {}
        self._tail: dict[str, Any] = {}
        if req.max_tokens is not None:
            self._tail["max_output_tokens"] = req.max_tokens
        if req.stream:  # usage arrives whole in the response.completed event: nothing to ask for
            self._tail["stream"] = True
        self._tail.update(req.params)  # reasoning = {effort, summary} and the rest, as they are
        if labels is not None:
            chat = labels.response_format()["json_schema"]
            text = self._tail.get("text") if isinstance(self._tail.get("text"), dict) else {}
            self._tail["text"] = {**text, "format": {"type": "json_schema", **chat}}

    def body(self, prompt: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        content = [{"type": "input_text", "text": prompt}, *input_content(parts, self.detail)]
        return {"model": self.model, **self._head, "input": [{"role": "user", "content": content}], **self._tail}


def input_content(parts: list[dict[str, Any]], detail: str) -> list[dict[str, Any]]:
    """Chat media parts as the Responses API's input items (images only: it takes no video or audio)."""
    items = []
    for part in parts:
        image = part.get("image_url") if part.get("type") == "image_url" else None
        if not isinstance(image, dict):
            raise InputError(f"the Responses API takes images only, not a {part.get('type')!r} part; "
                             f'use [endpoint] api = "chat"')
        items.append({"type": "input_image", "image_url": image["url"], "detail": image.get("detail") or detail})
    return items
