"""Image cells of every kind: bytes in a Parquet manifest or an in-memory frame (a binary column,
Hugging Face's Image struct, lists of them), and object-store URIs (s3://) read with the job's
credentials or presigned; the output and the checkpoint hold no copy of the bytes, and no
credential or signature reaches a file, a log or an error.

Real parts throughout: the built-in endpoint over HTTP (recording the request bodies it got, or
fetching presigned URLs as a provider does), moto's S3 server over HTTP with credentials in the
environment, real Parquet, `python -m pipeline` runs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from conftest import S3, job_dict, read_output, run_cli, write_job
from PIL import Image

import pipeline
from pipeline.io.references import referenced
from pipeline.redact import Redactor
from pipeline.rows.values import Blob, image_values, kind_of, show

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def picture(i: int, size: int = 48, fmt: str = "PNG") -> bytes:
    """A distinct small image per i (its colour and a band), so each row's bytes are its own."""
    img = Image.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    img.paste((255 - (i * 37) % 256, 0, 0), (0, i % size, size, i % size + 3))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise(i: int, size: int) -> bytes:
    """A PNG of seeded noise: incompressible, so it weighs about size x size x 3 bytes."""
    img = Image.frombytes("RGB", (size, size), random.Random(i).randbytes(size * size * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def sent_images(endpoint: Any) -> dict[str, list[bytes]]:
    """prompt -> the image bytes each request carried inline, from the endpoint's own record."""
    got: dict[str, list[bytes]] = {}
    for entry in endpoint.requests():
        body = json.loads(entry["body"])
        parts = body["messages"][-1]["content"]
        prompt = next(p["text"] for p in parts if p["type"] == "text")
        got[prompt] = [base64.b64decode(p["image_url"]["url"].partition(",")[2]) for p in parts if p["type"] == "image_url"]
    return got


def files_text(*folders: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for f in folders for p in f.rglob("*") if p.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- values and references --------------------------------------------------------------------


def test_a_cell_may_hold_bytes_hf_structs_object_uris_and_lists_of_them() -> None:
    png = picture(1)
    assert image_values(png) == [Blob(png)]
    assert image_values({"bytes": png, "path": "cat.png"}) == [Blob(png, "cat.png")]
    assert image_values({"bytes": None, "path": "imgs/a.jpg"}) == ["imgs/a.jpg"]  # HF: the path when no bytes
    assert image_values([png, None, b"", {"bytes": png, "path": None}]) == [Blob(png), Blob(png)]
    assert image_values({"bytes": None, "path": None}) == [] and image_values(b"") == []
    assert [kind_of(v) for v in (Blob(png), "s3://b/k.png", "gcs://b/k", "az://c/k", "https://h/x", "a.png")] == [
        "bytes", "object", "object", "object", "url", "path"]
    assert show(Blob(png, "cat.png")) == f"<{len(png):,} bytes in the manifest ('cat.png')>"  # never the bytes


def test_output_references_are_the_hf_path_or_the_sha256_of_the_bytes() -> None:
    a, b = picture(1), picture(2)
    plain = pa.chunked_array([pa.array([a, None, b], pa.binary())])
    assert referenced(plain).to_pylist() == [f"sha256:{hashlib.sha256(a).hexdigest()}", None,
                                             f"sha256:{hashlib.sha256(b).hexdigest()}"]
    hf = pa.array([{"bytes": a, "path": "x/cat.png"}, {"bytes": b, "path": None}, None], HF_IMAGE)
    assert referenced(pa.chunked_array([hf])).to_pylist() == ["x/cat.png", f"sha256:{hashlib.sha256(b).hexdigest()}", None]
    # A shard is a slice of a row group: only its own rows' items are referenced, in order.
    lists = pa.array([[a], [a, b], None, []], pa.list_(pa.large_binary())).slice(1)
    assert referenced(pa.chunked_array([lists])).to_pylist() == [
        [f"sha256:{hashlib.sha256(a).hexdigest()}", f"sha256:{hashlib.sha256(b).hexdigest()}"], None, []]
    text = pa.chunked_array([pa.array(["a.png"])])
    assert referenced(text) is text  # paths and URLs stay as they are


def test_presigned_url_parameters_are_scrubbed_from_any_text() -> None:
    r = Redactor()  # no secret given: signatures are still hidden
    v4 = ("https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAXYZ%2F20260101"
           "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token="
           "FQoGZXIvYXdzEJr%2F%2F&X-Amz-SignedHeaders=host&X-Amz-Signature=64fedec0fd75f2ee537c151d376facf3")
    text = r.scrub(f"Error while downloading {v4}.")
    assert "AKIAXYZ" not in text and "64fedec0" not in text and "FQoGZXIv" not in text
    assert "X-Amz-Signature=[signed]" in text and "X-Amz-Expires=3600" in text  # the rest of the URL is kept
    v2 = '{"url": "http://h/b/k?AWSAccessKeyId=AKIAXYZ&Signature=XYRG4TXbI3KVHZ%2BV%3D&Expires=1796451679"}'
    assert "AKIAXYZ" not in r.scrub(v2) and "XYRG4TX" not in r.scrub(v2)
    assert "sig=[signed]" in r.scrub("https://a.blob.core.windows.net/c/b.jpg?sv=2020&sig=abc%2Fdef&se=2026")
    plain = "The picture shows a cat; 2 + 2 = 4."
    assert r.scrub(plain) is plain


@pytest.mark.parametrize("text", [
    # HTML: a page or an answer in markdown/HTML holds the URL with &amp;
    "<img src=\"https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&amp;X-Amz-Credential=AKIAXX%2F2026"
    "&amp;X-Amz-Signature=deadbeefdeadbeef\">",
    # percent-encoded inside another URL's query (a proxy or image CDN link), once and twice
    "fetch?url=https%3A%2F%2Fb.s3.amazonaws.com%2Fk.png%3FX-Amz-Credential%3DAKIAXX%252F2026%26X-Amz-Signature%3Ddeadbeefdeadbeef",
    "r?u=https%253A%252F%252Fb%252Fk.png%253FX-Amz-Credential%253DAKIAXX%26X-Amz-Signature%253Ddeadbeefdeadbeef%2526x%253D1",
    '{"url": "https://b/k.png?X-Amz-Credential=AKIAXX\\u0026X-Amz-Signature=deadbeefdeadbeef"}',  # JSON's \u0026
])
def test_signed_url_parameters_are_scrubbed_in_every_escaping(text: str) -> None:
    out = Redactor().scrub(text)
    assert "deadbeefdeadbeef" not in out and "AKIAXX" not in out, out
    assert "[signed]" in out and "X-Amz-Signature" in out  # the name stays: a reader sees the URL was signed


_ESCAPES = {
    "plain": lambda u: u, "html": lambda u: u.replace("&", "&amp;"),
    "json": lambda u: json.dumps(u)[1:-1].replace("&", "\\u0026"),
    "percent": lambda u: urllib.parse.quote(u, safe=""), "percent twice": lambda u: urllib.parse.quote(urllib.parse.quote(u, safe=""), safe=""),
}


@settings(max_examples=200, deadline=None)
@given(sig=st.text("0123456789abcdef", min_size=16, max_size=64), name=st.sampled_from(
           ["X-Amz-Signature", "x-amz-signature", "X-Goog-Signature", "Signature", "sig", "X-Amz-Security-Token"]),
       escape=st.sampled_from(sorted(_ESCAPES)), before=st.text(max_size=40), after=st.text(max_size=40))
def test_a_signature_never_survives_a_scrub_whatever_its_escaping(sig: str, name: str, escape: str, before: str,
                                                                   after: str) -> None:
    url = f"https://b.example/k.png?X-Amz-Date=20260101T000000Z&{name}={sig}&x=1"
    text = f"{before} {_ESCAPES[escape](url)} {after}"
    assume(sig not in before + after)
    assert sig not in Redactor().scrub(text)


# -- bytes in a Parquet manifest ---------------------------------------------------------------


def _job(tmp_path: Path, manifest: Path, base_url: str, **over: Any) -> Path:
    job = job_dict(manifest, base_url, tmp_path / "out", **over)
    return write_job(tmp_path / "job.toml", job)


def test_parquet_binary_hf_struct_and_list_cells_are_sent_and_referenced(tmp_path: Path, endpoint) -> None:
    """Each row's own bytes reach the endpoint (decoded from its request); the output holds
    references, not bytes; worker processes (the default pool) receive the blobs."""
    (tmp_path / "local.png").write_bytes(picture(99))
    pics = [picture(i) for i in range(6)]
    rows = {
        "plain": pa.table({"id": [f"p{i}" for i in range(3)], "prompt": [f"plain {i}" for i in range(3)],
                           "image": pa.array(pics[:3], pa.binary())}),
        "hf": pa.table({"id": ["h0", "h1", "h2"], "prompt": ["hf 0", "hf 1", "hf 2"],
                        "image": pa.array([{"bytes": pics[3], "path": "cats/3.png"}, {"bytes": pics[4], "path": None},
                                           {"bytes": None, "path": "local.png"}], HF_IMAGE)}),
        "many": pa.table({"id": ["m0"], "prompt": ["many 0"], "image": pa.array([[pics[4], pics[5]]], pa.list_(pa.binary()))}),
    }
    for name, table in rows.items():
        manifest = tmp_path / f"{name}.parquet"
        pq.write_table(table, manifest)
        job = write_job(tmp_path / f"{name}.toml", {**job_dict(manifest, endpoint.base_url, tmp_path / f"out-{name}"), "name": name})
        r = run_cli("run", str(job))
        assert r.returncode == 0, r.stderr
    got = sent_images(endpoint)
    assert got["plain 1"] == [pics[1]] and got["hf 0"] == [pics[3]] and got["hf 1"] == [pics[4]]
    assert got["hf 2"] == [picture(99)]  # an HF struct without bytes: its path, read beneath the manifest's folder
    assert got["many 0"] == [pics[4], pics[5]]  # a list<binary> cell: several images, in order
    plain = {r["id"]: r for r in read_output(tmp_path / "out-plain")}
    assert plain["p2"]["image"] == "sha256:" + hashlib.sha256(pics[2]).hexdigest() and plain["p2"]["status"] == "ok"
    hf = {r["id"]: r["image"] for r in read_output(tmp_path / "out-hf")}
    assert hf == {"h0": "cats/3.png", "h1": "sha256:" + hashlib.sha256(pics[4]).hexdigest(), "h2": "local.png"}
    assert read_output(tmp_path / "out-many")[0]["image"] == ["sha256:" + hashlib.sha256(p).hexdigest() for p in pics[4:6]]
    assert pq.read_schema(next((tmp_path / "out-hf").glob("part-*.parquet"))).field("image").type == pa.string()


def test_bytes_that_are_not_an_image_or_too_large_are_error_rows(tmp_path: Path, endpoint) -> None:
    big = os.urandom(300_000)
    table = pa.table({"id": ["ok", "text", "big"], "prompt": ["a", "b", "c"],
                      "image": pa.array([picture(1), b"hello, not an image", b"\x89PNG\r\n\x1a\n" + big], pa.binary())})
    pq.write_table(table, tmp_path / "m.parquet")
    job = _job(tmp_path, tmp_path / "m.parquet", endpoint.base_url, images={"max_image_mb": 0.2, "pool": "thread"})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr  # failed rows: exit 1, the job went on
    out = {row["id"]: row for row in read_output(tmp_path / "out")}
    assert out["ok"]["status"] == "ok"
    assert out["text"]["error_kind"] == "input" and "not an image" in out["text"]["error"]
    assert "bytes in the manifest" in out["text"]["error"] and "hello" not in out["text"]["error"]
    assert out["big"]["error_kind"] == "input" and "image bytes too large" in out["big"]["error"]


def test_keep_media_copies_the_bytes_into_the_output(tmp_path: Path, endpoint) -> None:
    pics = [picture(i) for i in range(2)]
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a", "b"], "image": pa.array(pics, pa.binary())}), tmp_path / "m.parquet")
    job = _job(tmp_path, tmp_path / "m.parquet", endpoint.base_url, output={"keep_media": True}, images={"pool": "thread"})
    assert run_cli("run", str(job)).returncode == 0
    assert [r["image"] for r in sorted(read_output(tmp_path / "out"), key=lambda r: r["id"])] == pics


# -- an in-memory frame with bytes -------------------------------------------------------------


def test_a_frame_with_bytes_is_stored_once_and_the_output_holds_references(tmp_path: Path, endpoint) -> None:
    pd = pytest.importorskip("pandas")
    pics = [noise(i, 160) for i in range(40)]  # ~77 KB each: sizes that show
    total = sum(map(len, pics))
    df = pd.DataFrame({"id": [f"r{i}" for i in range(40)], "prompt": [f"frame {i}" for i in range(40)], "image": pics})
    job = job_dict(tmp_path / "unused.csv", endpoint.base_url, tmp_path / "out", images={"pool": "thread"},
                   run={"shard_rows": 15})
    del job["input"]["path"]
    res = pipeline.run(job, manifest=df)
    assert (res.exit_code, res.ok) == (0, 40)
    assert sent_images(endpoint)["frame 7"] == [pics[7]]
    ckpt = tmp_path / ".pipeline" / "t"
    stored = pq.read_table(ckpt / "manifest.parquet")
    assert stored.schema.field("image").type == pa.binary()  # its binary form, not base64 text
    assert folder_bytes(ckpt) < total * 1.1 + 200_000  # once, not again as base64 (was 1x + 4/3x)
    assert folder_bytes(tmp_path / "out") < 100_000  # references, not the images' 3 MB
    assert "data:image" not in files_text(ckpt, tmp_path / "out")
    assert pipeline.run(job, manifest=df).summary["this_run"]["requests_sent"] == 0  # resumes like a file


# -- object-store URIs (moto's S3 server) ----------------------------------------------------


@pytest.fixture
def bucket(s3: S3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket of six images, two more objects that are not images, and a prefix every
    principal is denied; the AWS_* variables point at the server (credentials in the environment)."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    name = s3.new_bucket()
    fs = s3.fs()
    for i in range(6):
        fs.pipe_file(f"{name}/img/{i}.png", picture(i))
    fs.pipe_file(f"{name}/img/notes.txt", b"not an image")
    fs.pipe_file(f"{name}/img/empty.png", b"")
    fs.pipe_file(f"{name}/private/x.png", picture(7))
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Resource": f"arn:aws:s3:::{name}/private/*",
                                                      "Action": ["s3:GetObject", "s3:HeadObject"]}]}
    fs.call_s3("put_bucket_policy", Bucket=name, Policy=json.dumps(policy))
    return name


def _s3_job(tmp_path: Path, s3: S3, base_url: str, cells: list[str], name: str = "t", **over: Any) -> Path:
    rows = [{"id": f"r{i}", "prompt": f"object {i}", "image": c} for i, c in enumerate(cells)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = {"pool": "thread", "allowed_buckets": [f"s3://{cells[0].split('/')[2]}/"], **over.pop("images", {})}
    job = job_dict(tmp_path / "m.jsonl", base_url, tmp_path / "out", input={"storage_options": {"endpoint_url": s3.url}},
                   images=images, **over)
    return write_job(tmp_path / f"{name}.toml", {**job, "name": name})


def test_s3_image_cells_are_read_with_the_environments_credentials_and_inlined(tmp_path: Path, endpoint, s3: S3, bucket: str) -> None:
    job = _s3_job(tmp_path, s3, endpoint.base_url, [f"s3://{bucket}/img/{i}.png" for i in range(6)])
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    got = sent_images(endpoint)
    assert all(got[f"object {i}"] == [picture(i)] for i in range(6))  # each row its own object's bytes
    out = {row["id"]: row for row in read_output(tmp_path / "out")}
    assert out["r3"]["image"] == f"s3://{bucket}/img/3.png"  # the cell as given: a reference already
    secrets = (s3.key, s3.secret)
    text = files_text(tmp_path / "out", tmp_path / ".pipeline") + r.stderr
    assert not any(s in text for s in secrets)


def test_object_errors_are_rows_naming_the_object_and_the_job_goes_on(tmp_path: Path, endpoint, s3: S3, bucket: str) -> None:
    other = s3.new_bucket()
    s3.fs().pipe_file(f"{other}/0.png", picture(0))
    cells = [f"s3://{bucket}/img/0.png", f"s3://{bucket}/img/gone.png", f"s3://{bucket}/private/x.png",
             f"s3://{bucket}/img/notes.txt", f"s3://{bucket}/img/empty.png", f"s3://{other}/0.png",
             f"s3://{bucket}/img/../private/x.png", "s3://no-such-bucket-zz/a.png"]
    job = _s3_job(tmp_path, s3, endpoint.base_url, cells)
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr
    out = {row["id"]: row for row in read_output(tmp_path / "out")}
    assert out["r0"]["status"] == "ok"
    expected = {"r1": "object not found", "r2": "access denied to the object", "r3": "not an image",
                "r4": "object is empty", "r5": "outside the allowed buckets", "r6": "'..' segment",
                "r7": "outside the allowed buckets"}
    for row_id, words in expected.items():
        assert out[row_id]["error_kind"] == "input" and words in out[row_id]["error"], out[row_id]
        assert cells[int(row_id[1:])] in out[row_id]["error"]  # the object is named
    assert f'allowed_buckets = ["s3://{other}/"]' in out["r5"]["error"]  # the fix, spelled out
    assert endpoint.stats()["requests"] == 1  # refused rows are never sent
    text = files_text(tmp_path / "out", tmp_path / ".pipeline") + r.stderr
    assert s3.secret not in text and s3.key not in text


def test_object_uris_are_refused_until_allowed(tmp_path: Path, endpoint, s3: S3, bucket: str) -> None:
    job = _s3_job(tmp_path, s3, endpoint.base_url, [f"s3://{bucket}/img/0.png"], images={"allowed_buckets": []})
    r = run_cli("run", str(job))
    assert r.returncode == 1
    (row,) = read_output(tmp_path / "out")
    assert "outside the allowed buckets (none yet)" in row["error"] and f'allowed_buckets = ["s3://{bucket}/"]' in row["error"]
    dry = run_cli("run", str(job), "--dry-run")
    assert "outside the allowed buckets" in dry.stdout


def _signatures(endpoint: Any) -> list[str]:
    found = []
    for entry in endpoint.requests():
        found += re.findall(r"(?:X-Amz-Signature|X-Amz-Credential)=([^&\"]+)", entry["body"])
    return found


def sigv4_valid(url: str, key: str, secret: str) -> bool:
    """Whether `url`'s X-Amz-Signature is the SigV4 query signature of that very URL (host, path,
    expiry, scope) by `key`/`secret`, recomputed by botocore at the URL's own X-Amz-Date (botocore's
    clock patched to it). moto's server cannot tell: it checks only an Authorization header's
    signature, and serves a presigned URL whatever its X-Amz-Signature says."""
    import datetime
    from unittest import mock

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    parts = urllib.parse.urlsplit(url)
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    signed_at = datetime.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    region = params["X-Amz-Credential"].split("/")[2]
    own = urllib.parse.urlencode({k: v for k, v in params.items() if not k.startswith("X-Amz-")})
    request = AWSRequest(method="GET", url=urllib.parse.urlunsplit(parts._replace(query=own)))
    auth = botocore.auth.S3SigV4QueryAuth(Credentials(key, secret), "s3", region, expires=int(params["X-Amz-Expires"]))
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda: signed_at):
        auth.add_auth(request)
    expected = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.url).query))
    return expected["X-Amz-Signature"] == params["X-Amz-Signature"] and expected["X-Amz-Credential"] == params["X-Amz-Credential"]


def test_presigned_urls_let_the_provider_fetch_the_objects_and_leave_no_signature(tmp_path: Path, endpoint_factory,
                                                                                    s3: S3, bucket: str) -> None:
    ep = endpoint_factory(record=True, fetch_images=True)  # fetches image URLs as a provider does
    cells = [f"s3://{bucket}/img/{i}.png" for i in range(4)] + [f"s3://{bucket}/img/gone.png"]
    cache = tmp_path / "cache"
    job = _s3_job(tmp_path, s3, ep.base_url, cells, images={"image_mode": "presign"}, run={"cache": str(cache)})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr  # the missing object's row failed; the others did not
    out = {row["id"]: row for row in read_output(tmp_path / "out")}
    for i in range(4):  # the endpoint itself fetched each object's bytes through its presigned URL
        assert f"sha256 {hashlib.sha256(picture(i)).hexdigest()[:16]}" in out[f"r{i}"]["answer"], out[f"r{i}"]
    assert out["r4"]["error_kind"] == "input" and f"object not found (deleted, moved, or never there): 's3://{bucket}/img/gone.png'" in out["r4"]["error"]
    bodies = [json.loads(e["body"]) for e in ep.requests()]
    urls = [p["image_url"]["url"] for b in bodies for p in b["messages"][-1]["content"] if p["type"] == "image_url"]
    assert len(urls) == 4 and all("X-Amz-Signature=" in u and "X-Amz-Expires=" in u for u in urls)
    expires_at = re.search(r"X-Amz-Expires=(\d+)", urls[0])
    assert expires_at is not None
    expires = int(expires_at.group(1))
    assert expires == 3600 + 10 * 4  # presign_expiry_s + timeout_s x max_attempts (job_dict: 10 s, 4 attempts)
    with pytest.raises(urllib.error.HTTPError) as refused:  # the same object without the signature: refused
        urllib.request.urlopen(urls[0].split("?")[0], timeout=10)
    assert refused.value.code == 403
    named = re.search(r"/img/(\d)\.png\?", urls[0])
    assert named is not None
    number = int(named.group(1))
    assert urllib.request.urlopen(urls[0], timeout=10).read() == picture(number)  # signed: the object's bytes
    # moto serves a presigned URL whatever its signature: the signature is checked here instead.
    assert all(sigv4_valid(u, s3.key, s3.secret) for u in urls)
    tampered = re.sub(r"X-Amz-Signature=[0-9a-f]+", "X-Amz-Signature=" + "0" * 64, urls[0])
    assert not sigv4_valid(tampered, s3.key, s3.secret) and not sigv4_valid(urls[0], s3.key, "another-secret")
    assert not sigv4_valid(urls[0].replace("/img/", "/img2/"), s3.key, s3.secret)  # signed for another object
    # No signature or credential in the output, the checkpoint, the cache or stderr.
    secrets = _signatures(ep) + [s3.secret]
    assert secrets and not any(s in files_text(tmp_path / "out", tmp_path / ".pipeline", cache) + r.stderr for s in secrets)

    # The cache keys on the object URI, not the signature that changes every signing: a new job over
    # the same objects is answered from the cache, nothing sent.
    sent = ep.stats()["requests"]
    again = _s3_job(tmp_path, s3, ep.base_url, cells, "again", images={"image_mode": "presign"}, run={"cache": str(cache)},
                    output={"path": str(tmp_path / "out2")})
    r = run_cli("run", str(again))
    assert r.returncode == 1, r.stderr
    assert ep.stats()["requests"] == sent
    assert sum(row["from_cache"] for row in read_output(tmp_path / "out2")) == 4


def test_presigned_urls_echoed_by_the_provider_are_scrubbed(tmp_path: Path, endpoint, s3: S3, bucket: str) -> None:
    """The built-in endpoint without fetch_images echoes an image URL in its answer, as a careless
    model might: the signature and credential never reach the output."""
    job = _s3_job(tmp_path, s3, endpoint.base_url, [f"s3://{bucket}/img/{i}.png" for i in range(2)],
                  images={"image_mode": "presign"})
    r = run_cli("run", str(job))
    assert r.returncode == 0, r.stderr
    answers = [row["answer"] for row in read_output(tmp_path / "out")]
    assert all("X-Amz-Credential=[signed]" in a for a in answers), answers
    secrets = _signatures(endpoint) + [s3.key, s3.secret]
    assert not any(s in files_text(tmp_path / "out", tmp_path / ".pipeline") + r.stderr for s in secrets)


def test_presign_is_refused_in_batch_mode(tmp_path: Path) -> None:
    job = job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out", run={"mode": "batch"},
                   images={"image_mode": "presign"})
    with pytest.raises(pipeline.errors.JobError, match=r'"presign" is not used in \[run\] mode = "batch"'):
        pipeline.load_job(job)


def test_an_object_store_without_its_backend_is_an_error_row_naming_the_package(tmp_path: Path, endpoint) -> None:
    pytest.importorskip("fsspec")
    if any(__import__("importlib").util.find_spec(m) for m in ("gcsfs", "adlfs")):
        pytest.skip("gcsfs or adlfs is installed here")
    rows = [{"id": "g", "prompt": "gs", "image": "gs://photos/a.png"}, {"id": "a", "prompt": "az", "image": "az://c/a.png"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = _job(tmp_path, tmp_path / "m.jsonl", endpoint.base_url,
               images={"pool": "thread", "allowed_buckets": ["gcs://photos/", "abfs://c/"]})  # aliases fold to gs, az
    assert run_cli("run", str(job)).returncode == 1
    out = {row["id"]: row["error"] for row in read_output(tmp_path / "out")}
    assert "gs:// image URIs need their fsspec backend: pip install gcsfs" in out["g"]
    assert "az:// image URIs need their fsspec backend: pip install adlfs" in out["a"]


def test_the_dry_run_checks_bytes_and_object_uris_without_fetching(tmp_path: Path) -> None:
    table = pa.table({"id": ["ok", "text", "far", "near"], "prompt": ["a"] * 4,
                      "image": pa.array([picture(1), b"plain text", None, None], pa.binary()),
                      "uri": ["", "", "s3://elsewhere/a.png", "s3://team/a.png"]})
    pq.write_table(table, tmp_path / "m.parquet")
    job = job_dict(tmp_path / "m.parquet", "http://127.0.0.1:9/v1", tmp_path / "out", images={"allowed_buckets": ["s3://team/"]})
    job["input"]["image_column"] = "image"
    bytes_job = write_job(tmp_path / "bytes.toml", {**job, "name": "b"})
    dry = run_cli("run", str(bytes_job), "--dry-run")
    assert "not an image (PNG, JPEG, WEBP or GIF) by their content" in dry.stdout, dry.stdout
    job["input"]["image_column"] = "uri"
    uri_job = write_job(tmp_path / "uri.toml", {**job, "name": "u"})
    dry = run_cli("run", str(uri_job), "--dry-run")
    assert "outside the allowed buckets (s3://team/)" in dry.stdout and "s3://elsewhere/a.png" in dry.stdout, dry.stdout
    assert "s3://team/a.png" not in dry.stdout  # allowed: counted as ready, nothing fetched


def test_the_manifests_own_bucket_folder_is_allowed_by_default() -> None:
    from pipeline.rows.objects import object_roots

    assert object_roots((), Path("/data/m.csv")) == ()  # a local manifest: nothing until allowed
    assert object_roots((), "s3://team/photos/2026-11/manifest.parquet") == ("s3://team/photos/2026-11/",)
    assert object_roots((), "s3://team/photos/2026-11/") == ("s3://team/photos/2026-11/",)
    assert object_roots((), "s3://team/photos/*/part-*.parquet") == ("s3://team/photos/",)
    assert object_roots(("gs://other/",), ["s3a://team/a.csv"]) == ("gs://other/", "s3://team/")


def test_credentials_in_storage_options_are_used_and_never_shown(tmp_path: Path, endpoint, s3: S3,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = s3.new_bucket()
    fs = s3.fs()
    fs.pipe_file(f"{name}/0.png", picture(0))
    for k in [k for k in os.environ if k.startswith("AWS_")]:  # the job's options alone
        monkeypatch.delenv(k)
    cells = [f"s3://{name}/0.png", f"s3://{name}/missing.png"]
    job = _s3_job(tmp_path, s3, endpoint.base_url, cells)
    text = job.read_text().replace(f'storage_options = {{"endpoint_url" = "{s3.url}"}}',
                                   f'storage_options = {{"endpoint_url" = "{s3.url}", "key" = "{s3.key}", "secret" = "{s3.secret}"}}')
    assert text != job.read_text()
    job.write_text(text)
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr
    out = {row["id"]: row for row in read_output(tmp_path / "out")}
    assert out["r0"]["status"] == "ok" and "object not found" in out["r1"]["error"]
    assert sent_images(endpoint)["object 0"] == [picture(0)]
    text = files_text(tmp_path / "out", tmp_path / ".pipeline") + r.stderr + r.stdout
    assert s3.secret not in text and s3.key not in text


@settings(max_examples=150, deadline=None)
@given(cells=st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), st.binary(max_size=8)), max_size=3)), max_size=12),
       cut=st.tuples(st.integers(0, 12), st.integers(0, 12)), chunks=st.integers(1, 3))
def test_references_match_each_cell_whatever_the_slicing_and_chunking(cells: list, cut: tuple[int, int], chunks: int) -> None:
    """A shard is any slice of any chunking: each row's reference is its own items' digests."""
    def ref(b: bytes | None) -> str | None:
        return None if b is None else "sha256:" + hashlib.sha256(b).hexdigest()

    start, length = min(cut), abs(cut[1] - cut[0])
    arr = pa.array(cells, pa.list_(pa.binary())).slice(start, length)
    step = max(1, len(arr) // chunks)
    column = pa.chunked_array([arr.slice(i, step) for i in range(0, len(arr), step)] or [arr], arr.type)
    want = [None if c is None else [ref(b) for b in c] for c in cells[start:start + length]]
    assert referenced(column).to_pylist() == want
    flat = pa.chunked_array([pa.array([c[0] if c else None for c in cells], pa.binary()).slice(start, length)])
    assert referenced(flat).to_pylist() == [ref(c[0]) if c else None for c in cells[start:start + length]]
