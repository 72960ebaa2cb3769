"""The built-in endpoint's Batch API (/v1/files, /v1/batches), against a real `pipeline serve`
process, with urllib only: OpenAI's shapes, its pace through the statuses, answers equal to the
online ones, validation, line faults, expiry, cancels, shuffled output, the key and /stats."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from conftest import Endpoint

FAST = {"batch_validating_s": 0.05, "batch_in_progress_s": 0.1, "batch_finalizing_s": 0.05, "batch_cancelling_s": 0.05}
BATCH_KEYS = {"id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
              "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
              "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata"}


def call(ep: Endpoint, method: str, path: str, body: Any = None, *, key: str | None = None,
         raw: bytes | None = None, content_type: str = "application/json") -> tuple[int, Any]:
    """(status, JSON or bytes) of one request to `ep`; `path` is under /v1."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": content_type} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(ep.base_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, payload, kind = r.status, r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, payload, kind = e.code, e.read(), e.headers.get_content_type()
    return status, json.loads(payload) if kind == "application/json" else payload


def upload(ep: Endpoint, content: bytes, *, filename: str = "in.jsonl", purpose: str = "batch",
           key: str | None = None) -> tuple[int, Any]:
    boundary = uuid.uuid4().hex
    raw = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
           f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return call(ep, "POST", "/files", raw=raw, content_type=f"multipart/form-data; boundary={boundary}", key=key)


def line(custom_id: str, prompt: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "test-vl", "max_tokens": 64, "messages": [{"role": "user", "content": prompt}], **body}}


def jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def start(ep: Endpoint, lines: list[Any], *, key: str | None = None, **extra: Any) -> dict[str, Any]:
    status, file = upload(ep, jsonl(lines), key=key)
    assert status == 200, file
    status, batch = call(ep, "POST", "/batches", {"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h", **extra}, key=key)
    assert status == 200, batch
    return batch


def wait(ep: Endpoint, batch_id: str, *, key: str | None = None, until: tuple[str, ...] = (
        "completed", "failed", "expired", "cancelled")) -> tuple[dict[str, Any], list[str]]:
    """Poll until the batch is in one of `until`: (the batch, each status seen in order)."""
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while True:
        status, batch = call(ep, "GET", f"/batches/{batch_id}", key=key)
        assert status == 200, batch
        assert set(batch) == BATCH_KEYS and batch["object"] == "batch"
        if not seen or seen[-1] != batch["status"]:
            seen.append(batch["status"])
        if batch["status"] in until:
            return batch, seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)


def lines_of(ep: Endpoint, file_id: str | None, key: str | None = None) -> list[dict[str, Any]]:
    assert file_id is not None
    status, content = call(ep, "GET", f"/files/{file_id}/content", key=key)
    assert status == 200 and isinstance(content, bytes), content
    return [json.loads(x) for x in content.decode().splitlines()]


def png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def without_volatile(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_a_batch_goes_through_its_statuses_and_answers_as_the_online_endpoint_does(endpoint_factory: Any) -> None:
    ep = endpoint_factory(vary_labels=True, batch_validating_s=0.3, batch_in_progress_s=0.4, batch_finalizing_s=0.3)
    schema = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["a", "b", "c"]}}, "required": ["kind"]}
    image = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": png_data_url()}}]}
    lines = [line("r-1", "Describe picture one"),
             line("r-2", "Label picture two", response_format={"type": "json_schema", "json_schema": {"schema": schema}}),
             {**line("r-3", ""), "body": {"model": "test-vl", "messages": [image]}}]
    status, file = upload(ep, jsonl(lines), filename="rows.jsonl")
    assert status == 200 and file["object"] == "file" and file["purpose"] == "batch"
    assert file["id"].startswith("file-") and file["bytes"] == len(jsonl(lines)) and file["filename"] == "rows.jsonl"
    assert call(ep, "GET", f"/files/{file['id']}")[1] == file
    assert call(ep, "GET", f"/files/{file['id']}/content")[1] == jsonl(lines)
    status, batch = call(ep, "POST", "/batches", {"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h", "metadata": {"job": "t"}})
    assert status == 200 and set(batch) == BATCH_KEYS and batch["id"].startswith("batch_")
    assert batch["status"] == "validating" and batch["metadata"] == {"job": "t"} and batch["input_file_id"] == file["id"]
    assert batch["expires_at"] == batch["created_at"] + 24 * 3600
    done, seen = wait(ep, batch["id"])
    assert seen == ["validating", "in_progress", "finalizing", "completed"][-len(seen):], seen  # polled every 20 ms
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert done["error_file_id"] is None and done["errors"] is None
    assert done["created_at"] <= done["in_progress_at"] <= done["finalizing_at"] <= done["completed_at"]
    assert done["failed_at"] is done["expired_at"] is done["cancelling_at"] is done["cancelled_at"] is None
    status, out_file = call(ep, "GET", f"/files/{done['output_file_id']}")
    assert out_file["purpose"] == "batch_output" and out_file["filename"] == f"{batch['id']}_output.jsonl"
    output = lines_of(ep, done["output_file_id"])
    assert [o["custom_id"] for o in output] == ["r-1", "r-2", "r-3"]
    for out, sent in zip(output, lines):
        assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
        assert out["id"].startswith("batch_req_") and out["response"]["request_id"].startswith("req_")
        assert out["response"]["status_code"] == 200
        status, online = call(ep, "POST", "/chat/completions", sent["body"])
        assert status == 200 and without_volatile(out["response"]["body"]) == without_volatile(online)
    assert "8x6" in output[2]["response"]["body"]["choices"][0]["message"]["content"]  # Pillow saw the image
    stats = ep.stats()
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1  # output files are not uploads
    assert stats["batches"] == [{"id": batch["id"], "status": "completed", "custom_ids": ["r-1", "r-2", "r-3"]}]


def test_a_file_that_breaks_the_rules_fails_its_batch_with_each_line_named(endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_max_lines=8, batch_max_bytes=4000, **FAST)
    bad = [line("a", "one"), "not json", {"method": "POST", "url": "/v1/chat/completions", "body": {}},
           {**line("b", "two"), "method": "GET"}, {**line("c", "three"), "url": "/v1/embeddings"}, line("a", "again"),
           {**line("d", "four"), "body": {"model": "test-vl"}}, line("e", "five", model="other")]
    failed, _ = wait(ep, start(ep, bad)["id"])
    assert failed["status"] == "failed" and failed["failed_at"] is not None and failed["in_progress_at"] is None
    assert failed["errors"]["object"] == "list"
    assert [(e["code"], e["line"], e["param"]) for e in failed["errors"]["data"]] == [
        ("invalid_json_line", 2, None), ("missing_required_parameter", 3, "custom_id"), ("invalid_method", 4, "method"),
        ("url_mismatch", 5, "url"), ("duplicate_custom_id", 6, "custom_id"),
        ("missing_required_parameter", 7, "body.messages"), ("model_mismatch", 8, "body.model")]
    assert failed["output_file_id"] is failed["error_file_id"] is None
    too_many, _ = wait(ep, start(ep, [line(f"n-{i}", "x") for i in range(9)])["id"])
    too_big, _ = wait(ep, start(ep, [line("big", "x" * 5000)])["id"])
    empty, _ = wait(ep, start(ep, [])["id"])
    assert [b["errors"]["data"][0]["code"] for b in (too_many, too_big, empty)] == [
        "too_many_tasks", "file_too_large", "empty_file"]
    # refused at once, in OpenAI's error shape
    status, error = call(ep, "POST", "/batches", {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"})
    assert status == 404 and error["error"]["message"] == "No such File object: file-nope"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    file_id = upload(ep, jsonl([line("a", "x")]))[1]["id"]
    for change in ({"completion_window": "1h"}, {"endpoint": "/v1/embeddings"}, {"input_file_id": None}):
        status, error = call(ep, "POST", "/batches", {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                      "completion_window": "24h", **change})
        assert status == 400 and "error" in error, change
    assert upload(ep, b"{}", filename="in.csv")[0] == 400
    assert upload(ep, b"{}", purpose="fine-tune")[0] == 400
    assert call(ep, "GET", "/batches/batch_nope")[0] == 404


def test_line_faults_go_to_the_error_file_and_the_counts(endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_line_faults={"cat": 500, "dog": 400}, **FAST)
    done, _ = wait(ep, start(ep, [line("1", "a cat"), line("2", "a bird"), line("3", "a dog"), line("4", "a fish")])["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    assert [o["custom_id"] for o in lines_of(ep, done["output_file_id"])] == ["2", "4"]
    errors = {e["custom_id"]: e for e in lines_of(ep, done["error_file_id"])}
    assert set(errors) == {"1", "3"}
    assert errors["1"]["response"]["status_code"] == 500 and errors["3"]["response"]["status_code"] == 400
    for e in errors.values():
        assert e["error"] is None and e["id"].startswith("batch_req_")
        assert set(e["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    assert errors["1"]["response"]["body"]["error"]["type"] == "server_error"


def test_an_expired_batch_has_part_of_its_lines_and_the_rest_as_batch_expired(endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_outcome="expired", batch_expire_fraction=0.5, **FAST)
    done, seen = wait(ep, start(ep, [line(f"r{i}", f"row {i}") for i in range(6)])["id"])
    assert "finalizing" not in seen and done["expired_at"] is not None and done["completed_at"] is None
    assert [o["custom_id"] for o in lines_of(ep, done["output_file_id"])] == ["r0", "r1", "r2"]
    expired = lines_of(ep, done["error_file_id"])
    assert [e["custom_id"] for e in expired] == ["r3", "r4", "r5"]
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" and e["error"]["message"] for e in expired)
    assert done["request_counts"] == {"total": 6, "completed": 3, "failed": 3}


def test_batch_outcome_failed_fails_every_batch_at_validation(endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_outcome="failed", **FAST)
    done, seen = wait(ep, start(ep, [line("r", "row")])["id"])
    assert seen[-1] == "failed" and "in_progress" not in seen
    assert [e["code"] for e in done["errors"]["data"]] == ["token_limit_exceeded"]


def test_a_cancelled_batch_keeps_the_lines_done_so_far(endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_validating_s=0.05, batch_in_progress_s=100.0, batch_cancelling_s=0.2)
    batch = start(ep, [line(f"r{i:02d}", f"row {i}") for i in range(20)])
    ep.advance_batches(0.05 + 31)  # 31 s into its 100 s of work, on the endpoint's batch clock
    status, cancelling = call(ep, "POST", f"/batches/{batch['id']}/cancel")
    assert status == 200 and cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    done, seen = wait(ep, batch["id"])
    assert seen[-1] == "cancelled" and done["cancelled_at"] is not None and done["completed_at"] is None
    assert done["finalizing_at"] is None  # cancelled while in progress
    output = lines_of(ep, done["output_file_id"])
    assert len(output) == 6, len(output)  # 20 lines evenly over 100 s: 6 done by 31 s
    assert [o["custom_id"] for o in output] == [f"r{i:02d}" for i in range(len(output))]
    assert done["request_counts"] == {"total": 20, "completed": len(output), "failed": 0}
    assert done["error_file_id"] is None  # the lines never done are in neither file
    status, error = call(ep, "POST", f"/batches/{batch['id']}/cancel")
    assert status == 409 and "cancelled" in error["error"]["message"]


def test_shuffled_output_holds_every_line_in_another_order(endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_shuffle_output=True, **FAST)
    ids = [f"r{i:02d}" for i in range(30)]
    done, _ = wait(ep, start(ep, [line(i, f"row {i}") for i in ids])["id"])
    output = lines_of(ep, done["output_file_id"])
    got = [o["custom_id"] for o in output]
    assert got != ids and sorted(got) == ids
    assert all(f"row {o['custom_id']}" in o["response"]["body"]["choices"][0]["message"]["content"] for o in output)


def test_the_batch_routes_need_the_key_and_stats_count_batches(endpoint_factory: Any) -> None:
    ep = endpoint_factory(api_key="sk-batch", **FAST)
    for method, path in (("GET", "/files"), ("GET", "/files/file-x"), ("GET", "/files/file-x/content"),
                         ("DELETE", "/files/file-x"), ("POST", "/batches"), ("GET", "/batches"),
                         ("GET", "/batches/batch_x"), ("POST", "/batches/batch_x/cancel")):
        status, error = call(ep, method, path, {} if method == "POST" else None, key="sk-wrong")
        assert status == 401 and error["error"]["code"] == "invalid_api_key", path
    assert upload(ep, jsonl([line("a", "x")]))[0] == 401
    first = start(ep, [line("a", "x"), line("b", "y")], key="sk-batch")
    second = start(ep, [line("c", "z")], key="sk-batch")
    wait(ep, first["id"], key="sk-batch")
    status, listed = call(ep, "GET", "/batches", key="sk-batch")
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [b["id"] for b in listed["data"]] == [second["id"], first["id"]]
    status, page = call(ep, "GET", "/batches?limit=1", key="sk-batch")
    assert [b["id"] for b in page["data"]] == [second["id"]] and page["has_more"] is True
    stats = ep.stats()
    assert stats["files_uploaded"] == 2 and stats["batches_created"] == 2
    assert {b["id"]: b["custom_ids"] for b in stats["batches"]} == {first["id"]: ["a", "b"], second["id"]: ["c"]}
    status, deleted = call(ep, "DELETE", f"/files/{first['input_file_id']}", key="sk-batch")
    assert deleted == {"id": first["input_file_id"], "object": "file", "deleted": True}
    assert call(ep, "GET", f"/files/{first['input_file_id']}", key="sk-batch")[0] == 404
    ep.reset()
    stats = ep.stats()
    assert stats["files_uploaded"] == stats["batches_created"] == 0 and stats["batches"] == []
