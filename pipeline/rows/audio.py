"""Audio: a row's audio clips (`[input] audio_column`) as the content parts providers document.

    audio = AudioBuilder("clip", job.audio, media)    # media: the files, worker pool and fetcher it shares
    parts = await audio.parts(row)       # [(part, its base64 size), ...] in the cell's order

    "input_audio" (OpenAI, Qwen-Omni): {"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"|"mp3"}}
    "audio_url" (vLLM):                {"type": "audio_url", "audio_url": {"url": URL or data:audio/...;base64,...}}

A cell holds one value or a list (values.py), each a local file (read by files.py, only beneath
the allowed roots, `[images] allowed_roots` widening them as for images), an http(s) URL, a
data: URI, an object-store URI (objects.py: the image reader, confined to `[images]
allowed_buckets`; presigned for an `audio_url` part under `image_mode = "presign"`), or bytes held
in the manifest (a binary cell, a Hugging Face `Audio` struct's bytes). The format is told by the bytes (RIFF/WAVE, MP3 frames or ID3, fLaC, OggS), never the
name or a Content-Type; the clip's length is read with libsndfile (soundfile), and a clip longer
than `max_seconds` fails its row: clips are never split (a model would hear the pieces as one
recording, or a row would become several). With `convert` every clip is decoded and re-encoded
(mono, `sample_rate` by soxr); without, its bytes go as they are and a format the part does not
take fails the row, naming `convert`. A URL sent as an `audio_url` without `convert` goes as it
is (the provider fetches it: its length is not ours to know); `input_audio` takes base64 only, so
its URLs are fetched here (fetch.py, the [images] fetch settings).

Caps as images have them: a source is refused before it is read or decoded when it could never
be sent (over `max_audio_mb` once in base64, or with `convert` over `[images] max_source_mb`), the
clip is checked on its base64 text, and media.py counts it in the request's `max_request_mb`.
Reading, decoding and encoding run in the job's worker pool (workers.py), never on the event
loop: the pool jobs (`local_clip`, `data_uri_clip`, `bytes_clip`) are top-level functions the
worker processes import by this module's path. Every refusal is an InputError naming the cause
and the value: the row becomes an error row and the job goes on.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..config import AudioConfig, AudioFormat, AudioPart
from ..errors import InputError, JobError
from .files import LocalFiles
from .images import MB, b64_size, data_uri_size, parse_data_uri
from .values import Blob, Value, image_values, kind_of, show
from .workers import Workers

if TYPE_CHECKING:
    from ..config import ImagesConfig
    from .fetch import Fetcher
    from .objects import ObjectStore

__all__ = ["AudioBuilder", "Clip", "sniff_audio", "local_clip", "data_uri_clip", "bytes_clip", "clip_problem", "TAKES",
           "MIME"]

# What each part takes: OpenAI's description allows wav and mp3; vLLM decodes these four.
TAKES = {AudioPart.INPUT_AUDIO: ("wav", "mp3"), AudioPart.AUDIO_URL: ("wav", "mp3", "flac", "ogg")}
MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}
_SF_FORMAT = {AudioFormat.WAV: ("WAV", "PCM_16"), AudioFormat.MP3: ("MP3", "MPEG_LAYER_III")}
# What a broken clip raises inside libsndfile's binding (LibsndfileError is a RuntimeError).
_DECODE_ERRORS = (RuntimeError, ValueError, TypeError, EOFError, MemoryError, OSError)


class Clip(NamedTuple):
    """A clip ready to send: its format, its base64 text, its length in seconds."""

    format: str
    b64: str
    seconds: float


class MediaSource(Protocol):
    """Where values are read: the row's media builder (media.py) shares its own with audio."""

    files: LocalFiles
    workers: Workers
    objects: ObjectStore
    cfg: ImagesConfig
    presign_s: float

    @property
    def fetcher(self) -> Fetcher: ...


def sniff_audio(data: bytes) -> str | None:
    """The audio format the bytes are ("wav", "mp3", "flac", "ogg", or "m4a" which is not read here)."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE6 == 0xE2 and data[1] & 0x18 != 0x08):
        return "mp3"  # an ID3 tag, or an MPEG frame sync with layer III and a valid version
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[4:8] == b"ftyp" and data[8:11] in (b"M4A", b"M4B"):
        return "m4a"
    return None


def _source_cap(cfg: AudioConfig, images_source_mb: float) -> tuple[int, str]:
    """(cap on a source's bytes, why) before it is read or decoded: a clip sent as it is must fit
    max_audio_mb once in base64; one re-encoded may shrink, so the source cap applies."""
    if cfg.convert is not None:
        return int(images_source_mb * MB), f"over [images] max_source_mb = {images_source_mb:g}"
    return int(cfg.max_audio_mb * MB) * 3 // 4, f"over {cfg.max_audio_mb:g} MB as base64, the per-clip limit [audio] max_audio_mb"


def prepare_clip(data: bytes, value: Value, cfg: AudioConfig, declared: str | None = None) -> Clip:
    """The clip to send for these bytes: told by content, its length checked, re-encoded with
    `convert`. Raises InputError."""
    fmt = sniff_audio(data)
    if fmt is None:
        said = f"; the server said Content-Type {declared}" if declared else ""
        raise InputError(f"not audio (WAV, MP3, FLAC or OGG) by its content{said}: {show(value)}")
    if fmt == "m4a":
        raise InputError(f"AAC (m4a) audio cannot be decoded here (WAV, MP3, FLAC, OGG can); convert it beforehand: {show(value)}")
    import soundfile  # here: the worker processes import this module before they need it

    try:
        seconds = float(soundfile.info(io.BytesIO(data)).duration)
    except _DECODE_ERRORS as exc:
        raise InputError(f"unreadable or truncated {fmt} audio ({type(exc).__name__}: {exc}): {show(value)}") from None
    if seconds > cfg.max_seconds:
        raise InputError(f"audio clip is {seconds:.1f} s long, over [audio] max_seconds = {cfg.max_seconds:g} "
                         f"(clips are not split: cut it into shorter clips, one row each): {show(value)}")
    if cfg.convert is not None:
        data, fmt = _reencode(data, value, cfg), str(cfg.convert)
    elif fmt not in TAKES[cfg.part]:
        raise InputError(f"{fmt} audio is not taken by the {cfg.part} part ({' or '.join(TAKES[cfg.part])}); "
                         f'set [audio] convert = "wav" to re-encode it: {show(value)}')
    size = b64_size(len(data))
    if size > cfg.max_audio_mb * MB:
        raise InputError(f"audio clip too large ({size / MB:.1f} MB as base64, over the {cfg.max_audio_mb:g} MB "
                         f"per-clip limit [audio] max_audio_mb): {show(value)}")
    return Clip(fmt, base64.b64encode(data).decode("ascii"), seconds)


def _reencode(data: bytes, value: Value, cfg: AudioConfig) -> bytes:
    import soundfile

    assert cfg.convert is not None
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        if cfg.mono and samples.shape[1] > 1:
            samples = samples.mean(axis=1, keepdims=True)
        if cfg.sample_rate and cfg.sample_rate != rate:
            import soxr

            samples, rate = soxr.resample(samples, rate, cfg.sample_rate), cfg.sample_rate
        out = io.BytesIO()
        container, subtype = _SF_FORMAT[cfg.convert]
        soundfile.write(out, samples, rate, format=container, subtype=subtype)
    except _DECODE_ERRORS as exc:
        raise InputError(f"audio could not be re-encoded as {cfg.convert} ({type(exc).__name__}: {exc}; "
                         f"[audio] sample_rate may help): {show(value)}") from None
    return out.getvalue()


def clip_problem(value: Value, files: LocalFiles, cfg: AudioConfig, source_mb: float,
                 objects: ObjectStore | None = None) -> tuple[str, str] | None:
    """(kind, message) when this clip would fail its row, judged from a few bytes (the dry run);
    None when it may be sent. A URL or an object is not fetched: only its form (and an object's
    bucket) is checked."""
    kind = kind_of(value)
    if kind == "url":
        return None
    if kind == "object":
        if objects is not None:
            objects.confined(str(value))  # InputError naming the allowed buckets
        return None
    cap, why = _source_cap(cfg, source_mb)
    if isinstance(value, Blob):
        size, head = len(value.data), value.data[:16]
    elif kind == "data":
        size = data_uri_size(value)
        head = base64.b64decode(value.partition(",")[2][:64], validate=False)
    else:
        fd = files.open(value, "audio")  # the run's own confined open; PathError names the problem
        try:
            size, head = os.fstat(fd).st_size, os.read(fd, 16)
        finally:
            os.close(fd)
    fmt = sniff_audio(head)
    if fmt is None or fmt == "m4a":
        return "not_audio", f"not audio the run can read (WAV, MP3, FLAC or OGG) by its content: {show(value)}"
    if cfg.convert is None and fmt not in TAKES[cfg.part]:
        return "audio_format", f"{fmt} audio is not taken by the {cfg.part} part; set [audio] convert: {show(value)}"
    if size > cap:
        return "too_large", f"audio too large ({size} bytes; {why}): {show(value)}"
    return None


# -- the pool jobs (blocking: run in the worker pool) ------------------------------------------

def local_clip(files: LocalFiles, value: str, cfg: AudioConfig, source_mb: float) -> Clip:
    """A local audio file, read beneath the roots up to its cap."""
    cap, why = _source_cap(cfg, source_mb)
    return prepare_clip(files.read(value, cap, "audio", why), value, cfg)


def data_uri_clip(value: str, cfg: AudioConfig) -> Clip:
    """A clip given as a base64 data: URI (its declared type is not trusted: the bytes are sniffed)."""
    return prepare_clip(parse_data_uri(value)[1], value, cfg)


def bytes_clip(data: bytes, value: Value, cfg: AudioConfig, declared: str | None) -> Clip:
    """A fetched clip's bytes; `declared` is the server's Content-Type, only to explain a refusal."""
    return prepare_clip(data, value, cfg, declared)


# -- a row's clips -------------------------------------------------------------------------------

class AudioBuilder:
    """Builds a row's audio parts with the media builder's files, worker pool and fetcher."""

    def __init__(self, column: str, cfg: AudioConfig, media: MediaSource, source_mb: float) -> None:
        if cfg.sample_rate:
            try:
                import soxr  # noqa: F401
            except ImportError:
                raise JobError("[audio] sample_rate: resampling needs soxr (the audio extra): "
                               "pip install 'pipeline[audio]'") from None
        self.column, self.cfg, self.media, self.source_mb = column, cfg, media, source_mb

    async def parts(self, row: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
        """(part, base64 size) per clip, in order; InputError for a row that cannot be sent."""
        values = image_values(row.get(self.column))
        if not values:
            raise InputError(f"row has no audio in {self.column!r}")
        if len(values) == 1:
            return [await self._clip(values[0])]
        got = await asyncio.gather(*(self._clip(v) for v in values), return_exceptions=True)
        for result in got:  # the first failure in the row's order: a stable message
            if isinstance(result, BaseException):
                raise result
        return got  # type: ignore[return-value]

    async def _clip(self, value: Value) -> tuple[dict[str, Any], int]:
        cfg, workers = self.cfg, self.media.workers
        kind = kind_of(value)
        cap, why = _source_cap(cfg, self.source_mb)
        if isinstance(value, Blob):
            if len(value.data) > cap:  # refused here, not copied to a worker first
                raise InputError(f"audio bytes too large ({len(value.data)} bytes; {why}): {show(value)}")
            clip = await workers.run(value, bytes_clip, value.data, value, cfg, None)
        elif kind == "object":
            if cfg.part is AudioPart.AUDIO_URL and cfg.convert is None and self.media.cfg.image_mode == "presign":
                url = await self.media.objects.presign(value, self.media.presign_s)
                return {"type": "audio_url", "audio_url": {"url": url}}, 0  # the provider fetches it
            data = await self.media.objects.read(value, cap, why)
            clip = await workers.run(value, bytes_clip, data, value, cfg, None)
        elif kind == "url":
            if cfg.part is AudioPart.AUDIO_URL and cfg.convert is None:
                return {"type": "audio_url", "audio_url": {"url": value}}, 0  # the provider fetches it
            got = await self.media.fetcher.fetch(value)
            clip = await workers.run(value, bytes_clip, got.data, value, cfg, got.content_type)
        elif kind == "data":
            if data_uri_size(value) > cap:  # checked on its length, before a worker decodes it
                raise InputError(f"data: URI audio too large ({data_uri_size(value)} bytes once decoded; {why}): {show(value)}")
            clip = await workers.run(value, data_uri_clip, value, cfg)
        else:
            clip = await workers.run(value, local_clip, self.media.files, value, cfg, self.source_mb)
        if cfg.part is AudioPart.INPUT_AUDIO:
            return {"type": "input_audio", "input_audio": {"data": clip.b64, "format": clip.format}}, len(clip.b64)
        return {"type": "audio_url", "audio_url": {"url": f"data:{MIME[clip.format]};base64,{clip.b64}"}}, len(clip.b64)
