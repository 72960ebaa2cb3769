"""The store seam itself (pipeline.io.store): one folder interface, local or in a bucket, for the
output and the checkpoint. Every behaviour is checked on a real POSIX folder, on a real S3 API
server (moto's server mode over HTTP, conftest's `s3`) and on fsspec's memory:// filesystem.

The conditional create is only worth testing against a server that honours it: the first test
checks at the HTTP level that moto answers a second `If-None-Match: *` put with 412 and keeps the
first object, so the store's FileExistsError below is the server's verdict, not a default.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, S3

from pipeline.errors import JobError
from pipeline.io.durable import bytes_digest
from pipeline.io.store import FsspecStore, LocalStore, Store, open_store


@pytest.fixture(params=["local", "s3", "memory"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """A new client of one place each call: a folder, a prefix in an S3 bucket, a memory:// folder."""
    if request.param == "local":
        return lambda: LocalStore(tmp_path / "folder")
    if request.param == "s3":
        s3: S3 = request.getfixturevalue("s3")
        url = f"s3://{s3.new_bucket()}/prefix"
        return lambda: FsspecStore(url, s3.options())
    pytest.importorskip("fsspec")
    url = f"memory://store-tests/{uuid.uuid4().hex}"
    return lambda: FsspecStore(url)


@pytest.fixture
def store(place: Callable[[], Store]) -> Store:
    return place()


def test_moto_really_refuses_a_second_conditional_create(s3: S3) -> None:
    import boto3
    import botocore.exceptions

    bucket = s3.new_bucket()
    client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.key, aws_secret_access_key=s3.secret,
                          region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"
    etag = client.head_object(Bucket=bucket, Key="k")["ETag"]  # and compare-and-swap, for the lease to come
    with pytest.raises(botocore.exceptions.ClientError) as stale:
        client.put_object(Bucket=bucket, Key="k", Body=b"third", IfMatch='"0000"')
    assert stale.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    client.put_object(Bucket=bucket, Key="k", Body=b"fourth", IfMatch=etag)
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"fourth"


def test_missing_objects_and_folders(store: Store) -> None:
    assert store.read("nothing.json") is None
    assert store.listing() == {} and store.names() == []
    with pytest.raises(FileNotFoundError):
        with store.open("nothing.parquet"):
            pass
    store.remove("nothing.json")  # removing what is not there is no error


def test_write_read_list_remove(store: Store) -> None:
    first = store.write("a.json", b'{"n": 1}\n', digest=True)
    assert first.size == 9 and first.digest == bytes_digest(b'{"n": 1}\n')
    second = store.write("a.json", b'{"n": 22}\n')  # replaced whole
    assert store.read("a.json") == b'{"n": 22}\n'
    store.write("b.bin", b"x" * 1000)
    listing = store.listing()
    assert sorted(listing) == sorted(store.names()) == ["a.json", "b.bin"]  # no temporary names left
    assert listing["a.json"].size == 10 and listing["b.bin"].size == 1000
    assert listing["a.json"].etag == second.etag  # what a compare-and-swap would be conditioned on
    store.remove("a.json")
    assert store.read("a.json") is None and store.names() == ["b.bin"]


def test_a_part_written_and_read_back_through_pyarrow(store: Store) -> None:
    table = pa.table({"id": [f"r{i}" for i in range(500)], "n": list(range(500))})
    written = store.write("part-000000.parquet", lambda f: pq.write_table(table, f, compression="zstd"), digest=True)
    assert written.size == store.listing()["part-000000.parquet"].size
    assert written.digest == bytes_digest(store.read("part-000000.parquet") or b"")
    with store.open("part-000000.parquet") as f:
        assert pq.read_table(f, columns=["n"]).column("n").to_pylist() == list(range(500))
    if isinstance(store, LocalStore):  # where reading it back is cheap, the digest is of the bytes in place
        assert store.digest("part-000000.parquet") == written.digest


def test_a_failed_write_leaves_the_old_object_whole(store: Store) -> None:
    store.write("plan.json", b"old and complete")

    def torn(f: Any) -> None:
        f.write(b"new but")
        raise RuntimeError("the disk filled up halfway")

    with pytest.raises(RuntimeError):
        store.write("plan.json", torn)
    assert store.read("plan.json") == b"old and complete"
    assert store.names() == ["plan.json"]  # the temporary file went with the failure


def test_create_refuses_a_second_create(store: Store) -> None:
    store.create("_owner.json", b"first")
    with pytest.raises(FileExistsError):
        store.create("_owner.json", b"second")
    assert store.read("_owner.json") == b"first"


def test_creates_racing_from_many_clients_one_wins(place: Callable[[], Store]) -> None:
    """Eight clients create the same name at once: exactly one wins, and the object holds the
    winner's bytes (locally O_EXCL decides, in the bucket the server's If-None-Match). moto checks
    the condition outside any lock, so its atomicity is not guaranteed as AWS's is; measured: no
    round of 60 (eight 200 kB creates each) had two winners."""
    store = place()
    if isinstance(store, FsspecStore) and store.url.startswith("memory://"):
        pytest.skip("memory:// is one process's dict: its create checks then writes, which a race can pass")
    won: list[bytes] = []
    lost: list[bytes] = []
    start = threading.Barrier(8)

    def claim(i: int) -> None:
        mine = place()
        mine.names()  # reach the place before the barrier: the creates race, not the set-up
        body = f"writer {i}".encode()
        start.wait(timeout=30)
        try:
            mine.create("owner", body)
            won.append(body)
        except FileExistsError:
            lost.append(body)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and len(lost) == 7
    assert store.read("owner") == won[0]


def test_child_folders_and_clear(store: Store) -> None:
    store.write("commits.jsonl", b"")
    journal = store.child("journal")
    journal.write("shard-000000.jsonl", b"a\n")
    journal.write("shard-000001.jsonl", b"b\n")
    assert journal.names() == sorted(journal.names()) == ["shard-000000.jsonl", "shard-000001.jsonl"]
    assert store.names() == ["commits.jsonl"]  # a child's objects are not the parent's
    assert journal.where("x").startswith(str(store)) and journal.where("x").endswith("/journal/x")
    journal.clear()
    assert journal.names() == [] and store.names() == ["commits.jsonl"]


def test_a_bucket_that_refuses_is_one_line_without_secrets(s3: S3) -> None:
    options = {**s3.options(), "secret": "a-secret-that-must-not-show"}
    store = FsspecStore("s3://no-such-bucket-for-store-tests/out", options)
    with pytest.raises(JobError) as missing:
        store.listing()
    assert "no-such-bucket-for-store-tests does not exist" in str(missing.value)
    with pytest.raises(JobError) as refused:
        store.write("part-000000.parquet", b"data")
    message = str(refused.value)
    assert message.startswith("[output] path: could not write part-000000.parquet in s3://no-such-bucket-for-store-tests/out")
    assert "\n" not in message and "a-secret-that-must-not-show" not in message


def test_walk_lists_every_object_under_it(place: Callable[[], Store]) -> None:
    store = place()
    if not isinstance(store, FsspecStore):
        pytest.skip("walk is a bucket's (a checkpoint's one listing of every shard's journal)")
    assert store.walk() == []  # not made yet
    store.write("job.json", b"{}")
    store.child("journal").child("shard-000001").write("00000001-a.jsonl", b"x\n")
    store.child("journal").child("shard-000000").write("00000001-a.jsonl", b"y\n")
    assert store.walk() == ["job.json", "journal/shard-000000/00000001-a.jsonl", "journal/shard-000001/00000001-a.jsonl"]
    assert store.child("journal").walk() == ["shard-000000/00000001-a.jsonl", "shard-000001/00000001-a.jsonl"]
    assert store.child("jour").walk() == []  # a prefix of a folder's name is no folder


def test_a_folder_not_made_yet_costs_one_request(s3: S3) -> None:
    """On S3 each request is a round trip (10-50 ms), and a checkpoint lists folders not made yet
    at every start (a first run's commits, each new shard's journal): one LIST each, no HEAD, no
    listing of the parent to ask whether the name is a file."""
    store = FsspecStore(f"s3://{s3.new_bucket()}/ckpt", s3.options())
    store.write("job.json", b"{}")  # the client made, the bucket known
    with s3.recording() as asked:
        assert store.child("commits").listing() == {}
        assert store.child("journal").walk() == []
    assert len(asked) == 2 and all(method == "GET" and "list-type=2" in path for method, path in asked), asked


def test_a_consoles_folder_placeholders_are_no_objects(s3: S3) -> None:
    """A bucket browsed in a console may hold zero-byte "folder/" keys: neither a listing nor a
    walk takes one for an object (a shard's journal with one would want a compaction every run)."""
    import boto3

    bucket = s3.new_bucket()
    client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.key, aws_secret_access_key=s3.secret,
                          region_name="us-east-1")
    for key in ("ckpt/", "ckpt/journal/", "ckpt/journal/shard-000003/"):
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    store = FsspecStore(f"s3://{bucket}/ckpt", s3.options())
    store.child("journal").child("shard-000003").write("compact-00000001.jsonl.zst", b"z")
    assert store.walk() == ["journal/shard-000003/compact-00000001.jsonl.zst"]
    assert store.child("journal").listing() == {}
    assert list(store.child("journal").child("shard-000003").listing()) == ["compact-00000001.jsonl.zst"]


# -- the local folder's own operations: durable appends and torn tails --------------------

def test_read_lines_leaves_out_a_torn_tail_and_repair_cuts_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "commits.jsonl").write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3')  # a crash mid-append
    assert store.read_lines("commits.jsonl") == b'{"a": 1}\n{"b": 2}\n'
    assert (tmp_path / "commits.jsonl").read_bytes().endswith(b'{"c": 3')  # a plain read changes nothing
    assert store.read_lines("commits.jsonl", repair=True) == b'{"a": 1}\n{"b": 2}\n'
    store.append("commits.jsonl", b'{"d": 4}\n')  # starts on a fresh line
    assert (tmp_path / "commits.jsonl").read_bytes() == b'{"a": 1}\n{"b": 2}\n{"d": 4}\n'
    assert store.read_lines("missing.jsonl") is None


_APPENDER = """
import sys
from pathlib import Path
from pipeline.io.store import LocalStore
store, me = LocalStore(Path(sys.argv[1])), int(sys.argv[2])
for i in range(150):
    body = (str(me) * (1 + (i * 7919) % 20000)).encode()  # up to 20 kB: past any one-write atomicity
    store.append("commits.jsonl", b"%d %d " % (me, i) + body + b"\\n", exclusive=True)
"""


def test_appends_from_several_processes_never_interleave(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path), str(me)], cwd=ROOT) for me in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = (LocalStore(tmp_path).read_lines("commits.jsonl") or b"").splitlines()
    assert len(lines) == 4 * 150
    seen = set()
    for line in lines:
        me, i, body = line.split(b" ")
        assert body == me * (1 + (int(i) * 7919) % 20000), "a line mixed with another process's"
        seen.add((int(me), int(i)))
    assert len(seen) == 4 * 150


_SLOW_WRITER = """
import sys, time
from pathlib import Path
from pipeline.io.store import LocalStore
def slowly(f):
    f.write(b"new " * 100_000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
LocalStore(Path(sys.argv[1])).write("plan.json", slowly)
"""


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write("plan.json", b"old and complete")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
    assert (tmp_path / ".plan.json.tmp").stat().st_size == 400_000  # the new bytes are on their way
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert store.read("plan.json") == b"old and complete"
    assert sorted(store.names()) == [".plan.json.tmp", "plan.json"]  # the output's leftovers are removed on resume


def test_open_store_tells_a_folder_from_a_url(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path), LocalStore)
    remote = open_store("s3://user:pw@bucket/out", {"anon": True})
    assert isinstance(remote, FsspecStore) and str(remote) == "s3://bucket/out"  # no credentials shown
    assert remote.where("part-000000.parquet") == "s3://bucket/out/part-000000.parquet"
    assert remote.make() is False  # a bucket has no folders to make
    assert LocalStore(tmp_path / "new").make() is True and LocalStore(tmp_path / "new").make() is False


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from pipeline.io.durable import create_exclusive
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    create_exclusive(Path(sys.argv[1]), b"x" * 5000)
except OSError as exc:
    print(exc.errno)
"""


def test_a_create_that_fails_part_way_leaves_no_file_and_the_next_create_succeeds(tmp_path: Path) -> None:
    """A conditional create whose write fails (a full disk here; a kill is the same) must not leave
    an empty or partial file under the name: the owner marker would be there, empty, and every
    later run refused as damaged. The data goes to a temporary name and is linked into place."""
    import errno

    from pipeline.io.durable import create_exclusive

    path = tmp_path / "owner.json"
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == str(errno.EFBIG), out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == [], "nothing under the name, no temporary file left"
    create_exclusive(path, b'{"owner": 1}')
    assert path.read_bytes() == b'{"owner": 1}'
    with pytest.raises(FileExistsError):
        create_exclusive(path, b'{"owner": 2}')
    assert path.read_bytes() == b'{"owner": 1}' and [p.name for p in tmp_path.iterdir()] == ["owner.json"]
