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


def _as_version_1(plan_path: Path, manifest: Path) -> None:
    """plan.json as the version before sources wrote it: the one file's size, mtime and header at
    the top, no files, shards without their file."""
    from pipeline.io.sources.parquet import table_digest

    d = json.loads(plan_path.read_text())
    info = d.pop("files")[0]
    schema = d.pop("schema")
    for key in ("single", "version"):
        d.pop(key)
    d["size"], d["mtime_ns"] = manifest.stat().st_size, manifest.stat().st_mtime_ns
    d["header"] = info[4]["header"] if d["format"] == "csv" else schema if d["format"] == "jsonl" else ""
    for s in d["shards"]:
        del s["file"]
        if d["format"] == "parquet":  # version 1 digested a whole shard at once
            s["digest"] = table_digest(pq.ParquetFile(manifest).read().slice(s["start"], s["end"] - s["start"]))
    plan_path.write_text(json.dumps(d))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_of_the_version_before_sources_resumes_without_paying_twice(
        tmp_path: Path, endpoint, capsys, fmt: str) -> None:
    manifest = tmp_path / f"m.{fmt}"
    write_part(manifest, 20)
    job = job_file(tmp_path, manifest.name, endpoint.base_url)
    assert cli(capsys, "run", str(job))[0] == 0
    _as_version_1(tmp_path / ".pipeline" / "t" / "plan.json", manifest)
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0 and endpoint.stats()["requests"] == 20, err  # the old plan is used as it is
    rows = read_output(tmp_path / "out-t")
    assert Counter(r["id"] for r in rows) == Counter(str(i) for i in range(20))  # row numbers, as before

    data = [{"image": f"https://images.example/{manifest.name}/{i}.png", "prompt": f"Describe {manifest.name}:{i}"} for i in range(26)]
    write_rows(manifest, data, fmt)  # rewritten with 6 rows appended
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert endpoint.stats()["requests"] == 26, "only the appended rows are sent"
    assert Counter(r["id"] for r in read_output(tmp_path / "out-t")) == Counter(str(i) for i in range(26))
    assert json.loads((tmp_path / ".pipeline" / "t" / "plan.json").read_text())["version"] == 2


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


# -- WebDataset ----------------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


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

    async def cells() -> list[tuple[int, dict[str, Any]]]:
        rows = await feed.open(plan.shards[0])
        held = rows.table.column("image").to_pylist()  # what the part file gets: references, not bytes
        assert held == [f"sha256:{hashlib.sha256(images[i]).hexdigest()}" for i in range(30)]
        return [c async for batch in feed.cells(plan.shards[0], rows.table, [1, 2, 17, 29]) for c in batch]

    got = asyncio.run(cells())
    assert [(i, c["image"], c["prompt"]) for i, c in got] == [(i, images[i], f"p{i}") for i in (1, 2, 17, 29)]


# -- any set of files, any shards ----------------------------------------------------------------


@st.composite
def file_sets(draw: st.DrawFn) -> tuple[str, list[tuple[str, int]], int]:
    fmt = draw(st.sampled_from(FORMATS))
    names = draw(st.lists(st.sampled_from([f"{d}p{i}" for d in ("", "a/", "a/b/") for i in range(4)]),
                          min_size=1, max_size=5, unique=True))
    return fmt, [(n, draw(st.integers(0, 9))) for n in names], draw(st.integers(1, 6))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=file_sets(), more=st.integers(0, 5))
def test_any_files_in_any_shards_give_every_row_once_with_stable_ids(tmp_path_factory: Any, spec: Any, more: int) -> None:
    fmt, files, shard_rows = spec
    root = tmp_path_factory.mktemp("set")
    expected = []
    for name, rows in sorted(files, key=lambda f: f[0] + f".{fmt}"):
        write_part(root / f"{name}.{fmt}", rows, name=f"{name}.{fmt}")
        expected += [(f"{name}.{fmt}:{i}", f"Describe {name}.{fmt}:{i}") for i in range(rows)]
    cfg = InputConfig(path=root, format=fmt)
    plan = plan_manifest(cfg, shard_rows)
    got = []
    for shard in plan.shards:
        assert 0 < shard.rows <= shard_rows
        rows = read_rows(cfg, plan, shard)
        got += list(zip(rows.ids, rows.table.column("prompt").to_pylist()))
    assert got == expected, "every row once, in sorted path order, its id naming file and row"
    assert plan_manifest(cfg, shard_rows) == plan, "planned again: the same shards, ids and digests"

    write_part(root / "zz" / f"new.{fmt}", more)  # a file added: earlier shards keep index and rows
    from pipeline.io.manifest import current_plan

    again, changed = current_plan(cfg, shard_rows, plan)
    assert changed
    kept = {s.index: s for s in again.shards}
    assert all(kept[s.index] == s for s in plan.shards)
    assert again.total_rows == plan.total_rows + more
