"""Hardening across ``torchrun`` processes: the DDP wrapper, each process's share of a batch, epoch-end sync.

Every process draws the same seeded permutation each epoch and takes its slice of every global batch of
``batch_size`` samples (a :class:`~torch.utils.data.DistributedSampler` split without its state), so the
number of steps and the learning rate mean what they mean in one process. Every loss term is built from
sums over the *global* batch (:func:`robaudit.dist.global_sums`): one step on N processes computes the
gradient one process computes on the whole batch, the AT-LR regularizer's pooled RE included.

BatchNorm keeps per-process batch statistics (no SyncBatchNorm: one all-reduce per BN layer and pass would
cost more than the small models here compute, and each process's slice is a batch of its own, as in most
DDP training); the running statistics are averaged over the processes at every epoch end, so validation,
checkpoints and the saved model are the same on every process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .. import dist
from .layers import batchnorm_modules


@dataclass(frozen=True)
class Shard:
    """This process's part of one global batch of ``total`` samples."""

    rank: int
    world: int
    total: int

    def sums(self, *local: torch.Tensor) -> list[torch.Tensor]:
        """Scalars summed over the global batch; gradients flow into this process's share only."""
        return dist.global_sums(*local)

    def mean(self, local_sum: torch.Tensor) -> torch.Tensor:
        """The global batch mean of a per-sample quantity from this process's sum of it."""
        return self.sums(local_sum)[0] / self.total


def split(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Process ``rank``'s contiguous slice of ``t`` (sizes differ by at most one)."""
    return torch.tensor_split(t, world)[rank] if world > 1 else t


def wrap(full: nn.Module, dev: torch.device) -> nn.Module | None:
    """``full`` in DistributedDataParallel under torchrun; None in one process.

    Attacks and validation use ``full`` itself (no gradient sync while PGD runs); hooks stay on the inner
    module. Buffers are synced once, at construction, not at each forward (the running statistics stay per
    process until :func:`average_statistics`); every parameter must take part in the forward pass
    (``find_unused_parameters`` is off: it would cost a graph walk per pass, and a clean and an
    adversarial pass before one backward need no more than the default).
    """
    if dist.world_size() < 2:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(full, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   forward_sync_buffers=False)


def average_statistics(module: nn.Module, extra: Iterable[dict] = ()) -> None:
    """Average BatchNorm running statistics over the processes (counters from rank 0), in place.

    ``extra``: more ``{buffer name: tensor}`` sets of the same kind (dual BN's clean statistics).
    """
    if dist.world_size() < 2:
        return
    sets = [{k: getattr(m, k) for k in ("running_mean", "running_var", "num_batches_tracked")
             if getattr(m, k, None) is not None} for _, m in batchnorm_modules(module)]
    for bufs in [*sets, *extra]:
        for t in bufs.values():
            if t.is_floating_point():
                dist.all_reduce_sum(t).div_(dist.world_size())
            else:
                dist.broadcast(t)
