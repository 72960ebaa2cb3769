"""Small things found by trying it (issue 18's list): a [labels] schema given as a JSON string,
`pipeline serve --help` explaining every option, and a refused run leaving nothing behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import job_dict, run_cli, write_job
from pipeline.config import parse_job
from pipeline.errors import JobError

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


def _data(tmp_path: Path, schema: object) -> dict:
    return job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out", labels={"schema": schema})


def test_a_labels_schema_given_as_a_json_string_is_read_as_json(tmp_path: Path) -> None:
    job = parse_job(_data(tmp_path, json.dumps(SCHEMA)), tmp_path / "j.toml")
    assert job.labels is not None and job.labels.schema == SCHEMA
    with pytest.raises(JobError, match=r"\[labels\] schema: not valid JSON"):
        parse_job(_data(tmp_path, '{"type": "object",'), tmp_path / "j.toml")
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    labels = parse_job(_data(tmp_path, "s.json"), tmp_path / "j.toml").labels
    assert labels is not None and labels.schema == SCHEMA  # a path still works


def test_serve_help_explains_every_option() -> None:
    import argparse

    from pipeline.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help and len(action.help.split()) >= 2, f"pipeline {command} {action.option_strings or action.dest}"
    assert "the port" in run_cli("serve", "--help").stdout


def test_a_refused_run_leaves_no_stale_lock(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,image,prompt\n1,https://x/1.png,hi\n1,https://x/2.png,again\n")  # a repeated id
    job = write_job(tmp_path / "job.toml", job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out"))
    first = run_cli("run", str(job))
    assert first.returncode == 2 and "more than once" in first.stderr
    lock = tmp_path / ".pipeline" / "t" / "lock"
    assert not lock.exists() or lock.read_text() == ""  # no pid left for the next run to "take over"
    second = run_cli("run", str(job))
    assert second.returncode == 2 and "took over" not in second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "m.csv"]  # a run that never sent left nothing


def test_a_refused_first_run_with_the_checkpoint_inside_the_output_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,image,prompt\n1,https://x/1.png,hi\n1,https://x/2.png,again\n")
    job = job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out")
    job["output"]["checkpoint"] = str(tmp_path / "out" / ".pipeline" / "t")
    result = run_cli("run", str(write_job(tmp_path / "job.toml", job)))
    assert result.returncode == 2 and "more than once" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "m.csv"]
