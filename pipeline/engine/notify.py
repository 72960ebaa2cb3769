"""Telling someone a run ended: `[notify] command` (the summary JSON on its stdin) and `webhook`
(the summary POSTed as JSON with a Slack-style `text` line), on the endings `on` names.

    notify(job, summary, console)        # after last_run.json is written; never raises

How a run ended, by exit code: "success" 0; "failure" 1, 2, 4 (failed rows, a bad manifest, a
local failure); "stopped" 3, 130, 143 (the provider, a signal); "waiting" 5 (batches still at the
provider); "locked" 75 (the job was already running). The command and the webhook run at once,
on a thread and event loop of their own, each cut off after `timeout_s` (the command's whole
process group is killed); the run waits for them `timeout_s` at most, whatever hangs (a webhook
host whose name lookup never returns included). A notifier that
fails, hangs or is missing is a warning: it never changes the run's exit code, and the answers
are already written by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
from typing import Any, Coroutine

from ..config import Job
from ..config.notify import NotifyConfig
from ..redact import Redactor
from .console import Console

__all__ = ["notify", "ending", "summary_text"]

_ENDINGS = {0: "success", 1: "failure", 2: "failure", 4: "failure", 3: "stopped", 130: "stopped", 143: "stopped",
            5: "waiting", 75: "locked"}
OUTPUT_SHOWN = 300  # characters of a failed command's output shown in the warning
GRACE_S = 1.0  # past timeout_s, for a cut-off command's group to be killed and reaped


def ending(code: int) -> str:
    return _ENDINGS.get(code, "failure")


def summary_text(summary: dict[str, Any], how: str) -> str:
    """One line for a chat channel."""
    head = f"pipeline {summary.get('job')} on {socket.gethostname()}: {how} (exit {summary.get('exit_code')})"
    if "rows" in summary:
        head += (f": {summary.get('ok', 0)} ok, {summary.get('failed', 0)} failed, {summary.get('pending', 0)} pending "
                 f"of {summary['rows']} rows")
    why = (summary.get("stopped") or {}).get("message") or summary.get("error")
    return f"{head}; {why}" if why else head


def notify(job: Job, summary: dict[str, Any], console: Console) -> None:
    """Run the notifiers the job asks for on this ending; never raises, never waits past timeout_s."""
    cfg = job.notify
    how = ending(int(summary.get("exit_code", 4)))
    if cfg is None or how not in cfg.on:
        return
    payload = console.redactor.scrub_record({**summary, "ending": how, "text": summary_text(summary, how)})
    body = json.dumps(payload, ensure_ascii=False, default=str).encode()
    # The arguments are hidden here only: the job's redactor, which the answers pass through, never
    # holds them (an argument such as "vision" would rewrite every answer that says it).
    hide = Redactor(cfg.own_secrets())
    wanted = [what for what, on in (("command", bool(cfg.command)), ("webhook", cfg.webhook is not None)) if on]
    results: dict[str, BaseException | None] = {}  # filled by the notifiers' thread as each ends
    # Their own thread and loop, joined for timeout_s at most: asyncio.run would then wait, with no
    # limit on 3.11, for a name lookup still running in a thread (a webhook host whose DNS hangs).
    thread = threading.Thread(target=_run, args=(cfg, body, wanted, results), name="pipeline-notify", daemon=True)
    thread.start()
    thread.join(cfg.timeout_s + GRACE_S)
    ended, done = dict(results), []
    for what in wanted:
        result = ended.get(what, TimeoutError())  # still running: left behind (its thread dies with the process)
        if result is None:
            done.append(what)
            continue
        reason = f"cut off after {cfg.timeout_s:g}s" if isinstance(result, TimeoutError) else \
            f"{type(result).__name__}: {result}"
        console.say(hide.scrub(f"warning: the notify {what} failed ({reason}); the run's result is unchanged"),
                    event="notify_failed", notifier=what)
    if done:
        console.say(f"note: notified ({', '.join(done)}) of the run's ending: {how}", event="notified", ending=how)


def _run(cfg: NotifyConfig, body: bytes, wanted: list[str], results: dict[str, BaseException | None]) -> None:
    """The notifiers' thread: both at once on a loop of its own, closed without waiting for its
    executor's threads (a lookup that never returns stays behind, not in the way)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_both(cfg, body, results))
    except BaseException as exc:  # noqa: BLE001 - the loop itself failed: each notifier's result says so
        for what in wanted:
            results.setdefault(what, exc)
    finally:
        loop.close()


async def _both(cfg: NotifyConfig, body: bytes, results: dict[str, BaseException | None]) -> None:
    async def one(what: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
            results[what] = None
        except Exception as exc:  # noqa: BLE001 - a notifier's failure is a warning (TimeoutError: cut off)
            results[what] = exc

    await asyncio.gather(*([one("command", _command(cfg, body))] if cfg.command else []),
                         *([one("webhook", _webhook(cfg, body))] if cfg.webhook else []))


async def _command(cfg: NotifyConfig, body: bytes) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cfg.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True)  # its own group: a timeout kills what it started too
    try:
        async with asyncio.timeout(cfg.timeout_s):  # not wait_for: pipeline.waits
            out = await _talk(proc, body)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    if proc.returncode != 0:
        said = out.decode("utf-8", "replace").strip()[-OUTPUT_SHOWN:]
        raise RuntimeError(f"{cfg.command[0]} exited with {proc.returncode}" + (f": {said}" if said else ""))


async def _talk(proc: asyncio.subprocess.Process, body: bytes) -> bytes:
    """communicate(), for a command that need not read its stdin (a pager called with arguments
    alone, /bin/true): one that exits first closes the pipe, which uvloop reports as a RuntimeError
    where asyncio's own loop gives the BrokenPipeError communicate() ignores."""
    assert proc.stdin is not None and proc.stdout is not None

    async def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            proc.stdin.write(body)
            await proc.stdin.drain()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            proc.stdin.close()

    _, out = await asyncio.gather(feed(), proc.stdout.read())  # at once: a chatty command never blocks the feed
    await proc.wait()
    return out


async def _webhook(cfg: NotifyConfig, body: bytes) -> None:
    import aiohttp

    assert cfg.webhook is not None
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session:  # HTTPS_PROXY, NO_PROXY
        async with session.post(cfg.webhook, data=body, headers={"Content-Type": "application/json"},
                                allow_redirects=False) as resp:
            await resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"the webhook answered HTTP {resp.status}")
