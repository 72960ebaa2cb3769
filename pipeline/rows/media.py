"""Media: turn a row's image and video cells into the content parts of its user message.

    media = MediaBuilder(job.input, job.images, detail=job.request.image_detail)
    parts = await media.parts(row)      # [{"type": "image_url", ...}, {"type": "video_url", ...}]
    await media.aclose()

Values (values.py). An image cell holds URLs, data URIs, object-store URIs, local paths or image
bytes (a binary cell, HF's Image struct), one or a list; a video cell holds one video (URL, data
URI, object URI, local file, bytes) or a list of frame images, sent as `video_frames_format` says:
  "vllm":      {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64,<f1>,<f2>,..."}}
  "dashscope": {"type": "video", "video": [frame URL or data URI, ...]}

What is sent. A URL goes as it is (`image_mode = "url"`) or is fetched here and inlined
(`"inline"`, fetch.py). An object URI (objects.py: confined to the allowed buckets) is read with
the job's credentials and inlined, or with `"presign"` goes as a presigned https URL the provider
fetches. Local files (read by files.py, only beneath the allowed roots), data URIs and bytes held
in the manifest become checked, possibly downscaled data URIs (images.py). A data: URI or a blob
is checked on its length before it is decoded or handed to a worker; the request's total is
checked on the base64 text against `max_request_mb` before anything is sent.

Workers. Reading, decoding, resizing and base64 run in the job's worker pool (workers.py:
low-priority processes or threads), never on the event loop, so a batch of large images does
not stall the requests in flight; the builder awaits them, a row's values concurrently.

Every refusal is an InputError (kind "input") naming the cause and the value.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, TypeVar

from ..config import AudioConfig, ImagesConfig, InputConfig
from ..config.proxy import ProxyChoice
from ..errors import InputError
from .audio import AudioBuilder
from .files import LocalFiles
from .images import (
    MB,
    bytes_image,
    check_blob,
    check_data_uri,
    data_uri_image,
    local_image,
    local_video,
    source_cap,
    video_uri,
)
from .objects import ObjectStore, object_roots
from .values import Blob, Value, image_values, is_list_cell, kind_of, show
from .workers import Workers

if TYPE_CHECKING:
    from ..redact import Redactor
    from .fetch import Fetcher  # aiohttp: imported only when a job fetches images

__all__ = ["MediaBuilder"]

T = TypeVar("T")


class MediaBuilder:
    """Builds a row's media parts. Owns the worker pool and, when needed, the fetcher."""

    def __init__(self, inp: InputConfig, cfg: ImagesConfig, *, detail: str | None = None,
                 redactor: Redactor | None = None, files_base: Path | None = None,
                 proxies: ProxyChoice | None = None, presign_s: float | None = None,
                 audio: AudioConfig | None = None) -> None:
        self.inp = inp
        self.proxies = proxies  # which proxy each fetched URL goes through (none: all directly)
        self.cfg = cfg
        self.detail = detail
        self.redactor = redactor  # an image host's error text may echo a secret, too
        self.files = LocalFiles.for_manifest(inp.path, cfg.allowed_roots, base=files_base or inp.local_base)
        self.workers = Workers(cfg)
        self.objects = ObjectStore(inp.storage_options, object_roots(cfg.allowed_buckets, inp.path),
                                   threads=cfg.fetch_concurrency, timeout_s=cfg.fetch_timeout_s, redactor=redactor)
        self.presign_s = cfg.presign_expiry_s if presign_s is None else presign_s  # a presigned URL's validity
        self._fetcher: Fetcher | None = None
        self.audio = AudioBuilder(inp.audio_column, audio or AudioConfig(), self, cfg.max_source_mb) if inp.audio_column else None

    @property
    def fetcher(self) -> Fetcher:
        if self._fetcher is None:
            from .fetch import Fetcher

            c = self.cfg
            self._fetcher = Fetcher(
                concurrency=c.fetch_concurrency,
                timeout_s=c.fetch_timeout_s,
                max_bytes=int(c.max_source_mb * MB),
                retries=c.fetch_retries,
                max_redirects=c.max_redirects,
                block_private=c.block_private_addresses,
                redactor=self.redactor,
                proxies=self.proxies,
            )
        return self._fetcher

    async def aclose(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()
        self.objects.close()
        self.workers.close()

    async def parts(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's image parts in order, then its video part, then its audio (audio.py). Raises InputError."""
        audio = await self.audio.parts(row) if self.audio is not None else []
        image_col, video_col = self.inp.image_column, self.inp.video_column
        images = image_values(row.get(image_col)) if image_col else []
        video_cell = row.get(video_col) if video_col else None
        has_video = bool(image_values(video_cell)) if video_col else False
        if image_col and not images and not has_video:
            where = f"{image_col!r}" + (f" or {video_col!r}" if video_col else "")
            raise InputError(f"row has no image in {where}")
        if video_col and not image_col and not has_video:
            raise InputError(f"row has no video in {video_col!r}")
        if not has_video and self.cfg.image_mode != "inline" and all(kind_of(v) == "url" for v in images):
            return [self._image_part(v) for v in images] + [part for part, _ in audio]  # URLs: nothing to read
        jobs: list[Awaitable[tuple[dict[str, Any], int]]] = [self._image(v) for v in images]
        if has_video:
            jobs.append(self._video(video_cell))
        results = await _all_in_order(jobs) + audio
        total = sum(size for _, size in results)
        if total > self.cfg.max_request_mb * MB:
            values = images + (image_values(video_cell) if has_video else [])
            raise InputError(
                f"request too large ({total / MB:.1f} MB of images/video/audio as base64, over the "
                f"{self.cfg.max_request_mb:g} MB per-request limit [images] max_request_mb): "
                + ", ".join(show(v) for v in values[:5]) + (" ..." if len(values) > 5 else "")
            )
        return [part for part, _ in results]

    def _image_part(self, url: Value) -> dict[str, Any]:
        image: dict[str, Any] = {"url": url}
        if self.detail:
            image["detail"] = self.detail
        return {"type": "image_url", "image_url": image}

    async def _image(self, value: Value) -> tuple[dict[str, Any], int]:
        url, size = await self._image_url(value, jpeg=False, fetch_urls=self.cfg.image_mode == "inline")
        return self._image_part(url), size

    async def _image_url(self, value: Value, *, jpeg: bool, fetch_urls: bool) -> tuple[str, int]:
        """(URL or data URI, its base64 size) for one image value. `fetch_urls`: inline what a URL
        names (else it goes as it is, an object URI presigned under image_mode "presign")."""
        kind = kind_of(value)
        if isinstance(value, Blob):
            check_blob(value, self.cfg)  # a huge blob is refused here, not copied to a worker first
            return await self.workers.run(value, bytes_image, value.data, value, self.cfg, None, jpeg)
        if kind == "url":
            if not fetch_urls:
                return value, 0  # the provider fetches it; its size is not ours to know
            got = await self.fetcher.fetch(value)
            return await self.workers.run(value, bytes_image, got.data, value, self.cfg, got.content_type, jpeg)
        if kind == "object":
            if not fetch_urls and self.cfg.image_mode == "presign":
                return await self.objects.presign(value, self.presign_s), 0  # the provider fetches it
            cap, why = source_cap(self.cfg)
            data = await self.objects.read(value, cap, why)
            return await self.workers.run(value, bytes_image, data, value, self.cfg, None, jpeg)
        if kind == "data":
            check_data_uri(value, self.cfg)  # a huge one is refused here, not copied to a worker first
            return await self.workers.run(value, data_uri_image, value, self.cfg, jpeg)
        return await self.workers.run(value, local_image, self.files, value, self.cfg, jpeg)

    async def _video(self, cell: Any) -> tuple[dict[str, Any], int]:
        values = image_values(cell)
        if is_list_cell(cell):
            return await self._frames(values)
        value = values[0]
        kind = kind_of(value)
        if isinstance(value, Blob):
            check_blob(value, self.cfg, video=True)
            url, size = await self.workers.run(value, video_uri, value.data, value)
        elif kind == "url":
            if self.cfg.image_mode != "inline":
                return _video_part(value), 0
            got = await self.fetcher.fetch(value)
            url, size = await self.workers.run(value, video_uri, got.data, value, got.content_type)
        elif kind == "object":
            if self.cfg.image_mode == "presign":
                return _video_part(await self.objects.presign(value, self.presign_s)), 0
            cap, why = source_cap(self.cfg, video=True)
            data = await self.objects.read(value, cap, why)
            url, size = await self.workers.run(value, video_uri, data, value)
        elif kind == "data":
            if not value.lower().startswith("data:video/"):
                raise InputError(f"a data: URI in the video column must be data:video/...: {show(value)}")
            check_data_uri(value, self.cfg, video=True)  # capped like a local video file, on its length
            url, size = value, len(value)
        else:
            url, size = await self.workers.run(value, local_video, self.files, value, self.cfg)
        return _video_part(url), size

    async def _frames(self, values: list[Value]) -> tuple[dict[str, Any], int]:
        if self.cfg.video_frames_format == "dashscope":
            fetch = self.cfg.image_mode == "inline"
            got = await _all_in_order([self._image_url(v, jpeg=False, fetch_urls=fetch) for v in values])
            return {"type": "video", "video": [u for u, _ in got]}, sum(s for _, s in got)
        # vLLM takes frames only inline, as JPEG joined by commas: remote frames are fetched.
        got = await _all_in_order([self._image_url(v, jpeg=True, fetch_urls=True) for v in values])
        payload = ",".join(u.partition(",")[2] for u, _ in got)
        return _video_part("data:video/jpeg;base64," + payload), len(payload)


async def _all_in_order(jobs: list[Awaitable[T]]) -> list[T]:
    """Run concurrently; on failure raise the first one in the row's order (a stable message)."""
    if len(jobs) == 1:  # the common row: no tasks to make
        return [await jobs[0]]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def _video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}
