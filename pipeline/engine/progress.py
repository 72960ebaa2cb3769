"""The progress bar: rows done over the job's rows, ok and failed, spend; on stderr when it is a
terminal (or when asked), fed by whichever executor runs the job.

    with Progress(options.progress, total=plan.total_rows, initial=done_before) as bar:
        bar.show(done, ok=..., failed=..., spent=...)
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Progress", "PROGRESS_EVERY_S"]

PROGRESS_EVERY_S = 0.25


def _in_notebook() -> bool:
    """A Jupyter kernel runs this process (IPython is imported only where it is in use)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    def __init__(self, show: bool | None, *, total: int, initial: int = 0, auto: bool = False) -> None:
        """`auto`: tqdm.auto's bar (a widget in a notebook, shown there by default)."""
        if show is None:
            show = sys.stderr.isatty() or (auto and _in_notebook())
        self._bar: Any = None
        if show:
            if auto:
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm  # imported only for a bar

            self._bar = tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, smoothing=0.1, file=sys.stderr)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def show(self, done: int, *, ok: int, failed: int, spent: float | None = None) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.update(done - bar.n)
        extra = {"spent": f"{spent:.4f}"} if spent is not None else {}
        bar.set_postfix(ok=ok, failed=failed, **extra, refresh=False)
