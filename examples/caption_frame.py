"""Caption a DataFrame of local images with pipeline's Python API, against the built-in endpoint
(no key, no network, no cost). Run it from the repository root:

    .venv/bin/python examples/caption_frame.py

No `if __name__ == "__main__":` guard is needed: the image worker processes never import this
script. Run it twice: the second run finds every answer in the checkpoint and sends nothing.
"""

import os
from pathlib import Path

import pandas as pd

import pipeline

HERE = Path(__file__).resolve().parent
IMAGES = HERE.parent / "data" / "demo" / "images"
OUT = Path(os.environ.get("EXAMPLE_OUT", HERE.parent / "out" / "examples"))

# The job as a dict shaped like a TOML job file. With a manifest given in memory, [input] path is
# left out; relative paths (output, image cells) resolve against the working directory.
job = pipeline.load_job({
    "name": "caption-frame",
    "input": {"id_column": "id", "image_column": "image", "prompt_column": "prompt"},
    "endpoint": {"model": "qwen2-vl-7b-instruct"},
    "request": {"max_tokens": 256},
    "images": {"allowed_roots": [str(IMAGES)], "max_side": 512},
    "limits": {"requests_per_minute": 600, "max_concurrency": 4},
    "output": {"path": str(OUT / "caption-frame")},
    "serve": {"latency_ms": 50},  # the built-in endpoint, started and stopped by the run
})

frame = pd.DataFrame({
    "id": [p.stem for p in sorted(IMAGES.iterdir())],
    "image": [str(p) for p in sorted(IMAGES.iterdir())],
    "prompt": "Describe this picture in one sentence.",
})

result = pipeline.run(job, manifest=frame)
print(f"exit code {result.exit_code}: {result.ok} ok, {result.failed} failed, {result.pending} pending; "
      f"output in {result.output}")
print(result.to_pandas()[["id", "status", "answer"]].to_string(index=False, max_colwidth=60))
