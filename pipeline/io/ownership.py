"""Who may write a bucket checkpoint: the job's lease, and the fence every write passes.

    fence = Fence()                         # closed: nothing may be written yet
    lease = Lease(store, "lock", 60.0, fence)
    lease.probe()                           # the store honours conditional writes, or a JobError
    took_over = lease.acquire("captions")   # LockedError (exit 75) while another run holds it
    lease.start(); ...; lease.release()     # renewed in a thread; a clean end frees it at once
    fence()                                 # raises LeaseLost once this process may no longer write

A bucket has no flock. The lock is an object (`<checkpoint>/lock`) made by a conditional create
(S3 If-None-Match) and renewed by compare-and-swap on its ETag (If-Match) every lease_s / 4. It
records its holder and, by the holder's clock, when it expires (renewal + lease_s). Another run
takes it over only by compare-and-swap on the ETag it read, and only once
`expires + lease_s / 4 < its own clock`: clocks may differ by up to lease_s / 4 (15 s for the
default 60 s). The holder writes only within 3/4 of lease_s after the last renewal it sent
(`Fence`), so its last write has lease_s / 4 + the tolerated skew to land before any other run
may take over: no two writers, even across machines. A renewal refused (the lease was taken over,
or the bucket refused the write until the fence closed) ends the run at once: every write after
that raises LeaseLost (an OSError: a local failure, exit 4). A Ray worker has no lease: its fence
is the driver's, relayed through the run's coordinator with each report (pipeline.engine.ray_task).
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import JobError, LockedError
from .store import Conflict, FsspecStore

__all__ = ["Fence", "Lease", "LeaseLost"]

RENEWALS_PER_LEASE = 4  # renewed every lease_s / 4; the tolerated skew and the last write's margin are as long


class LeaseLost(OSError):
    """This process may no longer change the checkpoint."""


class Fence:
    """Until when (this process's monotonic clock) it may write; calling it raises LeaseLost after."""

    def __init__(self, until: float = -math.inf, why: str = "this process holds no lease on the job",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.until, self.why, self.clock = until, why, clock
        self.lost = False  # taken from it: nothing extends it again

    @classmethod
    def always(cls) -> Fence:
        return cls(math.inf, "")

    def __call__(self) -> None:
        if self.clock() >= self.until:
            raise LeaseLost(errno.ENOLCK, self.why)

    def left(self) -> float:
        return self.until - self.clock()

    def hold_until(self, until: float) -> None:
        if not self.lost:
            self.until = until

    def hold_for(self, seconds: float) -> None:
        """From now (a Ray worker told how long its driver's lease still holds)."""
        self.hold_until(self.clock() + seconds)

    def lose(self, why: str) -> None:
        self.lost, self.until, self.why = True, -math.inf, why


class Lease:
    def __init__(self, store: FsspecStore, name: str, lease_s: float, fence: Fence, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.store, self.name, self.lease_s, self.fence = store, name, lease_s, fence
        self.clock, self.wall = clock, wall
        self.every = lease_s / RENEWALS_PER_LEASE
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.started = wall()
        self.etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, released: bool = False) -> bytes:
        now = self.wall()
        return json.dumps({"holder": self.holder, "started": self.started, "renewed": now,
                           "expires": now + self.lease_s, "lease_s": self.lease_s, "released": released}).encode()

    def probe(self) -> None:
        """A store that does not send both conditions, or a server that ignores them, cannot hold
        a lease: refused with one line, before anything is written."""
        where = f"[output] checkpoint: {self.store}"
        if not self.store.conditional:
            raise JobError(f"{where} cannot hold a checkpoint: its fsspec backend does not send conditional writes "
                           f"(create-if-absent and compare-and-swap) to the server, so two runs could both write; "
                           f"use an s3:// URL or a local folder")
        name = f"{self.name}.probe"
        try:
            self.store.create(name, b"probe")
            self.store.create(name, b"probe")
            ignored = "If-None-Match"
        except FileExistsError:
            try:
                self.store.replace(name, b"probe", if_match="0" * 32)
                ignored = "If-Match"
            except Conflict:
                return
        raise JobError(f"{where}: the server ignored a conditional write ({ignored}), so two runs could both write; "
                       f"use a store that honours them (AWS S3, MinIO, ...) or a local folder")

    def acquire(self, job_name: str) -> str | None:
        """Create the lease, or take over one that expired; what it took over (None: nothing, or
        a lease its holder released). LockedError while another run holds it."""
        self.fence.lost = False  # a fence a released lease closed opens again (the Python API's dry run, then a run)
        for _ in range(5):
            sent = self.clock()
            try:
                self._held(self.store.create(self.name, self._body()).etag, sent)
                return None
            except FileExistsError:
                pass
            entry = self.store.stat(self.name)  # the ETag first: the body read after is as new or newer
            raw = self.store.read(self.name)
            if entry is None or raw is None or entry.etag is None:
                continue  # gone meanwhile
            held = _parsed(raw)
            late = self.wall() - float(held.get("expires") or 0) - self.every  # > 0: expired, skew allowed for
            if not held.get("released") and late <= 0:
                ago = self.wall() - float(held.get("renewed") or 0)
                raise LockedError(
                    f"job {job_name!r} is already running ({held.get('holder', 'unknown')}, its lease on {self.store} "
                    f"renewed {max(0.0, ago):.0f}s ago); this run exits without sending (a lease whose run is gone "
                    f"can be taken over in {math.ceil(-late)}s)")
            sent = self.clock()
            try:
                self._held(self.store.replace(self.name, self._body(), if_match=entry.etag).etag, sent)
            except Conflict:
                continue  # renewed or taken meanwhile: look again
            if held.get("released"):
                return None
            return f"{held.get('holder', 'an unknown run')} (its lease expired {late + self.every:.0f}s ago)"
        raise LockedError(f"job {job_name!r}: its lease on {self.store} keeps changing hands; another run is starting; "
                          f"this run exits without sending")

    def _held(self, etag: str | None, sent: float) -> None:
        if etag is None:
            raise JobError(f"[output] checkpoint: {self.store} gave no ETag for {self.name}; a lease cannot be kept there")
        self.etag = etag
        self.fence.hold_until(sent + self.lease_s - self.every)

    def renew(self) -> None:
        """One renewal; Conflict (and the fence lost) when another run took the lease over."""
        sent = self.clock()
        assert self.etag is not None
        try:
            self._held(self.store.replace(self.name, self._body(), if_match=self.etag).etag, sent)
        except Conflict:
            self.fence.lose(f"another run took over this job's lease on {self.store} (this run could not renew it "
                            f"in time); this run stopped at once")
            raise

    def start(self) -> None:
        self._thread = threading.Thread(target=self._keep, name="pipeline-lease", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        wait = self.every
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = self.every
            except Conflict:
                return
            except Exception as exc:  # noqa: BLE001 - any refusal: tried again until the fence closes
                self.fence.why = (f"could not renew this job's lease on {self.store} in time "
                                  f"({' '.join(str(exc).split())[:300]}); this run stopped before another may take it over")
                wait = max(0.1, self.every / 4)

    def release(self) -> None:
        """Stop renewing; a lease still held is marked released (the next run takes it at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if not self.fence.lost and self.etag is not None and self.fence.left() > 0:
                self.store.replace(self.name, self._body(released=True), if_match=self.etag)
        except (Conflict, JobError, OSError):
            pass  # it expires on its own
        finally:
            self.fence.lose("the run that held this job's lease has ended")


def _parsed(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}  # damaged: no expiry in it, so it is taken over (by compare-and-swap)
    return data if isinstance(data, dict) else {}
