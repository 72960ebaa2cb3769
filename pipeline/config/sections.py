"""The job file's tables, each a frozen dataclass declared once (see fields.py): type, default,
check and doc of every key live on its field.

Relative paths resolve against the job file's folder (or the working directory for a job given
as a dict). `[request]` is the one table whose undeclared keys are not errors: they go into the
request body as they are (`params`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..durations import parse_duration
from ..errors import JobError
from ..redact import secret_name
from .fields import (
    AUTO,
    Auto,
    Table,
    at_least,
    between,
    choice,
    one_of,
    positive,
    read_value,
    setting,
    zero_or_more,
)
from .apis import Api
from .headers import headers_problem
from .inputs import MANIFEST_FORMATS, InputConfig
from .labels import LabelsConfig, schema_problem
from .proxy import ProxyError, parse_proxy
from .urls import check_url, display, is_url, object_prefix

__all__ = [
    "InputConfig", "EndpointConfig", "RequestConfig", "LimitsConfig", "ImagesConfig", "OutputConfig",
    "RunConfig", "LabelsConfig", "MANIFEST_FORMATS", "AUTO", "Auto", "DEFAULT_OUTPUT_TOKENS",
    "schema_problem", "default_cache_folder",
]

DEFAULT_OUTPUT_TOKENS = 1024  # a request's output, for estimates, when max_tokens is unset


def _or_auto(check: Any) -> Any:
    """A number as `check` says, or AUTO."""
    return lambda v: None if isinstance(v, Auto) else (f'must be a number or "auto", not {v!r}' if isinstance(v, str) else check(v))


def _number_or_auto(kind: type) -> Any:
    """Reads a number (of `kind`) or the word "auto" (as AUTO); any other text names both choices."""
    def parse(value: Any, where: str, base: Path) -> Any:
        if isinstance(value, str):
            if value != str(AUTO):
                raise JobError(f'{where} must be a number or "auto", not {value!r}')
            return AUTO
        return read_value(value, kind, where, base)
    return parse


def _proxy_problem(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    try:
        parse_proxy(value, "proxy")
    except ProxyError as err:
        return f"is not usable ({str(err).removeprefix('proxy: ')})"
    return None


@dataclass(frozen=True)
class EndpointConfig(Table):
    TABLE = "endpoint"
    model: str = setting(doc="the model asked for")
    base_url: str | None = setting(None, doc="e.g. https://api.openai.com/v1; required unless the job has [serve]",
                                   check=lambda v: None if v is None or v.startswith(("http://", "https://"))
                                   else f"must start with http:// or https://, not {v!r}")
    api_key_env: str | None = setting(None, doc="the environment variable holding the key (never the key itself)")
    proxy: str | None = setting(None, check=_proxy_problem,
                                doc='"http://user:password@host:port": every request (endpoint, image fetches) goes '
                                    'through it, NO_PROXY still applies; "": none, whatever HTTPS_PROXY says; unset: '
                                    'HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY as curl reads them')
    api: Api = setting(Api.CHAT, parse=choice(Api), check=lambda v: None if isinstance(v, Api) else f"must be an Api, not {v!r}",
                       doc='"chat": POST /chat/completions; "responses": POST /responses (OpenAI\'s Responses API)')
    headers: dict[str, str] = setting(default_factory=dict, check=headers_problem,
                                      doc='extra headers sent with every request, e.g. {"OpenAI-Project" = "proj_..."}; '
                                          'part of the request cache\'s key unless billing or tracing only, a secret '
                                          '(its name says key, token, ...) hashed there and scrubbed from every output')

    def __repr__(self) -> str:  # a secret header's value and the proxy's password never (a notebook saves its output)
        headers = {name: "[secret]" if secret_name(name) else value for name, value in self.headers.items()}
        proxy = display(self.proxy) if self.proxy else self.proxy
        return (f"EndpointConfig(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r}, "
                f"proxy={proxy!r}, headers={headers!r})")

    @property
    def url(self) -> str:
        assert self.base_url is not None, "a [serve] job's base_url is set when its endpoint starts"
        return self.base_url.rstrip("/") + self.api.path


@dataclass(frozen=True)
class RequestConfig(Table):
    TABLE = "request"
    system_prompt: str | None = setting(None, doc="the system message")
    prompt: str | None = setting(None, doc="the user text when there is no prompt_column; may hold {column} placeholders")
    max_tokens: int | None = setting(None, doc="output tokens per answer, reasoning included", check=positive)
    image_detail: str | None = setting(None, doc='"low", "high" or "auto", passed with each image',
                                       check=one_of("low", "high", "auto"))
    stream: bool = setting(False, doc="send `stream: true` and assemble the answer (models that only stream)")
    params: dict[str, Any] = setting(default_factory=dict, key=False,
                                     doc="every other key: into the request body as is (temperature, top_p, ...)")

    def validate(self) -> None:
        for reserved in ("model", "messages"):
            if reserved in self.params:
                raise JobError(f"[request] {reserved}: set by the pipeline; remove it from [request]")


@dataclass(frozen=True)
class LimitsConfig(Table):
    TABLE = "limits"
    requests_per_minute: float | Auto = setting(60.0, check=_or_auto(positive), parse=_number_or_auto(float),
                                               doc='paced smoothly: never a minute\'s quota in one second; "auto": the '
                                                   "provider's x-ratelimit-limit-requests, less a margin")
    tokens_per_minute: float | Auto = setting(0.0, check=_or_auto(zero_or_more), parse=_number_or_auto(float),
                                             doc='0: no token limit; "auto": the provider\'s x-ratelimit-limit-tokens')
    burst: int = setting(1, doc="requests allowed at once on top of the smooth pace", check=positive)
    max_concurrency: int | Auto = setting(8, check=_or_auto(positive), parse=_number_or_auto(int), doc='requests in flight; "auto": found from the '
                                         "server's latency, growing while it stays flat (up to max_concurrency_cap)")
    max_concurrency_cap: int = setting(256, doc='max_concurrency = "auto": the most requests in flight it may reach',
                                       check=positive)
    max_attempts: int = setting(5, doc="per row, the first included; a rate-limit 429 does not spend one", check=positive)
    max_rate_limit_wait_s: float = setting(
        600.0, check=positive,
        doc="how long one row may be refused by rate-limit 429s (it waits its turn again meanwhile); past it the "
            "row fails as rate_limit, or the run stops (exit 3, rows pending) if nothing was answered meanwhile")
    timeout_s: float = setting(120.0, doc="per attempt", check=positive)
    max_retry_after_s: float = setting(120.0, doc="the longest server-asked delay honoured", check=zero_or_more)
    image_token_estimate: int = setting(1000, doc="tokens per image, for tokens_per_minute and cost estimates before usage is known",
                                        check=zero_or_more)
    breaker_failures: int = setting(50, doc='failed attempts in a row that mean "the endpoint is down" (exit 3)', check=positive)
    breaker_seconds: float = setting(120.0, doc="... or this long failing with no success", check=positive)
    breaker_refusals: int = setting(
        5, check=zero_or_more,
        doc="refusals (400/404/422) all alike, from every part of the manifest, with nothing answered, that stop "
            "the run as a wrong job (key behind a gateway, model, base_url): exit 3, rows pending; 0: never")
    grace_s: float = setting(10.0, doc="on Ctrl-C/SIGTERM, how long requests in flight may finish", check=zero_or_more)
    max_response_mb: float = setting(64.0, doc="an answer larger than this (as sent or decompressed) is a failed attempt",
                                     check=positive)

    def __post_init__(self) -> None:
        for name in _AUTO_LIMITS:  # built in code with the word, as the job file says it: the typed value
            if getattr(self, name) == str(AUTO):
                object.__setattr__(self, name, AUTO)
        super().__post_init__()

    @property
    def max_response_bytes(self) -> int:
        return int(self.max_response_mb * (1 << 20))

    @property
    def auto_concurrency(self) -> bool:
        return isinstance(self.max_concurrency, Auto)

    @property
    def workers(self) -> int:
        """Requests that may be in flight at most (the workers): the cap when found automatically."""
        return self.max_concurrency_cap if isinstance(self.max_concurrency, Auto) else self.max_concurrency

    @property
    def auto_rate(self) -> bool:
        return isinstance(self.requests_per_minute, Auto) or isinstance(self.tokens_per_minute, Auto)

    def fixed_rate(self) -> tuple[float, float]:
        """Requests and tokens per minute as numbers: a Ray cluster's pace ("auto" is refused
        for it when the job is loaded, as one process finds it)."""
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if isinstance(rpm, Auto) or isinstance(tpm, Auto):
            raise JobError('[limits]: "auto" limits are found by one process; give numbers')
        return rpm, tpm

    @property
    def counts_tokens(self) -> bool:
        """Whether requests are paced by tokens too (a number above zero, or "auto")."""
        return isinstance(self.tokens_per_minute, Auto) or self.tokens_per_minute > 0


_AUTO_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrency")


def _object_prefixes(value: Any, where: str, base: Path) -> tuple[str, ...]:
    """A list of object-store prefixes, each folded to "<scheme>://bucket[/prefix]/"."""
    if not isinstance(value, list):
        raise JobError(f'{where} must be a list of URLs like ["s3://bucket/prefix/"], not {value!r}')
    out = []
    for item in value:
        prefix = object_prefix(item) if isinstance(item, str) else None
        if prefix is None:
            raise JobError(f'{where}: {item!r} is not an object-store prefix (s3://, gs:// or az://bucket[/prefix])')
        out.append(prefix)
    return tuple(out)


@dataclass(frozen=True)
class ImagesConfig(Table):
    """How image and video values become request parts (see rows/media.py)."""

    TABLE = "images"
    image_mode: str = setting("url", check=one_of("url", "inline", "presign"),
                              doc='"url": URLs go as they are; "inline": fetched here, sent as data URIs; "presign": '
                                  "s3:// (gs://) URIs go as presigned https URLs the provider fetches (object URIs are "
                                  "read and inlined otherwise)")
    max_side: int = setting(0, doc="> 0: downscale so the longer side is at most this", check=zero_or_more)
    max_pixels: int = setting(0, doc="> 0: downscale so width x height is at most this", check=zero_or_more)
    jpeg_quality: int = setting(85, doc="for re-encoded images", check=between(1, 95))
    max_image_mb: float = setting(20.0, doc="per image, counted on the base64 text (OpenAI's limit)", check=positive)
    max_request_mb: float = setting(50.0, doc="all images and video of one request, base64", check=positive)
    max_aspect_ratio: float = setting(200.0, doc="longer side / shorter side (Qwen's resizer refuses more)", check=at_least(1))
    max_source_mb: float = setting(50.0, doc="bytes read from one file or URL before decoding, at most", check=positive)
    allowed_roots: tuple[Path, ...] = setting((), doc="besides the manifest's folder, where local files may be read")
    allowed_buckets: tuple[str, ...] = setting(
        (), parse=_object_prefixes,
        doc='object-store prefixes image URIs may name, e.g. ["s3://team-data/"]; besides the manifest\'s own '
            "bucket prefix when it is in one (otherwise none: s3://, gs://, az:// cells are refused until allowed)")
    presign_expiry_s: float = setting(3600.0, check=between(60, 7 * 86400),
                                      doc='image_mode "presign": how long a URL stays valid, plus [limits] timeout_s x '
                                          "max_attempts (a row's attempts share one URL); SigV4 allows 7 days at most")
    fetch_concurrency: int = setting(8, doc="inline fetches at once", check=positive)
    fetch_timeout_s: float = setting(30.0, doc="per fetch attempt, redirects and body included", check=positive)
    fetch_retries: int = setting(2, doc="extra attempts on timeouts, connection errors, 5xx, 429", check=zero_or_more)
    max_redirects: int = setting(5, doc="per fetch", check=zero_or_more)
    block_private_addresses: bool = setting(False, doc="refuse loopback, private and link-local hosts (untrusted manifests)")
    video_frames_format: str = setting("vllm", doc='a list of frames: "vllm" (data:video/jpeg) or "dashscope" ({"type": "video"})',
                                       check=one_of("vllm", "dashscope"))
    workers: int = setting(0, doc="processes (or threads) preparing images; 0: one per CPU", check=zero_or_more)
    pool: str = setting("process", doc='"process": low-priority worker processes; "thread": threads',
                        check=one_of("process", "thread"))

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


def _output_path(value: Any, where: str, base: Path) -> Path | str:
    if not isinstance(value, str) or not value:
        raise JobError(f"{where} must be a folder path or a URL, not {value!r}")
    value = value.removeprefix("file://")  # a local folder: written with rename and fsync
    if is_url(value):
        check_url(value, where)
        return value
    return (base / value).resolve()


def _checkpoint_path(value: Any, where: str, base: Path) -> Path | str:
    """A folder, or a URL whose fsspec backend sends conditional writes to the server (s3://)."""
    if not isinstance(value, str) or not value:
        raise JobError(f"{where} must be a folder path or a URL, not {value!r}")
    value = value.removeprefix("file://")
    if not is_url(value):
        return (base / value).resolve()
    check_url(value, where)
    if value.split("://", 1)[0].lower() not in ("s3", "s3a"):
        raise JobError(f"{where}: {value.split('://', 1)[0]}:// cannot hold a checkpoint yet (it needs a create-if-absent "
                       f"and a compare-and-swap write the server checks, wired here for S3 only); use an s3:// URL or "
                       f"a folder")
    return value.rstrip("/")


@dataclass(frozen=True)
class OutputConfig(Table):
    TABLE = "output"
    path: Path | str = setting(doc="a folder of Parquet part files, or an fsspec URL (s3://bucket/prefix)", parse=_output_path)
    checkpoint: Path | str | None = setting(
        None, parse=_checkpoint_path,
        doc="a folder, or an s3:// URL (a Ray cluster without a shared disk); none: <output's parent>/.pipeline/<name>, "
            "or <job file's folder>/.pipeline/<name> for a URL output")
    checkpoint_flush_s: float = setting(2.0, check=positive,
                                        doc="a URL checkpoint: how often answers reach it (a kill -9 costs the rows "
                                            "answered within this interval, beside those in flight)")
    checkpoint_lease_s: float = setting(60.0, check=at_least(1.0),
                                        doc="a URL checkpoint: the run's lease on the job, renewed every quarter of it; "
                                            "a killed run's is taken over 1.25x this after its last renewal")
    storage_options: dict[str, Any] = setting(default_factory=dict, doc="a URL output or checkpoint only: passed to "
                                              "fsspec (may hold credentials)")
    report: bool = setting(False, doc="write <output>/_report.html at the end of every run (needs the report extra)")
    keep_media: bool = setting(False, doc="copy image bytes held in the manifest into the output; false: a reference "
                                          "instead (the HF Image's path, else sha256:<hex> of the bytes)")

    def validate(self) -> None:
        if self.storage_options and not isinstance(self.path, str) and not isinstance(self.checkpoint, str):
            raise JobError("[output] storage_options: only used when [output] path or checkpoint is a URL (s3://...); "
                           "remove it")

    def __repr__(self) -> str:  # storage_options may hold credentials
        path = display(self.path) if isinstance(self.path, str) else self.path  # a URL's user:password@ never
        return f"OutputConfig(path={path!r}, checkpoint={self.checkpoint!r})"


def default_cache_folder() -> Path:
    """`[run] cache = true`'s folder (and `pipeline cache`'s when given none)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pipeline"


def _cache_folder(value: Any, where: str, base: Path) -> Path | None:
    """`true`: the user's cache folder; `false`: off; a path (`~` expanded, relative to the job file)."""
    if value is False:
        return None
    if value is True:
        return default_cache_folder()
    if not isinstance(value, str) or not value or is_url(value):
        raise JobError(f"{where} must be a folder path, true or false, not {value!r}")
    return (base / Path(value).expanduser()).resolve()


def _duration_s(value: Any, where: str, base: Path) -> float:
    """Seconds (a number), or a duration such as "7d", "12h", "1h30m", "90s"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    seconds = parse_duration(value) if isinstance(value, str) else None
    if seconds is None:
        raise JobError(f'{where} must be seconds or a duration like "12h" or "7d", not {value!r}')
    return seconds


@dataclass(frozen=True)
class RunConfig(Table):
    TABLE = "run"
    shard_rows: int = setting(10_000, doc="rows per shard: the unit of work and of commit", check=positive)
    engine: str = setting("local", doc='"local": this process; "ray": the shards run as Ray tasks', check=one_of("local", "ray"))
    ray_address: str | None = setting(None, doc='engine "ray": a running cluster ("auto", "host:port"); none: a local Ray')
    ray_workers: int = setting(0, doc='engine "ray": shards running at once; 0: one per CPU of the cluster', check=zero_or_more)
    mode: str = setting("online", doc='"online": requests as rows stream; "batch": the provider\'s Batch API (half price, '
                                      'answers within batch_window)', check=one_of("online", "batch"))
    batch_max_requests: int = setting(50_000, doc='mode "batch": requests per batch file (the provider\'s cap)', check=positive)
    batch_max_mb: float = setting(200.0, doc='mode "batch": bytes per batch file, in MB (the provider\'s cap)', check=positive)
    batch_window: str = setting("24h", doc='mode "batch": the completion_window asked for',
                                check=lambda v: None if re.fullmatch(r"[1-9][0-9]*h", v) else f"must be hours like \"24h\", not {v!r}")
    poll_s: float = setting(60.0, doc='mode "batch": the longest wait between two looks at a running batch', check=positive)
    wait: bool = setting(True, doc='mode "batch": wait until every batch has ended; false: submit, collect, exit 5 (cron)')
    cache: Path | None = setting(None, parse=_cache_folder,
                                 doc='a folder for the request cache (answers reused when the request sent is the same); '
                                     'true: $XDG_CACHE_HOME/pipeline or ~/.cache/pipeline; false or unset: off')
    cache_ttl: float | None = setting(None, parse=_duration_s, check=positive,
                                      doc='cached answers older than this are not used: seconds, or "12h", "7d", "1d12h"; '
                                          'unset: never too old')
    cache_max_gb: float = setting(10.0, doc="the cache's size cap; past it, the least recently used answers are dropped",
                                  check=positive)
    metrics_port: int | None = setting(None, check=between(1, 65535),
                                       doc="serve Prometheus metrics on this port (/metrics) while the run lasts")
    metrics_host: str = setting("0.0.0.0", doc="metrics_port: the address it listens on (\"127.0.0.1\": this machine only)")
    metrics_file: Path | None = setting(None, check=lambda v: None if v is None or v.name.endswith(".prom") else
                                        f"must end in .prom (node_exporter's textfile collector reads only those), not {v.name!r}",
                                        doc="write the same metrics to this file every few seconds and at the end "
                                            "(node_exporter's textfile collector)")
    metrics_linger_s: float = setting(0.0, check=zero_or_more,
                                      doc="metrics_port: after the run, keep serving the final figures until one scrape "
                                          "has read them, for at most this long")

    def validate(self) -> None:
        if self.mode == "batch" and self.engine != "local":
            raise JobError('[run] mode: "batch" runs on the local engine (the provider does the work); remove engine')
        if self.cache is not None and (self.mode == "batch" or self.engine == "ray"):
            where = 'mode = "batch"' if self.mode == "batch" else 'engine = "ray"'
            raise JobError(f"[run] cache: not used with [run] {where} yet; remove cache (or set it to false)")
