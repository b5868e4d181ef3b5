"""The attack battery over one process's batches, its statistics kept on the device.

:class:`Battery` steps through batches: one hooked clean pass, then per configuration the perturbed batch
(its random draws seeded from the seed, the global batch index and the configuration, so they do not depend
on which process runs the batch) and one hooked pass that updates every layer's :class:`RelativeError`.
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

import numpy as np
import torch
from torch import nn

from . import attacks as atk
from . import dist
from .bnaudit import BatchNormMoments, BatchNormStreams
from .errors import NonFiniteError, RobauditError
from .metrics import RelativeError, per_sample_norms, squared
from .probe import Layer, LayerProbe
from .samples import SampleLog, perturbation_norms


class PerturbationSizes:
    """Success rate and perturbation size of one attack configuration, streamed by batch.

    A sample is *fooled* when the model classifies it correctly and its perturbed input wrongly;
    ``success_rate`` is fooled / correctly classified. ``pert_median`` and ``pert_p90`` are the median
    and 90th percentile (linear interpolation) of ``||x' - x||`` in the attack's own norm over the
    fooled samples: for minimal-perturbation attacks (CW, DeepFool) the size they needed. Per batch,
    host copies of the norms and outcomes are queued without waiting (``parts``); :meth:`compute`
    reads them, so parts gathered from other processes in data-set order give the same numbers.
    """

    def __init__(self, norm: str) -> None:
        self.norm = norm
        self.device = torch.device("cpu")
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per batch: norms, fooled, ok_clean

    def update(self, x: torch.Tensor, x_adv: torch.Tensor, ok_clean: torch.Tensor,
               ok_adv: torch.Tensor) -> torch.Tensor:
        """Add one batch; return every sample's perturbation norm (what ``samples.csv`` records)."""
        norms = perturbation_norms(x, x_adv, self.norm)
        self.device = norms.device
        self.parts.append(tuple(t.to("cpu", non_blocking=True) for t in (norms, ok_clean & ~ok_adv, ok_clean)))
        return norms

    def compute(self) -> dict[str, float]:
        dist.synchronize(self.device)  # the queued host copies are complete only now
        if self.parts:
            norms, fooled, ok = (torch.cat(t) for t in zip(*self.parts))
        else:
            norms, fooled, ok = torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)
        sizes = norms[fooled].numpy()
        n_correct = int(ok.sum())
        rate = len(sizes) / n_correct if n_correct else math.nan
        if not len(sizes):
            return {"success_rate": rate, "pert_median": math.nan, "pert_p90": math.nan}
        return {"success_rate": rate, "pert_median": float(np.median(sizes)),
                "pert_p90": float(np.percentile(sizes, 90))}


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
    bn: BatchNormStreams | None = None  # BatchNorm input moments, taken in the hooked passes

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
    outcomes: dict[int, torch.Tensor] = field(default_factory=dict)
    bn: BatchNormMoments | None = None


class Battery:
    """Runs every configuration on one batch at a time (:meth:`step`) and adds up what it measured."""

    def __init__(self, setup: Setup, probe: LayerProbe, *, keep_outcomes: int = 0, log: SampleLog | None = None,
                 keep_rows: bool = False, bar=None) -> None:
        self.s, self.probe, self.log, self.bar = setup, probe, log, bar
        self.keep_outcomes, self.keep_rows = keep_outcomes, keep_rows
        n, dev = len(setup.specs), setup.device
        self.stats: dict[tuple[str, int], RelativeError] = {}
        self.output_hits: dict[str, torch.Tensor] = {}  # layer -> batches where its clean output is the logits
        self.counts = torch.zeros(1 + n + len(setup.worst_keys), dtype=torch.float64, device=dev)
        self.seconds = [0.0] * n  # time spent generating each configuration's perturbed inputs
        self.sizes = [PerturbationSizes(s.norm) for s in setup.specs]
        self.kept: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(n)}  # config -> batch -> outcomes
        self.rows: dict[int, tuple] = {}  # batch -> samples.csv columns (host copies), with keep_rows
        self.batches: list[int] = []

    # -- one batch ----------------------------------------------------------------------------
    def step(self, b: int, start: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Global batch ``b`` (samples ``start``...): the clean pass, then every configuration."""
        logits, clean, clean_sq = self._clean_pass(start, x)
        ok_clean = logits.argmax(1) == y
        self.counts[0] += ok_clean.sum()
        robust = {k: ok_clean.clone() for k in self.s.worst_keys}
        bad = torch.zeros(len(self.s.specs), dtype=torch.bool, device=x.device)
        oks, perts = [], []
        for i, spec in enumerate(self.s.specs):
            ok, norms = self._configuration(b, i, start, x, y, clean, clean_sq, ok_clean, bad)
            oks.append(ok)
            perts.append(norms)
            if spec.kind == "adversarial" and spec.bounded:
                robust[(spec.norm, spec.eps)] &= ok
            if self.bar is not None:
                self.bar.update(len(x))
        if bad.any():  # one host sync per batch for every configuration's finiteness check
            spec = self.s.specs[int(bad.nonzero()[0])]
            raise NonFiniteError(f"{spec.label} produced non-finite inputs: the model's gradients may be "
                                 "non-finite; check the weights")
        base = 1 + len(self.s.specs)
        for j, k in enumerate(self.s.worst_keys):
            self.counts[base + j] += robust[k].sum()
        self._record(b, start, y, logits.argmax(1), oks, perts, [robust[k] for k in self.s.worst_keys])
        self.batches.append(b)

    def _clean_pass(self, start: int, x: torch.Tensor):
        """The hooked clean forward, reused by every configuration: logits, outputs and their squared norms."""
        with torch.no_grad(), self._bn(0):
            logits, outs = self.probe.run(self.s.full, x)
        if not torch.isfinite(logits).all():
            raise NonFiniteError(f"the model returns non-finite outputs on clean samples {start}..{start + len(x) - 1}")
        clean = dict(outs)
        for name, t in clean.items():
            if t.shape == logits.shape:  # counted on the device: the output layer, found without a host sync
                hits = self.output_hits.setdefault(name, torch.zeros((), dtype=torch.float64, device=x.device))
                hits += (t == logits.detach()).all()
        # every layer's squared norms squared in one operation (bit for bit per_sample_sq_norms of each)
        sq = squared(torch.stack([per_sample_norms(t) for t in clean.values()])) if clean else None
        return logits, clean, {name: sq[j] for j, name in enumerate(clean)}

    def _configuration(self, b: int, i: int, start: int, x, y, clean, clean_sq, ok_clean, bad):
        """Configuration ``i`` on batch ``b``: the perturbed inputs, their hooked pass, outcomes and sizes."""
        attack_fn = self.s.builders[i]
        atk.reseed(attack_fn, atk.batch_seed(self.s.seed, b, i))
        tic = time.perf_counter()
        with self.probe.paused():  # no hook overhead inside the attack's own forward passes
            try:
                x_adv = attack_fn(x, y).detach()
            finally:
                self.s.restore_eval()
        self.seconds[i] += time.perf_counter() - tic
        bad[i] = ~torch.isfinite(x_adv).all()
        ok = self._perturbed_pass(i, x_adv, clean, clean_sq).argmax(1) == y
        self.counts[1 + i] += ok.sum()
        if start < self.keep_outcomes:
            self.kept[i][b] = ok[:self.keep_outcomes - start].to("cpu", non_blocking=True)
        return ok, self.sizes[i].update(x, x_adv, ok_clean, ok)

    def _perturbed_pass(self, i: int, x_adv: torch.Tensor, clean, clean_sq) -> torch.Tensor:
        """The hooked forward of the perturbed batch; every layer's RE updates as the layer runs."""
        seen: dict[str, torch.Tensor] = {}  # each layer's perturbation norms, as it runs
        observe = functools.partial(self._observe, clean, seen)
        with torch.no_grad(), self._bn(1 + i if self.s.specs[i].kind == "adversarial" else None):
            if not self.s.streaming:  # a fixed-batch archive's chunks are joined by the probe: read them after
                logits, outs = self.probe.run(self.s.full, x_adv)
                for name, t in outs.items():
                    observe(name, t)
            else:
                self.probe.transform, self.probe.record = (lambda layer, t: observe(layer.name, t)), False
                try:
                    logits = self.probe.run(self.s.full, x_adv)[0]
                finally:
                    self.probe.transform, self.probe.record = None, True
            if seen:  # every layer's sums in one set of operations: the same as one update per layer
                rows = RelativeError.increments(torch.stack([clean_sq[n] for n in seen]),
                                                squared(torch.stack(list(seen.values()))))
                for name, row in zip(seen, rows):
                    st = self.stats.get((name, i))
                    if st is None:
                        st = self.stats[(name, i)] = RelativeError(device=row.device)
                    st.add(row)
        return logits

    def _bn(self, domain: int | None):
        """Record the BatchNorm inputs of this pass into ``domain`` (adversarial configurations and the clean
        pass: what the audit ranks by), or nothing."""
        if self.s.bn is None or not self.s.bn.layers or domain is None:
            return contextlib.nullcontext()
        return self.s.bn.recording(domain)

    @staticmethod
    def _observe(clean, seen: dict, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in clean:
            raise RobauditError(f"layer {name} ran on the perturbed input but not on the clean one: "
                                "the model's control flow depends on its input; restrict --layers")
        if clean[name].shape != t.shape:
            raise RobauditError(f"layer output shapes differ between clean {tuple(clean[name].shape)} and "
                                f"perturbed {tuple(t.shape)} inputs")
        seen[name] = per_sample_norms(t - clean[name])  # squared with the other layers' after the pass
        return t

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
        return {"layers": layers, "re_keys": list(self.stats), "out_keys": list(self.output_hits),
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
        flat = torch.cat([*(self.stats[k].state if k in self.stats else zeros for k in re_keys),
                          torch.stack([self.output_hits.get(k, one) for k in out_keys]) if out_keys else zeros[:0],
                          self.counts, torch.tensor(self.seconds, dtype=torch.float64, device=self.s.device), bn])
        flat = dist.all_reduce_sum(flat).cpu()  # the one read back of the device statistics
        bn_sums, values = flat[len(flat) - len(bn):], flat[:len(flat) - len(bn)].tolist()
        re = {k: RelativeError.summarize(values[j * width:(j + 1) * width]) for j, k in enumerate(re_keys)}
        pos = len(re_keys) * width
        hits, pos = values[pos:pos + len(out_keys)], pos + len(out_keys)
        n = len(self.s.specs)
        counts, seconds = values[pos:pos + len(self.counts)], values[pos + len(self.counts):]
        correct = [int(round(c)) for c in counts]
        return Totals(layers=layers, re=re, output_layers={k for k, h in zip(out_keys, hits) if h > 0},
                      correct=correct[:1 + n], worst=correct[1 + n:], seconds=seconds,
                      sizes=[self._sizes(i, payloads).compute() for i in range(n)],
                      outcomes={i: t for i in range(n) if (t := _in_order([p["kept"][i] for p in payloads])) is not None},
                      bn=self.s.bn.moments(bn_sums.view_as(self.s.bn.sums)) if self.s.bn is not None else None)

    def _sizes(self, i: int, payloads: list[dict]) -> PerturbationSizes:
        """Configuration ``i``'s perturbation sizes with every process's batches, in data-set order."""
        merged = PerturbationSizes(self.s.specs[i].norm)
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
