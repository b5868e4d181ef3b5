"""Relative error (RE), the measure of the whole toolbox: ``||phi(x') - phi(x)|| / ||phi(x)||``.

One zero policy everywhere: where the clean activation is all zero, RE is undefined and is NaN
(never inf, never 0); means over samples leave such samples out.
"""
from __future__ import annotations

import math

import torch

from .errors import RobauditError

REDUCTIONS = ("none", "per-sample", "pooled")
# The name under which the analysis keeps the RE of the model's input itself, ||x' - x|| / ||x|| (no module
# or op layer can be named so): the first probed layer's re_gain is read against it.
INPUT_LAYER = "(input)"


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, NaN elsewhere; differentiable with finite gradients everywhere."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def relative_error(clean: torch.Tensor, perturbed: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Differentiable RE of one batch of one layer's outputs (the first dimension is the batch).

    ``none``: one RE per sample. ``per-sample``: their mean over the samples whose RE is defined.
    ``pooled``: ``||Phi' - Phi||_F / ||Phi||_F`` over the whole batch (the LSA reference code's measure).
    NaN where undefined (an all-zero clean activation; for a mean, no defined sample).
    """
    c, d = clean.flatten(1), (perturbed - clean).flatten(1)
    if reduction == "pooled":
        return ratio(torch.linalg.vector_norm(d), torch.linalg.vector_norm(c))
    re = ratio(torch.linalg.vector_norm(d, dim=1), torch.linalg.vector_norm(c, dim=1))
    if reduction == "none":
        return re
    if reduction == "per-sample":
        ok = ~torch.isnan(re)
        return ratio(torch.where(ok, re, torch.zeros_like(re)).sum(), ok.sum().to(re.dtype))
    raise RobauditError(f"unknown RE mode {reduction!r}: use pooled or per-sample")


def layer_gains(re_means, input_re: float) -> list[float]:
    """``re_gain`` of a chain of layers in forward order: each layer's ``re_mean`` over the one before it (the
    first over ``input_re``), a ratio of means; NaN where either is undefined or the one before is zero."""
    gains, prev = [], float(input_re)
    for value in re_means:
        value = float(value)
        ok = math.isfinite(value) and math.isfinite(prev) and prev > 0
        gains.append(value / prev if ok else math.nan)
        prev = value
    return gains


def per_sample_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each sample's activation: the norm in the tensor's dtype (fast), squared in float64."""
    return squared(torch.linalg.vector_norm(t.detach().flatten(1), dim=1))


def squared(norms: torch.Tensor) -> torch.Tensor:
    """Norms squared in float64, the precision every sum of :class:`RelativeError` is kept in."""
    return norms.double().pow(2)


class RelativeError:
    """Streaming per-layer relative error, in the style of a torchmetrics ``Metric``.

    ``update(clean, perturbed)`` takes one batch of one layer's outputs; ``compute()`` returns
    ``re_mean``, ``re_std`` (population std over samples), ``re_pooled`` and counts. Samples whose
    clean activation is exactly zero have no relative error: they are left out of the per-sample
    statistics (counted in ``n_undefined``) but still enter the pooled ratio.

    The sums live in one float64 tensor (:attr:`state`, fields :attr:`FIELDS`) on the device of the
    activations, updated without reading anything back to the host; ``compute()`` reads it once. Two
    instances' states add (:meth:`merge`), which is what summing over processes does.
    """

    FIELDS = ("sum_re", "sum_re2", "n", "n_undefined", "sum_delta2", "sum_clean2")

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.state = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=self.device)

    def update(self, clean: torch.Tensor, perturbed: torch.Tensor, *, clean_sq: torch.Tensor | None = None) -> None:
        if clean.shape != perturbed.shape:
            raise RobauditError(f"layer output shapes differ between clean {tuple(clean.shape)} and "
                                f"perturbed {tuple(perturbed.shape)} inputs")
        c2 = per_sample_sq_norms(clean) if clean_sq is None else clean_sq
        d2 = per_sample_sq_norms(perturbed.detach() - clean.detach())
        self.add(self.increments(c2[None], d2[None])[0])

    def add(self, increment: torch.Tensor) -> None:
        """Add one batch's sums (a row of :meth:`increments`) to the state."""
        if self.state.device != increment.device:  # follows the activations (before the first update only)
            self.state = self.state.to(increment.device)
        self.state += increment

    @classmethod
    def increments(cls, clean_sq: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """One batch's sums for many layers at once: ``clean_sq`` and ``delta_sq`` are ``layers x samples``
        squared norms (float64); row ``l`` of the result is what :meth:`update` adds for layer ``l``."""
        re2 = ratio(delta_sq, clean_sq)
        defined = ~torch.isnan(re2)
        re2 = torch.where(defined, re2, torch.zeros_like(re2))
        n = defined.sum(dim=1, dtype=torch.float64)
        return torch.stack([re2.sqrt().sum(dim=1), re2.sum(dim=1), n, delta_sq.shape[1] - n, delta_sq.sum(dim=1),
                            clean_sq.sum(dim=1)], dim=1)

    def merge(self, other: "RelativeError") -> "RelativeError":
        """Add ``other``'s sums to this one's: the statistics of both streams together."""
        self.state += other.state.to(self.state.device)
        return self

    def compute(self) -> dict[str, float]:
        return self.summarize(self.state.tolist())

    @classmethod
    def summarize(cls, values) -> dict[str, float]:
        """The statistics of a state read back to the host (one row of :attr:`state` values)."""
        s = dict(zip(cls.FIELDS, (float(v) for v in values)))
        n = int(round(s["n"]))
        mean = s["sum_re"] / n if n else math.nan
        var = max(s["sum_re2"] / n - mean * mean, 0.0) if n else math.nan
        pooled = math.sqrt(s["sum_delta2"]) / math.sqrt(s["sum_clean2"]) if s["sum_clean2"] > 0 else math.nan
        return {"re_mean": mean, "re_std": math.sqrt(var) if n else math.nan, "re_pooled": pooled,
                "n_samples": n, "n_undefined": int(round(s["n_undefined"]))}
