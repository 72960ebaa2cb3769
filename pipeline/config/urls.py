"""fsspec URLs: an output location (a local folder or `s3://bucket/prefix`), checked when the job
is loaded (the URL's backend is installed) and shown without credentials; the object stores an
image cell may name.

    is_url("s3://b/captions")              # True
    check_url(url, "[output] path")        # JobError naming what to pip install
    display("s3://key:secret@b/x")         # "s3://b/x"
    object_prefix("gcs://b/imgs")          # "gs://b/imgs/" (None: not an object-store URL)
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import JobError

__all__ = ["is_url", "check_url", "display", "object_prefix", "OBJECT_SCHEMES"]

# The object stores an image cell may name, by fsspec protocol (aliases folded: gcs is gs, abfs is az).
OBJECT_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az"}

_USERINFO = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@]*@")


def is_url(text: str) -> bool:
    return "://" in text


def display(location: Path | str) -> str:
    """The output's place as shown in messages and summaries: a URL without user:password@."""
    return _USERINFO.sub(r"\1", location) if isinstance(location, str) else str(location)


def object_prefix(url: str) -> str | None:
    """An object-store URL as a prefix to confine to: its scheme folded, one trailing "/" (so
    "s3://team" never admits "s3://team-data"); None when it is not an object-store URL."""
    scheme, sep, rest = url.partition("://")
    folded = OBJECT_SCHEMES.get(scheme.lower())
    rest = rest.strip("/")
    if not sep or folded is None or not rest:
        return None
    return f"{folded}://{rest}/"


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _install_hint(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return "pip install -e '.[s3]' in the clone (or 'pipeline[s3]')"
    try:
        from fsspec.registry import known_implementations
    except ImportError:
        return "pip install fsspec and the fsspec backend for it"
    known = known_implementations.get(protocol)
    if known is None:
        return "pip install fsspec and the fsspec backend for it"
    package = known["class"].split(".")[0]
    return f"pip install {package}" if package != "fsspec" else known.get("err", "install its fsspec backend")


def check_url(url: str, where: str) -> None:
    """At job load, before anything is sent: fsspec and the URL's backend are installed."""
    protocol = _protocol(url)
    try:
        import fsspec
    except ImportError:
        raise JobError(f"{where}: {protocol}:// URLs need fsspec and its backend: {_install_hint(protocol)}") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        raise JobError(f"{where}: {protocol}:// URLs need their fsspec backend: {_install_hint(protocol)}") from None
    except ValueError:
        raise JobError(f"{where}: no fsspec backend knows {protocol}:// URLs; "
                       f"use a local folder or a URL such as s3://bucket/prefix") from None
