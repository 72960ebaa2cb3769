"""What the built-in endpoint hears: audio parts (`input_audio` with base64 and a format, or vLLM's
`audio_url` with a data: URI) decoded with libsndfile, so an answer can say what arrived (format,
length, sample rate, channels) and tests can prove the bytes arrived whole. A URL is not fetched
(the endpoint has no network); bytes that do not decode are said to be so, as a model would.
Usage: 10 prompt tokens per second of audio (OpenAI counts about one per 100 ms), reported as
`prompt_tokens_details.audio_tokens`.

    clip = Audio.of_part(part)     # None: not an audio part
    text, seconds = clip.heard()
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any, NamedTuple

__all__ = ["Audio", "TOKENS_PER_SECOND"]

TOKENS_PER_SECOND = 10


class Audio(NamedTuple):
    """An audio part: its bytes (and the format the request named), or a URL it could not fetch."""

    data: bytes | None
    declared: str  # input_audio's `format`, or a data: URI's MIME type
    url: str | None = None

    @classmethod
    def of_part(cls, part: dict[str, Any]) -> Audio | None:
        kind = part.get("type")
        if kind == "input_audio":
            inner = part.get("input_audio") or {}
            return cls(_b64(inner.get("data")), str(inner.get("format")))
        if kind == "audio_url":
            url = str((part.get("audio_url") or {}).get("url") or "")
            if not url.startswith("data:"):
                return cls(None, "", url)
            head, _, payload = url.partition(",")
            return cls(_b64(payload), head[5:].split(";")[0])
        return None

    def heard(self) -> tuple[str, float]:
        """(what the endpoint says of the clip, its seconds: 0 when unknown)."""
        if self.url is not None:
            return f"an audio clip at {self.url[:200]} (not fetched: the built-in endpoint has no network)", 0.0
        if self.data is None:
            return f"an audio clip ({self.declared}) whose base64 is invalid", 0.0
        try:
            import soundfile

            info = soundfile.info(io.BytesIO(self.data))
        except Exception as exc:  # a broken clip is an answer too
            return f"an audio clip ({self.declared}, {len(self.data)} bytes) that could not be decoded ({type(exc).__name__})", 0.0
        return (f"an audio clip: {info.format} ({info.subtype}), {info.duration:.2f} s, {info.samplerate} Hz, "
                f"{info.channels} channel(s), {info.frames} frames", float(info.duration))

    def tokens(self) -> int:
        return math.ceil(self.heard()[1] * TOKENS_PER_SECOND)


def _b64(text: Any) -> bytes | None:
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        return None
