"""Config declared once (issue 13): each table's fields drive reading, checks and the README's key
list. Tables of TOML values and the one-line errors they give."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from pipeline.config import AUTO, Auto, ImagesConfig, LimitsConfig, ServeOptions, job_keys_markdown, parse_job
from pipeline.errors import ErrorKind, JobError, error_kinds_markdown
from pipeline.net.retry import STOP_KINDS

BASE: dict[str, Any] = {
    "name": "t",
    "input": {"path": "m.csv", "image_column": "image"},
    "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
    "request": {"prompt": "Describe"},
    "output": {"path": "out"},
}


def job(**tables: Any) -> Any:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for name, value in tables.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return parse_job(data, Path("/jobs/a.toml"))


@pytest.mark.parametrize("tables, message", [
    ({"limits": {"max_concurency": 3}}, "/jobs/a.toml: [limits] max_concurency: unknown key"),
    ({"colour": "blue"}, "/jobs/a.toml: colour: unknown key"),
    ({"limits": {"requests_per_minute": True}}, "[limits] requests_per_minute must be a number, not a boolean"),
    ({"limits": {"requests_per_minute": "fast"}}, "[limits] requests_per_minute must be a number or \"auto\", not 'fast'"),
    ({"limits": {"max_concurrency": "many"}}, "[limits] max_concurrency must be a number or \"auto\", not 'many'"),
    ({"limits": {"max_concurrency": 2.5}}, "[limits] max_concurrency must be an integer, not float"),
    ({"limits": {"max_concurrency": 0}}, "/jobs/a.toml: [limits] max_concurrency must be more than zero, not 0"),
    ({"limits": {"grace_s": -1}}, "[limits] grace_s must be zero or more, not -1.0"),
    ({"limits": {"timeout_s": float("inf")}}, "[limits] timeout_s must be more than zero, not inf"),
    ({"images": {"image_mode": "base64"}}, '[images] image_mode must be "url", "inline" or "presign", not \'base64\''),
    ({"images": {"jpeg_quality": 100}}, "[images] jpeg_quality must be between 1 and 95, not 100"),
    ({"images": {"allowed_roots": "/data"}}, "[images] allowed_roots must be a list, not str"),
    ({"request": {"image_detail": "max"}}, '[request] image_detail must be "low", "high" or "auto"'),
    ({"request": {"model": "x"}}, "[request] model: set by the pipeline; remove it from [request]"),
    ({"endpoint": {"base_url": "ftp://x"}}, "[endpoint] base_url must start with http:// or https://"),
    ({"input": {"path": "m.xlsx"}}, "[input] path unsupported manifest type '.xlsx'"),
    ({"run": {"engine": "spark"}}, '[run] engine must be "local" or "ray", not \'spark\''),
    ({"name": "../x"}, "name must be a plain non-empty name without slashes"),
    ({"limits": 3}, "[limits] must be a table"),
    ({"serve": {"latency": 5}}, "/jobs/a.toml: [serve] latency: unknown key"),
    ({"serve": {"faults": {"teapot": 0.5}}}, "/jobs/a.toml: [serve] faults names an unknown fault 'teapot'; known: 400"),
    ({"serve": {"row_faults": {"cat": "teapot:2"}}}, "[serve] row_faults names an unknown fault 'teapot'; known: 400"),
    ({"serve": {"x_should_retry": {"500": "yes"}}}, '[serve] x_should_retry must map a fault name to "true" or "false"'),
    ({"serve": {"transfer": "pigeon"}}, '[serve] transfer must be "length", "chunked" or "gzip", not \'pigeon\''),
    ({"serve": {"rate_window_s": 0}}, "/jobs/a.toml: [serve] rate_window_s must be more than zero, not 0"),
    ({"serve": {"latency_ms": "slow"}}, "[serve] latency_ms must be a number, not str"),
    ({"output": {"path": "out", "storage_options": {"key": "k"}}}, "[output] storage_options: only used when"),
    ({"pricing": {"input_per_million": 1.0}}, "give both input_per_million and output_per_million"),
    ({"pricing": {"models": {"m": {"input_per_million": 1.0}}}}, '[pricing.models."m"] output_per_million is required'),
])
def test_bad_values_are_one_line_errors_naming_file_table_and_key(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError) as caught:
        job(**tables)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_values_are_read_by_their_declared_types() -> None:
    j = job(limits={"requests_per_minute": 120, "burst": 2}, images={"allowed_roots": ["imgs", "/data/x"]},
            request={"temperature": 0.2, "max_tokens": 9}, run={"shard_rows": 50})
    assert j.limits.requests_per_minute == 120.0 and isinstance(j.limits.requests_per_minute, float)
    assert j.images.allowed_roots == (Path("/jobs/imgs"), Path("/data/x"))  # relative to the job file
    assert j.request.params == {"temperature": 0.2} and j.request.max_tokens == 9  # undeclared keys go to the body
    assert j.input.path == Path("/jobs/m.csv") and j.input.format == "csv"
    assert j.output.checkpoint == Path("/jobs/.pipeline/t")
    assert j.limits.max_concurrency == LimitsConfig().max_concurrency  # defaults come from the one declaration


def test_auto_limits_are_read_as_a_typed_value_not_a_string() -> None:
    j = job(limits={"requests_per_minute": "auto", "tokens_per_minute": "auto", "max_concurrency": "auto"})
    for value in (j.limits.requests_per_minute, j.limits.tokens_per_minute, j.limits.max_concurrency):
        assert isinstance(value, Auto) and value == AUTO and not isinstance(value, str)
    assert j.limits.auto_rate and j.limits.auto_concurrency and j.limits.counts_tokens
    assert j.limits.workers == j.limits.max_concurrency_cap
    # built in code with the job file's word: the same typed value
    assert LimitsConfig(max_concurrency="auto").max_concurrency is AUTO  # type: ignore[arg-type]  # the file's word
    plain = job(limits={"requests_per_minute": 90})
    assert not plain.limits.auto_rate and not plain.limits.counts_tokens and plain.limits.workers == 8
    with pytest.raises(JobError, match=r'\[limits\] tokens_per_minute must be a number or "auto"'):
        LimitsConfig(tokens_per_minute="lots")  # type: ignore[arg-type]  # what a job file may say


def test_checks_run_on_construction_from_code_too() -> None:
    with pytest.raises(JobError, match=r"\[images\] max_image_mb must be more than zero"):
        ImagesConfig(max_image_mb=0)
    with pytest.raises(JobError, match=r"\[serve\] transfer must be"):
        ServeOptions(transfer="pigeon")


def test_the_jobs_secrets_are_one_list_of_credentials_never_settings_or_notify_arguments(monkeypatch) -> None:
    # Console, report, object store and endpoint client all hide Job.secrets(): what it holds is what
    # no output shows, and what it leaves out can never be rewritten in an answer.
    monkeypatch.setenv("PIPE_KEY", "sk-the-key-0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-aws-secret")
    j = job(endpoint={"api_key_env": "PIPE_KEY", "proxy": "http://u:proxy-pw-77@proxy:3128",
                      "headers": {"x-portkey-api-key": "pk-SECRET-123456", "x-litellm-tags": "captions"}},
            input={"storage_options": {"key": "in-key-AKIA", "acl": "private"}},
            output={"path": "s3://b/out", "storage_options": {"secret": "out-secret-x", "region_name": "eu-west-1"}},
            notify={"command": ["/bin/page", "--team", "vision"], "webhook": "https://hooks.example/T0/B0/xyz"})
    secrets = set(j.secrets())
    assert {"sk-the-key-0001", "proxy-pw-77", "pk-SECRET-123456", "in-key-AKIA", "out-secret-x", "env-aws-secret",
            "https://hooks.example/T0/B0/xyz"} <= secrets
    assert not secrets & {"captions", "private", "eu-west-1", "--team", "vision", "/bin/page"}


def test_no_secret_is_in_the_jobs_repr() -> None:
    # A notebook cell showing the job (or a saved .ipynb) holds its repr: no secret header, no proxy
    # password, no storage credential, no webhook.
    j = job(endpoint={"proxy": "http://u:proxy-pw-77@proxy:3128",
                      "headers": {"x-portkey-api-key": "pk-SECRET-123456", "x-litellm-tags": "captions"}},
            input={"storage_options": {"key": "in-key-AKIA"}},
            output={"path": "s3://AKIAOUT:out-secret-x@b/out", "storage_options": {"secret": "out-secret-y"}},
            notify={"command": ["/bin/page", "--token", "notify-tok-1"], "webhook": "https://hooks.example/T0/B0/xyz"})
    shown = repr(j)
    for secret in ("pk-SECRET-123456", "proxy-pw-77", "in-key-AKIA", "out-secret-x", "out-secret-y", "notify-tok-1",
                   "hooks.example"):
        assert secret not in shown, secret
    assert "x-portkey-api-key" in shown and "captions" in shown and "proxy:3128" in shown  # what is not secret stays


def test_the_readme_lists_every_error_kind_as_the_enum_declares_it() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"<!-- kinds:start -->\n(.*)<!-- kinds:end -->", readme, re.S)
    assert listed is not None and listed.group(1) == error_kinds_markdown(), "README's error kinds are stale"
    assert [k.value for k in ErrorKind if k.retryable] == ["rate_limit", "server", "timeout", "connection", "invalid_response"]
    assert {k.value for k in ErrorKind if k.stops} == STOP_KINDS == {"quota", "auth"}


def test_the_readme_lists_every_key_as_declared() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"<!-- keys:start -->\n(.*)<!-- keys:end -->", readme, re.S)
    assert listed is not None, "README has no generated key list"
    assert listed.group(1) == job_keys_markdown(), "README's key list is stale: paste `python -m pipeline.config` into it"
    for key in ("max_concurrency", "allowed_roots", "shard_rows", "send_response_format", "input_per_million",
                "row_faults"):
        assert f"| `{key}` |" in listed.group(1)


def test_a_bad_serve_table_stops_pipeline_serve_with_one_line() -> None:
    """`pipeline serve --options-json` (how runs and tests start the endpoint) reads the same table."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--options-json", '{"rate_headers": "soon"}'],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ('error: pipeline serve: [serve] rate_headers must be "retry-after", "retry-after-ms", '
                           '"http-date", "reset" or "none", not \'soon\'\n')


def test_reading_a_job_with_a_serve_table_does_not_load_the_endpoint() -> None:
    """The [serve] table is checked by config alone: `pipeline status` and dry runs stay light."""
    code = ("import sys; from pipeline.config import load_job; job = load_job('jobs/demo.toml', require_key=False); "
            "assert job.serve is not None; "
            "print(sorted(m for m in sys.modules if m.startswith(('pipeline.tools', 'aiohttp.web'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
