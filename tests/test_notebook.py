"""The Python API in a real Jupyter kernel (ipykernel, started by jupyter_client/nbclient): the
example notebook runs cell by cell (pipeline.run inside the kernel's running loop, then `await
pipeline.arun`), and a kernel interrupt stops a run as Ctrl-C does. Also the example script.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, read_output

nbformat = pytest.importorskip("nbformat", reason="the test extra (nbformat, nbclient, ipykernel) is not installed")
nbclient = pytest.importorskip("nbclient", reason="the test extra (nbclient) is not installed")
pytest.importorskip("ipykernel", reason="the test extra (ipykernel) is not installed")

EXAMPLES = ROOT / "examples"


def _outputs(cell: Any, streams: tuple[str, ...] = ("stdout", "stderr")) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out["name"] in streams:
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(parts)


def test_the_example_notebook_runs_in_a_real_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAMPLE_OUT", str(tmp_path))
    nb = nbformat.read(EXAMPLES / "captions.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError on any failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "RunResult(exit_code=0, ok=5, failed=0, pending=0, rows=5" in _outputs(code[1])
    assert "notebook: 5 ok, 0 failed (none), 0 pending of 5 rows; 5 requests" in _outputs(code[1], ("stderr",))
    assert _outputs(code[-1], ("stdout",)).split()[:3] == ["0", "5", "0"]  # the awaited rerun: ok, 5 rows, nothing sent
    rows = read_output(tmp_path / "notebook")
    assert sorted(r["id"] for r in rows) == ["astronaut", "badge", "chelsea", "coffee", "rocket"]
    assert all(r["status"] == "ok" and "image" in r["answer"] for r in rows)


SLOW_RUN = """
import pipeline
job = {{"name": "interrupted", "input": {{"id_column": "id", "image_column": "image", "prompt_column": "prompt"}},
       "endpoint": {{"model": "m", "base_url": {base_url!r}}},
       "limits": {{"requests_per_minute": 60000, "max_concurrency": 2}}, "output": {{"path": {out!r}}}}}
rows = [{{"id": f"r{{i:03d}}", "image": f"https://x/{{i}}.png", "prompt": f"p{{i}}"}} for i in range(60)]
res = pipeline.run(job, manifest=rows)
print("RESULT", res.exit_code, res.ok, res.pending)
"""


def test_a_kernel_interrupt_stops_the_run_like_ctrl_c(tmp_path: Path, endpoint_factory) -> None:
    from jupyter_client.manager import start_new_kernel

    ep = endpoint_factory(latency_ms=250)
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        code = textwrap.dedent(SLOW_RUN.format(base_url=ep.base_url, out=str(tmp_path / "out")))
        msg_id = kc.execute(code)
        deadline = time.monotonic() + 60
        while ep.stats()["requests"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        deadline = time.monotonic() + 120
        while reply["parent_header"].get("msg_id") != msg_id:  # a loaded machine: start_new_kernel's readiness
            assert time.monotonic() < deadline, "no reply to the interrupted cell"
            reply = kc.get_shell_msg(timeout=60)  # check sent kernel_info twice; its late reply is not ours
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok", reply["content"]
        text = _iopub_text(kc, msg_id)
        code_, ok, pending = (int(x) for x in text.split("RESULT", 1)[1].split()[:3])
        assert code_ == 130 and ok >= 4 and pending > 0 and ok + pending == 60, text
        # the kernel is still usable, and the same cell again finishes the job with every row once
        kc.execute_interactive(code, timeout=120)
        ids = [r["id"] for r in read_output(tmp_path / "out")]
        assert ids == [f"r{i:03d}" for i in range(60)]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _iopub_text(kc: Any, msg_id: str) -> str:
    text = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=10)
        except queue.Empty:
            break
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return "".join(text)


def test_the_example_script_runs_twice_sending_once(tmp_path: Path) -> None:
    env = {**os.environ, "EXAMPLE_OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(EXAMPLES / "caption_frame.py")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert first.returncode == 0, first.stderr
    assert "exit code 0: 5 ok, 0 failed, 0 pending" in first.stdout
    assert "5 requests this run" in first.stderr
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert "exit code 0: 5 ok" in second.stdout and "0 requests this run" in second.stderr
    assert not (ROOT / "examples" / ".pipeline").exists()  # the checkpoint lives beside the output, not in the repo
