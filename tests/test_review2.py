"""Review 2 (store seam, source seam, audio / Responses / compare): failing tests that show defects.

Each test names the finding of the review report it reproduces. They are expected to FAIL on the
merged main (d765105 + 9cde42d) and to pass once the defect is fixed.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import read_output
from test_sources import cli, job_file


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + n, 8), (40 * n % 256, 90, 150)).save(buf, "JPEG")
    return buf.getvalue()


# -- F2: a refusal (Responses API "refusal" content, chat "message.refusal") is bought max_attempts times --


class _Refuser:
    """A real HTTP server answering every POST with a paid refusal, as OpenAI documents it:
    Responses: a message whose content is one {"type": "refusal", "refusal": ...} part;
    chat: message.content null and message.refusal set. Usage is reported (the tokens are billed)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.posts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.posts += 1
                if self.path.endswith("/responses"):
                    answer = {"id": f"resp_{outer.posts}", "object": "response", "created_at": 1, "status": "completed",
                              "model": body["model"], "output": [{"type": "message", "id": "msg_1", "role": "assistant",
                              "status": "completed", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}],
                              "usage": {"input_tokens": 1000, "output_tokens": 12, "total_tokens": 1012,
                                        "input_tokens_details": {"cached_tokens": 0},
                                        "output_tokens_details": {"reasoning_tokens": 0}}}
                else:
                    answer = {"id": "c", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                  "role": "assistant", "content": None, "refusal": "I can't help with that."}}],
                              "usage": {"prompt_tokens": 1000, "completion_tokens": 12, "total_tokens": 1012}}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_f2_a_refusal_is_one_paid_answer_not_max_attempts_of_them(tmp_path: Path, capsys, api: str) -> None:
    """A model's refusal is a paid, final answer. Today it parses as "no answer content"
    (invalid_response: retryable and an endpoint fault), so every refused row is bought
    max_attempts (5) times, its cost is never counted towards [run] budget, the refusal text is
    lost, and a dataset with many refusals trips "the endpoint looks down"."""
    from test_sources import write_part

    write_part(tmp_path / "m.csv", 3)
    server = _Refuser()
    try:
        path = job_file(tmp_path, "m.csv", server.base_url, endpoint={"api": api},
                        limits={"max_concurrency": 1, "breaker_failures": 1000})
        code, _, err = cli(capsys, "run", str(path))
    finally:
        server.close()
    rows = read_output(tmp_path / "out-t")
    assert len(rows) == 3, err
    assert server.posts == 3, f"{server.posts} paid requests for 3 rows, each refused once ({rows[0]['error']})"


# -- F5: audio with `convert` is decoded whole before any cap on its samples --------------------


_DECODE = """
import io, resource, sys
import numpy as np, soundfile as sf
from pipeline.config import AudioConfig, AudioFormat
from pipeline.errors import InputError
from pipeline.rows.audio import prepare_clip
buf = io.BytesIO()
with sf.SoundFile(buf, "w", samplerate=48000, channels=2, format="FLAC", subtype="PCM_16") as f:
    for _ in range(27):  # 590 s of silence: a few hundred kB of FLAC
        f.write(np.zeros((1 << 20, 2), dtype="int16"))
data = buf.getvalue()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    prepare_clip(data, "clip.flac", AudioConfig(convert=AudioFormat.WAV))
    said = "sent"
except InputError as exc:
    said = exc.message
print(len(data), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, said)
"""


def test_f5_a_clip_whose_samples_could_never_be_sent_is_refused_before_it_is_decoded() -> None:
    """README: caps are "checked before it is read or decoded". With `convert`, only the source's
    bytes (max_source_mb) and the header's seconds (max_seconds) are checked; the clip is then
    decoded whole into float32 (frames x channels x 4 bytes) and only the re-encoded result is held
    to max_audio_mb. A ~200 kB FLAC of 590 s stereo at 48 kHz costs ~300 MB of worker memory before
    its refusal; at 8 channels and 192 kHz (still under max_seconds) it is ~7 GB per clip, per
    worker process: the run is OOM-killed. frames x channels is in the header soundfile.info reads."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", _DECODE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    size, grew, said = out.stdout.split(" ", 2)
    assert "too large" in said or "max_audio_mb" in said, out.stdout + out.stderr
    assert int(grew) < 50, f"a {int(size) // 1024} kB clip took {grew} MB to refuse ({said.strip()[:120]})"


# -- F6: the Responses API keeps every request and answer at the provider unless told not to --------


def test_f6_responses_requests_ask_the_provider_not_to_store_them(tmp_path: Path, endpoint, capsys) -> None:
    """OpenAI's description: CreateResponse `store` defaults to true (chat's to false), so a job
    switched to `api = "responses"` leaves every row's prompt, image and answer stored at the
    provider (30 days, listed in the dashboard's logs) without the user asking. A bulk job sends
    `store: false` unless [request] sets it."""
    from test_sources import write_part

    write_part(tmp_path / "m.csv", 2)
    code, _, err = cli(capsys, "run", str(job_file(tmp_path, "m.csv", endpoint.base_url, endpoint={"api": "responses"})))
    assert code == 0, err
    bodies = [json.loads(r["body"]) for r in endpoint.requests() if r.get("body")]
    assert bodies and all(b.get("store") is False for b in bodies), [b.get("store") for b in bodies]
