"""Hardening: fine-tune a classifier so that its Most Vulnerable Layers become sustainable.

Methods (``method=``):

- ``atlr`` -- adversarial training with layer-wise regularization (Khalooei et al., LSA paper):
  ``loss = CE(f(x_adv), y) + sum_l gamma_l * RE_l(x, x_adv)`` over the MVL layers, with gradients
  through both the clean and the adversarial pass. ``x_adv`` comes from the base attack (PGD, or
  FGSM) run with the model in eval mode.
- ``at`` -- plain adversarial training (Madry et al.) with the same attack and settings: the
  baseline every AT-LR claim is measured against. ``atlr`` with every gamma 0 is exactly ``at``.
- ``layerwise`` -- efficient layerwise adversarial training (Sankaranarayanan et al.): the MVL
  layers' activations are pushed along the sign of the previous batch's loss gradient with respect
  to them, by ``layer_eps`` times each sample's activation RMS (so the perturbation's RE is at most
  ``layer_eps``); one forward and one backward pass per batch, about the cost of ordinary training.
- ``standard`` -- ordinary cross-entropy training with the same loop (the reference for cost and accuracy).

``clean_weight=w`` mixes clean cross-entropy in: ``(1 - w) * CE(adv) + w * CE(clean)`` (0 by default:
adversarial-only training is the more robust, Xie & Yuille).

BatchNorm. Clean and adversarial batches always run as separate forward passes, so their batch
statistics are never pooled within a pass. Without ``dual_bn`` every training pass also updates the
BN running statistics, so a clean pass (AT-LR's reference pass, or ``clean_weight > 0``) mixes clean
statistics into the ones used at test. With ``dual_bn`` (MixBN, Xie & Yuille) clean passes read and
update a separate set of running statistics; the affine parameters are shared. **At test time the
adversarial statistics are used**: they are the model's own BN buffers, the ones saved; the clean set
is dropped after training. A ``torch.export`` archive was captured in eval mode: its BatchNorm, Dropout,
LayerNorm and GroupNorm leaves are rebuilt as ``torch.nn`` modules with the archive's parameters and buffers, so they train
as in eager mode (and ``dual_bn`` works); the saved ``.pt2`` keeps its format. An eager model whose
MVL list holds op layers (``block:relu``) trains through its internal export the same way.

Every epoch ends with a validation pass (clean accuracy and PGD accuracy at the training eps) and,
when ``checkpoint_dir`` is given, an atomic checkpoint (model, optimizer, scheduler, RNG states,
history) from which ``resume=True`` continues bit for bit. Training stops with a one-line
:class:`~robaudit.errors.RobauditError` when the loss becomes NaN or clean validation accuracy falls
to chance (a collapse: e.g. a constant output, whose RE is trivially 0).

:func:`harden_run` is the run-directory stage behind ``robaudit harden``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import attacks as atk
from .errors import NonFiniteError, RobauditError
from .models import LoadedModel, check_compatible, with_normalization
from .probe import Layer, LayerProbe
from .training.config import (DEFAULT_LR, BaseAttack, HardenConfig, Method, Optimizer, ReMode,  # noqa: F401
                              Schedule, check_eps)

log = logging.getLogger(__name__)

METHODS = tuple(m.value for m in Method)
CHECKPOINT_NAME = "harden-checkpoint.pt"
CHECKPOINT_FORMAT = "robaudit-harden-checkpoint"
HARDENED_DIR = "hardened"
COLLAPSE_MARGIN = 0.02  # clean accuracy within this of the majority-class rate counts as chance


class HardenInterrupted(RobauditError):
    """Training was interrupted (Ctrl-C); the last complete epoch's checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# the regularizer


def layer_relative_error(clean: torch.Tensor, perturbed: torch.Tensor, mode: str = "pooled") -> torch.Tensor:
    """Differentiable ``RE_l(x, x')`` of one batch of one layer's outputs.

    ``pooled``: ``||Phi' - Phi||_F / ||Phi||_F`` over the whole batch (the authors' reference code).
    ``per-sample``: the mean over samples of ``||phi'_i - phi_i|| / ||phi_i||``; samples whose clean
    activation is exactly zero have no RE and are left out (as in the analysis). A batch whose clean
    activations are all zero gives 0.
    """
    c = clean.flatten(1)
    d = (perturbed - clean).flatten(1)
    if mode == "pooled":
        denom = torch.linalg.vector_norm(c)
        ok = denom > 0
        return torch.where(ok, torch.linalg.vector_norm(d) / torch.where(ok, denom, torch.ones_like(denom)),
                           torch.zeros_like(denom))
    if mode == "per-sample":
        cn = torch.linalg.vector_norm(c, dim=1)
        ok = cn > 0
        ratio = torch.linalg.vector_norm(d, dim=1) / torch.where(ok, cn, torch.ones_like(cn))
        return (ratio * ok).sum() / ok.sum().clamp_min(1)
    raise RobauditError(f"unknown RE mode {mode!r}: use pooled or per-sample")


def atlr_loss(
    logits_adv: torch.Tensor,
    y: torch.Tensor,
    clean_outputs: Mapping[str, torch.Tensor],
    adv_outputs: Mapping[str, torch.Tensor],
    *,
    gammas: Mapping[str, float],
    re_mode: str = "pooled",
    logits_clean: torch.Tensor | None = None,
    clean_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The AT-LR objective of one batch and its terms.

    ``(1 - clean_weight) * CE(logits_adv, y) + clean_weight * CE(logits_clean, y)
    + sum_l gammas[l] * RE_l(clean_outputs[l], adv_outputs[l])``. Returns ``(loss, terms)`` where
    ``terms`` holds ``ce_adv``, ``ce_clean`` (when used), ``reg`` and ``re:<layer>`` (unweighted).
    """
    terms: dict[str, torch.Tensor] = {}
    ce_adv = F.cross_entropy(logits_adv, y)
    terms["ce_adv"] = ce_adv
    loss = ce_adv if clean_weight == 0 else (1.0 - clean_weight) * ce_adv
    if clean_weight > 0:
        if logits_clean is None:
            raise ValueError("clean_weight > 0 needs logits_clean")
        ce_clean = F.cross_entropy(logits_clean, y)
        terms["ce_clean"] = ce_clean
        loss = loss + clean_weight * ce_clean
    active = {name: g for name, g in gammas.items() if g != 0}
    if active:
        reg = None
        for name, g in active.items():
            if name not in clean_outputs or name not in adv_outputs:
                raise RobauditError(f"layer {name} did not run in both the clean and the adversarial pass: "
                                    "check the MVL layer names against the model")
            re = layer_relative_error(clean_outputs[name], adv_outputs[name], re_mode)
            terms[f"re:{name}"] = re
            reg = g * re if reg is None else reg + g * re
        terms["reg"] = reg
        loss = loss + reg
    return loss, terms


# ---------------------------------------------------------------------------------------------
# BatchNorm helpers


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm modules that track running statistics (trainable BN of an eager model)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


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


# ---------------------------------------------------------------------------------------------
# recording and perturbing layer outputs


class _Recorder:
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


def _clean_and_adversarial(full: nn.Module, probe: LayerProbe | None, recorder: _Recorder, x: torch.Tensor,
                           x_adv: torch.Tensor, *, record: bool, need_clean: bool, joint: bool,
                           clean_ctx=contextlib.nullcontext):
    """Run the clean pass (when needed) and the adversarial pass; return logits and recorded outputs of both.

    ``joint``: one forward pass of ``cat([x, x_adv])``, split afterwards -- the same numbers for a model
    without batch statistics, at the cost of one larger pass instead of two (much cheaper for small
    models); never used with trainable BatchNorm, whose batch statistics would mix the two halves.
    Falls back to two passes (returning ``joint=False``) if a recorded output is not batch-first.
    """
    n = x.shape[0]
    if joint and need_clean:
        recorder.active = record
        if probe is not None:
            probe.reset()
        logits = full(torch.cat([x, x_adv]))
        outs = recorder.take()
        recorder.active = False
        if logits.shape[0] == 2 * n and all(t.shape[0] == 2 * n for t in outs.values()):
            return (logits[:n], {k: t[:n] for k, t in outs.items()}, logits[n:],
                    {k: t[n:] for k, t in outs.items()}, True)
    logits_clean, clean_outs = None, {}
    if need_clean:
        recorder.active = record
        with clean_ctx():
            if probe is not None:
                probe.reset()
            logits_clean = full(x)
        clean_outs = recorder.take()
    recorder.active = record
    if probe is not None:
        probe.reset()
    logits_adv = full(x_adv)
    adv_outs = recorder.take()
    recorder.active = False
    return logits_clean, clean_outs, logits_adv, adv_outs, False


def batch_independent(module: nn.Module, exported: bool = False) -> bool:
    """True when no layer computes batch statistics in training (no trainable BatchNorm)."""
    return exported or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class _LayerwisePerturber:
    """Probe transform for layerwise AT: add ``layer_eps * rms_i * sign(g_prev)`` to each MVL output.

    ``g_prev`` is the loss gradient with respect to that layer's output from the previous batch,
    caught by a tensor hook during the ordinary backward pass (no extra pass); batches of another size
    reuse its first rows (cyclically). The first batch runs unperturbed.
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


# ---------------------------------------------------------------------------------------------
# results and small helpers


@dataclass
class HardenResult:
    """What :func:`harden` did: the trained module (the caller's, trained in place) and its history."""

    module: nn.Module
    history: pd.DataFrame
    settings: dict
    mvl_layers: list[str]
    gammas: dict[str, float]
    validation: str
    bn_at_test: str
    resumed_from_epoch: int | None = None
    seconds: float = 0.0
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> dict:
        """The last epoch's history row."""
        return self.history.iloc[-1].to_dict()


def split_validation(data, *, fraction: float = 0.1, seed: int = 0):
    """Hold out ``fraction`` of ``data`` (a seeded permutation) for validation: ``(train, val, description)``."""
    if not 0 < fraction < 1:
        raise RobauditError(f"the validation fraction must lie in (0, 1), not {fraction}")
    n = len(data.y)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 2:
        raise RobauditError(f"the training split has only {n} samples: too few to hold out a validation part")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, tr_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    train, val = _subset(data, tr_idx, "fit"), _subset(data, val_idx, "val")
    desc = (f"a held-out {100 * fraction:g}% of the {data.name} {data.split} split "
            f"({n_val} of {n} samples, a permutation seeded with {seed}); training uses the other {n - n_val}")
    return train, val, desc


def _as_dataset(data, what: str):
    """A Dataset, or anything with x/y (and num_classes), or an ``(x, y)`` pair, as an object with x, y, name, split."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        data = SimpleNamespace(x=x, y=y)
    if not (hasattr(data, "x") and hasattr(data, "y")):
        raise RobauditError(f"the {what} data must be a robaudit Dataset or an (x, y) pair of tensors")
    if len(data.y) == 0:
        raise RobauditError(f"the {what} data set is empty")
    for attr, default in (("name", "data"), ("split", what), ("num_classes", int(data.y.max()) + 1)):
        if not hasattr(data, attr):
            data = copy.copy(data)
            setattr(data, attr, default)
    return data


def _subset(data, idx: torch.Tensor, tag: str):
    if dataclasses.is_dataclass(data):
        return dataclasses.replace(data, x=data.x[idx], y=data.y[idx], split=f"{data.split}-{tag}")
    out = copy.copy(data)
    out.x, out.y, out.split = data.x[idx], data.y[idx], f"{data.split}-{tag}"
    return out


def parse_gamma(value: float | str | Sequence[float], n_layers: int) -> list[float]:
    """One gamma per MVL layer from a scalar, a list, or a string such as ``1`` or ``1,0.5``."""
    if isinstance(value, str):
        values = [atk.parse_number(p) for p in value.split(",") if p.strip()]
    elif isinstance(value, (int, float)):
        values = [float(value)]
    else:
        values = [float(v) for v in value]
    if not values:
        raise RobauditError("--gamma needs a value, e.g. --gamma 1 or one per layer: --gamma 1,0.5")
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise RobauditError(f"--gamma values must be finite and non-negative, got {v:g}")
    if len(values) == 1:
        return values * n_layers
    if len(values) != n_layers:
        raise RobauditError(f"--gamma has {len(values)} values for {n_layers} MVL layers: give one value or {n_layers}")
    return values


def _module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if v.dtype != torch.bfloat16
                 else v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _layer_modules(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(n.split("#", 1)[0] for n in names))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _evaluate(full: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_fn, batch_size: int,
              dev: torch.device) -> tuple[float, float]:
    """Clean and attacked accuracy, model in eval mode."""
    full.eval()
    clean = robust = 0
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
        with torch.no_grad():
            clean += int((full(xb).argmax(1) == yb).sum())
        xa = attack_fn(xb, yb).detach()
        full.eval()
        with torch.no_grad():
            robust += int((full(xa).argmax(1) == yb).sum())
    n = max(len(x), 1)
    return clean / n, robust / n


# ---------------------------------------------------------------------------------------------
# training


def harden(
    model: nn.Module | LoadedModel,
    train,
    val=None,
    config: HardenConfig | None = None,
    *,
    mvl_layers: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    type_map: Mapping[str, str] | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    **settings: Any,
) -> HardenResult:
    """Fine-tune ``model`` on ``train`` as ``config`` says; validate on ``val`` after every epoch.

    ``config`` is a :class:`HardenConfig`; its fields may also be given (or overridden) as keywords
    (``eps=0.1, method="at"``). ``model`` (an ``nn.Module`` or a :class:`LoadedModel`) is trained **in
    place** and returned in eval mode. ``train``/``val`` are :class:`robaudit.data.Dataset` objects
    (inputs in [0, 1]); without ``val``, a seeded ``val_fraction`` of ``train`` is held out.
    ``mvl_layers`` are layer names as in the analysis (``name`` or ``name#2``); ``gamma`` one value or
    one per layer. ``eps`` is the training budget (Linf, input space); ``alpha`` the PGD step (default
    ``2.5 * eps / steps``); ``layer_eps`` the layerwise method's relative activation perturbation
    (default ``eps``). ``lr`` defaults to 1e-3 for Adam and 1e-2 for SGD (momentum 0.9);
    ``schedule="cosine"`` anneals it per epoch. With ``checkpoint_dir`` a checkpoint is written after
    every epoch and ``resume=True`` continues from it (the settings must match).
    """
    from .lsa import resolve_device

    cfg = HardenConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    started = time.perf_counter()
    notes: list[str] = list(cfg.notes)
    method, re_mode, base_attack = cfg.method, cfg.re_mode, cfg.base_attack
    optimizer, schedule = cfg.optimizer, cfg.schedule
    eps, steps, alpha, layer_eps = cfg.require_eps(), cfg.steps, cfg.alpha, cfg.layer_eps
    epochs, batch_size, lr, weight_decay = cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay
    clean_weight, dual_bn, val_fraction = cfg.clean_weight, cfg.dual_bn, cfg.val_fraction
    seed = 0 if cfg.seed is None else cfg.seed
    device, progress, check_collapse = cfg.device, cfg.progress, cfg.check_collapse

    exported = False
    eager = None  # an eager model trained through its graph (its op layers are in the MVL list)
    if isinstance(model, LoadedModel):
        type_map = type_map or model.type_map
        exported = model.format == "export"
        module = model.module
    else:
        module = model
    mvl_layers = list(mvl_layers or [])
    if method in ("atlr", "layerwise") and not mvl_layers:
        raise RobauditError(f"method {method} needs MVL layers: pass mvl_layers (or --mvl-top K)")
    from torch.export.unflatten import UnflattenedModule

    from .models import as_graph, make_trainable
    from .probe import op_layers

    if not isinstance(module, UnflattenedModule) and any(":" in n for n in mvl_layers):
        eager = module
        module, type_map = as_graph(eager, _as_dataset(train, "training").x[:2])
    frozen_names: list[str] = []
    if isinstance(module, UnflattenedModule):  # BN, dropout and norms train as in eager mode
        _, frozen_names = make_trainable(module, dict(type_map or {}))
    fixed_batch = module.__dict__.get("_robaudit_fixed_batch")
    if fixed_batch is not None and batch_size != fixed_batch:
        notes.append(f"the archive was exported for batches of {fixed_batch}: training uses batches of {fixed_batch}")
        batch_size = fixed_batch
    known = {n for n, _ in module.named_modules() if n} | set(op_layers(module))
    for name in _layer_modules(mvl_layers):
        if name not in known:
            raise RobauditError(f"the model has no layer named {name!r}: use layer names from the analysis")
    gammas = dict(zip(mvl_layers, parse_gamma(cfg.gamma, len(mvl_layers)))) if mvl_layers else {}
    frozen = sorted({(type_map or {}).get(n, "?") for n in frozen_names})
    if frozen:
        msg = (f"the model is a torch.export archive, captured in eval mode: its {', '.join(frozen)} layers that "
               "could not be rebuilt stay frozen while hardening; harden a checkpoint with an architecture to "
               "train them")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    exported = exported and any("batchnorm" in t.lower() for t in frozen)  # only frozen BN matters below
    if dual_bn:
        if exported:
            raise RobauditError("--dual-bn cannot work on this torch.export archive (its BatchNorm statistics are "
                                "frozen): harden a checkpoint with an architecture, or drop --dual-bn")
        if not batchnorm_modules(module):
            raise RobauditError("--dual-bn needs a model with BatchNorm layers; this one has none: drop --dual-bn")
    uses_clean_pass = (method == "atlr" and any(g != 0 for g in gammas.values())) or (
        method in ("at", "atlr", "layerwise") and clean_weight > 0)
    if dual_bn and not uses_clean_pass:
        notes.append("--dual-bn has no effect here: this method and settings run no clean training pass")
    bn_present = bool(batchnorm_modules(module)) or any("batchnorm" in t.lower() for t in (type_map or {}).values())
    if not bn_present:
        bn_at_test = "none (the model has no BatchNorm)"
    elif exported:
        bn_at_test = "the original statistics (frozen in the torch.export archive)"
    elif dual_bn:
        bn_at_test = "adversarial (running statistics of adversarial/perturbed passes only; the clean set is dropped)"
    elif uses_clean_pass:
        bn_at_test = "shared (running statistics updated by clean and adversarial passes alike)"
    elif method == "standard":
        bn_at_test = "clean (statistics of clean training batches)"
    else:
        bn_at_test = "adversarial (only adversarial/perturbed passes update the statistics)"

    # -- data ----------------------------------------------------------------------------------
    train = _as_dataset(train, "training")
    if val is not None:
        val = _as_dataset(val, "validation")
    num_classes = int(getattr(train, "num_classes", int(train.y.max()) + 1))
    if val is None:
        train, val, val_desc = split_validation(train, fraction=val_fraction, seed=seed)
    else:
        val_desc = (f"the given validation set ({len(val.y)} samples, {getattr(val, 'name', '?')} "
                    f"{getattr(val, 'split', '')})")
    if len(train.y) < 2 or len(val.y) < 1:
        raise RobauditError("too few samples to train and validate on")
    dev = resolve_device(device)
    module.to(dev)
    full = with_normalization(module, mean, std, ndim=train.x.dim()).to(dev)
    check_compatible(full.eval(), train.x[:2].to(dev), num_classes)
    x_tr, y_tr = train.x.to(dev), train.y.to(dev)

    settings = {
        "method": method.value, "mvl_layers": mvl_layers, "gamma": [gammas[n] for n in mvl_layers],
        "re_mode": re_mode.value, "base_attack": base_attack.value, "eps": eps, "steps": steps, "alpha": alpha,
        "alpha_used": (alpha if alpha is not None else 2.5 * eps / steps) if base_attack == "pgd" else eps,
        "layer_eps": layer_eps, "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer.value,
        "weight_decay": weight_decay, "schedule": schedule.value, "clean_weight": clean_weight, "dual_bn": bool(dual_bn),
        "val_fraction": val_fraction, "seed": seed, "n_train": int(len(y_tr)), "n_val": int(len(val.y)),
        "validation": val_desc, "val_attack": f"pgd:eps={eps:g},steps={steps}", "bn_at_test": bn_at_test,
        "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
    }
    fingerprint = {k: v for k, v in settings.items() if k not in ("validation", "bn_at_test")}
    fingerprint["model_digest"] = _module_digest(module)
    fingerprint.update(fingerprint_extra or {})
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    # -- optimizer, schedule, attacks ----------------------------------------------------------
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RobauditError("the model has no trainable parameters")
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if schedule == "cosine" else None
    train_spec = (atk.AttackSpec("pgd", (("steps", steps), ("alpha", alpha)), eps) if base_attack == "pgd"
                  else atk.AttackSpec("fgsm", (), eps))
    val_spec = atk.AttackSpec("pgd", (("steps", steps), ("alpha", alpha)), eps)
    train_attack = atk.build(train_spec, full, num_classes=num_classes, seed=seed)
    val_attack = atk.build(val_spec, full, num_classes=num_classes, seed=seed)
    dual = DualBatchNorm(module) if dual_bn else None
    clean_ctx = dual.clean if dual is not None else contextlib.nullcontext
    recorder = _Recorder()
    perturber = _LayerwisePerturber(layer_eps)
    probe_modules = _layer_modules(mvl_layers) if method in ("atlr", "layerwise") and (
        method == "layerwise" or any(g != 0 for g in gammas.values())) else []
    transform = perturber if method == "layerwise" else recorder
    # clean and adversarial batches share one forward pass when no layer keeps batch statistics
    joint_passes = (method in ("at", "atlr") and dual is None and fixed_batch is None
                    and batch_independent(module, exported))

    # -- checkpoint / resume -------------------------------------------------------------------
    ck_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ck_path is not None and not resume:
        try:
            ck_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RobauditError(f"cannot create the checkpoint directory {ck_path.parent} ({e.strerror or e})") from e
    history: list[dict] = []
    start_epoch = 1
    resumed_from = None
    state = None
    if resume:
        if ck_path is None:
            raise RobauditError("resume needs a checkpoint directory")
        state = load_checkpoint(ck_path)
        _check_fingerprint(state.get("fingerprint", {}), fingerprint, ck_path)
        module.load_state_dict({k: v.to(dev) for k, v in state["model"].items()})
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        if dual is not None and state.get("dual_bn") is not None:
            dual.load_state_dict(state["dual_bn"])
        if state.get("layerwise") is not None:
            perturber.load_state_dict(state["layerwise"], dev)
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        resumed_from = int(state["epoch"])
        log.info("resuming from the checkpoint of epoch %d in %s", resumed_from, ck_path)

    n = len(y_tr)
    chance = float(torch.bincount(val.y.long(), minlength=num_classes).max()) / len(val.y)
    rng_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        if state is not None:
            torch.set_rng_state(state["rng"])
            if dev.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], dev)
        else:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            c0, r0 = _evaluate(full, val.x, val.y, val_attack, batch_size, dev)
            history.append({"epoch": 0, "lr": float("nan"), "val_clean_acc": c0, "val_robust_acc": r0,
                            "seconds": 0.0, "val_seconds": time.perf_counter() - t0})
            log.info("before hardening: validation accuracy clean %.3f, pgd(eps=%g) %.3f", c0, eps, r0)
        for epoch in range(start_epoch, epochs + 1):
            try:
                row = _train_epoch(
                    epoch=epoch, method=method, module=module, full=full, x=x_tr, y=y_tr, n=n,
                    batch_size=batch_size, seed=seed, opt=opt, train_attack=train_attack, gammas=gammas,
                    re_mode=re_mode, clean_weight=clean_weight, clean_ctx=clean_ctx, recorder=recorder,
                    perturber=perturber, probe_modules=probe_modules, transform=transform, type_map=type_map,
                    progress=progress, epochs=epochs, joint_passes=joint_passes)
                t0 = time.perf_counter()
                c, r = _evaluate(full, val.x, val.y, val_attack, batch_size, dev)
                row.update({"val_clean_acc": c, "val_robust_acc": r, "val_seconds": time.perf_counter() - t0})
                best = max(h["val_clean_acc"] for h in history) if history else c
                if check_collapse and c <= chance + COLLAPSE_MARGIN and best > chance + 2 * COLLAPSE_MARGIN:
                    raise RobauditError(
                        f"training collapsed at epoch {epoch}: clean validation accuracy fell to chance "
                        f"({100 * c:.1f}%, majority class {100 * chance:.1f}%); lower --gamma or --lr, and keep the "
                        "output layer out of the MVL set" + (f" (the checkpoint of epoch {epoch - 1} is kept)"
                                                              if ck_path is not None and epoch > 1 else ""))
                if sched is not None:
                    sched.step()
                history.append(row)
                log.info("epoch %d/%d: loss %.4f, validation clean %.3f, pgd %.3f (%.1f s)", epoch, epochs,
                         row["loss"], c, r, row["seconds"])
                if ck_path is not None:
                    _atomic_torch_save({
                        "format": CHECKPOINT_FORMAT, "version": 1, "fingerprint": fingerprint, "epoch": epoch,
                        "model": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                        "history": history, "dual_bn": dual.state_dict() if dual is not None else None,
                        "layerwise": perturber.state_dict() if method == "layerwise" else None,
                    }, ck_path)
            except KeyboardInterrupt:
                module.eval()
                where = (f"the checkpoint of epoch {epoch - 1} is in {ck_path}: rerun with --resume to continue"
                         if ck_path is not None and epoch > 1 else "no epoch was completed: rerun to start again")
                raise HardenInterrupted(f"hardening interrupted during epoch {epoch}; {where}") from None
            except BaseException:
                module.eval()
                raise
    module.eval()
    if eager is not None:  # same state dict keys: hand the trained weights back to the eager model
        eager.load_state_dict(module.state_dict())
        module = eager.eval()
    frame = pd.DataFrame(history)
    lead = ["epoch", "lr", "loss", "ce_adv", "ce_clean", "ce_perturbed", "reg"]
    cols = [c for c in lead if c in frame] + sorted(c for c in frame if c.startswith("re:")) + [
        c for c in ("val_clean_acc", "val_robust_acc", "seconds", "val_seconds") if c in frame]
    frame = frame[cols + [c for c in frame if c not in cols]]
    for note in notes:
        log.info(note)
    return HardenResult(module=module, history=frame, settings=settings, mvl_layers=mvl_layers, gammas=gammas,
                        validation=val_desc, bn_at_test=bn_at_test, resumed_from_epoch=resumed_from,
                        seconds=time.perf_counter() - started, checkpoint=ck_path, notes=notes)


def _train_epoch(*, epoch, method, module, full, x, y, n, batch_size, seed, opt, train_attack, gammas, re_mode,
                 clean_weight, clean_ctx, recorder, perturber, probe_modules, transform, type_map, progress,
                 epochs, joint_passes=False) -> dict:
    """One pass over the training data; returns the epoch's history row (mean loss terms, seconds)."""
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(x.device)
    starts = [s for s in range(0, n, batch_size) if n - s >= 2]  # a lone last sample would break BatchNorm
    sums: dict[str, torch.Tensor] = {}
    count = 0
    lr = opt.param_groups[0]["lr"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc=f"{method} epoch {epoch}/{epochs}", unit="batch", leave=False)
    any_gamma = any(g != 0 for g in gammas.values())
    # hooks are registered only around the training passes, never while the attack runs
    probe = LayerProbe(module, probe_modules, type_map=type_map, detach=False, transform=transform)
    # layerwise runs no attack: its hooks stay for the whole epoch
    epoch_hooks = probe if probe_modules and method == "layerwise" else contextlib.nullcontext()
    hooks = probe if probe_modules and method != "layerwise" else contextlib.nullcontext()
    with epoch_hooks:
        joint = joint_passes
        for bi, s in enumerate(starts):
            idx = perm[s:s + batch_size]
            xb, yb = x[idx], y[idx]
            terms: dict[str, torch.Tensor]
            if method in ("at", "atlr"):
                x_adv = train_attack(xb, yb).detach()
                full.train()
                record = method == "atlr" and any_gamma
                with hooks:
                    logits_clean, clean_outs, logits_adv, adv_outs, joint = _clean_and_adversarial(
                        full, probe, recorder, xb, x_adv, record=record, need_clean=record or clean_weight > 0,
                        joint=joint, clean_ctx=clean_ctx)
                loss, terms = atlr_loss(logits_adv, yb, clean_outs, adv_outs,
                                        gammas=gammas if method == "atlr" else {}, re_mode=re_mode,
                                        logits_clean=logits_clean, clean_weight=clean_weight)
            elif method == "layerwise":
                full.train()
                with hooks:
                    perturber.active = True
                    probe.reset()
                    logits = full(xb)
                    perturber.active = False
                ce = F.cross_entropy(logits, yb)
                terms = {"ce_perturbed": ce}
                loss = ce
                if clean_weight > 0:
                    with clean_ctx():
                        ce_c = F.cross_entropy(full(xb), yb)
                    terms["ce_clean"] = ce_c
                    loss = (1 - clean_weight) * ce + clean_weight * ce_c
            else:  # standard
                full.train()
                ce = F.cross_entropy(full(xb), yb)
                terms, loss = {"ce_clean": ce}, ce
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the loss became {float(loss.detach())} at epoch {epoch}, batch {bi + 1}: "
                                     "lower --lr (or --gamma); nothing was saved from this epoch")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            k = len(yb)
            count += k
            for name, v in {"loss": loss, **terms}.items():
                v = v.detach() * k
                sums[name] = sums[name] + v if name in sums else v
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    full.eval()
    row = {"epoch": epoch, "lr": lr}
    row.update({name: float(v) / max(count, 1) for name, v in sums.items()})
    row["seconds"] = time.perf_counter() - t0
    return row


def atlr_objective(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, *,
                   layers: Sequence[str], gamma: float | Sequence[float] = 1.0, re_mode: str = "pooled",
                   clean_weight: float = 0.0, mean=None, std=None, type_map: Mapping[str, str] | None = None,
                   joint: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The AT-LR loss of one batch as :func:`harden` computes it (clean pass, then adversarial pass).

    The model runs in its current mode (train mode in training); returns ``(loss, terms)``. ``joint``
    runs both halves as one concatenated pass when the model has no BatchNorm (as training does).
    """
    gammas = dict(zip(layers, parse_gamma(gamma, len(layers))))
    full = with_normalization(model, mean, std, ndim=x.dim())
    rec = _Recorder()
    with LayerProbe(model, _layer_modules(layers), type_map=type_map, detach=False, transform=rec) as probe:
        logits_clean, clean, logits_adv, adv, _ = _clean_and_adversarial(
            full, probe, rec, x, x_adv, record=True, need_clean=True,
            joint=joint and batch_independent(model))
    return atlr_loss(logits_adv, y, clean, adv, gammas=gammas, re_mode=re_mode, logits_clean=logits_clean,
                     clean_weight=clean_weight)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a hardening checkpoint (``weights_only``: no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise RobauditError(f"no hardening checkpoint at {path}: run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RobauditError(f"the checkpoint {path} is unreadable ({type(e).__name__}): delete it and run without "
                            "--resume") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RobauditError(f"{path} is not a robaudit hardening checkpoint: delete it and run without --resume")
    return state


def _check_fingerprint(saved: Mapping, now: Mapping, path: Path) -> None:
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise RobauditError(
                f"the checkpoint {path} was made with other settings ({key}: {saved.get(key)!r} then, "
                f"{now.get(key)!r} now): resume with the same settings, or start over with --force")


# ---------------------------------------------------------------------------------------------
# the run-directory stage


@dataclass
class HardenRun:
    """The outcome of :func:`harden_run`: where everything went and the before/after comparison."""

    run_dir: Path
    hardened_dir: Path
    model_path: Path
    result: HardenResult
    analysis: Any  # LSAResult of the hardened model
    comparison: pd.DataFrame
    settings: dict


def default_train_eps(eps_list: Sequence[float] | None) -> float | None:
    """The lower median of the analysis eps sweep: larger eps remain to test generalization."""
    vals = sorted(float(e) for e in eps_list or [] if e is not None)
    return vals[(len(vals) - 1) // 2] if vals else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def comparison_frame(before_acc: pd.DataFrame, after_acc: pd.DataFrame, before_lsa: pd.DataFrame,
                     after_lsa: pd.DataFrame, *, layers: Sequence[str], attack: str | None, eps: float | None,
                     metric: str = "re_mean") -> pd.DataFrame:
    """``kind, attack, eps, layer, before, after, delta``: accuracy per attack/eps, RE per MVL layer."""

    def key(e):
        return None if e is None or (isinstance(e, float) and math.isnan(e)) else round(float(e), 10)

    after = {(r.attack, key(r.eps)): float(r.accuracy) for r in after_acc.itertuples()}
    rows = []
    for r in before_acc.itertuples():
        a = after.get((r.attack, key(r.eps)), math.nan)
        rows.append({"kind": "accuracy", "attack": r.attack, "eps": key(r.eps), "layer": None,
                     "before": float(r.accuracy), "after": a, "delta": a - float(r.accuracy)})

    def re_of(frame: pd.DataFrame, layer: str) -> float:
        sel = frame[(frame["layer"] == layer) & (frame["attack"] == attack)]
        if eps is not None:
            sel = sel[np.isclose(sel["eps"].astype(float), eps)]
        return float(sel[metric].iloc[0]) if len(sel) else math.nan

    for layer in layers:
        b, a = re_of(before_lsa, layer), re_of(after_lsa, layer)
        rows.append({"kind": "re", "attack": attack, "eps": key(eps), "layer": layer, "before": b, "after": a,
                     "delta": a - b})
    return pd.DataFrame(rows, columns=["kind", "attack", "eps", "layer", "before", "after", "delta"])


def _select_layers(run, mvl_top: int | None, include_output: bool) -> tuple[list[str], dict]:
    """The MVL layers to harden, re-ranked from the run's LSA under the run's MVL attack/eps/metric."""
    from .lsa import select_mvl

    mvl = run.mvl or {}
    attack, eps, metric = mvl.get("attack"), mvl.get("eps"), mvl.get("metric") or "re_mean"
    if mvl_top is None:
        flags = run.lsa["is_output"].astype(str).str.lower().isin(("true", "1")) if "is_output" in run.lsa else None
        outputs = set(run.lsa.loc[flags, "layer"]) if flags is not None else set()
        names = [l["layer"] for l in mvl.get("layers", []) if include_output or l["layer"] not in outputs]
        if not names:
            raise RobauditError(f"the MVL list in {run.path} is empty: pass --mvl-top K")
        return names, {"attack": attack, "eps": eps, "metric": metric, "criterion": "the run's MVL list"}
    if int(mvl_top) != mvl_top or mvl_top < 1:
        raise RobauditError(f"--mvl-top must be a positive whole number, not {mvl_top}")
    sel = select_mvl(run.lsa, run.accuracy, k=int(mvl_top), attack=attack, eps=eps, metric=metric,
                     include_output=include_output)
    return sel.names, {"attack": sel.attack, "eps": sel.eps, "metric": sel.metric, "criterion": f"top-{mvl_top}"}


def harden_run(
    run_dir: str | os.PathLike,
    config: HardenConfig | None = None,
    *,
    mvl_top: int | None = None,
    include_output: bool = False,
    train_data: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    command: str | None = None,
    download: bool = True,
    arch: str | None = None,
    trust_model: bool = False,
    **settings: Any,
) -> HardenRun:
    """Harden the model of an analyzed run directory and write ``RUN/hardened/``.

    Reads the run (model, data set, normalization, attacks, MVL ranking), trains on the data set's
    *train* split with a held-out validation part, saves the hardened model (same format family:
    ``.pt2`` for exported and pickled models, a robaudit checkpoint for checkpoints and state dicts),
    re-analyzes it with the same battery and writes, atomically, ``hardened/`` holding the model, its
    ``lsa.csv``/``accuracy.csv``/``mvl.json``/``manifest.json``, ``history.csv``, ``comparison.csv`` and
    ``harden.json``. A checkpoint ``RUN/harden-checkpoint.pt`` is kept after every epoch until the end.
    """
    from .data import load_dataset
    from .lsa import analyze, resolve_device, select_mvl
    from .models import (check_stored_arch, export_model, load_model, save_checkpoint, save_exported_weights,
                         sha256_file)
    from .rundir import atomic_dir, fill_run, foreign_entries, read_run, write_csv, write_json

    cfg = HardenConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    started = _now()
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run.lsa.empty:
        raise RobauditError(f"{run_dir} holds no layer analysis (lsa.csv is empty): rerun `robaudit analyze`")
    man = run.manifest
    dest = run_dir / HARDENED_DIR
    ck_path = run_dir / CHECKPOINT_NAME
    # -- check everything cheap before training -------------------------------------------------
    if ck_path.exists() and not resume and not force:
        raise RobauditError(f"an interrupted harden left {ck_path}: pass --resume to continue it, or --force to "
                            "start over")
    if dest.exists() and not force and not resume:
        raise RobauditError(f"{dest} already exists from an earlier harden: pass --force to replace it")
    foreign = [f for f in foreign_entries(run_dir) if f.startswith(f"{HARDENED_DIR}/")] if dest.is_dir() else []
    if foreign:
        raise RobauditError(f"{dest} holds files robaudit did not write ({', '.join(foreign[:3])}): move them out first")
    if resume and not ck_path.exists():
        raise RobauditError(f"no checkpoint to resume in {run_dir} ({CHECKPOINT_NAME}): run without --resume")
    eps_list = man.get("eps") or []
    if cfg.eps is None:
        eps = default_train_eps(eps_list)
        if eps is None:
            raise RobauditError("the run has no eps sweep to take the training eps from: pass --eps")
        cfg = dataclasses.replace(cfg, eps=eps)
    layers, ranking = _select_layers(run, mvl_top, include_output)
    if cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=int(man.get("seed", 0)))
    eps, seed, method = cfg.eps, cfg.seed, cfg.method.value

    mm = man.get("model") or {}
    model_path = Path(mm.get("path") or "")
    if not mm.get("path") or not model_path.is_file():
        raise RobauditError(f"the run's model file {mm.get('path')} is gone: restore it, or analyze again")
    if mm.get("sha256") and sha256_file(model_path) != mm["sha256"]:
        raise RobauditError(f"{model_path} changed since the analysis (sha256 differs): analyze it again first")
    # the manifest is a file like any other: its architecture is checked as a checkpoint's would be, and
    # only this command's --trust-model (never the manifest's record of an earlier one) lets code run
    if arch is None and mm.get("arch"):
        arch = check_stored_arch(mm["arch"], run_dir / "manifest.json", trust_model=trust_model)
    loaded = load_model(model_path, arch=arch, arch_kwargs=mm.get("arch_kwargs") or None, trust_model=trust_model)
    norm = man.get("normalization") or {}
    mean, std = norm.get("mean"), norm.get("std")
    ds = man.get("dataset") or {}
    ds_name = ds.get("name")
    from .data import DATASETS

    if train_data is not None:
        train_set = load_dataset(str(train_data), split="train", data_dir=ds.get("data_dir"), download=download)
        train_desc = str(train_data)
    elif ds_name in DATASETS:
        train_set = load_dataset(ds_name, split="train", data_dir=ds.get("data_dir"), download=download)
        train_desc = f"{ds_name} train split"
    else:
        raise RobauditError(f"the run's data set {ds_name!r} is a file with no train split: pass --train-data "
                            "FILE.npz with training samples")
    dev = resolve_device(cfg.device)
    if cfg.dual_bn and loaded.format != "export" and not batchnorm_modules(loaded.module):
        raise RobauditError("--dual-bn needs a model with BatchNorm layers; this one has none: drop --dual-bn")
    if loaded.format == "pickle":  # it must be exportable to be saved without pickles: fail before training
        try:
            ex = with_normalization(copy.deepcopy(loaded.module), None, None, ndim=train_set.x.dim())
            torch.export.export(ex.eval(), (train_set.x[:2],),
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
        except Exception as e:
            raise RobauditError(f"the pickled model cannot be saved as a torch.export archive ({type(e).__name__}); "
                                "harden a checkpoint with an architecture instead") from e

    fp_extra = {"model_sha256": mm.get("sha256"), "train": train_desc}
    result = harden(loaded, train_set, None, cfg, mvl_layers=layers, mean=mean, std=std, checkpoint_dir=run_dir,
                    resume=resume, type_map=loaded.type_map, fingerprint_extra=fp_extra, device=dev)
    module = result.module.cpu().eval()

    # -- save, reload, re-analyze, all inside a temporary directory ----------------------------
    if loaded.format == "export":
        fname, fmt = "model.pt2", "export"
    elif loaded.format == "pickle":
        fname, fmt = "model.pt2", "export"
    else:
        fname, fmt = "model.pt", "checkpoint"
    final_model = (dest / fname).resolve()
    test = load_dataset(ds_name if ds_name in DATASETS else str(ds.get("source") or ds_name),
                        split=ds.get("split") or "test", samples=ds.get("samples"), shuffle=bool(ds.get("shuffle")),
                        seed=int(man.get("seed", 0)), data_dir=ds.get("data_dir"), download=download)
    try:
        with atomic_dir(dest) as tmp:
            tmp_model = tmp / fname
            if loaded.format == "export":
                save_exported_weights(tmp_model, loaded, module)
            elif loaded.format == "pickle":
                export_model(tmp_model, module, train_set.x[:2])
            else:
                save_checkpoint(tmp_model, module, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs)
            hardened = load_model(tmp_model)
            layer_spec = man.get("layers") or {}
            analysis = analyze(hardened, test, attacks=man.get("attacks") or None, eps=eps_list or None,
                               layers=layer_spec.get("patterns"), layer_types=layer_spec.get("types"),
                               probe=layer_spec.get("probe") or "all", mean=mean,
                               std=std, batch_size=int(man.get("batch_size", 128)), device=dev,
                               seed=int(man.get("seed", 0)))
            mvl_cfg = man.get("mvl") or {}
            k = (run.mvl or {}).get("k")
            z = (run.mvl or {}).get("z")
            try:
                h_mvl = select_mvl(analysis.lsa, analysis.accuracy, k=None if z is not None else k, z=z,
                                   attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"],
                                   include_output=bool(mvl_cfg.get("include_output")))
            except RobauditError:
                h_mvl = analysis.mvl(attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"])
            checks = None
            if run.checks is not None:
                from .sanity import run_model_checks

                full = with_normalization(hardened.module, mean, std, ndim=test.x.dim()).to(dev).eval()
                checks = run_model_checks(full, test.x, test.y, device=dev, seed=int(man.get("seed", 0)),
                                          eps_max=max(eps_list) if eps_list else None)
            comparison = comparison_frame(run.accuracy, analysis.accuracy, run.lsa, analysis.lsa, layers=layers,
                                          attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"])
            h_manifest = copy.deepcopy(man)
            h_manifest.update({
                "command": command or _api_command(run_dir, method, mvl_top, eps, cfg.epochs, seed),
                "argv": list(sys.argv),
                "model": {"path": str(final_model), "sha256": sha256_file(tmp_model), "format": fmt,
                          "arch": loaded.arch if fmt == "checkpoint" else None,
                          "arch_kwargs": loaded.arch_kwargs if fmt == "checkpoint" else {},
                          "trust_model": False, "class": type(hardened.module).__name__},
                "n_samples": analysis.n_samples,
                "clean_accuracy": analysis.clean_accuracy,
                "seconds": round(analysis.seconds, 3),
                "started": started, "finished": _now(),
                "hardened_from": {"run": str(run_dir.resolve()), "model": str(model_path.resolve()),
                                  "sha256": mm.get("sha256"), "method": method},
            })
            settings = dict(result.settings)
            settings.update({
                "command": h_manifest["command"], "run": str(run_dir.resolve()), "mvl_top": mvl_top,
                "mvl_ranking": ranking, "include_output": include_output, "train": train_desc,
                "device": str(dev), "resumed_from_epoch": result.resumed_from_epoch, "notes": result.notes,
                "input_model": {"path": str(model_path.resolve()), "format": loaded.format,
                                "sha256": mm.get("sha256")},
                "output_model": {"path": str(final_model), "format": fmt},
                "seconds_training": round(result.seconds, 3), "started": started, "finished": _now(),
            })
            fill_run(tmp, analysis, h_mvl, h_manifest, checks)
            write_csv(tmp / "history.csv", result.history)
            write_csv(tmp / "comparison.csv", comparison)
            write_json(tmp / "harden.json", settings)
    except KeyboardInterrupt:
        raise HardenInterrupted(f"interrupted after training, while analyzing the hardened model; the final "
                                f"checkpoint is in {ck_path}: rerun with --resume to finish") from None
    with contextlib.suppress(FileNotFoundError):
        ck_path.unlink()
    return HardenRun(run_dir=run_dir, hardened_dir=dest, model_path=final_model, result=result, analysis=analysis,
                     comparison=comparison, settings=settings)


def _api_command(run_dir: Path, method: str, mvl_top, eps: float, epochs: int, seed: int) -> str:
    import shlex

    parts = ["robaudit", "harden", "--run", str(run_dir), "--method", method]
    if mvl_top is not None:
        parts += ["--mvl-top", str(mvl_top)]
    parts += ["--eps", f"{eps:g}", "--epochs", str(epochs), "--seed", str(seed)]
    return shlex.join(parts)
