"""The report at 100,000 rows: how long `pipeline report` takes, how big the page is, and how
smooth it stays in Debian's chromium (load, a filter, a search, a sort, a page turn), measured
with Playwright in the page itself (performance.now around each interaction, rendering included).

    python -m bench report
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import ROOT, WORK, endpoint, url_manifest, write_job

ROWS = 100_000


def run_report_bench() -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("Debian's chromium is not installed (apt-get install chromium)")
    work = WORK / "report"
    manifest = url_manifest(work / "m.csv", ROWS)
    out = work / "out"
    with endpoint(row_faults={"image 77": "400"}) as base_url:  # about 1% of rows fail: the filter has work
        job = write_job(work / "job.toml", manifest, base_url, out, concurrency=64, name="report-bench")
        subprocess.run([sys.executable, "-m", "pipeline", "run", str(job), "--restart"], cwd=ROOT, check=False,
                       capture_output=True)
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline", "report", str(job), "--max-mb", "200"], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    report_s = time.perf_counter() - started
    page_path = Path(r.stdout.strip())
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = b.new_page(viewport={"width": 1300, "height": 1000})
        t0 = time.perf_counter()
        page.goto(page_path.as_uri())
        page.wait_for_function("document.querySelectorAll('.card').length > 0")
        load_s = time.perf_counter() - t0
        shown = page.evaluate("document.getElementById('count').textContent")
        timings = {name: page.evaluate(f"""() => {{
            const t = performance.now(); {js}; document.body.offsetHeight; return performance.now() - t; }}""")
                   for name, js in [
                       ("filter_ms", "const s = document.getElementById('status'); s.value = 'error'; s.dispatchEvent(new Event('change'))"),
                       ("unfilter_ms", "const s = document.getElementById('status'); s.value = ''; s.dispatchEvent(new Event('change'))"),
                       ("sort_ms", "const s = document.getElementById('sort'); s.value = 'latency:-1'; s.dispatchEvent(new Event('change'))"),
                       ("page_turn_ms", "document.getElementById('next').click()"),
                   ]}
        page.fill("#search", "describe image 4242,")  # debounced 150 ms: measured from the input to the rows shown
        t0 = time.perf_counter()
        page.wait_for_function("document.getElementById('count').textContent.startsWith('1 of')")
        search_ms = (time.perf_counter() - t0) * 1000
        b.close()
    return {"rows": ROWS, "report_s": round(report_s, 2), "page_mb": round(page_path.stat().st_size / 2**20, 1),
            "load_s": round(load_s, 2), "rows_shown": shown, **{k: round(v, 1) for k, v in timings.items()},
            "search_ms_with_150ms_debounce": round(search_ms, 1)}


if __name__ == "__main__":
    print(run_report_bench())
