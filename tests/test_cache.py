"""The request cache ([run] cache, pipeline/io/cache.py): answers reused by the request sent.

Real parts: the built-in endpoint over HTTP (its /stats count the requests it received), real
runs (in-process through pipeline.run, or `python -m pipeline` where a process must be killed),
a real SQLite file. Time is controlled by ageing entries in the file or by the cache's clock,
never by sleeping.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.config import load_job
from pipeline.errors import JobError
from pipeline.io.cache import CACHE_FILE, Cache, request_key
from pipeline.tools.status import job_status, render

from conftest import ROOT, job_dict, read_output, run_cli, url_manifest, write_job, write_rows

KEY = "sk-cache-test-0123456789abcdefSECRET"
N = 24
HOUR = 3600.0


def _job(tmp_path: Path, ep: Any, manifest: Path, *, out: str = "out", name: str = "t", **run: Any) -> Path:
    job = job_dict(manifest, ep.base_url, tmp_path / out, run={"shard_rows": 10, "cache": str(tmp_path / "cache"), **run},
                   endpoint={"api_key_env": "CACHE_TEST_KEY"},
                   pricing={"input_per_million": 1.0, "output_per_million": 2.0})
    job["name"] = name
    return write_job(tmp_path / f"{name}-{out}.toml", job)


def _run(job: Path, **kw: Any) -> pipeline.RunResult:
    os.environ["CACHE_TEST_KEY"] = KEY
    return pipeline.run(job, progress=False, **kw)


def _requests(ep: Any) -> int:
    n = ep.stats()["requests"]
    ep.reset()
    return n


def _answers(out: Path) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in read_output(out)}


def _cache_bytes(tmp_path: Path) -> bytes:
    folder = tmp_path / "cache"
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith(CACHE_FILE))


def test_restart_second_job_and_deleted_output_cost_nothing(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"00003": "answer_echoes_key"})
    manifest = url_manifest(tmp_path / "m.csv", N)
    job = _job(tmp_path, ep, manifest)
    first = _run(job)
    assert (first.exit_code, first.ok) == (0, N) and _requests(ep) == N
    assert first.summary["this_run"]["cached"] == 0
    answers = _answers(tmp_path / "out")

    again = _run(job, restart=True)  # --restart after an output-only change
    assert (again.exit_code, again.ok) == (0, N) and _requests(ep) == 0
    assert again.summary["this_run"] == {**again.summary["this_run"], "cached": N, "requests_sent": 0, "spent": 0.0}
    rows = read_output(tmp_path / "out")
    assert {r["id"]: r["answer"] for r in rows} == answers
    assert all(r["from_cache"] and r["attempts"] == 0 and r["cost"] == 0.0 and r["latency_ms"] is None
               and r["status"] == "ok" and r["prompt_tokens"] for r in rows)
    assert f"last run: {N} rows answered from the cache" in render(job_status(load_job(job, require_key=False)))

    second = _job(tmp_path, ep, manifest, out="other", name="t2")  # a second job over the same rows
    assert _run(second).ok == N and _requests(ep) == 0
    assert _answers(tmp_path / "other") == answers

    shutil.rmtree(tmp_path / "out")  # the output and the checkpoint deleted
    shutil.rmtree(tmp_path / ".pipeline")
    assert _run(job).ok == N and _requests(ep) == 0
    assert _answers(tmp_path / "out") == answers

    # the answer that echoed the key is in the cache scrubbed; no header, no key anywhere in the file
    assert "Bearer [key]" in answers["row-00003"]
    assert KEY.encode() not in _cache_bytes(tmp_path) and b"Bearer" + b" sk-" not in _cache_bytes(tmp_path)


def test_changed_prompts_send_only_those_rows_and_no_cache_refreshes(tmp_path: Path, endpoint: Any) -> None:
    manifest = url_manifest(tmp_path / "m.csv", N)
    job = _job(tmp_path, endpoint, manifest)
    assert _run(job).ok == N and _requests(endpoint) == N
    rows = [{"id": f"row-{i:05d}", "image": f"https://images.example/row/{i}.png",
             "prompt": f"Describe picture row-{i:05d}" + (" in French" if i % 6 == 0 else "")} for i in range(N)]
    write_rows(manifest, rows, "csv")
    res = _run(job, restart=True)
    assert res.ok == N and _requests(endpoint) == N // 6
    by_id = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert [i for i in by_id if not by_id[i]["from_cache"]] == [f"row-{i:05d}" for i in range(0, N, 6)]
    assert "in French" in by_id["row-00006"]["answer"]

    with sqlite3.connect(tmp_path / "cache" / CACHE_FILE) as db:
        t0 = db.execute("SELECT MAX(created) FROM entries").fetchone()[0]
    fresh = _run(job, restart=True, no_cache=True)  # every row sent, the fresh answers stored
    assert fresh.ok == N and fresh.summary["this_run"]["cached"] == 0 and _requests(endpoint) == N
    assert not any(r["from_cache"] for r in read_output(tmp_path / "out"))
    with sqlite3.connect(tmp_path / "cache" / CACHE_FILE) as db:
        created = [t for (t,) in db.execute("SELECT created FROM entries")]
    assert len(created) == N + N // 6  # the old prompts' answers stay
    assert sum(t > t0 for t in created) == N  # today's requests' answers replaced by the fresh ones


def test_ttl_expired_answers_are_sent_again_and_replaced(tmp_path: Path, endpoint: Any) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 12)
    job = _job(tmp_path, endpoint, manifest, cache_ttl="1h")
    assert _run(job).ok == 12 and _requests(endpoint) == 12
    with sqlite3.connect(tmp_path / "cache" / CACHE_FILE) as db:  # half the entries two hours old
        keys = [k for (k,) in db.execute("SELECT key FROM entries ORDER BY key")]
        db.executemany("UPDATE entries SET created = created - 7200 WHERE key = ?", [(k,) for k in keys[:6]])
    res = _run(job, restart=True)
    assert res.ok == 12 and res.summary["this_run"]["cached"] == 6 and _requests(endpoint) == 6
    assert _run(job, restart=True).summary["this_run"]["cached"] == 12 and _requests(endpoint) == 0  # replaced


def test_ttl_by_the_caches_clock(tmp_path: Path) -> None:
    now = [1000.0]
    cache = Cache.open(tmp_path, ttl_s=60, max_bytes=1 << 20, warn=pytest.fail, clock=lambda: now[0])
    assert cache is not None
    key = request_key("http://x/v1/chat/completions", b'{"model":"m"}')
    assert key != request_key("http://y/v1/chat/completions", b'{"model":"m"}')
    cache.put(key, b'{"a":1}')
    cache.write()
    now[0] += 59
    assert cache.get(key) == b'{"a":1}'
    now[0] += 2
    assert cache.get(key) is None
    cache.close()


def test_lru_eviction_under_a_tiny_cap(tmp_path: Path) -> None:
    now = [0.0]  # hours apart: a hit moves an entry's last use only when an hour old (TOUCH_AFTER_S)
    cache = Cache.open(tmp_path, ttl_s=None, max_bytes=10_000, warn=pytest.fail, clock=lambda: now[0])
    assert cache is not None
    keys = [request_key("u", str(i).encode()) for i in range(12)]
    for i, key in enumerate(keys[:8]):  # 8 x 1000 bytes: under the cap
        now[0] = i * HOUR
        cache.put(key, b"x" * 1000)
        cache.write()
    now[0] = 20 * HOUR
    assert cache.get(keys[0]) is not None  # used again: the most recent now
    cache.write()
    for i, key in enumerate(keys[8:], start=30):  # 4 more: the 11th crosses the cap; down to 90% of it
        now[0] = i * HOUR
        cache.put(key, b"x" * 1000)
        cache.write()
    kept = [i for i, k in enumerate(keys) if cache.get(k) is not None]
    assert kept == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # 1 and 2 were the least recently used; 0 was read
    cache.close()
    reopened = Cache.open(tmp_path, ttl_s=None, max_bytes=3000, warn=pytest.fail)  # a smaller cap, at open
    assert reopened is not None and sum(reopened.get(k) is not None for k in keys) == 2
    reopened.close()


def _popen(job: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CACHE_TEST_KEY": KEY, **(env or {})})


_OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from pipeline.io.cache import Cache
folder, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
warned = []
cache = Cache.open(folder, ttl_s=None, max_bytes=1 << 20, warn=warned.append)
assert cache is not None and not warned, warned
cache.close()
"""


def test_processes_opening_a_new_cache_at_once_all_use_it(tmp_path: Path) -> None:
    # Switching a new file to WAL answered "locked" at once to all but one of the processes that
    # opened it together (no busy wait), and those runs went on without the cache.
    import time
    for n in range(12):
        start = time.time() + 0.4
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(tmp_path / f"c{n}"), str(start)],
                                  cwd=ROOT, text=True, stderr=subprocess.PIPE) for _ in range(3)]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err


def test_two_processes_share_one_cache(tmp_path: Path, endpoint: Any) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 40)
    a = _popen(_job(tmp_path, endpoint, manifest, name="a", out="a"))
    b = _popen(_job(tmp_path, endpoint, manifest, name="b", out="b"))
    for proc in (a, b):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "request cache" not in err, err  # no warning: neither process was locked out
    sent = _requests(endpoint)
    assert 40 <= sent <= 80  # each row sent once or twice (both may ask before either stores)
    third = _job(tmp_path, endpoint, manifest, name="c", out="c")
    assert _run(third).summary["this_run"]["cached"] == 40 and _requests(endpoint) == 0


def test_kill_during_a_cached_run_then_resume(tmp_path: Path, endpoint: Any) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 30)
    job = _job(tmp_path, endpoint, manifest)
    killed = _popen(job, {"PIPELINE_CRASH_AT": "after_response:12"})  # killed while filling the cache
    killed.communicate(timeout=60)
    assert killed.returncode == 99
    killed_sent = _requests(endpoint)
    resumed = run_cli("run", str(job), env={"CACHE_TEST_KEY": KEY})
    assert resumed.returncode == 0, resumed.stderr
    resumed_sent = _requests(endpoint)
    assert 12 <= killed_sent and 30 <= killed_sent + resumed_sent <= 30 + 8  # in flight at the kill: bought twice
    with sqlite3.connect(tmp_path / "cache" / CACHE_FILE) as db:
        cached = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    # every answer of the run that finished is stored; the killed run's last half-second may not be
    assert resumed_sent <= cached <= 30 and cached >= 30 - 12

    killed = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job), "--restart"], cwd=ROOT, text=True,
                              stderr=subprocess.PIPE, env={**os.environ, "CACHE_TEST_KEY": KEY,
                                                           "PIPELINE_CRASH_AT": "after_response:9"})
    killed.communicate(timeout=60)  # killed while answering from the cache
    assert killed.returncode == 99
    resumed = run_cli("run", str(job), env={"CACHE_TEST_KEY": KEY})
    assert resumed.returncode == 0, resumed.stderr
    rows = read_output(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == [f"row-{i:05d}" for i in range(30)]  # every row exactly once
    assert all(r["status"] == "ok" for r in rows)
    # sent again: the rows not in the cache, and at most the requests in flight at the kill twice
    assert _requests(endpoint) <= (30 - cached) + 8
    with sqlite3.connect(tmp_path / "cache" / CACHE_FILE) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    cache = Cache.open(tmp_path / "cache", ttl_s=None, max_bytes=1 << 30, warn=pytest.fail)
    assert cache is not None
    cache.close()


def test_a_damaged_cache_file_is_a_warning_and_the_run_completes(tmp_path: Path, endpoint: Any, capfd: Any) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_FILE).write_bytes(b"not a database, " * 512)
    manifest = url_manifest(tmp_path / "m.csv", 8)
    assert _run(_job(tmp_path, endpoint, manifest)).exit_code == 0
    err = capfd.readouterr().err
    assert err.count("warning: the request cache") == 1 and "delete it" in err
    assert len(read_output(tmp_path / "out")) == 8 and _requests(endpoint) == 8


def test_config(tmp_path: Path) -> None:
    from pipeline.config import parse_job

    def run_table(**run: Any) -> Any:
        job = job_dict(tmp_path / "m.csv", "http://127.0.0.1:1/v1", tmp_path / "out", run=run)
        return parse_job(job, tmp_path / "job.toml", require_key=False).run

    assert run_table().cache is None  # off by default
    assert run_table(cache=False).cache is None
    assert run_table(cache="~/c").cache == Path.home() / "c"
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    try:
        assert run_table(cache=True).cache == tmp_path / "xdg" / "pipeline"
    finally:
        del os.environ["XDG_CACHE_HOME"]
    assert run_table(cache_ttl="7d").cache_ttl == 7 * 86400
    assert run_table(cache_ttl="1d12h").cache_ttl == 36 * 3600
    assert run_table(cache_ttl=90).cache_ttl == 90
    with pytest.raises(JobError, match=r"cache_ttl must be seconds or a duration"):
        run_table(cache_ttl="a week")
    with pytest.raises(JobError, match=r'\[run\] cache: not used with \[run\] mode = "batch"'):
        run_table(cache=True, mode="batch")


def test_a_serve_job_hits_across_runs(tmp_path: Path) -> None:
    """[serve]'s endpoint has a new port each run: the key names its options, not its URL."""
    manifest = url_manifest(tmp_path / "m.csv", 6)
    job = job_dict(manifest, "", tmp_path / "out", endpoint={"base_url": None}, serve={"latency_ms": 0},
                   run={"cache": str(tmp_path / "cache")})
    path = write_job(tmp_path / "serve.toml", job)
    assert _run(path).summary["this_run"]["requests_sent"] == 6
    again = _run(path, restart=True)
    assert (again.ok, again.summary["this_run"]["cached"], again.summary["this_run"]["requests_sent"]) == (6, 6, 0)


def _headed(tmp_path: Path, ep: Any, manifest: Path, headers: dict[str, str], out: str) -> Path:
    job = job_dict(manifest, ep.base_url, tmp_path / out, run={"cache": str(tmp_path / "cache")},
                   endpoint={"api_key_env": "CACHE_TEST_KEY", "headers": headers})
    job["name"] = out
    return write_job(tmp_path / f"{out}.toml", job)


def test_endpoint_headers_that_change_answers_are_in_the_key_and_a_secret_one_only_hashed(
        tmp_path: Path, endpoint_factory: Any, capfd: Any) -> None:
    """A gateway's route header picks another deployment: its answers are not the other route's.
    A billing header changes nothing: still a hit. A secret header is sent, keyed by its digest,
    and never written anywhere."""
    ep = endpoint_factory(record=True)
    manifest = url_manifest(tmp_path / "m.csv", 6)
    secret = "pk-portkey-0123456789SECRETVALUE"
    base = {"x-litellm-tags": "captions", "OpenAI-Project": "proj_a", "x-portkey-api-key": secret}
    assert _run(_headed(tmp_path, ep, manifest, base, "a")).ok == 6 and _requests(ep) == 6

    billing = _headed(tmp_path, ep, manifest, {**base, "OpenAI-Project": "proj_b"}, "b")  # who pays: same answers
    assert _run(billing).summary["this_run"]["cached"] == 6 and _requests(ep) == 0
    routed = _headed(tmp_path, ep, manifest, {**base, "x-litellm-tags": "labels"}, "c")  # another route: sent again
    assert _run(routed).summary["this_run"]["cached"] == 0
    rekeyed = _headed(tmp_path, ep, manifest, {**base, "x-portkey-api-key": secret + "2"}, "d")  # another secret
    assert _run(rekeyed).summary["this_run"]["cached"] == 0

    sent = [{k.lower(): v for k, v in r["headers"].items()} for r in ep.requests()]  # since the billing job
    assert sorted((h["x-litellm-tags"], h["x-portkey-api-key"], h["openai-project"]) for h in sent) == \
        [("captions", secret + "2", "proj_a")] * 6 + [("labels", secret, "proj_a")] * 6  # every request carried them
    assert secret.encode() not in _cache_bytes(tmp_path)
    err = capfd.readouterr().err
    assert secret not in err
    for out in ("a", "b", "c", "d"):
        assert all(secret not in str(r) for r in read_output(tmp_path / out))


def test_endpoint_headers_the_pipeline_sets_itself_are_refused(tmp_path: Path) -> None:
    manifest = url_manifest(tmp_path / "m.csv", 1)
    for headers, problem in (({"Authorization": "Bearer x"}, "set by the pipeline"),
                             ({"bad name": "x"}, "not a header name"),
                             ({"x-tag": "a\r\nInjected: 1"}, "one line of text")):
        job = job_dict(manifest, "http://127.0.0.1:9/v1", tmp_path / "out", endpoint={"headers": headers})
        with pytest.raises(JobError, match=rf"\[endpoint\] headers .*{problem}"):
            load_job(job, require_key=False)
