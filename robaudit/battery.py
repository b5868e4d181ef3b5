"""The attack battery over one process's batches, its statistics kept on the device.

:class:`Battery` steps through batches: per configuration the perturbed batch (its random draws seeded from
the seed, the global batch index and the configuration, so they do not depend on which process runs the
batch), then one hooked pass of the clean batch stacked with the perturbed ones (up to :data:`JOINT_CONFIGS`
a pass) that updates every layer's :class:`RelativeError` as the layer runs.
Sums (RE states, accuracy and worst-case counts, seconds) stay on the device and are added over processes
with one ``all_reduce`` (:meth:`Battery.totals`); what is not a sum (perturbation sizes, kept outcomes,
``samples.csv`` rows) travels as host copies and is put back in data-set order.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import attacks as atk
from . import dist
from .bnaudit import BatchNormMoments, BatchNormStreams
from .errors import NonFiniteError, RobauditError
from .metrics import INPUT_LAYER, RelativeError, squared
from .models import check_compatible, check_logits
from .probe import Layer, LayerProbe
from .samples import SampleLog, perturbation_norms


class PerturbationSizes:
    """Success rate and perturbation size of one attack configuration, streamed by batch.

    A sample is *fooled* when the model classifies it correctly and its perturbed input wrongly;
    ``success_rate`` is fooled / correctly classified. ``pert_median`` and ``pert_p90`` are the median
    and 90th percentile (linear interpolation) of ``||x' - x||`` in the attack's own norm over the
    fooled samples: for minimal-perturbation attacks (CW, DeepFool) the size they needed. For those (``minimal``)
    ``pert_median_all`` is the median over all samples of the size each one needed (0 when already misclassified,
    infinite when not fooled): the size at which half of all samples are misclassified, which grows with
    robustness, unlike the median over the fooled ones (a robust model is fooled only on its easy samples). Per batch,
    host copies of the norms and outcomes are queued without waiting; :attr:`parts` gives them back per
    batch, so parts gathered from other processes in data-set order give the same numbers. Every
    :data:`JOIN_EVERY` batches the queued copies are joined into one tensor each: a small tensor kept per
    batch pins the heap around it, which grew the process by about 0.5 MB a batch on CPU.
    """

    JOIN_EVERY = 8

    def __init__(self, norm: str, *, minimal: bool = False) -> None:
        self.norm = norm
        self.minimal = minimal
        self.device = torch.device("cpu")
        self._joined: list[tuple[torch.Tensor, ...]] = []  # at most one: norms, fooled, ok_clean of earlier batches
        self._queued: list[tuple[torch.Tensor, ...]] = []  # the latest batches' host copies
        self.lengths: list[int] = []  # samples per batch

    def update(self, x: torch.Tensor, x_adv: torch.Tensor, ok_clean: torch.Tensor,
               ok_adv: torch.Tensor) -> torch.Tensor:
        """Add one batch; return every sample's perturbation norm (what ``samples.csv`` records)."""
        norms = perturbation_norms(x, x_adv, self.norm)
        self.device = norms.device
        self._queued.append(tuple(t.to("cpu", non_blocking=True) for t in (norms, ok_clean & ~ok_adv, ok_clean)))
        self.lengths.append(len(norms))
        if len(self._queued) >= self.JOIN_EVERY:
            self._join()
        return norms

    def _join(self) -> None:
        dist.synchronize(self.device)  # the queued host copies are complete only now
        self._joined = [tuple(torch.cat(t) for t in zip(*self._joined, *self._queued))]
        self._queued = []

    @property
    def parts(self) -> list[tuple[torch.Tensor, ...]]:
        """Per batch, in the order added: ``(norms, fooled, ok_clean)`` host tensors."""
        self._join()
        if not self._joined:
            return []
        return list(zip(*(t.split(self.lengths) for t in self._joined[0])))

    @parts.setter
    def parts(self, parts: list[tuple[torch.Tensor, ...]]) -> None:
        self._joined, self._queued, self.lengths = [], list(parts), [len(p[0]) for p in parts]

    def compute(self) -> dict[str, float]:
        self._join()
        if self._joined:
            norms, fooled, ok = self._joined[0]
        else:
            norms, fooled, ok = torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)
        sizes = norms[fooled].numpy()
        n_correct = int(ok.sum())
        rate = len(sizes) / n_correct if n_correct else math.nan
        out = {"success_rate": rate, "pert_median": math.nan, "pert_p90": math.nan,
               "pert_median_all": median_over_all(norms, fooled, ok) if self.minimal else math.nan}
        if len(sizes):
            out.update(pert_median=float(np.median(sizes)), pert_p90=float(np.percentile(sizes, 90)))
        return out


def median_over_all(norms: torch.Tensor, fooled: torch.Tensor, ok_clean: torch.Tensor) -> float:
    """The median over all samples of the perturbation each needed: 0 if misclassified already, its norm if
    fooled, infinite if not fooled (NaN for no sample)."""
    if not len(norms):
        return math.nan
    needed = torch.where(fooled, norms.double(), torch.where(ok_clean, math.inf, 0.0))
    return float(np.median(needed.numpy()))


@dataclass
class Setup:
    """What the battery runs on: the probed module (``model``), the normalized forward of its hooked passes
    (``full``), the module the attacks query (``attacked``) and the user's own module (``eager``)."""

    model: nn.Module
    eager: nn.Module
    full: nn.Module
    attacked: nn.Module
    specs: list[atk.AttackSpec]
    builders: list
    device: torch.device
    seed: int
    streaming: bool  # False for a fixed-batch archive: its chunked outputs are read after the pass
    num_classes: int
    bn: BatchNormStreams | None = None  # BatchNorm input moments, taken in the hooked passes
    # judges the first batch's clean logits: (eager module, x, y, logits) -> None, or a one-line error
    first_batch: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    def restore_eval(self) -> None:
        """Eval mode again after an attack (one may switch the mode it queries), once per distinct module."""
        self.model.eval()
        if self.eager is not self.model:
            self.eager.eval()

    @property
    def worst_keys(self) -> list[tuple[str, float]]:
        """The (norm, eps) of every worst-case row: bounded adversarial attacks only."""
        return sorted({(s.norm, s.eps) for s in self.specs if s.kind == "adversarial" and s.bounded})


@dataclass
class Totals:
    """The battery's statistics over all processes (the same on every process; ``rows`` on rank 0 only)."""

    layers: list[Layer]
    re: dict[tuple[str, int], dict[str, float]]
    output_layers: set[str]
    correct: list[int]  # clean, then one per configuration
    worst: list[int]  # one per Setup.worst_keys
    seconds: list[float]
    sizes: list[dict[str, float]]
    pairs: list[list[int]] = field(default_factory=list)  # rows of accuracy.csv: right under i, wrong under j
    outcomes: dict[int, torch.Tensor] = field(default_factory=dict)
    bn: BatchNormMoments | None = None


JOINT_CONFIGS = 8  # perturbed batches that share a hooked pass with the clean one (memory: 1 + 8 batches' layer)


class Battery:
    """Runs every configuration on one batch at a time (:meth:`step`) and adds up what it measured."""

    def __init__(self, setup: Setup, probe: LayerProbe, *, keep_outcomes: int = 0, log: SampleLog | None = None,
                 keep_rows: bool = False, bar=None) -> None:
        self.s, self.probe, self.log, self.bar = setup, probe, log, bar
        if setup.bn is not None:  # the probe's proof passes are no batch of the analysis
            probe.aside = setup.bn.aside
        self.keep_outcomes, self.keep_rows = keep_outcomes, keep_rows
        n, dev = len(setup.specs), setup.device
        # (the pass's layers, its configurations) -> their RelativeError sums, layers x configurations x fields
        self.sums: dict[tuple[tuple[str, ...], tuple[int, ...]], torch.Tensor] = {}
        self.output_hits: dict[str, torch.Tensor] = {}  # layer -> batches where its clean output is the logits
        self.counts = torch.zeros(1 + n + len(setup.worst_keys), dtype=torch.float64, device=dev)
        # rows of accuracy.csv (clean, configurations, worst cases) x the same: samples right under one, wrong under
        # the other -- the per-sample pairs that the sanity checks' exact tests compare two rows on
        self.pairs = torch.zeros(len(self.counts), len(self.counts), dtype=torch.float64, device=dev)
        self.seconds = [0.0] * n  # time spent generating each configuration's perturbed inputs
        self.sizes = [PerturbationSizes(s.norm, minimal=not s.bounded) for s in setup.specs]
        self.kept: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(n)}  # config -> batch -> outcomes
        self.rows: dict[int, tuple] = {}  # batch -> samples.csv columns (host copies), with keep_rows
        self.batches: list[int] = []
        self.checked = False  # whether model and data were seen to fit (on this process's first batch)

    # -- one batch ----------------------------------------------------------------------------
    def step(self, b: int, start: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Global batch ``b`` (samples ``start``...): every configuration's perturbed batch, then hooked passes
        of the clean batch stacked with up to :data:`JOINT_CONFIGS` perturbed ones, then the outcomes.

        The first batch also checks that model and data fit, instead of a forward pass of its own before it: its
        clean logits must be logits for the data set's classes, not at chance where another input normalization
        is far above it (``Setup.first_batch``), and if it fails, a small forward pass says in one line whether the
        model does not take these inputs or fails to run (the original error otherwise)."""
        if self.checked:
            return self._step(b, start, x, y)
        try:
            self._step(b, start, x, y)
        except RobauditError:
            raise
        except Exception:
            with self.probe.paused():
                check_compatible(self.s.full, x[:2], self.s.num_classes)
            raise
        self.checked = True

    def _step(self, b: int, start: int, x: torch.Tensor, y: torch.Tensor) -> None:
        n, rows = len(self.s.specs), len(x)
        advs = [self._perturbed(b, i, x, y) for i in range(n)]
        logits = []  # the clean batch's, then each configuration's
        for g, group in enumerate([list(range(n))[k:k + JOINT_CONFIGS] for k in range(0, n, JOINT_CONFIGS)] or [[]]):
            out = self._joint_pass(group, x, [advs[i] for i in group], first=g == 0)
            logits.extend(out[k * rows:(k + 1) * rows] for k in range(0 if g == 0 else 1, 1 + len(group)))
        if not self.checked:
            check_logits(logits[0], self.s.num_classes)
        if not torch.isfinite(logits[0]).all():
            raise NonFiniteError(f"the model returns non-finite outputs on clean samples {start}..{start + rows - 1}")
        if not self.checked and self.s.first_batch is not None:
            with self.probe.paused():
                self.s.first_batch(self.s.eager, x, y, logits[0])
        bad = torch.stack([~torch.isfinite(a).all() for a in advs]) if advs else None
        if bad is not None and bad.any():  # one host sync per batch for every configuration's finiteness check
            spec = self.s.specs[int(bad.nonzero()[0])]
            raise NonFiniteError(f"{spec.label} produced non-finite inputs: the model's gradients may be "
                                 "non-finite; check the weights")
        ok_clean = logits[0].argmax(1) == y
        self.counts[0] += ok_clean.sum()
        robust = {k: ok_clean.clone() for k in self.s.worst_keys}
        oks, perts = [], []
        for i, spec in enumerate(self.s.specs):
            ok = logits[1 + i].argmax(1) == y
            self.counts[1 + i] += ok.sum()
            if start < self.keep_outcomes:
                self.kept[i][b] = ok[:self.keep_outcomes - start].to("cpu", non_blocking=True)
            oks.append(ok)
            perts.append(self.sizes[i].update(x, advs[i], ok_clean, ok))
            if spec.kind == "adversarial" and spec.bounded:
                robust[(spec.norm, spec.eps)] &= ok
        base = 1 + n
        for j, k in enumerate(self.s.worst_keys):
            self.counts[base + j] += robust[k].sum()
        right = torch.stack([ok_clean, *oks, *(robust[k] for k in self.s.worst_keys)]).double()
        self.pairs += right @ (1 - right).T
        self._record(b, start, y, logits[0].argmax(1), oks, perts, [robust[k] for k in self.s.worst_keys])
        self.batches.append(b)

    def _perturbed(self, b: int, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Configuration ``i``'s perturbed batch ``b``, its draws seeded from (seed, b, i), its time counted."""
        attack_fn = self.s.builders[i]
        atk.reseed(attack_fn, atk.batch_seed(self.s.seed, b, i))
        tic = time.perf_counter()
        with self.probe.paused():  # no hook overhead inside the attack's own forward passes
            try:
                x_adv = attack_fn(x, y).detach()
            finally:
                self.s.restore_eval()
        self.seconds[i] += time.perf_counter() - tic
        if self.bar is not None:
            self.bar.update(len(x))
        return x_adv

    def _joint_pass(self, group: list[int], x: torch.Tensor, advs: list[torch.Tensor], *, first: bool) -> torch.Tensor:
        """One hooked forward of the clean batch stacked with the perturbed batches of the configurations in
        ``group``; returns its logits. As each layer runs, its per-sample norms of the clean activation and of
        every perturbed one's difference from it are taken, so no activation outlives its layer (the clean
        counts, output layers and BatchNorm moments only on the ``first`` group of a batch)."""
        rows, g = len(x), len(group)
        clean: dict[str, torch.Tensor] = {}  # layer -> its per-sample norms on the clean batch (1 x rows)
        delta: dict[str, torch.Tensor] = {}  # layer -> the norms of each perturbed batch's difference (g x rows)
        heads: dict[str, torch.Tensor] = {}  # layers shaped like the logits: compared with them after the pass

        def observe(name: str, t: torch.Tensor) -> torch.Tensor:  # under no_grad: nothing to detach
            base, perturbed = t.reshape(1 + g, rows, -1).split((1, g))
            clean[name] = torch.linalg.vector_norm(base, dim=2)
            delta[name] = torch.linalg.vector_norm(perturbed - base, dim=2)
            # logits are (batch, classes): only a layer's 2-D output can be the output layer
            if first and t.dim() == 2 and name != INPUT_LAYER:
                heads[name] = t[:rows].detach()
            return t

        domains = [0 if first else None] + [1 + i for i in group]
        stacked = torch.cat([x, *advs])
        if g:  # the model's input, in [0, 1] before any normalization: what the first layer's re_gain is read against
            with torch.no_grad():
                observe(INPUT_LAYER, stacked)
        self.probe.stacked = 1 + g
        try:
            with torch.no_grad(), self._bn(domains, rows):
                if not self.s.streaming:  # a fixed-batch archive's chunks are joined by the probe: read them after
                    logits, outs = self.probe.run(self.s.full, stacked)
                    for name, t in outs.items():
                        observe(name, t)
                else:
                    self.probe.transform, self.probe.record = (lambda layer, t: observe(layer.name, t)), False
                    logits = self.probe.run(self.s.full, stacked)[0]
        finally:
            self.probe.transform, self.probe.record, self.probe.stacked = None, True, 1
        clean_logits = logits[:rows].detach()
        for name, t in heads.items():
            if t.shape == clean_logits.shape:
                hits = self.output_hits.setdefault(name, torch.zeros((), dtype=torch.float64, device=x.device))
                hits += (t == clean_logits).all()  # the output layer, found without a host sync
        if clean and g:  # every layer and configuration's sums in one set of operations
            n_layers = len(clean)
            clean_sq = squared(torch.stack(list(clean.values()))).expand(n_layers, g, rows)  # layers x 1 x rows
            delta_sq = squared(torch.stack(list(delta.values())))  # layers x g x rows, float64
            inc = RelativeError.increments(clean_sq.reshape(n_layers * g, rows), delta_sq.reshape(n_layers * g, rows))
            key = (tuple(clean), tuple(group))
            if key in self.sums:
                self.sums[key] += inc.view(n_layers, g, -1)
            else:
                self.sums[key] = inc.view(n_layers, g, -1)
        return logits

    def _bn(self, domains: list[int | None], rows: int):
        """Record the BatchNorm inputs of this pass's stacked batches into ``domains``, when there is BatchNorm."""
        if self.s.bn is None or not self.s.bn.layers:
            return contextlib.nullcontext()
        return self.s.bn.recording(domains, rows)

    def _record(self, b: int, start: int, y, pred, oks, perts, robust) -> None:
        """This batch's ``samples.csv`` rows as host copies queued without waiting: written one batch later in
        one process (when the copies are surely complete), gathered to rank 0 otherwise."""
        if self.log is None and not self.keep_rows:
            return
        host = functools.partial(torch.Tensor.to, device="cpu", non_blocking=True)
        self.rows[b] = (torch.arange(start, start + len(y)), host(y), host(pred), [host(t) for t in oks],
                        [host(t) for t in perts], [host(t) for t in robust])
        if self.log is not None:
            self.flush(keep=b)

    def flush(self, keep: int | None = None) -> None:
        """Write the queued ``samples.csv`` rows (all but batch ``keep``, whose copies may still be running)."""
        if self.log is None:
            return
        if keep is None:
            dist.synchronize(self.s.device)
        for b in [b for b in self.rows if b != keep]:
            self.log.write(*self.rows.pop(b))

    # -- over all processes ----------------------------------------------------------------------
    def payload(self, layers: list[Layer]) -> dict:
        """What rank 0 and the others need from this process, beyond the sums: host objects only."""
        dist.synchronize(self.s.device)  # the non_blocking host copies are complete
        return {"layers": layers, "re_keys": list(self.states()), "out_keys": list(self.output_hits),
                "batches": list(self.batches), "sizes": [sz.parts for sz in self.sizes], "kept": self.kept}

    def totals(self, payloads: list[dict]) -> Totals:
        """Everything summed (one ``all_reduce`` of one flat float64 tensor) and gathered in data-set order."""
        layers = _merge_layers([p["layers"] for p in payloads])
        order = {layer.name: layer.order for layer in layers}
        re_keys = sorted({k for p in payloads for k in p["re_keys"]}, key=lambda k: (order.get(k[0], 0), k[0], k[1]))
        out_keys = sorted({k for p in payloads for k in p["out_keys"]})
        width = len(RelativeError.FIELDS)
        zeros = torch.zeros(width, dtype=torch.float64, device=self.s.device)
        one = torch.zeros((), dtype=torch.float64, device=self.s.device)
        bn = self.s.bn.sums.flatten() if self.s.bn is not None else zeros[:0]
        states = self.states()
        flat = torch.cat([*(states.get(k, zeros) for k in re_keys),
                          torch.stack([self.output_hits.get(k, one) for k in out_keys]) if out_keys else zeros[:0],
                          self.counts, torch.tensor(self.seconds, dtype=torch.float64, device=self.s.device),
                          self.pairs.flatten(), bn])
        flat = dist.all_reduce_sum(flat).cpu()  # the one read back of the device statistics
        bn_sums, values = flat[len(flat) - len(bn):], flat[:len(flat) - len(bn)].tolist()
        re = {k: RelativeError.summarize(values[j * width:(j + 1) * width]) for j, k in enumerate(re_keys)}
        pos = len(re_keys) * width
        hits, pos = values[pos:pos + len(out_keys)], pos + len(out_keys)
        n, m = len(self.s.specs), len(self.counts)
        counts, pos = values[pos:pos + m], pos + m
        seconds, pos = values[pos:pos + n], pos + n
        pairs = [[int(round(v)) for v in values[pos + i * m:pos + (i + 1) * m]] for i in range(m)]
        correct = [int(round(c)) for c in counts]
        return Totals(layers=layers, re=re, output_layers={k for k, h in zip(out_keys, hits) if h > 0},
                      correct=correct[:1 + n], worst=correct[1 + n:], seconds=seconds, pairs=pairs,
                      sizes=[self._sizes(i, payloads).compute() for i in range(n)],
                      outcomes={i: t for i in range(n) if (t := _in_order([p["kept"][i] for p in payloads])) is not None},
                      bn=self.s.bn.moments(bn_sums.view_as(self.s.bn.sums)) if self.s.bn is not None else None)

    def states(self) -> dict[tuple[str, int], torch.Tensor]:
        """(layer, configuration) -> its :class:`RelativeError` state: the sums of every pass it was in."""
        out: dict[tuple[str, int], torch.Tensor] = {}
        for (names, group), sums in self.sums.items():
            for name, per_config in zip(names, sums.unbind(0)):
                for i, state in zip(group, per_config.unbind(0)):
                    out[(name, i)] = state if (name, i) not in out else out[(name, i)] + state
        return out

    def _sizes(self, i: int, payloads: list[dict]) -> PerturbationSizes:
        """Configuration ``i``'s perturbation sizes with every process's batches, in data-set order."""
        merged = PerturbationSizes(self.s.specs[i].norm, minimal=not self.s.specs[i].bounded)
        pairs = [(b, part) for p in payloads for b, part in zip(p["batches"], p["sizes"][i])]
        merged.parts = [part for _, part in sorted(pairs, key=lambda pair: pair[0])]
        return merged


def _merge_layers(per_rank: list[list[Layer]]) -> list[Layer]:
    """The probed layers of all processes (the same on each that ran a batch), in call order."""
    seen: dict[str, Layer] = {}
    for layers in per_rank:
        for layer in layers:
            seen.setdefault(layer.name, layer)
    return sorted(seen.values(), key=lambda layer: layer.order)


def _in_order(per_rank: list[dict[int, torch.Tensor]]) -> torch.Tensor | None:
    """Per-batch host tensors of all processes joined in batch order (for one configuration)."""
    parts = sorted(((b, t) for kept in per_rank for b, t in kept.items()), key=lambda pair: pair[0])
    return torch.cat([t for _, t in parts]) if parts else None


def write_rows(log: SampleLog, gathered: list[dict[int, tuple]]) -> None:
    """Rank 0 writes every process's ``samples.csv`` rows in data-set order."""
    for _, row in sorted(((b, row) for rows in gathered for b, row in rows.items()), key=lambda pair: pair[0]):
        log.write(*row)
