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

Under ``torchrun`` the model trains in DistributedDataParallel, each process on its slice of every global
batch (:mod:`robaudit.training.distributed`); a step equals the one-process step on the whole batch.

:func:`robaudit.stages.harden.harden_run` is the run-directory stage behind ``robaudit harden``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .. import attacks as atk
from .. import dist
from ..data import as_dataset, subset
from ..device import resolve_device
from ..exported import fixed_batch
from ..errors import RobauditError
from ..labels import format_eps
from ..models import LoadedModel, check_compatible, with_normalization
from .checkpoint import CHECKPOINT_NAME, Checkpointer
from .distributed import wrap
from .config import BaseAttack, HardenConfig, Method, Optimizer, Schedule, parse_gamma
from .layers import DualBatchNorm, LayerwisePerturber, Recorder, batch_independent, batchnorm_modules, layer_modules
from .loop import CollapseCheck, Objective, ProgressBar, TrainData, Trainer, TrainParts

log = logging.getLogger(__name__)


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
    train, val = subset(data, tr_idx, f"{data.split}-fit"), subset(data, val_idx, f"{data.split}-val")
    desc = (f"a held-out {100 * fraction:g}% of the {data.name} {data.split} split "
            f"({n_val} of {n} samples, a permutation seeded with {seed}); training uses the other {n - n_val}")
    return train, val, desc


def _module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if v.dtype != torch.bfloat16
                 else v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# training


def harden(model: nn.Module | LoadedModel, train, val=None, config: HardenConfig | None = None, *,
           mvl_layers: Sequence[str] | None = None, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
           type_map: Mapping[str, str] | None = None, fingerprint_extra: Mapping[str, Any] | None = None,
           callbacks: Sequence[Any] = (), **settings: Any) -> HardenResult:
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
    cfg = HardenConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    started = time.perf_counter()
    notes: list[str] = list(cfg.notes)
    mvl_layers = list(mvl_layers or [])
    _check_request(cfg, mvl_layers, checkpoint_dir=checkpoint_dir, resume=resume)
    seed = 0 if cfg.seed is None else cfg.seed
    train = as_dataset(train, "training")
    first = train.head(2)[0]  # an example batch (a streaming set reads just these)
    prep, batch_size, gammas, bn_at_test = _plan_model(model, cfg, type_map, mvl_layers, first, notes)
    train, val, val_desc, num_classes = _split_data(train, val, cfg.val_fraction, seed)
    dev, mean, std = _context(model, cfg, mean, std)
    module = prep.module.to(dev)
    full = with_normalization(module, mean, std, ndim=first.dim()).to(dev)
    check_compatible(full.eval(), first.to(dev), num_classes)
    data = TrainData(train=train.on_device(dev), y=train.y.to(dev), val=val, val_y=val.y,
                     num_classes=num_classes, batch_size=batch_size, epochs=cfg.epochs, seed=seed, device=dev,
                     workers=cfg.workers)
    settings_out = _settings(cfg, mvl_layers, gammas, data, val_desc, bn_at_test, mean, std)
    fingerprint = _fingerprint(settings_out, module, fingerprint_extra)  # the starting weights, before DDP
    objective, parts = _build_parts(cfg, prep, full, gammas, mvl_layers, num_classes, seed, dev)
    checkpointer = Checkpointer(Path(checkpoint_dir) / CHECKPOINT_NAME, fingerprint) \
        if checkpoint_dir is not None else None
    trainer = Trainer(objective, parts, data, _callbacks(cfg, val.y, num_classes, checkpointer, callbacks))
    history, state = _fit(trainer, checkpointer, resume=resume)
    for note in notes:
        log.info(note)
    return HardenResult(module=_trained_module(module, prep), history=_history_frame(history),
                        settings=settings_out, mvl_layers=mvl_layers, gammas=gammas, validation=val_desc,
                        bn_at_test=bn_at_test, resumed_from_epoch=int(state["epoch"]) if state is not None else None,
                        seconds=time.perf_counter() - started,
                        checkpoint=checkpointer.path if checkpointer is not None else None, notes=notes)


def _context(model, cfg: HardenConfig, mean, std) -> tuple[torch.device, Sequence[float] | None,
                                                             Sequence[float] | None]:
    """Device and normalization: a :class:`LoadedModel`'s own context when a stage set it, else from ``cfg``."""
    if isinstance(model, LoadedModel) and model.device is not None:
        return model.device, mean if mean is not None else model.mean, std if std is not None else model.std
    return dist.local_device(resolve_device(cfg.device)), mean, std


def _check_request(cfg: HardenConfig, mvl_layers: Sequence[str], *, checkpoint_dir, resume: bool) -> None:
    """Refuse, before any work, settings that cannot train: no eps, no MVL layers for a method that needs them,
    a resume without a checkpoint directory."""
    cfg.require_eps()
    if cfg.uses_mvl and not mvl_layers:
        raise RobauditError(f"method {cfg.method} needs MVL layers: pass mvl_layers (or --mvl-top K)")
    if checkpoint_dir is None and resume:
        raise RobauditError("resume needs a checkpoint directory")


def _plan_model(model, cfg: HardenConfig, type_map, mvl_layers: Sequence[str], first: torch.Tensor,
                notes: list[str]) -> tuple[_Prepared, int, dict[str, float], str]:
    """The module made trainable (:func:`_prepare_model`), the global batch size, each MVL layer's gamma and the
    BatchNorm statistics used at test; what the user should know is added to ``notes`` (a frozen part warned)."""
    prep = _prepare_model(model, type_map, mvl_layers, first)
    batch_size = global_batch_size(cfg.batch_size, prep.fixed_batch, notes)
    gammas = dict(zip(mvl_layers, parse_gamma(cfg.gamma, len(mvl_layers)))) if mvl_layers else {}
    if prep.frozen_note:
        warnings.warn(prep.frozen_note, stacklevel=3)  # the caller of harden()
        notes.append(prep.frozen_note)
    return prep, batch_size, gammas, _bn_policy(cfg, prep, gammas, notes)


def _fit(trainer: Trainer, checkpointer: Checkpointer | None, *, resume: bool) -> tuple[list[dict], dict | None]:
    """Train, from the checkpoint's state when resuming: the history and the state resumed from (or None)."""
    state = checkpointer.prepare(resume=resume) if checkpointer is not None else None
    if state is not None:
        trainer.load_state_dict(state)
        log.info("resuming from the checkpoint of epoch %d in %s", int(state["epoch"]), checkpointer.path)
    return trainer.fit(), state


def _trained_module(module: nn.Module, prep: _Prepared) -> nn.Module:
    """The trained module in eval mode: the eager model, with the trained weights, when its graph trained."""
    module.eval()
    if prep.eager is not None:  # same state dict keys: hand the trained weights back to the eager model
        prep.eager.load_state_dict(module.state_dict())
        return prep.eager.eval()
    return module


def global_batch_size(asked: int, fixed: int | None, notes: list[str]) -> int:
    """The global batch size: ``asked``, or the one an archive was exported for; at least 2 per process."""
    world = dist.world_size()
    if fixed is not None and world > 1:
        raise RobauditError(f"the archive was exported for batches of {fixed} only: under torchrun each process "
                            "takes a slice of every batch; harden it in one process, or export it with a dynamic "
                            "batch dimension")
    if fixed is not None and asked != fixed:
        notes.append(f"the archive was exported for batches of {fixed}: training uses batches of {fixed}")
        return fixed
    if asked < 2 * world:
        raise RobauditError(f"--batch-size {asked} is too small for {world} processes: each needs at least 2 "
                            f"samples of every batch (--batch-size {2 * world} or more)")
    return asked


def _fingerprint(settings_out: Mapping, module: nn.Module, extra: Mapping | None) -> dict:
    """What a checkpoint must match to be resumed: the settings, the starting weights and ``extra``."""
    # another number of processes or data workers may resume (the batches are the same), so they are not part of it
    fingerprint = {k: v for k, v in settings_out.items()
                   if k not in ("validation", "bn_at_test", "processes", "workers")}
    fingerprint["model_digest"] = _module_digest(module)
    fingerprint.update(extra or {})
    return json.loads(json.dumps(fingerprint, default=str))


def _callbacks(cfg: HardenConfig, val_y, num_classes: int, checkpointer, extra: Sequence[Any]) -> list[Any]:
    """The trainer's callbacks: the caller's first, then collapse check, progress bar (rank 0) and checkpoint."""
    hooks: list[Any] = list(extra)
    if cfg.check_collapse:
        hooks.append(CollapseCheck(val_y, num_classes))
    if cfg.progress and dist.is_main():
        hooks.append(ProgressBar(cfg.method.value))
    if checkpointer is not None:
        hooks.append(checkpointer)
    return hooks


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

    from ..exported import as_graph, make_trainable
    from ..probe import op_layers

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
                     fixed_batch=fixed_batch(module), frozen_note=note)


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
        val = as_dataset(val, "validation")
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
        "seed": data.seed, "n_train": int(len(data.y)), "n_val": int(len(data.val_y)), "processes": dist.world_size(),
        "workers": data.workers,
        "validation": val_desc, "val_attack": f"pgd:eps={format_eps(eps)},steps={steps}", "bn_at_test": bn_at_test,
        "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
    }


def _build_parts(cfg: HardenConfig, prep: _Prepared, full: nn.Module, gammas, mvl_layers, num_classes: int,
                 seed: int, dev: torch.device) -> tuple[Objective, TrainParts]:
    """Optimizer, schedule, training and validation attacks, layer hooks and (under torchrun) the DDP wrapper."""
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
                       dual=DualBatchNorm(module) if cfg.dual_bn else None, ddp=wrap(full, dev))
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
