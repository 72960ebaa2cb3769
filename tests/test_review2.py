"""Review 2 (store seam, source seam, audio / Responses / compare): failing tests that show defects.

Each test names the finding of the review report it reproduces. They are expected to FAIL on the
merged main (d765105 + 9cde42d) and to pass once the defect is fixed.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import read_output
from test_sources import cli, job_file


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + n, 8), (40 * n % 256, 90, 150)).save(buf, "JPEG")
    return buf.getvalue()


# -- F1: WebDataset members of one key that are not consecutive ----------------------------------


def test_f1_a_tar_whose_members_are_not_grouped_by_key_gives_each_row_one_id(tmp_path: Path, endpoint, capsys) -> None:
    """`tar cf shard.tar dir/` stores members in readdir order (not sorted on ext4/xfs), so a
    sample's .jpg and .txt need not be neighbours. The source then makes two rows of one key with
    the same id `shard.tar:a`: the run pays for both and the output holds the id twice (or, on
    resume, the shard never matches its journal)."""
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for n, key in enumerate(["a", "b", "c"]):
            _member(tar, f"{key}.jpg", _jpeg(n))
        for key in ["a", "b", "c"]:
            _member(tar, f"{key}.txt", f"caption of {key}\n".encode())
    path = job_file(tmp_path, "shard.tar", endpoint.base_url, input={"image_column": None, "prompt_column": None},
                    request={"prompt": "Is this {txt}?"}, run={"shard_rows": 10})
    code, _, err = cli(capsys, "run", str(path))
    rows = read_output(tmp_path / "out-t")
    ids = Counter(r["id"] for r in rows)
    assert all(n == 1 for n in ids.values()), f"an id written more than once: {ids}"
    assert ids == Counter({"shard.tar:a": 1, "shard.tar:b": 1, "shard.tar:c": 1}), ids
    assert endpoint.stats()["requests"] <= 3, "a sample is paid once"


# -- F3: a file changed between planning and sending is read as it is now, not refused --


def test_f3_a_part_changed_after_planning_is_not_answered_as_planned(tmp_path: Path, endpoint_factory) -> None:
    """Issue 23: "an object changed or deleted between planning and sending: an error row of kind
    input naming the object". Only deletion and a different row count are caught: no read checks
    the planned size and stamp (mtime / ETag), so rows of a part rewritten mid-run (same row
    count) are bought on the new content under the old plan, and the next run then refuses the
    whole job ("changed since its rows were planned ... --restart"), whose only way on re-buys it."""
    from conftest import read_output, start_run
    from test_sources import write_part

    ds = tmp_path / "ds"
    write_part(ds / "a.parquet", 60)
    write_part(ds / "b.parquet", 10)
    ep = endpoint_factory(record=True, latency_ms=20)
    path = job_file(tmp_path, "ds", ep.base_url, run={"shard_rows": 30}, limits={"max_concurrency": 2})
    proc = start_run(path, tmp_path / ".pipeline" / "t" / "commits.jsonl")
    write_part(ds / "b.parquet", 10, tag="EDITED ")  # same rows, other prompts: a planned file rewritten
    _, err = proc.communicate(timeout=120)
    rows = {r["id"]: r for r in read_output(tmp_path / "out-t")}
    edited = [i for i, r in rows.items() if i.startswith("b.parquet") and r["status"] == "ok" and "EDITED" in (r["answer"] or "")]
    assert not edited, f"exit {proc.returncode}: {len(edited)} rows of b.parquet bought on content changed since planning"


# -- F4: ids hang on the root a list's items share: adding an item elsewhere renames every file --


def test_f4_adding_a_file_from_another_folder_to_a_list_sends_only_its_rows(tmp_path: Path, endpoint, capsys) -> None:
    """Names (and so row ids `name:row`, the plan's file keys) are relative to the folder the
    list's items share. A cron job that appends this month's file to its list
    (`["data/2026-10/p.csv", "data/2026-10/q.csv"]` + `"data/2026-11/p.csv"`) moves that root
    from data/2026-10 to data, so p.csv becomes 2026-10/p.csv: refused as "data/p.csv is gone since
    its rows were planned" (a path that never existed; exit 2), and the only way on, --restart,
    buys every row again. Files may be added, the README says."""
    from test_sources import write_part

    write_part(tmp_path / "data" / "2026-10" / "p.csv", 5)
    write_part(tmp_path / "data" / "2026-10" / "q.csv", 5)
    write_part(tmp_path / "data" / "2026-11" / "p.csv", 4, tag="new ")
    one = job_file(tmp_path, ["data/2026-10/p.csv", "data/2026-10/q.csv"], endpoint.base_url)
    assert cli(capsys, "run", str(one))[0] == 0
    two = job_file(tmp_path, ["data/2026-10/p.csv", "data/2026-10/q.csv", "data/2026-11/p.csv"], endpoint.base_url)
    code, out, err = cli(capsys, "run", str(two))
    assert code == 0, err[-400:]
    assert endpoint.stats()["requests"] == 14, "only the added file's rows are sent"


def test_f4b_a_list_of_one_file_is_read(tmp_path: Path, endpoint, capsys) -> None:
    """`path = ["m.csv"]` (a list of one, as a script building the list makes it) is taken for a
    folder: exit 2 "could not read .../m.csv/. (Not a directory)"."""
    from test_sources import write_part

    write_part(tmp_path / "m.csv", 3)
    code, _, err = cli(capsys, "run", str(job_file(tmp_path, ["m.csv"], endpoint.base_url)))
    assert code == 0, err[-300:]


# -- F7: a shard's file failing while its image bytes stream stops the whole run ----------------------


def test_f7_a_tar_cut_while_its_shard_is_sent_leaves_that_shard_and_the_job_goes_on(tmp_path: Path,
                                                                                       endpoint_factory) -> None:
    """README (Input, unreadable rows): a file that cannot be read when its shard's turn comes is
    left for the next run and the job goes on. That holds when the shard opens; but image bytes are
    read again, 64 rows at a time, while the shard's rows are queued (engine/feed.py), and a failure
    there (a tar cut, an S3 object replaced - s3fs's FileExpired -, a dropped connection past
    s3fs's retries) raises Unreadable out of the producer, which _guarded turns into a local
    failure: the whole run stops (exit 5) and every other shard waits for a rerun."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    for name, n in (("a.tar", 300), ("b.tar", 40)):
        with tarfile.open(tmp_path / name, "w") as tar:
            for k in range(n):
                _member(tar, f"{k:05d}.jpg", _jpeg(k % 50) + bytes(20_000))  # ~20 kB a sample: the tar is read as sent
                _member(tar, f"{k:05d}.txt", f"caption {name} {k}\n".encode())
    ep = endpoint_factory(record=True, latency_ms=20)
    path = job_file(tmp_path, "*.tar", ep.base_url, input={"image_column": None, "prompt_column": None},
                    request={"prompt": "Is this {txt}?"}, run={"shard_rows": 300}, limits={"max_concurrency": 2})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while ep.stats()["requests"] < 80 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    with open(tmp_path / "a.tar", "r+b") as f:  # cut short while shard 0 is being sent
        f.truncate(200 * 21_500)
    _, err = proc.communicate(timeout=120)
    rows = read_output(tmp_path / "out-t")
    assert proc.returncode == 4, f"exit {proc.returncode}: {err[-500:]}"
    assert sum(r["id"].startswith("b.tar:") for r in rows) == 40, f"the other tar's shard is sent all the same: {err[-700:]}"


# -- F8: a producer cancelled while it reads image bytes ends in ValueError, not CancelledError ------


def test_f8_a_feed_cancelled_mid_read_ends_cancelled(tmp_path: Path) -> None:
    """Feed.cells reads each batch with `await asyncio.to_thread(next, stream, None)` and closes
    the stream in `finally` with `await asyncio.to_thread(stream.close)`. A stop (Ctrl-C, the
    breaker, the budget) cancels the producer; if it is inside that read, the worker thread is
    still running the generator when a second thread closes it: "ValueError: generator already
    executing" replaces the CancelledError, _guarded takes it for a failure of shared machinery
    and the run's clean stop becomes "stopped by a local failure: reading the manifest: internal
    error ... please report it" (a local failure wins the exit code)."""
    import asyncio
    import os

    from pipeline.config import load_job
    from pipeline.engine.feed import Feed
    from pipeline.io.manifest import plan_manifest
    from pipeline.rows.request import request_columns

    n = 192
    table = pa.table({"id": [f"r{i}" for i in range(n)], "prompt": ["p"] * n,
                      "image": pa.array([os.urandom(1 << 20) for _ in range(n)], pa.binary())})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=16, compression="none")
    job = load_job({"name": "t", "input": {"path": str(tmp_path / "m.parquet"), "id_column": "id",
                                           "image_column": "image", "prompt_column": "prompt"},
                    "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
                    "output": {"path": str(tmp_path / "out")}}, require_key=False)
    plan = plan_manifest(job.input, n)
    feed = Feed(job, plan, request_columns(job, plan.columns))

    async def scenario() -> BaseException | None:
        rows = await feed.open(plan.shards[0])
        cells = feed.cells(plan.shards[0], rows.table, list(range(n)))
        await cells.__anext__()
        reading = asyncio.create_task(cells.__anext__())  # the next 64 MB, in a worker thread
        await asyncio.sleep(0.005)
        reading.cancel()
        try:
            await reading
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None

    ended = asyncio.run(scenario())
    assert isinstance(ended, asyncio.CancelledError), f"the cancelled read ended with {ended!r}"
