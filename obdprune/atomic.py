"""Atomic file writes and output locks.

Every file is written to a temp file in the same folder, flushed, fsynced and renamed; a folder is
assembled in a hidden sibling and renamed into place. Before any final rename onto a path, the path's
lock is checked: a path that another process has locked (see :class:`OutputLock`) is never replaced,
and a path this process has locked must still be locked by it. OS and safetensors I/O failures
(no space left, permission denied, read-only file system, ...) come out as
:class:`~obdprune.errors.OutputError` naming the path being written.
"""
from __future__ import annotations

import contextlib
import errno as errno_codes
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError

from obdprune.errors import OutputBusyError, OutputError, OutputExistsError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_folder",
           "replace_folder", "new_sibling_folder", "make_folder", "writing", "OutputLock", "lock_path", "held_lock",
           "check_publish"]

LOCK_SUFFIX = ".lock"
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


# ---------------------------------------------------------------------------------------------- I/O errors


def _io_errno(e: BaseException) -> int | None:
    """The errno of an OS-level write failure: an OSError, or a SafetensorError wrapping one."""
    if isinstance(e, OSError):
        return e.errno if e.errno is not None else errno_codes.EIO
    if isinstance(e, SafetensorError):
        m = _OS_ERROR_CODE.search(str(e))
        if m:
            return int(m.group(1) or m.group(2))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure inside the block into :class:`OutputError` naming ``path``.

    An OutputError raised deeper (naming a more specific file) passes through unchanged; other
    exceptions are not touched.

    >>> with writing("/proc/x"):  # doctest: +SKIP
    ...     open("/proc/x", "w")
    Traceback (most recent call last):
    obdprune.errors.OutputError: cannot write /proc/x: No such file or directory
    """
    try:
        yield
    except OutputError:
        raise
    except (OSError, SafetensorError) as e:
        code = _io_errno(e)
        if code is None:
            raise
        raise OutputError(code, os.strerror(code), os.fspath(path)) from e


def make_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p path``, with failures as OutputError."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- locks


def _key(path: str | os.PathLike) -> Path:
    """One spelling per path: absolute, with the parent's symlinks resolved (the name itself may not exist)."""
    p = Path(os.path.abspath(os.fspath(path)))
    return p.parent.resolve() / p.name


def lock_path(target: str | os.PathLike) -> Path:
    """The hidden sibling ``.NAME.lock`` that guards ``target``."""
    t = _key(target)
    return t.with_name(f".{t.name}{LOCK_SUFFIX}")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


_HELD: dict[Path, "OutputLock"] = {}


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``target``, for one process at a time.

    ``acquire`` raises :class:`OutputBusyError` at once when another process holds it. While held, every
    final rename onto ``target`` (:func:`atomic_write`, :func:`replace_folder`) first checks that the lock
    file is still the one this lock holds, and, unless ``may_replace``, that ``target`` is still what it
    was at ``acquire`` (so nothing that appeared meanwhile is replaced). ``release`` deletes the lock file.

    Example::

        with OutputLock("runs/a"):
            ...  # a second process's OutputLock("runs/a").acquire() raises OutputBusyError
    """

    def __init__(self, target: str | os.PathLike, *, may_replace: bool = False):
        self.target = _key(target)
        self.path = lock_path(target)
        self.may_replace = may_replace
        self._fd: int | None = None
        self._found: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        if self._fd is not None:
            return self
        if self.target in _HELD:
            raise OutputBusyError(self.target, os.getpid())
        while True:
            # read-only: an open writable file would keep its file system from being remounted read-only
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise OutputBusyError(self.target, pid) from None
            except BaseException:
                os.close(fd)
                raise
            if _identity(self.path) == _fd_identity(fd):
                break
            os.close(fd)  # the holder released and deleted it between our open and flock: take the new one
        with contextlib.suppress(OSError):  # only the busy message uses it; a full disk must not stop us
            pid_fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(pid_fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(pid_fd)
        self._fd = fd
        self._found = _identity(self.target)
        _HELD[self.target] = self
        return self

    def verify(self) -> None:
        """Raise unless this lock is held and its file is still in place; then check ``target`` may be replaced."""
        if self._fd is None or _identity(self.path) != _fd_identity(self._fd):
            raise OutputBusyError(self.target, None)
        if not self.may_replace and _identity(self.target) != self._found:
            raise OutputExistsError(self.target, "something written by another program while this one ran")

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD.pop(self.target, None)
        with contextlib.suppress(OSError):
            if _identity(self.path) == _fd_identity(self._fd):
                os.unlink(self.path)  # still locked: nobody can take it between the unlink and the close
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def held_lock(target: str | os.PathLike) -> OutputLock | None:
    """This process's lock on ``target``, if it holds one."""
    return _HELD.get(_key(target))


def check_publish(dst: str | os.PathLike) -> None:
    """Called right before a final rename onto ``dst``: refuse if another process locks ``dst``, or if this
    process's lock on it was lost or forbids replacing what is there now."""
    own = held_lock(dst)
    if own is not None:
        own.verify()
        return
    lock = lock_path(dst)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: nobody claims dst
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputBusyError(_key(dst), _read_pid(fd)) from None
    finally:
        os.close(fd)  # also drops the flock we may have taken: we only looked


# ---------------------------------------------------------------------------------------------- writes


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically move ``tmp_path`` onto ``path``.

    ``write`` gets a path in the destination folder; on any exception the temp file is removed
    and the previous ``path`` (if any) is left intact. I/O failures raise OutputError naming ``path``.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            write(tmp_path)
            with open(tmp_path, "rb+") as fh:
                fh.flush()
                os.fsync(fh.fileno())
            check_publish(path)
            os.replace(tmp_path, path)
        except BaseException:
            with contextlib.suppress(OSError):  # on a read-only file system even this fails
                tmp_path.unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def new_sibling_folder(path: str | os.PathLike, tag: str = "partial") -> Path:
    """Create a new, empty hidden folder ``.NAME.<random>.<tag>`` beside ``path`` (usual umask applies)."""
    path = Path(path)
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{tag}")
        try:
            with writing(path):
                candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def atomic_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)`` on a new hidden sibling folder, then move it onto ``folder``.

    An existing ``folder`` is replaced only after the new one is complete; on any exception the temp
    folder is removed and ``folder`` is left as it was. Callers decide whether ``folder`` may be replaced.
    I/O failures raise OutputError naming ``folder``.
    """
    folder = Path(folder)
    make_folder(folder.parent)
    tmp = new_sibling_folder(folder)
    try:
        try:
            write(tmp)
        except OutputError as e:  # name the folder the user asked for, not our hidden temp folder
            raise OutputError(e.errno, e.strerror, os.fspath(folder)) from e
        _fsync_dir(tmp)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def replace_folder(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the complete folder ``src`` onto ``dst`` (same file system); an existing ``dst`` is moved aside
    first and deleted only once ``src`` is in its place. Refused (see :func:`check_publish`) when ``dst`` is
    locked by another process."""
    src, dst = Path(src), Path(dst)
    with writing(dst):
        check_publish(dst)
        if dst.exists():
            old = new_sibling_folder(dst)  # empty: renaming a folder onto it replaces it
            try:
                os.replace(dst, old)
            except BaseException:
                old.rmdir()
                raise
            try:
                os.replace(src, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    _fsync_dir(dst.parent)
