"""File access that a hostile file or run directory cannot turn against the user.

Reading: only regular files, opened without following a final symlink and without blocking on a
FIFO, with a size cap checked before anything is read; JSON with a nesting limit checked before
the parser recurses. Writing: temporary names created exclusively (``O_CREAT|O_EXCL|O_NOFOLLOW``)
with a random part beside the destination, then renamed into place; a full disk is one line.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RobauditError

MiB = 1 << 20
JSON_MAX_BYTES = 16 * MiB  # run files and configs; a model's program JSON passes its own cap
JSON_MAX_DEPTH = 200

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path: str | os.PathLike, *, what: str = "file") -> int:
    """Open ``path`` for reading as a file descriptor, refusing a symlink, a FIFO, a device or a directory.

    ``O_NONBLOCK`` keeps a FIFO from hanging the open; ``O_NOFOLLOW`` refuses a symlink as the last
    component (a link in a parent directory is the caller's to judge, see :func:`inside`).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        raise RobauditError(f"{what} {path} not found: check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RobauditError(f"{what} {path} is a symbolic link: give the real file") from None
        raise RobauditError(f"cannot read {what} {path} ({exc.strerror or exc}): check the path and its "
                            "permissions") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise RobauditError(f"{what} {path} is not a regular file: give a file")
    if _NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def read_regular(path: str | os.PathLike, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (checked before reading, and while reading)."""
    fd = open_regular(path, what=what)
    with os.fdopen(fd, "rb") as fh:
        if os.fstat(fh.fileno()).st_size > max_bytes:
            raise RobauditError(f"{what} {path} is larger than {_size(max_bytes)}: it is not a file robaudit "
                                "writes or reads; check the path")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RobauditError(f"{what} {path} is larger than {_size(max_bytes)}: check the path")
    return data


def _size(n: int) -> str:
    return f"{n / MiB:g} MB" if n >= MiB else f"{n} bytes"


def json_depth_ok(text: str | bytes, max_depth: int) -> bool:
    """Whether no array/object in ``text`` nests deeper than ``max_depth`` (strings are skipped)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json(data: str | bytes, *, where: str, fix: str, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """Parse JSON from an untrusted source; too deep, invalid or non-finite constants are one line."""
    if not json_depth_ok(data, max_depth):
        raise RobauditError(f"{where} nests deeper than {max_depth} levels: {fix}")

    def no_constant(name: str) -> Any:
        raise ValueError(f"non-finite number {name}")

    try:
        return json.loads(data, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        raise RobauditError(f"{where} is not valid JSON ({msg.splitlines()[0][:80]}): {fix}") from None


def read_json(path: str | os.PathLike, *, what: str = "JSON file", fix: str = "check the file",
              max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """A regular JSON file, size- and depth-capped, never through a final symlink."""
    data = read_regular(path, max_bytes=max_bytes, what=what)
    return parse_json(data, where=f"{what} {path}", fix=fix, max_depth=max_depth)


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    try:
        real = Path(os.path.realpath(path))
        base = Path(os.path.realpath(root))
    except (OSError, ValueError):
        return False
    return real == base or base in real.parents


def temp_name(dest: Path, tag: str = "tmp") -> Path:
    """A hidden name beside ``dest`` with this process's id and a random part (``.NAME.PID.RANDOM.TAG``)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(6)}.{tag}")


def create_exclusive(path: Path, mode: int = 0o666) -> int:
    """Create ``path`` as a new file (never an existing one, never through a symlink); a file descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def disk_error(exc: OSError, target: Path, *, where: str = "--out") -> RobauditError:
    """One line for an OSError met while writing ``target`` (a full disk says which device); ``where`` is the
    option or folder the user chooses again."""
    if exc.errno == errno.ENOSPC:
        return RobauditError(f"no space left on the device of {target.parent} while writing {target.name}: free "
                             f"some space or choose another {where}")
    if exc.errno == errno.EDQUOT:
        return RobauditError(f"disk quota exceeded while writing {target}: free some space or choose another {where}")
    return RobauditError(f"cannot write {target} ({exc.strerror or exc}): choose a writable {where}")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks (a model or a download is never held whole)."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")  # md5: a checksum, not security
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, suffix: str = "", where: str = "--out") -> Iterator[Path]:
    """Yield a fresh, exclusively created temporary path beside ``dest``; rename it onto ``dest`` if the block
    succeeds, remove it otherwise. ``suffix`` keeps an ending a writer insists on (``.pt2``); a failure to write
    asks for another ``where``."""
    dest = Path(dest)
    tmp = temp_name(dest, "tmp") if not suffix else dest.with_name(
        f".{dest.stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp{suffix}")
    try:
        os.close(create_exclusive(tmp))
    except OSError as exc:
        raise disk_error(exc, dest, where=where) from None
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        _unlink_own(tmp)
        raise disk_error(exc, dest, where=where) from None
    except BaseException:
        _unlink_own(tmp)
        raise


_STAGED: dict[Path, Path] = {}  # staging directory -> the destination it becomes, for messages


@contextlib.contextmanager
def staged_as(staging: Path, dest: Path) -> Iterator[None]:
    """While the block runs, messages about files written into ``staging`` name them under ``dest``."""
    _STAGED[Path(staging)] = Path(dest)
    try:
        yield
    finally:
        _STAGED.pop(Path(staging), None)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, *, binary: bool = True, shown: str | os.PathLike | None = None
                ) -> Iterator[Any]:
    """Yield an open file, written through the descriptor of a fresh exclusive temporary file beside ``dest``
    (never reopened by name, so nothing can swap a symlink in), and rename it onto ``dest`` if the block
    succeeds; remove it otherwise. A full disk is one line that names ``shown`` (default ``dest``, under the
    destination of a staging directory, see :func:`staged_as`)."""
    dest = Path(dest)
    target = Path(shown) if shown is not None else _STAGED.get(dest.parent, dest.parent) / dest.name
    tmp = temp_name(dest, "tmp")
    try:
        fd = create_exclusive(tmp)
    except OSError as exc:
        raise disk_error(exc, target) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
        os.replace(tmp, dest)
    except OSError as exc:
        _unlink_own(tmp)
        raise disk_error(exc, target) from None
    except BaseException:
        _unlink_own(tmp)
        raise


def write_atomic(dest: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write ``dest`` through ``write(fh)`` into an exclusive temporary file, then rename it into place."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            write(fh)


def _unlink_own(path: Path) -> None:
    """Remove a temporary file this process created (never a directory, never through a symlink)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or path.is_file():
            path.unlink()
