"""Parts written by an earlier version are brought to the current columns (issue 25): a folder whose
older parts lack `finished_at`, the usage details and `from_cache`, and hold image bytes where the
output now holds references, reads whole in pandas, DuckDB (`read_parquet('folder/*.parquet')`,
no union_by_name) and pyarrow.dataset once a run has written beside them; values are kept,
digests and commit records follow, and a run killed halfway through is resumed without buying a
row again. The old parts are real files: the run's own parts rewritten in the layout of the
version before those columns (their columns dropped, the image bytes put back), with the commit
records that version wrote (no layout; its size, digest and ETag)."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from conftest import S3, job_dict, run_cli, write_job

from pipeline.io.durable import bytes_digest
from pipeline.records import result_schema

ADDED = ("finished_at", "cached_tokens", "reasoning_tokens", "image_tokens", "audio_tokens", "from_cache")
FIRST, MORE = 30, 15  # rows of the old run (three shards of 10), rows added after the upgrade


def _image(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (8, 8), random.Random(i).randbytes(8 * 8 * 3)).save(buf, "PNG")
    return buf.getvalue()


def _manifest(folder: Path, name: str, rows: range) -> dict[str, bytes]:
    folder.mkdir(exist_ok=True)
    images = {f"r{i:03d}": _image(i) for i in rows}
    pq.write_table(pa.table({"id": list(images), "prompt": [f"Describe {k}" for k in images],
                             "image": pa.array(list(images.values()), pa.binary())}), folder / name)
    return images


class Parts:
    """The output's part files, local or on S3: read, write, the facts a commit record keeps."""

    def __init__(self, out: str, fs: Any = None) -> None:
        self.out, self.fs = out, fs

    def names(self) -> list[str]:
        found = self.fs.ls(self.out) if self.fs else [str(p) for p in Path(self.out).iterdir()]
        return sorted(p.rsplit("/", 1)[-1] for p in found if p.rsplit("/", 1)[-1].startswith("part-"))

    def read(self, name: str) -> pa.Table:
        return pq.read_table(f"{self.out}/{name}", filesystem=self.fs)

    def write(self, name: str, table: pa.Table) -> dict[str, Any]:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        if self.fs is None:
            Path(self.out, name).write_bytes(data)
            return {"size": len(data), "part_digest": bytes_digest(data)}
        self.fs.pipe_file(f"{self.out}/{name}", data)
        etag = self.fs.info(f"{self.out}/{name}", refresh=True)["ETag"].strip('"')
        return {"size": len(data), "part_digest": bytes_digest(data), "etag": etag}


def _downgrade(parts: Parts, commits: Path, images: dict[str, bytes]) -> None:
    """Make the output what the version before the added columns and references wrote."""
    assert set(ADDED) <= set(result_schema().names)
    records = [json.loads(line) for line in commits.read_text().splitlines()]
    old = []
    for rec in records:
        table = parts.read(rec["file"]).drop_columns(list(ADDED))
        table = table.set_column(table.schema.get_field_index("image"), "image",
                                 pa.array([images[i] for i in table.column("id").to_pylist()], pa.binary()))
        rec = {k: v for k, v in rec.items() if k not in ("layout", "etag")}
        old.append({**rec, **parts.write(rec["file"], table)})
    commits.write_text("".join(json.dumps(r) + "\n" for r in old))


def _read_every_way(folder: str, fs: Any, tmp_path: Path) -> dict[str, tuple[list[str], int]]:
    """(columns, rows) as pandas, DuckDB without union_by_name and pyarrow.dataset read the folder."""
    import duckdb
    import pandas as pd

    if fs is not None:  # DuckDB reads a local copy (its httpfs extension is not installed here)
        local = tmp_path / "copy"
        fs.get(folder + "/", str(local), recursive=True)
        folder, fs = str(local), None
    frame = pd.read_parquet(folder)
    query = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/*.parquet')")
    assert query is not None
    duck = query.arrow().read_all()
    data = ds.dataset(folder, format="parquet").to_table()
    return {"pandas": (list(frame.columns), len(frame)), "duckdb": (duck.column_names, duck.num_rows),
            "pyarrow.dataset": (data.column_names, data.num_rows)}


def _scenario(tmp_path: Path, endpoint_factory: Any, out: str, fs: Any, env: dict[str, str],
              between: Callable[[], None] = lambda: None, crash: str | None = None) -> None:
    ep = endpoint_factory()
    manifest = tmp_path / "m"
    images = _manifest(manifest, "a.parquet", range(FIRST))
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "unused", run={"shard_rows": 10},
                                                    output={"path": out}))
    assert run_cli("run", str(job), env=env).returncode == 0
    parts = Parts(out.removeprefix("s3://"), fs)
    commits = tmp_path / ".pipeline" / "t" / "commits.jsonl"
    before = {name: parts.read(name) for name in parts.names()}
    _downgrade(parts, commits, images)
    assert parts.read("part-000000.parquet").schema.field("image").type == pa.binary()
    if crash is not None:  # killed while upgrading: one part rewritten, its record not written
        r = run_cli("run", str(job), env={**env, "PIPELINE_CRASH_AT": crash})
        assert r.returncode == 99, r.stderr
        between()
    images.update(_manifest(manifest, "b.parquet", range(FIRST, FIRST + MORE)))  # new rows: new parts beside the old
    sent = ep.stats()["requests"]
    r = run_cli("run", str(job), env=env)
    assert r.returncode == 0, r.stderr
    assert ep.stats()["requests"] - sent == MORE  # nothing bought again
    assert "does not match its commit record" not in r.stderr
    columns = [c for c in Parts(out.removeprefix("s3://"), fs).read("part-000003.parquet").column_names]
    assert set(ADDED) <= set(columns)
    for how, (names, rows) in _read_every_way(out.removeprefix("s3://"), fs, tmp_path).items():
        assert (names, rows) == (columns, FIRST + MORE), how
    for name, was in before.items():  # the old parts' values are all there; the added columns null
        now = parts.read(name)
        assert now.schema.remove_metadata() == was.schema.remove_metadata()
        for col in was.column_names:
            expected = [None] * was.num_rows if col in ADDED else was.column(col).to_pylist()
            assert now.column(col).to_pylist() == expected, (name, col)
    again = run_cli("run", str(job), env=env)  # the records match the rewritten parts: nothing to do
    assert again.returncode == 0 and "does not match" not in again.stderr and "earlier version" not in again.stderr
    latest = {}
    for line in commits.read_text().splitlines():
        rec = json.loads(line)
        latest[rec["shard"]] = rec
    assert len({rec["layout"] for rec in latest.values()}) == 1 and len(latest) == 5


def test_old_parts_in_a_local_folder_get_the_new_columns(tmp_path: Path, endpoint_factory: Any) -> None:
    _scenario(tmp_path, endpoint_factory, str(tmp_path / "out"), None, {})


def test_old_parts_in_a_bucket_get_the_new_columns(tmp_path: Path, endpoint_factory: Any, s3: S3) -> None:
    bucket = s3.new_bucket()
    _scenario(tmp_path, endpoint_factory, f"s3://{bucket}/out", s3.fs(), s3.env())


def test_a_run_killed_while_upgrading_resumes_without_buying_anything_again(tmp_path: Path, endpoint_factory: Any) -> None:
    """Killed between a part's rewrite and its record, with the journal then lost too: the part is
    known as its record's part upgraded, not taken for damaged (its 10 rows would be bought again)."""
    journal = tmp_path / ".pipeline" / "t" / "journal"
    _scenario(tmp_path, endpoint_factory, str(tmp_path / "out"), None, {},
              between=lambda: shutil.rmtree(journal), crash="after_upgrade:2")

