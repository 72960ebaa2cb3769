"""A fresh `pip install .` holds only what running needs; the extras are declared and pinned.

The install check is real: pip resolves the repository for a new, empty venv in tmp_path
(`--dry-run --ignore-installed --report`, about 7 s here against a real install's 23 s, and it
leaves no build/ folder in the checkout), and the test reads the names pip would install.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = ("ray", "s3", "hf", "report", "test")
# Named here as well as derived from the extras, so dropping one from an extra can't hide it.
NOT_AT_RUNTIME = {
    "ray", "moto", "duckdb", "pytest", "pytest-asyncio", "hypothesis", "psutil",
    "ipykernel", "nbclient", "nbformat", "datasets", "s3fs", "fsspec", "altair", "vl-convert-python", "playwright",
    "proxy-py",
}  # fmt: skip
# What pip prints when it could not reach an index at all (urllib3's connection errors).
UNREACHABLE = re.compile(
    r"NewConnectionError|ConnectTimeoutError|Max retries exceeded|ProxyError"
    r"|Temporary failure in name resolution|Network is unreachable|Connection refused"
)
NOT_FOUND = re.compile(r"No matching distribution found|from versions: ")
# name[extras]==version[; marker]: one exact version, no range, no wildcard
PINNED = re.compile(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?\s*==\s*([A-Za-z0-9.+!_-]+)\s*(?:;.*)?$")


def name(requirement: str) -> str:
    """The normalised project name of a requirement string (PEP 503)."""
    bare = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert bare, requirement
    return re.sub(r"[-_.]+", "-", bare.group(1)).lower()


def requirements() -> dict[str, list[str]]:
    """Every requirement of the project, by where it is declared."""
    project = PYPROJECT["project"]
    return {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}


def index_unreachable(result: subprocess.CompletedProcess[str]) -> bool:
    """pip failed because no package index answered, not for any other reason."""
    output = result.stdout + result.stderr
    return result.returncode != 0 and bool(NOT_FOUND.search(output)) and bool(UNREACHABLE.search(output))


def resolve(tmp_path: Path, target: str, *pip_options: str) -> subprocess.CompletedProcess[str]:
    """`pip install --dry-run --report` of `target` for a new venv without pip of its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True)
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", tmp_path / "venv" / "bin" / "python",
         "install", *pip_options, "--dry-run", "--ignore-installed", "--report", tmp_path / "report.json",
         "--retries", "2", "--timeout", "30", "--quiet", "--no-input", target],
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_a_fresh_install_holds_the_runtime_only(tmp_path: Path) -> None:
    result = resolve(tmp_path, str(ROOT))
    if index_unreachable(result):
        pytest.skip(f"the package index is unreachable:\n{result.stderr[-2000:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    installed = {name(item["metadata"]["name"]) for item in report["install"]}

    runtime = {name(r) for r in requirements()["dependencies"]}
    assert runtime | {"pipeline"} <= installed, f"missing: {runtime - installed}"
    extras_only = {name(r) for extra in EXTRAS for r in requirements().get(extra, [])} - runtime
    assert not (NOT_AT_RUNTIME | extras_only) & installed, sorted((NOT_AT_RUNTIME | extras_only) & installed)


def test_an_unreachable_index_is_told_apart(tmp_path: Path) -> None:
    """The skip above fires on a real unreachable index (a closed loopback port), and only on it."""
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        index = f"http://127.0.0.1:{closed.getsockname()[1]}/simple"
        result = resolve(tmp_path, requirements()["dependencies"][0], "--isolated", "--index-url", index)
    assert index_unreachable(result), result.stdout + result.stderr
    not_found = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for aiohttp==0.0.0\n")
    assert not index_unreachable(not_found)  # the index answered: a real failure, no skip


def test_the_extras_are_declared() -> None:
    extras = PYPROJECT["project"].get("optional-dependencies", {})
    assert set(EXTRAS) <= set(extras), sorted(set(EXTRAS) - set(extras))
    assert "datasets" in {name(r) for r in extras["hf"]}
    assert {"ipykernel", "nbclient", "nbformat", "datasets"} <= {name(r) for r in extras["test"]}


def test_every_requirement_is_pinned_the_same_everywhere() -> None:
    pins: dict[str, set[str]] = {}
    for where, reqs in requirements().items():
        for req in reqs:
            pinned = PINNED.match(req)
            assert pinned, f"{where}: {req!r} is not pinned with =="
            pins.setdefault(name(req), set()).add(pinned.group(1))
    assert not {n: v for n, v in pins.items() if len(v) > 1}, "one package, two pins"
