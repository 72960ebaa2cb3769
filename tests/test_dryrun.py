"""The dry run: every row checked, tokens, cost and time estimated, nothing sent, nothing written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA, job_dict, run_cli, url_manifest, write_job, write_rows


def _problems(stdout: str) -> dict[str, int]:
    return {k: int(n) for k, n in re.findall(r"^  (\w+): (\d+) row\(s\)$", stdout, re.M)}


def test_a_manifest_with_planted_problems_is_reported_by_kind(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    (tmp_path / "images").mkdir()
    shutil.copy(DATA / "images" / "chelsea.jpg", tmp_path / "images" / "cat.jpg")
    (tmp_path / "images" / "notes.png").write_text("not really a PNG", encoding="utf-8")
    (tmp_path / "images" / "folder.png").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    shutil.copy(DATA / "images" / "badge.png", outside)
    good = {"image": "images/cat.jpg", "prompt": "What is this?"}
    rows = [
        {"id": "ok-1", **good},
        {"id": "ok-2", "image": "https://images.example/a.png", "prompt": "And this?"},
        {"id": "ok-3", "image": '["images/cat.jpg", "https://images.example/b.png"]', "prompt": "Both?"},
        *({"id": f"gone-{i}", "image": f"images/missing-{i}.png", "prompt": "p"} for i in range(5)),
        {"id": "fake", "image": "images/notes.png", "prompt": "p"},
        {"id": "dir", "image": "images/folder.png", "prompt": "p"},
        {"id": "ftp", "image": "ftp://images.example/a.png", "prompt": "p"},
        {"id": "nohost", "image": "http:///a.png", "prompt": "p"},
        {"id": "escape", "image": f"../{outside.name}", "prompt": "p"},
        {"id": "noimage", "image": "", "prompt": "p"},
        {"id": "badlist", "image": '["images/cat.jpg",', "prompt": "p"},
        {"id": "noprompt", "image": "images/cat.jpg", "prompt": "  "},
    ]
    write_rows(tmp_path / "m.csv", rows, "csv")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", job_dict(
        tmp_path / "m.csv", ep.base_url, out,
        request={"max_tokens": 100},
        limits={"requests_per_minute": 60, "image_token_estimate": 500},
        pricing={"input_per_million": 1000.0, "output_per_million": 2000.0},
    ))
    result = run_cli("run", str(job), "--dry-run")
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout
    assert "nothing was sent" in text
    assert _problems(text) == {
        "missing_file": 5, "not_an_image": 1, "unreadable_file": 1, "bad_url": 2, "outside_roots": 1,
        "missing_image": 1, "bad_image_cell": 1, "empty_prompt": 1,
    }
    assert "row 3 (id gone-0): image file not found: 'images/missing-0.png'" in text
    assert "gone-2" in text and "gone-3" not in text and "... and 2 more" in text  # the first few, then a count
    assert "ftp://images.example/a.png" in text
    assert "16 rows in 1 shard(s); 3 ready, 13 would fail" in text
    # Estimates cover the 3 ready rows: 4 images at 500, output at most 3 x 100.
    # Text: 27 characters of prompts at 4 a token.
    assert "input about 2,006 (text 6, 4 image(s) x 500), output at most 300 (max_tokens 100 per row)" in text
    assert "input about 2.0060, output at most 0.6000, total at most 2.6060" in text
    assert "at least 3s" in text and "requests_per_minute 60" in text
    assert text.rstrip().endswith("not ready: 13 row(s) would fail")
    assert ep.stats()["requests"] == 0
    assert not out.exists() and not (tmp_path / ".pipeline").exists()


def test_a_clean_job_is_ready_with_its_estimates(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory()
    manifest = url_manifest(tmp_path / "m.csv", 240)
    job = write_job(tmp_path / "job.toml", job_dict(
        manifest, ep.base_url, tmp_path / "out",
        request={"max_tokens": 64},
        limits={"requests_per_minute": 120, "tokens_per_minute": 0},
        run={"shard_rows": 100},
    ))
    result = run_cli("run", str(job), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "240 rows in 3 shard(s); 240 ready, 0 would fail" in result.stdout
    assert "output at most 15,360 (max_tokens 64 per row)" in result.stdout
    assert "at least 2.0 min" in result.stdout
    assert "cost: no [pricing] in the job" in result.stdout
    assert result.stdout.rstrip().endswith("ready")
    assert ep.stats()["requests"] == 0


def test_repeated_ids_anywhere_are_a_job_problem_naming_the_rows(tmp_path: Path, endpoint_factory: Any) -> None:
    # The planner checks ids over the whole manifest (not per shard): the dry run says what a run would.
    ep = endpoint_factory()
    manifest = url_manifest(tmp_path / "m.csv", 30)
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[26] = lines[26].replace("row-00025,", "row-00004,", 1)  # row 25, in the third shard of 10
    lines[28] = lines[28].replace("row-00027,", "", 1)  # row 27 has no id
    lines[28] = "," + lines[28]
    manifest.write_text("".join(lines), encoding="utf-8")
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out", run={"shard_rows": 10}))
    result = run_cli("run", str(job), "--dry-run")
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("job problem:")]
    assert problems == [
        "job problem: [input] id_column: 1 row has no 'id' (row 27); every row needs an id | "
        "[input] id_column: 1 id appears more than once (rows 4 and 25: 'row-00004'); ids must be unique"
    ]
    assert "not ready: fix the job problem above" in result.stdout
    assert ep.stats()["requests"] == 0


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_manifest_without_rows_is_said_plainly(tmp_path: Path, fmt: str) -> None:
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        manifest.write_text("id,image,prompt\n", encoding="utf-8")
    elif fmt == "jsonl":
        manifest.write_bytes(b"")
    else:
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.string()),
                                 "prompt": pa.array([], pa.string())}), manifest)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, "http://127.0.0.1:9/v1", tmp_path / "out"))
    result = run_cli("run", str(job), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"manifest: {manifest} has no rows; a run would send nothing" in result.stdout
    assert result.stdout.rstrip().endswith("nothing to do")


def test_job_level_problems_make_the_job_not_ready(tmp_path: Path) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 3)
    job = write_job(tmp_path / "job.toml", job_dict(
        manifest, "http://127.0.0.1:9/v1", tmp_path / "out",
        input={"image_column": "picture"},
        endpoint={"api_key_env": "PIPELINE_TEST_UNSET_KEY"},
    ))
    result = run_cli("run", str(job), "--dry-run", env={"PIPELINE_TEST_UNSET_KEY": ""})
    assert result.returncode == 1
    assert "job problem: [endpoint] api_key_env: the variable PIPELINE_TEST_UNSET_KEY is not set" in result.stdout
    assert "job problem: [input] image_column: column 'picture' is not in the manifest" in result.stdout
    assert "not ready: fix the job problem above" in result.stdout


def test_a_prompt_placeholder_that_is_not_a_column_is_a_job_problem(tmp_path: Path) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 2)
    job = write_job(tmp_path / "job.toml", job_dict(
        manifest, "http://127.0.0.1:9/v1", tmp_path / "out",
        input={"prompt_column": None}, request={"prompt": "Describe {caption}"},
    ))
    result = run_cli("run", str(job), "--dry-run")
    assert result.returncode == 1
    assert "placeholder {caption} is not a manifest column" in result.stdout


def test_a_job_file_that_cannot_be_read_is_still_exit_2(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("name = 'x'\n[input]\npath = 'm.csv'\nfoo = 1\n", encoding="utf-8")
    result = run_cli("run", str(job), "--dry-run")
    assert result.returncode == 2 and "error:" in result.stderr


def test_the_shipped_labeling_job_is_ready() -> None:
    result = run_cli("run", "jobs/labels.toml", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 ready, 0 would fail" in result.stdout and "cost (estimate" in result.stdout
