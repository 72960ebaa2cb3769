"""The `[serve]` table: how the built-in endpoint (`pipeline/tools/serve/`) behaves, and the names
of the faults it can inject.

    [serve]                                   # the run starts the endpoint itself
    latency_ms = 150
    faults = { "500" = 0.05, "drop" = 0.03 }  # by seeded chance
    row_faults = { "cat" = "503:2" }          # rows whose prompt holds "cat": their first two requests

The same table is `pipeline serve --options-json` and what tests and benchmarks start. It lives
here, with the other tables, so that reading a job file never imports the endpoint (aiohttp's
server) and the README's key list covers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import JobError
from .fields import Table, between, one_of, positive, read_table, setting, zero_or_more

__all__ = ["ServeOptions", "FAULTS", "TRANSFERS", "REASONING_FIELDS", "RATE_HEADER_STYLES", "BATCH_OUTCOMES"]

# What each does: the docstring of pipeline/tools/serve/__init__.py.
FAULTS = (
    "400", "401", "500", "503", "429", "429ms", "429date", "429reset", "429bare", "quota", "throttle",
    "drop", "cut", "broken", "nochoices", "slow", "length",
    "stream_end", "stream_error", "stream_error_vllm", "no_usage", "invalid_json",
    "null_text", "gzip_bomb", "huge", "bad_utf8", "echo_key", "answer_echoes_key", "redirect",
)
TRANSFERS = ("length", "chunked", "gzip")
REASONING_FIELDS = ("content", "reasoning_content", "reasoning")
RATE_HEADER_STYLES = ("retry-after", "retry-after-ms", "http-date", "reset", "none")
BATCH_OUTCOMES = ("completed", "failed", "expired")


def _unknown_fault(names: list[str]) -> str | None:
    for name in names:
        if name not in FAULTS:
            return f"names an unknown fault {name!r}; known: {', '.join(FAULTS)}"
    return None


def _fault_names(faults: dict[str, float]) -> str | None:
    return _unknown_fault(list(faults))


def _row_fault_names(row_faults: dict[str, str]) -> str | None:
    """Values are FAULT or FAULT:N (only a row's first N requests)."""
    return _unknown_fault([spec.split(":")[0] for spec in row_faults.values()])


def _should_retry(headers: dict[str, str]) -> str | None:
    for name, value in headers.items():
        if name not in FAULTS or value not in ("true", "false"):
            return f'must map a fault name to "true" or "false", not {name!r} = {value!r}'
    return None


def _schedule(value: Any, where: str, base: Path) -> tuple[tuple[float, int], ...]:
    """[[seconds, capacity], ...] from the job file (the type alone would read capacities as numbers)."""
    if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and not any(isinstance(x, bool) for x in p)
            and isinstance(p[0], (int, float)) and isinstance(p[1], int) for p in value):
        raise JobError(f"{where} must be a list of [seconds, capacity] pairs, e.g. [[10, 8], [25, 32]], not {value!r}")
    return tuple((float(t), n) for t, n in value)


def _schedule_order(schedule: tuple[tuple[float, int], ...]) -> str | None:
    times = [t for t, _ in schedule]
    if any(t < 0 for t in times) or times != sorted(times) or any(n < 0 for _, n in schedule):
        return f"must give [seconds, capacity] pairs in time order, none negative, not {[list(p) for p in schedule]}"
    return None


def _http_errors(line_faults: dict[str, int]) -> str | None:
    for needle, status in line_faults.items():
        if not 400 <= status <= 599:
            return f"must map prompt text to an HTTP error status (400 to 599), not {needle!r} = {status}"
    return None


@dataclass(frozen=True)
class ServeOptions(Table):
    TABLE = "serve"
    host: str = setting("127.0.0.1", doc="the address the endpoint listens on")
    tls_cert: Path | None = setting(None, doc="with tls_key: serve https with this PEM certificate (tests through proxies)")
    tls_key: Path | None = setting(None, doc="the certificate's PEM private key")
    port: int = setting(0, doc="0: any free port (a run's endpoint says which)", check=between(0, 65535))
    latency_ms: float = setting(0.0, doc="every answer this much later", check=zero_or_more)
    latency_jitter_ms: float = setting(0.0, doc="plus a seeded random delay up to this", check=zero_or_more)
    model: str | None = setting(None, doc="the model it says it served; none: the one asked for")
    reasoning_field: str = setting("content", check=one_of(*REASONING_FIELDS),
                                   doc='where reasoning goes: "content" (a `<think>` block first), "reasoning_content" or "reasoning"')
    answer_bytes: int = setting(0, doc="more than 0: each answer padded to about this size (benchmarks)", check=zero_or_more)
    analyze_images: bool = setting(True, doc="describe inlined images' size and colours (Pillow)")
    fetch_images: bool = setting(False, doc="fetch http(s) image URLs as a provider does (GET, 10 s, 20 MB) and describe "
                                            "what came, with its sha256; one that cannot be fetched is a 400 naming the "
                                            "URL, as OpenAI answers (the endpoint reaches only what this machine does)")
    usage_details: bool = setting(True, doc="usage has prompt_tokens_details (cached_tokens, image_tokens) and "
                                            "completion_tokens_details (reasoning_tokens); off: both null, as many servers send")
    cached_prompt_tokens: int = setting(0, doc="each answer reports this many of its prompt tokens (at most all) as read "
                                               "from a prompt cache (cached_tokens)", check=zero_or_more)
    api_key: str | None = setting(None, doc="set: requests without this bearer key get 401")
    rate_limit: int = setting(0, doc="requests per rate_window_s, over a sliding window (then 429); 0: unlimited",
                              check=zero_or_more)
    rate_window_s: float = setting(60.0, doc="the rate limit's window", check=positive)
    rate_headers: str = setting("retry-after", check=one_of(*RATE_HEADER_STYLES),
                                doc='how a 429 over the limit gives its delay: "retry-after", "retry-after-ms", "http-date", '
                                    '"reset" (x-ratelimit-reset-requests) or "none" (no x-ratelimit-* headers either)')
    # A GPU server's model (`pipeline/tools/serve/capacity.py`): a bounded number of requests worked on at once.
    capacity: int = setting(0, doc="at most this many requests worked on at once (each for the latency), the rest "
                                   "waiting in arrival order; 0: unlimited. At run time: POST /admin/capacity",
                            check=zero_or_more)
    queue_limit: int | None = setting(None, doc="with capacity: a request arriving when this many wait gets a 503 at once "
                                                "(0: no queue); none: the queue is unbounded", check=zero_or_more)
    batch_latency_growth: float = setting(0.0, doc="with capacity: latency_ms x (1 + this x (busy - 1) / capacity), busy "
                                                   "counting the request itself, as a batching GPU server slows with its batch",
                                          check=zero_or_more)
    capacity_schedule: tuple[tuple[float, int], ...] = setting(
        (), parse=_schedule, check=_schedule_order,
        doc="[[seconds, capacity], ...]: the capacity from that many seconds after the start (or POST /stats/reset), "
            "e.g. [[10, 8], [25, 32]]")
    seed: int = setting(0, doc="seeds the faults' chances and the latency's jitter")
    faults: dict[str, float] = setting(default_factory=dict, check=_fault_names,
                                       doc='fault name -> chance per request, e.g. { "500" = 0.05, "drop" = 0.03 } '
                                           '(the names and what they do: `pipeline/tools/serve/`)')
    row_faults: dict[str, str] = setting(default_factory=dict, check=_row_fault_names,
                                         doc='prompt text -> the fault its rows always get, or "503:2" for their first two requests')
    slow_ms: float = setting(5000.0, doc='how late the "slow" fault answers', check=zero_or_more)
    row_latency_ms: dict[str, float] = setting(default_factory=dict, doc="prompt text -> extra delay for those rows' answers")
    fault_retry_after_s: float = setting(1.0, doc="the delay injected 429s ask for", check=zero_or_more)
    x_should_retry: dict[str, str] = setting(default_factory=dict, check=_should_retry,
                                             doc='fault name -> "true"/"false": the x-should-retry header on its answers')
    record: bool = setting(False, doc="keep every request (headers and body) for GET /requests: tests only")
    reasoning_only_stream: bool = setting(False, doc="refuse requests without `stream: true` (like DashScope's QVQ)")
    row_answers: dict[str, str] = setting(default_factory=dict,
                                          doc="prompt text -> the answer those rows get instead of the composed one (a "
                                              "labeling job's JSON, say): known answers to rehearse `pipeline compare` with")
    fence_json: bool = setting(False, doc="JSON answers (labeling) inside a json code fence")
    vary_labels: bool = setting(False, doc="labeling answers vary with the prompt (an enum value, a number in range), "
                                           "so a rehearsal's labels have a distribution; off: an enum's first value, 0.5")
    transfer: str = setting("length", check=one_of(*TRANSFERS),
                            doc='how plain answers are framed: "length", "chunked" or "gzip" (chunked, compressed)')
    keepalive_s: float = setting(75.0, doc="idle connections are closed after this (uvicorn/vLLM: 5 s)", check=positive)
    bomb_mb: int = setting(1024, doc="what the gzip_bomb fault inflates to", check=positive)
    huge_mb: float = setting(80.0, doc="the size of the huge fault's answer (the client's default cap is 64 MB)",
                             check=positive)
    # The Batch API (/v1/files, /v1/batches): a batch's status follows from the time since it was created.
    batch_validating_s: float = setting(0.2, doc="Batch API: how long a batch is `validating`", check=zero_or_more)
    batch_in_progress_s: float = setting(0.5, doc="Batch API: how long a batch is `in_progress` (its lines are done "
                                                  "evenly over it, in file order)", check=zero_or_more)
    batch_finalizing_s: float = setting(0.2, doc="Batch API: how long a batch is `finalizing` before `completed`",
                                        check=zero_or_more)
    batch_cancelling_s: float = setting(0.2, doc="Batch API: how long a cancelled batch is `cancelling` before `cancelled`",
                                        check=zero_or_more)
    batch_max_bytes: int = setting(200 * 1024 * 1024, doc="Batch API: a larger input file fails the batch (OpenAI: 200 MB)",
                                   check=positive)
    batch_max_lines: int = setting(50_000, doc="Batch API: more requests in a file fail the batch (OpenAI: 50,000)",
                                   check=positive)
    batch_line_faults: dict[str, int] = setting(default_factory=dict, check=_http_errors,
                                                doc="Batch API: prompt text -> the HTTP status its lines fail with "
                                                    "(in the error file), e.g. { \"cat\" = 500 }")
    batch_outcome: str = setting("completed", check=one_of(*BATCH_OUTCOMES),
                                 doc='Batch API: "completed", "failed" (every batch fails validation) or "expired" (after '
                                     "`in_progress`, with only `batch_expire_fraction` of its lines done)")
    batch_expire_fraction: float = setting(0.5, doc="Batch API: the share of an expired batch's lines that were done",
                                           check=between(0, 1))
    batch_shuffle_output: bool = setting(False, doc="Batch API: output and error files in a seeded shuffled order, "
                                                    "not the input's")

    def validate(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise JobError("[serve] tls_cert and tls_key go together: set both, or neither")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "pipeline serve") -> ServeOptions:
        """Read by the job file's machinery: types, unknown keys and the file named in errors."""
        return read_table(cls, data, source=source, base=Path.cwd())
