"""Sources on disk (issue 23): a folder, a glob or a list of Parquet, CSV or JSON Lines parts read as
one manifest; an image folder; WebDataset tar shards; an old checkpoint's plan.

Runs are real `pipeline run`s (the CLI's main in this process) against the built-in endpoint;
what a user relies on is checked on the output: every row exactly once with its own answer, ids
stable and readable (`part-00003.parquet:17`), a second run sending nothing, a file added sending
only its rows, a file changed or removed refused in one line. The property test plans any set of
files into any shards and reads every row back exactly once. Buckets: tests/test_sources_s3.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_dict, read_output, start_run, write_job, write_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.cli import main
from pipeline.config import InputConfig
from pipeline.errors import JobError
from pipeline.io.manifest import plan_manifest, read_rows, shard_batches
from pipeline.io.plan import Plan

FORMATS = ["csv", "jsonl", "parquet"]


def cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_part(path: Path, rows: int, fmt: str | None = None, tag: str = "", name: str | None = None) -> list[str]:
    """A part whose rows' prompts name the row by the id it will get (`name:row`, name: the
    file's path relative to the root, default its file name)."""
    fmt = fmt or path.suffix[1:]
    path.parent.mkdir(parents=True, exist_ok=True)
    name = name or path.name
    rows_ = [{"image": f"https://images.example/{name}/{i}.png", "prompt": f"Describe {tag}{name}:{i}"} for i in range(rows)]
    if rows_:
        write_rows(path, rows_, fmt)
    elif fmt == "parquet":
        pq.write_table(pa.table({"image": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), path)
    else:
        path.write_text("image,prompt\n" if fmt == "csv" else "")
    return [f"{name}:{i}" for i in range(rows)]


def job_file(tmp_path: Path, path: Any, base_url: str, name: str = "t", **over: Any) -> Path:
    job = job_dict(tmp_path / "unused", base_url, tmp_path / f"out-{name}", name=name,
                   input={"id_column": None, **over.pop("input", {})}, run={"shard_rows": 7, **over.pop("run", {})}, **over)
    job["input"]["path"] = path
    return write_job(tmp_path / f"{name}.toml", job)


def assert_answered(rows: list[dict[str, Any]], ids: list[str], prefix: str = "") -> None:
    assert Counter(r["id"] for r in rows) == Counter(ids), "every row exactly once"
    for r in rows:
        assert r["status"] == "ok" and r["answer"].startswith(f"Answer to 'Describe {prefix}{r['id']}'"), r


# -- a set of files as one manifest ----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_folder_a_glob_and_a_list_of_parts_are_one_manifest(tmp_path: Path, endpoint, capsys, fmt: str) -> None:
    ds = tmp_path / "ds"
    ids = write_part(ds / f"part-00000.{fmt}", 9) + write_part(ds / f"part-00001.{fmt}", 0)
    sub = write_part(ds / "sub" / f"part-00002.{fmt}", 5, name=f"sub/part-00002.{fmt}")
    (ds / "_SUCCESS").write_text("")  # what Spark leaves: skipped, as pyarrow.dataset skips it
    (ds / f".part-00000.{fmt}.crc").write_bytes(b"\x00\x01")
    for name, path, expected in [
        ("folder", "ds", ids + sub),
        ("glob", f"ds/**/*.{fmt}", ids + sub),
        ("list", ["ds/part-00000." + fmt, "ds/sub"], [f"part-00000.{fmt}:{i}" for i in range(9)]
         + [f"sub/part-00002.{fmt}:{i}" for i in range(5)]),
    ]:
        job = job_file(tmp_path, path, endpoint.base_url, name)
        code, _, err = cli(capsys, "run", str(job))
        assert code == 0, err
        assert_answered(read_output(tmp_path / f"out-{name}"), expected)  # (a list: named from the folder its items share)


def test_files_added_send_only_their_rows_changed_or_removed_ones_are_refused(tmp_path: Path, endpoint, capsys) -> None:
    ds = tmp_path / "ds"
    ids = write_part(ds / "part-00000.parquet", 10) + write_part(ds / "part-00002.parquet", 4)
    job = job_file(tmp_path, "ds", endpoint.base_url)
    assert cli(capsys, "run", str(job))[0] == 0
    assert endpoint.stats()["requests"] == 14
    plan = json.loads((tmp_path / ".pipeline" / "t" / "plan.json").read_text())
    assert cli(capsys, "run", str(job))[0] == 0  # nothing new: nothing sent, nothing planned again
    assert endpoint.stats()["requests"] == 14
    assert json.loads((tmp_path / ".pipeline" / "t" / "plan.json").read_text()) == plan

    ids += write_part(ds / "part-00001.parquet", 8)  # sorts between the others
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert endpoint.stats()["requests"] == 22, "only the new file's rows are sent"
    assert_answered(read_output(tmp_path / "out-t"), ids)
    # the earlier shards kept their indexes (and part files): the new file's shards come after them
    assert sorted(p.name for p in (tmp_path / "out-t").glob("part-*")) == [f"part-{i:06d}.parquet" for i in range(5)]

    write_part(ds / "part-00001.parquet", 8, tag="edited ")
    code, _, err = cli(capsys, "run", str(job))
    assert code == 2 and endpoint.stats()["requests"] == 22
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "part-00001.parquet changed since its rows were planned" in line and "--restart" in line
    (ds / "part-00001.parquet").unlink()
    code, _, err = cli(capsys, "run", str(job))
    assert code == 2 and "part-00001.parquet is gone since its rows were planned" in err
    write_part(ds / "part-00003.parquet", 2)
    code, _, err = cli(capsys, "run", str(job), "--restart")
    assert code == 0, err
    assert endpoint.stats()["requests"] == 22 + 16
    assert_answered(read_output(tmp_path / "out-t"), ids[:14] + ["part-00003.parquet:0", "part-00003.parquet:1"])


def test_rows_appended_to_one_file_of_many_send_only_those_rows(tmp_path: Path, endpoint, capsys) -> None:
    ds = tmp_path / "ds"
    write_part(ds / "a.csv", 5)
    ids = write_part(ds / "b.csv", 3)
    job = job_file(tmp_path, "ds", endpoint.base_url)
    assert cli(capsys, "run", str(job))[0] == 0
    ids = write_part(ds / "a.csv", 12) + ids  # rewritten with rows appended
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert endpoint.stats()["requests"] == 8 + 7
    assert_answered(read_output(tmp_path / "out-t"), ids)


def test_a_folder_of_mixed_or_no_known_files_is_one_clear_error(tmp_path: Path, endpoint, capsys) -> None:
    write_part(tmp_path / "mixed" / "a.csv", 2)
    write_part(tmp_path / "mixed" / "b.parquet", 2)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("x")
    for path, expected in [("mixed", "holds csv and parquet files; set [input] format"),
                           ("none", "holds no .csv, .jsonl, .parquet, .tar or image files"),
                           ("nowhere/*.csv", "holds no csv files")]:
        job = job_file(tmp_path, path, endpoint.base_url, name=path.split("/")[0])
        code, _, err = cli(capsys, "run", str(job))
        errors = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], err
    job = job_file(tmp_path, "mixed", endpoint.base_url, name="chosen", input={"format": "csv"})
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err  # a format named: only its files are read
    assert Counter(r["id"] for r in read_output(tmp_path / "out-chosen")) == Counter(["a.csv:0", "a.csv:1"])
    assert endpoint.stats()["requests"] == 2


def test_adding_a_file_from_another_folder_to_a_list_sends_only_its_rows(tmp_path: Path, endpoint, capsys) -> None:
    """Names (and so row ids `name:row`) are relative to the root the plan recorded: a cron job
    that appends this month's file to its list (`["data/2026-10/p.csv", "data/2026-10/q.csv"]` +
    `"data/2026-11/p.csv"`) keeps p.csv named p.csv (what the list's items share would move to
    data, renaming it 2026-10/p.csv and buying every row again); the added file is named by its way
    from that root."""
    write_part(tmp_path / "data" / "2026-10" / "p.csv", 5)
    write_part(tmp_path / "data" / "2026-10" / "q.csv", 5)
    write_part(tmp_path / "data" / "2026-11" / "p.csv", 4, tag="new ")
    one = job_file(tmp_path, ["data/2026-10/p.csv", "data/2026-10/q.csv"], endpoint.base_url)
    assert cli(capsys, "run", str(one))[0] == 0
    two = job_file(tmp_path, ["data/2026-10/p.csv", "data/2026-10/q.csv", "data/2026-11/p.csv"], endpoint.base_url)
    code, out, err = cli(capsys, "run", str(two))
    assert code == 0, err[-400:]
    assert endpoint.stats()["requests"] == 14, "only the added file's rows are sent"
    ids = [f"{name}:{i}" for name, n in (("p.csv", 5), ("q.csv", 5), ("../2026-11/p.csv", 4)) for i in range(n)]
    assert Counter(r["id"] for r in read_output(tmp_path / "out-t")) == Counter(ids)


def test_a_list_of_one_file_is_read(tmp_path: Path, endpoint, capsys) -> None:
    """`path = ["m.csv"]` (a list of one, as a script building the list makes it) is a file in a
    folder, not a folder ("could not read .../m.csv/. (Not a directory)" before)."""
    write_part(tmp_path / "m.csv", 3)
    code, _, err = cli(capsys, "run", str(job_file(tmp_path, ["m.csv"], endpoint.base_url)))
    assert code == 0, err[-300:]
    assert sorted(r["id"] for r in read_output(tmp_path / "out-t")) == ["m.csv:0", "m.csv:1", "m.csv:2"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_files_whose_columns_differ_are_refused_naming_both(tmp_path: Path, fmt: str) -> None:
    write_part(tmp_path / "ds" / f"a.{fmt}", 3)
    write_rows(tmp_path / "ds" / f"b.{fmt}", [{"image": "https://x/1.png", "caption": "c"}], fmt)
    with pytest.raises(JobError) as caught:
        plan_manifest(InputConfig(path=tmp_path / "ds"), 10)
    assert str(caught.value).startswith(f"[input] path: b.{fmt} has ") and f"a.{fmt}" in str(caught.value)
    assert "every file needs the same columns" in str(caught.value)


def test_a_damaged_parquet_part_stops_planning_in_one_line(tmp_path: Path) -> None:
    write_part(tmp_path / "ds" / "a.parquet", 3)
    pq.write_table(pa.table({"image": ["x" * 100] * 1000, "prompt": ["p"] * 1000}), tmp_path / "ds" / "b.parquet",
                   row_group_size=100)
    data = (tmp_path / "ds" / "b.parquet").read_bytes()
    (tmp_path / "ds" / "b.parquet").write_bytes(data[:2000] + b"\0" * 3000 + data[5000:])  # its pages overwritten
    with pytest.raises(JobError) as caught:
        plan_manifest(InputConfig(path=tmp_path / "ds"), 100)
    assert str(caught.value).startswith("[input] path: could not read ") and "b.parquet" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_dry_run_counts_rows_and_images_per_file(tmp_path: Path, endpoint, capsys) -> None:
    write_part(tmp_path / "ds" / "p0.jsonl", 4)
    write_part(tmp_path / "ds" / "p1.jsonl", 6)
    code, out, err = cli(capsys, "run", str(job_file(tmp_path, "ds", endpoint.base_url)), "--dry-run")
    assert code == 0, out + err
    assert "source: jsonl, 2 files; 10 rows, 10 image(s)" in out
    assert "  p0.jsonl: 4 rows, 4 image(s)" in out and "  p1.jsonl: 6 rows, 6 image(s)" in out
    assert endpoint.stats()["requests"] == 0


@pytest.mark.parametrize("ids", ["row numbers", "an id column"])
def test_a_file_removed_mid_run_makes_error_rows_or_waits_and_the_job_goes_on(tmp_path: Path, endpoint_factory,
                                                                              ids: str) -> None:
    ep = endpoint_factory(latency_ms=50)
    ds = tmp_path / "ds"
    first = write_part(ds / "a.csv", 120)
    for name, n in (("a.csv", 120), ("b.csv", 10)):
        rows = [{"id": f"{name}:{i}", "image": f"https://images.example/{name}/{i}.png", "prompt": f"Describe {name}:{i}"}
                for i in range(n)]
        write_rows(ds / name, rows, "csv")
    job = job_file(tmp_path, "ds", ep.base_url, run={"shard_rows": 30}, limits={"max_concurrency": 2},
                   input={"id_column": "id" if ids == "an id column" else None})
    proc = start_run(job, tmp_path / ".pipeline" / "t" / "commits.jsonl")
    (ds / "b.csv").unlink()  # b.csv's shard is opened after a.csv's 120 rows are queued: seconds from now
    _, err = proc.communicate(timeout=120)
    rows = read_output(tmp_path / "out-t")
    assert_answered([r for r in rows if r["id"].startswith("a.csv")], first)
    if ids == "row numbers":  # known without the file: error rows naming it, the job went on
        assert proc.returncode == 1, err
        gone = [r for r in rows if r["id"].startswith("b.csv")]
        assert len(gone) == 10 and all(r["error_kind"] == "input" and "b.csv cannot be read (FileNotFoundError" in r["error"]
                                       for r in gone)
    else:  # in the file: the shard waits for a later run, said once
        assert proc.returncode == 4 and "note: shard 4 is left for a later run" in err and "b.csv cannot be read" in err
        assert "10 rows have no result" in err and len(rows) == 120
    assert ep.stats()["requests"] == 120


# -- an old checkpoint ---------------------------------------------------------------------------


def test_a_tar_cut_while_its_shard_is_sent_leaves_that_shard_and_the_job_goes_on(tmp_path: Path,
                                                                                    endpoint_factory) -> None:
    """README (Input, unreadable rows): a file that cannot be read when its shard's turn comes is
    left for the next run and the job goes on. Image bytes are read again, 64 rows at a time, while
    the shard's rows are queued (engine/feed.py); a failure there (a tar cut, an S3 object replaced:
    s3fs's FileExpired, a dropped connection past s3fs's retries) leaves that shard's unqueued rows
    pending with the same one-line note, never a local failure stopping the run (exit 5 before)."""
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
    assert "note: shard 0 is left for a later run" in err and "internal error" not in err, err[-700:]
    assert len({r["id"] for r in rows}) == len(rows) and all(r["status"] == "ok" for r in rows)


def test_a_part_changed_after_planning_is_not_bought_as_planned(tmp_path: Path, endpoint_factory) -> None:
    """A part rewritten mid-run with as many rows (other prompts) was bought on its new content
    under the old plan, and the next run refused the job. Its shard's open compares the file's
    size and stamp with the plan: the shard waits (one note, exit 4), the other shards go on, and
    the next run's planning refuses the edit as it refuses any."""
    ds = tmp_path / "ds"
    write_part(ds / "a.parquet", 60)
    write_part(ds / "b.parquet", 10)
    ep = endpoint_factory(record=True, latency_ms=20)
    path = job_file(tmp_path, "ds", ep.base_url, run={"shard_rows": 30}, limits={"max_concurrency": 2})
    proc = start_run(path, tmp_path / ".pipeline" / "t" / "commits.jsonl")
    write_part(ds / "b.parquet", 10, tag="EDITED ")  # same rows, other prompts: a planned file rewritten
    _, err = proc.communicate(timeout=120)
    rows = {r["id"]: r for r in read_output(tmp_path / "out-t")}
    assert not [i for i in rows if i.startswith("b.parquet")], f"exit {proc.returncode}: b.parquet's rows bought"
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows.values())
    assert proc.returncode == 4 and "b.parquet changed since its rows were planned" in err, err[-600:]
    assert not any("EDITED" in (r.get("body") or "") for r in ep.requests())


@pytest.mark.parametrize("fmt", [*FORMATS, "tar"])
def test_a_file_rewritten_to_the_same_size_after_planning_is_not_read_as_planned(tmp_path: Path, fmt: str) -> None:
    """Byte ranges and row counts cannot tell a file rewritten to the same size: its stamp does."""
    import time

    from pipeline.io.manifest import Unreadable

    path = tmp_path / "ds" / f"m.{fmt}"
    write = (lambda tag: webdataset(path, 5, first=tag)) if fmt == "tar" else (lambda tag: write_part(path, 5, tag=f"v{tag} "))
    write(1)
    cfg = InputConfig(path=tmp_path / "ds", format="webdataset" if fmt == "tar" else fmt)
    plan = plan_manifest(cfg, 5)
    size = path.stat().st_size
    time.sleep(0.01)
    write(2)
    assert path.stat().st_size == size
    with pytest.raises(Unreadable) as caught:
        read_rows(cfg, plan, plan.shards[0])
    assert not caught.value.lasting and f"m.{fmt} changed since its rows were planned" in str(caught.value)


@pytest.mark.parametrize("touched", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_of_the_version_before_sources_killed_mid_run_resumes_every_row_once(
        tmp_path: Path, endpoint, capsys, fmt: str, touched: bool) -> None:
    """A checkpoint written by the code before sources (commit 2d5af7c: plan.json of version 1,
    made by tests/fixtures/v1_checkpoint/make.py), whose run was killed with SIGKILL after two
    shards were committed and two rows of the third journaled, resumed by today's code: the
    journaled rows are not bought again, the rest are, every row is in the output once with its
    row-number id. `touched`: the manifest's mtime is not the plan's (a copy, a checkout), so it is
    planned again and its shards' digests compared as version 1 computed them."""
    import shutil

    folder = tmp_path / fmt
    shutil.copytree(Path(__file__).parent / "fixtures" / "v1_checkpoint" / fmt, folder)
    ckpt = folder / ".pipeline" / "t"
    old = json.loads((ckpt / "plan.json").read_text())
    assert "files" not in old and "version" not in old and old["mtime_ns"], "the old layout, as it was written"
    if not touched:
        os.utime(folder / f"m.{fmt}", ns=(old["mtime_ns"], old["mtime_ns"]))
    owner = folder / "out" / "_pipeline_job.json"  # names its checkpoint by absolute path: where the copy is
    owner.write_text(json.dumps({**json.loads(owner.read_text()), "checkpoint": str(ckpt)}))
    job = folder / "job.toml"
    # today's endpoint; and no pacing at the default 60 requests a minute (12 s of sleeps, nothing tested)
    job.write_text("\n".join(f'base_url = "{endpoint.base_url}"' if line.startswith("base_url") else
                             f"{line}\nrequests_per_minute = 60000" if line == "[limits]" else line
                             for line in job.read_text().splitlines()) + "\n")
    journaled = len((ckpt / "journal" / "shard-000002.jsonl").read_text().splitlines())
    assert journaled == 2
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert endpoint.stats()["requests"] == 20 - 10 - journaled, "only the rows without an answer are bought"
    assert_answered(read_output(folder / "out"), [str(i) for i in range(20)], prefix=f"m.{fmt}:")
    assert cli(capsys, "run", str(job))[0] == 0 and endpoint.stats()["requests"] == 8  # done: nothing more

    data = [{"image": f"https://images.example/{i}.png", "prompt": f"Describe m.{fmt}:{i}"} for i in range(26)]
    if fmt == "parquet":
        write_rows(folder / f"m.{fmt}", data, fmt)  # rewritten with 6 rows appended
    else:  # 6 lines appended, written as the file's own
        with open(folder / f"m.{fmt}", "a") as f:
            f.writelines(f"{r['image']},{r['prompt']}\n" if fmt == "csv" else json.dumps(r) + "\n" for r in data[20:])
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0 and endpoint.stats()["requests"] == 14, err  # only the appended rows
    assert_answered(read_output(folder / "out"), [str(i) for i in range(26)], prefix=f"m.{fmt}:")
    assert json.loads((ckpt / "plan.json").read_text())["version"] == 2


# -- image folders -------------------------------------------------------------------------------


def _image(path: Path, colour: tuple[int, int, int], size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path.read_bytes()


def test_an_image_folder_sends_each_image_once_with_its_sidecar(tmp_path: Path, endpoint, capsys) -> None:
    imgs = tmp_path / "imgs"
    files = {"cats/a.jpg": _image(imgs / "cats" / "a.jpg", (200, 0, 0), 8),
             "cats/b.png": _image(imgs / "cats" / "b.png", (0, 200, 0), 9),
             "top.PNG": _image(imgs / "top.PNG", (0, 0, 200), 10)}
    (imgs / "cats" / "a.txt").write_text("a red square")
    (imgs / "README.md").write_text("not an image")
    path = job_file(tmp_path, "imgs", endpoint.base_url, input={"image_column": None, "prompt_column": None},
                    request={"prompt": "Describe {name} in '{folder}': {txt}"}, run={"shard_rows": 2})
    code, _, err = cli(capsys, "run", str(path))
    assert code == 0, err
    rows = {r["id"]: r for r in read_output(tmp_path / "out-t")}
    assert set(rows) == set(files)
    assert rows["cats/a.jpg"]["answer"].startswith("Answer to \"Describe a.jpg in 'cats': a red square\"")
    assert rows["top.PNG"]["answer"].startswith("Answer to \"Describe top.PNG in '': \"")
    sent = sent_images(endpoint)
    assert sent["Describe b.png in 'cats': "] == files["cats/b.png"], "the endpoint sees the image's own bytes"
    assert len(sent) == 3

    files["cats/c.webp"] = _image(imgs / "cats" / "c.webp", (9, 9, 9), 5)
    code, _, err = cli(capsys, "run", str(path))
    assert code == 0 and endpoint.stats()["requests"] == 4, err
    assert {r["id"] for r in read_output(tmp_path / "out-t")} == set(files)
    (imgs / "cats" / "a.txt").write_text("a blue square")  # a sidecar is part of its row
    code, _, err = cli(capsys, "run", str(path))
    assert code == 2 and "changed since its rows were planned" in err


def test_a_large_image_folder_plan_is_packed_and_reads_each_shard_from_an_index(tmp_path: Path) -> None:
    """An image folder's plan has one file a row: past PACK_FILES files plan.json holds them packed
    (a million images: 9.4 MB, not 106 MB), and a shard's images come from an index made once
    (not a scan of every file of the plan for each shard)."""
    from pipeline.io.ckpt_base import dumps as _json
    from pipeline.io.plan import PACK_FILES, load_plan_dict

    n = PACK_FILES + 300
    for i in range(n):
        path = tmp_path / "imgs" / f"d{i % 7}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8\xff" + bytes([i % 256]))
        if i % 5 == 0:
            path.with_suffix(".txt").write_text(f"caption {i}")
    cfg = InputConfig(path=tmp_path / "imgs", format="images")
    plan = plan_manifest(cfg, 250)
    data = _json(plan.to_dict())
    d = json.loads(data)
    assert set(d["files"]) == {"packed"} and len(data) < 40 * n, len(data)
    again = load_plan_dict(d)
    assert again == plan and again.files == plan.files
    seen: dict[Any, Any] = {}
    for shard in again.shards:
        rows = read_rows(cfg, again, shard)
        assert rows.ids == [f.name for f in again.files_of(shard.index) if f.rows == 1] and len(rows.ids) == shard.rows
        seen.update(zip(rows.ids, rows.table.column("txt").to_pylist()))
    assert len(seen) == n
    assert all(seen[f"d{i % 7}/{i:05d}.jpg"] == (f"caption {i}" if i % 5 == 0 else None) for i in range(n))


def test_an_image_folder_refuses_ids_that_repeat_or_may_be_missing(tmp_path: Path) -> None:
    """Ids are checked before anything is sent, as a manifest's are: a file name repeated in two
    folders, or a sidecar that one image lacks, made rows sharing an id or with none."""
    imgs = tmp_path / "imgs"
    for name in ("cats/001.jpg", "dogs/001.jpg", "dogs/002.jpg"):
        _image(imgs / name, (1, 2, 3), 8)
    (imgs / "cats" / "001.txt").write_text("a cat")
    with pytest.raises(JobError, match=r"1 id appears more than once \(cats/001.jpg, dogs/001.jpg: '001.jpg'\)"):
        plan_manifest(InputConfig(path=imgs, id_column="name"), 10)
    with pytest.raises(JobError, match=r"'txt' is read from sidecars, which may be missing or repeat"):
        plan_manifest(InputConfig(path=imgs, id_column="txt"), 10)
    (imgs / "dogs" / "001.jpg").rename(imgs / "dogs" / "003.jpg")
    plan = plan_manifest(InputConfig(path=imgs, id_column="name"), 10)
    assert read_rows(InputConfig(path=imgs, id_column="name"), plan, plan.shards[0]).ids == ["001.jpg", "002.jpg", "003.jpg"]


# -- WebDataset ----------------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + n, 8), (40 * n % 256, 90, 150)).save(buf, "JPEG")
    return buf.getvalue()


def webdataset(path: Path, samples: int, first: int = 0) -> dict[str, dict[str, bytes]]:
    """A tar shard as img2dataset writes it: per sample a jpg (or png), a txt and a json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    with tarfile.open(path, "w") as tar:
        for k in range(first, first + samples):
            key = f"{k:09d}"
            image = b"\xff\xd8\xff\xe0" + bytes([k % 256]) * (100 + k) if k % 3 else b"\x89PNG\r\n\x1a\n" + bytes(50 + k)
            fields = {"jpg" if k % 3 else "png": image, "txt": f"caption {k}".encode(),
                      "json": json.dumps({"k": k}).encode(), "meta.caption.txt": f"long {k}".encode()}
            for field, data in fields.items():
                _member(tar, f"{key}.{field}", data)
            out[key] = fields
    return out


def test_webdataset_ids_that_repeat_or_are_missing_are_refused_while_planning(tmp_path: Path) -> None:
    """As a manifest's: keys repeated in two tars, or a member the id column names missing from a
    sample, were rows sharing an id or with the id "None"."""
    webdataset(tmp_path / "a" / "shard-000.tar", 3)
    webdataset(tmp_path / "a" / "shard-001.tar", 3, 2)  # starts at key 2 again
    with pytest.raises(JobError, match=r"1 id appears more than once \(rows shard-000.tar:2 and shard-001.tar:0: '000000002'\)"):
        plan_manifest(InputConfig(path=tmp_path / "a", id_column="key"), 2)
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for key in ("k0", "k1", "k2"):
            _member(tar, f"{key}.jpg", b"\xff\xd8\xff\xe0" + bytes(10))
            if key != "k1":
                _member(tar, f"{key}.txt", f"id-{key}".encode())
    with pytest.raises(JobError, match=r"1 row has no 'txt' \(row 1\)"):
        plan_manifest(InputConfig(path=tmp_path / "b.tar", id_column="txt"), 2)
    plan = plan_manifest(InputConfig(path=tmp_path / "a" / "shard-000.tar", id_column="txt"), 2)
    _, ids, _ = _all_rows(InputConfig(path=tmp_path / "a" / "shard-000.tar", id_column="txt"), plan)
    assert ids == ["caption 0", "caption 1", "caption 2"]


def _all_rows(cfg: InputConfig, plan: Plan) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    rows, ids, errors = [], [], {}
    for shard in plan.shards:
        got = read_rows(cfg, plan, shard)
        assert got.table.num_rows == len(got.ids) == shard.rows
        rows += got.table.to_pylist()
        ids += got.ids
        errors.update({got.ids[i]: e for i, e in got.errors.items()})
    return rows, ids, errors


def test_webdataset_samples_reach_the_rows_with_their_own_bytes(tmp_path: Path) -> None:
    shards = {**webdataset(tmp_path / "wds" / "shard-000.tar", 11), **webdataset(tmp_path / "wds" / "shard-001.tar", 4, 11)}
    cfg = InputConfig(path=tmp_path / "wds" / "*.tar")
    assert cfg.format == "webdataset" and cfg.image_column == "image"
    plan = plan_manifest(cfg, 4)
    assert plan.columns == ["key", "image", "json", "meta_caption_txt", "txt"]
    assert [s.rows for s in plan.shards] == [4, 4, 3, 4]
    rows, ids, errors = _all_rows(cfg, plan)
    assert not errors
    assert ids == [f"shard-00{0 if k < 11 else 1}.tar:{k:09d}" for k in range(15)]
    for row in rows:
        fields = shards[row["key"]]
        assert row["image"] == fields.get("jpg", fields.get("png")), "the sample's own image bytes"
        assert row["txt"] == fields["txt"].decode() and json.loads(row["json"]) == json.loads(fields["json"])
        assert row["meta_caption_txt"] == fields["meta.caption.txt"].decode()
    batches = list(shard_batches(cfg, plan, plan.shards[1], ["image"], 3))
    assert [b.num_rows for b in batches] == [3, 1]
    assert batches[0].column("image").to_pylist() == [r["image"] for r in rows[4:7]]


def sent_images(endpoint: Any) -> dict[str, bytes]:
    """What the endpoint was shown: each request's prompt -> its image's bytes (from the data URI)."""
    out = {}
    for req in endpoint.requests():
        parts = json.loads(req["body"])["messages"][-1]["content"]
        out[parts[0]["text"]] = base64.b64decode(parts[1]["image_url"]["url"].split(",", 1)[1])
    return out


def jpeg_tar(path: Path, keys: list[str]) -> dict[str, bytes]:
    """A tar of real JPEGs (one colour each) with a caption per sample naming its key."""
    images = {}
    with tarfile.open(path, "w") as tar:
        for n, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (8 + n, 8), (30 * n % 256, 90, 150)).save(buf, "JPEG")
            images[key] = buf.getvalue()
            _member(tar, f"{key}.jpg", images[key])
            _member(tar, f"{key}.txt", f"caption of {key}\n".encode())
    return images


def test_a_webdataset_run_shows_the_model_each_samples_own_image(tmp_path: Path, endpoint, capsys) -> None:
    images = jpeg_tar(tmp_path / "shard-000.tar", [f"s{k:03d}" for k in range(5)])
    path = job_file(tmp_path, "shard-000.tar", endpoint.base_url, input={"image_column": None, "prompt_column": None},
                    request={"prompt": "Is this {txt}?"}, run={"shard_rows": 2})
    code, _, err = cli(capsys, "run", str(path))
    assert code == 0, err
    sent = sent_images(endpoint)
    assert sent == {f"Is this caption of {key}?": data for key, data in images.items()}
    rows = read_output(tmp_path / "out-t")
    assert sorted(r["id"] for r in rows) == [f"shard-000.tar:{k}" for k in images]
    assert all(r["image"] == "sha256:" + hashlib.sha256(images[r["key"]]).hexdigest() for r in rows)  # no bytes
    assert cli(capsys, "run", str(path))[0] == 0 and endpoint.stats()["requests"] == 5


def test_a_damaged_tar_keeps_its_samples_and_says_where_in_one_error_row(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    webdataset(path, 6)
    data = path.read_bytes()
    cut = data.index(b"000000004.jpg")  # the header of sample 4's first member
    path.write_bytes(data[: cut + 300])  # its header cut short
    cfg = InputConfig(path=path)
    plan = plan_manifest(cfg, 10)
    rows, ids, errors = _all_rows(cfg, plan)
    assert ids[:4] == [f"shard.tar:{k:09d}" for k in range(4)] and ids[4] == "shard.tar:@damaged"
    assert list(errors) == ["shard.tar:@damaged"] and "is damaged after sample 4" in errors["shard.tar:@damaged"]
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as tar:
        _member(tar, "k1.jpg", b"\xff\xd8\xff" + b"1" * 10)
        _member(tar, "k1.txt", b"x" * (2 << 20))
    plan = plan_manifest(InputConfig(path=big), 10)
    _, ids, errors = _all_rows(InputConfig(path=big), plan)
    assert ids == ["big.tar:k1"] and "over 1 MiB" in errors["big.tar:k1"]


# -- the engine holds no shard of bytes ----------------------------------------------------------


def test_a_tar_whose_members_of_one_key_are_apart_is_refused_naming_the_fix(tmp_path: Path, endpoint, capsys) -> None:
    """`tar cf shard.tar dir/` stores members in readdir order, so a sample's .jpg and .txt need
    not be neighbours. Read member by member, each key would be two rows with one id (both paid,
    the output holding the id twice); planning refuses the tar instead, naming the key and the fix."""
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for key in ["a", "b", "c"]:
            _member(tar, f"{key}.jpg", b"\xff\xd8\xff\xe0" + key.encode() * 50)
        for key in ["a", "b", "c"]:
            _member(tar, f"{key}.txt", f"caption of {key}\n".encode())
    path = job_file(tmp_path, "shard.tar", endpoint.base_url, input={"image_column": None, "prompt_column": None},
                    request={"prompt": "Is this {txt}?"}, run={"shard_rows": 10})
    code, _, err = cli(capsys, "run", str(path))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "sample 'a'" in errors[0] and "tar --sort=name" in errors[0], errors[0]
    assert endpoint.stats()["requests"] == 0 and read_output(tmp_path / "out-t") == []


def test_a_binary_column_is_held_as_references_and_its_bytes_streamed_a_batch_at_a_time(tmp_path: Path) -> None:
    import asyncio

    from pipeline.config import parse_job
    from pipeline.engine.feed import Feed

    images = [bytes([i]) * 1000 for i in range(40)]
    pq.write_table(pa.table({"image": images, "prompt": [f"p{i}" for i in range(40)]}), tmp_path / "m.parquet",
                   row_group_size=13)
    job = parse_job({"name": "t", "input": {"path": "m.parquet", "image_column": "image", "prompt_column": "prompt"},
                     "endpoint": {"base_url": "http://x/v1", "model": "m"}, "output": {"path": "out"}},
                    tmp_path / "t.toml", require_key=False)
    plan = plan_manifest(job.input, 30)
    feed = Feed(job, plan, ["image", "prompt"])
    assert feed.streamed == ["image"] and feed.held == ["prompt"]

    refs = [f"sha256:{hashlib.sha256(images[i]).hexdigest()}" for i in range(30)]

    async def cells(refer: bool) -> list[tuple[int, dict[str, Any]]]:
        rows = await feed.open(plan.shards[0])
        assert rows.table.column("image").null_count == 30  # no bytes read at the open: made as they are sent
        got = [c async for batch in feed.cells(plan.shards[0], rows.table, [1, 2, 17, 29], refer=refer) for c in batch]
        held = feed.filled(plan.shards[0], rows.table).column("image").to_pylist()  # what the part file gets
        assert held == refs, "references, not bytes: from the producer's pass, else read for the part file"
        return got

    for refer in (True, False):
        got = asyncio.run(cells(refer))
        assert [(i, c["image"], c["prompt"]) for i, c in got] == [(i, images[i], f"p{i}") for i in (1, 2, 17, 29)]


def test_a_feed_cancelled_mid_read_ends_cancelled(tmp_path: Path) -> None:
    """A stop (Ctrl-C, the breaker, the budget) cancels the producer, perhaps inside Feed.cells'
    read of a batch in a worker thread. Closing the stream while that thread still runs the
    generator raised "ValueError: generator already executing" over the CancelledError, and the
    clean stop became "stopped by a local failure ... internal error" (exit 5 wins). The feed waits
    for the read in flight, then closes: the cancel is what it ends with."""
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


# -- any set of files, any shards ----------------------------------------------------------------


@st.composite
def file_sets(draw: st.DrawFn) -> tuple[str, list[tuple[str, int]], int, str]:
    fmt = draw(st.sampled_from(FORMATS))
    names = draw(st.lists(st.sampled_from([f"{d}p{i}" for d in ("", "a/", "a/b/") for i in range(4)]),
                          min_size=1, max_size=5, unique=True))
    how = draw(st.sampled_from(["folder", "glob", "list"]))
    return fmt, [(n, draw(st.integers(0, 9))) for n in names], draw(st.integers(1, 6)), how


def _rows_of(cfg: InputConfig, plan: Plan) -> list[tuple[str, str]]:
    got = []
    for shard in plan.shards:
        assert 0 < shard.rows <= plan.shard_rows
        rows = read_rows(cfg, plan, shard)
        got += list(zip(rows.ids, rows.table.column("prompt").to_pylist()))
    return got


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=file_sets(), more=st.integers(0, 5))
def test_any_files_in_any_shards_give_every_row_once_with_stable_ids(tmp_path_factory: Any, spec: Any, more: int) -> None:
    """A folder, a glob or a list of files: every row once, ids naming file and row; files added
    (to a list: from another folder, which widens what its items share) keep every earlier id."""
    from pipeline.io.manifest import current_plan

    fmt, files, shard_rows, how = spec
    top = tmp_path_factory.mktemp("set")
    root = top / "in"
    paths = [root / f"{name}.{fmt}" for name, _ in files]
    base = root if how != "list" else Path(os.path.commonpath([p.parent for p in paths]))
    expected = []
    for path, (_, rows) in sorted(zip(paths, files)):
        name = path.relative_to(base).as_posix()
        write_part(path, rows, name=name)
        expected += [(f"{name}:{i}", f"Describe {name}:{i}") for i in range(rows)]
    item: Any = {"folder": root, "glob": str(root / "**" / f"*.{fmt}"), "list": tuple(paths)}[how]
    cfg = InputConfig(path=item, format=fmt)
    plan = plan_manifest(cfg, shard_rows)
    got = _rows_of(cfg, plan)
    assert got == expected, "every row once, in sorted path order, its id naming file and row"
    assert plan_manifest(cfg, shard_rows) == plan, "planned again: the same shards, ids and digests"

    added = (root / "zz" if how != "list" else top / "other") / f"new.{fmt}"  # a list's: outside its root
    new = os.path.relpath(added, base)
    write_part(added, more, name=new)
    if how == "list":
        cfg = InputConfig(path=(*item, added), format=fmt)
    again, changed = current_plan(cfg, shard_rows, plan)
    assert changed
    kept = {s.index: s for s in again.shards}
    assert all(kept[s.index] == s for s in plan.shards)
    assert again.total_rows == plan.total_rows + more
    now = _rows_of(cfg, again)
    assert sorted(now) == sorted(expected + [(f"{new}:{i}", f"Describe {new}:{i}") for i in range(more)])
