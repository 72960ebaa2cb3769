"""`pipeline compare`: three labeling jobs over one manifest, each answered by its own endpoint with
labels the test chose (`[serve] row_answers`), so the figures are known by hand: two jobs agree on
9 of 12 rows with Cohen's kappa 29/47, three on 7 of 12 with Fleiss' kappa 62/107. The page is
opened in Debian's chromium (Playwright), as the report is: the figures shown, the confusion
matrix drawn, the "models disagree" filter, a row missing from a job shown as missing, the key
kept out, nothing loaded from anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, ROOT, job_dict, page_data, run_cli, write_job, write_rows

from pipeline.tools.compare.agreement import agreement, cohen_kappa, fleiss_kappa

pytest.importorskip("altair", reason="the report extra is not installed")
ARTIFACTS = ROOT / "test-artifacts"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["cat", "dog", "bird"]},
                                           "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
          "required": ["label", "confidence"]}
# The hand-made table: each job's label for rows 0 to 11.
A = "cat cat cat cat cat dog dog dog dog bird bird bird".split()
B = "cat cat cat cat dog dog dog dog bird bird bird cat".split()
C = "cat cat cat dog dog dog dog bird bird bird bird cat".split()
CONFIDENCE = {"a": 0.8, "b": 0.6, "c": 0.7}
KEY = "sk-compare-secret-0123456789"


def test_the_figures_of_a_hand_made_table() -> None:
    # Two jobs: 9 of 12 agree; marginals cat 5, dog 4, bird 3 on both sides, so chance agreement is
    # (25 + 16 + 9) / 144 = 50/144 and kappa = (108/144 - 50/144) / (1 - 50/144) = 58/94 = 29/47.
    two = agreement(list(zip(A, B)))
    assert (two.rows, two.rate, two.kappa_kind) == (12, 0.75, "Cohen") and two.kappa == pytest.approx(29 / 47)
    # Three jobs: 7 rows all alike (P_i = 1), 5 split 2-1 (P_i = 1/3): P = 13/18; value shares 14, 12, 10
    # of 36: P_e = 440/1296; kappa = (936 - 440) / (1296 - 440) = 496/856 = 62/107.
    three = agreement(list(zip(A, B, C)))
    assert (three.rows, three.kappa_kind) == (12, "Fleiss") and three.rate == pytest.approx(7 / 12)
    assert three.kappa == pytest.approx(62 / 107)
    assert cohen_kappa(["cat"] * 4, ["cat"] * 4) is None  # one value only: chance agreement is 1, kappa undefined
    assert cohen_kappa(["cat", "dog"], ["dog", "cat"]) == pytest.approx(-1.0)
    assert fleiss_kappa([["a", "a", "a"], ["b", "b", "b"]]) == pytest.approx(1.0)
    assert agreement([]).rate is None and agreement([]).kappa is None


def _answer(label: str, confidence: float, note: str = "") -> str:
    return json.dumps({"label": label, "confidence": confidence, **({"note": note} if note else {})})


def _jobs(tmp_path: Path, endpoint_factory: Any) -> dict[str, Path]:
    """Jobs a, b and c over one manifest of 14 rows: rows 0-11 labeled as the table says; b's
    manifest lacks row 12 (missing there), and b's row 13 fails (a 400)."""
    shutil.copytree(DATA / "images", tmp_path / "images")
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    rows = [{"id": f"row-{i:05d}", "image": f"images/{names[i % len(names)]}", "prompt": f"Label picture row-{i:05d}"}
            for i in range(14)]
    write_rows(tmp_path / "m.csv", rows, "csv")
    write_rows(tmp_path / "m-b.csv", rows[:12] + rows[13:], "csv")
    jobs = {}
    for name, table in (("a", A), ("b", B), ("c", C)):
        answers = {f"row-{i:05d}": _answer(v, CONFIDENCE[name]) for i, v in enumerate(table)}
        answers["row-00012"] = _answer("cat", 0.5, note=f"the key was {KEY}")  # a model echoing a secret
        ep = endpoint_factory(model=f"model-{name}", row_answers=answers, api_key=KEY,
                              row_faults={"row-00013": "400"} if name == "b" else {})
        manifest = tmp_path / ("m-b.csv" if name == "b" else "m.csv")
        data = job_dict(manifest, ep.base_url, tmp_path / f"out-{name}", labels={"schema": SCHEMA},
                        endpoint={"model": f"model-{name}", "api_key_env": "COMPARE_KEY"})
        jobs[name] = write_job(tmp_path / f"{name}.toml", {**data, "name": name})
        r = run_cli("run", str(jobs[name]), env={"COMPARE_KEY": KEY})
        assert r.returncode == (1 if name == "b" else 0), r.stderr
    return jobs


def test_compare_two_and_three_labeling_jobs(tmp_path: Path, endpoint_factory: Any, browser: Any) -> None:
    jobs = _jobs(tmp_path, endpoint_factory)
    r = run_cli("compare", str(jobs["a"]), str(jobs["b"]), "--out", str(tmp_path / "ab.html"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "ab.html")
    html = (tmp_path / "ab.html").read_text()
    assert KEY not in html
    data = page_data(html)

    # the figures, as computed by hand
    (label, confidence) = data["fields"]
    assert (label["name"], label["rows"], label["agreement"], label["kappa_kind"]) == ("label", 12, 0.75, "Cohen")
    assert label["kappa"] == pytest.approx(29 / 47)
    counts = {(c["a"], c["b"]): c["rows"] for c in label["pairs"][0]["counts"]}
    assert counts == {("cat", "cat"): 4, ("cat", "dog"): 1, ("dog", "dog"): 3, ("dog", "bird"): 1,  # by hand
                      ("bird", "bird"): 2, ("bird", "cat"): 1}
    assert confidence["kind"] == "number" and confidence["mean_abs_difference"] == pytest.approx(0.2)
    by_name = {j["name"]: j for j in data["jobs"]}
    assert (by_name["a"]["rows"], by_name["a"]["ok"], by_name["a"]["missing"]) == (14, 14, 0)
    assert (by_name["b"]["rows"], by_name["b"]["ok"], by_name["b"]["failed"], by_name["b"]["missing"]) == (13, 12, 1, 1)
    assert by_name["b"]["served"] == "model-b"
    assert [row["id"] for row in data["rows"]] == [f"row-{i:05d}" for i in range(14)]  # none dropped

    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto((tmp_path / "ab.html").as_uri())
    page.wait_for_function("document.querySelectorAll('.chart svg').length === document.querySelectorAll('.chart').length")

    # the figures on the page
    row = page.locator("#agreement tr[data-field='label']")
    assert row.locator("[data-key=rows]").inner_text() == "12"
    assert row.locator("[data-key=agreement]").inner_text() == "75.0%"
    assert row.locator("[data-key=kappa]").inner_text() == f"{29 / 47:.3f} (Cohen)"
    assert page.locator("#agreement tr[data-field='confidence'] [data-key=mad]").inner_text() == "0.200"
    assert page.locator("#jobs tr[data-job='b'] [data-key=missing]").inner_text() == "1"

    # the confusion matrix drawn, its counts in its cells
    titles = page.locator(".chart h3").all_inner_texts()
    assert "Confusion: label, a vs b" in titles and "Tokens per answered row" in titles
    matrix = page.locator(".chart", has_text="Confusion: label, a vs b")
    assert matrix.locator("svg .mark-rect path, svg .mark-rect rect").count() >= 1
    shown = matrix.locator("svg .mark-text.role-mark text").evaluate_all("ts => ts.map(t => t.textContent)")
    assert sorted(shown) == sorted(str(n) for n in counts.values())

    # every row, images side by side with both jobs' answers; a row missing from b shown as missing
    assert page.locator("article.row").count() == 14
    # lazy images below the fold load once asked to (a decode() of one never loaded would wait forever)
    widths = page.eval_on_selector_all("img.thumb", """imgs => Promise.race([
        Promise.all(imgs.map(i => { i.loading = "eager"; return i.decode().then(() => i.naturalWidth); })),
        new Promise((_, no) => setTimeout(() => no(new Error("thumbnails did not decode within 20 s")), 20000))])""")
    assert len(widths) == 14 and all(w > 0 for w in widths)
    missing = page.locator("article.row[data-id='row-00012'] .side[data-job='b']")
    assert missing.locator(".status").inner_text() == "missing"
    assert page.locator("article.row[data-id='row-00012'] .side[data-job='a'] .answer").count() == 1

    # the filters
    page.select_option("#filter", "disagree")
    ids = page.locator("article.row").evaluate_all("rs => rs.map(r => r.dataset.id)")
    assert ids == ["row-00004", "row-00008", "row-00011"]
    differs = page.locator("article.row[data-id='row-00008'] .side[data-job='b'] .chips span.differs").inner_text()
    assert differs == "label: bird"
    page.select_option("#filter", "missing")
    assert page.locator("article.row").evaluate_all("rs => rs.map(r => r.dataset.id)") == ["row-00012"]
    page.select_option("#filter", "failed")
    assert page.locator("article.row").evaluate_all("rs => rs.map(r => r.dataset.id)") == ["row-00013"]
    page.select_option("#filter", "")
    page.fill("#search", "row-00007")
    page.wait_for_function("document.querySelectorAll('article.row').length === 1")

    page.fill("#search", "")
    page.wait_for_function("document.querySelectorAll('article.row').length === 14")
    page.evaluate("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=False)
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), [u for u in requests if not u.startswith(("file:", "data:"))]

    # three jobs: Fleiss' kappa, every pair's confusion matrix; from Python
    import pipeline

    path = pipeline.compare(jobs["a"], jobs["b"], jobs["c"], out=tmp_path / "abc.html")
    three = page_data(Path(path).read_text())
    (label3, confidence3) = three["fields"]
    assert (label3["rows"], label3["kappa_kind"]) == (12, "Fleiss")
    assert label3["agreement"] == pytest.approx(7 / 12) and label3["kappa"] == pytest.approx(62 / 107)
    assert confidence3["mean_abs_difference"] == pytest.approx((0.2 + 0.1 + 0.1) / 3)
    assert [(p["a"], p["b"]) for p in label3["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert sum(c["title"].startswith("Confusion") for c in three["charts"]) == 3

    # a page over its cap (read in two passes, a part at a time): every row where the jobs
    # disagree, one is missing or one failed, then an even sample of the others; the figures count every row
    from pipeline.tools.report import script_safe, vega_bundle

    room = len(script_safe(vega_bundle()).encode()) + 200_000 + 60_000  # the page's share, then ~6 rows
    small = page_data(Path(pipeline.compare(jobs["a"], jobs["b"], out=tmp_path / "small.html",
                                             max_mb=room / 2**20)).read_text())
    ids = [row["id"] for row in small["rows"]]
    assert ids == ["row-00000", "row-00004", "row-00008", "row-00011", "row-00012", "row-00013"], ids
    assert small["sampling"].startswith("the page holds 6 of 14 rows") and small["total"] == 14
    assert "then every 9th other row" in small["sampling"]  # each row reckoned by its own texts and thumbnail
    assert small["fields"] == data["fields"] and small["jobs"] == data["jobs"]


def test_compare_refuses_a_single_job(tmp_path: Path) -> None:
    write_rows(tmp_path / "m.csv", [{"id": "x", "image": "https://i.example/x.png", "prompt": "p"}], "csv")
    job = write_job(tmp_path / "j.toml", job_dict(tmp_path / "m.csv", "http://127.0.0.1:9/v1", tmp_path / "out"))
    r = run_cli("compare", str(job))
    assert r.returncode == 2 and "compare needs two jobs or more" in r.stderr
    r = run_cli("compare", str(job), str(job))
    assert r.returncode == 2 and "names repeat" in r.stderr


def test_compare_shows_image_bytes_kept_in_the_outputs(tmp_path: Path, endpoint: Any) -> None:
    """Outputs that keep the manifest's image bytes ([output] keep_media) are compared with those
    images as thumbnails; the bytes were taken for a file path and compare stopped on an
    AttributeError. Outputs that keep a reference instead say so."""
    pictures = sorted((DATA / "images").iterdir())[:3]
    rows = [{"id": f"r{i}", "image": p.read_bytes(), "prompt": f"Label picture r{i}"} for i, p in enumerate(pictures)]
    write_rows(tmp_path / "m.parquet", rows, "parquet")
    jobs = []
    for name, keep in (("a", True), ("b", True), ("c", False)):
        data = job_dict(tmp_path / "m.parquet", endpoint.base_url, tmp_path / f"out-{name}",
                        output={"keep_media": keep})
        jobs.append(write_job(tmp_path / f"{name}.toml", {**data, "name": name}))
        r = run_cli("run", str(jobs[-1]))
        assert r.returncode == 0, r.stderr
    for pair, shown in (((0, 1), "thumb"), ((2, 0), "note")):
        out = tmp_path / f"{pair}.html"
        r = run_cli("compare", str(jobs[pair[0]]), str(jobs[pair[1]]), "--out", str(out))
        assert r.returncode == 0, r.stderr
        images = [row["images"] for row in page_data(out.read_text())["rows"]]
        assert [[next(iter(i)) for i in cell] for cell in images] == [[shown]] * 3, images
        if shown == "thumb":
            assert all(cell[0]["thumb"].startswith("data:image/") for cell in images)
        else:
            assert all("image bytes given in the manifest" in cell[0]["note"] for cell in images)
