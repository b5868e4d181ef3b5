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
from .errors import RobauditError
from .exported import current_chunk, fixed_batch

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


def row_channel_sums(x: torch.Tensor) -> torch.Tensor:
    """Per sample (dim 0), each channel's (dim 1) sum, sum of squares and count of values, as a float64
    ``rows x (2 * channels + 1)`` tensor. Each sample's values are reduced in float32 (short reductions over
    contiguous memory, within 1e-7 of float64) and only the small result is widened: several times faster
    than one float64 reduction over dims 0, 2, 3, and no float64 copy of ``x``."""
    f = x.detach().reshape(x.shape[0], x.shape[1], -1)
    norms = torch.linalg.vector_norm(f, dim=2)
    return torch.cat([f.sum(2), norms * norms, norms.new_full((len(f), 1), f.shape[2])], 1).double()


def channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares (channels on dim 1) in float64, and the count of values per channel:
    :func:`row_channel_sums` added over the samples."""
    c = x.shape[1]
    total = row_channel_sums(x).sum(0)
    return total[:c], total[c:2 * c], x.numel() // c


class ChannelMoments:
    """Per-channel count, sum and sum of squares of a layer's input (channels on dim 1), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        s, ss, n = channel_sums(x)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += n

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
    module: nn.Module | None  # None: read the running statistics from the root's state by name
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
    return _table(layers, inner)


def _table(layers: Sequence[_Layer], inner: nn.Module) -> pd.DataFrame:
    """``bn.csv``: per layer, the three distances between running, clean and adversarial statistics (the
    running ones read from ``inner``, the user's model); layers without running statistics or inputs left out."""
    root_state, modules = inner.state_dict(), dict(inner.named_modules())
    rows = []
    for layer in layers:
        running = _running(modules.get(layer.name, layer.module), layer.name, root_state)
        if running is None or layer.clean.n == 0 or layer.adv.n == 0:
            continue
        cm, cv = layer.clean.compute()
        am, av = layer.adv.compute()
        rm, rv, bn_eps = running[0].to(cm.device), running[1].to(cm.device), running[2]
        rows.append({"layer": layer.name, "layer_type": layer.cls, "channels": int(cm.numel()),
                     "n_clean": layer.clean.n, "n_adv": layer.adv.n,
                     "clean_vs_running": float(symmetric_kl(cm, cv, rm, rv, bn_eps).mean()),
                     "adv_vs_clean": float(symmetric_kl(am, av, cm, cv, bn_eps).mean()),
                     "adv_vs_running": float(symmetric_kl(am, av, rm, rv, bn_eps).mean())})
    return pd.DataFrame(rows, columns=BN_COLUMNS)


class BatchNormStreams:
    """Every BatchNorm layer's per-channel input moments, taken in the analysis' own hooked passes instead of
    attacking the data again: domain 0 is the clean batch, domain ``1 + i`` configuration ``i``'s perturbed
    batch. One float64 tensor on the device (``sums``, per domain: each layer's sums, sums of squares and
    count), added over processes with the battery's other sums. A fixed-batch archive's padded rows are left
    out."""

    def __init__(self, module: nn.Module, type_map: Mapping[str, str] | None, n_configs: int,
                 device: torch.device) -> None:
        self.root = module
        state: dict | None = None  # the root's state, built only for a layer that does not hold its own
        self.layers: list[tuple[str, str, nn.Module, int]] = []
        for name, cls, sub in batchnorm_layers(module, type_map):
            if getattr(sub, "running_mean", None) is None or getattr(sub, "running_var", None) is None:
                state = module.state_dict() if state is None else state
            running = _running(sub, name, state or {})
            if running is not None:  # no running statistics: nothing to compare (the audit skips it too)
                self.layers.append((name, cls, sub, int(running[0].numel())))
        self.offsets = [0]
        for *_, c in self.layers:
            self.offsets.append(self.offsets[-1] + 2 * c + 1)
        # one row per domain, and a last one that takes the rows of batches recorded into no domain
        self.sums = torch.zeros(2 + n_configs, self.offsets[-1], dtype=torch.float64, device=device)
        self.quiet = False  # True while passes that are not the analysis' own run (the probe's proof passes)

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Record nothing in this block: the passes in it are not the analysis' stacked batches."""
        self.quiet = True
        try:
            yield
        finally:
            self.quiet = False

    @contextlib.contextmanager
    def recording(self, domains: Sequence[int | None], rows: int) -> Iterator[None]:
        """In this block, the inputs every BatchNorm layer sees hold ``len(domains)`` stacked batches of ``rows``
        rows each: add the k-th batch's to domain ``domains[k]`` (``None``: to none). Hooks always removed."""
        discard = len(self.sums) - 1
        index = torch.tensor([discard if d is None else d for d in domains], device=self.sums.device)
        index = index.repeat_interleave(rows)  # each stacked row's domain
        handles = []
        try:
            for (name, _, sub, c), off in zip(self.layers, self.offsets):
                handles.append(sub.register_forward_pre_hook(self._hook(name, off, c, index)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str, off: int, c: int, index: torch.Tensor):
        def fn(mod, args):
            x = args[0] if args else None
            if self.quiet or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != c:
                return
            rows = index
            chunk = current_chunk(self.root)  # a fixed-batch archive: one chunk, real rows only
            if chunk is not None:
                first = chunk[0] * fixed_batch(self.root)
                x, rows = x[:chunk[1]], index[first:first + chunk[1]]
            if len(x) != len(rows):  # samples folded into the batch dimension inside the model (batch-major)
                if len(rows) == 0 or len(x) % len(rows):
                    raise RobauditError(f"BatchNorm layer {name} sees {len(x)} rows for {len(rows)} samples, so "
                                        "its rows cannot be matched to samples: robaudit needs a model that "
                                        "keeps each sample's values on the batch dimension")
                rows = rows.repeat_interleave(len(x) // len(rows))
            self.sums[:, off:off + 2 * c + 1].index_add_(0, rows, row_channel_sums(x))
        return fn

    def moments(self, sums: torch.Tensor) -> "BatchNormMoments":
        """The host result of ``sums`` (this object's, added over processes): no module references."""
        return BatchNormMoments(layers=[(name, cls, c) for name, cls, _, c in self.layers],
                                offsets=list(self.offsets), sums=sums[:-1].detach().cpu())


@dataclass
class BatchNormMoments:
    """What :class:`BatchNormStreams` measured in an analysis: ``table(i, inner)`` is ``bn.csv`` under
    configuration ``i``, the same as :func:`audit_batchnorm` attacking the data again with its draws."""

    layers: list[tuple[str, str, int]]
    offsets: list[int]
    sums: torch.Tensor

    def table(self, config: int, inner: nn.Module) -> pd.DataFrame:
        entries = []
        for (name, cls, c), off in zip(self.layers, self.offsets):
            domains = []
            for d in (0, 1 + config):
                row, m = self.sums[d, off:off + 2 * c + 1], ChannelMoments()
                m.merge(int(row[2 * c]), row[:c], row[c:2 * c])
                domains.append(m)
            entries.append(_Layer(name, cls, None, *domains))
        return _table(entries, inner)


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
