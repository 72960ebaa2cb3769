"""Usage as the provider reports it: `cached_tokens`, `reasoning_tokens`, `image_tokens` and
`audio_tokens` from plain, streamed and Batch API answers into real Parquet columns, null when the
provider did not say; `[pricing] cached_input_per_million` in each row's cost; the totals in
`pipeline status` and the run's summary, also from a checkpoint written before the details existed.

The built-in endpoint reports the details deterministically (see pipeline/tools/serve/__init__.py):
85 image tokens per image, `cached_prompt_tokens` cached, the reasoning text's length / 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import job_dict, read_output, run_cli, url_manifest, write_job

import pipeline
from pipeline.config import load_job, parse_job
from pipeline.errors import RequestError
from pipeline.records import DETAIL_TOKEN_COLUMNS, CommitRecord, result_schema
from pipeline.rows.answer import parse_response
from pipeline.rows.pricing import row_cost, worst_case_cost
from pipeline.tools.status import job_status, render

CACHED = 10  # the endpoint's cached_prompt_tokens
PRICES = {"input_per_million": 1000.0, "output_per_million": 4000.0, "cached_input_per_million": 250.0}


def _body(usage: Any) -> dict[str, Any]:
    return {"choices": [{"message": {"content": "a cat"}, "finish_reason": "stop"}], "usage": usage}


def _details(answer: Any) -> tuple[int | None, ...]:
    return answer.cached_tokens, answer.reasoning_tokens, answer.image_tokens, answer.audio_tokens


@pytest.mark.parametrize(("usage", "expected"), [
    ({"prompt_tokens_details": {"cached_tokens": 3, "image_tokens": 85, "audio_tokens": 0},
      "completion_tokens_details": {"reasoning_tokens": 7}}, (3, 7, 85, 0)),
    ({}, (None, None, None, None)),  # the provider did not say
    ({"prompt_tokens_details": None, "completion_tokens_details": None}, (None, None, None, None)),  # the seed's shape
    ({"prompt_tokens_details": {"cached_tokens": "3"}, "completion_tokens_details": {"reasoning_tokens": 7.0}},
     (None, None, None, None)),  # a string, a float: not counts
    ({"prompt_tokens_details": {"cached_tokens": True, "image_tokens": False}}, (None, None, None, None)),  # bools
    ({"prompt_tokens_details": {"cached_tokens": -1}, "completion_tokens_details": {"reasoning_tokens": -5}},
     (None, None, None, None)),  # a negative count is not one
    ({"prompt_tokens_details": [1, 2], "completion_tokens_details": "many"}, (None, None, None, None)),  # not objects
    ({"prompt_tokens_details": {"cached_tokens": {"n": 1}, "image_tokens": [85]}}, (None, None, None, None)),
    ({"prompt_tokens_details": {"cached_tokens": 2**40}}, (2**40, None, None, None)),  # big, still a count
    ({"completion_tokens_details": {"reasoning_tokens": 0}}, (None, 0, None, None)),  # 0 is said, not omitted
])
def test_parse_response_keeps_a_detail_only_when_it_is_a_count(usage: Any, expected: tuple[int | None, ...]) -> None:
    answer = parse_response(_body(usage))
    assert answer.answer == "a cat" and _details(answer) == expected


@pytest.mark.parametrize("usage", [None, "usage", 3, [], {"prompt_tokens_details": {"cached_tokens": None}}])
def test_an_odd_usage_value_still_gives_an_answer(usage: Any) -> None:
    assert _details(parse_response(_body(usage))) == (None, None, None, None)


@pytest.mark.parametrize("body", [None, [], "x", {"choices": "no"}])
def test_parse_response_stays_total(body: Any) -> None:
    with pytest.raises(RequestError) as err:
        parse_response(body)
    assert err.value.kind == "invalid_response"


def test_the_details_come_after_the_older_result_columns_and_are_nullable_int64() -> None:
    schema = result_schema()
    names = schema.names
    start = names.index("finished_at") + 1  # after every column an older part file has
    assert names[start:start + 4] == list(DETAIL_TOKEN_COLUMNS)
    assert all(str(schema.field(name).type) == "int64" and schema.field(name).nullable for name in DETAIL_TOKEN_COLUMNS)


def _job_from(tmp_path: Path, pricing: dict[str, Any]) -> Any:
    manifest = tmp_path / "m.csv"
    if not manifest.exists():
        url_manifest(manifest, 1)
    data = job_dict(manifest, "http://127.0.0.1:1/v1", tmp_path / "out", pricing=pricing)
    return parse_job(data, tmp_path / "job.toml")


def test_row_cost_bills_cached_tokens_at_their_price_default_and_per_model(tmp_path: Path) -> None:
    models = {"cheap-cache": {"input_per_million": 2.0, "output_per_million": 8.0, "cached_input_per_million": 0.5},
              "no-cache-price": {"input_per_million": 3.0, "output_per_million": 9.0}}
    job = _job_from(tmp_path, {**PRICES, "models": models})
    # 100 prompt tokens of which 40 cached, 20 completion: by hand.
    assert row_cost(job, None, 100, 20, 120, 40) == pytest.approx((60 * 1000 + 40 * 250 + 20 * 4000) / 1e6)
    assert row_cost(job, "cheap-cache", 100, 20, 120, 40) == pytest.approx((60 * 2 + 40 * 0.5 + 20 * 8) / 1e6)
    # A model without its own cached price: its input price (the default cached price is not its own).
    assert row_cost(job, "no-cache-price", 100, 20, 120, 40) == pytest.approx((100 * 3 + 20 * 9) / 1e6)
    # Not said: as before, all at the input price; more cached than the prompt: capped at the prompt.
    assert row_cost(job, None, 100, 20, 120, None) == pytest.approx((100 * 1000 + 20 * 4000) / 1e6)
    assert row_cost(job, None, 100, 20, 120, 500) == pytest.approx((100 * 250 + 20 * 4000) / 1e6)
    plain = _job_from(tmp_path, {"input_per_million": 1000.0, "output_per_million": 4000.0})
    assert row_cost(plain, None, 100, 20, 120, 40) == pytest.approx((100 * 1000 + 20 * 4000) / 1e6)


def test_the_budget_hold_never_falls_below_a_real_cost(tmp_path: Path) -> None:
    data = {**PRICES, "budget": 10.0}
    cheap = _job_from(tmp_path, data)
    plain = _job_from(tmp_path, {k: v for k, v in data.items() if k != "cached_input_per_million"})
    assert worst_case_cost(cheap, "p" * 40, 1) == worst_case_cost(plain, "p" * 40, 1)  # unchanged by a discount
    dear = _job_from(tmp_path, {**data, "cached_input_per_million": 5000.0})  # odd, but allowed: held at the dearer
    assert worst_case_cost(dear, "p" * 40, 1) > worst_case_cost(plain, "p" * 40, 1)


def test_a_cached_price_without_default_prices_is_refused(tmp_path: Path) -> None:
    with pytest.raises(pipeline.JobError, match="cached_input_per_million"):
        _job_from(tmp_path, {"cached_input_per_million": 1.0, "models": {"m": {"input_per_million": 1.0,
                                                                                 "output_per_million": 1.0}}})


def _run(tmp_path: Path, base_url: str, name: str, pricing: dict[str, Any], **sections: Any) -> list[dict[str, Any]]:
    data = {**job_dict(tmp_path / "m.csv", base_url, tmp_path / f"out-{name}", pricing=pricing, **sections), "name": name}
    result = pipeline.run(write_job(tmp_path / f"{name}.toml", data), progress=False)
    assert result.exit_code == 0
    return sorted(read_output(tmp_path / f"out-{name}"), key=lambda r: r["id"])


def test_plain_and_streamed_answers_keep_the_details_and_cost_cached_tokens_at_their_price(
        tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(cached_prompt_tokens=CACHED, reasoning_field="reasoning_content")
    url_manifest(tmp_path / "m.csv", 4)
    plain = _run(tmp_path, ep.base_url, "plain", PRICES)
    model_prices = {"input_per_million": 1000.0, "output_per_million": 4000.0, "cached_input_per_million": 100.0}
    streamed = _run(tmp_path, ep.base_url, "streamed", {"input_per_million": 1.0, "output_per_million": 1.0,
                                                        "models": {"test-vl": model_prices}},
                    request={"stream": True})
    for row in plain + streamed:
        assert row["cached_tokens"] == CACHED and row["image_tokens"] == 85  # one image URL per row
        assert row["reasoning_tokens"] == len(row["reasoning"]) // 4 > 0
        assert row["audio_tokens"] is None  # the endpoint never says: null, not 0
    for p, s in zip(plain, streamed):  # a stream's last usage chunk keeps its details
        assert [p[k] for k in DETAIL_TOKEN_COLUMNS] == [s[k] for k in DETAIL_TOKEN_COLUMNS]
        prompt, completion = p["prompt_tokens"], p["completion_tokens"]
        assert p["cost"] == pytest.approx(((prompt - CACHED) * 1000 + CACHED * 250 + completion * 4000) / 1e6)
        assert s["cost"] == pytest.approx(((prompt - CACHED) * 1000 + CACHED * 100 + completion * 4000) / 1e6)
    report = render(job_status(load_job(tmp_path / "plain.toml")))
    reasoning = sum(r["reasoning_tokens"] for r in plain)
    assert f"({CACHED * 4} prompt-cached, {85 * 4} image)" in report and f"({reasoning} reasoning)" in report


def test_without_details_the_columns_are_null_the_cost_is_as_before_and_the_totals_say_so(
        tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(usage_details=False, cached_prompt_tokens=CACHED)
    manifest = url_manifest(tmp_path / "m.csv", 3)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out", pricing=PRICES))
    result = run_cli("run", str(job))
    assert result.returncode == 0, result.stderr
    for row in read_output(tmp_path / "out"):
        assert all(row[k] is None for k in DETAIL_TOKEN_COLUMNS)
        assert row["cost"] == pytest.approx((row["prompt_tokens"] * 1000 + row["completion_tokens"] * 4000) / 1e6)
    assert "tokens in all (reasoning not reported, prompt-cached not reported)" in result.stderr
    status = run_cli("status", str(job))
    assert "prompt (prompt-cached not reported)" in status.stdout and "completion (reasoning not reported)" in status.stdout
    assert json.loads(run_cli("status", str(job), "--json").stdout)["tokens"]["cached_tokens"] is None


def test_the_summary_shows_reasoning_and_cached_totals_and_an_old_checkpoint_still_reads(
        tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(cached_prompt_tokens=CACHED)
    manifest = url_manifest(tmp_path / "m.csv", 3)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out", run={"shard_rows": 2}))
    result = run_cli("run", str(job))
    assert result.returncode == 0, result.stderr
    rows = read_output(tmp_path / "out")
    reasoning = sum(r["reasoning_tokens"] for r in rows)
    assert f"tokens in all ({reasoning} reasoning, {CACHED * 3} prompt-cached)" in result.stderr
    summary = json.loads((tmp_path / ".pipeline" / "t" / "last_run.json").read_text())
    assert summary["tokens"]["reasoning_tokens"] == reasoning and summary["tokens"]["audio_tokens"] is None
    # commits.jsonl as a version before the details wrote it: only the three base token keys.
    commits = tmp_path / ".pipeline" / "t" / "commits.jsonl"
    lines = [json.loads(line) for line in commits.read_text().splitlines()]
    assert len(lines) == 2 and all(set(DETAIL_TOKEN_COLUMNS) - {"audio_tokens"} <= set(line["tokens"]) for line in lines)
    assert not any("audio_tokens" in line["tokens"] for line in lines)  # no row reported it: not a sum of 0
    for line in lines:
        line["tokens"] = {k: v for k, v in line["tokens"].items() if k not in DETAIL_TOKEN_COLUMNS}
        assert CommitRecord.from_dict(line).tokens == line["tokens"]
    commits.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = job_status(load_job(job))
    assert report["tokens"]["total_tokens"] == sum(r["total_tokens"] for r in rows)
    assert report["tokens"]["cached_tokens"] is None and "cached not reported" in render(report)


def test_batch_output_lines_keep_the_details_at_the_batch_price(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(cached_prompt_tokens=CACHED, batch_validating_s=0, batch_in_progress_s=0.1,
                          batch_finalizing_s=0)
    manifest = url_manifest(tmp_path / "m.csv", 3)
    data = job_dict(manifest, ep.base_url, tmp_path / "out", pricing=PRICES, run={"mode": "batch", "poll_s": 0.1})
    assert pipeline.run(write_job(tmp_path / "b.toml", data), progress=False).exit_code == 0
    for row in read_output(tmp_path / "out"):
        assert (row["cached_tokens"], row["image_tokens"]) == (CACHED, 85) and row["reasoning_tokens"] > 0
        full = ((row["prompt_tokens"] - CACHED) * 1000 + CACHED * 250 + row["completion_tokens"] * 4000) / 1e6
        assert row["cost"] == pytest.approx(full * 0.5)  # the default batch_discount
