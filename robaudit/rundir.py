"""The run directory: what ``analyze`` writes and ``harden``/``report`` read, always written atomically.

Layout: ``lsa.csv``, ``accuracy.csv``, ``mvl.json``, ``manifest.json`` and optionally ``checks.json``
(see the README's "Run directory" section). A directory is built next to its destination and
renamed into place, so a failure never leaves a half-written run behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from .errors import RobauditError

REQUIRED = ("lsa.csv", "accuracy.csv", "mvl.json", "manifest.json")
# Everything robaudit writes into a run directory; a directory holding anything else is not replaced.
RUN_ENTRIES = frozenset(REQUIRED + ("checks.json", "bn.csv", "samples.csv", "report.html", "history.csv", "comparison.csv", "harden.json",
                                    "harden-checkpoint.pt", "hardened"))
HARDENED_ENTRIES = RUN_ENTRIES | {"model.pt", "model.pt2"}
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


def _own_temp(name: str) -> bool:
    """Names of robaudit's own staging files and directories (``.x.tmp``, ``.x.old-PID``)."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp." in name or ".old-" in name)


def is_run_dir(path: Path) -> bool:
    """A directory whose manifest robaudit wrote."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "robaudit_version" in manifest


def foreign_entries(run: Path) -> list[str]:
    """Entries of a run directory that robaudit did not write (relative paths)."""
    found = []
    for entry in sorted(run.iterdir()):
        if entry.name in RUN_ENTRIES or _own_temp(entry.name):
            if entry.name == "hardened" and entry.is_dir():
                found += [f"hardened/{e.name}" for e in sorted(entry.iterdir())
                          if e.name not in HARDENED_ENTRIES and not _own_temp(e.name)]
            continue
        found.append(entry.name)
    return found


def check_output_dir(out: str | os.PathLike, *, force: bool = False, option: str = "--out") -> Path:
    """Refuse, before any work, an output path that robaudit could not write or must not replace.

    robaudit replaces only its own run directories, and only with ``force``; it never deletes a user's files.
    """
    if str(out).strip() == "":
        raise RobauditError(f"{option} is empty: give a directory such as reports/my-model")
    path = Path(out)
    absolute = Path(os.path.abspath(path))
    if any(absolute == Path(r) or Path(r) in absolute.parents for r in _SYSTEM_ROOTS):
        raise RobauditError(f"{option} {path} is inside a system directory: choose a folder of your own")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise RobauditError(f"{option} {path} exists and is not a directory: choose another {option}")
        if path.is_symlink():
            raise RobauditError(f"{option} {path} is a symbolic link: give the real directory")
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    """Write JSON atomically (NaN becomes null, so the file is valid JSON)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(dest: Path) -> None:
    """Remove staging directories and files that a killed robaudit left next to ``dest`` (``.NAME.PID.*.tmp``).

    Only entries of that exact form, whose process is gone, are touched: they are robaudit's own.
    """
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.([0-9]+)\.[A-Za-z0-9_]+\.tmp")
    if not dest.parent.is_dir():
        return
    for entry in dest.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if not m or entry.is_symlink() or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file():
            entry.unlink(missing_ok=True)


def staging_file(dest: str | os.PathLike, what: str) -> Path:
    """A hidden file next to ``dest`` (``.NAME.PID.WHAT.tmp``) for output streamed before the run is staged;
    :func:`write_run` moves it in, and a killed run's leftover is removed by the next one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dest)
    return dest.parent / f".{dest.name}.{os.getpid()}.{what}.tmp"


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a run is shared like any folder the user makes
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_run(out_dir: str | os.PathLike, result, mvl, manifest: dict, checks: dict | None = None, *,
              force: bool = False, finish: Callable[[Path], None] | None = None,
              tables: dict[str, pd.DataFrame] | None = None, files: dict[str, Path] | None = None) -> Path:
    """Write an analysis (an :class:`~robaudit.lsa.LSAResult` and its MVL) as a run directory.

    An earlier run there is replaced whole, and only with ``force``: a new analysis invalidates an old
    hardening. ``finish(staging_dir)`` (e.g. rendering the report) runs before the directory is renamed
    into place, so an interrupt never leaves a run without its report.
    """
    out_dir = check_output_dir(out_dir, force=force)
    with atomic_dir(out_dir) as tmp:
        fill_run(tmp, result, mvl, manifest, checks, tables=tables)
        for name, src in (files or {}).items():  # streamed earlier beside the destination (staging_file)
            if name not in RUN_ENTRIES:
                raise ValueError(f"{name} is not a run-directory file")
            os.replace(src, tmp / name)
        if finish is not None:
            finish(tmp)
    return out_dir


def fill_run(directory: Path, result, mvl, manifest: dict, checks: dict | None = None, *,
             tables: dict[str, pd.DataFrame] | None = None) -> None:
    """Write the four run files (and ``checks.json``, and optional tables such as ``bn.csv``) into a directory."""
    for name, frame in (tables or {}).items():
        if name not in RUN_ENTRIES:
            raise ValueError(f"{name} is not a run-directory file")  # a programming error: RUN_ENTRIES lists them
        write_csv(directory / name, frame)
    write_csv(directory / "lsa.csv", result.lsa)
    write_csv(directory / "accuracy.csv", result.accuracy)
    write_json(directory / "mvl.json", mvl.to_dict() if hasattr(mvl, "to_dict") else mvl)
    write_json(directory / "manifest.json", manifest)
    if checks is not None:
        write_json(directory / "checks.json", checks)


@dataclass
class Run:
    """A run directory read back: the frames and JSON documents it holds (``None`` where a file is absent
    and was not required)."""

    path: Path
    lsa: pd.DataFrame | None
    accuracy: pd.DataFrame | None
    mvl: dict | None
    manifest: dict
    checks: dict | None = None

    def file(self, name: str) -> Path:
        return self.path / name


# The columns a reader relies on; older runs may lack the others, which get their defaults.
LSA_REQUIRED = ("layer", "attack", "eps", "re_mean", "order", "kind")
ACCURACY_REQUIRED = ("attack", "eps", "accuracy")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise RobauditError(f"{path} is not valid JSON ({e.msg}): rerun the step that wrote it") from e
    except (OSError, UnicodeDecodeError) as e:
        raise RobauditError(f"cannot read {path} ({type(e).__name__}): rerun the robaudit step that wrote it") from e


def read_json_object(path: Path) -> dict | None:
    """A JSON object file of a run, or ``None`` if it is absent; anything else is refused in one line."""
    if not Path(path).is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise RobauditError(f"{path} does not hold a JSON object: rerun the robaudit step that wrote it")
    return data


def read_csv(path: Path, required: Iterable[str] = ()) -> pd.DataFrame | None:
    """A CSV file of a run with at least the ``required`` columns, or ``None`` if it is absent."""
    if not Path(path).is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RobauditError(f"cannot read {path} ({type(exc).__name__}): rerun the robaudit step that wrote it") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise RobauditError(f"{path} lacks the columns {', '.join(missing)}: rerun the robaudit step that wrote it")
    return df


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


def read_run(run_dir: str | os.PathLike, *, required: Iterable[str] = REQUIRED) -> Run:
    """Read a run directory written by ``analyze`` (or its ``hardened/``); fail in one line if a ``required``
    file is missing or any file present is unreadable. The one reader of runs: every stage uses it."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RobauditError(f"run directory {path} not found: run `robaudit analyze` first or pass --run DIR")
    missing = [n for n in required if not (path / n).is_file()]
    if missing:
        raise RobauditError(f"{path} is not a robaudit run directory (no {', '.join(missing)}): "
                            "run `robaudit analyze` first")
    return Run(path, _typed(read_csv(path / "lsa.csv", LSA_REQUIRED)),
               _typed(read_csv(path / "accuracy.csv", ACCURACY_REQUIRED)), read_json_object(path / "mvl.json"),
               read_json_object(path / "manifest.json") or {}, read_json_object(path / "checks.json"))


def latest_run(root: str | os.PathLike = "reports") -> Path:
    """The most recently written run directory under ``root`` (what ``harden``/``report`` use by default)."""
    root = Path(root)
    runs = [p.parent for p in root.glob("*/manifest.json") if not p.parent.name.startswith(".")]
    if not runs:
        raise RobauditError(f"no run directory under {root}/: run `robaudit analyze` first or pass --run DIR")
    return max(runs, key=lambda p: (p / "manifest.json").stat().st_mtime)
