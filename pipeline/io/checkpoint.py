"""The checkpoint: what a job has done, kept beside the output, read without sending anything.

    <checkpoint>/lock            flock held by the running process (pid, host, start inside)
    <checkpoint>/job.json        the request shape the answers were made with
    <checkpoint>/plan.json       the manifest's shards (boundaries, digests, file size and mtime)
    <checkpoint>/journal/        shard-NNNNNN.jsonl: every result, appended as it arrives
    <checkpoint>/commits.jsonl   one line per committed part file, written after its rename:
                                 the source of truth for what the output folder holds
    <checkpoint>/last_run.json   the last run's summary (counts, tokens, times, exit code)

The default checkpoint folder is `<output's parent>/.pipeline/<job name>`, or, when the output is
a URL (pipeline.io.storage), `<job file's folder>/.pipeline/<job name>`: the checkpoint is always a
POSIX path, for its appends, fsync and flock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import JobError, LockedError, local_failure
from ..records import DETAIL_TOKEN_COLUMNS, TOKEN_COLUMNS, CommitRecord
from .manifest import Plan, load_plan_dict
from .storage import PartStore
from .writer import remove_parts

__all__ = ["Checkpoint", "write_json_atomic", "parse_commits", "dataset_state"]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _named(exc, path) from None


def parse_commits(data: bytes) -> dict[int, CommitRecord]:
    """The latest record per shard from commits.jsonl's whole lines (read-only: see commits())."""
    out: dict[int, CommitRecord] = {}
    for line in data.splitlines():
        if line.strip():
            try:
                rec = CommitRecord.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn line (power cut) with a later append glued on: that shard is re-committed from its journal
            out[rec.shard] = rec
    return out


def _named(exc: OSError, path: Path) -> OSError:
    """A write error names its file: a message about a full disk must say which file failed."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        raise JobError(f"checkpoint file {path} is damaged; run with --restart to start over") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Checkpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.journal_dir = folder / "journal"
        self.commits_path = folder / "commits.jsonl"
        self.plan_path = folder / "plan.json"
        self.job_path = folder / "job.json"
        self.summary_path = folder / "last_run.json"
        self.history_path = folder / "runs.jsonl"  # every run's summary, one line each (the report's history)
        self.lock_path = folder / "lock"
        self.took_over_from: int | None = None

    @contextmanager
    def locked(self, job_name: str) -> Iterator[None]:
        """One run per job. The kernel drops a flock when its process dies, so a lock left by a
        killed run is taken over without any guessing about stale pids."""
        made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # a refused first run removes them
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise local_failure(exc, "locking the job") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
                raise LockedError(f"job {job_name!r} is already running ({holder}); this run exits without sending") from None
            previous = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            if previous.startswith("pid "):
                try:
                    old = int(previous.split()[1])
                except (IndexError, ValueError):
                    old = None
                if old is not None and old != os.getpid() and not _pid_alive(old):
                    self.took_over_from = old
            stamp = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, stamp.encode(), 0)
            except OSError as exc:  # the flock is held all the same; the stamp only informs
                raise local_failure(exc, "locking the job") from None
            try:
                yield
            finally:  # an exit, clean or refused (a bad job, exit 2), leaves no pid behind; a killed run's stays
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                if made and sorted(p.name for p in self.folder.iterdir()) == ["lock"]:
                    with contextlib.suppress(OSError):  # nothing was written but the lock: nothing to keep
                        self.lock_path.unlink()
                        for folder in made:  # deepest first; one that is not empty stays
                            folder.rmdir()
        finally:
            os.close(fd)  # releases the flock

    # -- the job's identity --------------------------------------------------------------

    def check_job(self, shape: dict[str, Any], shard_rows: int) -> None:
        """Refuse to mix answers made with a different request shape (exit 2 unless --restart)."""
        saved = _read_json(self.job_path)
        record = {"shape": shape, "shard_rows": shard_rows}
        if saved is None:
            write_json_atomic(self.job_path, record)
            return
        changed = sorted(k for k in set(shape) | set(saved.get("shape", {})) if shape.get(k) != saved["shape"].get(k))
        if saved.get("shard_rows") != shard_rows:
            changed.append("[run] shard_rows")
        if changed:
            raise JobError(
                f"the job changed since its checkpoint was made ({', '.join(changed)}); answers would mix; "
                f"revert the change or run again with --restart to start over"
            )

    def reset(self, output: PartStore) -> None:
        """--restart: forget every answer and remove the part files made from them."""
        for p in (self.job_path, self.plan_path, self.commits_path, self.summary_path, self.history_path):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.journal_dir, ignore_errors=True)
        (self.folder / "batches.jsonl").unlink(missing_ok=True)  # batch mode's ledger (its batches are forgotten)
        shutil.rmtree(self.folder / "batches", ignore_errors=True)
        remove_parts(output)

    # -- the plan ------------------------------------------------------------------------

    def load_plan(self) -> Plan | None:
        data = _read_json(self.plan_path)
        return load_plan_dict(data) if data else None

    def save_plan(self, plan: Plan) -> None:
        write_json_atomic(self.plan_path, plan.to_dict())

    # -- commits -------------------------------------------------------------------------

    def commits(self) -> dict[int, CommitRecord]:
        """Latest commit record per shard; a torn last line (crash mid-append) is cut off.

        Several processes may append at once (the Ray engine's workers): each append is one write
        under an exclusive flock, so a reader holding the lock sees whole lines, and a torn tail
        can only be a dead writer's, safe to cut.
        """
        try:
            f = open(self.commits_path, "rb")
        except FileNotFoundError:
            return {}
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                os.truncate(self.commits_path, end)
        return parse_commits(data[:end])

    def record_commit(self, record: CommitRecord) -> None:
        line = record.to_json() + b"\n"
        try:
            with open(self.commits_path, "ab") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # appends from several worker processes never interleave
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a torn line it may leave is cut by commits() on the next read
            raise _named(exc, self.commits_path) from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        """last_run.json, and the same as one line appended to runs.jsonl (a torn last line, from a
        crash mid-append, is skipped by `history`)."""
        write_json_atomic(self.summary_path, summary)
        line = json.dumps(summary, ensure_ascii=False, default=str) + "\n"
        try:
            with open(self.history_path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            raise _named(exc, self.history_path) from None

    def last_summary(self) -> dict[str, Any] | None:
        return _read_json(self.summary_path)

    def history(self) -> list[dict[str, Any]]:
        """Every run's summary, oldest first (runs before the history was kept: the last one only)."""
        runs = []
        try:
            with open(self.history_path, encoding="utf-8") as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        runs.append(json.loads(line))
        except FileNotFoundError:
            last = self.last_summary()
            return [last] if last else []
        return runs


def dataset_state(plan: Plan, commits: dict[int, CommitRecord]) -> dict[str, Any]:
    """Counts over the whole output, from the commit records alone (no answer is read)."""
    by_kind: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    ok = rows = 0
    spend = 0.0
    for rec in commits.values():
        spend += rec.spend or 0.0
        ok += rec.ok
        rows += rec.rows
        by_kind.update(rec.failed)
        tokens.update(rec.tokens)
    return {
        "rows": plan.total_rows,
        "ok": ok,
        "failed": sum(by_kind.values()),
        "failed_by_kind": dict(by_kind),
        "pending": max(0, plan.total_rows - rows),
        # A usage detail no record holds is None: no answer reported it (or every part predates it).
        "tokens": {k: tokens.get(k, None if k in DETAIL_TOKEN_COLUMNS else 0) for k in TOKEN_COLUMNS},
        "spend": round(spend, 6),  # from [pricing]; 0 without it
    }
