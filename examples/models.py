"""Example architectures: a digits CNN with BatchNorm, a deeper one with residual blocks, and a moons MLP.

They are importable as ``robaudit.examples.models:DigitsCNN`` / ``:DigitsDeepCNN`` / ``:MoonsMLP`` once robaudit is
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


class ConvBNReLU(nn.Sequential):
    """One conv-BN-ReLU stage (3x3, padding 1)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class ResidualBlock(nn.Module):
    """Two conv-BN stages with an identity shortcut: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class DigitsDeepCNN(nn.Module):
    """A deeper digits CNN with BatchNorm: seven conv-BN-ReLU stages, two of them residual blocks.

    stem (8x8) -> stage -> residual block -> downsample to 4x4 -> residual block -> global average pool ->
    linear: seven ReLU layers, so that "most vulnerable" and "deepest" can differ.
    """

    def __init__(self, width: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(1, width), ConvBNReLU(width, width), ResidualBlock(width),
            ConvBNReLU(width, 2 * width, stride=2), ResidualBlock(2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
