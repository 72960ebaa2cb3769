"""The core contract (issue 2): request shape, answer parsing, manifests, templates, output rows."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest
from conftest import (
    DATA,
    SEED,
    job_dict,
    read_output,
    run_cli,
    url_manifest,
    write_job,
    write_rows,
)

from pipeline.config import load_job
from pipeline.engine import RunOptions, run
from pipeline.errors import RequestError
from pipeline.rows.answer import parse_response, split_think


def seed_example(which: int) -> dict:
    """The seed page's JSON examples, labelled 示例: 0 is the request, 1 the response."""
    text = SEED.read_text(encoding="utf-8")
    at = -1
    for _ in range(which + 1):
        at = text.index("示例\n{", at + 1)
    start = text.index("{", at)
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            block = text[start : i + 1]
            return json.loads(re.sub(r"(?<=,) *//[^\n]*", "", block))
    raise AssertionError("no example")


def test_seed_response_parses_to_answer_reasoning_and_tokens() -> None:
    body = seed_example(1)
    a = parse_response(body)
    assert a.answer == "百度热搜以醒目红底白字图标设计,通过动态更新的热搜榜单直观呈现网络热议话题。"
    assert a.reasoning is not None and a.reasoning.startswith("嗯,用户让我")
    assert not a.reasoning.endswith("</think>")
    assert (a.prompt_tokens, a.completion_tokens, a.total_tokens) == (121, 232, 353)
    assert a.model == "qvq-max-2025-03-25"  # the model served, not the one asked for


@pytest.mark.parametrize(
    "message, answer, reasoning",
    [
        ({"content": "<think>\nlook\n</think>\n\nA cat."}, "A cat.", "look"),
        ({"content": "look closely</think>A cat."}, "A cat.", "look closely"),  # template opened <think>
        ({"content": "A cat.", "reasoning_content": "deepseek style"}, "A cat.", "deepseek style"),
        ({"content": "A cat.", "reasoning": "vllm 2026 style"}, "A cat.", "vllm 2026 style"),
        ({"content": "A cat.", "reasoning_content": ""}, "A cat.", None),
        ({"content": "<think>cut off mid-thought"}, None, "cut off mid-thought"),
    ],
)
def test_reasoning_variants(message: dict, answer: str | None, reasoning: str | None) -> None:
    body = {"choices": [{"message": message, "finish_reason": "stop"}], "model": "m", "usage": {}}
    a = parse_response(body)
    assert (a.answer, a.reasoning) == (answer, reasoning)


def test_response_without_choices_is_invalid_response() -> None:
    with pytest.raises(RequestError) as e:
        parse_response({"object": "chat.completion", "choices": []})
    assert e.value.kind == "invalid_response"


def test_split_think_keeps_answer_without_block() -> None:
    assert split_think("  plain answer ") == ("plain answer", None)


def test_exact_request_body_for_a_seed_shaped_row(tmp_path: Path, endpoint) -> None:
    seed = seed_example(0)
    url = seed["messages"][1]["content"][1]["image_url"]["url"]
    manifest = tmp_path / "m.csv"
    write_rows(manifest, [{"id": "a", "image": url}], "csv")
    job = write_job(
        tmp_path / "job.toml",
        job_dict(
            manifest, endpoint.base_url, tmp_path / "out",
            input={"prompt_column": None},
            endpoint={"model": seed["model"], "api_key_env": "PIPELINE_TEST_KEY"},
            request={"system_prompt": "You are a helpful assistant.", "prompt": "解读图片", "max_tokens": None},
        ),
    )
    r = run_cli("run", str(job), env={"PIPELINE_TEST_KEY": "sk-test-123"})
    assert r.returncode == 0, r.stderr
    (req,) = endpoint.requests()
    assert json.loads(req["body"]) == seed
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    assert req["headers"]["Content-Type"] == "application/json"


def test_local_image_sent_as_data_uri_with_real_mime(tmp_path: Path, endpoint) -> None:
    shutil.copytree(DATA / "images", tmp_path / "images")
    (tmp_path / "images" / "cat.png").write_bytes((DATA / "images" / "chelsea.jpg").read_bytes())  # lying suffix
    manifest = tmp_path / "m.csv"
    write_rows(manifest, [{"id": "1", "image": "images/cat.png", "prompt": "what?"}], "csv")
    job = write_job(tmp_path / "job.toml", job_dict(manifest, endpoint.base_url, tmp_path / "out"))
    assert run(load_job(job)) == 0
    (req,) = endpoint.requests()
    url = json.loads(req["body"])["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (DATA / "images" / "chelsea.jpg").read_bytes()
    (row,) = read_output(tmp_path / "out")
    assert "JPEG image, 451x300 pixels" in row["answer"]  # the endpoint really decoded it


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_give_the_same_rows(tmp_path: Path, endpoint, fmt: str) -> None:
    manifest = url_manifest(tmp_path / f"m.{fmt}", 25, fmt=fmt)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, endpoint.base_url, tmp_path / "out", run={"shard_rows": 10}))
    assert run(load_job(job)) == 0
    rows = read_output(tmp_path / "out")
    assert [r["id"] for r in rows] == [f"row-{i:05d}" for i in range(25)]
    for r in rows:
        assert r["status"] == "ok" and r["prompt"] in r["answer"]
        assert r["image"].endswith(f"/{int(r['id'][4:])}.png")
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 3


def test_prompt_template_fills_columns_and_leaves_json_braces(tmp_path: Path, endpoint) -> None:
    manifest = tmp_path / "m.jsonl"
    write_rows(manifest, [{"id": "x1", "image": "https://e.x/1.png", "style": "haiku", "n": 3}], "jsonl")
    job = write_job(
        tmp_path / "job.toml",
        job_dict(manifest, endpoint.base_url, tmp_path / "out", input={"prompt_column": None},
                 request={"prompt": 'Write a {style} in {n} lines about {id}; answer as {"text": ...}'}),
    )
    assert run(load_job(job)) == 0
    body = json.loads(endpoint.requests()[0]["body"])
    assert body["messages"][0]["content"][0]["text"] == 'Write a haiku in 3 lines about x1; answer as {"text": ...}'


def test_template_naming_a_missing_column_is_a_job_error(tmp_path: Path, endpoint) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 2)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, endpoint.base_url, tmp_path / "out",
                                                   input={"prompt_column": None}, request={"prompt": "about {colour}"}))
    r = run_cli("run", str(job))
    assert r.returncode == 2
    assert "{colour}" in r.stderr and "not a manifest column" in r.stderr
    assert endpoint.stats()["requests"] == 0


def test_many_rows_each_answer_matched_to_its_own_row(tmp_path: Path, endpoint_factory) -> None:
    ep = endpoint_factory(latency_ms=5, latency_jitter_ms=40, seed=7)  # answers come back out of order
    manifest = url_manifest(tmp_path / "m.csv", 300)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out",
                                                   limits={"max_concurrency": 32}, run={"shard_rows": 64}))
    assert run(load_job(job)) == 0
    rows = read_output(tmp_path / "out")
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300
    for r in rows:
        assert r["answer"].startswith(f"Answer to 'Describe picture {r['id']}'")
        assert r["reasoning"] and r["prompt_tokens"] > 0 and r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
        assert r["model"] == "test-vl" and r["finish_reason"] == "stop" and r["attempts"] == 1
    assert ep.stats()["max_in_flight"] > 1
    # readable by the three readers users use
    assert len(pd.read_parquet(tmp_path / "out")) == 300
    assert ds.dataset(tmp_path / "out").count_rows() == 300
    query = duckdb.sql(f"select count(distinct id) from read_parquet('{tmp_path / 'out'}/*.parquet')")
    assert query is not None
    n = query.fetchall()[0][0]
    assert n == 300


def test_missing_local_image_is_an_error_row_and_the_run_goes_on(tmp_path: Path, endpoint) -> None:
    shutil.copytree(DATA / "images", tmp_path / "images")
    manifest = tmp_path / "m.csv"
    write_rows(manifest, [
        {"id": "good", "image": "images/coffee.jpg", "prompt": "p1"},
        {"id": "gone", "image": "images/nothere.jpg", "prompt": "p2"},
        {"id": "text", "image": "notes.png", "prompt": "p3"},
        {"id": "url", "image": "https://e.x/a.png", "prompt": "p4"},
    ], "csv")
    (tmp_path / "notes.png").write_text("not an image")
    job = write_job(tmp_path / "job.toml", job_dict(manifest, endpoint.base_url, tmp_path / "out"))
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr
    rows = {row["id"]: row for row in read_output(tmp_path / "out")}
    assert rows["good"]["status"] == rows["url"]["status"] == "ok"
    assert rows["gone"]["status"] == "error" and rows["gone"]["error_kind"] == "input"
    assert "not found" in rows["gone"]["error"] and "images/nothere.jpg" in rows["gone"]["error"]
    assert rows["text"]["error_kind"] == "input" and "not an image" in rows["text"]["error"]
    assert endpoint.stats()["requests"] == 2
    assert "--retry-failed" in r.stderr


BAD_JOBS = [
    ({"limits": {"max_concurency": 3}}, "[limits] max_concurency: unknown key"),
    ({"endpoint": {"model": None}}, "[endpoint] model is required"),
    ({"limits": {"requests_per_minute": "fast"}}, "[limits] requests_per_minute must be a number"),
    ({"limits": {"max_concurrency": 0}}, "[limits] max_concurrency must be more than zero"),
    ({"endpoint": {"api_key_env": "PIPELINE_UNSET_KEY_VAR"}}, "PIPELINE_UNSET_KEY_VAR is not set"),
    ({"input": {"image_column": "picture"}}, "[input] image_column: column 'picture' is not in the manifest"),
    ({"colour": "blue"}, "colour: unknown key"),
]


@pytest.mark.parametrize("override, message", BAD_JOBS)
def test_bad_job_file_is_one_line_naming_the_key_exit_2(tmp_path: Path, override: dict, message: str) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 2)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, "http://127.0.0.1:9/v1", tmp_path / "out", **override))
    r = run_cli("run", str(job))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "job.toml" in lines[0] or "[input]" in lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_not_toml_and_missing_file_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    r = run_cli("run", str(bad))
    assert r.returncode == 2 and "bad.toml: not valid TOML" in r.stderr
    r = run_cli("run", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "job file not found" in r.stderr


def test_api_key_appears_in_no_file_the_run_writes(tmp_path: Path, endpoint_factory) -> None:
    secret = "sk-live-SECRET-5b1f9e"
    good = endpoint_factory(api_key=secret)
    manifest = url_manifest(tmp_path / "m.csv", 20)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", job_dict(manifest, good.base_url, out, endpoint={"api_key_env": "PIPELINE_TEST_KEY"}))
    r1 = run_cli("run", str(job), env={"PIPELINE_TEST_KEY": secret})
    assert r1.returncode == 0, r1.stderr
    # A provider that echoes a wrong key back in its 401 message: the message is kept, the key is not.
    wrong = "sk-live-WRONG-77aa01"
    bad = endpoint_factory(api_key="something-else")
    job2 = write_job(tmp_path / "job2.toml", {**job_dict(manifest, bad.base_url, tmp_path / "out2",
                                                        endpoint={"api_key_env": "PIPELINE_TEST_KEY"}), "name": "t2"})
    r2 = run_cli("run", str(job2), env={"PIPELINE_TEST_KEY": wrong})
    assert r2.returncode == 3 and "refused the API key" in r2.stderr
    for text in (r1.stdout, r1.stderr, r2.stdout, r2.stderr):
        assert secret not in text and wrong not in text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("job.toml", "job2.toml")]
    assert any(p.suffix == ".parquet" for p in written) and any(p.name == "last_run.json" for p in written)
    for p in written:
        data = p.read_bytes()
        assert secret.encode() not in data and wrong.encode() not in data, p
