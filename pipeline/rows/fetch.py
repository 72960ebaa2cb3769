"""The fetcher: remote images (and videos) downloaded by the pipeline itself, for `image_mode = "inline"`.

    fetcher = Fetcher(concurrency=8, timeout_s=30, max_bytes=50 << 20, retries=2, max_redirects=5)
    got = await fetcher.fetch("https://host/cat.jpg")     # Fetched(data, content_type, url)
    await fetcher.close()

Why the care: a manifest may come from anyone, and one URL may appear in thousands of rows.

- http and https only; redirects are followed by hand, at most `max_redirects`, so each hop's
  scheme and address is checked, not only the first;
- `block_private_addresses`: hosts that are (or resolve to) loopback, private, link-local or
  otherwise non-global addresses are refused. The check sits in the resolver the connection
  really uses (a second lookup could not be answered differently) and on IP literals;
- the body is read in chunks and abandoned past `max_bytes`: a declared Content-Length over it is
  refused before reading, and a lying or absent one gets no further than the cap (aiohttp
  decompresses in bounded steps as the body is read, so the cap holds for gzip too);
- one timeout covers a whole attempt (every hop and the body);
- retries follow the pipeline's retry policy (timeouts, connection errors, 5xx, 429);
- a per-run cache: concurrent fetches of a URL share one download, finished ones are kept (LRU,
  bounded in bytes), and failures are remembered so a dead URL in many rows costs one fetch.

Through a proxy (`proxies`, the run's config.proxy.ProxyChoice): each hop's URL picks its own
(NO_PROXY and `[endpoint] proxy` as for the endpoint), passed to aiohttp per request. With
`block_private_addresses` on, the proxy's own address is trusted (it is configuration, not the
manifest) and a proxied host's name is resolved and checked here before the proxy is asked; the
proxy resolves it again, so a name whose answer changes between the two lookups is not caught.

Every failure is an InputError (kind "input") naming the cause and the URL; what a server said
is scrubbed by the `redactor` (pipeline.redact) before it is cut. What the bytes are is not
decided here: the caller sniffs them (a Content-Type is only what the server claims).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import time
from collections import OrderedDict
from typing import NamedTuple

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ..config.proxy import ProxyChoice, ProxyError
from ..errors import InputError, RequestError
from ..net.client import ProxyArgs, aiohttp_proxy, translate
from ..net.retry import retry_delay, should_retry
from ..redact import Redactor

__all__ = ["Fetcher", "Fetched", "CACHE_BYTES", "is_blocked_address"]

CACHE_BYTES = 256 << 20  # finished downloads kept for reuse within a run
CHUNK_BYTES = 64 << 10
ERROR_BODY_BYTES = 2048  # of a failed answer, for its message
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "pipeline-fetch/0.1"


class Fetched(NamedTuple):
    data: bytes
    content_type: str | None  # as the server said; not trusted
    url: str  # after redirects


def is_blocked_address(address: str) -> bool:
    """True for addresses an untrusted manifest must not reach: anything not globally routable."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return True  # not an address we can judge: refuse
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


class _Blocked(InputError):
    """Raised inside the connection's resolver; aiohttp lets non-OSError exceptions through."""


class _PublicOnlyResolver(AbstractResolver):
    def __init__(self, trusted: set[str]) -> None:
        self._inner = DefaultResolver()
        self.trusted = trusted  # the proxies' hosts: configuration, not the manifest

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host in self.trusted:
            return results
        public = [r for r in results if not is_blocked_address(r["host"])]
        if not public:
            shown = results[0]["host"] if results else "nothing"
            raise _Blocked(f"{host} resolves to a non-public address ({shown})")
        return public

    async def close(self) -> None:
        await self._inner.close()


class Fetcher:
    def __init__(
        self,
        *,
        concurrency: int = 8,
        timeout_s: float = 30.0,
        max_bytes: int = 50 << 20,
        retries: int = 2,
        max_redirects: int = 5,
        block_private: bool = False,
        cache_bytes: int = CACHE_BYTES,
        redactor: Redactor | None = None,
        proxies: ProxyChoice | None = None,
    ) -> None:
        self.redactor = redactor or Redactor()
        self.proxies = proxies
        self._proxy_hosts: set[str] = set()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.retries = retries
        self.max_redirects = max_redirects
        self.block_private = block_private
        self.cache_bytes = cache_bytes
        self._concurrency = concurrency
        self._sem = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task[Fetched]] = {}
        self._done: OrderedDict[str, Fetched | str] = OrderedDict()  # str: the failure's message
        self._done_bytes = 0
        self.requests = 0  # HTTP requests made (hops and retries included), for reports

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> Fetched:
        """The bytes at `url`, from the cache when this run fetched it already. Raises InputError."""
        hit = self._done.get(url)
        if hit is not None:
            self._done.move_to_end(url)
            if isinstance(hit, str):
                raise InputError(hit)
            return hit
        task = self._inflight.get(url)
        if task is None:
            task = asyncio.ensure_future(self._fetch(url))
            self._inflight[url] = task
            task.add_done_callback(functools.partial(self._settle, url))
        try:
            # shield: a row that gives up (a stop) must not cancel the download others wait for
            return await asyncio.shield(task)
        except InputError as err:
            raise InputError(err.message) from None  # a fresh error per row, not one shared traceback

    def _settle(self, url: str, task: asyncio.Task[Fetched]) -> None:
        self._inflight.pop(url, None)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, InputError):
            self._remember(url, exc.message, len(exc.message))
        elif exc is None:
            got = task.result()
            self._remember(url, got, len(got.data))

    def _remember(self, url: str, value: Fetched | str, size: int) -> None:
        if size > self.cache_bytes:
            return
        self._done[url] = value
        self._done_bytes += size
        while self._done_bytes > self.cache_bytes and self._done:
            _, old = self._done.popitem(last=False)
            self._done_bytes -= len(old) if isinstance(old, str) else len(old.data)

    async def _fetch(self, url: str) -> Fetched:
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._sem:
                    return await self._attempt(url)
            except InputError:
                raise  # refused by policy (scheme, address, size, redirects): trying again cannot help
            except Exception as exc:
                err = exc if isinstance(exc, RequestError) else translate(exc, redactor=self.redactor)
                if not should_retry(err, attempt, self.retries + 1):
                    tries = f", {attempt} attempts" if attempt > 1 else ""
                    raise InputError(f"fetch failed ({err.describe()}{tries}): {url}") from None
            await asyncio.sleep(
                retry_delay(err, attempt, now=time.time(), jitter=random.random(), max_server_delay=self.timeout_s)
            )

    async def _attempt(self, url: str) -> Fetched:
        session = self._session_for_loop()
        current = url
        async with asyncio.timeout(self.timeout_s):
            for _ in range(self.max_redirects + 1):
                target = self._checked(current, url)
                self.requests += 1
                try:
                    via = await self._via(target, url)
                    async with session.get(target, allow_redirects=False, **via) as resp:
                        if resp.status in REDIRECT_STATUSES:
                            location = resp.headers.get("Location")
                            if not location:
                                raise InputError(f"fetch failed (HTTP {resp.status} redirect without a Location): {url}")
                            current = str(resp.url.join(URL(location)))
                            continue
                        if resp.status != 200:
                            body = await resp.content.read(ERROR_BODY_BYTES)
                            headers = {k.lower(): v for k, v in resp.headers.items()}
                            raise translate(status=resp.status, headers=headers, body=body, redactor=self.redactor)
                        return Fetched(await self._body(resp, url), resp.headers.get("Content-Type"), current)
                except _Blocked as blocked:
                    raise InputError(f"refused to fetch ({blocked.message}; block_private_addresses is on): {url}") from None
        raise InputError(f"fetch failed (more than {self.max_redirects} redirects): {url}")

    async def _via(self, target: URL, original: str) -> ProxyArgs:
        """aiohttp's proxy arguments for `target` (none: directly)."""
        if self.proxies is None:
            return {}
        try:
            proxy = self.proxies.for_url(str(target))
        except ProxyError as err:
            raise InputError(f"fetch refused ({err}): {original}") from None
        if proxy is not None and self.block_private:
            self._proxy_hosts.add(proxy.host)
            assert target.host is not None
            # the proxy resolves the name, not the connection's guarded resolver: check it here
            await _PublicOnlyResolver(set()).resolve(target.host, target.port or 0)
        return aiohttp_proxy(proxy)

    async def _body(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        cap = self.max_bytes
        too_big = f"fetch refused (larger than the {cap / (1 << 20):g} MB cap, [images] max_source_mb): {url}"
        if resp.content_length is not None and resp.content_length > cap:
            raise InputError(too_big)
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            buf += chunk
            if len(buf) > cap:  # stop reading: a lying or absent Content-Length gets no further
                raise InputError(too_big)
        return bytes(buf)

    def _checked(self, current: str, original: str) -> URL:
        try:
            target = URL(current)
        except ValueError:
            raise InputError(f"fetch refused (not a valid URL: {current[:200]!r}): {original}") from None
        hop = "" if current == original else f" (redirected to {current[:200]})"
        if target.scheme not in ("http", "https"):
            raise InputError(f"fetch refused (only http and https are fetched{hop}): {original}")
        if not target.host:
            raise InputError(f"fetch refused (no host in the URL{hop}): {original}")
        if self.block_private:
            try:
                ipaddress.ip_address(target.host.split("%")[0])
                literal = True
            except ValueError:
                literal = False  # a name: checked by the resolver at connection time
            if literal and is_blocked_address(target.host):
                raise InputError(
                    f"refused to fetch ({target.host} is a non-public address{hop}; block_private_addresses is on): {original}"
                )
        return target

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._concurrency,
                resolver=_PublicOnlyResolver(self._proxy_hosts) if self.block_private else None,
                use_dns_cache=not self.block_private,  # every connection asks the guarded resolver
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),  # our own asyncio.timeout covers the attempt
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
            )
        return self._session
