"""No row is bought twice (issue 25, "money and data"): a committed part file stands for its rows
whatever happened to the journal, in every executor and in export-batch, because one function
decides which rows still need sending (pipeline.engine.book)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import job_dict, read_output, run_cli, url_manifest, write_job

N = 60  # two shards of 50 and 10 rows


def _job(tmp_path: Path, base_url: str, **run: Any) -> Path:
    manifest = url_manifest(tmp_path / "m.csv", N)
    data = job_dict(manifest, base_url, tmp_path / "out", limits={"max_concurrency": 1},
                    run={"shard_rows": 50, "poll_s": 0.3, **run})
    return write_job(tmp_path / "job.toml", data)


def _lose_journal(tmp_path: Path) -> None:
    journal = tmp_path / ".pipeline" / "t" / "journal"
    assert any(journal.glob("shard-*"))  # a shard's appended file, or its folder of sealed and compacted pieces
    shutil.rmtree(journal)  # someone cleaned up the wrong folder


def _exactly_once(tmp_path: Path) -> dict[str, dict[str, Any]]:
    rows = read_output(tmp_path / "out")
    assert Counter(r["id"] for r in rows) == Counter(f"row-{i:05d}" for i in range(N))
    return {r["id"]: r for r in rows}


def test_a_local_run_never_sends_a_committed_row_again(tmp_path: Path, endpoint_factory: Any) -> None:
    """A stop mid-shard commits what arrived (a part of 30 rows); the journal is lost; the rerun
    sends the 30 rows the part does not hold, and the part's rows stay in the output."""
    ep = endpoint_factory(row_faults={"picture row-00030": "401:1"})  # the key refused once: the run stops there
    job = _job(tmp_path, ep.base_url)
    stopped = run_cli("run", str(job))
    assert stopped.returncode == 3, stopped.stderr
    commits = [json.loads(line) for line in (tmp_path / ".pipeline" / "t" / "commits.jsonl").read_text().splitlines()]
    assert [(c["shard"], c["rows"]) for c in commits] == [(0, 30)]
    _lose_journal(tmp_path)
    sent = ep.stats()["requests"]
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    assert ep.stats()["requests"] - sent == N - 30  # the part's 30 rows were not bought again
    assert all(row["status"] == "ok" for row in _exactly_once(tmp_path).values())


def test_batch_retry_failed_after_a_lost_journal_keeps_the_committed_rows(tmp_path: Path, endpoint_factory: Any) -> None:
    """--retry-failed in batch mode sends the failed row alone, and the part made after it still
    holds every row: the rows read back from the part are journaled again before the commit."""
    ep = endpoint_factory(batch_line_faults={"picture row-00002": 400})
    job = _job(tmp_path, ep.base_url, mode="batch")
    assert run_cli("run", str(job)).returncode == 1
    _lose_journal(tmp_path)
    again = run_cli("run", str(job), "--retry-failed")
    assert again.returncode == 1, again.stderr
    batches = ep.stats()["batches"]
    assert [b["custom_ids"] for b in batches[1:]] == [["row-00002"]]
    rows = _exactly_once(tmp_path)
    assert rows["row-00002"]["error_kind"] == "bad_request"
    assert run_cli("run", str(job)).returncode == 1
    assert len(ep.stats()["batches"]) == 2  # nothing left to buy


def test_export_batch_leaves_out_committed_rows_whose_journal_was_lost(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"picture row-00030": "401:1"})
    job = _job(tmp_path, ep.base_url)
    assert run_cli("run", str(job)).returncode == 3  # shard 0's first 30 rows committed
    _lose_journal(tmp_path)
    exported = tmp_path / "todo.jsonl"
    r = run_cli("export-batch", str(job), str(exported))
    assert r.returncode == 0, r.stderr
    ids = [json.loads(line)["custom_id"] for line in exported.read_bytes().splitlines()]
    assert ids == [f"row-{i:05d}" for i in range(30, N)]  # the committed 30 are not bought again
