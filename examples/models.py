"""Example architectures: a digits CNN with BatchNorm and a moons MLP.

They are importable as ``robaudit.examples.models:DigitsCNN`` / ``:MoonsMLP`` once robaudit is
installed, so checkpoints that name them load anywhere.
"""
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (inputs N x 1 x 8 x 8 in [0, 1])."""

    def __init__(self, width: int = 16, hidden: int = 64, num_classes: int = 10, batchnorm: bool = True) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), norm(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class MoonsMLP(nn.Module):
    """A three-layer MLP for the two-moons data (inputs N x 2 in [0, 1])."""

    def __init__(self, hidden: int = 64, num_classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)
