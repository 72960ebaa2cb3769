"""The provider's Batch API (OpenAI's shape, which DashScope and others follow): files and batches.

    async with BatchAPI(base_url, key, timeout_s=60, max_attempts=5) as api:
        file_id = await api.upload("pipeline-captions-b000001.jsonl", data)
        batch = await api.create(file_id, "/v1/chat/completions", "24h", {"pipeline_batch": name})
        batch = await api.find(name)          # a batch created with that metadata, or None
        batch = await api.get(batch["id"]); await api.cancel(batch["id"])
        data = await api.content(batch["output_file_id"])

Every call is retried as the pure policy says (pipeline.net.retry: 429s, 5xx, timeouts, cut
connections) and its failures are RequestError from `translate`, the one place foreign errors
become ours; quota and key refusals are not retried (the caller stops the run). Creating a
batch is the one call that is never retried blindly: the caller looks for it by name first.
Through a proxy (`proxy=`, chosen by config.proxy for the base URL) every call passes aiohttp's
`proxy=` as the client's streams do.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any, Callable, Mapping

import aiohttp

from ..config.headers import secret_values
from ..config.proxy import Proxy
from ..errors import RequestError
from ..redact import Redactor
from .client import aiohttp_proxy, translate
from .retry import retry_delay, should_retry

__all__ = ["BatchAPI", "LIST_PAGES"]

NOT_CANCELLABLE = "batch_not_cancellable"  # OpenAI's code for a cancel of a batch that has ended
LIST_PAGES = 20  # pages of 100 batches looked through for one created before a crash


class BatchAPI:
    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float, max_attempts: int,
                 proxy: Proxy | None = None, headers: Mapping[str, str] | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.proxy = proxy
        self._via = aiohttp_proxy(proxy)
        extra = dict(headers or {})  # [endpoint] headers
        self.redactor = Redactor([api_key, *(proxy.secrets() if proxy is not None else ()), *secret_values(extra)])
        self._headers = {**extra, "Authorization": f"Bearer {api_key}"} if api_key else extra
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._attempts = max_attempts
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchAPI:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"BatchAPI({self.base!r})"

    async def upload(self, filename: str, data: bytes) -> str:
        def form() -> aiohttp.FormData:  # a new one per attempt: a form is consumed when sent
            f = aiohttp.FormData()
            f.add_field("purpose", "batch")
            f.add_field("file", data, filename=filename, content_type="application/jsonl")
            return f

        reply = await self._call("POST", "/files", form=form)
        return str(reply["id"])

    async def create(self, file_id: str, endpoint: str, window: str, metadata: dict[str, str]) -> dict[str, Any]:
        """`endpoint`: the lines' `url` ("/v1/chat/completions", "/v1/responses")."""
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": window,
                "metadata": metadata}
        return await self._call("POST", "/batches", json=body, retry=False)

    async def find(self, name: str) -> dict[str, Any] | None:
        """The batch whose metadata names it `name` (created before a crash could record it)."""
        after: str | None = None
        for _ in range(LIST_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            page = await self._call("GET", "/batches", params=params)
            for batch in page.get("data") or []:
                if (batch.get("metadata") or {}).get("pipeline_batch") == name:
                    return batch
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]
        return None

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """The batch, cancelling; None when it had ended before the cancel reached it (a 409
        `batch_not_cancellable`, or a 400): nothing to cancel, and not worth a retry."""
        try:
            return await self._call("POST", f"/batches/{batch_id}/cancel", final=_not_cancellable)
        except RequestError as err:
            if _not_cancellable(err):
                return None
            raise

    async def content(self, file_id: str) -> bytes:
        return await self._call("GET", f"/files/{file_id}/content", raw=True)

    async def _call(self, method: str, path: str, *, retry: bool = True, raw: bool = False,
                    form: Callable[[], aiohttp.FormData] | None = None,
                    final: Callable[[RequestError], bool] | None = None, **kw: Any) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(method, path, raw=raw, data=form() if form else None, **kw)
            except RequestError as err:
                if not retry or not should_retry(err, attempt, self._attempts) or (final is not None and final(err)):
                    raise
                await asyncio.sleep(retry_delay(err, attempt, now=time.time(), jitter=random.random()))

    async def _once(self, method: str, path: str, *, raw: bool, **kw: Any) -> Any:
        assert self._session is not None, "use the API as an async context manager"
        status: int | None = None
        try:
            async with self._session.request(method, self.base + path, allow_redirects=False, **self._via, **kw) as resp:
                status = resp.status
                body = await resp.read()
                if status != 200:
                    raise translate(status=status, headers=dict(resp.headers), body=body, redactor=self.redactor,
                                    proxy=self.proxy)
                if raw:
                    return body
                try:
                    return json.loads(body)
                except ValueError:
                    raise RequestError(f"{method} {path}: the answer is not JSON", kind="invalid_response",
                                       status=status) from None
        except RequestError:
            raise
        except Exception as exc:  # only translate() decides what a foreign error means
            raise translate(exc, status=status, redactor=self.redactor, proxy=self.proxy) from None


def _not_cancellable(err: RequestError) -> bool:
    """The provider's "Cannot cancel a batch with status 'completed'" (told by status and code)."""
    return err.status == 400 or (err.status == 409 and err.code == NOT_CANCELLABLE)
