"""Proxies: which one, if any, a request to a URL goes through, chosen the way curl and the OpenAI
SDK (httpx) choose; pure functions of the URL, `[endpoint] proxy` and the environment.

    choice = ProxyChoice("http://user:pw@proxy.corp:3128", os.environ)   # or ProxyChoice(None, env)
    choice.for_url("https://api.openai.com/v1/chat/completions")         # Proxy(proxy.corp:3128) or None

A job makes its choice once, when it is loaded (`Job.proxies()`): a run never mixes two
environments, and a job pickled to a Ray worker takes the choice with it, whatever the worker's
environment says. The choice parses all it needs at once (NO_PROXY into its entries, the proxy
for each scheme), so choosing per image URL is a few comparisons.

The rules, in order:
1. `[endpoint] proxy = ""`: no proxy for anything; the environment is not read.
2. NO_PROXY (`no_proxy` wins over `NO_PROXY`) names hosts that are reached directly: `*` all of
   them; `example.com` and `.example.com` that host and its subdomains (never `notexample.com`);
   `host:8080` that host on that port only; an IP address, or a CIDR range (`10.0.0.0/8`) for hosts
   written as IP addresses (names are never resolved for it, as in curl). Entries are separated by
   commas or spaces, case does not matter. It applies to `[endpoint] proxy` too (as to curl's -x).
3. `[endpoint] proxy = "http://..."`: that proxy, in place of the variables below.
4. The target's scheme picks the variable: `https_proxy` then `HTTPS_PROXY` for https; `http_proxy`
   then `HTTP_PROXY` for http; then `all_proxy`, `ALL_PROXY`. The first that is set decides, and set
   to an empty value it means "no proxy" (curl). HTTP_PROXY is honoured as httpx (the OpenAI SDK),
   urllib and requests do, except in a CGI script (REQUEST_METHOD set), where a client's `Proxy:`
   header arrives as HTTP_PROXY (httpoxy); curl never reads HTTP_PROXY at all.

A proxy is `http://[user:password@]host[:port]`; without a scheme it is http, as in curl; the port
defaults to 80 (httpx, aiohttp, requests; curl would use 1080). The user and password are
percent-decoded and sent as `Proxy-Authorization: Basic`; they are secrets (`secrets()` gives
them to the Redactor) and `Proxy.url` never holds them. https:// and socks proxies are refused
with a ProxyError naming where the proxy came from.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote, urlsplit

__all__ = ["Proxy", "ProxyChoice", "ProxyError", "NoProxy", "parse_proxy", "bypassed", "choose", "NO_PROXY_VARIABLES"]

NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ProxyError(ValueError):
    """A proxy setting that cannot be used; the message names where it came from, never a password."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    source: str = "[endpoint] proxy"  # where it was set: "[endpoint] proxy" or a variable's name

    @property
    def url(self) -> str:
        """The proxy's address, never its credentials (safe to print)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The Proxy-Authorization header's value, or None without credentials."""
        if self.username is None and self.password is None:
            return None
        pair = f"{self.username or ''}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def secrets(self) -> list[str]:
        """What must never be shown: the password and the header's token."""
        auth = self.authorization
        return [s for s in (self.password, auth and auth.removeprefix("Basic ")) if s]


def parse_proxy(text: str, source: str) -> Proxy:
    """A Proxy from `http://user:password@host:port` (scheme and port optional); ProxyError if unusable."""
    raw = text.strip()
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ProxyError(f"{source}: not a proxy URL (bad port or address)") from None
    scheme = parts.scheme.lower()
    if scheme != "http":
        raise ProxyError(f"{source}: only http:// proxies are supported (HTTPS is tunnelled through them with "
                         f"CONNECT), not {scheme}://")
    if not parts.hostname:
        raise ProxyError(f"{source}: the proxy URL has no host")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(parts.hostname, port or 80, user, password, source)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text or not (text[0].isdigit() or ":" in text):  # a name (most hosts): no exception to pay for
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _entry(entry: str) -> tuple[str, int | None]:
    """(name, port or None) of one NO_PROXY entry: `host`, `host:port`, `[v6]:port`, a bare IPv6 or a CIDR."""
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    name, colon, port = entry.rpartition(":")
    if colon and ":" not in name and port.isdigit():
        return name, int(port)
    return entry, None


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NoProxy:
    """NO_PROXY's value, parsed once: `everything` (*), or entries of (name, its IP or network, port)."""

    everything: bool = False
    entries: tuple[tuple[str, _Address | None, int | None], ...] = ()

    @classmethod
    def parse(cls, value: str) -> NoProxy:
        entries: list[tuple[str, _Address | None, int | None]] = []
        for entry in re.split(r"[,\s]+", value.lower()):
            if entry == "*":
                return cls(everything=True)
            name, port = _entry(entry)
            name = name.lstrip("*").lstrip(".").rstrip(".")
            if not name:
                continue
            address: _Address | None = _ip(name)
            if "/" in name:
                try:
                    address = ipaddress.ip_network(name, strict=False)
                except ValueError:
                    continue  # not a range: it matches nothing
            entries.append((name, address, port))
        return cls(entries=tuple(entries))

    def __bool__(self) -> bool:
        return self.everything or bool(self.entries)

    def bypasses(self, host: str, port: int) -> bool:
        """True when `host`:`port` is reached directly."""
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        ip = _ip(host)
        for name, address, want in self.entries:
            if want is not None and want != port:
                continue
            if isinstance(address, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                if ip is not None and ip in address:
                    return True
            elif ip is not None:
                if address == ip:
                    return True
            elif host == name or host.endswith("." + name):
                return True
        return False


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """True when NO_PROXY's value `no_proxy` says `host`:`port` is reached directly."""
    return NoProxy.parse(no_proxy).bypasses(host, port)


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if name in environ:
            return name, environ[name]
    return None


def _variables(scheme: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The variables read for a target of `scheme`, in order."""
    if scheme == "https":
        own: tuple[str, ...] = ("https_proxy", "HTTPS_PROXY")
    else:  # http; HTTP_PROXY may come from a client's `Proxy:` header in a CGI script (httpoxy)
        own = ("http_proxy",) if "REQUEST_METHOD" in environ else ("http_proxy", "HTTP_PROXY")
    return own + ("all_proxy", "ALL_PROXY")


def _password_of(text: str) -> list[str]:
    """The password in a proxy URL that cannot be used otherwise: hidden all the same."""
    try:
        password = urlsplit(text if "://" in text else "//" + text).password
    except ValueError:
        return []
    return [unquote(password)] if password else []


def choose(url: str, setting: str | None, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy a request to `url` goes through (None: directly). Raises ProxyError."""
    return ProxyChoice(setting, environ).for_url(url)


class ProxyChoice:
    """The choice for one run: `[endpoint] proxy` and the environment as they were when it was
    made, all parsed then (a proxy that cannot be used is kept as its error, raised when a request
    would go through it). Plain data: it pickles with the job."""

    def __init__(self, setting: str | None, environ: Mapping[str, str]) -> None:
        self.setting = setting
        self.off = setting is not None and not setting.strip()
        names = [n for n in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY",
                             *NO_PROXY_VARIABLES) if n in environ]
        self.environ = {n: environ[n] for n in names} if not self.off else {}
        if "REQUEST_METHOD" in environ:
            self.environ["REQUEST_METHOD"] = environ["REQUEST_METHOD"]
        found = _first(self.environ, NO_PROXY_VARIABLES)
        self.no_proxy = NoProxy.parse(found[1] if found else "")
        self._parsed: dict[str, Proxy | str] = {}  # source -> the proxy, or why it cannot be used
        # scheme -> where its proxy comes from (None: directly)
        self.by_scheme = {scheme: self._source(scheme) for scheme in _DEFAULT_PORTS}

    def _source(self, scheme: str) -> str | None:
        if self.off:
            return None
        if self.setting is not None:
            source, text = "[endpoint] proxy", self.setting
        else:
            found = _first(self.environ, _variables(scheme, self.environ))
            if found is None or not found[1].strip():
                return None
            source, text = found
        try:
            self._parsed[source] = parse_proxy(text, source)
        except ProxyError as err:
            self._parsed[source] = str(err)
        return source

    def for_url(self, url: str) -> Proxy | None:
        if self.off:
            return None
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError:
            return None  # not a URL anyone can reach; the caller says so
        source = self.by_scheme[scheme]
        if source is None or (self.no_proxy and self.no_proxy.bypasses(parts.hostname, port)):
            return None
        got = self._parsed[source]
        if isinstance(got, str):
            raise ProxyError(got)
        return got

    def _parse(self, source: str, text: str) -> Proxy:
        got = self._parsed.get(source)
        if got is None:
            got = parse_proxy(text, source)
        if isinstance(got, str):
            raise ProxyError(got)
        return got

    def secrets(self) -> list[str]:
        """Every proxy password (and header token) this choice could use, for the Redactor."""
        texts = [("[endpoint] proxy", self.setting)] if self.setting and not self.off else []
        texts += [(n, v) for n, v in self.environ.items() if n.lower().endswith("_proxy") and n.lower() != "no_proxy"]
        out: list[str] = []
        for source, text in texts:
            try:
                out += self._parse(source, text).secrets()
            except ProxyError:
                out += _password_of(text)
        return out

    def __repr__(self) -> str:  # never the variables' values: they may hold passwords
        return f"ProxyChoice(setting={'set' if self.setting else self.setting!r}, variables={sorted(self.environ)})"
