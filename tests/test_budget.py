"""Cost and budget: a cost per row from [pricing], spend in the summary, a budget never passed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import job_dict, read_output, run_cli, url_manifest, write_job

from pipeline.config import load_job
from pipeline.rows.pricing import worst_case_cost

# Round prices so a row's cost is easy to check from its own token counts.
PRICING = {"input_per_million": 1000.0, "output_per_million": 4000.0}


def _job(tmp_path: Path, base_url: str, manifest: Path, **sections: Any) -> tuple[Path, Path]:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", job_dict(manifest, base_url, out, **sections))
    return job, out


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out.parent / ".pipeline" / "t" / "last_run.json").read_text())


def test_every_row_costs_its_tokens_at_the_answering_models_price(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(model="qvq-max-2025-03-25", row_faults={"row-00003": "no_usage", "row-00004": "400"})
    manifest = url_manifest(tmp_path / "m.csv", 5)
    pricing = {**PRICING, "models": {"qvq-max-2025-03-25": {"input_per_million": 2000.0, "output_per_million": 8000.0}}}
    job, out = _job(tmp_path, ep.base_url, manifest, pricing=pricing)
    result = run_cli("run", str(job))
    assert result.returncode == 1, result.stderr  # row 4 is refused
    rows = {r["id"]: r for r in read_output(out)}
    total = 0.0
    for i in range(3):
        r = rows[f"row-{i:05d}"]
        assert r["cost"] == pytest.approx((r["prompt_tokens"] * 2000 + r["completion_tokens"] * 8000) / 1e6)
        total += r["cost"]
    assert rows["row-00003"]["status"] == "ok" and rows["row-00003"]["cost"] is None  # no usage: unknown, not guessed
    assert rows["row-00004"]["status"] == "error" and rows["row-00004"]["cost"] is None
    summary = _summary(out)
    assert summary["spend"] == pytest.approx(total) and summary["this_run"]["spent"] == pytest.approx(total)
    assert f"spent {total:.4f}" in result.stderr


def test_invalid_label_attempts_are_paid_for_and_counted_in_the_rows_cost(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"row-00000": "invalid_json:2"}, record=True)
    manifest = url_manifest(tmp_path / "m.csv", 1)
    schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}
    job, out = _job(tmp_path, ep.base_url, manifest, pricing=PRICING, labels={"schema": schema})
    assert run_cli("run", str(job)).returncode == 0
    [row] = read_output(out)
    assert row["attempts"] == 3
    one = (row["prompt_tokens"] * 1000 + row["completion_tokens"] * 4000) / 1e6  # the valid answer alone
    assert row["cost"] > 2.5 * one  # three answers were paid for, not one


def _budget_job(tmp_path: Path, base_url: str, manifest: Path, budget: float, concurrency: int) -> tuple[Path, Path]:
    return _job(
        tmp_path, base_url, manifest,
        pricing={**PRICING, "budget": budget},
        request={"max_tokens": 200},
        limits={"max_concurrency": concurrency, "image_token_estimate": 100},
    )


def test_unusable_answers_that_report_usage_are_paid_for_in_the_rows_cost_and_the_spend(
        tmp_path: Path, endpoint_factory: Any) -> None:
    """A 200 with usage but no answer (here: no choices) was billed: every such attempt counts in
    the row's cost and the spend, retried into an answer or failed after max_attempts (4)."""
    ep = endpoint_factory(row_faults={"row-00000": "nochoices:2", "row-00001": "nochoices"})
    manifest = url_manifest(tmp_path / "m.csv", 3)
    job, out = _job(tmp_path, ep.base_url, manifest, pricing=PRICING)
    result = run_cli("run", str(job))
    assert result.returncode == 1, result.stderr
    rows = {r["id"]: r for r in read_output(out)}
    mended, failed, fine = rows["row-00000"], rows["row-00001"], rows["row-00002"]
    one = (fine["prompt_tokens"] * 1000 + fine["completion_tokens"] * 4000) / 1e6  # the rows' prompts are alike
    assert (mended["status"], mended["attempts"]) == ("ok", 3) and mended["cost"] == pytest.approx(3 * one)
    assert (failed["error_kind"], failed["attempts"]) == ("invalid_response", 4) and failed["cost"] == pytest.approx(4 * one)
    total = sum(r["cost"] for r in rows.values())
    assert _summary(out)["spend"] == pytest.approx(total) and f"spent {total:.4f}" in result.stderr


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_budget_stops_the_run_before_it_can_pass_and_a_higher_one_resumes(
    tmp_path: Path, endpoint_factory: Any, concurrency: int
) -> None:
    ep = endpoint_factory(latency_ms=30)
    manifest = url_manifest(tmp_path / "m.csv", 12)
    budget = 1.5  # each answer costs about 0.34; a request's worst case is about 0.91
    job, out = _budget_job(tmp_path, ep.base_url, manifest, budget, concurrency)
    result = run_cli("run", str(job))
    assert result.returncode == 3, result.stderr
    assert "budget" in result.stderr and "raise [pricing] budget" in result.stderr
    rows = read_output(out)  # what arrived is committed
    spent = sum(r["cost"] for r in rows)
    assert 0 < len(rows) < 12 and all(r["status"] == "ok" for r in rows)
    assert spent <= budget
    worst = worst_case_cost(load_job(job), "Describe picture row-00000", 1)
    assert spent + worst > budget  # it stopped because one more request could have passed the budget
    summary = _summary(out)
    assert summary["stopped"]["kind"] == "budget" and summary["spend"] == pytest.approx(spent)

    job, out = _budget_job(tmp_path, ep.base_url, manifest, 100.0, concurrency)
    again = run_cli("run", str(job))
    assert again.returncode == 0, again.stderr
    rows = read_output(out)
    assert len(rows) == 12
    assert set(ep.stats()["per_row"].values()) == {1}  # nothing was sent twice
    assert _summary(out)["spend"] == pytest.approx(sum(r["cost"] for r in rows))


def test_a_budget_already_spent_sends_nothing(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = url_manifest(tmp_path / "m.csv", 4)
    job, out = _budget_job(tmp_path, ep.base_url, manifest, 0.5, 1)  # below one request's worst case
    result = run_cli("run", str(job))
    assert result.returncode == 3
    assert ep.stats()["requests"] == 0 and read_output(out) == []
    assert "could be passed" in result.stderr


@pytest.mark.parametrize(
    ("pricing", "request_", "words"),
    [
        ({"input_per_million": 1.0}, {}, "give both input_per_million and output_per_million"),
        ({"models": {"other": {"input_per_million": 1.0, "output_per_million": 2.0}}}, {}, "no price for the model 'test-vl'"),
        ({**PRICING, "budget": 5.0}, {"max_tokens": None}, "budget: needs [request] max_tokens"),
        ({**PRICING, "budget": -1.0}, {}, "budget must be zero or more"),
        ({**PRICING, "currency": "EUR"}, {}, "[pricing] currency: unknown key"),
        ({"models": {"m": {"input_per_million": 1.0, "output_per_million": 2.0, "x": 1}}}, {}, "x: unknown key"),
    ],
)
def test_bad_pricing_sections_are_one_line_errors(tmp_path: Path, pricing: dict[str, Any], request_: dict[str, Any], words: str) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 1)
    job, _ = _job(tmp_path, "http://127.0.0.1:9/v1", manifest, pricing=pricing, request=request_)
    result = run_cli("run", str(job))
    assert result.returncode == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_budget_stop_between_label_retries_keeps_the_paid_answer(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"row-00000": "invalid_json:1"})
    manifest = url_manifest(tmp_path / "m.csv", 1)
    schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}

    def job(budget: float) -> Path:
        path, _ = _job(tmp_path, ep.base_url, manifest, labels={"schema": schema}, pricing={**PRICING, "budget": budget},
                       request={"max_tokens": 200}, limits={"image_token_estimate": 100})
        return path

    out = tmp_path / "out"
    worst = worst_case_cost(load_job(job(1.0)), "Describe picture row-00000", 1)
    first = run_cli("run", str(job(worst * 1.1)))  # room for one worst case, not for a second after an answer
    assert first.returncode == 3, first.stderr
    [row] = read_output(out)
    assert (row["status"], row["error_kind"], row["attempts"]) == ("error", "invalid_output", 1)
    assert row["answer"] and row["cost"] > 0  # the answer paid for is kept, with what it cost
    again = run_cli("run", str(job(10.0)), "--retry-failed")
    assert again.returncode == 0, again.stderr
    [fixed] = read_output(out)
    assert fixed["status"] == "ok" and fixed["label"] == "a"
    # The job's spend counts both answers, though the row now shows only the second one's cost.
    assert _summary(out)["spend"] == pytest.approx(row["cost"] + fixed["cost"])
