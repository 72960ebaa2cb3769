"""The request: a manifest row turned into the chat-completion body the seed shows.

    {"model": ..., "messages": [{"role": "system", "content": ...},
        {"role": "user", "content": [{"type": "text", "text": prompt},
                                     {"type": "image_url", "image_url": {"url": ...}}]}],
     "max_tokens": ..., **other [request] keys}

Prompts may hold `{column}` placeholders filled from the row; other braces (JSON examples in a
prompt) are left alone.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .config import Job
from .errors import InputError, JobError
from .media import ImageSource, image_values

__all__ = ["RequestBuilder", "placeholders"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


class RequestBuilder:
    def __init__(self, job: Job, columns: list[str]) -> None:
        self.job = job
        self.images = ImageSource.for_manifest(job.input.path)
        req = job.request
        if req.prompt is not None:
            missing = [p for p in placeholders(req.prompt) if p not in columns]
            if missing:
                raise JobError(
                    f"{job.source}: [request] prompt: placeholder {{{missing[0]}}} is not a manifest column "
                    f"(columns: {', '.join(columns)})"
                )
        self._head: list[dict[str, Any]] = []
        if req.system_prompt:
            self._head.append({"role": "system", "content": req.system_prompt})
        self._tail: dict[str, Any] = {}
        if req.max_tokens is not None:
            self._tail["max_tokens"] = req.max_tokens
        if req.stream:  # usage comes only when asked for, in a last chunk (pipeline.stream)
            self._tail["stream"] = True
            self._tail["stream_options"] = {"include_usage": True}
        if job.labels is not None and job.labels.send_response_format:
            from .labels import Labels

            self._tail["response_format"] = Labels(job.labels).response_format()
        self._tail.update(req.params)

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

    def image_urls(self, row: dict[str, Any]) -> list[str]:
        """Blocking (reads local files): the runner calls it in a thread when files are involved."""
        col = self.job.input.image_column
        if col is None:
            return []
        values = image_values(row.get(col))
        if not values:
            raise InputError(f"row has no image in {col!r}")
        return [self.images.resolve(v) for v in values]

    def needs_files(self, row: dict[str, Any]) -> bool:
        """True when building this row reads local files (so it belongs off the event loop)."""
        col = self.job.input.image_column
        if col is None:
            return False
        try:
            return any(self.images.is_local(v) for v in image_values(row.get(col)))
        except InputError:
            return False

    def body(self, prompt: str, urls: list[str]) -> dict[str, Any]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        detail = self.job.request.image_detail
        for url in urls:
            image: dict[str, Any] = {"url": url}
            if detail:
                image["detail"] = detail
            parts.append({"type": "image_url", "image_url": image})
        return {
            "model": self.job.endpoint.model,
            "messages": [*self._head, {"role": "user", "content": parts}],
            **self._tail,
        }

    def encode(self, body: dict[str, Any]) -> bytes:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    return "" if value is None else str(value)
