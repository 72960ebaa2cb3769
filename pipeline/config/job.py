"""The job: a TOML job file (or a dict shaped like one) read into frozen tables, checked before
anything is sent.

    job = load_job("jobs/captions.toml")     # JobError naming the file, the table and the key
    job.limits.requests_per_minute
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import JobError
from ..redact import storage_secrets
from .fields import Table, keys_markdown, read_table, setting
from .apis import Api
from .headers import endpoint_secrets
from .sections import (
    EndpointConfig,
    ImagesConfig,
    InputConfig,
    LabelsConfig,
    LimitsConfig,
    OutputConfig,
    RequestConfig,
    RunConfig,
)
from .audio import AudioConfig
from .notify import NotifyConfig
from .pricing import ModelPrice, PricingConfig
from .proxy import Proxy, ProxyChoice, ProxyError
from .serve import ServeOptions

__all__ = ["Job", "load_job", "parse_job", "job_keys_markdown"]


def _plain_name(value: str) -> str | None:
    if not value or any(c in value for c in "/\\\0") or value.startswith("."):
        return f"must be a plain non-empty name without slashes, not {value!r}"
    return None


@dataclass(frozen=True)
class _TopLevel(Table):
    """The job file's top-level keys besides its tables (for the key list)."""

    name: str = setting(doc="names the job; its checkpoint and lock live under it", check=_plain_name)


@dataclass(frozen=True)
class Job:
    name: str
    source: Path  # the job file (for a job given as a dict: <working directory>/<name>.toml, never read)
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
    audio: AudioConfig = field(default_factory=AudioConfig)
    notify: NotifyConfig | None = None  # who is told when a run ends
    # A job whose manifest is given in memory (the Python API's manifest=): [input] path is where
    # it is stored, in the checkpoint folder, and relative local image paths resolve against
    # `files_base` (the working directory) instead of the manifest's folder.
    in_memory: bool = False
    files_base: Path | None = None
    # Which proxy each request goes through, chosen once from `[endpoint] proxy` and the
    # environment as the job was loaded: a run never mixes two environments, and a job pickled to
    # a Ray worker carries the choice made where it was loaded.
    proxy_choice: ProxyChoice = field(default_factory=lambda: ProxyChoice(None, os.environ), compare=False, repr=False)

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
            # Keys added later are there only when set, so checkpoints made before them stay valid.
            **({"api": str(self.endpoint.api)} if self.endpoint.api is not Api.CHAT else {}),
            **({"audio_column": self.input.audio_column, "audio": self.audio.request_shape()}
               if self.input.audio_column else {}),
        }

    def shape_digest(self) -> str:
        blob = json.dumps(self.request_shape(), sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def checkpoint(self) -> Path | str:
        """Where the checkpoint lives: `[output] checkpoint` (a folder, or a bucket URL), or its
        default, set when the job is loaded (pipeline.io.checkpoint.open_checkpoint opens it)."""
        if self.output.checkpoint is None:
            raise JobError("[output] checkpoint: not set; build the job with load_job or parse_job")
        return self.output.checkpoint

    def api_key(self) -> str | None:
        """The key from the environment; never stored anywhere by the pipeline."""
        if not self.endpoint.api_key_env:
            return None
        return os.environ.get(self.endpoint.api_key_env) or None

    def secrets(self) -> list[str]:
        """Everything no message, log, journaled row, cached answer, report or file of this job may
        show: the key, the proxies' passwords, secret [endpoint] headers, the storage credentials
        of input and output (and the backends' credential variables), the [notify] webhook."""
        return [*endpoint_secrets(self.api_key(), None, self.endpoint.headers), *self.proxies().secrets(),
                *storage_secrets({"input": self.input.storage_options, "output": self.output.storage_options}),
                *(self.notify.secrets() if self.notify is not None else ())]

    def proxies(self) -> ProxyChoice:
        """Which proxy each request goes through: `[endpoint] proxy` and the environment when the job was loaded."""
        return self.proxy_choice

    def endpoint_proxy(self) -> Proxy | None:
        """The endpoint's proxy; never one for the built-in endpoint a [serve] run starts on loopback."""
        return None if self.serve is not None else self.proxies().for_url(self.endpoint.url)

    def with_base_url(self, base_url: str) -> Job:
        """The same job sent to another address (the built-in endpoint, once started)."""
        return replace(self, endpoint=replace(self.endpoint, base_url=base_url))


def load_job(path: str | os.PathLike[str] | dict[str, Any], *, require_key: bool = True,
             input_optional: bool = False) -> Job:
    """Read and check a job file, or a dict shaped like one (relative paths then resolve against
    the working directory). Every problem is a JobError with one line naming file and key.
    `input_optional`: [input] path may be left out (the Python API gives the manifest in memory)."""
    if isinstance(path, dict):
        name = path.get("name")
        source = Path.cwd() / f"{name if isinstance(name, str) and name else 'job'}.toml"  # never read
        return parse_job(path, source, require_key=require_key, input_optional=input_optional)
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
    return parse_job(data, source, require_key=require_key, input_optional=input_optional)


IN_MEMORY_PATH = "manifest.parquet"  # [input] path of a job whose manifest comes in memory, until it is stored
_TABLES = ("input", "endpoint", "request", "limits", "images", "audio", "output", "run", "labels", "pricing", "serve",
           "notify")


def parse_job(data: dict[str, Any], source: Path, *, require_key: bool = True, input_optional: bool = False) -> Job:
    """A job from the parsed TOML (or a dict of the same shape). Relative paths resolve against
    the folder of `source`."""
    src = str(source)
    base = source.resolve().parent
    in_memory = input_optional and not (isinstance(data.get("input"), dict) and "path" in data["input"])
    if in_memory:  # a stand-in, replaced by the stored manifest's path when the manifest is given
        data = {**data, "input": {**(data.get("input") or {}), "path": IN_MEMORY_PATH}}
    top = read_table(_TopLevel, {k: v for k, v in data.items() if k not in _TABLES}, source=src, base=base)
    for name in _TABLES:
        if name in data and not isinstance(data[name], dict):
            raise JobError(f"{src}: [{name}] must be a table")
    for name in ("input", "endpoint", "output"):
        if name not in data:
            raise JobError(f"{src}: {name} is required")

    def table(cls: type[Any], **kw: Any) -> Any:
        return read_table(cls, data.get(cls.TABLE), source=src, base=base, **kw)

    serve = data.get("serve")
    endpoint = _endpoint(table(EndpointConfig), serve, src, require_key)
    proxies = ProxyChoice(endpoint.proxy, os.environ)  # the environment read once, now
    if require_key and serve is None:  # a proxy variable that cannot be used is named now, not per row
        try:
            proxies.for_url(endpoint.url)
        except ProxyError as err:
            raise JobError(f"{src}: {err}") from None
    request = table(RequestConfig, rest="params")
    input_cfg = table(InputConfig)
    if request.prompt is None and input_cfg.prompt_column is None:
        raise JobError(f"{src}: [request] prompt is required when [input] has no prompt_column")
    labels = table(LabelsConfig) if "labels" in data else None
    if labels is not None and labels.send_response_format and "response_format" in request.params:
        raise JobError(f"{src}: [request] response_format: [labels] sends it; remove one of them")
    pricing = _pricing(table(PricingConfig), endpoint, request, src) if "pricing" in data else None
    run = table(RunConfig)
    limits = table(LimitsConfig)
    if run.engine == "ray" and (limits.auto_rate or limits.auto_concurrency):
        raise JobError(f'{src}: [limits]: "auto" limits are found by one process; with [run] engine = "ray" give numbers')
    _api_fits(endpoint, input_cfg, request, src)
    if run.mode == "batch" and request.stream:
        raise JobError(f"{src}: [request] stream: a batch request is answered whole; remove stream for [run] mode = \"batch\"")
    if run.mode == "batch" and pricing is not None and pricing.budget is not None:
        raise JobError(f"{src}: [pricing] budget: not enforced in [run] mode = \"batch\" yet (a batch is paid as a whole); "
                       f"remove budget, or split the manifest")
    images = table(ImagesConfig)
    if run.mode == "batch" and images.image_mode == "presign":
        raise JobError(f'{src}: [images] image_mode: "presign" is not used in [run] mode = "batch" (its request files, '
                       f'kept in the checkpoint, would hold the signatures); use "inline" or "url"')
    if serve is not None:
        table(ServeOptions)  # a bad [serve] table is reported now, not when its endpoint starts
    return Job(
        name=top.name, source=source, input=input_cfg, endpoint=endpoint, request=request, limits=limits,
        output=_output(table(OutputConfig), base, top.name), run=run, serve=serve, labels=labels,
        pricing=pricing, images=images, audio=table(AudioConfig), in_memory=in_memory, proxy_choice=proxies,
        notify=table(NotifyConfig) if "notify" in data else None,
    )


def _endpoint(endpoint: EndpointConfig, serve: Any, src: str, require_key: bool) -> EndpointConfig:
    if endpoint.base_url is None:
        if serve is None:
            raise JobError(f"{src}: [endpoint] base_url is required")
        endpoint = replace(endpoint, base_url="http://127.0.0.1:0/v1")  # replaced by the started endpoint's address
    if require_key and endpoint.api_key_env and not os.environ.get(endpoint.api_key_env):
        raise JobError(f"{src}: [endpoint] api_key_env: the variable {endpoint.api_key_env} is not set; "
                       f"export {endpoint.api_key_env}=... before running")
    return endpoint


def _api_fits(endpoint: EndpointConfig, inp: InputConfig, request: RequestConfig, src: str) -> None:
    """What the Responses API cannot take is named now, not as a 400 on every row."""
    if endpoint.api is not Api.RESPONSES:
        return
    for key, what in (("video_column", "video"), ("audio_column", "audio")):
        if getattr(inp, key) is not None:
            raise JobError(f'{src}: [input] {key}: the Responses API takes no {what}; use [endpoint] api = "chat"')
    for reserved in ("input", "instructions"):
        if reserved in request.params:
            raise JobError(f'{src}: [request] {reserved}: set by the pipeline for [endpoint] api = "responses"; remove it')


def _output(output: OutputConfig, base: Path, name: str) -> OutputConfig:
    """The checkpoint's default: beside a local output, beside the job file for a URL."""
    if output.checkpoint is not None:
        return output
    folder = base if isinstance(output.path, str) else output.path.parent
    return replace(output, checkpoint=folder / ".pipeline" / name)


def _pricing(pricing: PricingConfig, endpoint: EndpointConfig, request: RequestConfig, src: str) -> PricingConfig:
    if pricing.price(None, endpoint.model) is None:
        raise JobError(
            f"{src}: [pricing] has no price for the model {endpoint.model!r}; set input_per_million and "
            f"output_per_million, or add [pricing.models.\"{endpoint.model}\"]"
        )
    if pricing.budget is not None and request.max_tokens is None:
        raise JobError(f"{src}: [pricing] budget: needs [request] max_tokens (without it a request's worst-case cost has no bound)")
    return pricing


def job_keys_markdown() -> str:
    """The README's list of every job-file key (tests/test_config.py keeps the README in step)."""
    return keys_markdown([_TopLevel, InputConfig, EndpointConfig, RequestConfig, LimitsConfig, ImagesConfig, AudioConfig,
                          OutputConfig, RunConfig, LabelsConfig, PricingConfig, ModelPrice, ServeOptions, NotifyConfig])
