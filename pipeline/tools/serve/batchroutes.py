"""The Batch API's routes on the built-in endpoint, in OpenAI's shapes (files and batches), each
behind the same `api_key` check as chat completions:

    POST /v1/files (multipart: purpose=batch, file=*.jsonl)   GET /v1/files   GET /v1/files/{id}
    GET /v1/files/{id}/content   DELETE /v1/files/{id}
    POST /v1/batches   GET /v1/batches[?limit=&after=]   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel
    POST /admin/batch_clock {"advance_s": N}   (tests: the batch clock N seconds ahead; no key asked)

What a batch does over time, and its files: `batches.py`; its lines: `batchfile.py`.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiohttp import BodyPartReader, web

from .batches import ENDED, BatchStore
from .faults import key_refusal
from .state import STATE

__all__ = ["add_batch_routes", "MAX_UPLOAD_BYTES", "ENDPOINTS"]

MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # OpenAI's cap on any file; a batch's own cap is batch_max_bytes
ENDPOINTS = ("/v1/chat/completions", "/v1/responses")  # what this endpoint can answer
Handler = Callable[[web.Request, BatchStore], Awaitable[web.Response]]


def add_batch_routes(app: web.Application) -> None:
    routes = [
        ("POST", "/v1/files", _upload), ("GET", "/v1/files", _list_files), ("GET", "/v1/files/{id}", _file),
        ("GET", "/v1/files/{id}/content", _content), ("DELETE", "/v1/files/{id}", _delete_file),
        ("POST", "/v1/batches", _create), ("GET", "/v1/batches", _list_batches), ("GET", "/v1/batches/{id}", _batch),
        ("POST", "/v1/batches/{id}/cancel", _cancel),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _keyed(handler))
    app.router.add_post("/admin/batch_clock", _advance)


async def _advance(request: web.Request) -> web.Response:
    """POST /admin/batch_clock {"advance_s": N}: every batch is N seconds older from now on."""
    try:
        seconds = float((await request.json())["advance_s"])
    except (ValueError, KeyError, TypeError):
        return openai_error(400, "Send {\"advance_s\": seconds}.", "advance_s")
    return web.json_response({"now": request.app[STATE].batches.advance(seconds)})


def _keyed(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler behind the api_key check, given the store of files and batches."""
    async def guarded(request: web.Request) -> web.Response:
        state = request.app[STATE]
        refused = key_refusal(request, state.opts)
        return refused if refused is not None else await handler(request, state.batches)
    return guarded


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


def _no_file(file_id: str, param: str = "id") -> web.Response:
    return openai_error(404, f"No such File object: {file_id}", param)


async def _upload(request: web.Request, store: BatchStore) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        return openai_error(400, "Uploads are multipart/form-data with the fields 'purpose' and 'file'.")
    fields: dict[str, Any] = {}
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader) or part.name not in ("purpose", "file"):
            continue
        if part.name == "purpose":
            fields["purpose"] = (await part.text()).strip()
            continue
        data = bytearray()
        while chunk := await part.read_chunk(1 << 20):
            data += chunk
            if len(data) > MAX_UPLOAD_BYTES:
                return openai_error(413, f"File is too large: the maximum is {MAX_UPLOAD_BYTES} bytes.", "file")
        fields["file"], fields["filename"] = bytes(data), part.filename or "upload.jsonl"
    for name in ("purpose", "file"):
        if name not in fields:
            return openai_error(400, f"Missing required parameter: '{name}'.", name)
    if fields["purpose"] != "batch":
        return openai_error(400, f"Invalid value for 'purpose': {fields['purpose']!r}; the built-in endpoint takes "
                                 "only 'batch'.", "purpose")
    if not fields["filename"].endswith(".jsonl"):
        return openai_error(400, "Invalid file format for Batch API. Must be .jsonl", "file")
    return web.json_response(store.add_file(fields["filename"], "batch", fields["file"]).to_dict())


async def _list_files(request: web.Request, store: BatchStore) -> web.Response:
    data = [f.to_dict() for f in reversed(store.files.values())]
    return web.json_response({"object": "list", "data": data, "has_more": False,
                              "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


async def _file(request: web.Request, store: BatchStore) -> web.Response:
    stored = store.files.get(request.match_info["id"])
    return web.json_response(stored.to_dict()) if stored else _no_file(request.match_info["id"])


async def _content(request: web.Request, store: BatchStore) -> web.Response:
    stored = store.files.get(request.match_info["id"])
    if stored is None:
        return _no_file(request.match_info["id"])
    return web.Response(body=stored.data, content_type="application/octet-stream")


async def _delete_file(request: web.Request, store: BatchStore) -> web.Response:
    stored = store.files.pop(request.match_info["id"], None)
    if stored is None:
        return _no_file(request.match_info["id"])
    return web.json_response({"id": stored.id, "object": "file", "deleted": True})


async def _create(request: web.Request, store: BatchStore) -> web.Response:
    try:
        body = await request.json()
    except (ValueError, TypeError):
        body = None
    if not isinstance(body, dict):
        return openai_error(400, "The body must be a JSON object.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            return openai_error(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    if body["endpoint"] not in ENDPOINTS:
        return openai_error(400, f"Invalid value for 'endpoint': {body['endpoint']!r}; the built-in endpoint supports "
                                 f"{', '.join(ENDPOINTS)}.", "endpoint", "invalid_value")
    if body["completion_window"] != "24h":
        return openai_error(400, f"Invalid value for 'completion_window': {body['completion_window']!r}; supported "
                                 "values are: '24h'.", "completion_window", "invalid_value")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return openai_error(400, "Invalid 'metadata': an object of strings.", "metadata", "invalid_value")
    source = store.files.get(body["input_file_id"])
    if source is None:
        return _no_file(body["input_file_id"], "input_file_id")
    if source.purpose != "batch":
        return openai_error(400, f"The input file {source.id} has purpose {source.purpose!r}, not 'batch'.",
                            "input_file_id", "invalid_value")
    batch = store.create(source, body["endpoint"], body["completion_window"], metadata)
    return web.json_response(batch.to_dict(store.now()))


async def _batch(request: web.Request, store: BatchStore) -> web.Response:
    batch = store.batches.get(request.match_info["id"])
    if batch is None:
        return openai_error(404, f"No batch found with id '{request.match_info['id']}'.", "batch_id")
    now = store.now()
    await store.settle(batch, now)
    return web.json_response(batch.to_dict(now))


async def _list_batches(request: web.Request, store: BatchStore) -> web.Response:
    """Newest first; `limit` (1 to 100, default 20) from after the batch `after`."""
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        return openai_error(400, "Invalid 'limit': an integer from 1 to 100.", "limit", "invalid_value")
    newest = list(reversed(store.batches))
    after = request.query.get("after")
    if after is not None:
        newest = newest[newest.index(after) + 1:] if after in newest else []
    now = store.now()
    page = [store.batches[i] for i in newest[:limit]]
    for batch in page:
        await store.settle(batch, now)
    data = [b.to_dict(now) for b in page]
    return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": len(newest) > limit})


async def _cancel(request: web.Request, store: BatchStore) -> web.Response:
    batch = store.batches.get(request.match_info["id"])
    if batch is None:
        return openai_error(404, f"No batch found with id '{request.match_info['id']}'.", "batch_id")
    now = store.now()
    status = batch.status(now)
    if status in ENDED:
        await store.settle(batch, now)
        return openai_error(409, f"Cannot cancel a batch with status '{status}'.", None, "batch_not_cancellable")
    if batch.cancelled is None:
        batch.cancelled = now
    return web.json_response(batch.to_dict(now))
