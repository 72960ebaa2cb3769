"""The built-in endpoint: an OpenAI-compatible /v1/chat/completions (and /v1/responses) to rehearse a job for free.

    pipeline serve --port 8000 --latency-ms 200
    python -c "from pipeline.tools.serve import ServeOptions, make_app"   # or in-process: an aiohttp app

It answers in the seed's response shape, a `<think>` block first, describing what it can really
see: for inlined images their format, size and main colours (Pillow); for URLs only the URL, as
it has no network; for video parts (`video_url`, DashScope's `video`) their kind and size; for audio
parts (`input_audio`, vLLM's `audio_url`) what libsndfile decodes of them: format, length, sample
rate, channels (`audio.py`; 10 prompt tokens a second, as `audio_tokens`). POST /v1/responses
answers the same as the Responses API (`responses.py`: plain, streamed as typed events, and in
the Batch API). It can behave like a real provider under load or failing:

- `rate_limit` requests per `rate_window_s`, enforced over a sliding window: over it, a 429 whose
  delay is given in the `rate_headers` style, with x-ratelimit-* headers on every answer;
- a GPU server (`capacity`): at most `capacity` requests in service at once, each for the latency
  (`batch_latency_growth`: longer as more are in service), the rest queued in arrival order; past
  `queue_limit` waiting, a 503 at once (OpenAI's "overloaded" error, its delay in the `rate_headers`
  style). POST /admin/capacity `{"capacity": N}` or `capacity_schedule` changes it while serving;
  /stats reports `capacity`, `in_service`, `max_in_service`, `queued_now`, `max_queued`, `queue_rejected`;
- faults by seeded chance (`faults = {"500": 0.05, "drop": 0.03, ...}`) or by row
  (`row_faults = {"text in the prompt": "400"}`, or `"503:2"` for the first two requests only).
  Fault names: 400, 401, 500, 503, 429 (Retry-After seconds), 429ms, 429date, 429reset,
  429bare (no delay header at all), quota, throttle (DashScope's AllocationQuota), drop
  (connection closed, no answer), cut (body cut midway), broken (200, not JSON), nochoices, slow
  (answer after `slow_ms`), length (thinking cut off by max_tokens). Injected 429s ask for
  `fault_retry_after_s`; `x_should_retry = {"500": "false"}` adds that header to a fault's answers;
  `row_latency_ms = {"text in the prompt": 500}` answers those rows (any answer) that much later;
- streaming (`"stream": true` in the request): the same answer as SSE with `:` comment lines and,
  when `stream_options.include_usage`, a last usage chunk; faults `cut` (connection closed midway),
  `stream_end` (the stream ends cleanly before finish_reason and [DONE]), `stream_error` (an OpenAI
  `{"error": ...}` chunk midway), `stream_error_vllm` (vLLM's `{"object": "error"}`), `no_usage` (no
  usage chunk; without streaming, no usage field). `reasoning_only_stream` refuses requests without
  streaming with a 400, as DashScope does for its QVQ models;
- hostile answers, to prove the client's bounds (`pipeline/net/client.py`): `null_text` (content parts,
  one with `"text": null`, then the answer's text part; streamed: a delta whose content is such a
  list), `gzip_bomb` (a ~1 MB gzip body, sent whatever the request accepts, that inflates to
  `bomb_mb` MB of zeros inside a JSON string; built once, in a thread), `huge` (an answer of
  `huge_mb` MB, over the client's default cap, written in 64 KB pieces: chunked, or with its
  Content-Length under `transfer = "length"`), `bad_utf8` (a 200 whose answer text ends with the
  invalid bytes FF FE FD), `answer_echoes_key` (a 200 whose answer quotes the presented Authorization header),
  `echo_key` (a 400 whose message echoes the presented Authorization
  header, padded so it straddles the 500th character, where clients cut messages), `redirect` (a
  307 to /redirected/... on this server, which counts in /stats `redirects_followed` whoever
  follows it);
- labeling: a request with a `json_schema` response_format is answered with a JSON object built from
  the schema (first enum value, 0.5, a short text...), after the think block, in a ```json fence with
  `fence_json`; fault `invalid_json` answers values of the wrong kinds instead;
- the Batch API (/v1/files, /v1/batches in OpenAI's shapes): a batch is validated, in progress,
  finalizing and completed at the pace of `batch_validating_s`, `batch_in_progress_s` and
  `batch_finalizing_s`, its answers composed as online ones; `batch_line_faults`, `batch_outcome`
  ("failed", "expired"), `batch_shuffle_output` and cancels rehearse what a batch executor meets;
  POST /admin/batch_clock `{"advance_s": N}` ages every batch N seconds at once (tests);
- usage as OpenAI reports it: `prompt_tokens` (85 per image or video, the text at four characters
  a token), `completion_tokens`, and the details `prompt_tokens_details.image_tokens` (85 per image),
  `prompt_tokens_details.cached_tokens` (a fixed `cached_prompt_tokens` per answer, at most its
  prompt: a prompt cache that always hits, so costs are computable by hand) and
  `completion_tokens_details.reasoning_tokens` (the reasoning text's tokens). `usage_details = false`
  sends both details as null, as vLLM and many gateways do;
- GET /stats: requests per row (keyed by the prompt text), statuses, requests over the limit, files
  uploaded and batches created (each with its status and custom_ids);
  with `record`, GET /requests lists each request with its arrival time, row and status.

Its parts: `app.py` (the routes, and the order in which a request meets the key check, the rate
window, the capacity gate, its fault and its latency), `rate.py` (the sliding window and its
headers), `capacity.py` (places in service, the queue, the schedule), `state.py`
(what the endpoint counts and keeps), `faults.py` (which fault a request gets, and the error
answers), `completion.py` (the answer composed from what the request shows), `audio.py` (what it hears),
`responses.py` (/v1/responses), `delivery.py` (how
it is sent: plain or streamed, cut or broken), `hostile.py` (the hostile 200s), `process.py`
(serving forever, or as a run's child process), `batchroutes.py`, `batches.py` and `batchfile.py`
(the Batch API's routes, its files and batches, their lines). Its options and fault names:
`pipeline/config/serve.py` (the `[serve]` table).
"""

from ...config.serve import ServeOptions
from .app import make_app
from .process import serve_forever, start_subprocess

__all__ = ["ServeOptions", "make_app", "serve_forever", "start_subprocess"]
