"""The training objectives: AT (Madry), AT-LR (CE plus gamma-weighted layer RE) and their forward passes."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RobauditError
from ..metrics import ratio, relative_error
from ..models import with_normalization
from ..probe import LayerProbe
from .config import parse_gamma
from .distributed import Shard
from .layers import Recorder, batch_independent, layer_modules


def layer_relative_error(clean: torch.Tensor, perturbed: torch.Tensor, mode: str = "pooled",
                         shard: Shard | None = None) -> torch.Tensor:
    """Differentiable ``RE_l(x, x')`` of one batch of one layer's outputs (:func:`robaudit.metrics.relative_error`).

    ``pooled``: ``||Phi' - Phi||_F / ||Phi||_F`` over the whole batch (the authors' reference code).
    ``per-sample``: the mean over samples of ``||phi'_i - phi_i|| / ||phi_i||``; samples whose clean
    activation is exactly zero have no RE and are left out (as in the analysis). NaN when undefined
    (an all-zero batch); :func:`atlr_loss` then leaves that layer's term out of the loss. With a
    ``shard``, the RE of the global batch whose slice this process holds.
    """
    if shard is None:
        return relative_error(clean, perturbed, str(mode))
    return _re_of_sums(*shard.sums(*_re_sums(clean, perturbed, mode)), mode)


def _re_sums(clean: torch.Tensor, perturbed: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sums over samples an RE is made of: ``||Δ||², ||Φ||²`` (pooled) or ``Σ RE_i, count`` (per sample)."""
    if str(mode) == "pooled":
        c, d = clean.flatten(1), (perturbed - clean).flatten(1)
        return d.pow(2).sum(), c.pow(2).sum()
    re = relative_error(clean, perturbed, "none")
    ok = ~torch.isnan(re)
    return torch.where(ok, re, torch.zeros_like(re)).sum(), ok.sum().to(re.dtype)


def _re_of_sums(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    return ratio(_sqrt(a), _sqrt(b)) if str(mode) == "pooled" else ratio(a, b)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """``sqrt(t)`` with a zero (not infinite) gradient at 0, as a norm has."""
    pos = t > 0
    return torch.where(pos, torch.where(pos, t, torch.ones_like(t)).sqrt(), torch.zeros_like(t))


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
    """Mean cross-entropy of the batch (with a ``shard``: of the global batch this process holds a slice of)."""
    if shard is None:
        return F.cross_entropy(logits, y)
    return shard.mean(F.cross_entropy(logits, y, reduction="sum"))


def _global_terms(shard: Shard, y, logits_adv, logits_clean, pairs: Mapping, re_mode: str):
    """CE of the adversarial (and clean) logits and each layer's RE over the global batch: one all-reduce."""
    local = [F.cross_entropy(logits_adv, y, reduction="sum")]
    if logits_clean is not None:
        local.append(F.cross_entropy(logits_clean, y, reduction="sum"))
    for clean, adv in pairs.values():
        local.extend(_re_sums(clean, adv, re_mode))
    total = shard.sums(*local)
    ce = [t / shard.total for t in total[:len(local) - 2 * len(pairs)]]
    sums = total[len(ce):]
    res = {name: _re_of_sums(sums[2 * i], sums[2 * i + 1], re_mode) for i, name in enumerate(pairs)}
    return ce[0], ce[1] if logits_clean is not None else None, res


def _batch_terms(y, logits_adv, logits_clean, pairs: Mapping, re_mode: str, shard: Shard | None):
    """``(CE adversarial, CE clean or None, {layer: RE})`` of the batch (with a ``shard``: the global batch's)."""
    if shard is not None:
        return _global_terms(shard, y, logits_adv, logits_clean, pairs, re_mode)
    ce_clean = F.cross_entropy(logits_clean, y) if logits_clean is not None else None
    return F.cross_entropy(logits_adv, y), ce_clean, {
        name: layer_relative_error(clean, adv, re_mode) for name, (clean, adv) in pairs.items()}


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
    shard: Shard | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The AT-LR objective of one batch and its terms (AT when no gamma is non-zero).

    ``(1 - clean_weight) * CE(logits_adv, y) + clean_weight * CE(logits_clean, y)
    + sum_l gammas[l] * RE_l(clean_outputs[l], adv_outputs[l])``. Returns ``(loss, terms)`` where
    ``terms`` holds ``ce_adv``, ``ce_clean`` (when used), ``reg`` and ``re:<layer>`` (unweighted). With a
    ``shard`` (one process's slice of a batch under torchrun) every term is the global batch's.
    """
    if clean_weight > 0 and logits_clean is None:
        raise ValueError("clean_weight > 0 needs logits_clean")
    active = {name: g for name, g in gammas.items() if g != 0}
    for name in active:
        if name not in clean_outputs or name not in adv_outputs:
            raise RobauditError(f"layer {name} did not run in both the clean and the adversarial pass: "
                                "check the MVL layer names against the model")
    pairs = {name: (clean_outputs[name], adv_outputs[name]) for name in active}
    ce_adv, ce_clean, res = _batch_terms(y, logits_adv, logits_clean if clean_weight > 0 else None, pairs,
                                         re_mode, shard)
    terms: dict[str, torch.Tensor] = {"ce_adv": ce_adv}
    loss = ce_adv if clean_weight == 0 else (1.0 - clean_weight) * ce_adv
    if clean_weight > 0:
        terms["ce_clean"] = ce_clean
        loss = loss + clean_weight * ce_clean
    if active:
        reg = None
        for name, g in active.items():
            terms[f"re:{name}"] = res[name]
            term = g * torch.nan_to_num(res[name], nan=0.0)  # an undefined RE (all-zero clean batch) adds nothing
            reg = term if reg is None else reg + term
        terms["reg"] = reg
        loss = loss + reg
    return loss, terms


@dataclass
class Passes:
    """Logits and recorded MVL outputs of a clean pass (when run) and an adversarial pass."""

    logits_adv: torch.Tensor
    adv_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    logits_clean: torch.Tensor | None = None
    clean_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    joint: bool = False  # whether both ran as one concatenated pass


def clean_and_adversarial(full: nn.Module, probe: LayerProbe | None, recorder: Recorder, x: torch.Tensor,
                          x_adv: torch.Tensor, *, record: bool, need_clean: bool, joint: bool,
                          clean_ctx=contextlib.nullcontext) -> Passes:
    """Run the clean pass (when needed) and the adversarial pass.

    ``joint``: one forward pass of ``cat([x, x_adv])``, split afterwards -- the same numbers for a model
    without batch statistics, at the cost of one larger pass instead of two (much cheaper for small
    models); never used with trainable BatchNorm, whose batch statistics would mix the two halves.
    Falls back to two passes (``joint=False`` in the result) if a recorded output is not batch-first.
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
            return Passes(logits_adv=logits[n:], adv_outputs={k: t[n:] for k, t in outs.items()},
                          logits_clean=logits[:n], clean_outputs={k: t[:n] for k, t in outs.items()}, joint=True)
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
    return Passes(logits_adv=logits_adv, adv_outputs=adv_outs, logits_clean=logits_clean, clean_outputs=clean_outs)


def atlr_objective(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, *,
                   layers: Sequence[str], gamma: float | Sequence[float] = 1.0, re_mode: str = "pooled",
                   clean_weight: float = 0.0, mean=None, std=None, type_map: Mapping[str, str] | None = None,
                   joint: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The AT-LR loss of one batch as :func:`~robaudit.training.fit.harden` computes it (clean, then adversarial pass).

    The model runs in its current mode (train mode in training); returns ``(loss, terms)``. ``joint``
    runs both halves as one concatenated pass when the model has no BatchNorm (as training does).
    """
    gammas = dict(zip(layers, parse_gamma(gamma, len(layers))))
    full = with_normalization(model, mean, std, ndim=x.dim())
    rec = Recorder()
    with LayerProbe(model, layer_modules(layers), type_map=type_map, detach=False, transform=rec) as probe:
        p = clean_and_adversarial(full, probe, rec, x, x_adv, record=True, need_clean=True,
                                  joint=joint and batch_independent(model))
    return atlr_loss(p.logits_adv, y, p.clean_outputs, p.adv_outputs, gammas=gammas, re_mode=re_mode,
                     logits_clean=p.logits_clean, clean_weight=clean_weight)
