"""The `[audio]` table: how a row's audio clips (`[input] audio_column`) become request parts
(see rows/audio.py).

    [input]
    audio_column = "clip"        # a local file, http(s) URL, data: URI, or a list of them
    [audio]
    part = "input_audio"         # OpenAI, Qwen-Omni (DashScope compatible mode); "audio_url": vLLM
    max_seconds = 600            # a longer clip is an error row (never split: see max_seconds' doc)
    convert = "wav"              # re-encode every clip (mono, sample_rate)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..errors import JobError
from .fields import Table, choice, positive, setting, zero_or_more

__all__ = ["AudioConfig", "AudioPart", "AudioFormat"]


class AudioPart(StrEnum):
    """The content part a clip is sent as."""

    INPUT_AUDIO = "input_audio"  # {"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}
    AUDIO_URL = "audio_url"  # {"type": "audio_url", "audio_url": {"url": URL or data: URI}} (vLLM)


class AudioFormat(StrEnum):
    """What a clip may be re-encoded to."""

    WAV = "wav"
    MP3 = "mp3"


def _typed(value: object, kind: type[StrEnum]) -> str | None:
    """Built in code, a key holds the typed value too (never the bare string)."""
    return None if value is None or isinstance(value, kind) else f"must be a {kind.__name__}, not {value!r}"


@dataclass(frozen=True)
class AudioConfig(Table):
    TABLE = "audio"
    part: AudioPart = setting(AudioPart.INPUT_AUDIO, parse=choice(AudioPart), check=lambda v: _typed(v, AudioPart),
                              doc='"input_audio" (base64 wav or mp3: OpenAI, Qwen-Omni) or "audio_url" (a URL or data: URI: vLLM)')
    max_seconds: float = setting(600.0, check=positive,
                                 doc="a longer clip fails its row (clips are never split: a model would hear pieces "
                                     "as one clip); cut long recordings into rows beforehand")
    convert: AudioFormat | None = setting(None, parse=choice(AudioFormat), check=lambda v: _typed(v, AudioFormat),
                                          doc='"wav" or "mp3": every clip re-encoded (decoded with libsndfile); unset: '
                                              "clips go as they are, a format the part does not take fails the row")
    sample_rate: int = setting(0, check=zero_or_more, doc="with convert: resampled to this many Hz (soxr); 0: as recorded")
    mono: bool = setting(False, doc="with convert: the channels mixed down to one")
    max_audio_mb: float = setting(20.0, check=positive, doc="per clip, counted on the base64 text")

    def validate(self) -> None:
        if self.convert is None and (self.sample_rate or self.mono):
            key = "sample_rate" if self.sample_rate else "mono"
            raise JobError(f'[audio] {key}: applies when clips are re-encoded; set convert = "wav" (or "mp3") too')

    def request_shape(self) -> dict[str, object] | None:
        """What changes what the model hears; None when all is at its default."""
        d = AudioConfig()
        keys = ("part", "convert", "sample_rate", "mono")
        shape = {k: str(getattr(self, k)) for k in keys if getattr(self, k) != getattr(d, k)}
        return shape or None
