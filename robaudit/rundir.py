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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .errors import RobauditError

REQUIRED = ("lsa.csv", "accuracy.csv", "mvl.json", "manifest.json")


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


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
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


def write_run(out_dir: str | os.PathLike, result, mvl, manifest: dict, checks: dict | None = None) -> Path:
    """Write an analysis (an :class:`~robaudit.lsa.LSAResult` and its MVL) as a run directory.

    An existing directory is replaced whole: a new analysis invalidates an old hardening.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RobauditError(f"{out_dir} exists and is not a directory: choose another --out")
    with atomic_dir(out_dir) as tmp:
        fill_run(tmp, result, mvl, manifest, checks)
    return out_dir


def fill_run(directory: Path, result, mvl, manifest: dict, checks: dict | None = None) -> None:
    """Write the four run files (and ``checks.json``) into an existing directory."""
    write_csv(directory / "lsa.csv", result.lsa)
    write_csv(directory / "accuracy.csv", result.accuracy)
    write_json(directory / "mvl.json", mvl.to_dict() if hasattr(mvl, "to_dict") else mvl)
    write_json(directory / "manifest.json", manifest)
    if checks is not None:
        write_json(directory / "checks.json", checks)


@dataclass
class Run:
    """A run directory read back: the frames and JSON documents it holds."""

    path: Path
    lsa: pd.DataFrame
    accuracy: pd.DataFrame
    mvl: dict
    manifest: dict
    checks: dict | None = None

    def file(self, name: str) -> Path:
        return self.path / name


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise RobauditError(f"{path} is not valid JSON ({e.msg}): rerun the step that wrote it") from e


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read a run directory written by ``analyze``; fail in one line if it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RobauditError(f"run directory {path} not found: run `robaudit analyze` first or pass --run DIR")
    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if missing:
        raise RobauditError(f"{path} is not a robaudit run directory (no {', '.join(missing)}): "
                            "run `robaudit analyze` first")
    try:
        lsa = pd.read_csv(path / "lsa.csv")
        accuracy = pd.read_csv(path / "accuracy.csv")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RobauditError(f"the CSV files in {path} are unreadable ({type(e).__name__}): rerun `robaudit analyze`") from e
    checks = read_json(path / "checks.json") if (path / "checks.json").is_file() else None
    return Run(path, lsa, accuracy, read_json(path / "mvl.json"), read_json(path / "manifest.json"), checks)


def latest_run(root: str | os.PathLike = "reports") -> Path:
    """The most recently written run directory under ``root`` (what ``harden``/``report`` use by default)."""
    root = Path(root)
    runs = [p.parent for p in root.glob("*/manifest.json") if not p.parent.name.startswith(".")]
    if not runs:
        raise RobauditError(f"no run directory under {root}/: run `robaudit analyze` first or pass --run DIR")
    return max(runs, key=lambda p: (p / "manifest.json").stat().st_mtime)
