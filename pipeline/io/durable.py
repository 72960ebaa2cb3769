"""POSIX files made durable: the one atomic write and the one durable append of the codebase.

    atomic_write(path, data)                   # a reader sees the old whole file or the new one
    with atomic_file(path) as f: f.write(...)  # the same, streamed (awaits in between are fine)
    durable_append(path, line, exclusive=True) # whole lines, on disk when it returns
    read_lines(path, repair=True)              # the whole lines of an appended file, a torn tail cut

An atomic write goes to a hidden temporary name beside the file (`.name.tmp`: ignored by
pyarrow.dataset, pandas and a DuckDB `*.parquet` glob), is fsynced, renamed over the file, and the
folder is fsynced, so after a crash the name holds the old complete file or the new complete one.
An append is one `write` of whole lines on an O_APPEND descriptor (the kernel keeps it in the OS's
hands: a killed process loses nothing written) and an fsync (a power cut loses nothing
acknowledged); `exclusive` takes a flock first, for a file several processes append to. A crash
mid-append can leave a torn last line: readers cut it (`read_lines`), and `repair` cuts it on disk
so the next append starts on a fresh line. The journal keeps its descriptors open and fsyncs in
groups (pipeline.io.journal) but writes with `open_append` and `write_all` from here.

A failed write raises an OSError naming the file (a message about a full disk must say which file
failed), after removing what a torn temporary file took. pipeline.io.store builds LocalStore on
these; an object store has none of them (no append, no fsync, no flock).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NamedTuple

__all__ = ["Written", "durable_move", "atomic_file", "atomic_write", "durable_append", "open_append", "write_all",
           "read_lines", "create_exclusive", "fsync_dir", "file_digest", "bytes_digest", "named", "DIGEST_BYTES"]

DIGEST_BYTES = 16
_READ_BLOCK = 1 << 20


class Written(NamedTuple):
    """What an atomic write left: the object's size, the digest of its bytes (when asked for) and
    its ETag (an object store's; None for a file)."""

    size: int
    digest: str | None = None
    etag: str | None = None


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, streamed: what a commit record keeps of a part file."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def named(exc: OSError, path: Path) -> OSError:
    """The error, naming `path` if it names no file (Arrow's write errors name none)."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))


def fsync_dir(folder: Path) -> None:
    """Make a rename (or a new name) in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_move(source: Path, target: Path) -> None:
    """A whole file given another name (in the same filesystem), durable in both folders."""
    os.rename(source, target)
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)


@contextmanager
def atomic_file(path: Path, before_replace: Callable[[Path], None] | None = None) -> Iterator[IO[bytes]]:
    """A file to write `path`'s new content into; on a clean exit it is fsynced and renamed over
    `path` (`before_replace(tmp)` runs between the two: the part writer's crash point and digest),
    then the folder is fsynced. On any exception the temporary file is removed and nothing changes."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk: give back what the torn file took
        if isinstance(exc, OSError):
            raise named(exc, path) from None
        raise


def atomic_write(path: Path, data: bytes | Callable[[IO[bytes]], object], *, digest: bool = False,
                 before_replace: Callable[[], None] | None = None) -> Written:
    """Write `data` (bytes, or a function writing into the file) to `path` atomically. `digest`:
    the bytes' digest, read back from the temporary file (what is on disk, not what was meant)."""
    seen: list[Written] = []

    def check(tmp: Path) -> None:
        if before_replace is not None:
            before_replace()
        seen.append(Written(tmp.stat().st_size, file_digest(tmp) if digest else None))

    with atomic_file(path, check) as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
    return seen[0]


def create_exclusive(path: Path, data: bytes) -> None:
    """Create `path` with `data` only if no file has that name (FileExistsError otherwise). The
    data is written and fsynced under a temporary name first, then linked into place (link fails
    with EEXIST: it decides between two processes creating it at once), so a kill or a full disk
    never leaves `path` empty: an empty owner file would refuse every later run as damaged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        _write_new(tmp, data)
        try:
            os.link(tmp, path)
        except OSError as exc:  # a filesystem without hard links: O_EXCL, written in place
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            _write_new(path, data)
    except FileExistsError:
        raise
    except OSError as exc:
        raise named(exc, path) from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _write_new(path: Path, data: bytes) -> None:
    """A new file (FileExistsError if one has that name) holding `data`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def open_append(path: Path) -> int:
    """A descriptor appending to `path` (made if missing, its folder too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a disk filling up): go on until all is written or it
    raises, so a short write is never taken for a stored line."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def durable_append(path: Path, data: bytes, *, exclusive: bool = False, sync: bool = True) -> None:
    """Append whole lines with one write and fsync them. `exclusive`: under a flock, for files
    that several processes append to (their lines never interleave; a reader holding the flock
    sees whole lines only). `sync=False`: a log nothing is rebuilt from, written from the event
    loop, where an fsync would stall every request in flight (a kill still loses nothing)."""
    try:
        fd = open_append(path)
        try:
            if exclusive:
                fcntl.flock(fd, fcntl.LOCK_EX)
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
    except OSError as exc:  # a torn line it may leave is cut by the next read_lines(repair=True)
        raise named(exc, path) from None


def read_lines(path: Path, *, repair: bool = False, exclusive: bool = False) -> bytes | None:
    """The whole lines of an appended file (None when there is none). A torn last line (a crash
    mid-append) is left out; `repair` also cuts it from the file, so the next append starts on a
    fresh line (only by the file's one writer, or under `exclusive`: the appenders' flock, so the
    tail cut can only be a dead writer's)."""
    try:
        f = open(path, "rb")  # read-only: `status` may read a checkpoint it cannot write
    except FileNotFoundError:
        return None
    with f:
        if exclusive:
            fcntl.flock(f, fcntl.LOCK_EX)
        data = f.read()
        end = data.rfind(b"\n") + 1
        if repair and end < len(data):
            try:
                os.truncate(path, end)
            except OSError as exc:  # a reader that cannot write (status on a read-only checkpoint)
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                return data[:end]  # ... cannot append either: the tail stays, harmless
            os.fsync(f.fileno())
    return data[:end]
