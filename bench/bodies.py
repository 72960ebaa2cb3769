"""Benchmark: the time to take in one big answer body, 64 KB at a time (issue 12: linear buffering).

    python -m bench.bodies                  # this tree: a 100 MB body, plain and streamed
    python -m bench.bodies --ref 17be255    # also the code of that commit, for a before/after
    python -m bench.bodies --mb 25          # another size

What is timed is the event loop's own work, without the network: the plain path's parser
(`response.ResponseParser.feed`, what the pool's protocol hands each read to) fed a
Content-Length answer, and the streamed path's `stream.StreamAssembler.feed_bytes` fed one SSE
event whose content is the whole body (the line only ends at the last chunk, the worst case for a
line buffer). Both come in 64 KB chunks, the way the event loop hands them over. Linear code
takes about the same time per MB at any size; the buffering it replaced (`buf = buf + data`)
copied the whole buffer again for every chunk. With `--ref`, those two modules
(pipeline/net/response.py and pipeline/net/stream.py, so a commit from issue 13's layout on) are
read from the given commit with `git show` and timed the same way; what they import from the
package comes from this tree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from .common import module_at

CHUNK = 64 * 1024

__all__ = ["time_plain", "time_stream", "main"]


def time_plain(response: ModuleType, size: int) -> float:
    """Seconds for `response.ResponseParser` to take in a `size`-byte answer in 64 KB chunks."""
    parser = response.ResponseParser(size + 1)
    chunk = b"x" * CHUNK
    started = time.perf_counter()
    answer = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size)
    for offset in range(0, size, CHUNK):
        answer = parser.feed(chunk if size - offset >= CHUNK else chunk[: size - offset])
    elapsed = time.perf_counter() - started
    assert answer is not None and answer[0] == 200 and len(answer[2]) == size, "the body did not arrive whole"
    return elapsed


def time_stream(stream: ModuleType, size: int) -> float:
    """Seconds for `stream.StreamAssembler.feed_bytes` to take in one `size`-byte SSE event."""
    head = b'data: {"choices":[{"index":0,"delta":{"content":"'
    tail = b'"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    chunk = b"x" * CHUNK
    asm = stream.StreamAssembler()
    started = time.perf_counter()
    asm.feed_bytes(head)
    for offset in range(0, size, CHUNK):
        asm.feed_bytes(chunk if size - offset >= CHUNK else chunk[: size - offset])
    asm.feed_bytes(tail)
    elapsed = time.perf_counter() - started
    content = asm.result()["choices"][0]["message"]["content"]
    assert len(content) == size, "the answer did not arrive whole"
    return elapsed


def _report(label: str, modules: tuple[ModuleType, ModuleType], size: int) -> dict[str, Any]:
    plain, streamed = time_plain(modules[0], size), time_stream(modules[1], size)
    mb = size / (1 << 20)
    print(f"{label:>12}: plain {plain:7.2f} s ({mb / plain:7.0f} MB/s)   streamed {streamed:7.2f} s ({mb / streamed:7.0f} MB/s)",
          flush=True)
    return {"plain_s": round(plain, 3), "streamed_s": round(streamed, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.bodies", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="the body's size in MB (default 100)")
    parser.add_argument("--ref", help="also time the code of this git commit (before/after)")
    args = parser.parse_args(argv)
    size = int(args.mb * (1 << 20))
    print(f"a {args.mb:g} MB body in {CHUNK // 1024} KB chunks ({size // CHUNK} chunks)")
    from pipeline.net import response, stream

    results = {"this tree": _report("this tree", (response, stream), size)}
    if args.ref:
        with tempfile.TemporaryDirectory() as tmp:
            old = (module_at(args.ref, "pipeline/net/response.py", Path(tmp)), module_at(args.ref, "pipeline/net/stream.py", Path(tmp)))
            results[args.ref] = _report(args.ref, old, size)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
