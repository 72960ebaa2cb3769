"""The built-in endpoint's faults: which one a request gets (by its row, else by seeded chance),
and the answers that replace a completion: provider errors in their real shapes (OpenAI's
`{"error": ...}`, DashScope's throttle), a dropped connection, the key echoed, a redirect.
Faults that spoil a completion instead are sent by `delivery.py` and `hostile.py`.
"""

from __future__ import annotations

from aiohttp import web

from ...config.serve import ServeOptions
from .rate import retry_headers
from .state import ServeState

__all__ = ["pick_fault", "refusal", "error_response", "key_refusal", "ERROR_FAULTS", "MESSAGE_CUT"]

ERROR_FAULTS = frozenset({"400", "401", "500", "503", "quota", "throttle", "429", "429ms", "429date", "429reset", "429bare"})
MESSAGE_CUT = 500  # where clients commonly cut error messages: echo_key puts the key across it
_RETRY_STYLES = {"429": "retry-after", "429ms": "retry-after-ms", "429date": "http-date", "429reset": "reset",
                 "429bare": "none"}


def pick_fault(state: ServeState, key: str) -> str | None:
    """The fault for this request of the row `key`: its row fault while under its count, else one
    by seeded chance (one roll against the faults' chances laid end to end), else none."""
    for needle, spec in state.opts.row_faults.items():
        if needle in key:
            name, _, limit = spec.partition(":")
            if not limit or state.per_row[key] <= int(limit):
                return name
    roll = state.rng.random()
    for name, p in state.opts.faults.items():
        if roll < p:
            return name
        roll -= p
    return None


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in OpenAI's shape."""
    body = {"error": {"message": message, "type": code, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def key_refusal(request: web.Request, opts: ServeOptions) -> web.Response | None:
    """With `api_key`: the 401 for a request without that bearer key, echoing what was presented
    (as some providers do: the client must scrub it from its messages)."""
    if opts.api_key is None or request.headers.get("Authorization") == f"Bearer {opts.api_key}":
        return None
    presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return error_response(401, f"Incorrect API key provided: {presented}", "invalid_api_key")


def refusal(request: web.Request, opts: ServeOptions, fault: str | None, *, stream: bool,
            rate_headers: dict[str, str]) -> web.StreamResponse | None:
    """What `fault` answers instead of a completion; None when the request gets one."""
    if fault in ERROR_FAULTS:
        resp = _provider_error(fault, opts, rate_headers)
        if fault in opts.x_should_retry:
            resp.headers["x-should-retry"] = opts.x_should_retry[fault]
        return resp
    if not stream and fault in ("stream_error", "stream_error_vllm"):  # what such a failure is without streaming
        return _provider_error("500", opts, rate_headers)
    if fault in ("echo_key", "redirect"):
        return _echo_or_redirect(request, fault)
    if fault == "drop":
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=599)  # never reaches the client
    return None


def _provider_error(fault: str, opts: ServeOptions, rate_headers: dict[str, str]) -> web.Response:
    if fault == "400":
        return error_response(400, "Invalid image: the provider could not read it", "invalid_request_error")
    if fault == "401":
        return error_response(401, "Incorrect API key provided.", "invalid_api_key")
    if fault == "500":
        return error_response(500, "The server had an error processing your request", "server_error", rate_headers)
    if fault == "503":
        return error_response(503, "The engine is currently overloaded", "server_error")
    if fault == "quota":
        return error_response(429, "You exceeded your current quota, please check your plan and billing details.",
                              "insufficient_quota")
    if fault == "throttle":
        return web.json_response({"code": "Throttling.AllocationQuota", "message": "Allocated quota exceeded, please increase your quota limit."},
                                 status=429)
    return error_response(429, "Rate limit reached for requests", "rate_limit_exceeded",
                          {**rate_headers, **retry_headers(_RETRY_STYLES[fault], opts.fault_retry_after_s)})


def _echo_or_redirect(request: web.Request, fault: str) -> web.Response:
    """echo_key: a 400 echoing the presented Authorization across the message cut; redirect: a 307."""
    if fault == "redirect":
        return web.Response(status=307, headers={"Location": f"http://{request.host}/redirected{request.path}"})
    presented = request.headers.get("Authorization", "")
    lead = "The request was refused for the credentials presented: "
    filler = max(0, MESSAGE_CUT - len(lead) - len(presented) // 2)
    return error_response(400, ("Refused. " * (filler // 9 + 1))[:filler] + lead + presented, "invalid_request_error")
