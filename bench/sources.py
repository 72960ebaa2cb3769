"""Sources: planning a folder of 10,000,000 rows in 1,000 Parquet files, and the memory planning
and the engine's feed take over 2 GB of embedded images.

    python -m bench sources

The data is generated once into bench/work/ (about 40 s, kept for the next run). Each figure is
taken in a fresh process (its peak RSS is its own): planning the folder (listing, every file's
footer, every shard's digest streamed), planning it again when nothing changed (a listing), and
with an id column (every id hashed and checked). Then 20,000 rows of 100 KB images in one
Parquet file: planning it (its digests read a window of rows at a time), and feeding one shard of
10,000 rows to the engine as a run does (the light columns held, the image bytes read
MEDIA_ROWS at a time and turned into Python objects), without sending. pyarrow decodes a row
group's column at a time: memory follows the file's row groups (here 500 rows, 50 MB), never the
shard's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from .common import ROOT, WORK

FILES, ROWS_PER_FILE = 1000, 10_000
IMAGES, IMAGE_BYTES = 20_000, 100_000


def _parts(folder: Path) -> Path:
    done = folder / "_complete"
    if done.exists():
        return folder
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    n = np.arange(ROWS_PER_FILE)
    image = pa.array([f"https://images.example/bench/{i:07d}.jpg" for i in range(ROWS_PER_FILE)])
    prompt = pa.array([f"Describe picture {i:07d} in one sentence." for i in range(ROWS_PER_FILE)])
    for k in range(FILES):
        ids = pa.array([f"f{k:04d}-{i:05d}" for i in range(ROWS_PER_FILE)])
        table = pa.table({"id": ids, "image": image, "prompt": prompt, "n": pa.array(n + k * ROWS_PER_FILE)})
        pq.write_table(table, folder / f"part-{k:05d}.parquet")
    done.write_text("")
    return folder


def _images(path: Path) -> Path:
    if path.exists():
        return path
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string())])
    with pq.ParquetWriter(tmp, schema, compression="none") as writer:
        for start in range(0, IMAGES, 500):  # row groups of 500 rows (50 MB), as HF writes images in small groups
            blobs = [b"\xff\xd8\xff" + rng.bytes(IMAGE_BYTES - 3) for _ in range(500)]
            writer.write_table(pa.table({"id": [f"img-{i}" for i in range(start, start + 500)], "image": blobs,
                                         "prompt": ["Caption this image."] * 500}, schema=schema))
    os.replace(tmp, path)
    return path


def _measure(code: str) -> dict[str, Any]:
    """Run `code` in a fresh process; it prints a JSON line of figures; its peak RSS is added."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would count this process's peak
    prelude = textwrap.dedent("""
        import json, time
        from pathlib import Path
        def hwm():
            line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024

        from pipeline.config import InputConfig
        from pipeline.engine.process import tune_memory
        from pipeline.io.manifest import current_plan, plan_manifest
        tune_memory()  # the allocators `pipeline run` sets
        base_rss = hwm()
    """)
    tail = "\nout['peak_rss_mb'] = hwm()\nout['imports_rss_mb'] = base_rss\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + tail], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sources_bench() -> dict[str, Any]:
    folder = _parts(WORK / "sources-10m")
    plan = _measure(f"""
        cfg = InputConfig(path=Path({str(folder)!r}))
        t = time.perf_counter(); listing = __import__('pipeline.io.sources', fromlist=['x']).source_for(cfg).listing()
        listed = time.perf_counter() - t
        t = time.perf_counter(); plan = plan_manifest(cfg, 10_000); planned = time.perf_counter() - t
        t = time.perf_counter(); again, changed = current_plan(cfg, 10_000, plan); rerun = time.perf_counter() - t
        out = dict(files=len(plan.files), rows=plan.total_rows, shards=len(plan.shards), listing_s=listed,
                   plan_s=planned, rows_per_s=plan.total_rows / planned, rerun_s=rerun, rerun_planned_again=changed)
    """)
    with_ids = _measure(f"""
        cfg = InputConfig(path=Path({str(folder)!r}), id_column="id")
        t = time.perf_counter(); plan = plan_manifest(cfg, 10_000); planned = time.perf_counter() - t
        out = dict(rows=plan.total_rows, plan_s=planned, rows_per_s=plan.total_rows / planned)
    """)
    images = _images(WORK / "images-2gb.parquet")
    saved = WORK / "images-2gb.plan.json"  # the feed's process loads the plan: its peak is the feed's alone
    bytes_plan = _measure(f"""
        cfg = InputConfig(path=Path({str(images)!r}), image_column="image", prompt_column="prompt")
        t = time.perf_counter(); plan = plan_manifest(cfg, 10_000); planned = time.perf_counter() - t
        Path({str(saved)!r}).write_text(json.dumps(plan.to_dict()))
        out = dict(rows=plan.total_rows, gb=Path({str(images)!r}).stat().st_size / 1e9, plan_s=planned)
    """)
    feed = _measure(f"""
        import asyncio
        from pipeline.config import parse_job
        from pipeline.engine.feed import Feed
        from pipeline.io.plan import load_plan_dict
        job = parse_job({{"name": "b", "input": {{"path": {str(images)!r}, "image_column": "image", "prompt_column": "prompt"}},
                          "endpoint": {{"base_url": "http://x/v1", "model": "m"}}, "output": {{"path": "/tmp/unused"}}}},
                        Path("/tmp/b.toml"), require_key=False)
        plan = load_plan_dict(json.loads(Path({str(saved)!r}).read_text()))
        feed = Feed(job, plan, ["image", "prompt"])
        async def go():
            rows = await feed.open(plan.shards[0])
            n = 0
            async for batch in feed.cells(plan.shards[0], rows.table, list(range(plan.shards[0].rows)), refer=True):
                n += sum(len(c["image"]) for _, c in batch)
            feed.filled(plan.shards[0], rows.table)  # the references, made from the bytes fed
            return n
        t = time.perf_counter(); seen = asyncio.run(go()); fed = time.perf_counter() - t
        out = dict(shard_rows=plan.shards[0].rows, image_mb_fed=seen / 1e6, feed_s=fed)
    """)
    image_folder = _measure("""
        from pipeline.config import InputConfig
        from pipeline.io.ckpt_base import dumps as _json
        from pipeline.io.plan import FileInfo, load_plan_dict
        from pipeline.io.sources.images import ImageSource
        from pipeline.io.sources.location import Listing
        root = Path("/tmp/bench-image-folder"); root.mkdir(exist_ok=True); (root / "a.jpg").write_bytes(b"x")
        files = [FileInfo(f"cats/{i // 1000:04d}/{i:07d}.jpg", 100_000 + i, str(1712345678901234567 + i * 1000))
                 for i in range(1_000_000)]  # a listing of a million images, as a bucket prefix gives it
        source = ImageSource(InputConfig(path=root, format="images"), str(root))
        t = time.perf_counter(); plan = source.plan(10_000, Listing(False, files, {}, str(root))); planned = time.perf_counter() - t
        t = time.perf_counter(); data = _json(plan.to_dict()); written = time.perf_counter() - t
        t = time.perf_counter(); plan = load_plan_dict(json.loads(data)); loaded = time.perf_counter() - t
        source.read(plan, plan.shards[0])
        t = time.perf_counter(); source.read(plan, plan.shards[50]); read = time.perf_counter() - t
        out = dict(images=len(files), plan_s=planned, plan_json_mb=len(data) / 1e6, write_s=written, load_s=loaded,
                   shard_read_s=read)
    """)
    return {"plan_10m": plan, "plan_10m_with_ids": with_ids, "plan_2gb_images": bytes_plan, "feed_one_shard": feed,
            "plan_1m_image_folder": image_folder}


def target_line(r: dict[str, Any]) -> str:
    p, i, b, f = r["plan_10m"], r["plan_10m_with_ids"], r["plan_2gb_images"], r["feed_one_shard"]
    return (f"planning {p['rows']:,} rows in {p['files']} Parquet files: {p['plan_s']:.1f}s = {p['rows_per_s']:,.0f} rows/s "
            f"(listing {p['listing_s']:.2f}s), peak RSS {p['peak_rss_mb']:.0f} MB ({p['imports_rss_mb']:.0f} after imports); "
            f"unchanged rerun {p['rerun_s']:.2f}s; with ids {i['plan_s']:.1f}s, {i['peak_rss_mb']:.0f} MB; "
            f"{b['gb']:.1f} GB of images planned in {b['plan_s']:.1f}s at {b['peak_rss_mb']:.0f} MB; one shard of "
            f"{f['shard_rows']:,} images fed in {f['feed_s']:.1f}s at {f['peak_rss_mb']:.0f} MB peak"
            + (f"; an image folder of {g['images']:,}: plan.json {g['plan_json_mb']:.1f} MB, a shard read in "
               f"{g['shard_read_s'] * 1000:.0f} ms" if (g := r.get("plan_1m_image_folder")) else ""))
