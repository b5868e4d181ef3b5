"""Train the example models and save them as torch.export archives (and robaudit checkpoints).

    python examples/train_examples.py            # writes examples/digits_cnn.pt2, digits_deep_cnn.pt2, moons_mlp.pt2, *.pt
    python examples/train_examples.py --only digits_deep_cnn   # one of them

The archives are exported with a dynamic batch dimension, so every batch size works; the
checkpoints keep the architecture name, so hardening can train BatchNorm statistics too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from robaudit.data import load_dataset
from robaudit.models import export_model, save_checkpoint

try:  # installed package
    from robaudit.examples.models import DigitsCNN, DigitsDeepCNN, MoonsMLP
    ARCH_MODULE = "robaudit.examples.models"
except ImportError:  # pragma: no cover - source tree without install
    from models import DigitsCNN, DigitsDeepCNN, MoonsMLP
    ARCH_MODULE = "models"

HERE = Path(__file__).resolve().parent
# file stem: (data set, architecture, epochs, learning rate)
EXAMPLES = {
    "digits_cnn": ("digits", DigitsCNN, 30, 2e-3),
    "digits_deep_cnn": ("digits", DigitsDeepCNN, 30, 2e-3),
    "moons_mlp": ("moons", MoonsMLP, 200, 3e-3),
}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int = 64,
          seed: int = 0) -> nn.Module:
    """Plain cross-entropy training with Adam (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def build(stem: str, out: Path, seed: int = 0) -> None:
    """Train one example model (seeded) and write ``<stem>.pt2`` and ``<stem>.pt`` into ``out``."""
    name, cls, epochs, lr = EXAMPLES[stem]
    torch.manual_seed(seed)
    model = cls()
    train_set, test_set = load_dataset(name, split="train"), load_dataset(name, split="test")
    train(model, train_set.x, train_set.y, epochs=epochs, lr=lr, seed=seed)
    export_model(out / f"{stem}.pt2", model, test_set.x[:2])
    save_checkpoint(out / f"{stem}.pt", model, arch=f"{ARCH_MODULE}:{cls.__name__}", arch_kwargs={})
    n = sum(p.numel() for p in model.parameters())
    acc = accuracy(model, test_set.x, test_set.y)
    print(f"{stem}: {n} parameters, test accuracy {acc:.3f} -> {out / (stem + '.pt2')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(EXAMPLES), action="append", help="train only this model (repeatable)")
    args = parser.parse_args()
    for stem in args.only or EXAMPLES:
        build(stem, args.out, args.seed)
