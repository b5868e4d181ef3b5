"""The epoch loop: a :class:`Trainer` that runs epochs and validation and calls its callbacks.

Callbacks (checkpoint, collapse check, progress bar, or a test's own) get ``on_epoch_start``,
``on_batch_end``, ``on_train_end`` (the epoch's training row), ``on_validated`` (with validation
accuracy; may raise to stop) and ``on_epoch_end`` (after the row entered the history) -- any subset.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..data import Dataset, StreamingDataset, read_batches
from ..errors import NonFiniteError, RobauditError
from ..probe import LayerProbe
from .config import Method
from .distributed import Shard, average_statistics, split
from .layers import DualBatchNorm, LayerwisePerturber, Recorder
from .objectives import atlr_loss, clean_and_adversarial, cross_entropy

log = logging.getLogger(__name__)

RANK_SEED_STRIDE = 1_000_003  # process r of a torchrun job draws from seed + r * stride
COLLAPSE_MARGIN = 0.02  # clean accuracy within this of the majority-class rate counts as chance


class HardenInterrupted(RobauditError):
    """Training was interrupted (Ctrl-C); the last complete epoch's checkpoint is kept."""


@dataclass
class Objective:
    """What one batch optimizes: the method, its MVL layers and weights."""

    method: Method
    gammas: dict[str, float]
    re_mode: str
    clean_weight: float
    probe_modules: list[str]
    type_map: Mapping[str, str] | None
    joint_passes: bool = False  # clean and adversarial batches share one forward pass

    @property
    def records(self) -> bool:
        """Whether the MVL outputs are recorded (AT-LR with some non-zero gamma)."""
        return self.method == Method.ATLR and any(g != 0 for g in self.gammas.values())


@dataclass
class TrainParts:
    """The objects one training run updates: model, optimizer, schedule, attacks and layer hooks."""

    module: nn.Module
    full: nn.Module  # module with the input normalization in front
    opt: torch.optim.Optimizer
    sched: Any
    train_attack: Any
    val_attack: Any
    recorder: Recorder
    perturber: LayerwisePerturber
    dual: DualBatchNorm | None = None
    ddp: nn.Module | None = None  # ``full`` in DistributedDataParallel under torchrun

    @property
    def trained(self) -> nn.Module:
        """What the training passes call: the DDP wrapper under torchrun, else ``full``."""
        return self.ddp if self.ddp is not None else self.full

    def clean_ctx(self):
        return self.dual.clean() if self.dual is not None else contextlib.nullcontext()


@dataclass
class TrainData:
    """The training and validation sets (batches read with :func:`robaudit.data.read_batches`), labels, the
    loop's sizes.

    ``train`` is an in-memory set already on the device or a streaming one; ``y`` its labels on the device.
    ``workers`` processes read a streaming set's batches ahead (what is read, and so the result, is the same)."""

    train: Dataset | StreamingDataset
    y: torch.Tensor
    val: Dataset | StreamingDataset
    val_y: torch.Tensor
    num_classes: int
    batch_size: int
    epochs: int
    seed: int
    device: torch.device
    workers: int = 0


def evaluate_counts(full: nn.Module, data: Dataset | StreamingDataset, positions: torch.Tensor, attack_fn,
                    batch_size: int, dev: torch.device, *, workers: int = 0) -> tuple[int, int]:
    """How many of the samples at ``positions`` of ``data`` are classified right, clean and attacked (eval mode)."""
    full.eval()
    clean = robust = 0
    plan = [positions[s:s + batch_size] for s in range(0, len(positions), batch_size)]
    for idx, xb in zip(plan, read_batches(data, [p.tolist() for p in plan], device=dev, workers=workers)):
        yb = data.y[idx].to(dev)
        with torch.no_grad():
            clean += int((full(xb).argmax(1) == yb).sum())
        xa = attack_fn(xb, yb).detach()
        full.eval()
        with torch.no_grad():
            robust += int((full(xa).argmax(1) == yb).sum())
    return clean, robust


class CollapseCheck:
    """Stop when clean validation accuracy falls to chance (the majority-class rate) after being above it."""

    def __init__(self, val_y: torch.Tensor, num_classes: int) -> None:
        self.chance = float(torch.bincount(val_y.long(), minlength=num_classes).max()) / len(val_y)

    def on_validated(self, trainer: "Trainer", epoch: int, row: dict) -> None:
        c, chance = row["val_clean_acc"], self.chance
        best = max(h["val_clean_acc"] for h in trainer.history) if trainer.history else c
        if c <= chance + COLLAPSE_MARGIN and best > chance + 2 * COLLAPSE_MARGIN:
            kept = trainer.checkpoint_path is not None and epoch > 1
            raise RobauditError(
                f"training collapsed at epoch {epoch}: clean validation accuracy fell to chance "
                f"({100 * c:.1f}%, majority class {100 * chance:.1f}%); lower --gamma or --lr, and keep the "
                "output layer out of the MVL set" + (f" (the checkpoint of epoch {epoch - 1} is kept)" if kept else ""))


class ProgressBar:
    """A tqdm bar over each epoch's batches."""

    def __init__(self, method: str) -> None:
        self.method, self.bar = method, None

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.n_batches, desc=f"{self.method} epoch {epoch}/{trainer.data.epochs}",
                        unit="batch", leave=False)

    def on_batch_end(self, trainer: "Trainer", epoch: int) -> None:
        self.bar.update(1)

    def on_train_end(self, trainer: "Trainer", epoch: int, row: dict) -> None:
        self.bar.close()


class TimeEstimate:
    """After the first epoch this process trains, say how long the whole hardening will take: that epoch's time
    (training and validation) for each epoch left, plus ``after`` seconds of work after training (the
    re-analysis). ``say`` gets one line; ``clock`` is a monotonic clock in seconds."""

    def __init__(self, say: Callable[[str], None], *, after: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.say, self.after, self.clock = say, after, clock
        self.started: float | None = None
        self.done = False

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        if self.started is None:
            self.started = self.clock()

    def on_epoch_end(self, trainer: "Trainer", epoch: int, row: dict) -> None:
        if self.done or self.started is None:
            return
        self.done = True
        took = self.clock() - self.started
        left = trainer.data.epochs - epoch
        total = took * left + (self.after or 0.0)
        rest = [f"{left} more epoch{'s' if left != 1 else ''}"] if left else []
        rest += ["the re-analysis"] if self.after else []
        self.say(f"time estimate: epoch {epoch}/{trainer.data.epochs} took {_duration(took)}; about "
                 f"{_duration(total)} to go ({' and '.join(rest) or 'nothing'}), about {_duration(took + total)} "
                 "in all")


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 4 min``: a duration to the precision an estimate has."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Trainer:
    """Runs the epochs of one hardening: train, validate, then the callbacks; keeps the history."""

    def __init__(self, objective: Objective, parts: TrainParts, data: TrainData,
                 callbacks: Sequence[Any] = ()) -> None:
        self.objective, self.parts, self.data = objective, parts, data
        self.callbacks = list(callbacks)
        self.history: list[dict] = []
        self.start_epoch = 1

    def batch_starts(self) -> list[int]:
        """Where the global batches start; a last batch too small to give every process 2 samples (BatchNorm
        needs them) is left out."""
        n, b, least = len(self.data.y), self.data.batch_size, 2 * dist.world_size()
        return [s for s in range(0, n, b) if n - s >= least]

    @property
    def n_batches(self) -> int:
        return len(self.batch_starts())

    @property
    def checkpoint_path(self) -> Path | None:
        return next((c.path for c in self.callbacks if hasattr(c, "path")), None)

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self, *args)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs to continue bit for bit (model, optimizer, schedule, RNG, history).

        Under torchrun every process must call it (it gathers each process's RNG and layerwise state into
        ``ranks``); the rest is the same on every process after an epoch.
        """
        p = self.parts
        own = self._rank_state()
        state = {
            "model": {k: v.detach().cpu().clone() for k, v in p.module.state_dict().items()},
            "optimizer": p.opt.state_dict(), "scheduler": p.sched.state_dict() if p.sched is not None else None,
            "history": self.history, "dual_bn": p.dual.state_dict() if p.dual is not None else None, **own,
        }
        if dist.world_size() > 1:
            state["ranks"] = dist.all_gather_objects(own)
            state.update(state["ranks"][0])
        return state

    def _rank_state(self) -> dict:
        """The state that differs between processes: RNG streams and the layerwise gradient signs."""
        dev = self.data.device
        return {"rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "layerwise": self.parts.perturber.state_dict() if self.objective.method == Method.LAYERWISE else None}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a checkpoint's state (the RNG states are restored when :meth:`fit` starts)."""
        p, dev = self.parts, self.data.device
        p.module.load_state_dict({k: v.to(dev) for k, v in state["model"].items()})
        p.opt.load_state_dict(state["optimizer"])
        if p.sched is not None and state.get("scheduler") is not None:
            p.sched.load_state_dict(state["scheduler"])
        if p.dual is not None and state.get("dual_bn") is not None:
            p.dual.load_state_dict(state["dual_bn"])
        ranks = state.get("ranks") or [state]
        own = ranks[dist.rank()] if len(ranks) == dist.world_size() else None
        if own is None:
            log.warning("the checkpoint was written by %d processes and is resumed by %d: training continues, but "
                        "its random draws differ from an uninterrupted run", len(ranks), dist.world_size())
        own = own or ranks[0]
        if own.get("layerwise") is not None:
            p.perturber.load_state_dict(own["layerwise"], dev)
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"]) + 1
        self._resume_rng = (own["rng"], own.get("cuda_rng"), own is ranks[0] and dist.rank() > 0)

    # -- the loop ------------------------------------------------------------------------------
    def evaluate(self) -> tuple[float, float]:
        """Clean and PGD validation accuracy (under torchrun each process takes a slice; the counts are summed)."""
        d, rank, world = self.data, dist.rank(), dist.world_size()
        mine = split(torch.arange(len(d.val_y)), rank, world)
        counts = evaluate_counts(self.parts.full, d.val, mine, self.parts.val_attack, d.batch_size, d.device,
                                 workers=d.workers)
        if world > 1:
            counts = dist.all_reduce_sum(torch.tensor(counts, dtype=torch.int64, device=d.device)).tolist()
        n = max(len(d.val_y), 1)
        return counts[0] / n, counts[1] / n

    def fit(self) -> list[dict]:
        """Run the remaining epochs inside a forked RNG; returns the history (epoch 0 is before training)."""
        dev = self.data.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            rng = getattr(self, "_resume_rng", None)
            if rng is not None:
                self._restore_rng(*rng)
            else:
                torch.manual_seed(self.data.seed + RANK_SEED_STRIDE * dist.rank())
                t0 = time.perf_counter()
                c0, r0 = self.evaluate()
                self.history.append({"epoch": 0, "lr": float("nan"), "val_clean_acc": c0, "val_robust_acc": r0,
                                     "seconds": 0.0, "val_seconds": time.perf_counter() - t0})
                log.info("before hardening: validation accuracy clean %.3f, robust %.3f", c0, r0)
            for epoch in range(self.start_epoch, self.data.epochs + 1):
                self._guarded_epoch(epoch)
        self.parts.module.eval()
        return self.history

    def _restore_rng(self, cpu, cuda, borrowed: bool) -> None:
        """Set the checkpoint's RNG state; a process that borrowed another's (other world size) moves off it."""
        dev = self.data.device
        torch.set_rng_state(cpu)
        if dev.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state(cuda, dev)
        if borrowed:
            torch.manual_seed(int(torch.randint(2**62, ())) + RANK_SEED_STRIDE * dist.rank())

    def _guarded_epoch(self, epoch: int) -> None:
        """One epoch; Ctrl-C becomes :class:`HardenInterrupted`, and the model is left in eval mode on any error."""
        try:
            self._emit("on_epoch_start", epoch)
            row = self.train_epoch(epoch)
            self._emit("on_train_end", epoch, row)
            t0 = time.perf_counter()
            c, r = self.evaluate()
            row.update({"val_clean_acc": c, "val_robust_acc": r, "val_seconds": time.perf_counter() - t0})
            self._emit("on_validated", epoch, row)
            if self.parts.sched is not None:
                self.parts.sched.step()
            self.history.append(row)
            log.info("epoch %d/%d: loss %.4f, validation clean %.3f, robust %.3f (%.1f s)", epoch, self.data.epochs,
                     row["loss"], c, r, row["seconds"])
            self._emit("on_epoch_end", epoch, row)
        except KeyboardInterrupt:
            self.parts.module.eval()
            ck = self.checkpoint_path
            where = (f"the checkpoint of epoch {epoch - 1} is in {ck}: rerun with --resume to continue"
                     if ck is not None and epoch > 1 else "no epoch was completed: rerun to start again")
            raise HardenInterrupted(f"hardening interrupted during epoch {epoch}; {where}") from None
        except BaseException:
            self.parts.module.eval()
            raise

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training data; returns the epoch's history row (mean loss terms, seconds).

        Under torchrun each process trains on its slice of every global batch; the row's terms are the global
        batches' (the same on every process), and the BatchNorm statistics are averaged at the end.
        """
        d, p, o = self.data, self.parts, self.objective
        t0 = time.perf_counter()
        rank, world = dist.rank(), dist.world_size()
        perm = torch.randperm(len(d.y), generator=torch.Generator().manual_seed(d.seed * 1_000_003 + epoch))
        sums: dict[str, torch.Tensor] = {}
        count = 0
        lr = p.opt.param_groups[0]["lr"]
        transform = p.perturber if o.method == Method.LAYERWISE else p.recorder
        # hooks are registered only around the training passes, never while the attack runs
        probe = LayerProbe(p.module, o.probe_modules, type_map=o.type_map, detach=False, transform=transform)
        # layerwise runs no attack: its hooks stay for the whole epoch
        layerwise = o.method == Method.LAYERWISE
        epoch_hooks = probe if o.probe_modules and layerwise else contextlib.nullcontext()
        hooks = probe if o.probe_modules and not layerwise else contextlib.nullcontext()
        self._joint = o.joint_passes
        plan = [perm[s:s + d.batch_size] for s in self.batch_starts()]  # the global batches
        mine_all = [split(idx, rank, world) for idx in plan]  # this process's slice of each
        reads = read_batches(d.train, [m.tolist() for m in mine_all], device=d.device, workers=d.workers)
        with epoch_hooks:
            for bi, (idx, mine, xb) in enumerate(zip(plan, mine_all, reads)):
                shard = Shard(rank, world, len(idx)) if world > 1 else None
                yb = d.y[mine.to(d.y.device)]
                loss, terms = self._batch_loss(probe, hooks, xb, yb, shard)
                if not torch.isfinite(loss):  # a global value under torchrun: every process stops here
                    raise NonFiniteError(f"the loss became {float(loss.detach())} at epoch {epoch}, batch {bi + 1}: "
                                         "lower --lr (or --gamma); nothing was saved from this epoch")
                p.opt.zero_grad(set_to_none=True)
                (loss * world if shard is not None else loss).backward()  # DDP averages the processes' shares
                p.opt.step()
                count += len(idx)
                for name, v in {"loss": loss, **terms}.items():
                    v = v.detach() * len(idx)
                    sums[name] = sums[name] + v if name in sums else v
                self._emit("on_batch_end", epoch)
        p.full.eval()
        average_statistics(p.module, p.dual.aux.values() if p.dual is not None else ())
        row = {"epoch": epoch, "lr": lr}
        row.update({name: float(v) / max(count, 1) for name, v in sums.items()})
        row["seconds"] = time.perf_counter() - t0
        return row

    def _batch_loss(self, probe: LayerProbe, hooks, xb: torch.Tensor, yb: torch.Tensor, shard: Shard | None = None):
        """The loss of one batch (with a ``shard``: of the global batch) under the objective's method, and its terms."""
        p, o = self.parts, self.objective
        if o.method in (Method.AT, Method.ATLR):
            x_adv = p.train_attack(xb, yb).detach()  # on the inner module: no gradient sync while PGD runs
            p.trained.train()
            with hooks:
                passes = clean_and_adversarial(p.trained, probe, p.recorder, xb, x_adv, record=o.records,
                                               need_clean=o.records or o.clean_weight > 0, joint=self._joint,
                                               clean_ctx=p.clean_ctx)
            self._joint = passes.joint
            return atlr_loss(passes.logits_adv, yb, passes.clean_outputs, passes.adv_outputs,
                             gammas=o.gammas if o.method == Method.ATLR else {}, re_mode=o.re_mode,
                             logits_clean=passes.logits_clean, clean_weight=o.clean_weight, shard=shard)
        p.trained.train()
        if o.method == Method.LAYERWISE:
            with hooks:
                p.perturber.active = True
                probe.reset()
                logits = p.trained(xb)
                p.perturber.active = False
            ce = cross_entropy(logits, yb, shard)
            terms, loss = {"ce_perturbed": ce}, ce
            if o.clean_weight > 0:
                with p.clean_ctx():
                    ce_c = cross_entropy(p.trained(xb), yb, shard)
                terms["ce_clean"] = ce_c
                loss = (1 - o.clean_weight) * ce + o.clean_weight * ce_c
            return loss, terms
        ce = cross_entropy(p.trained(xb), yb, shard)  # standard
        return ce, {"ce_clean": ce}
