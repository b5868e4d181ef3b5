"""Tiny models and data shared by the tests, imported as ``tests.helpers``.

``tests.helpers:TinyCNN`` also works as an ``--arch`` when the repository root is on ``sys.path``.
Nothing here imports torchattacks, so importing this module stays cheap.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HELPERS_FILE = HERE / "helpers.py"

NUM_CLASSES = 4
INPUT_SHAPE = (1, 8, 8)  # digits-shaped


class TinyCNN(nn.Module):
    """Conv-BN-ReLU-pool, Conv-ReLU-pool, Flatten-Linear on 1x8x8 inputs (9 leaf layers)."""

    def __init__(self, width: int = 4, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


CNN_LAYERS = ["features.0", "features.1", "features.2", "features.3", "features.4", "features.5", "features.6",
              "classifier.0", "classifier.1"]
CNN_RELUS = ["features.2", "features.5"]


class NormTinyCNN(TinyCNN):
    """``TinyCNN`` with the input normalization written into its forward (same layers, same state dict)."""

    def __init__(self, mean: float, std: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("mean", torch.tensor([mean]).reshape(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([std]).reshape(1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mean) / self.std)


class TwiceReLU(nn.Module):
    """Calls the same ``nn.ReLU`` twice: its layers are fc1, act, fc2, act#2, fc3."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def make_cnn(seed: int = 0, *, num_classes: int = NUM_CLASSES, cls=TinyCNN, **kwargs) -> TinyCNN:
    """A seeded ``TinyCNN`` in eval mode whose predictions depend on the input, so attacks bite.

    BatchNorm gets non-trivial running statistics; with these weights FGSM at eps 0.01 / 0.03 / 0.1
    leaves about 45% / 28% / 0% of :func:`make_data`'s samples correctly classified.
    """
    torch.manual_seed(seed)
    model = cls(num_classes=num_classes, **kwargs)
    with torch.no_grad():
        bn = model.features[1]
        bn.running_mean.copy_(torch.linspace(-0.1, 0.1, bn.num_features))
        bn.running_var.copy_(torch.linspace(0.05, 0.2, bn.num_features))
        bn.weight.copy_(torch.linspace(0.5, 1.5, bn.num_features))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, bn.num_features))
        # centre each logit on random inputs so that every class gets predicted (a fresh tiny CNN
        # predicts nearly the same class whatever the input)
        ref = torch.rand((256, *INPUT_SHAPE), generator=torch.Generator().manual_seed(1234))
        model.eval()
        model.classifier[1].bias.sub_(model(ref).mean(0))
    return model.eval()


def make_twice(seed: int = 0) -> TwiceReLU:
    torch.manual_seed(seed)
    return TwiceReLU().eval()


def make_data(model: nn.Module, n: int = 12, *, seed: int = 0, shape=INPUT_SHAPE,
              num_classes: int = NUM_CLASSES) -> SimpleNamespace:
    """``n`` seeded inputs in [0, 1] labelled by the model itself (clean accuracy 1), as x/y/num_classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return SimpleNamespace(x=x, y=y, num_classes=num_classes)


def hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules that still carry any forward/backward hook."""
    out = []
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or \
                getattr(mod, "_backward_pre_hooks", None):
            out.append(name or "<root>")
    return out


def assert_no_hooks(model: nn.Module) -> None:
    left = hooked_modules(model)
    assert not left, f"hooks left on {left}"


def export_dynamic(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Save ``model`` as a ``.pt2`` archive with a dynamic batch dimension (robaudit's own exporter)."""
    from robaudit.models import export_model

    return export_model(path, model, example)


def export_fixed(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Save ``model`` as a ``.pt2`` archive exported with a fixed batch size."""
    ep = torch.export.export(model.eval(), (example,))
    torch.export.save(ep, str(path))
    return path


TIMING_COLUMNS = ["seconds"]


def accuracy_numbers(res):
    """The accuracy frame of an analysis without its wall-clock columns (which differ run to run)."""
    return res.accuracy.drop(columns=TIMING_COLUMNS, errors="ignore")


def rel_diff(a, b) -> float:
    """Largest relative difference between two arrays of finite numbers (0 where both are 0)."""
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0:
        return 0.0
    scale = np.maximum(np.abs(a), np.abs(b))
    scale[scale == 0] = 1.0
    return float(np.max(np.abs(a - b) / scale))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run each test module on one intra-op thread: these models are tiny and the cores are shared, so a
    second thread only adds synchronization (several times slower under load). Import it into a test
    module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class NonFiniteOnFour(TinyCNN):
    """``TinyCNN`` whose logits are NaN on a batch of four inputs (and on the hooked pass of such a batch, four
    clean rows stacked with one configuration's four): a failure that only the process holding it meets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * float("nan") if len(x) in (4, 8) else out


def interrupt_training(monkeypatch, epoch: int):
    """Make harden's training stop with Ctrl-C as it starts ``epoch`` (as a user stops it); returns the function
    that lets training run through again."""
    from robaudit.training.loop import Trainer

    real = Trainer.train_epoch

    def interrupted(self, at: int):
        if at == epoch:
            raise KeyboardInterrupt
        return real(self, at)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(Trainer, "train_epoch", real)
