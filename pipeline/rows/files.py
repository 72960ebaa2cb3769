"""Local files: read a job's local image and video files, only beneath the allowed roots.

    files = LocalFiles.for_manifest(manifest_path, extra_roots)   # plain paths: pickles to workers
    fd = files.open("imgs/a.jpg")                 # a read-only descriptor of a regular file
    data = files.read("imgs/a.jpg", cap, "image", "over [images] max_source_mb = 50")

A local path is read only beneath the allowed roots (the manifest's folder and `[images]
allowed_roots`), and only if it is a regular file. It is opened by walking down from the root's
directory descriptor with O_NOFOLLOW, resolving symlinks here (a link within the roots works, one
out of them is refused), so no swap between a check and the open can lead out; the type and size
are checked on the opened descriptor. A path outside the roots is never opened.

Every refusal is a PathError (an InputError, kind "input") naming the cause and the value; its
`problem` sorts it for the dry run's report.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .values import show

__all__ = ["LocalFiles", "PathError", "MAX_SYMLINK_HOPS"]

MAX_SYMLINK_HOPS = 40  # symbolic links followed for one local path, as the kernel's own limit


class PathError(InputError):
    """A local path refused or unreadable (kind "input"). `problem` names the cause for the dry
    run's report: "outside_roots", "missing_file" or "unreadable_file"."""

    def __init__(self, message: str, problem: str = "unreadable_file") -> None:
        super().__init__(message)
        self.problem = problem  # a default, so the error pickles back from a worker process


@dataclass(frozen=True)
class LocalFiles:
    """Reads local files for one job, only beneath `roots` (plain paths: it pickles to workers).

    A value is made absolute (relative ones against `base`) and normalised lexically, then matched
    to a root; the file is opened by walking down from that root's descriptor one component at a
    time with O_NOFOLLOW, so nothing can swap a folder for a symlink between a check and the open.
    A symlink met on the way is resolved here: its target (with the rest of the path) is confined
    again like a value, so links within the roots work and links out of them are refused.
    """

    base: Path  # the manifest's folder: relative paths resolve here
    roots: tuple[Path, ...]

    @classmethod
    def for_manifest(cls, manifest: Path, extra_roots: tuple[Path, ...] = ()) -> "LocalFiles":
        """Relative paths resolve against the manifest's folder, a root too."""
        return cls.at(Path(os.path.realpath(manifest)).parent, extra_roots)

    @classmethod
    def at(cls, base: Path, extra_roots: tuple[Path, ...] = ()) -> "LocalFiles":
        """Relative paths resolve against `base` (a job's: InputConfig.local_base, or the working
        directory of an in-memory manifest), a root too."""
        base = Path(os.path.realpath(base))
        return cls(base=base, roots=(base, *(Path(os.path.realpath(r)) for r in extra_roots)))

    def open(self, value: str, what: str = "image") -> int:
        """A read-only descriptor of the regular file `value` names, opened beneath an allowed
        root; the caller closes it. Every refusal or OSError is a PathError naming the value."""
        if "\0" in value:
            raise PathError(f"{what} path holds a NUL character: {show(value)}")
        path = self._lexical(value)
        try:
            for _ in range(MAX_SYMLINK_HOPS + 1):
                root = self._root_of(path, value, what)
                got = _open_beneath(root, path)
                if isinstance(got, int):
                    return got
                path = got  # a symlink led here: confine its target again
        except _NotRegular as exc:
            raise PathError(f"{what} path is not a regular file ({exc.args[0]}): {show(value)}") from None
        except OSError as exc:
            raise _os_error(exc, what, value) from None
        except ValueError:  # a name the file system cannot encode (lone surrogates)
            raise PathError(f"{what} path is not a valid file name: {show(value)}") from None
        raise PathError(f"{what} path goes through more than {MAX_SYMLINK_HOPS} symbolic links (a loop?): {show(value)}")

    def read(self, value: str, cap: int, what: str, too_big: str) -> bytes:
        """The file's bytes, at most `cap` of them; `too_big` explains the cap in the refusal."""
        fd = self.open(value, what)
        try:
            size = os.fstat(fd).st_size
            if size > cap:
                raise PathError(f"{what} file too large ({size} bytes; {too_big}): {show(value)}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(size + 1)
        except OSError as exc:
            raise _os_error(exc, what, value) from None
        finally:
            os.close(fd)
        if len(data) != size:  # a file being written: what was checked is not what was read
            raise PathError(f"{what} file changed while being read (try again when it is complete): {show(value)}")
        return data

    def _lexical(self, value: str) -> str:
        """The value as an absolute, normalised path; nothing on disk is looked at."""
        path = os.path.expanduser(value) if value.startswith("~") else value
        path = os.path.normpath(os.path.join(self.base, path))  # an absolute value replaces base
        return "/" + path.lstrip("/")  # normpath keeps a leading "//"

    def _root_of(self, path: str, value: str, what: str) -> str:
        """The deepest root `path` lies in (lexically), or a PathError."""
        inside = [str(r) for r in self.roots if path == str(r) or path.startswith(str(r).rstrip("/") + "/")]
        if not inside:
            raise PathError(
                f"{what} path is outside the allowed roots ({', '.join(map(str, self.roots))}; "
                f"widen them with [images] allowed_roots): {show(value)}",
                "outside_roots",
            )
        return max(inside, key=len)


# Descriptors are opened with O_CLOEXEC: a process started meanwhile must not inherit them.
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # a root is trusted as the job names it
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the type check must not hang the reader (fstat refuses it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_SWAPPED = frozenset({errno.ELOOP, errno.ENOTDIR})  # what O_NOFOLLOW opens say of a fresh symlink
_FILE_TYPES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


class _NotRegular(Exception):
    """The path names something other than a regular file; args[0] says what."""


def _open_beneath(root: str, path: str) -> int | str:
    """Open the regular file `path` (lexically beneath `root`) from root's descriptor, following
    no symlink. Returns its descriptor, or the lexical path to confine again when a symlink is
    met (its target, then the rest of the path) or a component changed under the walk."""
    names = [n for n in path[len(root):].split("/") if n]
    fd = os.open(root, _ROOT_FLAGS)
    try:
        for i, name in enumerate(names):
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                here = os.path.join(root, *names[:i])
                target = os.path.join(here, os.readlink(name, dir_fd=fd), *names[i + 1:])  # absolute: replaces here
                return "/" + os.path.normpath(target).lstrip("/")
            last = i == len(names) - 1
            if last:
                _check_regular(info.st_mode)  # before the open: a device or socket is never opened
            elif not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            try:
                nxt = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in _SWAPPED:
                    return path  # swapped for a symlink since the stat: walk again
                raise
            os.close(fd)
            fd = nxt
        _check_regular(os.fstat(fd).st_mode)  # what was opened is what is read
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise _NotRegular(next((name for test, name in _FILE_TYPES if test(mode)), "not a file"))


def _os_error(exc: OSError, what: str, value: str) -> PathError:
    if exc.errno == errno.ENOENT:
        return PathError(f"{what} file not found: {show(value)}", "missing_file")
    if exc.errno == errno.ENOTDIR:  # "a.jpg/b.jpg": a part of the path is a file
        return PathError(f"{what} file not found (a part of its path is not a folder): {show(value)}", "missing_file")
    return PathError(f"cannot read {what} file ({exc.strerror or type(exc).__name__}): {show(value)}")
