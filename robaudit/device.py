"""Where a model runs: ``--device auto|cpu|cuda[:N]`` resolved once into a ``torch.device``."""
from __future__ import annotations

import torch

from .errors import RobauditError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; asking for CUDA without one is one line."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RobauditError(f"unknown device {device!r}: use auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RobauditError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return dev
