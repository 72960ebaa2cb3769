"""The scheduling example (examples/nightly_task.py, an Airflow/Prefect-style task) run without
an orchestrator against the built-in endpoint: success, failed rows, a provider's stop, a job
already running; and the README's systemd units use the exit codes as the section says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, job_dict, url_manifest, write_job

from pipeline.io.checkpoint import FolderCheckpoint


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("nightly_task", ROOT / "examples" / "nightly_task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_job(tmp_path: Path, base_url: str, name: str) -> Path:
    manifest = url_manifest(tmp_path / f"{name}.csv", 40)
    job = job_dict(manifest, base_url, tmp_path / f"out-{name}", run={"shard_rows": 20}, limits={"max_attempts": 2})
    job["name"] = name
    return write_job(tmp_path / f"{name}.toml", job)


def test_the_task_succeeds_retries_transient_failures_and_skips_a_running_job(tmp_path: Path,
                                                                             endpoint_factory: Any) -> None:
    task = load_example()
    ep = endpoint_factory(row_faults={"row-00003": "500:3"})  # three 500s: out of attempts, then fine
    job = make_job(tmp_path, ep.base_url, "ok")
    summary = task.caption_nightly(job)
    assert summary["exit_code"] == 0 and summary["ok"] == 40  # the transient failure was sent once more

    ckpt = FolderCheckpoint(tmp_path / ".pipeline" / "ok")
    with ckpt.locked("ok"):  # another run holds the job
        assert "skipped" in task.caption_nightly(job)


def test_the_task_raises_what_the_scheduler_acts_on(tmp_path: Path, endpoint_factory: Any) -> None:
    task = load_example()
    refused = endpoint_factory(row_faults={f"row-0000{i}": "400" for i in range(4)})
    with pytest.raises(task.JobFailed, match="4 of 40 rows failed"):
        task.caption_nightly(make_job(tmp_path, refused.base_url, "bad"))
    assert task.caption_nightly(make_job(tmp_path, refused.base_url, "lenient"), max_failed_share=0.2)["failed"] == 4

    quota = endpoint_factory(row_faults={"row-00005": "quota"})
    with pytest.raises(task.RetryLater, match="stopped with exit 3"):
        task.caption_nightly(make_job(tmp_path, quota.base_url, "stopped"))


def test_the_readme_units_use_the_exit_codes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Running it every night"):]
    section = section[: section.index("\n## ", 3)]
    service = re.search(r"```ini\n(\[Unit\].*?)```", section, re.S)
    assert service is not None and "Type=oneshot" in service.group(1)
    assert re.search(r"SuccessExitStatus=5 75\b", service.group(1))  # waiting batches, a run already going
    assert re.search(r"RestartPreventExitStatus=1 2\b", service.group(1))  # rows' own failures, a bad job
    assert "OnCalendar=" in section and "Persistent=true" in section
    assert "pipeline cache" in section and "pipeline_last_success_timestamp_seconds" in section
