"""The checkpoint in a bucket (issue 24) beside a local one, against moto's S3 server over HTTP.

    python -m bench bucket

The same 20,000-row job against the instant endpoint (output in a local folder both times), its
checkpoint in a local folder, then at an s3:// URL: rows/s end to end (median of three runs each),
its two parts (start-up to the first request; rows/s from the first request to the last), the S3
requests one bucket run makes (moto's recorder), by kind, per 10,000 rows, and what each
checkpoint holds once the job is finished (its journals compacted) beside the output's own bytes.
moto is one Python process on the same two cores: a real S3 answers faster and costs no CPU here.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .common import WORK, recorded_times, run_pipeline, serving, url_manifest, write_job
from .moto_s3 import start_moto_s3, stop_moto_s3
from .throughput import ANSWER

KEY, SECRET = "AKIABENCH0000000", "bench-secret"


@contextmanager
def moto_server() -> Iterator[str]:
    WORK.mkdir(parents=True, exist_ok=True)
    recording = WORK / "moto_recording"  # moto's default is a file in the current folder (the checkout)
    recording.unlink(missing_ok=True)  # else a recording of an earlier bench is counted too
    proc, url = start_moto_s3(env={"MOTO_RECORDER_FILEPATH": str(recording)})
    try:
        yield url
    finally:
        stop_moto_s3(proc)


def _moto(url: str, action: str) -> bytes:
    method = "GET" if action == "download-recording" else "POST"
    req = urllib.request.Request(f"{url}/moto-api/recorder/{action}", method=method, data=None if method == "GET" else b"")
    with urllib.request.urlopen(req, timeout=60) as r:
        return bytes(r.read())


def _reset(url: str) -> None:
    req = urllib.request.Request(url.removesuffix("/v1") + "/stats/reset", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=30).read()


def _kinds(recording: bytes) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for line in recording.splitlines():
        rec = json.loads(line)
        query = rec["url"].partition("?")[2]
        kind = "LIST" if rec["method"] == "GET" and "list-type" in query else \
            "DELETE (bulk)" if rec["method"] == "POST" and "delete" in query else rec["method"]
        kinds[kind] += 1
    return kinds


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_bucket_bench(rows: int = 20_000, concurrency: int = 64, repeats: int = 3) -> dict[str, Any]:
    import s3fs

    folder = WORK / "bucket"
    shutil.rmtree(folder, ignore_errors=True)
    manifest = url_manifest(WORK / f"urls-{rows}.csv", rows)
    with moto_server() as s3_url, serving(record=True, **ANSWER) as (url, _pid):
        fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=s3_url, skip_instance_cache=True)
        fs.mkdir("bench")
        options = f'{{ key = "{KEY}", secret = "{SECRET}", endpoint_url = "{s3_url}" }}'
        local: list[tuple[float, float, float]] = []
        bucket: list[tuple[float, float, float]] = []
        for i in range(repeats):
            for kind, rates in (("local", local), ("bucket", bucket)):
                run = folder / f"{kind}-{i}"
                run.mkdir(parents=True, exist_ok=True)
                job = write_job(run / "job.toml", manifest, url, run / "out", concurrency=concurrency)
                if kind == "bucket":
                    job.write_text(job.read_text().replace(
                        "[output]\n", f'[output]\ncheckpoint = "s3://bench/ckpt-{i}"\nstorage_options = {options}\n'))
                    if i == repeats - 1:
                        _moto(s3_url, "start-recording")
                _reset(url)
                r = run_pipeline(job)
                assert r["exit_code"] == 0, r["stderr"]
                times = recorded_times(url)
                rates.append((rows / r["wall_s"], times[0] - r["started_at"], rows / max(1e-9, times[-1] - times[0])))
        _moto(s3_url, "stop-recording")
        requests = _kinds(_moto(s3_url, "download-recording"))
        last = folder / f"bucket-{repeats - 1}"
        bucket_bytes = sum(info["size"] for info in fs.find(f"bench/ckpt-{repeats - 1}", detail=True).values())
        output_bytes = _size(last / "out")
        local_bytes = _size(folder / f"local-{repeats - 1}" / ".pipeline")

    def med(xs: list[tuple[float, float, float]], k: int) -> float:
        return sorted(x[k] for x in xs)[len(xs) // 2]

    per_10k = {k: round(v * 10_000 / rows, 1) for k, v in sorted(requests.items())}
    return {
        "rows": rows, "in_flight": concurrency, "runs": repeats,
        "local_rows_per_s": round(med(local, 0)), "bucket_rows_per_s": round(med(bucket, 0)),
        "local_rows_per_s_all": [round(x[0]) for x in local], "bucket_rows_per_s_all": [round(x[0]) for x in bucket],
        "bucket_pct_of_local": round(100 * med(bucket, 0) / med(local, 0), 1),
        "local_first_request_s": round(med(local, 1), 2), "bucket_first_request_s": round(med(bucket, 1), 2),
        "local_sending_rows_per_s": round(med(local, 2)), "bucket_sending_rows_per_s": round(med(bucket, 2)),
        "bucket_sending_pct_of_local": round(100 * med(bucket, 2) / med(local, 2), 1),
        "requests_per_10k_rows": round(sum(requests.values()) * 10_000 / rows, 1), "requests_per_10k_by_kind": per_10k,
        "output_bytes": output_bytes, "bucket_checkpoint_bytes": bucket_bytes, "local_checkpoint_bytes": local_bytes,
        "bucket_checkpoint_per_output": round(bucket_bytes / output_bytes, 3),
        "local_checkpoint_per_output": round(local_bytes / output_bytes, 3),
    }
