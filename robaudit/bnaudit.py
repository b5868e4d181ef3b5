"""BatchNorm two-domain audit (after Xie & Yuille): do clean and adversarial inputs see different statistics?

For every BatchNorm layer, per channel, three Gaussians are compared: the running statistics the model
uses at test time, those of clean batches and those of adversarial batches (the ranking attack's). The
distance is the symmetric KL divergence between per-channel Gaussians, averaged over channels. Moments
are accumulated streaming, in float64, batch by batch. When the adversarial shift is far larger than the
clean one, the two domains want separate statistics: ``harden --dual-bn``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from . import attacks as atk
from . import dist

BN_TYPES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})
BN_COLUMNS = ["layer", "layer_type", "channels", "n_clean", "n_adv", "clean_vs_running", "adv_vs_clean",
              "adv_vs_running"]
# the recommendation: the adversarial shift (adv vs clean) at least SHIFT_RATIO times the clean one
# (clean vs running), averaged over layers, and not negligible in itself
SHIFT_RATIO = 3.0
MIN_SHIFT = 0.01


def batchnorm_layers(module: nn.Module, type_map: Mapping[str, str] | None = None) -> list[tuple[str, str, nn.Module]]:
    """(qualified name, class name, module) of every BatchNorm layer, eager or unflattened ``.pt2``."""
    type_map = type_map or {}
    found = []
    for name, sub in module.named_modules():
        cls = type_map.get(name) or type(sub).__name__
        if name and (cls in BN_TYPES or isinstance(sub, nn.modules.batchnorm._BatchNorm)):
            found.append((name, cls if cls in BN_TYPES else type(sub).__name__, sub))
    return found


class ChannelMoments:
    """Per-channel count, sum and sum of squares of a layer's input (channels on dim 1), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        s, ss = x.sum(dim=1), (x * x).sum(dim=1)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += x.shape[1]

    def merge(self, n: int, s: torch.Tensor | None, ss: torch.Tensor | None) -> None:
        """Add another stream's count and sums (another process's share of the batches)."""
        if s is None:
            return
        self.s = s if self.s is None else self.s + s.to(self.s.device)
        self.ss = ss if self.ss is None else self.ss + ss.to(self.ss.device)
        self.n += n

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean * mean).clamp_min(0.0)


def symmetric_kl(m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor,
                 eps: float = 1e-5) -> torch.Tensor:
    """KL(N1||N2) + KL(N2||N1) per channel; ``eps`` (BatchNorm's own) keeps a dead channel finite."""
    v1, v2 = v1 + eps, v2 + eps
    d2 = (m1 - m2) ** 2
    return (v1 + d2) / (2 * v2) + (v2 + d2) / (2 * v1) - 1.0


@dataclass
class _Layer:
    name: str
    cls: str
    module: nn.Module
    clean: ChannelMoments
    adv: ChannelMoments


@contextlib.contextmanager
def _recording(layers: list[_Layer], state: dict) -> Iterator[None]:
    """Record each BatchNorm layer's input into the moments ``state['domain']`` names; hooks always removed."""
    handles = []

    def hook(layer: _Layer):
        def fn(mod, args):
            domain = state.get("domain")
            if domain and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                getattr(layer, domain).update(args[0])
        return fn

    try:
        handles = [l.module.register_forward_pre_hook(hook(l)) for l in layers]
        yield
    finally:
        for h in handles:
            h.remove()


def _running(module: nn.Module, name: str, root_state: dict) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if mean is None or var is None:
        mean, var = root_state.get(f"{name}.running_mean"), root_state.get(f"{name}.running_var")
    if mean is None or var is None:
        return None
    return mean.detach().to(torch.float64), var.detach().to(torch.float64), float(getattr(module, "eps", 1e-5))


def audit_batchnorm(model: nn.Module, inner: nn.Module, data, *, attack: atk.AttackSpec, num_classes: int,
                    type_map: Mapping[str, str] | None = None, batch_size: int = 128,
                    device: torch.device | str = "cpu", seed: int = 0, config: int = 0,
                    distributed: bool = False) -> pd.DataFrame:
    """Compare running, clean and adversarial BatchNorm statistics of ``inner`` (the user's model inside
    ``model``, which may add input normalization) under one attack configuration.

    ``data`` is a data set (in memory or streaming) or an ``(x, y)`` pair; it is read batch by batch. The
    attack's draws on global batch ``b`` are seeded from ``(seed, b, config)``: with ``config`` the attack's
    index in an analysis, its adversarial batches are the analysis' own. With ``distributed`` (under
    torchrun, called by every process) each process takes its share of the batches and the moments are
    added over processes; every process gets the table."""
    from .data import as_dataset, batches

    found = batchnorm_layers(inner, type_map)
    if not found:
        return pd.DataFrame(columns=BN_COLUMNS)
    layers = [_Layer(n, c, m, ChannelMoments(), ChannelMoments()) for n, c, m in found]
    device = torch.device(device)
    model = model.to(device).eval()
    fn = atk.build(attack, model, num_classes=num_classes, seed=seed)
    state: dict = {}
    data = as_dataset(data, "BatchNorm audit")
    part = (dist.rank(), dist.world_size()) if distributed else (0, 1)
    error = None
    with _recording(layers, state):
        try:  # under torchrun a failure reaches every process at the exchange instead of leaving them waiting
            for start, xb, yb in batches(data, batch_size=batch_size, device=device, part=part):
                state["domain"] = None
                atk.reseed(fn, atk.batch_seed(seed, start // batch_size, config))
                adv = fn(xb, yb).detach()
                with torch.no_grad():
                    state["domain"] = "clean"
                    model(xb)
                    state["domain"] = "adv"
                    model(adv)
                state["domain"] = None
        except Exception as e:
            if not distributed:
                raise
            error = e
    if distributed:
        _add_over_processes(layers, error)
    root_state = inner.state_dict()
    rows = []
    for layer in layers:
        running = _running(layer.module, layer.name, root_state)
        if running is None or layer.clean.n == 0 or layer.adv.n == 0:
            continue
        rm, rv, bn_eps = (t.to(device) if isinstance(t, torch.Tensor) else t for t in running)
        cm, cv = (t.to(device) for t in layer.clean.compute())
        am, av = (t.to(device) for t in layer.adv.compute())
        rows.append({"layer": layer.name, "layer_type": layer.cls, "channels": int(cm.numel()),
                     "n_clean": layer.clean.n, "n_adv": layer.adv.n,
                     "clean_vs_running": float(symmetric_kl(cm, cv, rm, rv, bn_eps).mean()),
                     "adv_vs_clean": float(symmetric_kl(am, av, cm, cv, bn_eps).mean()),
                     "adv_vs_running": float(symmetric_kl(am, av, rm, rv, bn_eps).mean())})
    return pd.DataFrame(rows, columns=BN_COLUMNS)


def _add_over_processes(layers: list[_Layer], error: BaseException | None) -> None:
    """Every process's moments added into each process's own (in rank order, so all get the same sums);
    ``error`` (this process's failure, if any) stops every process instead."""
    def mine(m: ChannelMoments):
        return m.n, None if m.s is None else m.s.cpu(), None if m.ss is None else m.ss.cpu()

    everyone = dist.exchange(None if error else [(mine(l.clean), mine(l.adv)) for l in layers], error)
    for layer in layers:
        layer.clean, layer.adv = ChannelMoments(), ChannelMoments()
    for per_layer in everyone:
        for layer, (clean, adv) in zip(layers, per_layer):
            layer.clean.merge(*clean)
            layer.adv.merge(*adv)


def verdict(bn: pd.DataFrame | None) -> dict | None:
    """Whether the adversarial shift is far larger than the clean one, averaged over layers."""
    if bn is None or bn.empty:
        return None
    clean, adv = float(bn["clean_vs_running"].mean()), float(bn["adv_vs_clean"].mean())
    ratio = adv / clean if clean > 0 else float("inf")
    two_domains = adv >= MIN_SHIFT and ratio >= SHIFT_RATIO
    return {"clean_shift": clean, "adversarial_shift": adv, "ratio": ratio, "recommend_dual_bn": two_domains,
            "threshold": f"adversarial shift at least {SHIFT_RATIO:g}x the clean one and at least {MIN_SHIFT:g} "
                         "(symmetric KL per channel, averaged over channels and layers)"}


def ranking_spec(specs: Sequence[atk.AttackSpec], label: str | None, eps: float | None) -> atk.AttackSpec | None:
    """The configuration that ranked the MVL list (its label and eps), among the analysed ones."""
    for s in specs:
        if s.label == label and (eps is None or (s.eps is not None and abs(s.eps - float(eps)) < 1e-12)):
            return s
    return None
