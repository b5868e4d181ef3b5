"""The layers hardening works on and its hooks on them: which layers (:class:`LayerRule`: the MVL list or a
control), the AT-LR recorder, the layerwise perturber, dual BatchNorm."""
from __future__ import annotations

import contextlib
import math
import random
from typing import Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from ..errors import RobauditError
from ..probe import Layer
from .config import Choice

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm modules that track running statistics (trainable BN of an eager model)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batch_independent(module: nn.Module, exported: bool = False) -> bool:
    """True when no layer computes batch statistics in training (no trainable BatchNorm)."""
    return exported or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class LayerRule(Choice):
    """Which layers hardening regularizes: the MVL list, or a control that ignores the RE ranking."""

    MVL = "mvl"  # the Most Vulnerable Layers, most vulnerable first
    DEEPEST = "deepest"  # the k deepest candidate layers, deepest first
    RANDOM = "random"  # k candidate layers drawn with the seed, in forward order

    @classmethod
    def of(cls, value) -> "LayerRule":
        return cls.parse(value, "unknown --layers-from {value!r}: use {choices}")

    def describe(self, names: Sequence[str]) -> str:
        """How a report names this rule's choice of ``names``, e.g. "the 5 deepest probed layers (control)"."""
        k = len(names)
        noun = "layer" if k == 1 else "layers"
        if self is LayerRule.DEEPEST:
            return f"the {k} deepest probed {noun} (control), not the MVL list"
        if self is LayerRule.RANDOM:
            return f"{k} probed {noun} drawn at random (control), not the MVL list"
        return f"the {k} most vulnerable {noun} (the MVL list)"


def control_layers(candidates: pd.DataFrame, rule: LayerRule, *, k: int, seed: int) -> list[str]:
    """The ``k`` layers a control rule picks from ``candidates`` (the rows the MVL list ranks: ``layer`` and
    forward ``order``): the deepest, deepest first; or ``k`` drawn with ``seed`` (the same seed, the same draw),
    listed in forward order."""
    layers = candidates.drop_duplicates("layer").sort_values("order")["layer"].tolist()
    if k < 1 or k > len(layers):
        raise RobauditError(f"--layers-from {rule.value} needs {k} layers but the analysis has {len(layers)} to "
                            f"choose from: use --mvl-top {len(layers)} or fewer")
    if rule is LayerRule.DEEPEST:
        return layers[::-1][:k]
    if rule is LayerRule.RANDOM:
        picked = set(random.Random(seed).sample(range(len(layers)), k))
        return [name for i, name in enumerate(layers) if i in picked]
    raise RobauditError(f"--layers-from {rule.value} is not a control: the MVL list comes from the run")


def layer_modules(names: Sequence[str]) -> list[str]:
    """The probe layer names of MVL names (``name#2`` is a second call of ``name``)."""
    return list(dict.fromkeys(n.split("#", 1)[0] for n in names))


class DualBatchNorm:
    """Separate BatchNorm running statistics for clean passes (MixBN): swap them in with :meth:`clean`.

    The model's own BN buffers hold the adversarial statistics (used at test and saved); a second
    set, initialized from the model's, is swapped in for the duration of every clean pass and
    swapped out afterwards. Affine parameters are shared.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = batchnorm_modules(model)
        if not self.modules:
            raise RobauditError("--dual-bn needs a model with BatchNorm layers; this one has none: drop --dual-bn")
        self.aux = {name: {k: getattr(m, k).detach().clone() for k in _BN_BUFFERS if getattr(m, k, None) is not None}
                    for name, m in self.modules}
        self._swapped = False

    def _swap(self) -> None:
        for name, m in self.modules:
            for k, aux in self.aux[name].items():
                main = getattr(m, k)
                setattr(m, k, aux)
                self.aux[name][k] = main
        self._swapped = not self._swapped

    @contextlib.contextmanager
    def clean(self) -> Iterator[None]:
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def state_dict(self) -> dict:
        return {name: {k: v.detach().cpu().clone() for k, v in bufs.items()} for name, bufs in self.aux.items()}

    def load_state_dict(self, state: Mapping) -> None:
        for name, bufs in state.items():
            for k, v in bufs.items():
                self.aux[name][k] = v.to(self.aux[name][k].device)


class Recorder:
    """Probe transform for AT-LR: keep a (differentiable) copy of each MVL layer's output.

    A copy, because a later in-place op (``ReLU(inplace=True)`` after a BN) would otherwise change
    the recorded tensor and break the backward pass.
    """

    def __init__(self) -> None:
        self.active = False
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(self, layer: Layer, out: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.outputs[layer.name] = out.clone()
        return out

    def take(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out


class LayerwisePerturber:
    """Probe transform for layerwise AT: add ``layer_eps * rms_i * sign(g_prev)`` to each MVL output.

    ``g_prev`` is the loss gradient with respect to that layer's output from the previous batch,
    caught by a tensor hook during the ordinary backward pass (no extra pass); batches of another size
    reuse its first rows (cyclically). The first batch runs unperturbed. Since ``||sign||_2 <= sqrt(d)``,
    the perturbation's RE is at most ``layer_eps``.
    """

    def __init__(self, layer_eps: float) -> None:
        self.layer_eps = layer_eps
        self.active = False
        self.signs: dict[str, torch.Tensor] = {}

    def __call__(self, layer: Layer, out: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return out
        name = layer.name
        sign = self.signs.get(name)
        if sign is not None and sign.shape[1:] == out.shape[1:]:
            n = out.shape[0]
            if sign.shape[0] < n:
                sign = sign.repeat(math.ceil(n / sign.shape[0]), *([1] * (sign.dim() - 1)))
            sign = sign[:n] if sign.shape[0] != n else sign
            rms = out.detach().flatten(1).norm(dim=1).mul_(self.layer_eps / math.sqrt(out[0].numel()))
            out = out + rms.view(n, *([1] * (out.dim() - 1))) * sign
        if out.requires_grad:
            out.register_hook(lambda g, name=name: self._keep(name, g))
        return out

    def _keep(self, name: str, grad: torch.Tensor) -> None:
        self.signs[name] = grad.detach().sign()

    def state_dict(self) -> dict:
        return {k: v.to("cpu", torch.int8) for k, v in self.signs.items()}

    def load_state_dict(self, state: Mapping, device, dtype=torch.float32) -> None:
        self.signs = {k: v.to(device, dtype) for k, v in state.items()}
