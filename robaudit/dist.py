"""``torch.distributed`` under ``torchrun``: which process this is, and the sums the processes share.

robaudit never starts processes itself: ``torchrun`` does (one machine or several, with its own
rendezvous flags), and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. Without them everything here is
the single-process identity, so the rest of the code calls these functions unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from .errors import RobauditError


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group is up (after :func:`init`)."""
    return tdist.is_available() and tdist.is_initialized()


def init(device: torch.device | None = None) -> None:
    """Join ``torchrun``'s process group once: NCCL for CUDA devices, gloo on CPU. A no-op in one process."""
    if not launched() or active():
        return
    if not tdist.is_available():
        raise RobauditError("this torch build has no torch.distributed: run in one process (without torchrun)")
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    tdist.init_process_group(backend=backend)


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files and reports."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` under torchrun for a CUDA device, else ``device``."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all processes, in place; ``t`` itself in one process."""
    if active() and world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if active() and world_size() > 1:
        tdist.barrier()
