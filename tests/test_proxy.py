"""Proxies (config/proxy.py, the pool's absolute form and CONNECT tunnels, aiohttp's proxy= for
streams and image fetches).

The choice is tested with tables (curl's and httpx's rules). Whole runs (`pipeline run` in its own
process) go through a real proxy server, proxy.py from PyPI (pinned in the test extra), in its own
process; that requests went through it is read from its access log (one line per client
connection: `POST host:port/path` for an absolute-form request, `CONNECT host:port` for a tunnel),
and the built-in endpoint's counters say how many arrived. CONNECT is tested with real TLS: the
built-in endpoint serves https with a certificate made here, trusted through SSL_CERT_FILE.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest
from conftest import Endpoint, job_dict, read_output, run_cli, start_endpoint, url_manifest, write_job, write_rows

from pipeline.config.proxy import ProxyChoice, ProxyError, bypassed, choose, parse_proxy

VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY",
             "REQUEST_METHOD", "SSL_CERT_FILE")
USER, PASSWORD = "robot", "s3cr:t@pw/9"  # ':' '@' '/' must be percent-encoded in the URL


# -- the choice, as tables ------------------------------------------------------------------

CHOICE = [
    # (url, [endpoint] proxy, environment, the proxy's host:port or None)
    ("https://api.x.com/v1", None, {"HTTPS_PROXY": "http://p:3128"}, "p:3128"),
    ("https://api.x.com/v1", None, {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"}, "low:1"),
    ("https://api.x.com/v1", None, {"http_proxy": "http://p:1"}, None),  # the scheme's own variable only
    ("http://api.x.com/v1", None, {"HTTP_PROXY": "http://p:1"}, "p:1"),  # as httpx/urllib (curl: ignored)
    ("http://api.x.com/v1", None, {"HTTP_PROXY": "http://p:1", "REQUEST_METHOD": "GET"}, None),  # CGI: httpoxy
    ("http://api.x.com/v1", None, {"http_proxy": "http://p:1", "REQUEST_METHOD": "GET"}, "p:1"),
    ("https://api.x.com/v1", None, {"ALL_PROXY": "http://all:9"}, "all:9"),
    ("https://api.x.com/v1", None, {"all_proxy": "http://a:1", "ALL_PROXY": "http://b:2"}, "a:1"),
    ("https://api.x.com/v1", None, {"HTTPS_PROXY": "http://s:1", "ALL_PROXY": "http://all:9"}, "s:1"),
    ("https://api.x.com/v1", None, {"https_proxy": "", "HTTPS_PROXY": "http://s:1"}, None),  # set empty: none (curl)
    ("https://api.x.com/v1", None, {"HTTPS_PROXY": "", "ALL_PROXY": "http://all:9"}, None),
    ("https://api.x.com/v1", None, {"HTTPS_PROXY": "p:8080"}, "p:8080"),  # no scheme: http
    ("https://api.x.com/v1", None, {"HTTPS_PROXY": "http://p"}, "p:80"),
    ("https://api.x.com/v1", None, {"HTTPS_PROXY": "http://[::1]:3128"}, "::1:3128"),
    ("https://api.x.com/v1", "http://set:1", {"HTTPS_PROXY": "http://env:2"}, "set:1"),
    ("https://api.x.com/v1", "", {"HTTPS_PROXY": "http://env:2"}, None),  # "" : none at all
    ("https://api.x.com/v1", "http://set:1", {"NO_PROXY": "x.com"}, None),  # NO_PROXY applies to the setting too
    ("https://api.x.com/v1", None, {"HTTPS_PROXY": "http://p:1", "no_proxy": "other", "NO_PROXY": "x.com"}, "p:1"),
    ("ftp://api.x.com/", None, {"ALL_PROXY": "http://all:9"}, None),
]


@pytest.mark.parametrize("url,setting,env,want", CHOICE)
def test_choice(url: str, setting: str | None, env: dict[str, str], want: str | None) -> None:
    got = choose(url, setting, env)
    assert (f"{got.host}:{got.port}" if got else None) == want


NO_PROXY = [
    # (host, port, NO_PROXY, bypassed)
    ("api.x.com", 443, "*", True),
    ("api.x.com", 443, "x.com", True),
    ("api.x.com", 443, ".x.com", True),
    ("x.com", 443, ".x.com", True),
    ("notx.com", 443, "x.com", False),
    ("API.X.COM.", 443, "x.com", True),  # case, a trailing dot
    ("api.x.com", 443, "a.com, x.com", True),
    ("api.x.com", 443, "a.com x.com", True),  # spaces separate too (curl 7.86)
    ("api.x.com", 443, "*.x.com", True),
    ("api.x.com", 443, "x.com:443", True),
    ("api.x.com", 8443, "x.com:443", False),
    ("10.1.2.3", 80, "10.1.2.3", True),
    ("10.1.2.3", 80, "10.0.0.0/8", True),
    ("11.1.2.3", 80, "10.0.0.0/8", False),
    ("internal", 80, "10.0.0.0/8", False),  # names are never resolved for a CIDR
    ("::1", 80, "::1", True),
    ("[::1]", 8080, "[::1]:8080", True),
    ("fd00::5", 80, "fd00::/8", True),
    ("127.0.0.1", 80, "localhost", False),  # no loopback magic: name what is reached directly
    ("api.x.com", 443, "", False),
    ("api.x.com", 443, ",,", False),
]


@pytest.mark.parametrize("host,port,no_proxy,want", NO_PROXY)
def test_no_proxy(host: str, port: int, no_proxy: str, want: bool) -> None:
    assert bypassed(host, port, no_proxy) is want


def test_credentials_are_decoded_hidden_and_never_printed() -> None:
    proxy = parse_proxy(f"http://{USER}:{quote(PASSWORD, safe='')}@proxy.corp:3128", "HTTPS_PROXY")
    assert (proxy.username, proxy.password, proxy.url) == (USER, PASSWORD, "http://proxy.corp:3128")
    assert PASSWORD not in repr(proxy) and PASSWORD not in proxy.url
    assert PASSWORD in proxy.secrets()
    choice = ProxyChoice(None, {"HTTPS_PROXY": f"http://{USER}:{quote(PASSWORD, safe='')}@p:1", "ALL_PROXY": "socks5://u:pw2@s"})
    assert PASSWORD in choice.secrets() and "pw2" in choice.secrets()  # an unusable one's password too
    assert PASSWORD not in repr(choice)


@pytest.mark.parametrize("text,problem", [
    ("socks5://p:1080", "only http:// proxies"), ("https://p:443", "only http:// proxies"),
    ("http://p:notaport", "not a proxy URL"), ("http://:8080", "no host"),
])
def test_unusable_proxies_are_named(text: str, problem: str) -> None:
    with pytest.raises(ProxyError, match=problem):
        choose("https://api.x.com/", None, {"HTTPS_PROXY": text})


# -- real runs through a real proxy -----------------------------------------------------------

@dataclass
class ProxyServer:
    url: str  # without credentials
    log: Path
    proc: subprocess.Popen

    def with_auth(self, user: str, password: str) -> str:
        return self.url.replace("http://", f"http://{quote(user, safe='')}:{quote(password, safe='')}@")

    def mark(self) -> int:
        return self.log.stat().st_size

    def since(self, mark: int, expect: str | None = None) -> str:
        """The access log written after `mark`; waits (briefly) for `expect` to appear: proxy.py
        writes a connection's line when the connection closes."""
        deadline = time.monotonic() + 5
        while True:
            text = self.log.read_bytes()[mark:].decode("utf-8", "replace")
            if expect is None or expect in text or time.monotonic() > deadline:
                return "\n".join(line for line in text.splitlines() if "access_log" in line)
            time.sleep(0.05)


def _start_proxy(folder: Path, *auth: str) -> ProxyServer:
    folder.mkdir(parents=True, exist_ok=True)
    port_file, log = folder / "port", folder / "proxy.log"
    args = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--num-acceptors", "1", "--num-workers", "1", "--log-file", str(log), *auth]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip() and log.exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "proxy.py did not start"
        time.sleep(0.05)
    return ProxyServer(f"http://127.0.0.1:{int(port_file.read_text())}", log, proc)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ProxyServer]]:
    pytest.importorskip("proxy", reason="proxy.py is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("proxies")
    started = {"open": _start_proxy(root / "open"), "auth": _start_proxy(root / "auth", "--basic-auth", f"{USER}:{PASSWORD}")}
    yield started
    for p in started.values():
        p.proc.terminate()
        p.proc.wait(10)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs see only the proxy variables a test sets."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1: the endpoint's, and the only one the runs trust."""
    x509 = pytest.importorskip("cryptography.x509", reason="cryptography is not installed (moto[server] brings it)")
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return {"tls_cert": str(folder / "cert.pem"), "tls_key": str(folder / "key.pem")}


def _call(ep: Endpoint, tls: dict[str, str] | None, path: str, data: bytes | None = None) -> Any:
    """GET or POST one of the endpoint's own routes (over https: trusting the test's certificate)."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=tls["tls_cert"]) if tls and ep.base_url.startswith("https") else None
    with urllib.request.urlopen(urllib.request.Request(ep.root + path, data=data), timeout=10, context=context) as r:
        return json.loads(r.read() or b"null")


def _requests(ep: Endpoint, tls: dict[str, str] | None = None) -> int:
    """How many chat completions the endpoint answered since the test began."""
    return _call(ep, tls, "/stats")["requests"]


@pytest.fixture(scope="module")
def endpoints(tls: dict[str, str]) -> Iterator[dict[str, Endpoint]]:
    """One http and one https built-in endpoint for the whole file (each start costs half a second)."""
    started = {"http": start_endpoint(), "https": start_endpoint(**tls)}
    yield started
    for ep in started.values():
        ep.proc.terminate()
        ep.proc.wait(10)


@pytest.fixture
def http_ep(endpoints: dict[str, Endpoint]) -> Endpoint:
    endpoints["http"].reset()
    return endpoints["http"]


@pytest.fixture
def https_ep(endpoints: dict[str, Endpoint], tls: dict[str, str]) -> Endpoint:
    _call(endpoints["https"], tls, "/stats/reset", b"")
    return endpoints["https"]


def _run(tmp_path: Path, base_url: str, env: dict[str, str], *, rows: int = 6, **overrides: Any) -> subprocess.CompletedProcess:
    manifest = url_manifest(tmp_path / "m.csv", rows)
    job = job_dict(manifest, base_url, tmp_path / "out", **overrides)
    return run_cli("run", str(write_job(tmp_path / "job.toml", job)), env=env, timeout=60)


def _ok(tmp_path: Path, n: int) -> None:
    out = read_output(tmp_path / "out")
    assert len(out) == n and all(r["status"] == "ok" for r in out), out


@pytest.mark.parametrize("stream", [False, True], ids=["pool", "stream"])
def test_http_endpoint_through_the_proxy_in_absolute_form(tmp_path: Path, http_ep: Endpoint,
                                                          proxies: dict[str, ProxyServer], stream: bool) -> None:
    ep, proxy = http_ep, proxies["open"]
    mark = proxy.mark()
    host = ep.base_url.removeprefix("http://").removesuffix("/v1")
    done = _run(tmp_path, ep.base_url, {"HTTP_PROXY": proxy.url}, request={"stream": stream})
    assert done.returncode == 0, done.stderr
    _ok(tmp_path, 6)
    assert ep.stats()["requests"] == 6
    log = proxy.since(mark, f"POST {host}/v1/chat/completions")
    assert f"POST {host}/v1/chat/completions - 200" in log, log  # absolute form: the proxy saw the whole URL
    assert "CONNECT" not in log


@pytest.mark.parametrize("stream", [False, True], ids=["pool", "stream"])
def test_https_endpoint_through_a_connect_tunnel(tmp_path: Path, https_ep: Endpoint, proxies: dict[str, ProxyServer],
                                                 tls: dict[str, str], stream: bool) -> None:
    ep, proxy = https_ep, proxies["auth"]
    assert ep.base_url.startswith("https://127.0.0.1:")
    host = ep.base_url.removeprefix("https://").removesuffix("/v1")
    mark = proxy.mark()
    env = {"HTTPS_PROXY": proxy.with_auth(USER, PASSWORD), "SSL_CERT_FILE": tls["tls_cert"]}
    done = _run(tmp_path, ep.base_url, env, request={"stream": stream}, limits={"max_concurrency": 2})
    assert done.returncode == 0, done.stderr
    _ok(tmp_path, 6)
    assert _requests(ep, tls) == 6
    log = proxy.since(mark, f"CONNECT {host}")
    assert f"CONNECT {host}" in log and "POST" not in log, log  # TLS inside: the proxy sees no request
    # two rows at a time: the tunnels are kept alive, not one per request
    assert 1 <= log.count(f"CONNECT {host}") <= 2 + (0 if not stream else 2), log


def test_through_the_tunnel_the_certificate_is_still_checked(tmp_path: Path, https_ep: Endpoint,
                                                            proxies: dict[str, ProxyServer]) -> None:
    """The tunnel changes the road, not the trust: an untrusted certificate fails as without a proxy."""
    ep = https_ep
    done = _run(tmp_path, ep.base_url, {"HTTPS_PROXY": proxies["open"].url}, rows=2,
                limits={"max_attempts": 1})
    assert done.returncode == 1, done.stderr
    out = read_output(tmp_path / "out")
    assert all(r["error_kind"] == "connection" and "CERTIFICATE_VERIFY_FAILED" in r["error"] for r in out), out


def _secret_free(tmp_path: Path, done: subprocess.CompletedProcess) -> None:
    forms = (PASSWORD, quote(PASSWORD, safe=""), "czNjcjp0QHB3Lzk")  # as is, in the URL, base64 of user:pw
    texts = {"stdout": done.stdout, "stderr": done.stderr}
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".toml":  # the job file is the user's own
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    for where, text in texts.items():
        for form in forms:
            assert form not in text, f"{form!r} in {where}"


@pytest.mark.parametrize("scheme,stream", [("http", False), ("http", True), ("https", False), ("https", True)])
def test_wrong_proxy_credentials_stop_the_run_clearly(tmp_path: Path, endpoints: dict[str, Endpoint],
                                                      proxies: dict[str, ProxyServer], tls: dict[str, str], scheme: str,
                                                      stream: bool) -> None:
    ep = endpoints[scheme]
    before = _requests(ep, tls)
    wrong = proxies["auth"].with_auth(USER, PASSWORD + "x")  # the real password is a prefix of this one
    var = "HTTPS_PROXY" if scheme == "https" else "http_proxy"
    done = _run(tmp_path, ep.base_url, {var: wrong, "SSL_CERT_FILE": tls["tls_cert"]}, request={"stream": stream})
    assert done.returncode == 3, done.stderr
    said = (f"stopped: HTTP 407: the proxy {proxies['auth'].url} refused its credentials (Proxy Authentication Required): "
            f"check the user and password in {var}")
    assert said in done.stderr, done.stderr
    summary = json.loads(next(tmp_path.rglob("last_run.json")).read_text())
    assert summary["stopped"]["kind"] == "auth" and said.removeprefix("stopped: ") in summary["stopped"]["message"], summary
    assert _requests(ep, tls) == before
    _secret_free(tmp_path, done)


def test_right_credentials_in_the_job_file_and_no_secret_anywhere(tmp_path: Path, http_ep: Endpoint,
                                                                   proxies: dict[str, ProxyServer]) -> None:
    ep, proxy = http_ep, proxies["auth"]
    mark = proxy.mark()
    done = _run(tmp_path, ep.base_url, {"HTTP_PROXY": "http://127.0.0.1:9"},  # a dead proxy: the job file's wins
                endpoint={"proxy": proxy.with_auth(USER, PASSWORD)})
    assert done.returncode == 0, done.stderr
    _ok(tmp_path, 6)
    assert "POST" in proxy.since(mark, "POST")
    _secret_free(tmp_path, done)


class _Images(http.server.BaseHTTPRequestHandler):
    png = b""
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_host() -> Iterator[str]:
    """An image host on "localhost" (the endpoint is on 127.0.0.1): NO_PROXY can tell them apart."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "PNG")
    _Images.png, _Images.hits = buf.getvalue(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _image_rows(tmp_path: Path, host: str, n: int = 4) -> Path:
    rows = [{"id": f"r{i}", "image": f"{host}/cat{i}.png", "prompt": f"describe {i}"} for i in range(n)]
    write_rows(tmp_path / "m.csv", rows, "csv")
    return tmp_path / "m.csv"


def test_image_fetches_through_the_proxy_and_no_proxy_for_the_endpoint(
        tmp_path: Path, http_ep: Endpoint, proxies: dict[str, ProxyServer], image_host: str) -> None:
    ep, proxy = http_ep, proxies["open"]
    mark = proxy.mark()
    job = job_dict(_image_rows(tmp_path, image_host), ep.base_url, tmp_path / "out",
                   images={"image_mode": "inline", "fetch_retries": 0, "pool": "thread"})
    env = {"http_proxy": proxy.url, "NO_PROXY": "127.0.0.1"}  # the endpoint directly, the image host by proxy
    done = run_cli("run", str(write_job(tmp_path / "job.toml", job)), env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    _ok(tmp_path, 4)
    assert "PNG image, 32x24 pixels" in read_output(tmp_path / "out")[0]["answer"]
    log = proxy.since(mark, "GET localhost")
    host = image_host.removeprefix("http://")
    assert f"GET {host}/cat" in log, log
    assert "chat/completions" not in log, log  # NO_PROXY: the endpoint was reached directly
    assert sorted(_Images.hits) == [f"/cat{i}.png" for i in range(4)]
    assert ep.stats()["requests"] == 4


def test_empty_proxy_setting_bypasses_the_environment(tmp_path: Path, http_ep: Endpoint,
                                                      proxies: dict[str, ProxyServer], image_host: str) -> None:
    ep, proxy = http_ep, proxies["open"]
    mark = proxy.mark()
    job = job_dict(_image_rows(tmp_path, image_host), ep.base_url, tmp_path / "out",
                   endpoint={"proxy": ""}, images={"image_mode": "inline", "fetch_retries": 0, "pool": "thread"})
    env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "ALL_PROXY": proxy.url}
    done = run_cli("run", str(write_job(tmp_path / "job.toml", job)), env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    _ok(tmp_path, 4)
    time.sleep(0.3)
    assert proxy.since(mark) == ""  # not one connection
    assert ep.stats()["requests"] == 4 and len(_Images.hits) == 4


def test_no_proxy_bypasses_it_for_the_endpoint(tmp_path: Path, http_ep: Endpoint, proxies: dict[str, ProxyServer]) -> None:
    ep, proxy = http_ep, proxies["open"]
    port = ep.base_url.rsplit(":", 1)[1].removesuffix("/v1")
    mark = proxy.mark()
    done = _run(tmp_path, ep.base_url, {"HTTP_PROXY": proxy.url, "no_proxy": f"127.0.0.1:{port}"}, request={"stream": True})
    assert done.returncode == 0, done.stderr
    _ok(tmp_path, 6)
    time.sleep(0.3)
    assert proxy.since(mark) == ""


def test_the_environment_is_read_once_when_the_job_is_loaded(tmp_path: Path, http_ep: Endpoint,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy variable set between load_job and run (a notebook cell, a library) is not picked up
    halfway: the run goes as the job was loaded. Before, the client re-read the environment and
    sent every request to the dead proxy."""
    from pipeline.api import run
    from pipeline.config import load_job

    job = load_job(job_dict(url_manifest(tmp_path / "m.csv", 6), http_ep.base_url, tmp_path / "out"))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    result = run(job, progress=False)
    assert result.exit_code == 0, result.summary
    _ok(tmp_path, 6)
    assert http_ep.stats()["requests"] == 6


def test_a_pickled_job_takes_its_proxy_choice_to_a_worker_with_another_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from pipeline.config import load_job

    monkeypatch.setenv("HTTPS_PROXY", f"http://{USER}:{quote(PASSWORD, safe='')}@proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "images.internal, 10.0.0.0/8")
    job = load_job(job_dict(url_manifest(tmp_path / "m.csv", 1), "https://api.example/v1", tmp_path / "out"))
    monkeypatch.delenv("HTTPS_PROXY")  # a Ray worker's node, set up otherwise
    monkeypatch.setenv("NO_PROXY", "*")
    moved = pickle.loads(pickle.dumps(job))
    proxy = moved.endpoint_proxy()
    assert proxy is not None and (proxy.host, proxy.port, proxy.password) == ("proxy.corp", 3128, PASSWORD)
    assert moved.proxies().for_url("https://cdn.example/a.png") == proxy
    assert moved.proxies().for_url("https://images.internal/a.png") is None
    assert moved.proxies().for_url("https://10.1.2.3/a.png") is None
    assert PASSWORD in moved.proxies().secrets()
    assert PASSWORD not in repr(moved)


def test_an_unusable_proxy_variable_is_named_before_anything_is_sent(tmp_path: Path, http_ep: Endpoint) -> None:
    ep = http_ep
    done = _run(tmp_path, ep.base_url, {"HTTP_PROXY": "socks5://u:hidden-pw@127.0.0.1:1080"})
    assert done.returncode == 2, done.stderr
    assert "HTTP_PROXY: only http:// proxies are supported" in done.stderr and "hidden-pw" not in done.stderr
    assert ep.stats()["requests"] == 0


def test_a_proxy_that_cannot_reach_the_endpoint_is_a_retried_connection_failure(
        tmp_path: Path, proxies: dict[str, ProxyServer]) -> None:
    """proxy.py answers 502 to CONNECT when the endpoint's port is closed: retried, then an error row."""
    done = _run(tmp_path, "https://127.0.0.1:9/v1", {"HTTPS_PROXY": proxies["open"].url}, rows=1,
                limits={"max_attempts": 2})
    assert done.returncode == 1, done.stderr
    [row] = read_output(tmp_path / "out")
    assert (row["error_kind"], row["attempts"]) == ("connection", 2), row
    assert row["error"] == f"HTTP 502: the proxy {proxies['open'].url} could not reach the endpoint (Bad Gateway)", row


async def test_the_pool_keeps_its_tunnel_alive(https_ep: Endpoint, proxies: dict[str, ProxyServer],
                                               tls: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Five posts one after another: one CONNECT, one TLS handshake, five answers."""
    from pipeline.net.connection import ConnectionPool

    monkeypatch.setenv("SSL_CERT_FILE", tls["tls_cert"])
    ep, proxy = https_ep, proxies["auth"]
    mark = proxy.mark()
    pool = ConnectionPool(ep.base_url + "/chat/completions", {"Content-Type": "application/json"}, max_connections=1,
                          timeout_s=10, proxy=parse_proxy(proxy.with_auth(USER, PASSWORD), "[endpoint] proxy"))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    try:
        for _ in range(5):
            status, _, answer = await pool.post(body, max_bytes=1 << 20)
            assert status == 200 and b"choices" in answer
        assert PASSWORD not in repr(pool) and "via http://127.0.0.1:" in repr(pool)
    finally:
        await pool.close()
    host = ep.base_url.removeprefix("https://").removesuffix("/v1")
    assert proxy.since(mark, "CONNECT").count(f"CONNECT {host}") == 1
    assert _requests(ep, tls) == 5


def test_batch_api_calls_go_through_the_proxy(tmp_path: Path, http_ep: Endpoint, proxies: dict[str, ProxyServer]) -> None:
    """[run] mode = "batch": uploads, batches and downloads through the same choice as online requests."""
    proxy = proxies["auth"]
    mark = proxy.mark()
    host = http_ep.base_url.removeprefix("http://").removesuffix("/v1")
    done = _run(tmp_path, http_ep.base_url, {"http_proxy": proxy.with_auth(USER, PASSWORD)}, rows=3,
                run={"mode": "batch", "poll_s": 0.3})
    assert done.returncode == 0, done.stderr
    _ok(tmp_path, 3)
    log = proxy.since(mark, f"{host}/v1/files")
    assert f"{host}/v1/files" in log or f"{host}/v1/batches" in log, log
    _secret_free(tmp_path, done)
