"""`pipeline cache [DIR] stats|prune|clear`: a request cache folder looked at and trimmed, printed
as lines or JSON (the work is pipeline.io.cachefile's).

    code = cache_command(Path("~/.cache/pipeline"), "prune", older_than="30d", max_gb=5.0)
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ..config import load_job
from ..config.sections import default_cache_folder
from ..durations import parse_duration
from ..errors import JobError
from ..io.cachefile import clear, prune, stats

__all__ = ["cache_command"]


def cache_command(folder: Path | None, action: str, *, older_than: str | None = None, max_gb: float | None = None,
                  as_json: bool = False) -> int:
    where = _folder(folder)
    if action != "prune" and (older_than is not None or max_gb is not None):
        raise JobError(f"--older-than and --max-gb go with prune, not {action}")
    try:
        if action == "stats":
            result = stats(where)
        elif action == "clear":
            result = clear(where)
        else:
            result = prune(where, **_limits(older_than, max_gb))
    except FileNotFoundError as exc:
        raise JobError(f"{exc}; give the folder a job's [run] cache names (or the job file)") from None
    except sqlite3.Error as exc:
        raise JobError(f"the request cache in {where} cannot be read ({exc}); if it is damaged, delete it") from None
    print(json.dumps(result, indent=1) if as_json else _render(action, where, result))
    return 0


def _folder(folder: Path | None) -> Path:
    if folder is None:
        return default_cache_folder()
    if folder.suffix == ".toml":
        cache = load_job(folder, require_key=False).run.cache
        if cache is None:
            raise JobError(f"{folder}: the job has no [run] cache")
        return cache
    return folder.expanduser()


def _limits(older_than: str | None, max_gb: float | None) -> dict[str, Any]:
    if older_than is None and max_gb is None:
        raise JobError('prune: say what to remove: --older-than 30d, --max-gb 5, or both')
    limits: dict[str, Any] = {}
    if older_than is not None:
        seconds = parse_duration(older_than)
        if seconds is None:
            raise JobError(f'--older-than must be a duration like "30d" or "12h", not {older_than!r}')
        limits["older_than_s"] = seconds
    if max_gb is not None:
        if max_gb < 0:
            raise JobError(f"--max-gb must be zero or more, not {max_gb:g}")
        limits["max_bytes"] = int(max_gb * 1e9)
    return limits


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} hours"


def _render(action: str, where: Path, r: dict[str, Any]) -> str:
    if action == "stats":
        rate = "no run recorded yet" if r["recent_hit_rate"] is None else \
            f"{100 * r['recent_hit_rate']:.1f}% over the last {r['recent_runs']} runs"
        return (f"cache {where}: {r['entries']:,} entries, {_size(r['bytes'])} of answers (the file: "
                f"{_size(r['file_bytes'])}); oldest entry {_age(r['oldest_entry_age_s'])} old, least recently used "
                f"{_age(r['least_recently_used_age_s'])} ago; hit rate {rate}")
    return (f"cache {where}: removed {r['removed']:,} entries ({_size(r['freed_bytes'])} of answers); the file went "
            f"from {_size(r['file_bytes_before'])} to {_size(r['file_bytes_after'])}")
