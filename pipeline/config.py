"""The job: frozen dataclasses built from a TOML job file and checked on construction.

    job = load_job("jobs/captions.toml")     # raises JobError naming the file and the key
    job.limits.requests_per_minute

Relative paths resolve against the job file's folder. Unknown keys are errors (a typo such as
`max_tokns` would otherwise silently change what is paid for), except in `[request]`, whose
other keys go into the request body as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import JobError

__all__ = [
    "Job",
    "InputConfig",
    "EndpointConfig",
    "RequestConfig",
    "LimitsConfig",
    "OutputConfig",
    "RunConfig",
    "load_job",
    "parse_job",
]

MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class _Section:
    """Reads one TOML table, remembering which keys were used so leftovers can be reported."""

    def __init__(self, source: str, name: str, data: Any) -> None:
        self.source, self.name = source, name
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise JobError(f"{source}: [{name}] must be a table")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.source}: [{self.name}] {key}" if self.name else f"{self.source}: {key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required or default is ...:
                raise JobError(f"{self.where(key)} is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML ints are fine where floats are wanted; bools are not ints here.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise JobError(f"{self.where(key)} must be {_kind_name(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise JobError(f"{self.where(key)} must be {_kind_name(kinds)}, not {type(value).__name__}")
        return value

    def rest(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in self.used}

    def finish(self) -> None:
        for key in self.rest():
            raise JobError(f"{self.where(key)}: unknown key (check the spelling; see README 'Job file')")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(section: _Section, key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and not math.isfinite(value)):
        raise JobError(f"{section.where(key)} must be {'zero or more' if allow_zero else 'more than zero'}, not {value}")


@dataclass(frozen=True)
class InputConfig:
    path: Path
    format: str
    id_column: str | None = None
    image_column: str | None = None
    prompt_column: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("csv", "jsonl", "parquet"):
            raise JobError(f"[input] path: unsupported manifest format {self.format!r}; use .csv, .jsonl or .parquet")


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str
    model: str
    api_key_env: str | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class RequestConfig:
    system_prompt: str | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    image_detail: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # passed into the body as is

    def __post_init__(self) -> None:
        if self.image_detail not in (None, "low", "high", "auto"):
            raise JobError(f"[request] image_detail must be \"low\", \"high\" or \"auto\", not {self.image_detail!r}")


@dataclass(frozen=True)
class LimitsConfig:
    requests_per_minute: float = 60.0
    tokens_per_minute: float = 0.0  # 0 = off
    burst: int = 1  # requests allowed at once on top of the smooth pace
    max_concurrency: int = 8
    max_attempts: int = 5
    timeout_s: float = 120.0
    max_retry_after_s: float = 120.0  # cap on a server-requested delay
    image_token_estimate: int = 1000  # per image, for tokens_per_minute before usage is known
    breaker_failures: int = 50  # consecutive failed attempts that mean "endpoint down"
    breaker_seconds: float = 120.0  # ... or this long with no success while failing
    grace_s: float = 10.0  # Ctrl-C/SIGTERM: how long in-flight requests may finish


@dataclass(frozen=True)
class OutputConfig:
    path: Path
    checkpoint: Path


@dataclass(frozen=True)
class RunConfig:
    shard_rows: int = 10_000
    engine: str = "local"  # "local": this process; "ray": the shards run as Ray tasks
    ray_address: str | None = None  # engine "ray": a running cluster ("auto", "host:port"); None starts a local Ray
    ray_workers: int = 0  # engine "ray": shards running at once; 0 = one per CPU of the cluster

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise JobError(f"[run] engine {self.engine!r} is not available; use \"local\" or \"ray\"")
        if self.ray_workers < 0:
            raise JobError(f"[run] ray_workers must be zero (one per CPU) or more, not {self.ray_workers}")


@dataclass(frozen=True)
class Job:
    name: str
    source: Path  # the job file
    input: InputConfig
    endpoint: EndpointConfig
    request: RequestConfig
    limits: LimitsConfig
    output: OutputConfig
    run: RunConfig
    serve: dict[str, Any] | None = None  # present: the run starts the built-in endpoint itself

    def request_shape(self) -> dict[str, Any]:
        """What shapes a request's answer; a change here invalidates the checkpoint's answers.

        Limits, paths and the base URL (the built-in endpoint's port changes per run) are left
        out on purpose: they may change freely between runs.
        """
        return {
            "model": self.endpoint.model,
            "system_prompt": self.request.system_prompt,
            "prompt": self.request.prompt,
            "max_tokens": self.request.max_tokens,
            "image_detail": self.request.image_detail,
            "params": self.request.params,
            "image_column": self.input.image_column,
            "prompt_column": self.input.prompt_column,
            "id_column": self.input.id_column,
        }

    def shape_digest(self) -> str:
        blob = json.dumps(self.request_shape(), sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def api_key(self) -> str | None:
        """The key from the environment; never stored anywhere by the pipeline."""
        if not self.endpoint.api_key_env:
            return None
        return os.environ.get(self.endpoint.api_key_env) or None


def load_job(path: str | os.PathLike[str], *, require_key: bool = True) -> Job:
    """Read and check a job file. Every problem is a JobError with one line naming file and key."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{source}: job file not found") from None
    except OSError as exc:
        raise JobError(f"{source}: cannot read the job file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{source}: not valid TOML ({exc})") from None
    return parse_job(data, source, require_key=require_key)


def parse_job(data: dict[str, Any], source: Path, *, require_key: bool = True) -> Job:
    src = str(source)
    base = source.resolve().parent  # relative paths in the file resolve against its folder
    top = _Section(src, "", data)
    name = top.get("name", str, required=True)
    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise JobError(f"{src}: name must be a plain non-empty name without slashes, not {name!r}")

    sec = _Section(src, "input", top.get("input", dict, required=True))
    in_path = (base / sec.get("path", str, required=True)).resolve()
    fmt = MANIFEST_FORMATS.get(in_path.suffix.lower())
    if fmt is None:
        raise JobError(f"{sec.where('path')}: unsupported manifest type {in_path.suffix!r}; use .csv, .jsonl or .parquet")
    input_cfg = InputConfig(
        path=in_path,
        format=fmt,
        id_column=sec.get("id_column", str, None),
        image_column=sec.get("image_column", str, None),
        prompt_column=sec.get("prompt_column", str, None),
    )
    sec.finish()

    serve = top.get("serve", dict, None)
    sec = _Section(src, "endpoint", top.get("endpoint", dict, required=True))
    base_url = sec.get("base_url", str, None if serve is not None else ...)
    if base_url is None:
        base_url = "http://127.0.0.1:0/v1"  # replaced by the started built-in endpoint's address
    elif not base_url.startswith(("http://", "https://")):
        raise JobError(f"{sec.where('base_url')} must start with http:// or https://, not {base_url!r}")
    endpoint = EndpointConfig(
        base_url=base_url,
        model=sec.get("model", str, required=True),
        api_key_env=sec.get("api_key_env", str, None),
    )
    sec.finish()
    if require_key and endpoint.api_key_env and not os.environ.get(endpoint.api_key_env):
        raise JobError(
            f"{src}: [endpoint] api_key_env: the variable {endpoint.api_key_env} is not set; "
            f"export {endpoint.api_key_env}=... before running"
        )

    sec = _Section(src, "request", top.get("request", dict, {}))
    max_tokens = sec.get("max_tokens", int, None)
    if max_tokens is not None:
        _positive(sec, "max_tokens", max_tokens)
    request = RequestConfig(
        system_prompt=sec.get("system_prompt", str, None),
        prompt=sec.get("prompt", str, None),
        max_tokens=max_tokens,
        image_detail=sec.get("image_detail", str, None),
        params={},
    )
    params = sec.rest()
    for reserved in ("model", "messages"):
        if reserved in params:
            raise JobError(f"{sec.where(reserved)}: set by the pipeline; remove it from [request]")
    request = RequestConfig(**{**asdict(request), "params": params})
    if request.prompt is None and input_cfg.prompt_column is None:
        raise JobError(f"{src}: [request] prompt is required when [input] has no prompt_column")

    sec = _Section(src, "limits", top.get("limits", dict, {}))
    d = LimitsConfig()
    limits = LimitsConfig(
        requests_per_minute=sec.get("requests_per_minute", float, d.requests_per_minute),
        tokens_per_minute=sec.get("tokens_per_minute", float, d.tokens_per_minute),
        burst=sec.get("burst", int, d.burst),
        max_concurrency=sec.get("max_concurrency", int, d.max_concurrency),
        max_attempts=sec.get("max_attempts", int, d.max_attempts),
        timeout_s=sec.get("timeout_s", float, d.timeout_s),
        max_retry_after_s=sec.get("max_retry_after_s", float, d.max_retry_after_s),
        image_token_estimate=sec.get("image_token_estimate", int, d.image_token_estimate),
        breaker_failures=sec.get("breaker_failures", int, d.breaker_failures),
        breaker_seconds=sec.get("breaker_seconds", float, d.breaker_seconds),
        grace_s=sec.get("grace_s", float, d.grace_s),
    )
    for key in ("requests_per_minute", "max_concurrency", "max_attempts", "timeout_s", "burst", "breaker_failures", "breaker_seconds"):
        _positive(sec, key, getattr(limits, key))
    for key in ("tokens_per_minute", "max_retry_after_s", "image_token_estimate", "grace_s"):
        _positive(sec, key, getattr(limits, key), allow_zero=True)
    sec.finish()

    sec = _Section(src, "output", top.get("output", dict, required=True))
    out_text = sec.get("path", str, required=True)
    if "://" in out_text:  # fsspec URLs: the checkpoint needs appends, flock and atomic renames
        raise JobError(f"{sec.where('path')}: URLs ({out_text.split('://')[0]}://...) are not supported yet; "
                       f"use a folder on a filesystem every worker can reach (a local disk, or an NFS mount for a cluster)")
    out_path = (base / out_text).resolve()
    ckpt = sec.get("checkpoint", str, None)
    checkpoint = (base / ckpt).resolve() if ckpt else out_path.parent / ".pipeline" / name
    output = OutputConfig(path=out_path, checkpoint=checkpoint)
    sec.finish()

    sec = _Section(src, "run", top.get("run", dict, {}))
    run = RunConfig(
        shard_rows=sec.get("shard_rows", int, RunConfig.shard_rows),
        engine=sec.get("engine", str, "local"),
        ray_address=sec.get("ray_address", str, None),
        ray_workers=sec.get("ray_workers", int, 0),
    )
    _positive(sec, "shard_rows", run.shard_rows)
    sec.finish()

    top.finish()
    return Job(
        name=name,
        source=source,
        input=input_cfg,
        endpoint=endpoint,
        request=request,
        limits=limits,
        output=output,
        run=run,
        serve=serve,
    )
