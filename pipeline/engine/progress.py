"""The progress bar: rows done over the job's rows, ok and failed, spend; on stderr when it is a
terminal (or when asked), fed by whichever executor runs the job.

    with Progress(options.progress, total=plan.total_rows, initial=done_before) as bar:
        bar.show(done, ok=..., failed=..., spent=...)
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["Progress", "PROGRESS_EVERY_S"]

PROGRESS_EVERY_S = 0.25


def _in_notebook() -> bool:
    """A Jupyter kernel runs this process (IPython is imported only where it is in use)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    def __init__(self, show: bool | None, *, total: int, initial: int = 0, auto: bool = False) -> None:
        """`auto`: tqdm.auto's bar (a widget in a notebook, shown there by default)."""
        if show is None:
            show = sys.stderr.isatty() or (auto and _in_notebook())
        self._bar: tqdm[NoReturn] | None = None
        options: dict[str, Any] = {"total": total, "initial": initial, "unit": "row", "dynamic_ncols": True,
                                   "smoothing": 0.1, "file": sys.stderr}
        if show and auto:
            from tqdm.auto import tqdm as auto_bar  # imported only for a bar

            self._bar = auto_bar(**options)
        elif show:
            from tqdm import tqdm as bar

            self._bar = bar(**options)

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
        postfix: dict[str, object] = {"failed": failed, "ok": ok}  # the order tqdm gave keyword arguments
        if spent is not None:
            postfix["spent"] = f"{spent:.4f}"
        bar.set_postfix(postfix, refresh=False)
