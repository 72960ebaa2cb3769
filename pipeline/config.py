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
    "LabelsConfig",
    "PricingConfig",
    "ImagesConfig",
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
    video_column: str | None = None  # a video (URL, data: URI, local file) or a list of frame images

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
    stream: bool = False  # send `stream: true` and assemble the SSE answer (pipeline.stream)

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
    max_response_mb: float = 64.0  # an answer larger than this (as sent or decompressed) is a failed attempt

    @property
    def max_response_bytes(self) -> int:
        return int(self.max_response_mb * (1 << 20))


@dataclass(frozen=True)
class ImagesConfig:
    """The `[images]` table: how image and video values become request parts (see media.py)."""

    image_mode: str = "url"  # "url": URLs go as they are; "inline": fetched here, sent as data URIs
    max_side: int = 0  # >0: downscale so the longer side is at most this (0 = off)
    max_pixels: int = 0  # >0: downscale so width*height is at most this (0 = off)
    jpeg_quality: int = 85  # for re-encoded images
    max_image_mb: float = 20.0  # per image, counted on the base64 text (OpenAI's limit)
    max_request_mb: float = 50.0  # all images and video of one request, base64
    max_aspect_ratio: float = 200.0  # longer side / shorter side (Qwen's resizer refuses more)
    max_source_mb: float = 50.0  # bytes read from one file or URL before decoding, at most
    allowed_roots: tuple[Path, ...] = ()  # besides the manifest's folder, where local files may be read
    fetch_concurrency: int = 8
    fetch_timeout_s: float = 30.0  # per attempt, redirects and body included
    fetch_retries: int = 2  # extra attempts on timeouts, connection errors, 5xx, 429
    max_redirects: int = 5
    block_private_addresses: bool = False  # refuse loopback, private, link-local hosts (untrusted manifests)
    video_frames_format: str = "vllm"  # a list of frames: "vllm" (data:video/jpeg) or "dashscope" ({"type":"video"})
    workers: int = 0  # processes (or threads) decoding and encoding images; 0 = one per CPU
    pool: str = "process"  # "process": low-priority worker processes (the loop never waits); "thread": threads

    def __post_init__(self) -> None:
        if self.image_mode not in ("url", "inline"):
            raise JobError(f"[images] image_mode must be \"url\" or \"inline\", not {self.image_mode!r}")
        if self.video_frames_format not in ("vllm", "dashscope"):
            raise JobError(f"[images] video_frames_format must be \"vllm\" or \"dashscope\", not {self.video_frames_format!r}")
        if self.pool not in ("process", "thread"):
            raise JobError(f"[images] pool must be \"process\" or \"thread\", not {self.pool!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise JobError(f"[images] jpeg_quality must be between 1 and 95, not {self.jpeg_quality}")
        if self.max_aspect_ratio < 1:
            raise JobError(f"[images] max_aspect_ratio must be 1 or more, not {self.max_aspect_ratio}")

    @property
    def preprocess(self) -> bool:
        """Rotate by EXIF, downscale and re-encode: only when a size bound is set."""
        return self.max_side > 0 or self.max_pixels > 0

    def request_shape(self) -> dict[str, Any] | None:
        """The settings that change what the model is shown; None when all are at their defaults
        (so checkpoints made before these settings existed stay valid)."""
        d = ImagesConfig()
        keys = ("image_mode", "max_side", "max_pixels", "jpeg_quality", "video_frames_format")
        shape = {k: getattr(self, k) for k in keys if getattr(self, k) != getattr(d, k)}
        return shape or None


@dataclass(frozen=True)
class OutputConfig:
    path: Path | str  # a str is an fsspec URL (s3://bucket/prefix): see pipeline.storage
    checkpoint: Path  # always a POSIX path: appends, fsync, flock
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials


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
class LabelsConfig:
    """A labeling job: the answer must be JSON following `schema`; its top-level fields are columns."""

    schema: dict[str, Any]
    max_invalid_retries: int = 2  # answers that fail the schema are asked again this many times
    send_response_format: bool = True  # False for endpoints that refuse `response_format`
    name: str = "labels"  # the json_schema name sent in response_format

    def __post_init__(self) -> None:
        from .labels import schema_problem

        problem = schema_problem(self.schema)
        if problem:
            raise JobError(f"[labels] schema: {problem}")
        if self.max_invalid_retries < 0:
            raise JobError(f"[labels] max_invalid_retries must be zero or more, not {self.max_invalid_retries}")


@dataclass(frozen=True)
class PricingConfig:
    """Prices per million tokens; reasoning tokens are output tokens (they are in completion_tokens)."""

    input_per_million: float | None = None  # the default, for a model not in `models`
    output_per_million: float | None = None
    models: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (input, output)
    budget: float | None = None  # stop sending before the job's spend could pass this

    def price(self, model: str | None, asked: str) -> tuple[float, float] | None:
        """(input, output) per million for the model that answered, else the one asked for."""
        for name in (model, asked):
            if name is not None and name in self.models:
                return self.models[name]
        if self.input_per_million is None or self.output_per_million is None:
            return None
        return self.input_per_million, self.output_per_million


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
    labels: LabelsConfig | None = None
    pricing: PricingConfig | None = None
    images: ImagesConfig = field(default_factory=ImagesConfig)

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
            # `stream` is left out: a streamed answer makes the same row as a non-streamed one.
            "labels": None if self.labels is None else {
                "schema": self.labels.schema, "response_format": self.labels.send_response_format, "name": self.labels.name,
            },
            "video_column": self.input.video_column,
            "images": self.images.request_shape(),
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
        video_column=sec.get("video_column", str, None),
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
        stream=sec.get("stream", bool, False),
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
        max_response_mb=sec.get("max_response_mb", float, d.max_response_mb),
    )
    for key in ("requests_per_minute", "max_concurrency", "max_attempts", "timeout_s", "burst", "breaker_failures",
                "breaker_seconds", "max_response_mb"):
        _positive(sec, key, getattr(limits, key))
    for key in ("tokens_per_minute", "max_retry_after_s", "image_token_estimate", "grace_s"):
        _positive(sec, key, getattr(limits, key), allow_zero=True)
    sec.finish()

    images = _images_config(_Section(src, "images", top.get("images", dict, {})), base)

    sec = _Section(src, "output", top.get("output", dict, required=True))
    output = _output(sec, base, name)
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

    labels = _labels(_Section(src, "labels", top.get("labels", dict, None)), base) if "labels" in data else None
    if labels is not None and labels.send_response_format and "response_format" in request.params:
        raise JobError(f"{src}: [request] response_format: [labels] sends it; remove one of them")
    pricing = _pricing(_Section(src, "pricing", top.get("pricing", dict, None)), endpoint, request) if "pricing" in data else None

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
        labels=labels,
        pricing=pricing,
        images=images,
    )


def _output(sec: _Section, base: Path, name: str) -> OutputConfig:
    """The part files may be a local folder or an fsspec URL; the checkpoint is always local."""
    from .storage import check_url, is_url

    out_text = sec.get("path", str, required=True)
    ckpt = sec.get("checkpoint", str, None)
    options = sec.get("storage_options", dict, {})
    if ckpt is not None and is_url(ckpt):
        raise JobError(f"{sec.where('checkpoint')}: must be a folder, not a URL (it needs appends, fsync and flock); "
                       f"put the checkpoint on a local disk or a filesystem every worker mounts, e.g. NFS")
    if out_text.startswith("file://"):
        out_text = out_text.removeprefix("file://")  # a local folder: written with rename and fsync
    if is_url(out_text):
        check_url(out_text, sec.where("path"))
        checkpoint = (base / ckpt).resolve() if ckpt else base / ".pipeline" / name
        return OutputConfig(path=out_text, checkpoint=checkpoint, storage_options=options)
    if options:
        raise JobError(f"{sec.where('storage_options')}: only used when [output] path is a URL (s3://...); remove it")
    out_path = (base / out_text).resolve()
    checkpoint = (base / ckpt).resolve() if ckpt else out_path.parent / ".pipeline" / name
    return OutputConfig(path=out_path, checkpoint=checkpoint)


def _labels(sec: _Section, base: Path) -> LabelsConfig:
    schema = sec.get("schema", (dict, str), required=True)
    if isinstance(schema, str):  # a path to a JSON file, relative to the job file
        path = (base / schema).resolve()
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise JobError(f"{sec.where('schema')}: cannot read {path} ({exc.strerror})") from None
        except ValueError as exc:
            raise JobError(f"{sec.where('schema')}: {path} is not valid JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise JobError(f"{sec.where('schema')}: {path} must hold a JSON object (a JSON Schema)")
    d = LabelsConfig.__dataclass_fields__
    cfg = LabelsConfig(
        schema=schema,
        max_invalid_retries=sec.get("max_invalid_retries", int, d["max_invalid_retries"].default),
        send_response_format=sec.get("send_response_format", bool, d["send_response_format"].default),
        name=sec.get("name", str, d["name"].default),
    )
    sec.finish()
    return cfg


def _pricing(sec: _Section, endpoint: EndpointConfig, request: RequestConfig) -> PricingConfig:
    def price(s: _Section, key: str) -> float | None:
        value = s.get(key, float, None)
        if value is not None:
            _positive(s, key, value, allow_zero=True)
        return value

    default_in, default_out = price(sec, "input_per_million"), price(sec, "output_per_million")
    if (default_in is None) != (default_out is None):
        raise JobError(f"{sec.where('input_per_million')}: give both input_per_million and output_per_million, or neither")
    models: dict[str, tuple[float, float]] = {}
    for model, table in sec.get("models", dict, {}).items():
        m = _Section(sec.source, f"pricing.models.{json.dumps(model)}", table)
        p_in, p_out = price(m, "input_per_million"), price(m, "output_per_million")
        if p_in is None or p_out is None:
            raise JobError(f"{m.where('input_per_million')}: both input_per_million and output_per_million are required")
        m.finish()
        models[model] = (p_in, p_out)
    budget = price(sec, "budget")
    sec.finish()
    cfg = PricingConfig(input_per_million=default_in, output_per_million=default_out, models=models, budget=budget)
    if cfg.price(None, endpoint.model) is None:
        raise JobError(
            f"{sec.source}: [pricing] has no price for the model {endpoint.model!r}; set input_per_million and "
            f"output_per_million, or add [pricing.models.\"{endpoint.model}\"]"
        )
    if budget is not None and request.max_tokens is None:
        raise JobError(
            f"{sec.where('budget')}: needs [request] max_tokens (without it a request's worst-case cost has no bound)"
        )
    return cfg


def _images_config(sec: _Section, base: Path) -> ImagesConfig:
    d = ImagesConfig()
    roots = sec.get("allowed_roots", list, [])
    for r in roots:
        if not isinstance(r, str) or not r:
            raise JobError(f"{sec.where('allowed_roots')} must be a list of folder paths, not {roots!r}")
    try:
        images = ImagesConfig(
            image_mode=sec.get("image_mode", str, d.image_mode),
            max_side=sec.get("max_side", int, d.max_side),
            max_pixels=sec.get("max_pixels", int, d.max_pixels),
            jpeg_quality=sec.get("jpeg_quality", int, d.jpeg_quality),
            max_image_mb=sec.get("max_image_mb", float, d.max_image_mb),
            max_request_mb=sec.get("max_request_mb", float, d.max_request_mb),
            max_aspect_ratio=sec.get("max_aspect_ratio", float, d.max_aspect_ratio),
            max_source_mb=sec.get("max_source_mb", float, d.max_source_mb),
            allowed_roots=tuple((base / r).resolve() for r in roots),
            fetch_concurrency=sec.get("fetch_concurrency", int, d.fetch_concurrency),
            fetch_timeout_s=sec.get("fetch_timeout_s", float, d.fetch_timeout_s),
            fetch_retries=sec.get("fetch_retries", int, d.fetch_retries),
            max_redirects=sec.get("max_redirects", int, d.max_redirects),
            block_private_addresses=sec.get("block_private_addresses", bool, d.block_private_addresses),
            video_frames_format=sec.get("video_frames_format", str, d.video_frames_format),
            workers=sec.get("workers", int, d.workers),
            pool=sec.get("pool", str, d.pool),
        )
    except JobError as exc:  # the dataclass names the table; add the file
        raise JobError(f"{sec.source}: {exc}") from None
    for key in ("max_image_mb", "max_request_mb", "max_source_mb", "fetch_concurrency", "fetch_timeout_s"):
        _positive(sec, key, getattr(images, key))
    for key in ("max_side", "max_pixels", "fetch_retries", "max_redirects", "workers"):
        _positive(sec, key, getattr(images, key), allow_zero=True)
    sec.finish()
    return images
