"""Benchmark: what the redactor costs per text (every journaled answer, every error, every log line
passes through it), in microseconds per 1 KB text.

    python -m bench.redact_cost                 # this tree
    python -m bench.redact_cost --ref 5ece71d   # also pipeline/redact.py of that commit (before/after)

Texts: an answer of plain words; the same with an "=" ("2 + 2 = 4"), with a "?" and a "%", and
with a presigned URL in it. Each is scrubbed by a Redactor holding no secret (the signed-URL scan
alone) and by one holding an API key (what a run has). With `--ref`, that commit's redact.py is
read with `git show` and timed the same way, in this process.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

from .common import module_at

KEY = "sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCD"
SIGNED = ("https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAXYZ%2F20260101"
          "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Signature=64fedec0fd75f2ee537c151d376f")

__all__ = ["texts", "time_module", "main", "run_redact_bench"]


def texts() -> dict[str, str]:
    rng = random.Random(1)
    words = "the a cat sits on mat picture shows red blue house tree sky image left right near far".split()
    base = " ".join(rng.choice(words) for _ in range(300))[:1024]
    return {"plain": base, "with =": base[:500] + " 2 + 2 = 4 " + base[511:],
            "with ? and %": base[:500] + " is it? 50% " + base[512:],
            "with a signed URL": base[:400] + f" {SIGNED} " + base[400 + len(SIGNED) + 2:]}


def time_module(redact: ModuleType, number: int = 20000) -> dict[str, dict[str, float]]:
    """Microseconds per scrub of each text, without a secret and with the key."""
    out: dict[str, dict[str, float]] = {}
    bare, keyed = redact.Redactor(), redact.Redactor([KEY])
    for name, text in texts().items():
        out[name] = {label: round(min(timeit.repeat(lambda: r.scrub(text), number=number, repeat=5)) / number * 1e6, 2)
                     for label, r in (("no_secret_us", bare), ("with_key_us", keyed))}
    return out


def _show(label: str, figures: dict[str, dict[str, float]]) -> None:
    for name, f in figures.items():
        print(f"{label:>10}  {name:<18} no secret {f['no_secret_us']:6.2f} us   with the key {f['with_key_us']:6.2f} us",
              flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.redact_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--ref", help="also time pipeline/redact.py of this git commit (before/after)")
    args = parser.parse_args(argv)
    from pipeline import redact

    results = {"this tree": time_module(redact)}
    _show("this tree", results["this tree"])
    if args.ref:
        with tempfile.TemporaryDirectory() as tmp:
            results[args.ref] = time_module(module_at(args.ref, "pipeline/redact.py", Path(tmp)))
        _show(args.ref, results[args.ref])
    return results


def run_redact_bench() -> dict[str, Any]:
    """`make bench`'s scenario: this tree's figures."""
    from pipeline import redact

    return time_module(redact)


if __name__ == "__main__":
    main(sys.argv[1:])
