"""Batch mode reads a shard of the manifest only when it has rows to send (issue 25): rows waiting
in a batch are known from the ledger and the journal, kept between polling rounds and between
runs, so neither a long wait nor a `--no-wait` job under cron reads the manifest again and again.

The reads are counted by the kernel: inotify's IN_OPEN on the manifest file, whoever opens it."""

from __future__ import annotations

import ctypes
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import job_dict, read_output, run_cli, url_manifest, write_job

N, SHARD_ROWS = 60, 10  # six shards
IN_OPEN, IN_CLOSE_NOWRITE = 0x20, 0x10


class Opens:
    """Counts the opens of one file by any process (Linux inotify). Closes are watched too: the
    kernel merges an event into an identical one not yet read, and an open then a close never are."""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(path).encode(), IN_OPEN | IN_CLOSE_NOWRITE) < 0:
            pytest.skip(f"inotify is not available here (errno {ctypes.get_errno()})")

    def take(self) -> int:
        """Opens since the last call."""
        n = 0
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return n
            at = 0
            while at < len(data):
                _, mask, _, size = struct.unpack_from("iIII", data, at)
                n += bool(mask & IN_OPEN)
                at += 16 + size

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def job_and_opens(tmp_path: Path) -> Iterator[tuple[Path, Opens, Any]]:
    manifest = url_manifest(tmp_path / "m.csv", N)
    opens = Opens(manifest)
    yield manifest, opens, tmp_path
    opens.close()


def _job(tmp_path: Path, manifest: Path, base_url: str) -> Path:
    data = job_dict(manifest, base_url, tmp_path / "out", run={"mode": "batch", "poll_s": 0.3, "shard_rows": SHARD_ROWS})
    job = write_job(tmp_path / "job.toml", data)
    exported = run_cli("export-batch", str(job), str(tmp_path / "plan-only.jsonl"))  # plans (reads) the manifest once
    assert exported.returncode == 0, exported.stderr
    return job


def test_a_no_wait_job_under_cron_does_not_read_the_manifest_while_its_batch_runs(
        job_and_opens: tuple[Path, Opens, Path], endpoint_factory: Any) -> None:
    manifest, opens, tmp_path = job_and_opens
    ep = endpoint_factory(batch_in_progress_s=3600.0)
    job = _job(tmp_path, manifest, ep.base_url)
    opens.take()
    first = run_cli("run", str(job), "--no-wait")
    assert first.returncode == 5, first.stderr
    assert opens.take() == N // SHARD_ROWS  # each shard read once, to build its requests
    for _ in range(3):  # the hourly cron runs while the batch is at the provider
        again = run_cli("run", str(job), "--no-wait")
        assert again.returncode == 5, again.stderr
        assert opens.take() == 0  # every row is in the batch: nothing to read
    ep.advance_batches(3600 + 60)
    done = run_cli("run", str(job), "--no-wait")
    assert done.returncode == 0, done.stderr
    assert opens.take() == N // SHARD_ROWS  # each shard read once more, for its part file
    assert sorted(r["id"] for r in read_output(tmp_path / "out")) == [f"row-{i:05d}" for i in range(N)]


def test_polling_rounds_do_not_read_the_manifest_again(job_and_opens: tuple[Path, Opens, Path], endpoint_factory: Any) -> None:
    manifest, opens, tmp_path = job_and_opens
    ep = endpoint_factory(batch_in_progress_s=2.5)
    job = _job(tmp_path, manifest, ep.base_url)
    opens.take()
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    ledger = [json.loads(line) for line in (tmp_path / ".pipeline" / "t" / "batches.jsonl").read_text().splitlines()]
    polls = sum(1 for e in ledger if e["event"] == "status" and e["status"] == "in_progress")
    assert polls >= 3  # several rounds looked at the running batch (its counts moved each time)
    assert opens.take() <= 2 * (N // SHARD_ROWS)  # once to send, once to commit: not once a round
    assert sorted(r["id"] for r in read_output(tmp_path / "out")) == [f"row-{i:05d}" for i in range(N)]
