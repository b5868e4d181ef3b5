"""Hardening checkpoints: an atomic save after every epoch and an exact (bit for bit) resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import dist
from ..errors import RobauditError

CHECKPOINT_NAME = "harden-checkpoint.pt"
CHECKPOINT_FORMAT = "robaudit-harden-checkpoint"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a hardening checkpoint (``weights_only``: no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise RobauditError(f"no hardening checkpoint at {path}: run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
        """Create the directory (a fresh run) or read and check the checkpoint to resume from."""
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
