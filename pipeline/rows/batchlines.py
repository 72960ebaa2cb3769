"""Batch lines: a row's request as a line of a Batch JSONL file, and a line of a batch's output or
error file back into the same result row an online answer makes.

    data = request_line("r1", built.body, Api.CHAT)        # {"custom_id", "method", "url", "body"}
    got = result_of(line_dict, job, labels, redactor)       # LineResult(row_id, row, error)

`result_of`: a 200 line is parsed as an online answer (answer, reasoning, tokens and their usage
details, the label columns) and costed at the batch price; a failed line (an error body, or OpenAI's
`batch_expired`/`batch_cancelled` for requests a batch never ran) is a RequestError from
`translate`, like an online failure, for the caller to retry in the next batch or to write down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from ..config import Api, Job
from ..errors import RequestError
from ..net.client import translate
from ..records import ResultRow
from ..redact import Redactor
from .answer import parse_response
from .pricing import row_cost

if TYPE_CHECKING:
    from .labels import Labels

__all__ = ["request_line", "result_of", "LineResult"]

NOT_RUN = {"batch_expired": "the batch expired before this request ran",
           "batch_cancelled": "the batch was cancelled before this request ran"}


def request_line(row_id: str, body: bytes, api: Api) -> bytes:
    """One line of a Batch JSONL file; `body` is the JSON request body online mode sends to `api`."""
    url = api.batch_url.encode()
    return b'{"custom_id":' + orjson.dumps(row_id) + b',"method":"POST","url":"' + url + b'","body":' + body + b"}\n"


class LineResult(NamedTuple):
    row_id: str
    row: ResultRow | None  # an answer (ok, or paid but unusable: truncated, invalid_output)
    error: RequestError | None  # why the line is not an ok answer (None when it is)


def result_of(line: dict[str, Any], job: Job, labels: Labels | None, redactor: Redactor) -> LineResult:
    row_id = str(line.get("custom_id"))
    response = line.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    if status != 200:
        return LineResult(row_id, None, _failure(line, status, response, redactor))
    try:
        answer = parse_response(response.get("body"), job.endpoint.api)
    except RequestError as err:
        return LineResult(row_id, None, err)
    cost = row_cost(job, answer.model, answer.prompt_tokens, answer.completion_tokens, answer.total_tokens,
                    answer.cached_tokens)
    if cost is not None and job.pricing is not None:
        cost *= job.pricing.batch_discount
    row = ResultRow(row_id, answer.answer, answer.reasoning, answer.prompt_tokens, answer.completion_tokens,
                    answer.total_tokens, answer.model, answer.finish_reason, "ok", None, None, 0, None, cost,
                    cached_tokens=answer.cached_tokens, reasoning_tokens=answer.reasoning_tokens,
                    image_tokens=answer.image_tokens, audio_tokens=answer.audio_tokens)
    if answer.answer is None:
        if not answer.truncated:
            return LineResult(row_id, None, RequestError("response has no answer content", kind="invalid_response"))
        row.status, row.error_kind = "error", "truncated"
        row.error = f"cut off by max_tokens before the answer began (finish_reason: {answer.finish_reason})"
        return LineResult(row_id, row, None)
    if labels is not None:
        try:
            row.labels = labels.check(answer.answer)
        except RequestError as err:  # kept (it was paid for) in case no later batch does better
            row.status, row.error_kind, row.error = "error", str(err.kind), err.describe()
            return LineResult(row_id, row, err)
    return LineResult(row_id, row, None)


def _failure(line: dict[str, Any], status: Any, response: Any, redactor: Redactor) -> RequestError:
    error = line.get("error") or {}
    code = error.get("code") if isinstance(error, dict) else None
    if code in NOT_RUN:
        return RequestError(NOT_RUN[code], kind="server", code=code)
    if isinstance(status, int):
        body = response.get("body") if isinstance(response, dict) else None
        return translate(status=status, body=orjson.dumps(body) if body is not None else b"", redactor=redactor)
    message = error.get("message") if isinstance(error, dict) else None
    return RequestError(redactor.cut(str(message or "the batch gave no answer for this request"), 500),
                        kind="server", code=str(code) if code else None)
