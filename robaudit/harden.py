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
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import attacks as atk
from .errors import RobauditError
from .models import LoadedModel, check_compatible, with_normalization
from .training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, Checkpointer, load_checkpoint  # noqa: F401
from .training.config import (BaseAttack, HardenConfig, Method, Optimizer, ReMode, Schedule,  # noqa: F401
                              check_eps, parse_gamma)
from .training.layers import (DualBatchNorm, LayerwisePerturber, Recorder, batch_independent,  # noqa: F401
                              batchnorm_modules, layer_modules)
from .training.loop import (COLLAPSE_MARGIN, CollapseCheck, HardenInterrupted, Objective,  # noqa: F401
                            ProgressBar, TrainData, Trainer, TrainParts)
from .training.objectives import atlr_loss, atlr_objective, layer_relative_error  # noqa: F401

log = logging.getLogger(__name__)

METHODS = tuple(m.value for m in Method)
HARDENED_DIR = "hardened"


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


def _module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if v.dtype != torch.bfloat16
                 else v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


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
    callbacks: Sequence[Any] = (),
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
    every epoch and ``resume=True`` continues from it (the settings must match). ``callbacks`` are
    extra :class:`~robaudit.training.loop.Trainer` callbacks, called first.
    """
    from .lsa import resolve_device

    cfg = HardenConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    started = time.perf_counter()
    notes: list[str] = list(cfg.notes)
    cfg.require_eps()
    seed = 0 if cfg.seed is None else cfg.seed
    mvl_layers = list(mvl_layers or [])
    if cfg.uses_mvl and not mvl_layers:
        raise RobauditError(f"method {cfg.method} needs MVL layers: pass mvl_layers (or --mvl-top K)")
    train = _as_dataset(train, "training")
    prep = _prepare_model(model, type_map, mvl_layers, train.x[:2])
    batch_size = cfg.batch_size
    if prep.fixed_batch is not None and batch_size != prep.fixed_batch:
        notes.append(f"the archive was exported for batches of {prep.fixed_batch}: training uses batches of "
                     f"{prep.fixed_batch}")
        batch_size = prep.fixed_batch
    gammas = dict(zip(mvl_layers, parse_gamma(cfg.gamma, len(mvl_layers)))) if mvl_layers else {}
    if prep.frozen_note:
        warnings.warn(prep.frozen_note, stacklevel=2)
        notes.append(prep.frozen_note)
    bn_at_test = _bn_policy(cfg, prep, gammas, notes)
    train, val, val_desc, num_classes = _split_data(train, val, cfg.val_fraction, seed)
    dev = resolve_device(cfg.device)
    module = prep.module.to(dev)
    full = with_normalization(module, mean, std, ndim=train.x.dim()).to(dev)
    check_compatible(full.eval(), train.x[:2].to(dev), num_classes)
    data = TrainData(x=train.x.to(dev), y=train.y.to(dev), val_x=val.x, val_y=val.y, num_classes=num_classes,
                     batch_size=batch_size, epochs=cfg.epochs, seed=seed, device=dev)
    settings_out = _settings(cfg, mvl_layers, gammas, data, val_desc, bn_at_test, mean, std)
    fingerprint = {k: v for k, v in settings_out.items() if k not in ("validation", "bn_at_test")}
    fingerprint["model_digest"] = _module_digest(module)
    fingerprint.update(fingerprint_extra or {})
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    objective, parts = _build_parts(cfg, prep, full, gammas, mvl_layers, num_classes, seed, batch_size)
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(Path(checkpoint_dir) / CHECKPOINT_NAME, fingerprint)
    elif resume:
        raise RobauditError("resume needs a checkpoint directory")
    hooks: list[Any] = list(callbacks)
    if cfg.check_collapse:
        hooks.append(CollapseCheck(val.y, num_classes))
    if cfg.progress:
        hooks.append(ProgressBar(cfg.method.value))
    if checkpointer is not None:
        hooks.append(checkpointer)
    trainer = Trainer(objective, parts, data, hooks)
    resumed_from = None
    state = checkpointer.prepare(resume=resume) if checkpointer is not None else None
    if state is not None:
        trainer.load_state_dict(state)
        resumed_from = int(state["epoch"])
        log.info("resuming from the checkpoint of epoch %d in %s", resumed_from, checkpointer.path)
    history = trainer.fit()
    module.eval()
    if prep.eager is not None:  # same state dict keys: hand the trained weights back to the eager model
        prep.eager.load_state_dict(module.state_dict())
        module = prep.eager.eval()
    for note in notes:
        log.info(note)
    return HardenResult(module=module, history=_history_frame(history), settings=settings_out,
                        mvl_layers=mvl_layers, gammas=gammas, validation=val_desc, bn_at_test=bn_at_test,
                        resumed_from_epoch=resumed_from, seconds=time.perf_counter() - started,
                        checkpoint=checkpointer.path if checkpointer is not None else None, notes=notes)


@dataclass
class _Prepared:
    """The module that trains (a graph for op layers, a rebuilt archive) and what that implies."""

    module: nn.Module
    eager: nn.Module | None  # the eager model whose graph trains, to hand the weights back to
    frozen_bn: bool  # an archive's BatchNorm that could not be rebuilt (its statistics stay frozen)
    type_map: Mapping[str, str] | None
    fixed_batch: int | None
    frozen_note: str | None


def _prepare_model(model, type_map, mvl_layers: Sequence[str], example: torch.Tensor) -> _Prepared:
    """Make ``model`` trainable: a graph when MVL names hold op layers, rebuilt norms for an archive."""
    from torch.export.unflatten import UnflattenedModule

    from .models import as_graph, make_trainable
    from .probe import op_layers

    exported, eager = False, None
    if isinstance(model, LoadedModel):
        type_map = type_map or model.type_map
        exported = model.format == "export"
        module = model.module
    else:
        module = model
    if not isinstance(module, UnflattenedModule) and any(":" in n for n in mvl_layers):
        eager = module
        module, type_map = as_graph(eager, example)
    frozen_names: list[str] = []
    if isinstance(module, UnflattenedModule):  # BN, dropout and norms train as in eager mode
        _, frozen_names = make_trainable(module, dict(type_map or {}))
    known = {n for n, _ in module.named_modules() if n} | set(op_layers(module))
    for name in layer_modules(mvl_layers):
        if name not in known:
            raise RobauditError(f"the model has no layer named {name!r}: use layer names from the analysis")
    frozen = sorted({(type_map or {}).get(n, "?") for n in frozen_names})
    note = (f"the model is a torch.export archive, captured in eval mode: its {', '.join(frozen)} layers that "
            "could not be rebuilt stay frozen while hardening; harden a checkpoint with an architecture to "
            "train them") if frozen else None
    return _Prepared(module=module, eager=eager, type_map=type_map,
                     frozen_bn=exported and any("batchnorm" in t.lower() for t in frozen),
                     fixed_batch=module.__dict__.get("_robaudit_fixed_batch"), frozen_note=note)


def _uses_clean_pass(cfg: HardenConfig, gammas: Mapping[str, float]) -> bool:
    return (cfg.method == Method.ATLR and any(g != 0 for g in gammas.values())) or (
        cfg.method in (Method.AT, Method.ATLR, Method.LAYERWISE) and cfg.clean_weight > 0)


def _bn_policy(cfg: HardenConfig, prep: _Prepared, gammas: Mapping[str, float], notes: list[str]) -> str:
    """Check ``dual_bn`` against the model; say which BatchNorm statistics the hardened model uses at test."""
    module, type_map = prep.module, prep.type_map or {}
    if cfg.dual_bn:
        if prep.frozen_bn:
            raise RobauditError("--dual-bn cannot work on this torch.export archive (its BatchNorm statistics are "
                                "frozen): harden a checkpoint with an architecture, or drop --dual-bn")
        if not batchnorm_modules(module):
            raise RobauditError("--dual-bn needs a model with BatchNorm layers; this one has none: drop --dual-bn")
    uses_clean = _uses_clean_pass(cfg, gammas)
    if cfg.dual_bn and not uses_clean:
        notes.append("--dual-bn has no effect here: this method and settings run no clean training pass")
    if not (batchnorm_modules(module) or any("batchnorm" in t.lower() for t in type_map.values())):
        return "none (the model has no BatchNorm)"
    if prep.frozen_bn:
        return "the original statistics (frozen in the torch.export archive)"
    if cfg.dual_bn:
        return "adversarial (running statistics of adversarial/perturbed passes only; the clean set is dropped)"
    if uses_clean:
        return "shared (running statistics updated by clean and adversarial passes alike)"
    if cfg.method == Method.STANDARD:
        return "clean (statistics of clean training batches)"
    return "adversarial (only adversarial/perturbed passes update the statistics)"


def _split_data(train, val, val_fraction: float, seed: int):
    """``(train, val, description, num_classes)``: the given validation set, or a held-out part of ``train``."""
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
    return train, val, val_desc, num_classes


def _settings(cfg: HardenConfig, mvl_layers, gammas, data: TrainData, val_desc: str, bn_at_test: str,
              mean, std) -> dict:
    """The settings as ``harden.json`` records them (and, less two descriptions, the resume fingerprint)."""
    eps, steps, alpha = cfg.eps, cfg.steps, cfg.alpha
    return {
        "method": cfg.method.value, "mvl_layers": mvl_layers, "gamma": [gammas[n] for n in mvl_layers],
        "re_mode": cfg.re_mode.value, "base_attack": cfg.base_attack.value, "eps": eps, "steps": steps,
        "alpha": alpha,
        "alpha_used": (alpha if alpha is not None else 2.5 * eps / steps) if cfg.base_attack == BaseAttack.PGD
        else eps,
        "layer_eps": cfg.layer_eps, "epochs": cfg.epochs, "batch_size": data.batch_size, "lr": cfg.lr,
        "optimizer": cfg.optimizer.value, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule.value,
        "clean_weight": cfg.clean_weight, "dual_bn": bool(cfg.dual_bn), "val_fraction": cfg.val_fraction,
        "seed": data.seed, "n_train": int(len(data.y)), "n_val": int(len(data.val_y)),
        "validation": val_desc, "val_attack": f"pgd:eps={eps:g},steps={steps}", "bn_at_test": bn_at_test,
        "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
    }


def _build_parts(cfg: HardenConfig, prep: _Prepared, full: nn.Module, gammas, mvl_layers, num_classes: int,
                 seed: int, batch_size: int) -> tuple[Objective, TrainParts]:
    """Optimizer, schedule, training and validation attacks and layer hooks for ``cfg``."""
    module, method = prep.module, cfg.method
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RobauditError("the model has no trainable parameters")
    if cfg.optimizer == Optimizer.ADAM:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.schedule == Schedule.COSINE \
        else None
    pgd = atk.AttackSpec("pgd", (("steps", cfg.steps), ("alpha", cfg.alpha)), cfg.eps)
    train_spec = pgd if cfg.base_attack == BaseAttack.PGD else atk.AttackSpec("fgsm", (), cfg.eps)
    parts = TrainParts(module=module, full=full, opt=opt, sched=sched,
                       train_attack=atk.build(train_spec, full, num_classes=num_classes, seed=seed),
                       val_attack=atk.build(pgd, full, num_classes=num_classes, seed=seed),
                       recorder=Recorder(), perturber=LayerwisePerturber(cfg.layer_eps),
                       dual=DualBatchNorm(module) if cfg.dual_bn else None)
    hooked = method == Method.LAYERWISE or (method == Method.ATLR and any(g != 0 for g in gammas.values()))
    objective = Objective(
        method=method, gammas=gammas, re_mode=cfg.re_mode.value, clean_weight=cfg.clean_weight,
        probe_modules=layer_modules(mvl_layers) if hooked else [], type_map=prep.type_map,
        # clean and adversarial batches share one forward pass when no layer keeps batch statistics
        joint_passes=(method in (Method.AT, Method.ATLR) and parts.dual is None and prep.fixed_batch is None
                      and batch_independent(module, prep.frozen_bn)))
    return objective, parts


def _history_frame(history: list[dict]) -> pd.DataFrame:
    """The history rows as a frame: epoch and loss terms first, then RE terms, then validation."""
    frame = pd.DataFrame(history)
    lead = ["epoch", "lr", "loss", "ce_adv", "ce_clean", "ce_perturbed", "reg"]
    cols = [c for c in lead if c in frame] + sorted(c for c in frame if c.startswith("re:")) + [
        c for c in ("val_clean_acc", "val_robust_acc", "seconds", "val_seconds") if c in frame]
    return frame[cols + [c for c in frame if c not in cols]]


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
    ``config`` (or keywords) as for :func:`harden`; its ``seed`` defaults to the analysis seed.
    """
    from .data import DATASETS, load_dataset
    from .lsa import resolve_device
    from .pipeline import now
    from .rundir import atomic_dir, read_run

    cfg = HardenConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    started = now()
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    man = run.manifest
    dest, ck_path = run_dir / HARDENED_DIR, run_dir / CHECKPOINT_NAME
    _check_run_dir(run, dest, ck_path, resume=resume, force=force)
    eps_list = man.get("eps") or []
    if cfg.eps is None:
        eps = default_train_eps(eps_list)
        if eps is None:
            raise RobauditError("the run has no eps sweep to take the training eps from: pass --eps")
        cfg = dataclasses.replace(cfg, eps=eps)
    layers, ranking = _select_layers(run, mvl_top, include_output)
    if cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=int(man.get("seed", 0)))
    loaded, model_path = _load_run_model(run, arch=arch, trust_model=trust_model)
    norm, ds = man.get("normalization") or {}, man.get("dataset") or {}
    mean, std, ds_name = norm.get("mean"), norm.get("std"), ds.get("name")
    train_set, train_desc = _train_set(ds, train_data, download)
    dev = resolve_device(cfg.device)
    _check_trainable(cfg, loaded, train_set)

    fp_extra = {"model_sha256": (man.get("model") or {}).get("sha256"), "train": train_desc}
    result = harden(loaded, train_set, None, cfg, mvl_layers=layers, mean=mean, std=std, checkpoint_dir=run_dir,
                    resume=resume, type_map=loaded.type_map, fingerprint_extra=fp_extra, device=dev)
    module = result.module.cpu().eval()

    # -- save, reload, re-analyze, all inside a temporary directory ----------------------------
    fname, fmt = ("model.pt", "checkpoint") if loaded.format not in ("export", "pickle") else ("model.pt2", "export")
    final_model = (dest / fname).resolve()
    test = load_dataset(ds_name if ds_name in DATASETS else str(ds.get("source") or ds_name),
                        split=ds.get("split") or "test", samples=ds.get("samples"), shuffle=bool(ds.get("shuffle")),
                        seed=int(man.get("seed", 0)), data_dir=ds.get("data_dir"), download=download)
    try:
        with atomic_dir(dest) as tmp:
            hardened = _save_model(tmp / fname, loaded, module, train_set)
            analysis, h_mvl, checks, bn = _reanalyze(run, hardened, test, ranking, dev, samples_path=tmp / "samples.csv")
            comparison = comparison_frame(run.accuracy, analysis.accuracy, run.lsa, analysis.lsa, layers=layers,
                                          attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"])
            cmd = command or _api_command(run_dir, cfg.method.value, mvl_top, cfg.eps, cfg.epochs, cfg.seed)
            h_manifest, out_settings = _records(
                run, cfg, result, loaded, hardened, analysis, command=cmd, started=started, dev=dev, fmt=fmt,
                model_file=tmp / fname, final_model=final_model, model_path=model_path, train_desc=train_desc,
                mvl_top=mvl_top, ranking=ranking, include_output=include_output)
            _write_hardened(tmp, analysis, h_mvl, h_manifest, checks, result.history, comparison, out_settings, bn)
    except KeyboardInterrupt:
        raise HardenInterrupted(f"interrupted after training, while analyzing the hardened model; the final "
                                f"checkpoint is in {ck_path}: rerun with --resume to finish") from None
    with contextlib.suppress(FileNotFoundError):
        ck_path.unlink()
    return HardenRun(run_dir=run_dir, hardened_dir=dest, model_path=final_model, result=result, analysis=analysis,
                     comparison=comparison, settings=out_settings)


def _records(run, cfg: HardenConfig, result: HardenResult, loaded: LoadedModel, hardened: LoadedModel, analysis, *,
             command: str, started: str, dev, fmt: str, model_file: Path, final_model: Path, model_path: Path,
             train_desc: str, mvl_top, ranking: Mapping, include_output: bool) -> tuple[dict, dict]:
    """The hardened run's ``manifest.json`` (the original's, updated) and ``harden.json``."""
    from .models import sha256_file
    from .pipeline import now

    man, run_dir = run.manifest, run.path
    h_manifest = copy.deepcopy(man)
    h_manifest.update({
        "command": command, "argv": list(sys.argv),
        "model": {"path": str(final_model), "sha256": sha256_file(model_file), "format": fmt,
                  "arch": loaded.arch if fmt == "checkpoint" else None,
                  "arch_kwargs": loaded.arch_kwargs if fmt == "checkpoint" else {},
                  "trust_model": False, "class": type(hardened.module).__name__},
        "n_samples": analysis.n_samples, "clean_accuracy": analysis.clean_accuracy,
        "seconds": round(analysis.seconds, 3), "started": started, "finished": now(),
        "hardened_from": {"run": str(run_dir.resolve()), "model": str(model_path.resolve()),
                          "sha256": (man.get("model") or {}).get("sha256"), "method": cfg.method.value},
    })
    out_settings = dict(result.settings)
    out_settings.update({
        "command": command, "run": str(run_dir.resolve()), "mvl_top": mvl_top, "mvl_ranking": ranking,
        "include_output": include_output, "train": train_desc, "device": str(dev),
        "resumed_from_epoch": result.resumed_from_epoch, "notes": result.notes,
        "input_model": {"path": str(model_path.resolve()), "format": loaded.format,
                        "sha256": (man.get("model") or {}).get("sha256")},
        "output_model": {"path": str(final_model), "format": fmt},
        "seconds_training": round(result.seconds, 3), "started": started, "finished": now(),
    })
    return h_manifest, out_settings


def _check_run_dir(run, dest: Path, ck_path: Path, *, resume: bool, force: bool) -> None:
    """Refuse, before any work, a run without analysis, an unfinished or earlier harden, or foreign files."""
    from .rundir import foreign_entries

    if run.lsa.empty:
        raise RobauditError(f"{run.path} holds no layer analysis (lsa.csv is empty): rerun `robaudit analyze`")
    if ck_path.exists() and not resume and not force:
        raise RobauditError(f"an interrupted harden left {ck_path}: pass --resume to continue it, or --force to "
                            "start over")
    if dest.exists() and not force and not resume:
        raise RobauditError(f"{dest} already exists from an earlier harden: pass --force to replace it")
    foreign = [f for f in foreign_entries(run.path) if f.startswith(f"{HARDENED_DIR}/")] if dest.is_dir() else []
    if foreign:
        raise RobauditError(f"{dest} holds files robaudit did not write ({', '.join(foreign[:3])}): move them out first")
    if resume and not ck_path.exists():
        raise RobauditError(f"no checkpoint to resume in {run.path} ({CHECKPOINT_NAME}): run without --resume")


def _load_run_model(run, *, arch: str | None, trust_model: bool) -> tuple[LoadedModel, Path]:
    """The run's model file, unchanged since the analysis (sha256), loaded as the manifest says."""
    from .models import check_stored_arch, load_model, sha256_file

    mm = run.manifest.get("model") or {}
    model_path = Path(mm.get("path") or "")
    if not mm.get("path") or not model_path.is_file():
        raise RobauditError(f"the run's model file {mm.get('path')} is gone: restore it, or analyze again")
    if mm.get("sha256") and sha256_file(model_path) != mm["sha256"]:
        raise RobauditError(f"{model_path} changed since the analysis (sha256 differs): analyze it again first")
    # the manifest is a file like any other: its architecture is checked as a checkpoint's would be, and
    # only this command's --trust-model (never the manifest's record of an earlier one) lets code run
    if arch is None and mm.get("arch"):
        arch = check_stored_arch(mm["arch"], run.path / "manifest.json", trust_model=trust_model)
    loaded = load_model(model_path, arch=arch, arch_kwargs=mm.get("arch_kwargs") or None, trust_model=trust_model)
    return loaded, model_path


def _train_set(ds: Mapping, train_data, download: bool):
    """The training data: ``train_data``, or the train split of the run's built-in data set."""
    from .data import DATASETS, load_dataset

    if train_data is not None:
        return load_dataset(str(train_data), split="train", data_dir=ds.get("data_dir"), download=download), \
            str(train_data)
    if ds.get("name") in DATASETS:
        return load_dataset(ds["name"], split="train", data_dir=ds.get("data_dir"), download=download), \
            f"{ds['name']} train split"
    raise RobauditError(f"the run's data set {ds.get('name')!r} is a file with no train split: pass --train-data "
                        "FILE.npz with training samples")


def _check_trainable(cfg: HardenConfig, loaded: LoadedModel, train_set) -> None:
    """Fail before training on what would fail after it: dual BN without BN, a pickle that cannot be saved."""
    if cfg.dual_bn and loaded.format != "export" and not batchnorm_modules(loaded.module):
        raise RobauditError("--dual-bn needs a model with BatchNorm layers; this one has none: drop --dual-bn")
    if loaded.format == "pickle":  # it must be exportable to be saved without pickles
        try:
            ex = with_normalization(copy.deepcopy(loaded.module), None, None, ndim=train_set.x.dim())
            torch.export.export(ex.eval(), (train_set.x[:2],),
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
        except Exception as e:
            raise RobauditError(f"the pickled model cannot be saved as a torch.export archive ({type(e).__name__}); "
                                "harden a checkpoint with an architecture instead") from e


def _save_model(path: Path, loaded: LoadedModel, module: nn.Module, train_set) -> LoadedModel:
    """Save the hardened module in the input's format family and load it back as any user would."""
    from .models import export_model, load_model, save_checkpoint, save_exported_weights

    if loaded.format == "export":
        save_exported_weights(path, loaded, module)
    elif loaded.format == "pickle":
        export_model(path, module, train_set.x[:2])
    else:
        save_checkpoint(path, module, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs)
    return load_model(path)


def _reanalyze(run, hardened: LoadedModel, test, ranking: Mapping, dev, *, samples_path: Path | None = None):
    """The hardened model analyzed (and checked) as the run was, with its samples.csv and (with BatchNorm) its
    BatchNorm audit; its MVL ranked under the same criterion."""
    from .lsa import select_mvl
    from .pipeline import analyze_and_check, batchnorm_audit

    man = run.manifest
    norm, layer_spec, eps_list = man.get("normalization") or {}, man.get("layers") or {}, man.get("eps") or []
    analysis, checks = analyze_and_check(
        hardened, test, attacks=man.get("attacks") or None, eps=eps_list or None, layers=layer_spec.get("patterns"),
        layer_types=layer_spec.get("types"), probe=layer_spec.get("probe") or "all", mean=norm.get("mean"),
        std=norm.get("std"), batch_size=int(man.get("batch_size", 128)), device=dev, seed=int(man.get("seed", 0)),
        checks=run.checks is not None, samples_path=samples_path)
    k, z = (run.mvl or {}).get("k"), (run.mvl or {}).get("z")
    try:
        h_mvl = select_mvl(analysis.lsa, analysis.accuracy, k=None if z is not None else k, z=z,
                           attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"],
                           include_output=bool((man.get("mvl") or {}).get("include_output")))
    except RobauditError:
        h_mvl = analysis.mvl(attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"])
    bn = batchnorm_audit(hardened, test, analysis, h_mvl, mean=norm.get("mean"), std=norm.get("std"), device=dev,
                         seed=int(man.get("seed", 0)), batch_size=int(man.get("batch_size", 128)))
    return analysis, h_mvl, checks, bn


def _write_hardened(tmp: Path, analysis, h_mvl, manifest: dict, checks, history: pd.DataFrame,
                    comparison: pd.DataFrame, settings: dict, bn: pd.DataFrame | None = None) -> None:
    """The run files of the hardened model plus ``history.csv``, ``comparison.csv`` and ``harden.json``."""
    from .rundir import fill_run, write_csv, write_json

    fill_run(tmp, analysis, h_mvl, manifest, checks, tables={"bn.csv": bn} if bn is not None else None)
    write_csv(tmp / "history.csv", history)
    write_csv(tmp / "comparison.csv", comparison)
    write_json(tmp / "harden.json", settings)


def _api_command(run_dir: Path, method: str, mvl_top, eps: float, epochs: int, seed: int) -> str:
    from .pipeline import api_command

    return api_command("harden", run=run_dir, method=method, mvl_top=mvl_top, eps=f"{eps:g}", epochs=epochs,
                       seed=seed)
