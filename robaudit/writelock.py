"""One robaudit at a time per destination: an exclusive lock file beside what it writes.

Two analyses to the same ``--out`` would otherwise both succeed, the second silently replacing the first.
The lock (``.NAME.lock`` beside ``NAME``) is created without following a symlink, held with ``flock`` from the
output check to the final rename, and removed by its owner alone; a lock file left by a killed process is
taken over, since the kernel released its ``flock`` with the process.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Iterator

from .errors import RobauditError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth (one command may ask twice)


def lock_path(dest: str | os.PathLike) -> Path:
    """The lock file of a destination: ``.NAME.lock`` beside it."""
    dest = Path(os.path.abspath(dest))
    return dest.with_name(f".{dest.name}.lock")


@contextlib.contextmanager
def write_lock(dest: str | os.PathLike, *, option: str = "--out") -> Iterator[Path]:
    """Hold the lock of ``dest`` for the block; another robaudit holding it fails at once, in one line that
    names its process. Re-entrant within one process."""
    path = lock_path(dest)
    key = str(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(path, Path(dest), option)
    _HELD[key] = 1
    try:
        yield path
    finally:
        del _HELD[key]
        _release(path, fd)


def _acquire(path: Path, dest: Path, option: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobauditError(f"cannot create {path.parent} ({exc.strerror or exc}): choose another {option}") from None
    for _ in range(20):  # another process may remove its lock file between our open and our flock: try again
        fd = _open(path, option)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RobauditError(f"another robaudit is writing {dest} (pid {pid or 'unknown'}): wait for it or "
                                    f"choose another {option}") from None
            raise RobauditError(f"cannot lock {path} ({exc.strerror or exc}): choose another {option}") from None
        held, now = os.fstat(fd), _lstat(path)
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            os.close(fd)  # its owner removed it after we opened it: that file is no lock any more
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise RobauditError(f"cannot take the lock {path}: other processes keep replacing it; choose another {option}")


def _open(path: Path, option: str) -> int | None:
    """A descriptor of the lock file, created if absent; ``None`` when it vanished meanwhile."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RobauditError(f"cannot create the lock file {path} ({exc.strerror or exc}): choose another "
                            f"{option}") from None
    try:
        fd = os.open(path, os.O_RDWR | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror or exc})"
        raise RobauditError(f"{path} {why}, not robaudit's lock file: remove it or choose another {option}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RobauditError(f"{path} is not robaudit's lock file: remove it or choose another {option}")
    return fd


def _holder(fd: int) -> int | None:
    """The process id the holder wrote into the lock file, if it is readable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _release(path: Path, fd: int) -> None:
    """Remove the lock file (only if it is still ours) while holding it, then let go."""
    try:
        held, now = os.fstat(fd), _lstat(path)
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)
