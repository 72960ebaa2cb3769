"""The console: the lines the person (or the log shipper) running a job reads, on stderr, never
with a secret in them. Every line a run prints goes through here, as text or as JSON lines.

    console = Console.for_job(job)                 # hides job.secrets(): key, proxy, headers, storage, webhook
    console = Console.for_job(job, "json")         # or PIPELINE_LOG_FORMAT=json: one JSON object a line
    console.say("note: ...")                       # level and event read from the prefix
    console.say(text, event="summary", **fields)   # fields: the JSON line's own keys (scrubbed too)
    console.say(text, event="start", text=False)   # a JSON-only line: the text console stays quiet
    row = console.redactor.scrub ...               # the same secrets, for what is written to files

A JSON line: {"ts": "2026-01-31T02:00:00.123Z", "level": "info", "event": "summary", "job": "captions",
"message": "...", ...fields}. `capture_process_output()` sends what else would reach stderr in a
process the run owns (Python warnings, library loggers) through the same console.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any, TextIO

from ..config import Job
from ..errors import JobError
from ..redact import Redactor

__all__ = ["Console", "log_format", "LOG_FORMATS", "LOG_FORMAT_ENV"]

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "PIPELINE_LOG_FORMAT"
# A text line's prefix -> (level, event) of its JSON line.
_PREFIXES = (("error:", "error", "error"), ("warning:", "warning", "warning"), ("note:", "info", "note"),
             ("stopping", "warning", "stopping"), ("stopped", "warning", "stopped"))


def log_format(flag: str | None = None) -> str:
    """--log-format, else PIPELINE_LOG_FORMAT, else "text"; anything else is a usage error."""
    value = flag if flag is not None else os.environ.get(LOG_FORMAT_ENV) or "text"
    value = value.strip().lower()
    if value not in LOG_FORMATS:
        where = "--log-format" if flag is not None else LOG_FORMAT_ENV
        raise JobError(f"{where} must be \"text\" or \"json\", not {value!r}")
    return value


class Console:
    def __init__(self, redactor: Redactor | None = None, *, json_lines: bool = False, job: str | None = None,
                 stream: TextIO | None = None) -> None:
        self.redactor = redactor if redactor is not None else Redactor()
        self.json = json_lines
        self.job = job
        self.stream = stream  # None: sys.stderr as it is when a line is printed

    @classmethod
    def for_job(cls, job: Job, fmt: str | None = None) -> Console:
        """Every message, journal line, log and summary of this job's run is scrubbed of these."""
        return cls(Redactor(job.secrets()), json_lines=log_format(fmt) == "json", job=job.name)

    def say(self, message: str, *, event: str | None = None, level: str | None = None, text: bool = True,
            **fields: Any) -> None:
        """One line. `text=False`: a JSON-only line (the text console stays as it was)."""
        if self.json:
            self._print(self.json_line(message, event=event, level=level, **fields))
        elif text:
            self._print(self.redactor.scrub(message))

    def json_line(self, message: str, *, event: str | None = None, level: str | None = None, **fields: Any) -> str:
        message = message.strip()
        guessed_level, guessed_event = "info", "message"
        for prefix, lvl, evt in _PREFIXES:
            if message.startswith(prefix):
                guessed_level, guessed_event = lvl, evt
                break
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        record: dict[str, Any] = {"ts": stamp, "level": level or guessed_level, "event": event or guessed_event}
        if self.job is not None:
            record["job"] = self.job
        record["message"] = message
        record.update({k: v for k, v in fields.items() if k not in record})
        text = json.dumps(self.redactor.scrub_record(record), ensure_ascii=False, default=str)
        return self.redactor.scrub(text)  # a secret in a key or a non-text value, as JSON spells it

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def capture_process_output(self) -> None:
        """In a process the run owns and JSON lines: Python warnings and library log records
        become console lines too, so every stderr line parses as JSON."""
        if not self.json:
            return

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
            self.say(f"warning: {category.__name__}: {message}", event="python_warning", where=f"{filename}:{lineno}")

        def crash(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
            self.say(f"error: {kind.__name__}: {exc}", event="crash",
                     traceback="".join(traceback.format_exception(kind, exc, tb)))

        warnings.showwarning = show
        sys.excepthook = crash
        threading.excepthook = lambda args: crash(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
        handler = _ConsoleHandler(self)
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        logging.lastResort = handler

    def adopt_logger(self, name: str) -> None:
        """JSON logs: a library logger with handlers of its own (Ray's) speaks through the console."""
        if self.json:
            logger = logging.getLogger(name)
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.addHandler(_ConsoleHandler(self))
            logger.propagate = False


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            self.console.say(text, event="log", level=record.levelname.lower(), logger=record.name)
        except Exception:  # noqa: BLE001 - a log line must never break the run
            self.handleError(record)
