"""A real S3 API for the tests and the benchmarks: moto's server mode, in its own process, on a
free loopback port. Here, outside the `pipeline` package, which never depends on moto.

    proc, url = start_moto_s3()      # http://127.0.0.1:<port>, answering; RuntimeError if it never does
    ...                              # s3fs / boto with endpoint_url=url and any key and secret
    stop_moto_s3(proc)

What moto's server does and does not check (moto 5.2): it accepts any credentials, honours S3's
conditional writes (If-None-Match, If-Match), and checks a signature only in an Authorization
header: a presigned URL is served whatever its X-Amz-Signature says, so a test of presigning
checks the signature itself (tests/test_image_cells.py, sigv4_valid).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

__all__ = ["start_moto_s3", "stop_moto_s3"]


def start_moto_s3(timeout_s: float = 30.0, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server (`env` added to its environment) and wait until it answers (within `timeout_s`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_moto_s3(proc)
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.1)


def stop_moto_s3(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
