"""Streamed answers: SSE assembly (pure), the client over real HTTP, and whole runs with `stream = true`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SEED, job_dict, read_output, run_cli, url_manifest, write_job

from pipeline.errors import RequestError
from pipeline.net.client import Client, translate
from pipeline.net.retry import should_retry
from pipeline.net.stream import StreamAssembler, StreamError, assemble, to_sse
from pipeline.rows.answer import parse_response


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return "data: " + json.dumps({"id": "c1", "model": "qvq-max", "choices": choices, **extra}) + "\n"


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def _lines(*events: str) -> list[str]:
    out: list[str] = []
    for e in events:
        out += [e, "\n"]  # each event ends with a blank line, as SSE servers send them
    return out


# -- assembly (pure) ---------------------------------------------------------------------


def test_content_and_reasoning_deltas_usage_and_finish_assemble_into_one_answer() -> None:
    body = assemble(_lines(
        ": OPENROUTER PROCESSING\n",
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "The image shows "}),
        _chunk({"reasoning_content": "a cat."}),
        _chunk({"content": "A cat "}),
        _chunk({"content": "on a mat."}),
        _chunk({}, "stop"),
        _chunk(None, usage=USAGE),
        "data: [DONE]\n",
    ))
    answer = parse_response(body)
    assert answer.answer == "A cat on a mat."
    assert answer.reasoning == "The image shows a cat."
    assert (answer.prompt_tokens, answer.completion_tokens, answer.total_tokens) == (10, 5, 15)
    assert answer.model == "qvq-max"
    assert answer.finish_reason == "stop"


def test_reasoning_field_and_think_block_in_content_are_both_read() -> None:
    vllm = parse_response(assemble(_lines(_chunk({"reasoning": "hmm"}), _chunk({"content": "yes"}, "stop"), "data: [DONE]")))
    assert (vllm.answer, vllm.reasoning) == ("yes", "hmm")
    think = parse_response(assemble(_lines(
        _chunk({"content": "<think>\nlooking"}), _chunk({"content": "</think>\n\nA dog."}, "stop"), "data: [DONE]"
    )))
    assert (think.answer, think.reasoning) == ("A dog.", "looking")


def test_bytes_split_anywhere_assemble_the_same() -> None:
    raw = "".join(_lines(_chunk({"content": "百度热搜以醒目红底白字"}), _chunk({}, "stop"), _chunk(None, usage=USAGE), "data: [DONE]")).encode()
    for size in (1, 3, 7, 64):
        asm = StreamAssembler()
        for i in range(0, len(raw), size):
            asm.feed_bytes(raw[i:i + size])
        answer = parse_response(asm.result())
        assert answer.answer == "百度热搜以醒目红底白字"
        assert answer.total_tokens == 15


def test_events_without_blank_lines_between_them_are_still_read() -> None:
    answer = parse_response(assemble([_chunk({"content": "a"}), _chunk({"content": "b"}, "stop"), "data: [DONE]\n"]))
    assert answer.answer == "ab"


def test_a_stream_without_usage_leaves_token_counts_unknown() -> None:
    answer = parse_response(assemble(_lines(_chunk({"content": "ok"}, "stop"), "data: [DONE]")))
    assert answer.answer == "ok"
    assert (answer.prompt_tokens, answer.completion_tokens, answer.total_tokens) == (None, None, None)


def test_finish_reason_or_done_alone_completes_a_stream() -> None:
    assert parse_response(assemble(_lines(_chunk({"content": "ok"}, "stop")))).answer == "ok"  # no [DONE]
    done_only = parse_response(assemble(_lines(_chunk({"content": "ok"}), "data: [DONE]")))
    assert done_only.answer == "ok" and done_only.finish_reason is None


def test_a_stream_cut_before_done_and_finish_reason_is_an_error() -> None:
    with pytest.raises(StreamError) as cut:
        assemble(_lines(_chunk({"content": "half an ans"})))
    assert cut.value.reason == "cut"


@pytest.mark.parametrize(
    "chunk",
    [
        {"error": {"message": "The server had an error", "type": "server_error", "code": None}},
        {"object": "error", "message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500},
    ],
    ids=["openai", "vllm"],
)
def test_an_error_chunk_midstream_is_a_retryable_failure(chunk: dict[str, Any]) -> None:
    with pytest.raises(StreamError) as exc:
        assemble(_lines(_chunk({"content": "part"}), "data: " + json.dumps(chunk), "data: [DONE]"))
    err = translate(exc.value)
    assert isinstance(err, RequestError)
    assert err.kind == "server"
    assert "error" in err.message.lower()
    assert should_retry(err, attempt=1, max_attempts=3)


def test_a_chunk_that_is_not_json_is_an_invalid_response() -> None:
    with pytest.raises(StreamError) as exc:
        assemble(_lines("data: <html>502</html>"))
    assert translate(exc.value).kind == "invalid_response"


def _seed_response() -> dict[str, Any]:
    text = SEED.read_text(encoding="utf-8")
    at = text.index('"chat.completion"')
    start = text.rfind("\n{", 0, at) + 1
    body, _ = json.JSONDecoder().raw_decode(text[start:])
    return body


def test_the_seed_example_parses_the_same_when_sent_as_a_stream() -> None:
    seed = _seed_response()
    assert seed["model"] == "qvq-max-2025-03-25"
    whole = parse_response(seed)
    for piece in (1, 7, 24):
        assert parse_response(assemble(b"".join(to_sse(seed, piece_chars=piece, max_pieces=10_000)).split(b"\n"))) == whole
    streamed = whole  # the same, whichever piece size
    assert streamed.answer is not None and streamed.answer.startswith("百度热搜以醒目红底白字图标设计")
    assert streamed.reasoning is not None and streamed.reasoning.startswith("嗯,用户让我用一句话总结百度热搜的图片")
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) == (121, 232, 353)


# -- the client over HTTP ----------------------------------------------------------------


def _body(prompt: str, *, stream: bool = True, usage: bool = True) -> bytes:
    body: dict[str, Any] = {"model": "qvq-max", "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}
    if stream:
        body["stream"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def test_client_assembles_the_built_in_endpoints_stream(endpoint_factory: Any) -> None:
    ep = endpoint_factory(reasoning_field="reasoning_content", row_faults={"bare": "no_usage"})
    async with Client(ep.base_url + "/chat/completions", None, timeout_s=10, max_connections=2) as client:
        streamed, headers, _, _ = await client.post_stream(_body("hello"))
        plain = (await client.post(_body("hello", stream=False))).body
        bare = (await client.post_stream(_body("bare"))).body
        not_asked = (await client.post_stream(_body("hello", usage=False))).body
    assert headers["content-type"].startswith("text/event-stream")
    s, p = parse_response(streamed), parse_response(plain)
    assert (s.answer, s.reasoning, s.total_tokens, s.finish_reason) == (p.answer, p.reasoning, p.total_tokens, p.finish_reason)
    assert s.answer and s.reasoning and s.total_tokens
    for no_usage in (parse_response(bare), parse_response(not_asked)):
        assert no_usage.answer and no_usage.total_tokens is None


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("cut", "connection"), ("stream_end", "connection"), ("stream_error", "server"), ("stream_error_vllm", "server")],
)
async def test_client_turns_broken_streams_into_retryable_errors(endpoint_factory: Any, fault: str, kind: str) -> None:
    ep = endpoint_factory(row_faults={"faulty": fault}, answer_bytes=2000)
    async with Client(ep.base_url + "/chat/completions", None, timeout_s=10, max_connections=2) as client:
        with pytest.raises(RequestError) as exc:
            await client.post_stream(_body("faulty row"))
        ok = (await client.post_stream(_body("a healthy row"))).body  # the client is still usable
    assert exc.value.kind == kind
    assert should_retry(exc.value, attempt=1, max_attempts=3)
    assert parse_response(ok).answer
    assert ep.stats()["faults"] == {fault: 1}


async def test_a_refusal_reads_the_same_on_the_plain_and_the_streamed_path(endpoint_factory: Any) -> None:
    """From the answer's head on, `post` and `post_stream` share one path: the same refusal becomes
    the same RequestError (kind, status, code, the server's retry verdict and delay, message)."""
    faults = {"quota row": "quota", "busy row": "429", "failing row": "500", "moved row": "redirect", "bad row": "400"}
    ep = endpoint_factory(row_faults=faults, x_should_retry={"500": "false"}, fault_retry_after_s=2)
    errors: dict[str, list[tuple[Any, ...]]] = {}
    async with Client(ep.base_url + "/chat/completions", None, timeout_s=10, max_connections=2) as client:
        for prompt in faults:
            for post, stream in ((client.post, False), (client.post_stream, True)):
                with pytest.raises(RequestError) as caught:
                    await post(_body(prompt, stream=stream))
                err = caught.value
                errors.setdefault(prompt, []).append((err.kind, err.status, err.code, err.should_retry,
                                                      err.headers.get("retry-after"), str(err)))
    for prompt, (plain, streamed) in errors.items():
        assert plain == streamed, prompt
    kinds = {prompt: (e[0][0], e[0][1]) for prompt, e in errors.items()}
    assert kinds == {"quota row": ("quota", 429), "busy row": ("rate_limit", 429), "failing row": ("server", 500),
                     "moved row": ("bad_request", 307), "bad row": ("bad_request", 400)}
    assert errors["failing row"][0][3] is False and errors["busy row"][0][4] == "2"


# -- whole runs ------------------------------------------------------------------------


def _run(tmp_path: Path, name: str, base_url: str, manifest: Path, **sections: Any) -> tuple[Any, list[dict[str, Any]]]:
    out = tmp_path / f"out-{name}"
    job = write_job(tmp_path / f"{name}.toml", {**job_dict(manifest, base_url, out, **sections), "name": name})
    result = run_cli("run", str(job))
    return result, sorted(read_output(out), key=lambda r: r["id"])


@pytest.mark.parametrize("reasoning_field", ["content", "reasoning_content"])  # "reasoning": see the pure tests
def test_a_streamed_run_writes_the_same_rows_as_a_plain_one(tmp_path: Path, endpoint_factory: Any, reasoning_field: str) -> None:
    ep = endpoint_factory(reasoning_field=reasoning_field, model="qvq-max-2025-03-25", record=True)
    manifest = url_manifest(tmp_path / "m.csv", 6)
    plain, plain_rows = _run(tmp_path, "plain", ep.base_url, manifest)
    streamed, streamed_rows = _run(tmp_path, "streamed", ep.base_url, manifest, request={"stream": True})
    assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
    drop = {"latency_ms", "finished_at"}  # when, not what
    assert [{k: v for k, v in r.items() if k not in drop} for r in streamed_rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in plain_rows]
    assert all(r["reasoning"] and r["answer"] and r["total_tokens"] and r["model"] == "qvq-max-2025-03-25" for r in streamed_rows)
    sent = [json.loads(r["body"]) for r in ep.requests()]
    assert sum(1 for b in sent if b.get("stream") is True and b.get("stream_options") == {"include_usage": True}) == 6
    assert sum(1 for b in sent if "stream" not in b) == 6


def test_a_stream_only_model_fails_without_stream_and_answers_with_it(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(reasoning_only_stream=True, reasoning_field="reasoning_content")
    manifest = url_manifest(tmp_path / "m.csv", 3)
    plain, plain_rows = _run(tmp_path, "plain", ep.base_url, manifest)
    assert plain.returncode == 1
    assert {r["error_kind"] for r in plain_rows} == {"bad_request"}
    assert all("stream" in r["error"] for r in plain_rows)
    streamed, rows = _run(tmp_path, "streamed", ep.base_url, manifest, request={"stream": True})
    assert streamed.returncode == 0, streamed.stderr
    assert all(r["status"] == "ok" and r["reasoning"] and r["total_tokens"] for r in rows)


def test_broken_streams_are_retried_and_a_stream_without_usage_leaves_tokens_null(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={
        "row-00000": "cut:1", "row-00001": "stream_end:1", "row-00002": "stream_error:1",
        "row-00003": "stream_error_vllm:1", "row-00004": "no_usage", "row-00005": "stream_error",
    })
    manifest = url_manifest(tmp_path / "m.csv", 7)
    result, rows = _run(tmp_path, "s", ep.base_url, manifest, request={"stream": True}, limits={"max_attempts": 3})
    assert result.returncode == 1  # row 5 never streams without an error
    by_id = {r["id"]: r for r in rows}
    for i in range(4):
        r = by_id[f"row-{i:05d}"]
        assert (r["status"], r["attempts"]) == ("ok", 2), r
        assert r["answer"].startswith("Answer to") and r["total_tokens"]
    bare = by_id["row-00004"]
    assert bare["status"] == "ok" and bare["answer"]
    assert (bare["prompt_tokens"], bare["completion_tokens"], bare["total_tokens"]) == (None, None, None)
    failed = by_id["row-00005"]
    assert (failed["status"], failed["error_kind"], failed["attempts"]) == ("error", "server", 3)
    assert by_id["row-00006"]["status"] == "ok" and by_id["row-00006"]["attempts"] == 1
    assert ep.stats()["per_row"]["Describe picture row-00005"] == 3
