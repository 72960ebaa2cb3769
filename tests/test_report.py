"""`pipeline report`: the page of a real run (ok, failed and labeled rows, local images and a
remote URL), opened in Debian's chromium driven by Playwright: thumbnails render, filters and
search change the rows shown, the charts draw, the console stays clean and no request leaves
the page. A screenshot is saved in test-artifacts/. Also: the size cap's sampling rule, the key
kept out, and the ways to ask for a report.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, ROOT, job_dict, page_data, read_output, run_cli, write_job, write_rows

pytest.importorskip("altair", reason="the report extra is not installed")
ARTIFACTS = ROOT / "test-artifacts"

SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["cat", "person", "thing"]},
                                           "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
          "required": ["label", "confidence"]}


def _labeled_run(tmp_path: Path, endpoint_factory: Any, *, extra_args: tuple[str, ...] = ("--report",),
                 env: dict[str, str] | None = None, **job_overrides: Any) -> tuple[Path, Any, Any]:
    shutil.copytree(DATA / "images", tmp_path / "images")
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    rows = [{"id": f"row-{i:05d}", "image": f"images/{images[i % len(images)]}", "prompt": f"Label picture row-{i:05d}"}
            for i in range(14)]
    rows.append({"id": "row-remote", "image": "https://images.example/far/away.png", "prompt": "Label the remote one"})
    write_rows(tmp_path / "m.csv", rows, "csv")
    ep = endpoint_factory(**{"row_faults": {"row-00003": "400", "row-00011": "400"}, "vary_labels": True,
                             **job_overrides.pop("serve", {})})
    job = write_job(tmp_path / "job.toml", job_dict(tmp_path / "m.csv", ep.base_url, tmp_path / "out", labels={"schema": SCHEMA},
                                                    **job_overrides))
    r = run_cli("run", str(job), *extra_args, env=env)
    assert r.returncode == 1, r.stderr  # two rows failed, the rest answered
    return job, ep, r


def test_the_report_in_a_real_browser(tmp_path: Path, endpoint_factory: Any, browser: Any) -> None:
    job, _, r = _labeled_run(tmp_path, endpoint_factory)
    report = tmp_path / "out" / "_report.html"
    assert f"report: {report}" in r.stderr
    out = read_output(tmp_path / "out")
    assert len(out) == 15
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(report.as_uri())
    page.wait_for_function("document.querySelectorAll('.chart svg').length === document.querySelectorAll('.chart').length")

    # thumbnails render: every thumbnail on the page decoded to a real picture
    widths = page.eval_on_selector_all("img.thumb", "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)))")
    assert len(widths) == 14 and all(w > 0 for w in widths)
    assert page.locator("a[href='https://images.example/far/away.png']").count() == 1  # a link, never fetched

    # the charts draw: an SVG with marks in every chart, a label distribution among them
    titles = page.locator(".chart h3").all_inner_texts()
    assert {"Rows done over time", "Latency", "Attempts per row", "Errors by kind", "Label: label"} <= set(titles)
    assert page.eval_on_selector_all(".chart svg", "ss => ss.every(s => s.getBoundingClientRect().width > 100)")
    assert page.locator(".chart svg .mark-rect path, .chart svg .mark-rect rect").count() > 0

    # an answer's usage details (the endpoint reports reasoning and 0 cached tokens) in its card
    figures = page.locator(".card:not(.error) .figures").first.inner_text()
    assert re.search(r"in, 0 cached, \d+ out, \d+ reasoning\)", figures), figures

    # a filter click changes the rows shown
    assert page.locator(".card").count() == 15
    page.select_option("#status", "error")
    assert page.locator(".card").count() == 2 and page.locator(".card.error").count() == 2
    assert sorted(page.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.id)")) == ["row-00003", "row-00011"]
    page.select_option("#status", "")
    cats = sum(1 for row in out if row["label"] == "cat")
    page.select_option("#label", label="label = cat")
    assert page.locator(".card").count() == cats
    page.select_option("#label", "")

    # the search finds a known answer (every row with that answer, and only those)
    answer = next(row["answer"] for row in out if row["id"] == "row-00007")
    same = sorted(row["id"] for row in out if row["answer"] and answer in row["answer"])
    assert len(same) < len([row for row in out if row["answer"]])  # the answers differ: the search has work to do
    page.fill("#search", answer)
    page.wait_for_function(f"document.querySelectorAll('.card').length === {len(same)}")
    assert sorted(page.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.id)")) == same
    page.fill("#search", "")

    # the run history and the settings are there, without the key
    assert page.locator("#runs tr").count() == 2
    assert '"model": "test-vl"' in page.locator("#settings").inner_text()

    page.wait_for_function("document.querySelectorAll('.card').length === 15")
    page.evaluate("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=False)
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), [u for u in requests if not u.startswith(("file:", "data:"))]


def test_the_size_cap_keeps_every_failed_row_then_an_even_sample(tmp_path: Path, endpoint_factory: Any) -> None:
    from pipeline.config import load_job
    from pipeline.tools.report import write_report

    ep = endpoint_factory(row_faults={f"picture row-{i:05d}": "400" for i in range(0, 400, 25)}, answer_bytes=1500)
    rows = [{"id": f"row-{i:05d}", "image": f"https://images.example/{i}.png", "prompt": f"Describe picture row-{i:05d}"}
            for i in range(400)]
    write_rows(tmp_path / "m.csv", rows, "csv")
    job = write_job(tmp_path / "job.toml", job_dict(tmp_path / "m.csv", ep.base_url, tmp_path / "out"))
    assert run_cli("run", str(job)).returncode == 1
    path = Path(write_report(load_job(job), tmp_path / "r.html", max_mb=1.6))
    assert path.stat().st_size <= 1.6 * 1024 * 1024
    data = page_data(path.read_text())
    ids = [row["id"] for row in data["rows"]]
    failed = {f"row-{i:05d}" for i in range(0, 400, 25)}
    assert failed <= set(ids) and len(ids) < 400
    assert ids == sorted(ids)  # manifest order
    others = [int(i[4:]) for i in ids if i not in failed]
    steps = {b - a for a, b in zip(others, others[1:]) if not {f"row-{n:05d}" for n in range(a + 1, b)} & failed}
    assert len(steps) == 1  # an even sample: every k-th other row
    assert "all 16 failed rows, then every" in data["sampling"]
    assert sum(c["title"] == "Errors by kind" for c in data["charts"]) == 1
    whole = Path(write_report(load_job(job), tmp_path / "all.html"))  # the default cap holds them all
    assert len(page_data(whole.read_text())["rows"]) == 400 and page_data(whole.read_text())["sampling"] is None


def test_the_report_holds_no_key(tmp_path: Path, endpoint_factory: Any) -> None:
    key = "sk-report-secret-0123456789"
    _, _, r = _labeled_run(tmp_path, endpoint_factory, env={"REPORT_KEY": key}, endpoint={"api_key_env": "REPORT_KEY"},
                           serve={"api_key": key, "row_faults": {"row-00003": "400", "row-00011": "400",
                                                                  "row-00005": "answer_echoes_key"}})
    html = (tmp_path / "out" / "_report.html").read_text()
    assert key not in html and "REPORT_KEY" in html


def test_pipeline_report_command_and_output_report_key(tmp_path: Path, endpoint_factory: Any) -> None:
    job, _, _ = _labeled_run(tmp_path, endpoint_factory, extra_args=(), output={"report": True})
    assert (tmp_path / "out" / "_report.html").exists()  # [output] report = true
    r = run_cli("report", str(job), "--out", str(tmp_path / "mine.html"))
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "mine.html")
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "out")) == 15  # the report beside the parts does not break readers
