"""The lean HTTP/1.1 pool that carries plain answers: framing, keep-alive and failures.

Against the built-in endpoint (framed by length, chunked, gzip; keep-alive closed by the server)
and, for what no well-behaved server sends, a raw TCP server in the test answering canned bytes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable

import pytest
from conftest import job_dict, read_output, run_cli, url_manifest, write_job

from pipeline.errors import RequestError
from pipeline.net.client import Client
from pipeline.net.connection import ConnectionPool
from pipeline.net.response import MalformedResponse, ResponseCut

CAP = 1 << 20
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Describe it."}]}).encode()


@pytest.mark.parametrize("transfer", ["length", "chunked", "gzip"])
async def test_answers_read_whole_however_framed(endpoint_factory: Any, transfer: str) -> None:
    ep = endpoint_factory(transfer=transfer, answer_bytes=5000)
    pool = ConnectionPool(ep.base_url + "/chat/completions", {"Content-Type": "application/json"},
                          max_connections=4, timeout_s=10)
    try:
        answers = [await pool.post(BODY, max_bytes=CAP) for _ in range(3)]
    finally:
        await pool.close()
    for status, headers, raw in answers:
        assert status == 200
        if transfer != "length":
            assert headers["transfer-encoding"] == "chunked"
        if transfer == "gzip":
            assert headers["content-encoding"] == "gzip"
        content = json.loads(raw)["choices"][0]["message"]["content"]
        assert len(content) >= 5000
    assert ep.stats()["connections"] == 1  # three answers, one kept-alive connection


def test_a_job_runs_against_a_gzip_chunked_server(endpoint_factory: Any, tmp_path: Any) -> None:
    ep = endpoint_factory(transfer="gzip")
    manifest = url_manifest(tmp_path / "m.csv", 40)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out"))
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    rows = read_output(tmp_path / "out")
    assert len(rows) == 40 and {row["status"] for row in rows} == {"ok"}
    assert all(row["answer"] and row["prompt"].removeprefix("Describe picture ") in row["answer"] for row in rows)
    assert ep.stats()["requests"] == 40


async def test_a_connection_the_server_closed_while_idle_is_not_used(endpoint_factory: Any) -> None:
    ep = endpoint_factory(keepalive_s=0.2)
    async with Client(ep.base_url + "/chat/completions", None, timeout_s=10, max_connections=2) as client:
        await client.post(BODY)
        await asyncio.sleep(1.0)  # the server closes the idle connection meanwhile
        data = (await client.post(BODY)).body  # no spurious "connection" error: a fresh connection
    assert data["choices"][0]["message"]["content"]
    assert ep.stats()["connections"] == 2


async def test_the_key_is_sent_but_never_shown(endpoint_factory: Any) -> None:
    ep = endpoint_factory(api_key="sk-right")
    async with Client(ep.base_url + "/chat/completions", "sk-right", timeout_s=10, max_connections=1) as client:
        data = (await client.post(BODY)).body
        assert data["choices"]
        assert "sk-right" not in repr(client._pool)
    async with Client(ep.base_url + "/chat/completions", "sk-wrong", timeout_s=10, max_connections=1) as client:
        with pytest.raises(RequestError) as caught:
            await client.post(BODY)
    assert caught.value.kind == "auth" and "sk-wrong" not in str(caught.value)


# -- a raw server for what well-behaved servers do not send -----------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


class RawServer:
    """Answers each request with the next canned answer: its pieces written one by one, then the
    connection closed if the answer is marked so; None: say nothing at all."""

    def __init__(self, answers: list[tuple[list[bytes], bool] | None]) -> None:
        self.answers = answers
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                self.requests.append(await _read_request(reader))
                answer = self.answers.pop(0)
                if answer is None:
                    await asyncio.sleep(30)
                    return
                pieces, close = answer
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _serve(raw: RawServer) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions"


async def _post_all(raw: RawServer, count: int, *, timeout_s: float = 5) -> list[Any]:
    server, url = await _serve(raw)
    pool = ConnectionPool(url, {"Authorization": "Bearer sk-raw"}, max_connections=1, timeout_s=timeout_s)
    results: list[Any] = []
    try:
        for _ in range(count):
            try:
                results.append(await pool.post(b'{"x": 1}', max_bytes=CAP))
            except Exception as exc:  # noqa: BLE001 - the failure is the result under test
                results.append(exc)
    finally:
        await pool.close()
        server.close()
    return results


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


async def test_request_is_one_well_formed_post() -> None:
    raw = RawServer([([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"], False)])
    [(status, _, body)] = await _post_all(raw, 1)
    assert (status, body) == (200, b"{}")
    request = raw.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in request and b"\r\nAuthorization: Bearer sk-raw\r\n" in request
    assert request.endswith(b"Content-Length: 8\r\n\r\n{\"x\": 1}")


async def test_answers_split_into_single_bytes_and_interim_responses() -> None:
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Ratelimit-Remaining-Requests: 7\r\n\r\n"
               b"4;ext=1\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\nTrailer: yes\r\n\r\n")
    length = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nRetry-After: 3\r\n\r\n{}"
    raw = RawServer([(_bytewise(chunked), False), (_bytewise(length), False)])
    first, second = await _post_all(raw, 2)
    assert first == (200, {"transfer-encoding": "chunked", "x-ratelimit-remaining-requests": "7"}, b'{"a": 1}')
    assert second == (429, {"content-length": "2", "retry-after": "3"}, b"{}")
    assert raw.connections == 1  # both on one kept-alive connection


async def test_answers_to_end_of_connection_and_connection_close() -> None:
    http10 = [b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n", b'{"b": 2}']
    close = [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"]
    plain = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]"]
    raw = RawServer([(http10, True), (close, True), (plain, False)])
    results = await _post_all(raw, 3)
    assert [r[2] for r in results] == [b'{"b": 2}', b"{}", b"[]"]
    assert raw.connections == 3  # neither an HTTP/1.0 answer nor Connection: close is reused


async def test_garbage_cut_answers_and_silence_fail_as_their_kinds() -> None:
    garbage = RawServer([([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], False)])
    [exc] = await _post_all(garbage, 1)
    assert isinstance(exc, MalformedResponse)

    cut = RawServer([([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial"], True)])
    [exc] = await _post_all(cut, 1)
    assert isinstance(exc, ResponseCut)

    silent = RawServer([None])
    started = time.monotonic()
    [exc] = await _post_all(silent, 1, timeout_s=0.3)
    assert isinstance(exc, TimeoutError) and time.monotonic() - started < 10


@pytest.mark.parametrize(
    "answer, kind",
    [
        (([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], False), "invalid_response"),
        (([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"], True), "connection"),
        (([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!"], False), "invalid_response"),
        (None, "timeout"),
    ],
)
async def test_client_names_each_failure(answer: tuple[list[bytes], bool] | None, kind: str) -> None:
    server, url = await _serve(RawServer([answer]))
    try:
        async with Client(url, "sk-secret", timeout_s=0.5, max_connections=1) as client:
            with pytest.raises(RequestError) as caught:
                await client.post(b"{}")
    finally:
        server.close()
    assert caught.value.kind == kind
    assert "sk-secret" not in caught.value.describe()


async def test_a_refused_connection_is_a_connection_error() -> None:
    server, url = await _serve(RawServer([]))
    server.close()
    await server.wait_closed()
    async with Client(url, None, timeout_s=2, max_connections=1) as client:
        with pytest.raises(RequestError) as caught:
            await client.post(b"{}")
    assert caught.value.kind == "connection"
