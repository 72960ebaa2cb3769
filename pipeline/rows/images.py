"""Images: what a value's bytes are, and the data URI that is sent for them.

    mime = sniff_mime(data)                        # by content, whatever the name or Content-Type says
    mime, out = prepare_image(data, value, cfg)    # decoded, upright, downscaled, re-encoded if changed
    uri, size = local_image(files, value, cfg)     # a pool job: read, prepare, encode, check the size

Local files and data URIs are checked to be images by their bytes and by decoding them (a text
file named .png is refused, so is a truncated JPEG), then sent as data URIs. With `max_side`/
`max_pixels` set, images are also rotated by their EXIF orientation, downscaled and re-encoded
(JPEG, or PNG when there is transparency); without, their bytes go as they are. Videos are
recognised by their container's signature, never decoded. Sizes are checked on the base64 text
before anything is sent; a source (a local file, a data: URI on its declared length) is capped
before it is read or decoded: what could never be sent is refused early.

Image bytes held in the manifest (a Blob) and objects read from a bucket are prepared as fetched
bytes are (`bytes_image`, `video_uri`). The pool jobs (`local_image`, `data_uri_image`, `bytes_image`, `video_uri`, `local_video`) are
blocking, top-level functions: media.py hands them to the worker pool (workers.py), whose
processes import them by this module's path. Every refusal is an InputError (kind "input") naming the cause and the value.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from PIL import Image

from ..config import ImagesConfig
from ..errors import InputError
from .files import LocalFiles
from .values import Blob, Value, show

__all__ = [
    "MB",
    "check_blob",
    "sniff_mime",
    "sniff_video",
    "b64_size",
    "data_uri_size",
    "source_cap",
    "check_data_uri",
    "parse_data_uri",
    "prepare_image",
    "local_image",
    "data_uri_image",
    "bytes_image",
    "video_uri",
    "local_video",
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


def source_cap(cfg: ImagesConfig, *, video: bool = False) -> tuple[int, str]:
    """(cap on a source's bytes, the setting that sets it, as a refusal explains it) for an image
    or video, a local file or a data: URI alike: what could never be sent is refused before it is
    read or decoded. An image that may shrink (`preprocess`) and a video get the source cap; an
    image sent as it is must fit the per-image limit once in base64."""
    if video or cfg.preprocess:
        return int(cfg.max_source_mb * MB), f"over [images] max_source_mb = {cfg.max_source_mb:g}"
    return int(cfg.max_image_mb * MB) * 3 // 4, (
        f"over {cfg.max_image_mb:g} MB as base64, the per-image limit [images] max_image_mb; "
        f"set [images] max_side to downscale it")


def check_data_uri(value: str, cfg: ImagesConfig, *, video: bool = False) -> None:
    """InputError when a data: URI declares more bytes than it may hold; checked on its length,
    before it is decoded (or handed to a worker process)."""
    cap, why = source_cap(cfg, video=video)
    size = data_uri_size(value)
    if size > cap:
        what = "video" if video else "image"
        raise InputError(f"data: URI {what} too large ({size} bytes once decoded; {why}): {show(value)}")


def check_blob(value: Blob, cfg: ImagesConfig, *, video: bool = False) -> None:
    """InputError when bytes held in the manifest are more than may be sent; checked before they
    are copied to a worker."""
    cap, why = source_cap(cfg, video=video)
    if len(value.data) > cap:
        raise InputError(f"{'video' if video else 'image'} bytes too large ({len(value.data)} bytes; {why}): {show(value)}")


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



# -- decode, check, rotate, downscale, re-encode (blocking: run in the pool) ----------------


def prepare_image(
    data: bytes, value: Value, cfg: ImagesConfig, *, jpeg: bool = False, declared: str | None = None
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
        img: Image.Image = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[mime]])
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


def _image_uri(mime: str, data: bytes, value: Value, cfg: ImagesConfig) -> tuple[str, int]:
    limit = int(cfg.max_image_mb * MB)
    size = b64_size(len(data))
    if size > limit:
        hint = "" if cfg.preprocess else "; set [images] max_side to downscale it"
        raise InputError(
            f"image too large ({size / MB:.1f} MB as base64, over the {cfg.max_image_mb:g} MB per-image limit "
            f"[images] max_image_mb{hint}): {show(value)}"
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", size


def local_image(files: LocalFiles, value: str, cfg: ImagesConfig, jpeg: bool = False) -> tuple[str, int]:
    """(data URI, its length) for a local image file, read beneath the roots up to its cap."""
    cap, why = source_cap(cfg)
    data = files.read(value, cap, "image", why)
    mime, out = prepare_image(data, value, cfg, jpeg=jpeg)
    return _image_uri(mime, out, value, cfg)


def data_uri_image(value: str, cfg: ImagesConfig, jpeg: bool = False) -> tuple[str, int]:
    """(data URI, its length) for an image given as a data: URI, checked and maybe downscaled."""
    _, data = parse_data_uri(value, cfg)
    mime, out = prepare_image(data, value, cfg, jpeg=jpeg)
    return _image_uri(mime, out, value, cfg)


def bytes_image(data: bytes, value: Value, cfg: ImagesConfig, declared: str | None, jpeg: bool = False) -> tuple[str, int]:
    """(data URI, its length) for an image's bytes (fetched, read from a bucket, or held in the
    manifest: `value` names them); `declared` is a server's Content-Type."""
    mime, out = prepare_image(data, value, cfg, jpeg=jpeg, declared=declared)
    return _image_uri(mime, out, value, cfg)


def video_uri(data: bytes, value: Value, declared: str | None = None) -> tuple[str, int]:
    """(data URI, its length) for a video's bytes, refused unless they are a known container."""
    mime = sniff_video(data)
    if mime is None:
        said = f"; the server said Content-Type {declared}" if declared else ""
        raise InputError(f"not a video (MP4, MOV, WebM, MKV, AVI, MPEG) by its content{said}: {show(value)}")
    text = base64.b64encode(data).decode("ascii")
    return f"data:{mime};base64,{text}", len(text)


def local_video(files: LocalFiles, value: str, cfg: ImagesConfig) -> tuple[str, int]:
    """(data URI, its length) for a local video file, read beneath the roots up to the source cap."""
    cap, why = source_cap(cfg, video=True)
    data = files.read(value, cap, "video", why)
    return video_uri(data, value)
