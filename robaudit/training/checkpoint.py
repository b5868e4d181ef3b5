"""Hardening checkpoints: an atomic save after every epoch and an exact (bit for bit) resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import dist, safeio
from ..errors import RobauditError

CHECKPOINT_NAME = "harden-checkpoint.pt"
CHECKPOINT_FORMAT = "robaudit-harden-checkpoint"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` into a fresh exclusive temporary file (``.NAME.PID.RANDOM.tmp``, written through its
    descriptor, never through a symlink), then rename: a reader never sees a half-written file."""
    with safeio.atomic_file(path) as fh:
        torch.save(obj, fh)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a hardening checkpoint (``weights_only``: no code runs from the file; a regular file, never a
    symlink out of the run)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise RobauditError(f"no hardening checkpoint at {path}: run without --resume to start")
    if path.is_symlink():
        raise RobauditError(f"the checkpoint {path} is a symbolic link, not the file robaudit wrote: delete it and "
                            "run without --resume")
    fd = safeio.open_regular(path, what="hardening checkpoint")
    try:
        with os.fdopen(fd, "rb") as fh:
            state = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RobauditError(f"the checkpoint {path} is unreadable ({type(e).__name__}): delete it and run without "
                            "--resume") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RobauditError(f"{path} is not a robaudit hardening checkpoint: delete it and run without --resume")
    return state


def check_fingerprint(saved: Mapping, now: Mapping, path: Path) -> None:
    """Refuse to resume a checkpoint made with other settings, naming the first that differs."""
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise RobauditError(
                f"the checkpoint {path} was made with other settings ({key}: {saved.get(key)!r} then, "
                f"{now.get(key)!r} now): resume with the same settings, or start over with --force")


class Checkpointer:
    """Trainer callback: write the trainer's state to ``path`` after every complete epoch.

    Under torchrun every process gathers its state into it and rank 0 alone writes it; on resume every
    process reads the same file (the run directory is on a file system they all see).
    """

    def __init__(self, path: Path, fingerprint: Mapping) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def prepare(self, *, resume: bool) -> dict | None:
        """Create the directory (a fresh run) or read and check the checkpoint to resume from; a temporary file
        that a killed harden left beside the checkpoint is removed (its exact name, its process gone)."""
        if dist.is_main():
            from ..rundir import remove_stale_staging

            remove_stale_staging(self.path)
        if not resume:
            if not dist.is_main():
                return None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RobauditError(f"cannot create the checkpoint directory {self.path.parent} "
                                    f"({e.strerror or e})") from e
            return None
        state = load_checkpoint(self.path)
        check_fingerprint(state.get("fingerprint", {}), self.fingerprint, self.path)
        return state

    def on_epoch_end(self, trainer, epoch: int, row: dict) -> None:
        state = trainer.state_dict()  # a collective under torchrun: every process takes part
        if dist.is_main():
            atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": 1, "fingerprint": self.fingerprint,
                               "epoch": epoch, **state}, self.path)
