"""Notifications (issue 27) against a local HTTP server: one summary per failing run, none on a
clean 0 by default; the command gets the summary JSON on stdin; a notifier that hangs is cut off
at its timeout and the exit code is unchanged; the webhook URL and the command's arguments never
appear in any output."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import job_dict, read_output, run_cli, url_manifest, write_job

TOKEN = "T0NIGHTLY/B0SECRET/xoxb-webhook-token-42"


class Hook:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.answered = 0  # posts answered (after hang_s)
        self.hang_s = 0.0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/{TOKEN}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append({"path": self.path, "type": self.headers["Content-Type"], "body": json.loads(body)})
                time.sleep(hook.hang_s)
                hook.answered += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.server.shutdown()
    h.server.server_close()


def make_job(tmp_path: Path, base_url: str, notify: dict[str, Any], n: int = 30, name: str = "t") -> Path:
    manifest = url_manifest(tmp_path / f"{name}.csv", n)
    job = job_dict(manifest, base_url, tmp_path / f"out-{name}", notify=notify, run={"shard_rows": 10})
    job["name"] = name
    return write_job(tmp_path / f"{name}.toml", job)


def test_the_webhook_hears_once_of_a_failing_run_and_never_of_a_clean_one(tmp_path: Path, endpoint_factory: Any,
                                                                          hook: Hook) -> None:
    ep = endpoint_factory(row_faults={"row-00003": "400"})
    failing = make_job(tmp_path, ep.base_url, {"webhook": hook.url}, name="bad")
    r = run_cli("run", str(failing))
    assert r.returncode == 1, r.stderr
    assert len(hook.posts) == 1
    post = hook.posts[0]
    assert post["path"] == f"/services/{TOKEN}" and post["type"] == "application/json"
    body = post["body"]
    last_run = json.loads((tmp_path / ".pipeline" / "bad" / "last_run.json").read_text())
    assert body["ending"] == "failure" and body["exit_code"] == 1 == last_run["exit_code"]
    assert body["ok"] == 29 and body["failed"] == 1 and body["failed_by_kind"] == {"bad_request": 1}
    assert body["text"].startswith("pipeline bad on ") and "29 ok, 1 failed" in body["text"]
    assert "notified (webhook)" in r.stderr
    for secret in (TOKEN, "xoxb-webhook-token-42"):
        assert secret not in r.stderr + r.stdout
        for f in tmp_path.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes() or f.suffix == ".toml", f

    healthy = endpoint_factory()
    clean = make_job(tmp_path, healthy.base_url, {"webhook": hook.url}, name="good")
    assert run_cli("run", str(clean)).returncode == 0
    assert len(hook.posts) == 1  # none on a clean 0 by default

    told = make_job(tmp_path, healthy.base_url, {"webhook": hook.url, "on": ["success"]}, name="told")
    assert run_cli("run", str(told)).returncode == 0
    assert len(hook.posts) == 2 and hook.posts[1]["body"]["ending"] == "success"


def test_a_stopped_run_notifies_and_a_bad_manifest_too(tmp_path: Path, endpoint_factory: Any, hook: Hook) -> None:
    ep = endpoint_factory(row_faults={"row-00004": "quota"})
    job = make_job(tmp_path, ep.base_url, {"webhook": hook.url})
    assert run_cli("run", str(job)).returncode == 3
    assert [p["body"]["ending"] for p in hook.posts] == ["stopped"]
    assert hook.posts[0]["body"]["stopped"]["kind"] == "quota" and "quota" in hook.posts[0]["body"]["text"]

    (tmp_path / "t.csv").write_text("id,image,prompt\nonly-this-row,,x\n")  # rows already sent changed
    r = run_cli("run", str(job))
    assert r.returncode == 2
    assert [p["body"]["ending"] for p in hook.posts] == ["stopped", "failure"]
    assert hook.posts[1]["body"]["exit_code"] == 2 and "changed" in hook.posts[1]["body"]["error"]


def test_the_command_gets_the_summary_on_stdin_and_its_arguments_stay_hidden(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"row-00001": "400"})
    got = tmp_path / "got.json"
    secret_arg = "--routing-key=R0UTING-secret-77"
    script = f"import sys; open({str(got)!r}, 'w').write(sys.stdin.read())"
    job = make_job(tmp_path, ep.base_url, {"command": [sys.executable, "-c", script, secret_arg]})
    r = run_cli("run", str(job), "--log-format", "json")
    assert r.returncode == 1, r.stderr
    body = json.loads(got.read_text())
    assert body["exit_code"] == 1 and body["ending"] == "failure" and body["failed"] == 1
    assert "R0UTING-secret-77" not in r.stderr + r.stdout and "R0UTING-secret-77" not in got.read_text()
    assert any(json.loads(line)["event"] == "notified" for line in r.stderr.splitlines())


def test_notify_command_arguments_never_change_the_answers(tmp_path: Path, endpoint: Any) -> None:
    # The README's own example has ["--team", "vision"]: here words the built-in endpoint's answers hold.
    # Hidden from the job's redactor (which every journaled row passes), they rewrote every answer.
    plain = make_job(tmp_path, endpoint.base_url, {"webhook": "http://127.0.0.1:9/x"}, n=3, name="plain")
    paged = make_job(tmp_path, endpoint.base_url, {"command": ["/bin/true", "--team", "picture", "--severity", "Describe"],
                                                   "on": ["success"]}, n=3, name="paged")
    assert run_cli("run", str(plain)).returncode == 0
    r = run_cli("run", str(paged))
    assert r.returncode == 0 and "notified (command)" in r.stderr, r.stderr
    want = {r["id"]: r["answer"] for r in read_output(tmp_path / "out-plain")}
    got = {r["id"]: r["answer"] for r in read_output(tmp_path / "out-paged")}
    assert got == want and all("picture" in a for a in got.values())


def test_the_command_names_only_its_program_and_its_output_hides_its_arguments(tmp_path: Path,
                                                                              endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"row-00001": "400"})
    script = "import sys; print('refused with', sys.argv[1]); sys.exit(3)"
    job = make_job(tmp_path, ep.base_url, {"command": [sys.executable, "-c", script, "R0UTING-secret-77"]})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr
    assert f"the notify command failed (RuntimeError: {sys.executable} exited with 3: refused with [key])" in r.stderr
    assert "R0UTING-secret-77" not in r.stderr + r.stdout


def test_hanging_notifiers_are_cut_off_at_their_timeout_and_the_exit_code_stands(tmp_path: Path, endpoint_factory: Any,
                                                                                 hook: Hook) -> None:
    ep = endpoint_factory(row_faults={"row-00002": "400"})
    hook.hang_s = 30
    pid_file = tmp_path / "notifier.pid"
    # a shell, not a Python: it writes its pid within the 1.5 s even on a loaded machine
    job = make_job(tmp_path, ep.base_url, {"webhook": hook.url, "command": ["/bin/sh", "-c", f"echo $$ > '{pid_file}'; exec sleep 30"],
                                           "timeout_s": 1.5})
    r = run_cli("run", str(job))
    assert r.returncode == 1, r.stderr  # the rows' truth, not the notifiers'
    assert "the notify webhook failed (cut off after 1.5s)" in r.stderr
    assert "the notify command failed (cut off after 1.5s)" in r.stderr
    assert len(hook.posts) == 1 and hook.answered == 0  # it was reached, then given up on: its 30 s not waited for
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the hanging command was killed, not left behind
    assert len(read_output(tmp_path / "out-t")) == 30  # every row written


def test_a_webhook_whose_name_lookup_hangs_is_cut_off_at_its_timeout(tmp_path: Path) -> None:
    # The run's process resolves hooks.slow-dns.test in 60 s (a resolver that hangs), then leaves a
    # mark. asyncio.run waited for that lookup's thread, with no limit, after cutting the webhook off.
    site, mark = tmp_path / "site", tmp_path / "lookup-returned"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import socket, time\n"
        "_lookup = socket.getaddrinfo\n"
        "def getaddrinfo(host, *args, **kwargs):\n"
        "    if host == 'hooks.slow-dns.test':\n"
        "        time.sleep(60)\n"
        f"        open({str(mark)!r}, 'w').close()\n"
        "    return _lookup(host, *args, **kwargs)\n"
        "socket.getaddrinfo = getaddrinfo\n")
    # a manifest that is not there: exit 2 before any event loop of the run's (the stdlib's loop then,
    # whose name lookups run in its executor's threads)
    job = write_job(tmp_path / "t.toml", job_dict(tmp_path / "missing.csv", "http://127.0.0.1:9/v1", tmp_path / "out",
                                                  notify={"webhook": "http://hooks.slow-dns.test/hook", "timeout_s": 1}))
    r = run_cli("run", str(job), env={"PYTHONPATH": str(site)})
    assert r.returncode == 2, r.stderr  # the run's truth, not the notifier's
    assert "warning: the notify webhook failed (cut off after 1s); the run's result is unchanged" in r.stderr
    assert not mark.exists()  # the run ended while the lookup still hung: it was not waited for


def test_a_missing_command_is_a_warning(tmp_path: Path, endpoint_factory: Any) -> None:
    ep = endpoint_factory(row_faults={"row-00002": "400"})
    job = make_job(tmp_path, ep.base_url, {"command": [str(tmp_path / "no-such-pager")]})
    r = run_cli("run", str(job))
    assert r.returncode == 1 and "warning: the notify command failed (FileNotFoundError" in r.stderr


def test_a_notify_table_without_a_notifier_is_refused(tmp_path: Path, endpoint: Any) -> None:
    job = make_job(tmp_path, endpoint.base_url, {"on": ["failure"]})
    r = run_cli("run", str(job))
    assert r.returncode == 2 and "[notify]: set command, webhook or both" in r.stderr
    bad = make_job(tmp_path, endpoint.base_url, {"webhook": "ftp://x/secret-part", "on": ["failure"]}, name="u")
    r = run_cli("run", str(bad))
    assert r.returncode == 2 and "[notify] webhook must be an http:// or https:// URL" in r.stderr
    assert "secret-part" not in r.stderr
    odd = make_job(tmp_path, endpoint.base_url, {"webhook": "https://x/y", "on": ["sometimes"]}, name="v")
    r = run_cli("run", str(odd))
    assert r.returncode == 2 and "[notify] on unknown ending 'sometimes'" in r.stderr
