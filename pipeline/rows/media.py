"""Media: turn a row's image and video cells into the content parts of its user message.

    media = MediaBuilder(job.input, job.images, detail=job.request.image_detail)
    parts = await media.parts(row)      # [{"type": "image_url", ...}, {"type": "video_url", ...}]
    await media.aclose()

Values. An image value is an http(s) URL, a `data:` URI or a local path; a cell holds one value,
a list (JSONL, Parquet) or a JSON array (CSV). A video cell holds one video (URL, data URI, local
file) or a list of frame images, sent as `video_frames_format` says:
  "vllm":      {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64,<f1>,<f2>,..."}}
  "dashscope": {"type": "video", "video": [frame URL or data URI, ...]}

What is sent. A URL goes as it is (`image_mode = "url"`) or is fetched here and inlined
(`"inline"`, see fetch.py). Local files and data URIs are checked to be images by their bytes and
by decoding them (a text file named .png is refused, so is a truncated JPEG), then sent as data
URIs. With `max_side`/`max_pixels` set, images are also rotated by their EXIF orientation,
downscaled and re-encoded (JPEG, or PNG when there is transparency); without, their bytes go as
they are. Sizes are checked on the base64 text before anything is sent; a data: URI is checked
on its declared length (caps as for a local file) before it is decoded or handed to a worker.

Safety. A local path is read only beneath the allowed roots (the manifest's folder and
`[images] allowed_roots`), and only if it is a regular file. It is opened by walking down from
the root's directory descriptor with O_NOFOLLOW, resolving symlinks here (a link within the roots
works, one out of them is refused), so no swap between a check and the open can lead out; the
type and size are checked on the opened descriptor. A path outside the roots is never opened.

Workers. Reading, decoding, resizing and base64 run in a pool of low-priority worker processes
(`pool = "process"`, the default) or threads (`"thread"`), never on the event loop, so a batch
of large images does not stall the requests in flight. Worker processes die with the process
that started them, even when it is killed with -9 (lifeline.py).

Every refusal is an InputError (kind "input") naming the cause and the value.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import math
import multiprocessing
import os
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from PIL import Image

from ..config import ImagesConfig, InputConfig
from ..errors import InputError
from ..lifeline import start_worker
from .files import LocalFiles
from .values import image_values, is_list_cell, kind_of, show

if TYPE_CHECKING:
    from ..redact import Redactor
    from .fetch import Fetcher  # aiohttp: imported only when a job fetches images

__all__ = [
    "MediaBuilder",
    "sniff_mime",
    "sniff_video",
    "prepare_image",
    "check_data_uri",
    "data_uri_size",
    "parse_data_uri",
    "b64_size",
    "MB",
]

MB = 1024 * 1024

# Magic numbers of the formats vision endpoints take (OpenAI: PNG, JPEG, WEBP, GIF).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
_PIL_FORMAT = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
# ISO base media brands that are still images, not video (HEIF, AVIF).
_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"})
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# What a broken image raises inside Pillow (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError)

T = TypeVar("T")


def sniff_mime(data: bytes) -> str | None:
    """The image type the bytes really are, whatever the file name or Content-Type says."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def sniff_video(data: bytes) -> str | None:
    """The video container the bytes are (by signature; video is not decoded here)."""
    if data[4:8] == b"ftyp" and len(data) >= 12:
        brand = data[8:12]
        if brand in _IMAGE_BRANDS:
            return None
        return "video/quicktime" if brand == b"qt  " else "video/mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "video/x-msvideo"
    if data[:4] == b"\x00\x00\x01\xba":
        return "video/mpeg"
    if len(data) > 376 and data[0] == data[188] == data[376] == 0x47:
        return "video/mp2t"
    return None


def b64_size(n: int) -> int:
    """Length of the base64 text of n bytes: what the provider limits are counted on."""
    return 4 * ((n + 2) // 3)


def data_uri_size(value: str) -> int:
    """The bytes a base64 `data:` URI declares, from its length alone (nothing copied or decoded)."""
    comma = value.find(",")
    if comma < 0 or not value[:comma].endswith(";base64"):
        raise InputError(f"data: URI must be base64 (data:<type>;base64,<data>): {show(value)}")
    length = len(value) - comma - 1
    padding = 2 if value.endswith("==") else 1 if value.endswith("=") else 0
    return max(0, length * 3 // 4 - padding)


def _data_uri_cap(cfg: ImagesConfig, video: bool) -> tuple[int, str]:
    """(cap on the decoded bytes, the setting that sets it) for an image or video data: URI,
    as for a local file: what could never be sent is refused before it is decoded."""
    if video or cfg.preprocess:
        return int(cfg.max_source_mb * MB), f"over [images] max_source_mb = {cfg.max_source_mb:g}"
    return int(cfg.max_image_mb * MB) * 3 // 4, (
        f"over {cfg.max_image_mb:g} MB as base64, the per-image limit [images] max_image_mb; "
        f"set [images] max_side to downscale it")


def check_data_uri(value: str, cfg: ImagesConfig, *, video: bool = False) -> None:
    """InputError when a data: URI declares more bytes than it may hold; checked on its length,
    before it is decoded (or handed to a worker process)."""
    cap, why = _data_uri_cap(cfg, video)
    size = data_uri_size(value)
    if size > cap:
        what = "video" if video else "image"
        raise InputError(f"data: URI {what} too large ({size} bytes once decoded; {why}): {show(value)}")


def parse_data_uri(value: str, cfg: ImagesConfig | None = None) -> tuple[str, bytes]:
    """(declared MIME type, bytes) of a base64 `data:` URI; with `cfg`, its size is checked first."""
    if cfg is not None:
        check_data_uri(value, cfg)
    else:
        data_uri_size(value)  # the shape: data:<type>;base64,<data>
    head, _, payload = value.partition(",")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"data: URI holds invalid base64: {show(value)}") from None
    return head[5:].split(";")[0].lower(), data



# -- images: decode, check, rotate, downscale, re-encode (blocking: run in the pool) ----------


def prepare_image(
    data: bytes, value: str, cfg: ImagesConfig, *, jpeg: bool = False, declared: str | None = None
) -> tuple[str, bytes]:
    """(MIME type, bytes) to send for an image's bytes. Raises InputError.

    The bytes must be an image by their content and must decode. With `cfg.preprocess` the image
    is turned upright by its EXIF orientation and downscaled within max_side/max_pixels, and
    re-encoded only when that changed it; `jpeg` forces JPEG (video frames for vLLM).
    `declared` is a server's Content-Type, only to explain a refusal.
    """
    mime = sniff_mime(data)
    if mime is None:
        said = f"; the server said Content-Type {declared}" if declared else ""
        raise InputError(f"not an image (PNG, JPEG, WEBP or GIF) by its content{said}: {show(value)}")
    try:
        img = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[mime]])
        w, h = img.size
        if w < 1 or h < 1:
            raise InputError(f"image has no pixels ({w}x{h}): {show(value)}")
        ratio = max(w, h) / min(w, h)
        if ratio > cfg.max_aspect_ratio:
            raise InputError(
                f"image aspect ratio {w}x{h} ({ratio:.0f}:1) is beyond the {cfg.max_aspect_ratio:g}:1 limit "
                f"([images] max_aspect_ratio): {show(value)}"
            )
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise InputError(f"image too large to decode safely ({w}x{h} pixels): {show(value)}")
        orientation = _orientation(img) if cfg.preprocess else 1
        target = _target_size(w, h, cfg) if cfg.preprocess else (w, h)
        if target == (w, h) and orientation not in _TRANSPOSE and not (jpeg and mime != "image/jpeg"):
            _check_decodes(img, mime)
            return mime, data  # nothing to change: the bytes go as they are
        if mime == "image/jpeg" and target != (w, h):
            img.draft(img.mode, target)  # decode at 1/2, 1/4 or 1/8 scale: much less work
        img.load()
        img = _normalised(img, keep_alpha=not jpeg)
        if img.size != target:
            # Bicubic, as Qwen-VL's own image processor; a third cheaper than Lanczos on 2 cores.
            img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        out = io.BytesIO()
        if img.mode in ("RGBA", "LA"):
            img.save(out, "PNG", compress_level=6)
            return "image/png", out.getvalue()
        img.save(out, "JPEG", quality=cfg.jpeg_quality)  # no EXIF copied: no second rotation
        return "image/jpeg", out.getvalue()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"image too large to decode safely (too many pixels): {show(value)}") from None
    except _DECODE_ERRORS as exc:
        raise InputError(f"unreadable or truncated image ({type(exc).__name__}: {exc}): {show(value)}") from None


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:
        return 1  # broken EXIF: leave the image as it is stored
    return value if isinstance(value, int) else 1


def _target_size(w: int, h: int, cfg: ImagesConfig) -> tuple[int, int]:
    """Within max_side and max_pixels, aspect kept; never enlarged."""
    scale = 1.0
    if cfg.max_side > 0:
        scale = min(scale, cfg.max_side / max(w, h))
    if cfg.max_pixels > 0:
        scale = min(scale, math.sqrt(cfg.max_pixels / (w * h)))
    if scale >= 1.0:
        return w, h
    # Floor (with a hair of slack for float error) so the bounds hold after rounding.
    return max(1, int(w * scale + 1e-6)), max(1, int(h * scale + 1e-6))


def _check_decodes(img: Image.Image, mime: str) -> None:
    """Decode the whole image once, so a truncated or corrupt file is refused, not sent."""
    if mime == "image/jpeg":
        w, h = img.size
        img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))  # every byte is still read
    img.load()


def _normalised(img: Image.Image, *, keep_alpha: bool) -> Image.Image:
    """RGB or L, or RGBA when there is real transparency and it is to be kept."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema() == (255, 255):
            return rgba.convert("RGB")  # an alpha channel with nothing transparent: JPEG is fine
        if keep_alpha:
            return rgba
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("RGB", "L"):
        return img
    return img.convert("RGB")


def _image_uri(mime: str, data: bytes, value: str, cfg: ImagesConfig) -> tuple[str, int]:
    limit = int(cfg.max_image_mb * MB)
    size = b64_size(len(data))
    if size > limit:
        hint = "" if cfg.preprocess else "; set [images] max_side to downscale it"
        raise InputError(
            f"image too large ({size / MB:.1f} MB as base64, over the {cfg.max_image_mb:g} MB per-image limit "
            f"[images] max_image_mb{hint}): {show(value)}"
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", size


def _local_image_bytes(files: LocalFiles, value: str, cfg: ImagesConfig) -> bytes:
    if cfg.preprocess:  # the file may shrink: read up to the source cap
        cap = int(cfg.max_source_mb * MB)
        why = f"over [images] max_source_mb = {cfg.max_source_mb:g}"
    else:  # sent as it is: refuse before reading what could never be sent
        cap = int(cfg.max_image_mb * MB) * 3 // 4
        why = (f"over {cfg.max_image_mb:g} MB as base64, the per-image limit [images] max_image_mb; "
               f"set [images] max_side to downscale it")
    return files.read(value, cap, "image", why)


def local_image(files: LocalFiles, value: str, cfg: ImagesConfig, jpeg: bool = False) -> tuple[str, int]:
    data = _local_image_bytes(files, value, cfg)
    mime, out = prepare_image(data, value, cfg, jpeg=jpeg)
    return _image_uri(mime, out, value, cfg)


def data_uri_image(value: str, cfg: ImagesConfig, jpeg: bool = False) -> tuple[str, int]:
    _, data = parse_data_uri(value, cfg)
    mime, out = prepare_image(data, value, cfg, jpeg=jpeg)
    return _image_uri(mime, out, value, cfg)


def bytes_image(data: bytes, value: str, cfg: ImagesConfig, declared: str | None, jpeg: bool = False) -> tuple[str, int]:
    mime, out = prepare_image(data, value, cfg, jpeg=jpeg, declared=declared)
    return _image_uri(mime, out, value, cfg)


def _video_uri(data: bytes, value: str, declared: str | None = None) -> tuple[str, int]:
    mime = sniff_video(data)
    if mime is None:
        said = f"; the server said Content-Type {declared}" if declared else ""
        raise InputError(f"not a video (MP4, MOV, WebM, MKV, AVI, MPEG) by its content{said}: {show(value)}")
    text = base64.b64encode(data).decode("ascii")
    return f"data:{mime};base64,{text}", len(text)


def local_video(files: LocalFiles, value: str, cfg: ImagesConfig) -> tuple[str, int]:
    cap = int(cfg.max_source_mb * MB)
    data = files.read(value, cap, "video", f"over [images] max_source_mb = {cfg.max_source_mb:g}")
    return _video_uri(data, value)


# -- the async side ------------------------------------------------------------------------

WORKER_NICE = 10  # image worker processes yield the CPU to the process that runs the requests


def _make_pool(cfg: ImagesConfig) -> Executor:
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.pool == "thread":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeline-media")
    # Worker processes share no GIL with the event loop and run at a lower CPU priority, so a
    # batch of large images cannot delay requests in flight (threads measured 100-300 ms stalls
    # on 2 cores where processes stayed far lower: bench/images.py). "spawn": never fork a process
    # that runs threads and an event loop. Processes start on first use: a URL-only job starts none.
    # The initializer lives in a module that imports nothing heavy, so a new worker lowers its
    # priority before it imports the pipeline (a second of CPU that must not compete with the loop),
    # and ties itself to this process: a run killed with -9 leaves no worker behind (lifeline.py).
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_worker,
        initargs=(os.getpid(), WORKER_NICE),
    )


class MediaBuilder:
    """Builds a row's media parts. Owns the thread pool and, when needed, the fetcher."""

    def __init__(self, inp: InputConfig, cfg: ImagesConfig, *, detail: str | None = None,
                 redactor: Redactor | None = None) -> None:
        self.inp = inp
        self.cfg = cfg
        self.detail = detail
        self.redactor = redactor  # an image host's error text may echo a secret, too
        self.files = LocalFiles.for_manifest(inp.path, cfg.allowed_roots)
        self._pool = _make_pool(cfg)
        self._fetcher: Fetcher | None = None

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
            )
        return self._fetcher

    async def aclose(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def parts(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's image parts in order, then its video part. Raises InputError."""
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
            return [self._image_part(v) for v in images]  # sent as they are: nothing to read or wait for
        jobs: list[Awaitable[tuple[dict[str, Any], int]]] = [self._image(v) for v in images]
        if has_video:
            jobs.append(self._video(video_cell))
        results = await _all_in_order(jobs)
        total = sum(size for _, size in results)
        if total > self.cfg.max_request_mb * MB:
            values = images + (image_values(video_cell) if has_video else [])
            raise InputError(
                f"request too large ({total / MB:.1f} MB of images/video as base64, over the "
                f"{self.cfg.max_request_mb:g} MB per-request limit [images] max_request_mb): "
                + ", ".join(show(v) for v in values[:5]) + (" ..." if len(values) > 5 else "")
            )
        return [part for part, _ in results]

    async def _run(self, value: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the pool. A worker process that dies (killed, out of memory) takes the
        pool with it: the pool is replaced and the call tried once more before the row fails."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, functools.partial(fn, *args))
            except BrokenExecutor:
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = _make_pool(self.cfg)
                if attempt == 2:
                    raise InputError(
                        f"the image worker process died while preparing this value (out of memory? if you call "
                        f"pipeline.run from a script, put the call under `if __name__ == \"__main__\":`): {show(value)}"
                    ) from None
        raise AssertionError("unreachable")

    def _image_part(self, url: str) -> dict[str, Any]:
        image: dict[str, Any] = {"url": url}
        if self.detail:
            image["detail"] = self.detail
        return {"type": "image_url", "image_url": image}

    async def _image(self, value: str) -> tuple[dict[str, Any], int]:
        url, size = await self._image_url(value, jpeg=False, fetch_urls=self.cfg.image_mode == "inline")
        return self._image_part(url), size

    async def _image_url(self, value: str, *, jpeg: bool, fetch_urls: bool) -> tuple[str, int]:
        """(URL or data URI, its base64 size) for one image value."""
        kind = kind_of(value)
        if kind == "url":
            if not fetch_urls:
                return value, 0  # the provider fetches it; its size is not ours to know
            got = await self.fetcher.fetch(value)
            return await self._run(value, bytes_image, got.data, value, self.cfg, got.content_type, jpeg)
        if kind == "data":
            check_data_uri(value, self.cfg)  # a huge one is refused here, not copied to a worker first
            return await self._run(value, data_uri_image, value, self.cfg, jpeg)
        return await self._run(value, local_image, self.files, value, self.cfg, jpeg)

    async def _video(self, cell: Any) -> tuple[dict[str, Any], int]:
        values = image_values(cell)
        if is_list_cell(cell):
            return await self._frames(values)
        value = values[0]
        kind = kind_of(value)
        if kind == "url":
            if self.cfg.image_mode != "inline":
                return _video_part(value), 0
            got = await self.fetcher.fetch(value)
            url, size = await self._run(value, _video_uri, got.data, value, got.content_type)
        elif kind == "data":
            if not value.lower().startswith("data:video/"):
                raise InputError(f"a data: URI in the video column must be data:video/...: {show(value)}")
            check_data_uri(value, self.cfg, video=True)  # capped like a local video file, on its length
            url, size = value, len(value)
        else:
            url, size = await self._run(value, local_video, self.files, value, self.cfg)
        return _video_part(url), size

    async def _frames(self, values: list[str]) -> tuple[dict[str, Any], int]:
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
