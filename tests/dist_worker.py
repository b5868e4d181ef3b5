"""Test jobs for torchrun: one optimizer step per method, and a harden that fails in one process only.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_worker.py OUT.pt
    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_worker.py --fail-in-1 HARDEN-ARGS...

Step: rank 0 saves ``{case: state_dict}`` to ``OUT.pt``; ``tests/test_dist_harden.py`` compares it with the same
step in one process. The model has no BatchNorm (per-process batch statistics would differ by design), the
attack is FGSM (no random start) and the optimizer plain SGD, so that both runs must agree to rounding.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from robaudit import dist
from robaudit.data import Dataset
from robaudit.training.fit import harden

# (name, settings): one training batch of 7 samples, split 4 + 3 over two processes
CASES = [
    ("at", dict(method="at")),
    ("atlr-pooled", dict(method="atlr", gamma=[1.0, 0.5], re_mode="pooled")),
    ("atlr-per-sample", dict(method="atlr", gamma=2.0, re_mode="per-sample", clean_weight=0.3)),
]
LAYERS = ["features.1", "features.4"]
N_TRAIN = 7


class PlainCNN(nn.Module):
    """Conv-ReLU-pool twice, then a linear head: no layer with batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def data() -> tuple[Dataset, Dataset]:
    g = torch.Generator().manual_seed(11)
    x, y = torch.rand(N_TRAIN + 5, 1, 8, 8, generator=g), torch.randint(0, 3, (N_TRAIN + 5,), generator=g)
    make = lambda a, b, split: Dataset(name="blobs", split=split, x=x[a:b], y=y[a:b], num_classes=3,  # noqa: E731
                                       mean=None, std=None, default_eps=(0.1,), source="generated")
    return make(0, N_TRAIN, "train"), make(N_TRAIN, N_TRAIN + 5, "val")


def one_step(settings: dict) -> nn.Module:
    """The model after one SGD step on the one training batch."""
    torch.manual_seed(0)
    model = PlainCNN()
    train, val = data()
    harden(model, train, val, mvl_layers=LAYERS, eps=0.1, base_attack="fgsm", optimizer="sgd", lr=0.5,
           schedule="none", epochs=1, batch_size=N_TRAIN, check_collapse=False, device="cpu", **settings)
    return model


def main(out: str) -> None:
    dist.init()
    states = {name: {k: v.clone() for k, v in one_step(s).state_dict().items()} for name, s in CASES}
    if dist.is_main():
        torch.save(states, out)
    dist.shutdown()


def fail_in_rank_1(cli_args: list[str]) -> None:
    """``robaudit harden CLI_ARGS`` whose process 1 alone fails in its second epoch (a disk error, say)."""
    from robaudit.cli import main as cli
    from robaudit.errors import RobauditError
    from robaudit.training.loop import Trainer

    real = Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == 2 and dist.rank() == 1:
            raise RobauditError("the disk of process 1 is full")
        return real(self, epoch)

    Trainer.train_epoch = train_epoch
    cli(["harden", *cli_args], prog_name="robaudit")


if __name__ == "__main__":
    if sys.argv[1] == "--fail-in-1":
        fail_in_rank_1(sys.argv[2:])
    else:
        main(sys.argv[1])
