"""Audio rows (`[input] audio_column`, `[audio]`): clips the tests make (a tone written with the
standard library's `wave`, MP3 and FLAC with soundfile) sent to the built-in endpoint, which
decodes each and says what it heard, so the rows prove the bytes arrived whole; a too-long clip,
a clip outside the allowed roots and a format the part does not take are error rows; re-encoding;
URLs fetched or passed on; kill -9 and resume; every request valid against OpenAI's description.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import soundfile

from conftest import ROOT, job_dict, read_output, run_cli, write_job, write_rows
from openapi import assert_valid

from pipeline.config import AudioConfig, AudioFormat, AudioPart, load_job
from pipeline.errors import InputError, JobError
from pipeline.rows.audio import prepare_clip, sniff_audio


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wave_ = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.repeat(wave_[:, None], channels, axis=1).astype("float32")


def wav_clip(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> Path:
    """A 16-bit PCM tone, written by the standard library."""
    samples = (tone(seconds, rate, channels) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def sf_clip(path: Path, seconds: float, rate: int, channels: int, fmt: str) -> Path:
    """An MP3 or FLAC tone, encoded by libsndfile (LAME and libFLAC inside the soundfile wheel)."""
    soundfile.write(str(path), tone(seconds, rate, channels), rate, format=fmt)
    return path


@pytest.fixture
def clips(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "clips"
    folder.mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside.mkdir(exist_ok=True)
    (folder / "words.wav").write_text("not audio at all, only a name")
    return {
        "wav": wav_clip(folder / "a.wav", 2.5), "mp3": sf_clip(folder / "b.mp3", 1.5, 22050, 2, "MP3"),
        "long": wav_clip(folder / "long.wav", 7.0, 8000), "flac": sf_clip(folder / "c.flac", 1.0, 16000, 1, "FLAC"),
        "outside": wav_clip(outside / "secret.wav", 1.0), "text": folder / "words.wav",
    }


def _job(tmp_path: Path, ep: Any, rows: list[dict[str, Any]], name: str = "a", **overrides: Any) -> Path:
    write_rows(tmp_path / f"{name}.csv", rows, "csv")
    base = job_dict(tmp_path / f"{name}.csv", ep.base_url, tmp_path / f"out-{name}", **overrides)
    base["input"] = {"path": str(tmp_path / f"{name}.csv"), "id_column": "id", "audio_column": "clip", "prompt_column": "prompt",
                     **overrides.get("input", {})}
    return write_job(tmp_path / f"{name}.toml", {**base, "name": name})


def _rows(tmp_path: Path, name: str = "a") -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_output(tmp_path / f"out-{name}")}


def _sent(ep: Any) -> dict[str, dict[str, Any]]:
    """The last request of each row, by its prompt."""
    bodies = [json.loads(r["body"]) for r in ep.requests() if r.get("body")]
    return {b["messages"][-1]["content"][0]["text"]: b for b in bodies}


def test_wav_mp3_a_too_long_clip_and_one_outside_the_roots(tmp_path: Path, endpoint_factory: Any,
                                                           clips: dict[str, Path]) -> None:
    ep = endpoint_factory(record=True)
    rows = [{"id": k, "clip": f"clips/{clips[k].name}", "prompt": f"What do you hear in {k}?"}
            for k in ("wav", "mp3", "long", "flac", "text")]
    rows.append({"id": "outside", "clip": str(clips["outside"]), "prompt": "What do you hear in outside?"})
    job = _job(tmp_path, ep, rows, audio={"max_seconds": 5})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr  # some rows failed, the others answered
    got = _rows(tmp_path)
    wav, mp3 = got["wav"], got["mp3"]
    assert wav["status"] == "ok" and "WAV (PCM_16), 2.50 s, 16000 Hz, 1 channel(s), 40000 frames" in wav["answer"]
    assert mp3["status"] == "ok" and "MP3 (MPEG_LAYER_III), 1.50 s, 22050 Hz, 2 channel(s), 33075 frames" in mp3["answer"]
    assert (wav["audio_tokens"], mp3["audio_tokens"]) == (25, 15)  # the endpoint's 10 a second, in the existing column
    assert wav["prompt_tokens"] > 25
    long, flac, text, outside = got["long"], got["flac"], got["text"], got["outside"]
    assert long["status"] == "error" and long["error_kind"] == "input"
    assert "7.0 s long, over [audio] max_seconds = 5" in long["error"] and "not split" in long["error"]
    assert "flac audio is not taken by the input_audio part (wav or mp3)" in flac["error"] and 'convert = "wav"' in flac["error"]
    assert "not audio (WAV, MP3, FLAC or OGG) by its content" in text["error"]
    assert "outside the allowed roots" in outside["error"] and outside["attempts"] == 0
    sent = _sent(ep)
    assert set(sent) == {"What do you hear in wav?", "What do you hear in mp3?"}  # failed rows sent nothing
    for key, body in sent.items():
        assert_valid("CreateChatCompletionRequest", body)
        part = body["messages"][-1]["content"][1]
        name = key.split()[-1].rstrip("?")
        assert part["type"] == "input_audio" and part["input_audio"]["format"] == name
        assert base64.b64decode(part["input_audio"]["data"]) == clips[name].read_bytes()  # sent as it is


def test_the_dry_run_checks_audio_cells_from_their_first_bytes(tmp_path: Path, clips: dict[str, Path]) -> None:
    rows = [{"id": k, "clip": f"clips/{clips[k].name}", "prompt": f"Hear {k}"} for k in ("wav", "mp3", "flac", "text")]
    rows += [{"id": "outside", "clip": str(clips["outside"]), "prompt": "Hear outside"},
             {"id": "none", "clip": "", "prompt": "Hear nothing"},
             {"id": "url", "clip": "https://audio.example/a.wav", "prompt": "Hear a URL"}]
    job = _job(tmp_path, type("E", (), {"base_url": "http://127.0.0.1:9/v1"})(), rows)
    r = run_cli("run", str(job), "--dry-run")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "7 rows in 1 shard(s); 3 ready, 4 would fail" in r.stdout
    for kind, row in (("audio_format", "flac"), ("not_audio", "text"), ("outside_roots", "outside"), ("missing_audio", "none")):
        assert re.search(rf"{kind}: 1 row\(s\)\n +row \d+ \(id {row}\)", r.stdout), (kind, r.stdout)


def test_convert_mono_and_sample_rate_as_audio_url_parts(tmp_path: Path, endpoint_factory: Any,
                                                         clips: dict[str, Path]) -> None:
    ep = endpoint_factory(record=True)
    rows = [{"id": k, "clip": f"clips/{clips[k].name}", "prompt": f"Hear {k}"} for k in ("mp3", "flac", "wav")]
    job = _job(tmp_path, ep, rows, audio={"part": "audio_url", "convert": "wav", "mono": True, "sample_rate": 8000})
    assert run_cli("run", str(job)).returncode == 0
    got = _rows(tmp_path)
    assert "WAV (PCM_16), 1.50 s, 8000 Hz, 1 channel(s), 12000 frames" in got["mp3"]["answer"]
    assert "WAV (PCM_16), 1.00 s, 8000 Hz, 1 channel(s), 8000 frames" in got["flac"]["answer"]
    assert "WAV (PCM_16), 2.50 s, 8000 Hz, 1 channel(s), 20000 frames" in got["wav"]["answer"]
    for body in _sent(ep).values():
        part = body["messages"][-1]["content"][1]
        assert part["type"] == "audio_url" and part["audio_url"]["url"].startswith("data:audio/wav;base64,UklGR")


@pytest.fixture
def static(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server of the clips folder, on loopback."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "clips")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


def test_urls_are_fetched_for_input_audio_and_passed_on_as_audio_url(
        tmp_path: Path, endpoint_factory: Any, clips: dict[str, Path], static: str) -> None:
    ep = endpoint_factory(record=True)
    rows = [{"id": "wav", "clip": f"{static}/a.wav", "prompt": "Hear the fetched wav"},
            {"id": "two", "clip": json.dumps([f"{static}/b.mp3", "clips/a.wav"]), "prompt": "Hear two clips"}]
    assert run_cli("run", str(_job(tmp_path, ep, rows))).returncode == 0
    got = _rows(tmp_path)
    assert "2.50 s, 16000 Hz" in got["wav"]["answer"]
    assert got["two"]["answer"].index("1.50 s, 22050 Hz") < got["two"]["answer"].index("2.50 s, 16000 Hz")  # in order
    assert got["two"]["audio_tokens"] == 40
    ep.reset()
    passed = _job(tmp_path, ep, rows[:1], name="u", audio={"part": "audio_url"})
    assert run_cli("run", str(passed)).returncode == 0
    assert f"an audio clip at {static}/a.wav (not fetched" in _rows(tmp_path, "u")["wav"]["answer"]


def test_a_clip_in_memory_as_bytes(tmp_path: Path, endpoint_factory: Any, clips: dict[str, Path]) -> None:
    from pipeline import run

    ep = endpoint_factory()
    job = job_dict(tmp_path / "unused.csv", ep.base_url, tmp_path / "out-mem")
    job["input"] = {"id_column": "id", "audio_column": "clip", "prompt_column": "prompt"}
    result = run({**job, "name": "mem"}, manifest=[{"id": "m", "clip": clips["mp3"].read_bytes(), "prompt": "Hear bytes"}])
    assert result.ok == 1
    assert "1.50 s, 22050 Hz, 2 channel(s)" in read_output(tmp_path / "out-mem")[0]["answer"]


def test_clips_as_parquet_bytes_and_in_a_bucket(tmp_path: Path, endpoint_factory: Any, clips: dict[str, Path],
                                                s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image cells' reader serves audio too: bytes in a Parquet manifest (the output holds
    their sha256, not the bytes) and s3:// objects, read with the environment's credentials and
    confined to [images] allowed_buckets."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket, other = s3.new_bucket(), s3.new_bucket()
    s3.fs().pipe_file(f"{bucket}/clips/b.mp3", clips["mp3"].read_bytes())
    s3.fs().pipe_file(f"{other}/x.wav", clips["wav"].read_bytes())
    wav = clips["wav"].read_bytes()
    pq.write_table(pa.table({"id": ["bytes"], "prompt": ["Hear bytes"], "clip": pa.array([wav], pa.binary())}),
                   tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"id": ["s3", "denied"], "prompt": ["Hear s3", "Hear elsewhere"],
                             "clip": [f"s3://{bucket}/clips/b.mp3", f"s3://{other}/x.wav"]}), tmp_path / "uris.parquet")
    ep = endpoint_factory()
    for name, code in (("bytes", 0), ("uris", 1)):
        job = job_dict(tmp_path / f"{name}.parquet", ep.base_url, tmp_path / f"out-{name}",
                       input={"path": str(tmp_path / f"{name}.parquet"), "id_column": "id", "audio_column": "clip",
                              "prompt_column": "prompt", "image_column": None, "storage_options": {"endpoint_url": s3.url}},
                       images={"allowed_buckets": [f"s3://{bucket}/"]})
        r = run_cli("run", str(write_job(tmp_path / f"{name}.toml", {**job, "name": name})))
        assert r.returncode == code, r.stderr
    got = {**_rows(tmp_path, "bytes"), **_rows(tmp_path, "uris")}
    assert "2.50 s, 16000 Hz" in got["bytes"]["answer"]
    assert got["bytes"]["clip"] == "sha256:" + hashlib.sha256(wav).hexdigest()  # a reference, not the bytes
    assert "1.50 s, 22050 Hz, 2 channel(s)" in got["s3"]["answer"]
    assert got["denied"]["status"] == "error" and "allowed buckets" in got["denied"]["error"]


def test_kill_9_then_resume_every_audio_row_exactly_once(tmp_path: Path, endpoint_factory: Any) -> None:
    (tmp_path / "clips").mkdir()
    for i in range(6):
        wav_clip(tmp_path / "clips" / f"t{i}.wav", 0.5 + i * 0.25)
    n = 240
    rows = [{"id": f"row-{i:05d}", "clip": f"clips/t{i % 6}.wav", "prompt": f"Hear row-{i:05d}"} for i in range(n)]
    ep = endpoint_factory(latency_ms=60, latency_jitter_ms=40, seed=5)
    job = _job(tmp_path, ep, rows, run={"shard_rows": 40})
    kills = 0
    for k in range(3):  # each run killed after the endpoint's 30th, 67th, 104th answer: mid-shard, whatever the speed
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = (k + 1) * 30 + k * 7
        deadline = time.monotonic() + 60
        while ep.stats()["statuses"].get("200", 0) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
    done = len(read_output(tmp_path / "out-a"))
    assert kills == 3 and done < n, (kills, done)  # every run killed before the job's end
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    out = read_output(tmp_path / "out-a")
    assert Counter(row["id"] for row in out) == Counter(row["id"] for row in rows)  # every row exactly once
    for row in out:
        seconds = 0.5 + int(row["id"][4:]) % 6 * 0.25
        assert row["status"] == "ok" and f"{seconds:.2f} s, 16000 Hz" in row["answer"]
        assert row["audio_tokens"] == math.ceil(seconds * 10)
    assert sum(c - 1 for c in ep.stats()["per_row"].values()) <= 3 * 8  # at most what was in flight, per kill


# -- the pieces ------------------------------------------------------------------------------------

def test_formats_are_told_by_their_bytes(clips: dict[str, Path]) -> None:
    assert sniff_audio(clips["wav"].read_bytes()) == "wav"
    assert sniff_audio(clips["mp3"].read_bytes()) == "mp3"
    assert sniff_audio(b"ID3\x04\x00rest") == "mp3"
    assert sniff_audio(clips["flac"].read_bytes()) == "flac"
    assert sniff_audio(b"OggS\x00\x02" + b"\x00" * 30) == "ogg"
    assert sniff_audio(b"\x00\x00\x00\x20ftypM4A \x00\x00") == "m4a"
    assert sniff_audio(b"\xff\xd8\xff\xe0 a jpeg") is None and sniff_audio(b"RIFF\x00\x00\x00\x00WEBPVP8 ") is None
    assert sniff_audio(b"\xff\xea\x00") is None  # MPEG sync with a reserved version: not a frame


def test_truncated_and_oversized_clips_are_input_errors(clips: dict[str, Path]) -> None:
    cfg = AudioConfig()
    data = clips["mp3"].read_bytes()
    assert prepare_clip(data, "b.mp3", cfg).seconds == pytest.approx(1.5)
    with pytest.raises(InputError, match="unreadable or truncated wav audio"):
        prepare_clip(clips["wav"].read_bytes()[:30], "a.wav", cfg)
    with pytest.raises(InputError, match=r"audio clip too large \(0.1 MB as base64, over the 0.05 MB"):
        prepare_clip(clips["wav"].read_bytes(), "a.wav", AudioConfig(max_audio_mb=0.05))
    with pytest.raises(InputError, match="AAC"):
        prepare_clip(b"\x00\x00\x00\x20ftypM4A \x00\x00", "x.m4a", cfg)
    mp3 = prepare_clip(clips["wav"].read_bytes(), "a.wav", AudioConfig(convert=AudioFormat.MP3))
    assert mp3.format == "mp3" and sniff_audio(base64.b64decode(mp3.b64)) == "mp3"
    info = soundfile.info(io.BytesIO(base64.b64decode(mp3.b64)))
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, 40000)


_DECODE = """
import io, resource, sys
import numpy as np, soundfile as sf
from pipeline.config import AudioConfig, AudioFormat
from pipeline.errors import InputError
from pipeline.rows.audio import prepare_clip
seconds, convert, mb = float(sys.argv[1]), AudioFormat(sys.argv[2]), float(sys.argv[3])
buf = io.BytesIO()
with sf.SoundFile(buf, "w", samplerate=48000, channels=2, format="FLAC", subtype="PCM_16") as f:
    for _ in range(int(seconds * 48000) >> 16):  # silence: a few hundred kB of FLAC
        f.write(np.zeros((1 << 16, 2), dtype="int16"))
data = buf.getvalue()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    clip = prepare_clip(data, "clip.flac", AudioConfig(convert=convert, mono=True, sample_rate=16000, max_audio_mb=mb))
    said = f"sent {clip.seconds:.0f} s"
except InputError as exc:
    said = exc.message
print(len(data), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, said)
"""


def _decode(seconds: float, convert: str, max_audio_mb: float) -> tuple[int, int, str]:
    """(source bytes, MB the worker grew by, what prepare_clip said) for a stereo 48 kHz FLAC, in a
    process of its own (its peak is its own)."""
    out = subprocess.run([sys.executable, "-c", _DECODE, str(seconds), convert, str(max_audio_mb)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    size, grew, said = out.stdout.split(" ", 2)
    return int(size), int(grew), said.strip() + out.stderr[-300:]


@pytest.mark.parametrize("seconds, convert, max_audio_mb, says", [
    (590, "wav", 20, "MB as base64 once re-encoded as wav"),  # too large, known from the header: nothing decoded
    (240, "mp3", 20, "sent 239 s"),  # an mp3's size is not: decoded a block at a time, sent
    (240, "mp3", 0.2, "too large"),  # ... and stopped once past the cap
])
def test_a_converted_clip_is_never_decoded_whole(seconds: float, convert: str, max_audio_mb: float, says: str) -> None:
    """With `convert`, a clip was decoded whole as float32 (frames x channels x 4 bytes) before any
    cap on its samples: a ~200 kB FLAC of 590 s stereo at 48 kHz took ~300 MB of worker memory to
    refuse, 10 minutes of 8 channels at 192 kHz (under max_seconds) ~7 GB. Now a WAV re-encoding
    that could not be sent is refused from the header, and any other is decoded, mixed, resampled
    and encoded a block at a time."""
    size, grew, said = _decode(seconds, convert, max_audio_mb)
    assert grew < 50, f"a {size // 1024} kB clip of {seconds} s took {grew} MB ({said[:120]})"
    assert says in said, said


def test_the_audio_table_is_checked(tmp_path: Path) -> None:
    base = job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out")
    job = load_job({**base, "audio": {"part": "audio_url", "convert": "mp3"}})
    assert job.audio.part is AudioPart.AUDIO_URL and job.audio.convert is AudioFormat.MP3
    with pytest.raises(JobError, match=r'\[audio\] part must be "input_audio" or "audio_url", not \'wav\''):
        load_job({**base, "audio": {"part": "wav"}})
    with pytest.raises(JobError, match=r'\[audio\] sample_rate: applies when clips are re-encoded'):
        load_job({**base, "audio": {"sample_rate": 16000}})
    with pytest.raises(JobError, match="audio_column: the Responses API takes no audio"):
        load_job({**base, "endpoint": {**base["endpoint"], "api": "responses"},
                  "input": {**base["input"], "audio_column": "clip"}})
    plain = load_job(base)
    assert "audio" not in plain.request_shape()  # a job without audio keeps its checkpoints' digest
    clip = load_job({**base, "input": {**base["input"], "audio_column": "clip"}})
    assert clip.shape_digest() != plain.shape_digest()
