"""The Batch API's files line by line: an uploaded JSONL input checked as OpenAI checks it (each
problem an error with its code, message, param and line), and the lines of the output and error
files. Each answer is composed by `completion.py` exactly as an online request with the same body
would be, so a batch run and an online run give the same rows.

    requests, errors = read_input(data, "/v1/chat/completions", opts)   # errors: the batch fails
    output, failed = answer_lines(requests, opts, batch_id, done=len(requests), expired=False)
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

from ...config.serve import ServeOptions
from .completion import Media, completion, user_parts
from .responses import as_response, chat_view

__all__ = ["Request", "read_input", "answer_lines", "line_fault", "jsonl", "MAX_ERRORS"]

MAX_ERRORS = 1000  # a file of broken lines reports this many, not one per line
_DUPLICATE = ("The custom_id for this request is a duplicate of another request. The custom_id parameter must be "
              "unique for each request in a batch.")
# A line fault's status -> (message, type, code) of the error body in its error-file line.
_LINE_ERRORS = {
    400: ("Invalid image: the provider could not read it", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
    500: ("The server had an error processing your request", "server_error", None),
    503: ("The engine is currently overloaded", "server_error", None),
}


@dataclass(frozen=True)
class Request:
    """One valid line of an input file: its line number (from 1), custom_id and body (for
    /v1/responses, `chat` is the chat body it amounts to; else None)."""

    line: int
    custom_id: str
    body: dict[str, Any]
    prompt: str
    urls: list[Media]
    chat: dict[str, Any] | None = None


def _error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def read_input(data: bytes, endpoint: str, opts: ServeOptions) -> tuple[list[Request], list[dict[str, Any]]]:
    """(the file's valid requests, its problems): any problem fails the whole batch, as OpenAI's does."""
    if len(data) > opts.batch_max_bytes:
        return [], [_error("file_too_large", f"The batch input file is {len(data)} bytes, over the maximum of "
                                             f"{opts.batch_max_bytes} bytes.")]
    lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    if not lines:
        return [], [_error("empty_file", "The batch input file is empty.")]
    if len(lines) > opts.batch_max_lines:
        return [], [_error("too_many_tasks", f"The batch input file has {len(lines)} requests, over the maximum of "
                                             f"{opts.batch_max_lines} requests.")]
    requests: list[Request] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    for n, raw in lines:
        problem = _check_line(raw, endpoint)
        if isinstance(problem, dict):
            errors.append(problem | {"line": n})
            continue
        custom_id, body, chat = problem
        model = body["model"] if model is None else model
        if custom_id in seen:
            errors.append(_error("duplicate_custom_id", _DUPLICATE, n, "custom_id"))
        elif body["model"] != model:
            errors.append(_error("model_mismatch", f"The model {body['model']!r} differs from the model of the file's "
                                                   f"other requests ({model!r}): a batch has one model.", n, "body.model"))
        else:
            prompt, urls = user_parts((chat or body)["messages"])
            requests.append(Request(n, custom_id, body, prompt, urls, chat))
        seen.add(custom_id)
    return requests, errors[:MAX_ERRORS]


def _check_line(raw: bytes, endpoint: str) -> tuple[str, dict[str, Any], dict[str, Any] | None] | dict[str, Any]:
    """(custom_id, body, its chat view for /v1/responses) of a valid line, or its error (without the line number)."""
    try:
        item = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one
        item = None
    if not isinstance(item, dict):
        return _error("invalid_json_line", "This line is not parseable as valid JSON.")
    for name in ("custom_id", "method", "url", "body"):
        if name not in item:
            return _error("missing_required_parameter", f"Missing required parameter: '{name}'.", param=name)
    if not isinstance(item["custom_id"], str) or not item["custom_id"]:
        return _error("invalid_custom_id", "The custom_id must be a non-empty string.", param="custom_id")
    if item["method"] != "POST":
        return _error("invalid_method", f"The method {item['method']!r} is not supported: only 'POST'.", param="method")
    if item["url"] != endpoint:
        return _error("url_mismatch", f"The URL provided for this request ({item['url']!r}) does not match the batch "
                                      f"endpoint ({endpoint!r}).", param="url")
    body = item["body"]
    if not isinstance(body, dict):
        return _error("invalid_body", "The body must be a JSON object.", param="body")
    if not isinstance(body.get("model"), str):
        return _error("missing_required_parameter", "Missing required parameter: 'body.model'.", param="body.model")
    if endpoint == "/v1/responses":
        chat = chat_view(body)
        if chat is None:
            return _error("missing_required_parameter", "Missing required parameter: 'body.input'.", param="body.input")
        return item["custom_id"], body, chat
    if not isinstance(body.get("messages"), list) or not all(isinstance(m, dict) for m in body["messages"]):
        return _error("missing_required_parameter", "Missing required parameter: 'body.messages' (a list of messages).",
                      param="body.messages")
    return item["custom_id"], body, None


def line_fault(prompt: str, opts: ServeOptions) -> int | None:
    """The HTTP status a line with this prompt fails with (`batch_line_faults`), or None."""
    for needle, status in opts.batch_line_faults.items():
        if needle in prompt:
            return status
    return None


def answer_lines(requests: list[Request], opts: ServeOptions, batch_id: str, *, done: int,
                 expired: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output lines, error lines) once the first `done` requests were done: an answer or a line
    fault for each; with `expired`, the others as `batch_expired` errors (OpenAI's shape)."""
    output, errors = [], []
    for i, r in enumerate(requests):
        line_id = f"batch_req_{uuid.uuid4().hex}"
        if i >= done:
            if expired:
                errors.append({"id": line_id, "custom_id": r.custom_id, "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}})
            continue
        status = line_fault(r.prompt, opts)
        if status is None:
            body = completion(r.chat or r.body, r.prompt, r.urls, opts, fault=None, number=i + 1, authorization="")
            body["id"] = f"chatcmpl-{batch_id.removeprefix('batch_')}-{i + 1}"
            if r.chat is not None:
                body = as_response(body, r.body)
            output.append(_response_line(line_id, r.custom_id, 200, body))
        else:
            message, kind, code = _LINE_ERRORS.get(status, (f"The request failed with status {status}",
                                                            "server_error" if status >= 500 else "invalid_request_error",
                                                            None))
            body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
            errors.append(_response_line(line_id, r.custom_id, status, body))
    if opts.batch_shuffle_output:
        rng = random.Random(f"{opts.seed}:{batch_id}")
        rng.shuffle(output)
        rng.shuffle(errors)
    return output, errors


def _response_line(line_id: str, custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
