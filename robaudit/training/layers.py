"""Hooks on the MVL layers while training: the AT-LR recorder, the layerwise perturber, dual BatchNorm."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import RobauditError
from ..probe import Layer

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm modules that track running statistics (trainable BN of an eager model)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def batch_independent(module: nn.Module, exported: bool = False) -> bool:
    """True when no layer computes batch statistics in training (no trainable BatchNorm)."""
    return exported or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


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
