"""The built-in endpoint as a process: `pipeline serve` serving until it is stopped, or started
by a run for its job's `[serve]` table as a child process that dies with the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
from typing import Any, AsyncIterator

from aiohttp import web

from ...config.serve import ServeOptions
from ...errors import JobError
from .app import make_app

__all__ = ["serve_forever", "start_subprocess"]


async def serve_forever(opts: ServeOptions) -> None:
    """Serve until cancelled; the first line printed gives the address (the port when it was 0)."""
    runner = web.AppRunner(make_app(opts), access_log=None, keepalive_timeout=opts.keepalive_s)
    await runner.setup()
    tls = None
    if opts.tls_cert is not None and opts.tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(opts.tls_cert, opts.tls_key)
    site = web.TCPSite(runner, opts.host, opts.port, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    print(f"serving on {'https' if tls else 'http'}://{opts.host}:{port}/v1", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def start_subprocess(options: dict[str, Any]) -> AsyncIterator[str]:
    """Start `pipeline serve` in its own process for a job's `[serve]` table; yields its base URL.
    The endpoint dies with this process, even when it is killed with -9 (`--parent-pid`)."""
    ServeOptions.from_dict(options)  # report a bad [serve] table before starting anything
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "serve", "--options-json", json.dumps(options),
        "--parent-pid", str(os.getpid()),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):  # not wait_for: pipeline.waits
            line = (await proc.stdout.readline()).decode().strip()
        if not line.startswith("serving on "):
            raise JobError(f"[serve] the built-in endpoint did not start ({line or 'no output'})")
        yield line.removeprefix("serving on ")
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
