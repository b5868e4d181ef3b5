"""Relative error (RE), the measure of the whole toolbox: ``||phi(x') - phi(x)|| / ||phi(x)||``.

One zero policy everywhere: where the clean activation is all zero, RE is undefined and is NaN
(never inf, never 0); means over samples leave such samples out.
"""
from __future__ import annotations

import math

import torch

from .errors import RobauditError

REDUCTIONS = ("none", "per-sample", "pooled")


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


def per_sample_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each sample's activation: the norm in the tensor's dtype (fast), summed in float64."""
    return torch.linalg.vector_norm(t.detach().flatten(1), dim=1).double().pow(2)


class RelativeError:
    """Streaming per-layer relative error, in the style of a torchmetrics ``Metric``.

    ``update(clean, perturbed)`` takes one batch of one layer's outputs; ``compute()`` returns
    ``re_mean``, ``re_std`` (population std over samples), ``re_pooled`` and counts. Samples whose
    clean activation is exactly zero have no relative error: they are left out of the per-sample
    statistics (counted in ``n_undefined``) but still enter the pooled ratio. Sums are float64.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum_re = 0.0
        self.sum_re2 = 0.0
        self.n = 0
        self.n_undefined = 0
        self.sum_delta2 = 0.0
        self.sum_clean2 = 0.0

    def update(self, clean: torch.Tensor, perturbed: torch.Tensor, *, clean_sq: torch.Tensor | None = None) -> None:
        if clean.shape != perturbed.shape:
            raise RobauditError(f"layer output shapes differ between clean {tuple(clean.shape)} and "
                                f"perturbed {tuple(perturbed.shape)} inputs")
        c2 = per_sample_sq_norms(clean) if clean_sq is None else clean_sq
        d2 = per_sample_sq_norms(perturbed.detach() - clean.detach())
        re2 = ratio(d2, c2)
        defined = ~torch.isnan(re2)
        re = torch.sqrt(re2[defined])
        self.sum_re += float(re.sum())
        self.sum_re2 += float(re.pow(2).sum())
        self.n += int(defined.sum())
        self.n_undefined += int((~defined).sum())
        self.sum_delta2 += float(d2.sum())
        self.sum_clean2 += float(c2.sum())

    def compute(self) -> dict[str, float]:
        mean = self.sum_re / self.n if self.n else math.nan
        var = max(self.sum_re2 / self.n - mean * mean, 0.0) if self.n else math.nan
        pooled = math.sqrt(self.sum_delta2) / math.sqrt(self.sum_clean2) if self.sum_clean2 > 0 else math.nan
        return {"re_mean": mean, "re_std": math.sqrt(var) if self.n else math.nan, "re_pooled": pooled,
                "n_samples": self.n, "n_undefined": self.n_undefined}
