"""Images: turn a manifest cell into what goes into an `image_url` part.

An http(s) URL or a `data:` URI goes as it is; a local path is read, checked to be an image by
its bytes (not its name), confined to the allowed roots (symlinks followed) and sent as a data
URI with its real MIME type. Every refusal is an InputError naming the cause and the value.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["ImageSource", "image_values", "sniff_mime"]

# Magic numbers of the formats vision endpoints take (OpenAI: PNG, JPEG, WEBP, GIF).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
MAX_IMAGE_BYTES_B64 = 20 * 1024 * 1024  # OpenAI's per-image cap, counted on the base64 text


def sniff_mime(data: bytes) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_values(cell: Any) -> list[str]:
    """A cell as a list of image values: a string, a list, or a JSON array held in a CSV cell."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return [str(v) for v in cell if v is not None and str(v).strip()]
    text = str(cell).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            raise InputError(f"image cell is not a valid JSON list: {text[:80]!r}") from None
        return image_values(values)
    return [text]


@dataclass(frozen=True)
class ImageSource:
    """Resolves image values for one job. `roots` bound which local files may be read."""

    base: Path  # the manifest's folder: relative paths resolve here
    roots: tuple[Path, ...]
    max_b64_bytes: int = MAX_IMAGE_BYTES_B64

    @classmethod
    def for_manifest(cls, manifest: Path, extra_roots: tuple[Path, ...] = ()) -> "ImageSource":
        base = manifest.resolve().parent
        return cls(base=base, roots=(base, *(r.resolve() for r in extra_roots)))

    def is_local(self, value: str) -> bool:
        return not value.startswith(("http://", "https://", "data:"))

    def resolve(self, value: str) -> str:
        """The URL to send. Blocking for local files: call it off the event loop."""
        if not self.is_local(value):
            return value
        if "://" in value:
            raise InputError(f"unsupported image URL scheme (use http, https, data: or a local path): {value[:200]!r}")
        path = self._confined(value)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise InputError(f"image file not found: {value!r}") from None
        if size * 4 / 3 > self.max_b64_bytes:
            raise InputError(f"image too large ({size} bytes, over {self.max_b64_bytes} as base64): {value!r}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InputError(f"cannot read image ({exc.strerror}): {value!r}") from None
        mime = sniff_mime(data)
        if mime is None:
            raise InputError(f"not an image (PNG, JPEG, WEBP or GIF) by its content: {value!r}")
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    def _confined(self, value: str) -> Path:
        candidate = Path(value)
        if not candidate.is_absolute():
            candidate = self.base / candidate
        real = Path(os.path.realpath(candidate))  # follows symlinks: a link out of the root is refused
        if not any(real == root or root in real.parents for root in self.roots):
            raise InputError(f"image path is outside the allowed roots ({', '.join(map(str, self.roots))}): {value!r}")
        return real
