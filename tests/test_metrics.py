"""Metrics of a run (issue 27): scraped during a run by a real Prometheus server (Debian's
`prometheus`, which .ci/run installs) and checked against the output's own counts at the end; the
node_exporter textfile parsed with prometheus_client's own parser; a run without metrics never
loads prometheus_client."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, job_dict, read_output, run_cli, url_manifest, write_job

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_job(tmp_path: Path, base_url: str, n: int, **run: Any) -> Path:
    manifest = url_manifest(tmp_path / "m.csv", n)
    job = job_dict(manifest, base_url, tmp_path / "out", limits={"max_concurrency": 8, "max_attempts": 6},
                   run={"shard_rows": 50, **run})
    return write_job(tmp_path / "job.toml", job)


def output_counts(tmp_path: Path) -> dict[str, Any]:
    rows = read_output(tmp_path / "out")
    ok = [r for r in rows if r["status"] == "ok"]
    return {"ok": len(ok), "errors": Counter(r["error_kind"] for r in rows if r["status"] != "ok"),
            "prompt": sum(r["prompt_tokens"] or 0 for r in rows), "completion": sum(r["completion_tokens"] or 0 for r in rows),
            "latency_count": sum(1 for r in ok if r["latency_ms"] is not None)}


# -- a real Prometheus ---------------------------------------------------------------------

class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen) -> None:
        self.url, self.proc = url, proc

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        found = self.query(expr)
        return float(found[0]["value"][1]) if found else None

    def last(self, expr: str) -> float | None:
        """The last value scraped (once the run's server is gone, its series are stale: no value now)."""
        return self.value(f"last_over_time({expr}[5m])")

    def last_by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"][label]: float(r["value"][1]) for r in self.query(f"last_over_time({expr}[5m])")}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    """A Prometheus scraping 127.0.0.1:<port> every half second; yields it and the port to serve on."""
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus; .ci/run does it)")
    target, web = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 500ms
  scrape_timeout: 400ms
scrape_configs:
  - job_name: pipeline
    static_configs:
      - targets: ["127.0.0.1:{target}"]
""")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{web}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "Prometheus did not start"
            time.sleep(0.2)
    yield Prometheus(url, proc), target
    proc.terminate()
    proc.wait(20)


def test_prometheus_scrapes_the_run_and_its_counters_match_the_output(tmp_path: Path, endpoint_factory: Any,
                                                                       prometheus: tuple[Prometheus, int]) -> None:
    prom, port = prometheus
    ep = endpoint_factory(latency_ms=60, faults={"500": 0.05, "429": 0.03}, fault_retry_after_s=0.2,
                          row_faults={"row-00007": "400", "row-00011": "400"}, seed=3)
    n = 500
    job = make_job(tmp_path, ep.base_url, n, metrics_port=port, metrics_host="127.0.0.1", metrics_linger_s=20)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_running = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        running = prom.value('pipeline_running{job_name="t"}')
        if running == 1:
            seen_running = prom.value('pipeline_rows_total{job_name="t",status="ok"}')
        time.sleep(0.3)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # two rows refused: finished with failed rows
    assert seen_running is not None and seen_running < n, "Prometheus scraped the run while it lasted"

    # the final figures were scraped (the run lingered for one scrape): wait for Prometheus to have them
    deadline = time.monotonic() + 30
    while prom.last('pipeline_running{job_name="t"}') != 0:
        assert time.monotonic() < deadline, "the final scrape never reached Prometheus"
        time.sleep(0.3)
    out = output_counts(tmp_path)
    assert prom.last('pipeline_rows_total{job_name="t",status="ok"}') == out["ok"] == n - 2
    errors = prom.last_by('pipeline_rows_total{status="error"}', "error_kind")
    assert errors == {k: float(v) for k, v in out["errors"].items()} == {"bad_request": 2.0}
    by_code = prom.last_by("pipeline_requests_total", "code")
    assert sum(by_code.values()) == ep.stats()["requests"]  # every request the endpoint saw, by its status
    assert by_code["2xx"] == n - 2 and by_code["400"] == 2
    assert by_code.get("429", 0) == prom.last("pipeline_rate_limited_total")
    assert prom.last('pipeline_tokens_total{kind="prompt"}') == out["prompt"]
    assert prom.last('pipeline_tokens_total{kind="completion"}') == out["completion"]
    assert prom.last("pipeline_answer_latency_seconds_count") == out["latency_count"]
    assert prom.last("pipeline_rows_remaining") == 0 and prom.last("pipeline_exit_code") == 1
    assert prom.last('pipeline_output_rows{status="failed"}') == 2
    assert prom.last("pipeline_concurrency_limit") == 8
    assert (prom.last('pipeline_rate_limit_requests_per_minute{auto="false"}') or 0) > 0
    summary = json.loads((tmp_path / ".pipeline" / "t" / "last_run.json").read_text())
    assert prom.last("pipeline_last_success_timestamp_seconds") == pytest.approx(summary["ended"])
    assert prom.last("pipeline_run_start_timestamp_seconds") == pytest.approx(summary["started"])


def parse(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text()) for s in family.samples}


def sample(parsed: dict[Any, float], name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted({"job_name": "t", **labels}.items()))))


def test_the_textfile_is_written_during_the_run_and_at_the_end(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(latency_ms=40, row_faults={"row-00003": "400"})
    prom_file = tmp_path / "textfile" / "captions.prom"
    n = 400
    job = make_job(tmp_path, ep.base_url, n, metrics_file=str(prom_file))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    during = None
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if prom_file.exists():
            during = parse(prom_file)  # atomic: never half a file
            assert sample(during, "pipeline_running") in (0.0, 1.0)
        time.sleep(0.1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert during is not None
    final = parse(prom_file)
    summary = json.loads((tmp_path / ".pipeline" / "t" / "last_run.json").read_text())
    assert sample(final, "pipeline_running") == 0 and sample(final, "pipeline_exit_code") == summary["exit_code"] == 1
    assert sample(final, "pipeline_rows_total", status="ok", error_kind="") == summary["ok"] == n - 1
    assert sample(final, "pipeline_rows_total", status="error", error_kind="bad_request") == 1
    assert sample(final, "pipeline_requests_total", code="2xx") == n - 1
    assert sample(final, "pipeline_output_rows", status="pending") == summary["pending"] == 0
    assert sample(final, "pipeline_tokens_total", kind="prompt") == output_counts(tmp_path)["prompt"]
    assert sample(final, "pipeline_answer_latency_seconds_bucket", le="+Inf") == n - 1
    assert not [p for p in prom_file.parent.iterdir() if p != prom_file]  # no temporary file left behind


def test_a_run_without_metrics_never_loads_prometheus_client(tmp_path: Path, endpoint: Any) -> None:
    job = make_job(tmp_path, endpoint.base_url, 20)
    code = (f"import sys, pipeline; r = pipeline.run({str(job)!r}); "
            "print(r.exit_code, 'prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["0", "False"], out.stderr


def test_a_metrics_port_in_use_is_one_line_before_anything_is_sent(tmp_path: Path, endpoint: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        job = make_job(tmp_path, endpoint.base_url, 20, metrics_port=taken.getsockname()[1], metrics_host="127.0.0.1")
        r = run_cli("run", str(job))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "[run] metrics_port: cannot listen on 127.0.0.1:" in r.stderr and "choose another port" in r.stderr
    assert endpoint.stats()["requests"] == 0


def test_batch_mode_counts_its_batches_by_state(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(batch_in_progress_s=600.0)  # in progress until the batch clock is moved
    prom_file = tmp_path / "batch.prom"
    manifest = url_manifest(tmp_path / "m.csv", 6)
    job = write_job(tmp_path / "job.toml", job_dict(manifest, ep.base_url, tmp_path / "out",
                                                    run={"mode": "batch", "poll_s": 0.3, "metrics_file": str(prom_file)}))
    first = run_cli("run", str(job), "--no-wait")
    assert first.returncode == 5, first.stderr
    running = parse(prom_file)
    states = {dict(k[1])["state"]: v for k, v in running.items() if k[0] == "pipeline_batches"}
    assert sum(states.values()) == 1 and "collected" not in states, states
    assert sample(running, "pipeline_exit_code") == 5
    ep.advance_batches(601)  # the batch is done, on the endpoint's batch clock
    assert run_cli("run", str(job), "--no-wait").returncode == 0
    done = parse(prom_file)
    assert sample(done, "pipeline_batches", state="collected") == 1
    assert sample(done, "pipeline_rows_total", status="ok", error_kind="") == 6
    assert sample(done, "pipeline_last_success_timestamp_seconds") is not None


def test_the_textfile_says_how_a_run_that_failed_to_start_ended(tmp_path: Path, endpoint: Any) -> None:
    # A run that ends before its summary (exit 2: the manifest was edited; 4: a local failure) left
    # the textfile saying pipeline_running 1, with no exit code, for as long as nothing ran again.
    prom = tmp_path / "t.prom"
    job = make_job(tmp_path, endpoint.base_url, 20, shard_rows=10, metrics_file=str(prom))
    assert run_cli("run", str(job)).returncode == 0
    manifest = tmp_path / "m.csv"
    manifest.write_text(manifest.read_text().replace("row-00003", "row-zzz03"))  # rows already sent changed: refused
    r = run_cli("run", str(job))
    assert r.returncode == 2, r.stderr
    parsed = parse(prom)
    assert sample(parsed, "pipeline_running") == 0 and sample(parsed, "pipeline_exit_code") == 2, prom.read_text()
