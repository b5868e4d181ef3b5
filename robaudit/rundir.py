"""The run directory: what ``analyze`` writes and ``harden``/``report`` read, always written atomically.

Layout: ``lsa.csv``, ``accuracy.csv``, ``mvl.json``, ``manifest.json`` and optionally ``checks.json``
(see the README's "Run directory" section). A directory is built next to its destination and
renamed into place, so a failure never leaves a half-written run behind; its manifest lists the files
robaudit wrote, the only ones it ever replaces. A run is read back as hostile: every file through
:func:`read_table`/:func:`read_document` (regular files of a bounded size, no symlink out of the run),
checked once against :mod:`robaudit.runschema`.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from . import runschema, safeio
from .intervals import with_intervals
from .errors import RobauditError

REQUIRED = ("lsa.csv", "accuracy.csv", "mvl.json", "manifest.json")
# Every file robaudit writes into a run directory; a directory holding anything else is not replaced.
RUN_FILES = frozenset(REQUIRED + ("checks.json", "bn.csv", "samples.csv", "classes.csv", "report.html",
                                  "history.csv", "comparison.csv", "harden.json", "fragile.json"))
RUN_ENTRIES = RUN_FILES | {"harden-checkpoint.pt", "hardened"}
HARDENED_ENTRIES = RUN_FILES | {"model.pt", "model.pt2"}  # hardened/ holds files only
# Files robaudit writes into a run after it was sealed (its manifest's file list): never listed there.
LATER = {"report.html", "harden-checkpoint.pt"}
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")

MiB = safeio.MiB
JSON_MAX_BYTES = 8 * MiB
DOCUMENT_MAX_BYTES = {"fragile.json": 1 * MiB}  # documents capped below JSON_MAX_BYTES (robaudit writes < 0.4 MB)
CSV_MAX_BYTES = 64 * MiB
SAMPLES_MAX_BYTES = 512 * MiB  # one row per sample, streamed: the one large file of a run
HEADER_MAX_BYTES = 1 * MiB
COLUMNS_MAX = 10_000

# .NAME.PID.RANDOM.tmp: robaudit's staging names (safeio.temp_name's twelve hex digits, or tempfile's eight
# characters of runs written before it)
_RANDOM = r"(?:[0-9a-f]{12}|[a-z0-9_]{8})"


def is_run_dir(path: Path) -> bool:
    """A directory whose manifest robaudit wrote (a regular file, never one reached through a symlink)."""
    try:
        manifest = safeio.read_json(Path(path) / "manifest.json", max_bytes=JSON_MAX_BYTES)
    except RobauditError:
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("robaudit_version"), str)


def recorded_files(directory: Path) -> dict[str, int | None] | None:
    """The files (name -> size, ``None`` for a file rewritten later) that robaudit recorded in a run's manifest
    when it wrote the run; ``None`` for a run written before robaudit kept that list, or an unreadable one."""
    try:
        manifest = read_document(directory, "manifest.json")
    except RobauditError:
        return None
    files = (manifest or {}).get("files")
    return dict(files) if isinstance(files, dict) else None


def is_own_report(path: Path) -> bool:
    """A regular file (never through a symlink) whose head carries the generator tag of robaudit's pages."""
    try:
        fd = safeio.open_regular(path, what="report")
    except RobauditError:
        return False
    with os.fdopen(fd, "rb") as fh:
        head = fh.read(4096)
    return b'<meta name="generator" content="robaudit' in head


def foreign_entries(run: Path) -> list[str]:
    """Entries of a run directory that robaudit did not write (relative paths), at every level.

    Robaudit's own are the files its manifest lists, with the sizes it recorded (for a run written before that
    list: the exact names of a run's files), its report, its hardening checkpoint and ``hardened/`` holding only
    its own files the same way. A symlink, a device, a FIFO, an unknown directory or a temporary-looking name is
    never robaudit's: a run holding one is not replaced.
    """
    return _foreign(Path(run), top=True, prefix="")


def _foreign(directory: Path, *, top: bool, prefix: str) -> list[str]:
    listed = recorded_files(directory)
    known = RUN_FILES if top else HARDENED_ENTRIES
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise RobauditError(f"cannot list {directory} ({exc.strerror or exc}): check its permissions") from None
    found = []
    for entry in entries:
        name, rel = entry.name, prefix + entry.name
        if entry.is_symlink():
            found.append(rel)
        elif top and name == "hardened" and entry.is_dir(follow_symlinks=False):
            found += _foreign(Path(entry.path), top=False, prefix=f"{rel}/")
        elif not entry.is_file(follow_symlinks=False):
            found.append(rel)
        elif name == "report.html":
            if not is_own_report(Path(entry.path)):
                found.append(rel)
        elif top and name == "harden-checkpoint.pt":
            continue
        elif name not in known:
            found.append(rel)
        elif listed is not None:
            size = entry.stat(follow_symlinks=False).st_size
            if name not in listed or listed[name] not in (None, size):
                found.append(rel)
    return found


def usable_output_dir(out: str | os.PathLike, *, force: bool = False, option: str = "--out") -> Path:
    """Refuse, before any work, an output path that robaudit could not write or must not replace.

    robaudit replaces only its own run directories, and only with ``force``; it never deletes a user's files.
    """
    if str(out).strip() == "":
        raise RobauditError(f"{option} is empty: give a directory such as reports/my-model")
    path = Path(out)
    absolute = Path(os.path.abspath(path))
    if any(absolute == Path(r) or Path(r) in absolute.parents for r in _SYSTEM_ROOTS):
        raise RobauditError(f"{option} {path} is inside a system directory: choose a folder of your own")
    if path.is_symlink():
        raise RobauditError(f"{option} {path} is a symbolic link: give the real directory")
    if path.exists():
        if not path.is_dir():
            raise RobauditError(f"{option} {path} exists and is not a directory: choose another {option}")
        if any(path.iterdir()):
            if not is_run_dir(path):
                raise RobauditError(f"{option} {path} exists and is not a robaudit run directory; robaudit replaces "
                                    f"only its own runs: choose another {option}")
            if not force:
                raise RobauditError(f"{option} {path} holds an earlier run: pass --force to replace it, or choose "
                                    f"another {option}")
            foreign = foreign_entries(path)
            if foreign:
                raise RobauditError(f"{option} {path} holds files robaudit did not write ({', '.join(foreign[:3])}); "
                                    f"move them out or choose another {option}")
    parent = absolute.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RobauditError(f"{option} {path}: {parent} is a file, not a directory: choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RobauditError(f"{option} {path}: {parent} is not writable: choose another {option}")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically through an exclusive temporary file (NaN becomes null, so the file is valid JSON)."""
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"
    with safeio.atomic_file(path, binary=False) as fh:
        fh.write(text)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write a table atomically; no text cell can start a spreadsheet formula (see runschema.neutralize)."""
    safe = runschema.neutralize(frame)
    # a carriage return inside a cell is not quoted by the csv writer and would split its row: quote every cell
    quoting = csv.QUOTE_ALL if runschema.has_carriage_return(safe) else csv.QUOTE_MINIMAL
    with safeio.atomic_file(path, binary=False) as fh:
        safe.to_csv(fh, index=False, float_format="%.10g", quoting=quoting)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_staging(dest: Path) -> None:
    """Remove staging directories and files that a killed robaudit left next to ``dest`` (``.NAME.PID.RANDOM.tmp``).

    Only entries of that exact form, whose process is gone, are touched, never through a symlink: they are
    robaudit's own.
    """
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.([0-9]{{1,10}})\.{_RANDOM}\.tmp")
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or entry.is_symlink() or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def staging_file(dest: str | os.PathLike) -> Path:
    """A new, empty hidden file next to ``dest`` (``.NAME.PID.RANDOM.tmp``, created exclusively) for output
    streamed before the run is staged; :func:`write_run` moves it in, and a killed run's leftover is removed by
    the next one."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(dest)
        path = safeio.temp_name(dest)
        os.close(safeio.create_exclusive(path))
    except OSError as exc:
        raise safeio.disk_error(exc, dest) from None
    return path


def _staging_dir(dest: Path) -> Path:
    """A new directory beside ``dest`` (``.NAME.PID.RANDOM.tmp``, never an existing one), with the umask's
    permissions like any folder the user makes."""
    path = safeio.temp_name(dest)
    try:
        os.mkdir(path, 0o777)
    except OSError as exc:
        raise safeio.disk_error(exc, dest) from None
    return path


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging directory that replaces ``dest`` only if the block succeeds.

    The earlier ``dest`` is first moved into a second fresh staging directory (so no fixed name is ever
    reused or followed), then removed once the new one is in place."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise safeio.disk_error(exc, dest) from None
    remove_stale_staging(dest)
    tmp = _staging_dir(dest)
    try:
        with safeio.staged_as(tmp, dest):
            yield tmp
        trash = None
        if dest.exists() or dest.is_symlink():
            trash = _staging_dir(dest)
            os.replace(dest, trash / dest.name)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if trash is not None:
                os.replace(trash / dest.name, dest)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise safeio.disk_error(exc, dest) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_run(out_dir: str | os.PathLike, result, mvl, manifest: dict, checks: dict | None = None, *,
              force: bool = False, finish: Callable[[Path], None] | None = None,
              tables: dict[str, pd.DataFrame] | None = None, files: dict[str, Path] | None = None,
              documents: dict[str, dict] | None = None) -> Path:
    """Write an analysis (an :class:`~robaudit.lsa.LSAResult` and its MVL) as a run directory.

    An earlier run there is replaced whole, and only with ``force``: a new analysis invalidates an old
    hardening. ``files`` (streamed earlier beside the destination, see :func:`staging_file`) are moved in
    first, the manifest with the list of every file is written last, and ``finish(staging_dir)`` (e.g.
    rendering the report) runs before the directory is renamed into place, so an interrupt never leaves a
    run without its report.
    """
    out_dir = usable_output_dir(out_dir, force=force)
    with atomic_dir(out_dir) as tmp:
        for name, src in (files or {}).items():
            if name not in RUN_FILES:
                raise ValueError(f"{name} is not a run-directory file")
            os.replace(src, tmp / name)
        fill_run(tmp, result, mvl, manifest, checks, tables=tables, documents=documents)
        if finish is not None:
            finish(tmp)
    return out_dir


def fill_run(directory: Path, result, mvl, manifest: dict, checks: dict | None = None, *,
             tables: dict[str, pd.DataFrame] | None = None, documents: dict[str, dict] | None = None) -> None:
    """Write the run files (``lsa.csv`` and ``accuracy.csv`` first, then ``checks.json``, optional tables such as
    ``bn.csv`` and documents such as ``fragile.json``) into a directory, the manifest last, with the list of every
    file the directory then holds (see :func:`seal`)."""
    unknown = [name for name in [*(tables or {}), *(documents or {})] if name not in RUN_FILES]
    if unknown:
        raise ValueError(f"{unknown[0]} is not a run-directory file")  # a programming error: RUN_FILES lists them
    write_csv(directory / "lsa.csv", result.lsa)
    write_csv(directory / "accuracy.csv", result.accuracy)
    for name, frame in (tables or {}).items():
        write_csv(directory / name, frame)
    for name, document in (documents or {}).items():
        write_json(directory / name, document)
    write_json(directory / "mvl.json", mvl.to_dict() if hasattr(mvl, "to_dict") else mvl)
    if checks is not None:
        write_json(directory / "checks.json", checks)
    seal(directory, manifest)


def seal(directory: Path, manifest: dict) -> None:
    """Write ``manifest.json`` with ``files``: every file ``directory`` holds and its size (the manifest's own as
    null). Only these may later be replaced or removed as robaudit's."""
    files: dict[str, int | None] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
            files[entry.name] = entry.stat(follow_symlinks=False).st_size
    files["manifest.json"] = None
    write_json(Path(directory) / "manifest.json", {**manifest, "files": files})


@dataclass
class Run:
    """A run directory read back: the frames and JSON documents it holds (``None`` where a file is absent
    and was not required), every one checked (see :mod:`robaudit.runschema`)."""

    path: Path
    lsa: pd.DataFrame | None
    accuracy: pd.DataFrame | None
    mvl: dict | None
    manifest: dict
    checks: dict | None = None
    root: Path | None = None  # the run directory this one lies in (a hardened run's), for its links

    def file(self, name: str) -> Path:
        return self.path / name

    def table(self, name: str) -> pd.DataFrame | None:
        """Another table of this run (``bn.csv``, ``samples.csv``, ``history.csv``...), read and checked."""
        return read_table(self.path, name, root=self.root)

    def document(self, name: str) -> dict | None:
        """Another JSON document of this run (``harden.json``), read and checked."""
        return read_document(self.path, name, root=self.root)


def check_inside(path: Path, root: Path) -> None:
    """Refuse a directory of a run (``path``, at or below ``root``) reached through a symbolic link out of the run:
    robaudit reads a run's own files, never what a link planted in it points to."""
    path, root = Path(path), Path(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink() and not safeio.inside(current, root):
            raise RobauditError(f"{current} is a symbolic link out of the run directory {root}: robaudit reads only "
                                "a run's own files; remove the link")


def _run_file(directory: Path, name: str, cap: int) -> int | None:
    """A read-only descriptor of a run's file (``None`` if absent): a regular file of at most ``cap`` bytes, never
    a symlink, a FIFO or a device."""
    path = Path(directory) / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RobauditError(f"cannot read {path} ({exc.strerror or exc}): {runschema.fix_for(path)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise RobauditError(f"{path} is a symbolic link: robaudit reads only the files it wrote into a run, never "
                            f"what a link points to; remove it and {runschema.fix_for(path)}")
    if not stat.S_ISREG(info.st_mode):
        raise RobauditError(f"{path} is not a regular file (a folder, a device or a pipe), so robaudit did not write "
                            f"it: {runschema.fix_for(path)}")
    fd = safeio.open_regular(path, what="run file")
    size = os.fstat(fd).st_size
    if size > cap:
        os.close(fd)
        raise RobauditError(f"{path} is larger than {cap // MiB} MB, more than robaudit ever writes there: "
                            f"{runschema.fix_for(path)}")
    return fd


def read_document(directory: str | os.PathLike, name: str, *, root: str | os.PathLike | None = None) -> dict | None:
    """A JSON document of a run (``manifest.json``, ``mvl.json``, ``checks.json``, ``harden.json``) checked
    against its schema, or ``None`` if it is absent; anything else is refused in one line."""
    directory = Path(directory)
    check_inside(directory, Path(root) if root is not None else directory)
    cap = DOCUMENT_MAX_BYTES.get(name, JSON_MAX_BYTES)
    fd = _run_file(directory, name, cap)
    if fd is None:
        return None
    path = directory / name
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(cap + 1)
    value = safeio.parse_json(data, where=str(path), fix=runschema.fix_for(path))
    if not isinstance(value, dict):
        raise RobauditError(f"{path} does not hold a JSON object: {runschema.fix_for(path)}")
    return runschema.check_document(value, name, path)


def read_table(directory: str | os.PathLike, name: str, *, root: str | os.PathLike | None = None
               ) -> pd.DataFrame | None:
    """A CSV table of a run with its columns checked and typed (:func:`runschema.check_table`), or ``None`` if it
    is absent; anything else is refused in one line."""
    directory = Path(directory)
    check_inside(directory, Path(root) if root is not None else directory)
    fd = _run_file(directory, name, SAMPLES_MAX_BYTES if name == "samples.csv" else CSV_MAX_BYTES)
    if fd is None:
        return None
    path = directory / name
    fix = runschema.fix_for(path)
    with os.fdopen(fd, "rb") as fh:
        header = fh.readline(HEADER_MAX_BYTES + 1)
        if len(header) > HEADER_MAX_BYTES:
            raise RobauditError(f"{path} has a header line longer than {HEADER_MAX_BYTES // MiB} MB: {fix}")
        try:
            columns = next(csv.reader([header.decode("utf-8")]), [])
        except (UnicodeDecodeError, csv.Error) as exc:
            raise RobauditError(f"{path} is not a CSV table robaudit can read ({type(exc).__name__}): {fix}") from None
        if len(columns) > COLUMNS_MAX:
            raise RobauditError(f"{path} has {len(columns)} columns, more than robaudit ever writes: {fix}")
        fh.seek(0)
        text = set(runschema.TEXT_COLUMNS.get(name, ()))
        missing = {c: [""] if c in text else runschema.NA_VALUES for c in columns}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                warnings.simplefilter("ignore", pd.errors.DtypeWarning)
                frame = pd.read_csv(fh, dtype={c: str for c in text}, index_col=False, encoding="utf-8",
                                    keep_default_na=False, na_values=missing)
        except (ValueError, UnicodeDecodeError, OverflowError, pd.errors.ParserError, pd.errors.EmptyDataError,
                pd.errors.ParserWarning, csv.Error) as exc:
            raise RobauditError(f"{path} is not a CSV table robaudit can read ({type(exc).__name__}): {fix}") from None
    return runschema.check_table(frame, name, path)


def _typed(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """Column types fixed once for every reader: numeric eps, string labels, the defaults of older runs."""
    if df is None:
        return None
    df["eps"] = pd.to_numeric(df["eps"], errors="coerce")
    df["attack"] = df["attack"].astype(str)
    df["kind"] = df["kind"].fillna("adversarial").astype(str) if "kind" in df.columns else "adversarial"
    df.loc[df["attack"] == "clean", "kind"] = "clean"
    norm = df["norm"] if "norm" in df.columns else pd.Series(np.nan, index=df.index, dtype=object)
    df["norm"] = norm.where(df["kind"] == "clean", norm.fillna("Linf")).fillna("").astype(str)  # clean has no norm
    if "layer" in df.columns:
        df["layer"] = df["layer"].astype(str)
        df["layer_type"] = df["layer_type"].fillna("").astype(str) if "layer_type" in df.columns else ""
    if "accuracy" in df.columns:
        df["accuracy"] = pd.to_numeric(df["accuracy"], errors="coerce")
    return df


def rows_at(frame: pd.DataFrame, attack: str | None, eps: float | None = None, norm: str | None = None) -> pd.DataFrame:
    """The rows of an ``lsa.csv``/``accuracy.csv`` frame for one attack, at ``eps`` (any eps when ``None``) and
    ``norm`` (any when ``None``): the one lookup of a configuration that every reader of runs uses."""
    rows = frame[frame["attack"] == attack]
    if eps is not None:
        values = pd.to_numeric(rows["eps"], errors="coerce").to_numpy(dtype=float)
        rows = rows[np.isclose(values, float(eps), rtol=1e-6, atol=1e-9)]
    if norm is not None:
        rows = rows[rows["norm"] == norm]
    return rows


def read_run(run_dir: str | os.PathLike, *, required: Iterable[str] = REQUIRED,
             root: str | os.PathLike | None = None) -> Run:
    """Read a run directory written by ``analyze`` (or its ``hardened/``, with ``root`` the run it lies in); fail
    in one line if a ``required`` file is missing or any file present is unreadable, a symlink, too large or not
    what robaudit writes there. The one reader of runs: every stage uses it."""
    path = Path(run_dir)
    if root is None and path.name == "hardened" and os.path.lexists(path.parent / "manifest.json"):
        root = path.parent  # a run's hardened/ is never read through a link out of that run
    root = Path(root) if root is not None else path
    check_inside(path, root)
    if not path.is_dir():
        raise RobauditError(f"run directory {path} not found: run `robaudit analyze` first or pass --run DIR")
    missing = [n for n in required if not os.path.lexists(path / n)]
    if missing:
        raise RobauditError(f"{path} is not a robaudit run directory (no {', '.join(missing)}): "
                            "run `robaudit analyze` first")
    lsa = _typed(read_table(path, "lsa.csv", root=root))
    accuracy = _typed(read_table(path, "accuracy.csv", root=root))
    if accuracy is not None:  # a run written before the intervals: each computed from its accuracy and n_samples
        accuracy = with_intervals(accuracy)
    mvl = read_document(path, "mvl.json", root=root)
    metric = (mvl or {}).get("metric")
    if metric is not None and lsa is not None and not runschema.is_metric(lsa, metric):
        raise RobauditError(f"{path / 'mvl.json'}: metric {metric[:40]!r} is not a numeric column of lsa.csv: "
                            f"{runschema.fix_for(path / 'mvl.json')}")
    return Run(path, lsa, accuracy, mvl, read_document(path, "manifest.json", root=root) or {},
               read_document(path, "checks.json", root=root), root=root if root != path else None)


def latest_run(root: str | os.PathLike = "reports") -> Path:
    """The most recently written run directory under ``root`` (what ``harden``/``report`` use by default); a run
    that is a symlink, or whose manifest is one, is never picked."""
    root = Path(root)
    runs = []
    for manifest in root.glob("*/manifest.json"):
        run = manifest.parent
        if run.name.startswith(".") or run.is_symlink() or manifest.is_symlink() or not manifest.is_file():
            continue
        runs.append((manifest.lstat().st_mtime, run))
    if not runs:
        raise RobauditError(f"no run directory under {root}/: run `robaudit analyze` first or pass --run DIR")
    return max(runs, key=lambda t: t[0])[1]
