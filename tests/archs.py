"""The architectures adversarial-robustness work audits, written out at small widths for the tests.

Each follows the structure of its usual definition (torchvision's ResNets, the PreAct ResNet of the
fast-AT papers, RobustBench's WideResNet, VGG-11-BN, MobileNetV2, a ViT and a ConvNeXt stage), with
widths as keyword arguments so that CPU tests stay fast. Usable as ``--arch tests.archs:Name``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# -- torchvision-style ResNet ----------------------------------------------------------------
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one in-place ``self.relu`` called twice, optional downsample."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (1x1, 3x3, 1x1; expansion 4), its ``self.relu`` called three times."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet (7x7 stem, max-pool, four stages, average pool, fc) with a base width."""

    def __init__(self, block: str = "basic", layers=(2, 2, 2, 2), width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        blk = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(blk, width, layers[0])
        self.layer2 = self._make_layer(blk, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(blk, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(blk, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * blk.expansion, num_classes)

    def _make_layer(self, blk, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * blk.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * blk.expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * blk.expansion))
        layers = [blk(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * blk.expansion
        layers += [blk(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18(ResNet):
    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__("basic", (2, 2, 2, 2), width, num_classes)


class BottleneckResNet(ResNet):
    """A Bottleneck ResNet (ResNet-50's blocks) with one block per stage."""

    def __init__(self, width: int = 4, num_classes: int = 10, layers=(1, 1, 1, 1)) -> None:
        super().__init__("bottleneck", tuple(layers), width, num_classes)


# -- PreAct ResNet-18 (fast-AT / robust-overfitting code) ------------------------------------
class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet18(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, 2, 1)
        self.layer2 = self._make_layer(width * 2, 2, 2)
        self.layer3 = self._make_layer(width * 4, 2, 2)
        self.layer4 = self._make_layer(width * 8, 2, 2)
        self.bn = nn.BatchNorm2d(width * 8)
        self.linear = nn.Linear(width * 8, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


# -- WideResNet as RobustBench defines it ----------------------------------------------------
class WRNBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, 1, stride=stride,
                                                                padding=0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(i == 0 and in_planes or out_planes, out_planes,
                                              i == 0 and stride or 1, drop_rate) for i in range(int(nb_layers))])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """RobustBench's WideResNet-depth-k; ``base`` scales its (16, 16k, 32k, 64k) channels down for tests."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, drop_rate: float = 0.0,
                 base: int = 16) -> None:
        super().__init__()
        channels = [base, base * widen_factor, 2 * base * widen_factor, 4 * base * widen_factor]
        assert (depth - 4) % 6 == 0
        n = (depth - 4) / 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.nChannels)
        return self.fc(out)


# -- VGG-11-BN --------------------------------------------------------------------------------
class VGG11BN(nn.Module):
    """VGG-11 with BatchNorm (configuration A) for 32x32 inputs; ``width`` replaces the first 64 channels."""

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        cfg = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v * width, 3, padding=1), nn.BatchNorm2d(v * width), nn.ReLU(inplace=True)]
                cin = v * width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(cin, cin), nn.ReLU(True), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# -- MobileNetV2 ------------------------------------------------------------------------------
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers = [] if expand_ratio == 1 else [ConvBNReLU(cin, hidden, kernel=1)]
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),  # depthwise
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (ReLU6, depthwise convolutions, inverted residuals) with a shortened setting list."""

    def __init__(self, width: int = 8, num_classes: int = 10,
                 setting=((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2))) -> None:
        super().__init__()
        features = [ConvBNReLU(3, width, stride=1)]
        cin = width
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU(cin, 4 * cin, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * cin, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# -- a small ViT ------------------------------------------------------------------------------
class EncoderBlock(nn.Module):
    """Pre-norm encoder block; ``seq_first`` takes ``(L, N, E)`` tensors, nn.MultiheadAttention's default layout."""

    def __init__(self, dim: int, heads: int, mlp: int, seq_first: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=not seq_first)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """A Vision Transformer (patch convolution, class token, position embedding, pre-norm encoder blocks)."""

    def __init__(self, image_size: int = 32, patch: int = 8, dim: int = 16, depth: int = 2, heads: int = 2,
                 mlp: int = 32, num_classes: int = 10, seq_first: bool = False) -> None:
        super().__init__()
        self.seq_first = seq_first  # the encoder runs on (L, N, E): every block output has its batch at dim 1
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, mlp, seq_first) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        if self.seq_first:
            x = self.ln(self.layers(x.transpose(0, 1)))
            return self.head(x[0])
        x = self.ln(self.layers(x))
        return self.head(x[:, 0])


# -- ConvNeXt-style -------------------------------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, channels-last LayerNorm (via permutes), MLP with GELU, layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A ConvNeXt-style net: patchify stem, one stage of blocks, global pool, LayerNorm, head."""

    def __init__(self, dim: int = 8, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.stages = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((-2, -1))))


ARCHS = {
    "resnet18": (ResNet18, {"width": 4}),
    "bottleneck": (BottleneckResNet, {"width": 2}),
    "preact18": (PreActResNet18, {"width": 4}),
    "wrn": (WideResNet, {"depth": 28, "widen_factor": 1, "base": 4}),
    "vgg11bn": (VGG11BN, {"width": 2}),
    "mobilenetv2": (MobileNetV2, {"width": 4}),
    "vit": (ViT, {}),
    "vit-seqfirst": (ViT, {"seq_first": True}),
    "convnext": (ConvNeXt, {}),
}


def build(key: str, *, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The architecture ``key`` at its test width, seeded, with non-trivial BatchNorm statistics, in eval mode."""
    cls, kwargs = ARCHS[key]
    torch.manual_seed(seed)
    model = cls(num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.linspace(-0.05, 0.05, c))
                m.running_var.copy_(torch.linspace(0.5, 1.5, c))
    return model.eval()
