"""The Responses API (`[endpoint] api = "responses"`, POST /v1/responses): the same manifest gives
the same answers, reasoning and token columns as chat, plain, streamed, labeled and in batch mode;
every request the pipeline sends, and every answer and stream event the built-in endpoint makes,
is valid against OpenAI's published OpenAPI description (tests/fixtures/openai_openapi/); the
answer's edges (incomplete, failed, reasoning summaries, streams cut or failing) as rows.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DATA, job_dict, read_output, run_cli, url_manifest, write_job, write_rows
from openapi import assert_valid, problems

from pipeline.config import Api, load_job
from pipeline.errors import JobError, RequestError
from pipeline.net.events import ResponsesFold, to_events
from pipeline.net.stream import StreamError, assemble
from pipeline.rows.answer import parse_response, usage_of, withheld
from pipeline.rows.responses import ResponsesBody
from pipeline.tools.serve.completion import REFUSAL

SAME = ("id", "answer", "reasoning", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
        "reasoning_tokens", "model", "finish_reason", "status", "error_kind", "cost")
PRICES = {"input_per_million": 2.0, "output_per_million": 6.0, "cached_input_per_million": 0.5}
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["cat", "person", "thing"]},
                                           "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
          "required": ["label", "confidence"]}


def _manifest(tmp_path: Path) -> Path:
    """Local images (sent inline: input_image data URIs) and remote ones (URLs as they are)."""
    shutil.copytree(DATA / "images", tmp_path / "images", dirs_exist_ok=True)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    rows = [{"id": f"row-{i:05d}", "image": f"images/{names[i % len(names)]}" if i % 3 else f"https://img.example/{i}.png",
             "prompt": f"Describe picture row-{i:05d}"} for i in range(9)]
    write_rows(tmp_path / "m.csv", rows, "csv")
    return tmp_path / "m.csv"


def _run(tmp_path: Path, ep: Any, name: str, api: str, expect: int = 0, **overrides: Any) -> list[dict[str, Any]]:
    manifest = tmp_path / "m.csv"
    if not manifest.exists():
        _manifest(tmp_path)
    endpoint = {"api": api, **overrides.pop("endpoint", {})}
    request = {"max_tokens": 200, "system_prompt": "You label pictures.", **overrides.pop("request", {})}
    data = {**job_dict(manifest, ep.base_url, tmp_path / f"out-{name}", endpoint=endpoint, request=request,
                       **overrides), "name": name}
    job = write_job(tmp_path / f"{name}.toml", data)
    r = run_cli("run", str(job))
    assert r.returncode == expect, r.stderr
    return sorted(read_output(tmp_path / f"out-{name}"), key=lambda row: row["id"])


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]], columns: tuple[str, ...] = SAME) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert {k: x[k] for k in columns} == {k: y[k] for k in columns}, x["id"]


def _bodies(ep: Any, api: str) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in ep.requests() if r.get("api") == api and r.get("body")]


def _post(ep: Any, path: str, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(ep.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.read()


def _events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.decode().split("\n\n"):
        data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


@pytest.mark.parametrize("reasoning_field", ["content", "reasoning_content"])
def test_the_same_manifest_through_chat_and_responses_gives_the_same_rows(
        tmp_path: Path, endpoint_factory: Any, reasoning_field: str) -> None:
    ep = endpoint_factory(record=True, reasoning_field=reasoning_field, cached_prompt_tokens=6)
    chat = _run(tmp_path, ep, "chat", "chat", pricing=PRICES)
    responses = _run(tmp_path, ep, "responses", "responses", pricing=PRICES,
                     request={"reasoning": {"effort": "low", "summary": "auto"}})
    _same(chat, responses)
    assert all(r["status"] == "ok" and r["answer"] and r["reasoning"] and r["cached_tokens"] == 6 for r in responses)
    assert all(r["reasoning_tokens"] > 0 and r["cost"] > 0 for r in responses)
    assert any("JPEG image" in r["answer"] for r in responses)  # the inlined picture arrived and was decoded
    sent = _bodies(ep, "responses")
    assert len(sent) == 9
    for body in sent:
        assert_valid("CreateResponse", body)
        assert body["instructions"] == "You label pictures." and body["max_output_tokens"] == 200
        assert body["reasoning"] == {"effort": "low", "summary": "auto"}  # passed through as written
        assert body["store"] is False  # the Responses API stores by default: a bulk job asks it not to
        (item,) = body["input"]
        kinds = [part["type"] for part in item["content"]]
        assert kinds == ["input_text", "input_image"] and item["content"][1]["detail"] == "auto"
    for body in _bodies(ep, "chat"):
        assert_valid("CreateChatCompletionRequest", body)
    answer = json.loads(_post(ep, "/responses", sent[0]))  # the endpoint's own answer, as the description says
    assert_valid("Response", answer)
    assert [item["type"] for item in answer["output"]] == ["reasoning", "message"]


def test_a_streamed_responses_run_reads_the_typed_events(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(record=True, reasoning_field="reasoning")
    plain = _run(tmp_path, ep, "plain", "responses")
    streamed = _run(tmp_path, ep, "streamed", "responses", request={"stream": True})
    _same(plain, streamed)
    bodies = _bodies(ep, "responses")[-9:]
    assert all(b["stream"] is True and "stream_options" not in b for b in bodies)
    for body in bodies:
        assert_valid("CreateResponse", body)
    events = _events(_post(ep, "/responses", bodies[0]))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.reasoning_summary_text.delta" in kinds
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        assert_valid("ResponseStreamEvent", event)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == next(r["answer"] for r in plain if r["id"] == "row-00000")


@pytest.mark.parametrize("fault", ["cut", "stream_end", "stream_error", "stream_error_vllm"])
def test_a_broken_responses_stream_is_retried(tmp_path: Path, endpoint_factory: Any, fault: str) -> None:
    ep = endpoint_factory(row_faults={"row-00004": f"{fault}:1"})
    rows = _run(tmp_path, ep, "s", "responses", request={"stream": True})
    by_id = {r["id"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows)
    assert by_id["row-00004"]["attempts"] == 2 and by_id["row-00003"]["attempts"] == 1
    assert ep.stats()["per_row"]["Describe picture row-00004"] == 2


@pytest.mark.parametrize("api, stream", [("chat", False), ("chat", True), ("responses", False), ("responses", True)])
def test_a_refusal_is_one_paid_final_row(tmp_path: Path, endpoint_factory: Any, api: str, stream: bool) -> None:
    """Every row refused (chat's message.refusal, a Responses refusal part, streamed or not): each
    bought once, its words kept in `error`, its cost counted in the row and the spend; a run of
    refusals is a run of answers, so neither "the endpoint looks down" (breaker_failures 2) nor
    "wrong job" (breaker_refusals) stops it. Before: each row bought max_attempts (4) times,
    invalid_response, cost null, "spent 0.0000", and the breaker tripped."""
    ep = endpoint_factory(record=True, row_faults={"Describe": "refusal"})
    _manifest(tmp_path)
    job = write_job(tmp_path / "r.toml", {**job_dict(
        tmp_path / "m.csv", ep.base_url, tmp_path / "out-r", endpoint={"api": api}, pricing=PRICES,
        request={"stream": stream}, limits={"breaker_failures": 2, "max_concurrency": 2}), "name": "r"})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr  # 1: rows failed (not 3: nothing stopped the run)
    rows = read_output(tmp_path / "out-r")
    assert len(rows) == 9 and ep.stats()["requests"] == 9, ep.stats()["per_row"]
    for row in rows:
        assert (row["status"], row["error_kind"], row["answer"], row["attempts"]) == ("error", "refusal", None, 1), row
        assert row["error"] == REFUSAL
        assert row["cost"] == pytest.approx((row["prompt_tokens"] * 2.0 + row["completion_tokens"] * 6.0) / 1e6)
        assert row["cost"] > 0
    assert f"spent {sum(row['cost'] for row in rows):.4f}" in r.stderr, r.stderr
    status = run_cli("status", str(job))
    assert "refusal" in status.stdout, status.stdout + status.stderr
    if api == "chat" and not stream:
        message = json.loads(_post(ep, "/chat/completions", _bodies(ep, "chat")[0]))["choices"][0]["message"]
        assert (message["content"], message["refusal"]) == (None, REFUSAL)  # as OpenAI documents a refusal
    if api == "responses" and not stream:
        answer = json.loads(_post(ep, "/responses", _bodies(ep, "responses")[0]))
        assert_valid("Response", answer)  # the refusal the endpoint sends is OpenAI's shape
        assert answer["output"][-1]["content"] == [{"type": "refusal", "refusal": REFUSAL}]
    if api == "responses" and stream:
        events = _events(_post(ep, "/responses", _bodies(ep, "responses")[0]))
        for event in events:
            assert_valid("ResponseStreamEvent", event)
        assert "response.refusal.delta" in [e["type"] for e in events]


def test_a_refusal_in_a_batch_is_a_final_row_with_its_cost(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"row-00003": "refusal"})
    url_manifest(tmp_path / "m.csv", 6)
    rows = {r["id"]: r for r in _run(tmp_path, ep, "b", "responses", expect=1, pricing=PRICES,
                                      run={"mode": "batch", "poll_s": 0.3})}
    refused = rows["row-00003"]
    assert (refused["status"], refused["error_kind"], refused["error"], refused["answer"]) == ("error", "refusal", REFUSAL, None)
    assert refused["cost"] > 0 and len(ep.stats()["batches"]) == 1  # not sent again in a second batch
    assert sum(r["status"] == "ok" for r in rows.values()) == 5


def test_labels_go_as_text_format_and_come_back_as_columns(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(record=True, vary_labels=True)
    chat = _run(tmp_path, ep, "chat", "chat", labels={"schema": SCHEMA})
    responses = _run(tmp_path, ep, "responses", "responses", labels={"schema": SCHEMA})
    _same(chat, responses, SAME + ("label", "confidence"))
    assert {r["label"] for r in responses} <= {"cat", "person", "thing"} and len({r["label"] for r in responses}) > 1
    for body in _bodies(ep, "responses"):
        assert_valid("CreateResponse", body)
        assert body["text"]["format"] == {"type": "json_schema", "name": "labels", "schema": SCHEMA}


def test_an_incomplete_response_is_a_truncated_row(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"row-00002": "length"})
    for api in ("chat", "responses"):
        rows = {r["id"]: r for r in _run(tmp_path, ep, api, api, expect=1)}  # 1: a row failed
        cut = rows["row-00002"]
        assert (cut["status"], cut["error_kind"], cut["answer"]) == ("error", "truncated", None)
        assert cut["reasoning"] and cut["completion_tokens"] == 200
        assert cut["finish_reason"] == ("length" if api == "chat" else "max_output_tokens")
        assert f"finish_reason: {cut['finish_reason']}" in cut["error"]
        assert sum(r["status"] == "ok" for r in rows.values()) == 8


def test_a_batch_run_through_the_responses_api(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    url_manifest(tmp_path / "m.csv", 8)
    online = _run(tmp_path, ep, "online", "responses")
    batch = _run(tmp_path, ep, "batch", "responses", run={"mode": "batch", "poll_s": 0.3})
    _same(online, batch, tuple(c for c in SAME if c != "cost"))
    (made,) = ep.stats()["batches"]
    info = json.loads(urllib.request.urlopen(f"{ep.base_url}/batches/{made['id']}", timeout=10).read())
    assert info["endpoint"] == "/v1/responses"
    assert not problems("CreateBatchRequest", {"input_file_id": info["input_file_id"], "endpoint": info["endpoint"],
                                               "completion_window": "24h"})
    lines = urllib.request.urlopen(f"{ep.base_url}/files/{info['input_file_id']}/content", timeout=10).read().splitlines()
    assert len(lines) == 8
    for line in map(json.loads, lines):
        assert line["url"] == "/v1/responses"
        assert_valid("CreateResponse", line["body"])
        assert line["body"]["store"] is False
    output = urllib.request.urlopen(f"{ep.base_url}/files/{info['output_file_id']}/content", timeout=10).read()
    for line in map(json.loads, output.splitlines()):
        assert_valid("Response", line["response"]["body"])


def test_the_request_cache_dry_run_and_report_work_as_for_chat(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    cache = {"cache": str(tmp_path / "cache")}
    first = _run(tmp_path, ep, "c1", "responses", run=cache)
    sent = ep.stats()["requests"]
    again = _run(tmp_path, ep, "c2", "responses", run=cache)
    assert ep.stats()["requests"] == sent  # every answer from the cache: nothing bought twice
    assert all(r["from_cache"] for r in again) and [r["answer"] for r in again] == [r["answer"] for r in first]
    dry = run_cli("run", str(tmp_path / "c1.toml"), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.rstrip().endswith("ready"), dry.stdout + dry.stderr
    report = run_cli("report", str(tmp_path / "c1.toml"), "--out", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "r.html").read_text()
    assert all(row["id"] in page and row["answer"][:40] in page.replace("\\u003c", "<") for row in first)


def test_the_budget_holds_as_for_chat(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(latency_ms=30)
    url_manifest(tmp_path / "m.csv", 12)
    prices = {"input_per_million": 1000.0, "output_per_million": 4000.0, "budget": 1.5}  # ~0.3 an answer
    job = write_job(tmp_path / "b.toml", {**job_dict(tmp_path / "m.csv", ep.base_url, tmp_path / "out-b", pricing=prices,
                                                     endpoint={"api": "responses"}, limits={"max_concurrency": 1}),
                                          "name": "b"})
    r = run_cli("run", str(job))
    assert r.returncode == 3 and "budget" in r.stderr, r.stderr
    rows = read_output(tmp_path / "out-b")
    assert 0 < len(rows) < 12 and sum(row["cost"] for row in rows) <= 1.5
    for row in rows:  # each row costs its own Responses usage
        assert row["cost"] == pytest.approx((row["prompt_tokens"] * 1000 + row["completion_tokens"] * 4000) / 1e6)


def test_the_api_is_a_checked_choice(tmp_path: Path) -> None:
    url_manifest(tmp_path / "m.csv", 1)
    base = job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out")
    job = load_job({**base, "endpoint": {**base["endpoint"], "api": "responses"}})
    assert job.endpoint.api is Api.RESPONSES and job.endpoint.url == "http://127.0.0.1:9/v1/responses"
    assert load_job(base).endpoint.api is Api.CHAT and load_job(base).endpoint.url.endswith("/v1/chat/completions")
    with pytest.raises(JobError, match=r'\[endpoint\] api must be "chat" or "responses", not \'completions\''):
        load_job({**base, "endpoint": {**base["endpoint"], "api": "completions"}})
    with pytest.raises(JobError, match="video_column: the Responses API takes no video"):
        load_job({**base, "endpoint": {**base["endpoint"], "api": "responses"}, "input": {**base["input"], "video_column": "v"}})
    assert load_job(base).shape_digest() != job.shape_digest()  # answers of one API are not taken for the other's


def test_responses_requests_are_not_stored_at_the_provider_unless_the_job_says(tmp_path: Path) -> None:
    """CreateResponse's `store` defaults to true (chat's to false): without `store: false` every
    row's prompt, image and answer stays at the provider. [request] store = true is the user's call."""
    url_manifest(tmp_path / "m.csv", 1)
    base = job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out", endpoint={"api": "responses"})
    assert ResponsesBody(load_job(base), None).body("p", [])["store"] is False
    kept = load_job({**base, "request": {**base["request"], "store": True}})
    assert ResponsesBody(kept, None).body("p", [])["store"] is True


# -- the answer and the stream, piece by piece -----------------------------------------------------

def _response(**changes: Any) -> dict[str, Any]:
    body = {"id": "resp_1", "object": "response", "status": "completed", "model": "o3", "output": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "First."},
                                                        {"type": "summary_text", "text": "Then."}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "A cat", "annotations": []},
                     {"type": "output_text", "text": " on a mat.", "annotations": []}]}],
        "usage": {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
                  "output_tokens": 40, "output_tokens_details": {"reasoning_tokens": 30}, "total_tokens": 160}}
    return {**body, **changes}


def test_parse_a_response() -> None:
    a = parse_response(_response(), Api.RESPONSES)
    assert (a.answer, a.reasoning, a.finish_reason, a.model) == ("A cat on a mat.", "First.\n\nThen.", "stop", "o3")
    assert (a.prompt_tokens, a.completion_tokens, a.total_tokens, a.cached_tokens, a.reasoning_tokens) == (120, 40, 160, 100, 30)
    hidden = _response(output=[{"type": "reasoning", "id": "rs", "summary": [], "encrypted_content": "gAAA"},
                               _response()["output"][1]])
    assert parse_response(hidden, Api.RESPONSES).reasoning is None  # encrypted reasoning has no readable text
    vllm = _response(output=[{"type": "reasoning", "id": "rs", "summary": [],
                              "content": [{"type": "reasoning_text", "text": "open model thinking"}]},
                             _response()["output"][1]])
    assert parse_response(vllm, Api.RESPONSES).reasoning == "open model thinking"
    cut = parse_response(_response(status="incomplete", incomplete_details={"reason": "max_output_tokens"},
                                   output=_response()["output"][:1]), Api.RESPONSES)
    assert cut.answer is None and cut.truncated and cut.finish_reason == "max_output_tokens"


def _chat(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {"object": "chat.completion", "model": "m", "choices": [{"index": 0, "finish_reason": finish, "message": message}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 12, "total_tokens": 1012}}


@pytest.mark.parametrize("body, api, said", [
    (_chat({"role": "assistant", "content": None, "refusal": "No."}), Api.CHAT, "No."),
    (_chat({"role": "assistant", "content": "", "refusal": "No."}), Api.CHAT, "No."),  # a gateway's "" beside it
    (_chat({"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}), Api.CHAT, "No."),
    (_chat({"role": "assistant", "content": None}, "content_filter"), Api.CHAT, "content filter"),
    (_response(output=[{"type": "message", "id": "m", "role": "assistant", "status": "completed",
                         "content": [{"type": "refusal", "refusal": "No."}]}]), Api.RESPONSES, "No."),
    (_response(status="incomplete", incomplete_details={"reason": "content_filter"}, output=[]), Api.RESPONSES,
     "content filter"),
])
def test_a_refusal_parses_as_a_final_answer_with_its_words(body: dict[str, Any], api: Api, said: str) -> None:
    a = parse_response(body, api)
    got = withheld(a)
    assert got is not None
    kind, error = got
    assert a.answer is None and a.refused and kind == "refusal" and said in error
    assert a.prompt_tokens in (1000, 120)  # its usage is read: it is costed
    assert usage_of(body, api).prompt_tokens == a.prompt_tokens
    answered = parse_response(_chat({"role": "assistant", "content": "A cat.", "refusal": None}))
    assert not answered.refused and withheld(answered) is None and answered.refusal is None


@pytest.mark.parametrize("code, kind", [("server_error", "server"), ("rate_limit_exceeded", "rate_limit"),
                                        ("invalid_image", "bad_request"), (None, "bad_request")])
def test_a_failed_response_is_an_error_by_its_code(code: str | None, kind: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_response(_response(status="failed", output=[], error={"code": code, "message": "no"}), Api.RESPONSES)
    assert e.value.kind == kind and e.value.code == code


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["output", "status", "usage", "type", "content", "summary", "text", "model",
                                         "incomplete_details", "reason", "error"]), inner, max_size=5), max_leaves=30))
def test_parse_a_response_raises_only_request_errors(body: Any) -> None:
    try:
        parse_response(body, Api.RESPONSES)
    except RequestError:
        pass


def _fold(events: list[bytes]) -> dict[str, Any]:
    return assemble(b"".join(events).split(b"\n"), ResponsesFold())  # line by line, as a client reads


def test_the_events_fold_into_the_response_they_came_from() -> None:
    response = _response()
    assert parse_response(_fold(to_events(response)), Api.RESPONSES) == parse_response(response, Api.RESPONSES)
    events = to_events(response, piece_chars=2)
    lean = [e for e in events if b"response.completed" not in e] + [  # a terminal response without its output
        b"event: response.completed\ndata: " + json.dumps({"type": "response.completed", "sequence_number": 99,
                                                             "response": _response(output=[])}).encode() + b"\n\n"]
    got = parse_response(_fold(lean), Api.RESPONSES)
    assert (got.answer, got.reasoning, got.total_tokens) == ("A cat on a mat.", "First.Then.", 160)
    with pytest.raises(StreamError) as e:
        _fold(events[:-1])
    assert e.value.reason == "cut"
    error = b'event: error\ndata: {"type": "error", "code": "server_error", "message": "boom", "param": null}\n\n'
    with pytest.raises(StreamError) as e:
        _fold([*events[:3], error])
    assert (e.value.reason, e.value.code) == ("error_chunk", "server_error") and "boom" in str(e.value)


def test_a_responses_stream_a_gateway_ends_with_done_but_no_terminal_event_is_cut() -> None:
    """A gateway that sends only the deltas (no `response.created`/`in_progress` snapshot) and ends
    with `data: [DONE]` but no `response.completed`: the text may stop anywhere and there is no
    usage, so the stream is cut (retried), not written as a whole answer. With the terminal event
    before its [DONE] it is whole."""
    events = [e for e in to_events(_response(), piece_chars=2) if b'"response.output_text.delta"' in e]
    done = [b"data: [DONE]\n\n"]
    with pytest.raises(StreamError) as e:
        _fold([*events[:3], *done])
    assert e.value.reason == "cut" and "[DONE]" in str(e.value)
    terminal = to_events(_response())[-1:]
    assert parse_response(_fold([*events, *terminal, *done]), Api.RESPONSES).answer == "A cat on a mat."
    chat = [b'data: {"choices": [{"index": 0, "delta": {"content": "A cat"}}]}\n\n', *done]
    assert parse_response(assemble(b"".join(chat).split(b"\n"))).answer == "A cat"  # chat's own end is [DONE]


def test_refusal_events_fold_into_a_refusal() -> None:
    refused = _response(output=[{"type": "message", "id": "m", "role": "assistant", "status": "completed",
                                 "content": [{"type": "refusal", "refusal": "I can't help with that."}]}])
    events = to_events(refused, piece_chars=4)
    assert sum(b'"response.refusal.delta"' in e for e in events) > 1
    for raw in events:  # the refusal's own events (this test's response lacks fields a whole one has)
        if b'"response.refusal.' in raw or b'"response.content_part.' in raw:
            assert_valid("ResponseStreamEvent", _events(raw)[0])
    lean = [*events[:-1], b"event: response.completed\ndata: " + json.dumps(
        {"type": "response.completed", "sequence_number": 99, "response": _response(output=[])}).encode() + b"\n\n"]
    for stream in (events, lean):  # the terminal response's own output, or the deltas' sum
        got = parse_response(_fold(stream), Api.RESPONSES)
        assert got.refused and got.refusal == "I can't help with that." and got.total_tokens == 160
