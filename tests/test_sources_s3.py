"""Sources in a bucket (issue 23): a real S3 API (moto's server, conftest's `s3`) over HTTP, the
credentials in the environment as a user sets them (or in `[input] storage_options`).

A bucket folder of Parquet parts and a bucket manifest run, resume sending nothing, send only an
added file's rows and refuse a changed one; a `pipeline run` killed with SIGKILL mid-run over a
bucket source resumes with every row exactly once; a bucket prefix of images and WebDataset
shards in a bucket become rows holding the object's URL or the sample's own bytes; a missing
bucket, refused credentials (a second moto server that checks them) and an endpoint that does
not answer stop planning with one line, no secret in it.
"""

from __future__ import annotations

import io
import json
import signal
import socket
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from conftest import S3, job_dict, read_output, start_moto, start_run, write_job
from test_sources import assert_answered, cli, jpeg_tar, sent_images, webdataset

import pipeline
from pipeline.config import InputConfig
from pipeline.io.manifest import plan_manifest, read_rows


@pytest.fixture
def aws(s3: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


def put_part(aws: S3, key: str, rows: int, tag: str = "", name: str | None = None) -> list[str]:
    """A Parquet part at s3://key whose prompts name each row by its id (`name:row`)."""
    name = name or key.rsplit("/", 1)[-1]
    table = pa.table({"image": [f"https://images.example/{name}/{i}.png" for i in range(rows)],
                      "prompt": [f"Describe {tag}{name}:{i}" for i in range(rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=5)
    aws.fs().pipe(key, buf.getvalue())
    return [f"{name}:{i}" for i in range(rows)]


def job_file(tmp_path: Path, path: Any, base_url: str, name: str = "t", **over: Any) -> Path:
    job = job_dict(tmp_path / "unused", base_url, tmp_path / f"out-{name}", name=name,
                   input={"id_column": None, **over.pop("input", {})}, run={"shard_rows": 6, **over.pop("run", {})},
                   **over)
    job["input"]["path"] = path
    return write_job(tmp_path / f"{name}.toml", job)


def test_a_bucket_folder_of_parts_runs_resumes_and_takes_added_files(tmp_path: Path, endpoint, aws: S3, capsys) -> None:
    bucket = aws.new_bucket()
    ids = put_part(aws, f"{bucket}/ds/part-00000.parquet", 8) + put_part(aws, f"{bucket}/ds/part-00002.parquet", 5)
    aws.fs().pipe(f"{bucket}/ds/_SUCCESS", b"")
    job = job_file(tmp_path, f"s3://{bucket}/ds/", endpoint.base_url)  # the format found by listing
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert_answered(read_output(tmp_path / "out-t"), ids)
    assert cli(capsys, "run", str(job))[0] == 0 and endpoint.stats()["requests"] == 13  # a rerun sends nothing

    ids += put_part(aws, f"{bucket}/ds/part-00001.parquet", 4)
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0 and endpoint.stats()["requests"] == 17, err  # only the added file's rows
    assert_answered(read_output(tmp_path / "out-t"), ids)

    put_part(aws, f"{bucket}/ds/part-00001.parquet", 4, tag="edited ")
    code, _, err = cli(capsys, "run", str(job))
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and endpoint.stats()["requests"] == 17
    assert f"s3://{bucket}/ds/part-00001.parquet changed since its rows were planned" in errors[0]


def test_a_bucket_manifest_keeps_row_number_ids_and_the_api_takes_a_url(tmp_path: Path, endpoint, aws: S3, capsys) -> None:
    bucket = aws.new_bucket()
    rows = [{"image": f"https://images.example/{i}.png", "prompt": f"Describe {i}"} for i in range(9)]
    aws.fs().pipe(f"{bucket}/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    job = job_file(tmp_path, f"s3://{bucket}/m.jsonl", endpoint.base_url)
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert_answered(read_output(tmp_path / "out-t"), [str(i) for i in range(9)])  # one file: row numbers, as before

    ids = put_part(aws, f"{bucket}/ds/a.parquet", 3) + put_part(aws, f"{bucket}/ds/b.parquet", 2)
    api = job_dict(tmp_path / "unused", endpoint.base_url, tmp_path / "out-api", name="api", input={"id_column": None})
    del api["input"]["path"]
    res = pipeline.run(api, manifest=f"s3://{bucket}/ds/*.parquet", progress=False)
    assert (res.exit_code, res.ok, res.rows) == (0, 5, 5)
    assert_answered(res.to_arrow().to_pylist(), ids)


def test_kill_9_mid_run_over_a_bucket_source_then_resume_every_row_once(tmp_path: Path, endpoint_factory, aws: S3,
                                                                         capsys) -> None:
    ep = endpoint_factory(latency_ms=40)
    bucket = aws.new_bucket()
    ids = []
    for k in range(4):
        ids += put_part(aws, f"{bucket}/ds/part-{k:05d}.parquet", 60)
    job = job_file(tmp_path, f"s3://{bucket}/ds/*.parquet", ep.base_url, limits={"max_concurrency": 4},
                   run={"shard_rows": 25})
    proc = start_run(job, tmp_path / ".pipeline" / "t" / "commits.jsonl")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(read_output(tmp_path / "out-t")) < len(ids), "the kill did not land mid-job"
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert_answered(read_output(tmp_path / "out-t"), ids)
    extra = sum(c - 1 for c in ep.stats()["per_row"].values())
    assert extra <= 4, f"{extra} rows bought twice; only the killed run's 4 in flight may be"


def test_a_bucket_prefix_of_images_and_its_webdataset_shards_run_showing_each_image(tmp_path: Path, endpoint, aws: S3,
                                                                                      capsys) -> None:
    bucket = aws.new_bucket()
    photos = {}
    for n, name in enumerate(["a/1.jpg", "a/2.png", "b/3.webp"]):
        buf = io.BytesIO()
        Image.new("RGB", (6 + n, 6), (80 * n, 10, 10)).save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1]])
        photos[name] = buf.getvalue()
        aws.fs().pipe(f"{bucket}/photos/{name}", photos[name])
    job = job_file(tmp_path, f"s3://{bucket}/photos/", endpoint.base_url, name="photos",
                   input={"format": "images", "image_column": None, "prompt_column": None}, request={"prompt": "Describe {path}"},
                   images={"image_mode": "inline"})
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err  # the images are in the manifest's own bucket folder: allowed without more
    assert sent_images(endpoint) == {f"Describe {name}": data for name, data in photos.items()}
    assert {r["id"]: r["image"] for r in read_output(tmp_path / "out-photos")} == {
        name: f"s3://{bucket}/photos/{name}" for name in photos}

    tar = tmp_path / "shard-000.tar"
    images = jpeg_tar(tar, ["k1", "k2", "k3"])
    aws.fs().put_file(str(tar), f"{bucket}/wds/shard-000.tar")
    endpoint.reset()
    job = job_file(tmp_path, f"s3://{bucket}/wds/*.tar", endpoint.base_url, name="wds",
                   input={"image_column": None, "prompt_column": None}, request={"prompt": "Is this {txt}?"})
    code, _, err = cli(capsys, "run", str(job))
    assert code == 0, err
    assert sent_images(endpoint) == {f"Is this caption of {k}?": data for k, data in images.items()}


def test_a_bucket_prefix_of_images_is_a_row_per_image(tmp_path: Path, aws: S3) -> None:
    bucket = aws.new_bucket()
    fs = aws.fs()
    for name in ("a/1.jpg", "a/2.PNG", "b/c/3.webp"):
        fs.pipe(f"{bucket}/photos/{name}", b"\xff\xd8\xff" + name.encode())
    fs.pipe(f"{bucket}/photos/a/1.txt", b"the first")
    fs.pipe(f"{bucket}/photos/notes.csv", b"x\n1\n")  # a format named: other files are left out
    cfg = InputConfig(path=f"s3://{bucket}/photos/", format="images")
    plan = plan_manifest(cfg, 2)
    rows = [r for s in plan.shards for r in read_rows(cfg, plan, s).table.to_pylist()]
    assert [(r["path"], r["image"], r["txt"]) for r in rows] == [
        ("a/1.jpg", f"s3://{bucket}/photos/a/1.jpg", "the first"), ("a/2.PNG", f"s3://{bucket}/photos/a/2.PNG", None),
        ("b/c/3.webp", f"s3://{bucket}/photos/b/c/3.webp", None)]
    assert [r["folder"] for r in rows] == ["a", "a", "b/c"]


def test_webdataset_shards_in_a_bucket_stream_each_sample_with_its_bytes(tmp_path: Path, aws: S3) -> None:
    bucket = aws.new_bucket()
    samples = {}
    for k in range(3):
        local = tmp_path / f"shard-{k:03d}.tar"
        samples.update(webdataset(local, 7, first=7 * k))
        aws.fs().put_file(str(local), f"{bucket}/wds/{local.name}")
    cfg = InputConfig(path=f"s3://{bucket}/wds/shard-{{000..002}}.tar".replace("{000..002}", "*"))
    plan = plan_manifest(cfg, 5)
    got = {}
    for shard in plan.shards:
        rows = read_rows(cfg, plan, shard)
        got.update({i: r for i, r in zip(rows.ids, rows.table.to_pylist())})
    assert list(got) == [f"shard-{k // 7:03d}.tar:{k:09d}" for k in range(21)]
    for row in got.values():
        fields = samples[row["key"]]
        assert row["image"] == fields.get("jpg", fields.get("png")) and row["txt"] == fields["txt"].decode()


# -- storage problems at planning ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checked_s3() -> Iterator[str]:
    """A second moto server that checks credentials (none is known to it: every key is refused)."""
    pytest.importorskip("moto.server")
    url, proc = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    proc.terminate()
    proc.wait(10)


def test_storage_problems_at_planning_are_one_line_without_secrets(tmp_path: Path, endpoint, aws: S3, checked_s3: str,
                                                                   capsys) -> None:
    bucket = aws.new_bucket()
    put_part(aws, f"{bucket}/ds/a.parquet", 2)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    secret = "s3cr3t-0123456789-do-not-show"
    cases = [
        (f"s3://no-such-bucket-{bucket}/ds/", {}, "does not exist"),
        (f"s3://{bucket}/missing/", {}, f"s3://{bucket}/missing not found"),
        (f"s3://{bucket}/ds/", {"key": "AKIAREFUSED", "secret": secret, "endpoint_url": checked_s3},
         "could not look up"),
        (f"s3://{bucket}/ds/", {"key": "AKIAX", "secret": secret, "endpoint_url": nowhere,
                                "config_kwargs": {"retries": {"max_attempts": 1}}}, "Could not connect"),
    ]
    for i, (path, options, expected) in enumerate(cases):
        job = job_file(tmp_path, path, endpoint.base_url, name=f"j{i}", input={"format": "parquet", "storage_options": options})
        code, out, err = cli(capsys, "run", str(job))
        errors = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], err
        assert secret not in out + err and not any(secret in p.read_text(errors="replace")
                                                   for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".toml")
    assert endpoint.stats()["requests"] == 0
    assert read_output(tmp_path / "out-j0") == []  # nothing written either


@pytest.mark.parametrize("listed", [True, False])
def test_an_object_replaced_after_planning_is_not_read_under_the_old_plan(tmp_path: Path, aws: S3, listed: bool) -> None:
    """An object changed between planning and sending is never read as its planned rows: its
    shard waits (Unreadable, not lasting), and the next run's planning tells an object rewritten
    as it was (sent) from one edited (refused). In the process that listed the bucket, s3fs reads
    with If-Match on the listed ETag (no HEAD); a process that did not list it (a Ray worker)
    compares the HEAD its open makes with the plan's ETag."""
    from pipeline.io.manifest import Unreadable
    from pipeline.io.sources.location import Place

    bucket = aws.new_bucket()
    put_part(aws, f"{bucket}/ds/a.parquet", 8)
    cfg = InputConfig(path=f"s3://{bucket}/ds/", format="parquet", id_column=None)
    plan = plan_manifest(cfg, 4)
    put_part(aws, f"{bucket}/ds/a.parquet", 8, tag="edited ")  # as many rows: only its stamp tells
    if not listed:
        Place(cfg).fs.invalidate_cache()
    for shard in plan.shards:
        with pytest.raises(Unreadable) as caught:
            read_rows(cfg, plan, shard, refer=frozenset({"image"}))
        assert not caught.value.lasting
        assert f"s3://{bucket}/ds/a.parquet changed since its rows were planned" in str(caught.value)


class _CountingS3:
    """A real HTTP reverse proxy in front of moto that counts what a run asks of the bucket: GETs
    of objects and the bytes they carry (what egress a bucket bills)."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import http.server
        import threading
        import urllib.parse

        self.gets = 0
        self.bytes = 0
        self.lock = threading.Lock()
        outer, target = self, urllib.parse.urlsplit(upstream)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=30)
                conn.request(self.command, self.path, body, {k: v for k, v in self.headers.items()})
                resp = conn.getresponse()
                data = resp.read()
                if self.command == "GET" and "?" not in self.path.split("/", 2)[-1]:  # an object, not a listing
                    with outer.lock:
                        outer.gets += 1
                        outer.bytes += len(data)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_a_run_reads_a_bucket_shards_image_bytes_once(tmp_path: Path, endpoint, aws: S3, fmt: str, capsys) -> None:
    """A bucket bills every byte it sends: besides planning (which digests every shard), a run
    reads a shard's image bytes once, as they are sent, the references its part file holds made
    from those same bytes (before: once more for the references at the shard's open, and s3fs's
    read-ahead fetched a Parquet object whole for its light columns). A tar is read twice: its
    keys and captions at the shard's open, then its images as sent (before: three times)."""
    from test_sources import _jpeg

    bucket = aws.new_bucket()
    images = [_jpeg(i) + bytes([i]) * 200_000 for i in range(12)]  # what a 200 kB photo costs to read
    if fmt == "parquet":
        table = pa.table({"image": pa.array(images, pa.binary()), "prompt": [f"Describe {i}" for i in range(12)]})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=4, compression="none")
        aws.fs().pipe(f"{bucket}/ds/part.parquet", buf.getvalue())
        over: dict[str, Any] = {"format": "parquet", "image_column": "image"}
        request: dict[str, Any] = {}
    else:
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, data in enumerate(images):
                for name, value in ((f"{i:03d}.jpg", data), (f"{i:03d}.txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(value)
                    tar.addfile(info, io.BytesIO(value))
        aws.fs().pipe(f"{bucket}/ds/part.tar", buf.getvalue())
        over, request = {"format": "webdataset", "image_column": None, "prompt_column": None}, {"prompt": "Is this {txt}?"}
    size = len(buf.getvalue())
    proxy = _CountingS3(aws.url)
    try:
        options = {"endpoint_url": proxy.url}
        plan_manifest(InputConfig(path=f"s3://{bucket}/ds/", storage_options=options, **{**over, "image_column": "image"}), 12)
        planning, proxy.bytes, proxy.gets = proxy.bytes, 0, 0
        extra: dict[str, Any] = {"request": request} if request else {}
        job = job_file(tmp_path, f"s3://{bucket}/ds/", endpoint.base_url, run={"shard_rows": 12},
                       input={**over, "storage_options": options}, **extra)
        code, _, err = cli(capsys, "run", str(job))
    finally:
        proxy.close()
    assert code == 0, err
    rows = read_output(tmp_path / "out-t")
    assert len(rows) == 12 and all(r["image"].startswith("sha256:") for r in rows)
    sending = proxy.bytes - planning
    print(f"{fmt}: {size} bytes; planning read {planning}, the run {proxy.bytes} in {proxy.gets} GETs: "
          f"{sending / size:.2f}x the object besides planning")
    assert sending < (2.3 if fmt == "webdataset" else 1.3) * size, (planning, proxy.bytes, size)
