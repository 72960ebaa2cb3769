"""Object-store image URIs: `s3://`, `gs://`, `az://` cells read with the job's credentials, or presigned.

    objects = ObjectStore(inp.storage_options, object_roots(cfg.allowed_buckets, inp.path), threads=8)
    data = await objects.read("s3://team-data/a.jpg", cap, why)    # its bytes, at most `cap`
    url = await objects.presign("s3://team-data/a.jpg", 3720)      # a Signed https URL; url.source is the URI
    objects.close()

Confinement. A URI is read or signed only beneath the allowed prefixes: `[images] allowed_buckets`
and, when the manifest itself lives in a bucket, its own folder there (as local paths are confined
to the manifest's folder and `allowed_roots`). Anything else is refused before a request is made,
and so is a key with "." or ".." segments (an HTTP layer may fold them and leave the prefix).

Reading. fsspec's filesystem for the scheme (s3fs, gcsfs, adlfs), made with `[input]
storage_options` (the backends' own environment variables and credential chains apply too).
One ranged GET of at most `cap + 1` bytes: nothing past the cap is read, and the bytes are one
version of the object (a GET is atomic), whatever changes meanwhile. The calls block, so they run
in this store's threads (`threads` of them), never on the event loop; each is bounded by
`timeout_s`.

Presigning (`image_mode = "presign"`). The object is looked up first (one HEAD: a missing or
forbidden object is this row's `input` error naming it, not a provider's 400 that could stop the
run as a wrong job), then signed locally by the filesystem (`sign`: S3 with SigV4, GCS with a
service account's key, Azure with an account key). No image byte passes through the client.

Every failure is an InputError (kind "input") naming the URI; what a backend said is scrubbed by
the `redactor` (pipeline.redact) before it is cut.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
from typing import Any, Callable, TypeVar

from ..config.urls import OBJECT_SCHEMES, object_prefix
from ..errors import InputError
from ..redact import Redactor, storage_secrets
from .values import show

__all__ = ["ObjectStore", "Signed", "object_roots", "SIGV4_MAX_S"]

SIGV4_MAX_S = 7 * 86400  # the longest a SigV4 presigned URL may be valid
MESSAGE_CHARS = 300  # of a backend's own words in an error
T = TypeVar("T")


class Signed(str):
    """A presigned URL (what the request carries) that remembers the object URI it was made for:
    the request cache keys on the URI, since the signature changes with every signing."""

    source: str

    def __new__(cls, url: str, source: str) -> Signed:
        obj = super().__new__(cls, url)
        obj.source = source
        return obj


def object_roots(allowed: tuple[str, ...], manifest: Any) -> tuple[str, ...]:
    """The prefixes object URIs may lie beneath: `allowed` (folded by the config) and the folder of
    a manifest that is itself in a bucket (a path, a folder or a glob; several when a list)."""
    places = manifest if isinstance(manifest, (list, tuple)) else [manifest]
    own = [prefix for place in places if isinstance(place, str) and (prefix := _folder_prefix(place))]
    return tuple(dict.fromkeys([*allowed, *own]))


def _folder_prefix(location: str) -> str | None:
    """A bucket location's folder: a folder as it is, a file's or a glob's parent."""
    head = re.split(r"[*?\[]", location, maxsplit=1)[0]
    name = head.rstrip("/").rsplit("/", 1)[-1]
    if head != location or (not head.endswith("/") and "." in name):
        head = head.rsplit("/", 1)[0]
    return object_prefix(head)


class ObjectStore:
    """Reads and signs the object URIs of one job, only beneath `roots`."""

    def __init__(self, options: dict[str, Any], roots: tuple[str, ...], *, threads: int = 8, timeout_s: float = 30.0,
                 redactor: Redactor | None = None) -> None:
        self.options = options
        self.roots = roots
        self.timeout_s = timeout_s
        self.redactor = redactor or Redactor(storage_secrets(options))  # the job's (Job.secrets()) when run
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._filesystems: dict[tuple[str, bool], Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def confined(self, uri: str) -> tuple[str, str]:
        """(fsspec protocol, the URI folded) when `uri` may be read; an InputError naming the fix if not."""
        scheme, _, rest = uri.partition("://")
        protocol = OBJECT_SCHEMES[scheme.lower()]
        folded = f"{protocol}://{rest}"
        bucket, _, key = rest.partition("/")
        if not bucket or not key or key.endswith("/"):
            raise InputError(f"object URI names no object (s3://bucket/key): {show(uri)}")
        if any(part in (".", "..") for part in key.split("/")):
            raise InputError(f"object URI holds a '.' or '..' segment (refused: it could leave its prefix): {show(uri)}")
        if not any(folded.startswith(root) for root in self.roots):
            allowed = ", ".join(self.roots) if self.roots else "none yet"
            raise InputError(f"object URI outside the allowed buckets ({allowed}); allow it with [images] allowed_buckets "
                             f'= ["{protocol}://{bucket}/"]: {show(uri)}')
        return protocol, folded

    async def read(self, uri: str, cap: int, too_big: str) -> bytes:
        """The object's bytes; an InputError when it is missing, forbidden, empty or over `cap`."""
        protocol, folded = self.confined(uri)
        return await self._in_thread(uri, lambda: self._read(protocol, folded, uri, cap, too_big))

    async def presign(self, uri: str, expires_s: float) -> Signed:
        """A presigned https URL for the object, valid `expires_s` (SigV4's 7 days at most)."""
        protocol, folded = self.confined(uri)
        seconds = int(min(expires_s, SIGV4_MAX_S))
        return await self._in_thread(uri, lambda: self._sign(protocol, folded, uri, seconds))

    # -- blocking, in the store's threads ---------------------------------------------------

    def _read(self, protocol: str, folded: str, uri: str, cap: int, too_big: str) -> bytes:
        fs = self._fs(protocol, uri)
        try:
            data = fs.cat_file(folded, start=0, end=cap + 1)
        except Exception as exc:  # noqa: BLE001 - every backend failure is this row's, named
            raise self._failure("read", exc, uri) from None
        if len(data) > cap:
            raise InputError(f"object too large (more than {cap} bytes; {too_big}): {show(uri)}")
        return bytes(data)

    def _sign(self, protocol: str, folded: str, uri: str, seconds: int) -> Signed:
        fs = self._fs(protocol, uri, signing=True)
        try:
            fs.info(folded)  # a missing or forbidden object fails here, as this row's input error
            url = fs.sign(folded, expiration=seconds)
        except NotImplementedError:
            raise InputError(f"cannot presign {protocol}:// URIs ({type(fs).__name__} does not sign); set [images] "
                             f'image_mode = "inline" to send the bytes: {show(uri)}') from None
        except Exception as exc:  # noqa: BLE001
            raise self._failure("presign", exc, uri) from None
        return Signed(url, uri)

    def _fs(self, protocol: str, uri: str, *, signing: bool = False) -> Any:
        """fsspec's filesystem for `protocol`, made once (S3 signs with SigV4: every region takes it)."""
        with self._lock:
            fs = self._filesystems.get((protocol, signing))
            if fs is not None:
                return fs
            options = dict(self.options)
            if signing and protocol == "s3":
                options["config_kwargs"] = {"signature_version": "s3v4", **options.get("config_kwargs", {})}
            try:
                import fsspec

                fs = fsspec.filesystem(protocol, **options)
            except ImportError:
                package = {"s3": "'pipeline[s3]' (s3fs)", "gs": "gcsfs", "az": "adlfs"}[protocol]
                raise InputError(f"{protocol}:// image URIs need their fsspec backend: pip install {package}: "
                                 f"{show(uri)}") from None
            except Exception as exc:  # noqa: BLE001 - bad storage_options: named, scrubbed
                raise InputError(f"cannot open {protocol}:// with [input] storage_options "
                                 f"({self._said(exc)}): {show(uri)}") from None
            self._filesystems[(protocol, signing)] = fs
            return fs

    def _failure(self, what: str, exc: BaseException, uri: str) -> InputError:
        if isinstance(exc, InputError):
            return exc
        if isinstance(exc, FileNotFoundError):
            return InputError(f"object not found (deleted, moved, or never there): {show(uri)}")
        if isinstance(exc, PermissionError):
            return InputError(f"access denied to the object (check the credentials and [input] storage_options): "
                              f"{show(uri)}")
        if isinstance(exc, OSError) and "range is not satisfiable" in str(exc).lower():
            return InputError(f"object is empty (0 bytes), not an image: {show(uri)}")
        return InputError(f"cannot {what} the object ({self._said(exc)}): {show(uri)}")

    def _said(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return f"{type(exc).__name__}: {self.redactor.cut(text, MESSAGE_CHARS)}"

    async def _in_thread(self, uri: str, call: Callable[[], T]) -> T:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="pipeline-objects")
        future = asyncio.get_running_loop().run_in_executor(self._pool, call)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await future
        except TimeoutError:
            raise InputError(f"object store did not answer within {self.timeout_s:g}s ([images] fetch_timeout_s): "
                             f"{show(uri)}") from None
