"""Structured labels: JSON answers checked against the job's schema, their fields as typed columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_dict, read_output, run_cli, url_manifest, write_job, write_rows

from pipeline.config import LabelsConfig
from pipeline.errors import JobError, RequestError
from pipeline.rows.labels import Labels, extract_json

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["cat", "dog", "other"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "details": {"type": "object"},
    },
    "required": ["label", "confidence"],
}


# -- checking answers (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        '{"label": "dog", "confidence": 0.75}',
        '```json\n{"label": "dog", "confidence": 0.75}\n```',
        '<think>\nIt barks; {not json here}.\n</think>\n\n{"label": "dog", "confidence": 0.75}',
        '<think>hmm</think>\n```\n{"label": "dog", "confidence": 0.75}\n```',
        'Here is the label: {"label": "dog", "confidence": 0.75} as asked.',
    ],
    ids=["plain", "fenced", "think-then-json", "think-then-fenced", "prose-around"],
)
def test_the_json_is_found_after_think_blocks_and_fences(answer: str) -> None:
    assert extract_json(answer) == {"label": "dog", "confidence": 0.75}


def test_valid_answers_give_typed_values_and_invalid_ones_say_why() -> None:
    labels = Labels(LabelsConfig(schema=SCHEMA))
    values = labels.check('{"label": "cat", "confidence": 1, "count": 2.0, "tags": ["a"], "details": {"x": 1}}')
    assert values == {"label": "cat", "confidence": 1.0, "count": 2, "tags": ["a"], "details": '{"x": 1}'}
    assert isinstance(values["confidence"], float) and isinstance(values["count"], int)
    for bad, words in [
        ('{"label": "bird", "confidence": 0.5}', "'bird' is not one of"),
        ('{"label": "cat"}', "'confidence' is a required property"),
        ('{"label": "cat", "confidence": 3}', "3 is greater than the maximum"),
        ("a cat, surely", "not JSON"),
    ]:
        with pytest.raises(RequestError) as exc:
            labels.check(bad)
        assert exc.value.kind == "invalid_output"
        assert words in exc.value.message
        assert exc.value.result == bad


def test_a_schema_that_cannot_make_columns_is_refused_with_the_reason() -> None:
    with pytest.raises(JobError, match="not a valid JSON Schema"):
        LabelsConfig(schema={"type": "object", "properties": {"a": {"type": "wat"}}})
    with pytest.raises(JobError, match="top-level properties"):
        LabelsConfig(schema={"type": "string"})
    with pytest.raises(JobError, match="'status' is also an output column"):
        LabelsConfig(schema={"type": "object", "properties": {"status": {"type": "string"}}})


# -- labeling runs over HTTP -------------------------------------------------------------


def _job(tmp_path: Path, base_url: str, manifest: Path, labels: dict[str, Any], **sections: Any) -> tuple[Path, Path]:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", job_dict(manifest, base_url, out, labels=labels, **sections))
    return job, out


def test_a_labeling_run_makes_typed_label_columns_and_retries_invalid_answers(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(record=True, row_faults={"row-00001": "invalid_json:1", "row-00002": "invalid_json"})
    manifest = url_manifest(tmp_path / "m.csv", 4)
    job, out = _job(tmp_path, ep.base_url, manifest, {"schema": SCHEMA, "max_invalid_retries": 2})
    result = run_cli("run", str(job))
    assert result.returncode == 1, result.stderr  # row 2 never validates
    schema = pq.read_schema(next(out.glob("*.parquet")))
    assert schema.field("label").type == pa.string()
    assert schema.field("confidence").type == pa.float64()
    assert schema.field("count").type == pa.int64()
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("details").type == pa.string()
    rows = {r["id"]: r for r in read_output(out)}
    first = rows["row-00000"]
    assert (first["status"], first["label"], first["confidence"], first["count"], first["attempts"]) == ("ok", "cat", 0.5, 1, 1)
    assert first["reasoning"]  # the built-in endpoint thinks first: the think block is not the label
    retried = rows["row-00001"]
    assert (retried["status"], retried["label"], retried["attempts"]) == ("ok", "cat", 2)
    never = rows["row-00002"]
    assert (never["status"], never["error_kind"], never["attempts"]) == ("error", "invalid_output", 3)
    assert "not one of" in never["error"]
    assert json.loads(never["answer"])["label"] == "not-one-of-the-labels"  # the raw answer is kept
    assert never["label"] is None and never["total_tokens"]
    sent = [json.loads(r["body"]) for r in ep.requests()]
    assert len(sent) == 1 + 2 + 3 + 1
    assert all(b["response_format"] == {"type": "json_schema", "json_schema": {"name": "labels", "schema": SCHEMA}} for b in sent)


def test_fenced_json_answers_and_a_schema_file(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(fence_json=True, reasoning_field="reasoning_content")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA), encoding="utf-8")
    manifest = url_manifest(tmp_path / "m.csv", 3)
    job, out = _job(tmp_path, ep.base_url, manifest, {"schema": "schema.json"}, request={"stream": True})
    result = run_cli("run", str(job))
    assert result.returncode == 0, result.stderr
    rows = read_output(out)
    assert all(r["answer"].startswith("```json") and r["label"] == "cat" and r["confidence"] == 0.5 for r in rows)


def test_without_response_format_a_prose_answer_is_an_invalid_output_row(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(record=True)
    manifest = url_manifest(tmp_path / "m.csv", 2)
    job, out = _job(tmp_path, ep.base_url, manifest, {"schema": SCHEMA, "send_response_format": False, "max_invalid_retries": 0})
    result = run_cli("run", str(job))
    assert result.returncode == 1
    rows = read_output(out)
    assert [(r["error_kind"], r["attempts"]) for r in rows] == [("invalid_output", 1)] * 2
    assert all(r["answer"].startswith("Answer to") and "not JSON" in r["error"] for r in rows)
    assert all("response_format" not in json.loads(r["body"]) for r in ep.requests())


def test_a_label_named_like_an_input_column_leaves_the_input_as_input_name(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = tmp_path / "m.csv"
    write_rows(manifest, [{"id": "a", "image": "https://x.example/a.png", "prompt": "p a", "label": "given"}], "csv")
    job, out = _job(tmp_path, ep.base_url, manifest, {"schema": SCHEMA})
    assert run_cli("run", str(job)).returncode == 0
    [row] = read_output(out)
    assert (row["input_label"], row["label"]) == ("given", "cat")


def test_changing_the_schema_of_a_started_job_is_refused(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = url_manifest(tmp_path / "m.csv", 2)
    job, _ = _job(tmp_path, ep.base_url, manifest, {"schema": SCHEMA})
    assert run_cli("run", str(job)).returncode == 0
    other = {**SCHEMA, "properties": {**SCHEMA["properties"], "label": {"type": "string", "enum": ["cat", "dog"]}}}
    job, _ = _job(tmp_path, ep.base_url, manifest, {"schema": other})
    result = run_cli("run", str(job))
    assert result.returncode == 2 and "labels" in result.stderr


def test_bad_labels_sections_are_one_line_errors(tmp_path: Path) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"schema": "missing.json"}, "[labels] schema: cannot read"),
        ({"schema": SCHEMA, "max_retries": 1}, "[labels] max_retries: unknown key"),
        ({"schema": {"type": "object", "properties": {"x": {"type": "wat"}}}}, "not a valid JSON Schema"),
    ]
    for labels, words in cases:
        job, _ = _job(tmp_path, "http://127.0.0.1:9/v1", manifest, labels)
        result = run_cli("run", str(job))
        assert result.returncode == 2
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
