"""Downloads of the published data files and extraction of their archives, the only network access robaudit
makes: a download is kept only when its md5 is the published one, and an archive extracts only files and folders
that stay inside its folder.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import RobauditError
from ..safeio import atomic_path, file_digest

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 30
_WHERE = "data directory or put the files there yourself (see README)"  # what a failed write asks for


def fetch(url: str, out: BinaryIO) -> None:
    """Copy ``url`` into the open file ``out`` (the only function here that touches the network)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        shutil.copyfileobj(response, out, length=1 << 20)


class _Rejected(Exception):
    """A mirror's download that must not become the file; why, for the message that lists every mirror."""


def download_file(title: str, urls: list[str], dest: Path, md5: str, what: str = "the files") -> None:
    """Download ``dest`` from the first mirror that works; keep it only if its md5 matches.

    The file is written under a temporary name beside ``dest`` (:func:`robaudit.safeio.atomic_path`) and renamed
    only after the checksum matched, so an interrupted or wrong download never leaves a file that looks complete.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobauditError(f"cannot download {title} to {dest.parent} ({exc.strerror or exc}): choose a "
                            "writable data directory or put the files there yourself (see README)") from None
    problems = []
    for url in urls:
        log.info("downloading %s to %s", url, dest)
        try:
            with atomic_path(dest, where=_WHERE) as tmp:
                _fetch_checked(url, tmp, md5)
            return
        except _Rejected as exc:
            problems.append(str(exc))
    raise RobauditError(f"cannot download {title} to {dest.parent} ({'; '.join(problems)}): "
                        f"put {what} there yourself (see README) or check the network")


def _fetch_checked(url: str, tmp: Path, md5: str) -> None:
    """Download ``url`` into ``tmp`` and check its md5; :class:`_Rejected` says why it cannot be kept."""
    try:
        with open(tmp, "wb") as out:
            fetch(url, out)
        got = file_digest(tmp, "md5")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts are OSErrors
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
        raise _Rejected(f"{url}: {reason}") from None
    if got != md5:
        raise _Rejected(f"{url} has md5 {got}, expected {md5}")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, refusing absolute paths, '..' and anything but files and folders."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                escapes = m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in PurePosixPath(m.name).parts
                if escapes or not (m.isfile() or m.isdir()):
                    raise RobauditError(f"refusing to extract {archive}: member {m.name!r} is a link, an absolute path "
                                        "or leaves the folder; delete the archive and download the original")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise RobauditError(f"cannot extract {archive} ({exc}): delete it and download it again") from None
