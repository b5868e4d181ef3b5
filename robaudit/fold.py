"""Samples folded into the batch dimension (Swin's windows: B*nW rows; MobileViT's patches: B*P rows).

A layer whose first dimension holds ``P`` rows per sample, batch-major (sample ``i``'s rows are ``[i*P, (i+1)*P)``),
is read per sample as ``(n, P, ...)``. That layout is proven, never assumed from a shape: :class:`FoldProof` runs the
model on ``k`` samples, then once per altered sample with that sample alone changed, and :func:`judge` accepts a
layer only if each change moved rows of that sample's block and no row outside it. A layout that folds samples
sample-minor (``P`` outer, the batch inner) changes rows spread over the whole tensor and fails.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

PROOF_SAMPLES = 3  # samples of a proof pass (a fixed-batch archive runs its own batch size)
DIRECTIONS = 4  # random directions each row is projected on: a change of the row moves a projection or its norm
PROOF_SEED = 0


def altered_samples(k: int) -> list[int]:
    """The samples the proof changes one at a time: the first, the middle and the last of ``k``."""
    return list(dict.fromkeys([0, k // 2, k - 1]))


def proof_batches(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The proof's inputs: ``k`` samples of ``x`` (cycled when it has fewer), then that batch with each of
    :func:`altered_samples` alone changed by Gaussian noise of the batch's scale (a seeded generator of its own)."""
    base = x.detach()[torch.arange(k, device=x.device) % x.shape[0]]
    scale = float(base.float().std()) if base.numel() > 1 else 0.0
    gen = torch.Generator().manual_seed(PROOF_SEED)
    out = [base]
    for j in altered_samples(k):
        noise = torch.randn(base[j].shape, generator=gen).to(base.device, base.dtype)
        changed = base.clone()
        changed[j] = base[j] + noise * (scale if scale > 0 else 1.0)
        out.append(changed)
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block (no dropout draw, no batch statistics), then as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def row_prints(t: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Per row of ``t`` (dim 0), in float64: its norm, then its projections on ``directions`` (row size x m).
    Rows computed from the same values are equal bit for bit; a changed row moves its norm or a projection."""
    flat = t.detach().reshape(t.shape[0], -1).double()
    return torch.cat([torch.linalg.vector_norm(flat, dim=1, keepdim=True), flat @ directions], 1)


def changed_rows(base: torch.Tensor, other: torch.Tensor, rtol: float) -> torch.Tensor:
    """Which rows' prints differ by more than ``rtol`` of the row's norm (rounding noise of another kernel stays
    below it)."""
    scale = torch.maximum(base[:, :1], other[:, :1])
    return ((other - base).abs() > rtol * scale).any(1)


def judge(prints: list[torch.Tensor], k: int, rtol: float) -> int | str:
    """Rows per sample of a layer whose proof passes gave ``prints`` (the base pass, then one per altered sample),
    or why its rows are not blocks of ``P`` rows per sample, batch-major."""
    base = prints[0]
    rows = base.shape[0]
    if len(prints) != 1 + len(altered_samples(k)) or any(p.shape != base.shape for p in prints):
        return "its rows change in number with the input's values"
    per = rows // k
    for j, other in zip(altered_samples(k), prints[1:]):
        changed = changed_rows(base, other, rtol)
        lo, hi = j * per, (j + 1) * per
        outside = torch.cat([changed[:lo], changed[hi:]]).nonzero()
        if len(outside):
            row = int(outside[0]) + (0 if int(outside[0]) < lo else per)
            return (f"in a pass of {k} samples, changing sample {j} alone changed row {row}, outside its rows "
                    f"{lo}..{hi - 1}, so its rows are not {per} per sample in sample order")
        if not changed[lo:hi].any():
            return (f"in a pass of {k} samples, changing sample {j} alone changed none of its rows {lo}..{hi - 1}, "
                    "so which rows are whose cannot be shown")
    return per


class FoldProof:
    """What the proof passes of ``k`` samples saw: per layer key (named as the probe names calls), the row prints of
    each pass, for outputs whose rows are a multiple of ``k`` above it."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls: dict[str, int] = {}
        self.prints: dict[str, list[torch.Tensor]] = {}
        self.directions: dict[str, torch.Tensor] = {}
        self.rtol: dict[str, float] = {}

    def start_pass(self) -> None:
        self.calls.clear()

    def see(self, name: str, t: torch.Tensor) -> None:
        """One call of layer ``name`` in the pass now running: its row prints, when its rows may be folded."""
        call = self.calls.get(name, 0) + 1
        self.calls[name] = call
        key = name if call == 1 else f"{name}#{call}"
        if t.dim() == 0 or t.shape[0] <= self.k or t.shape[0] % self.k or not t.numel():
            return
        size = t[0].numel()
        dirs = self.directions.get(key)
        if dirs is None or dirs.shape[0] != size:
            gen = torch.Generator().manual_seed(PROOF_SEED)
            dirs = self.directions[key] = torch.randn(size, DIRECTIONS, generator=gen, dtype=torch.float64).to(t.device)
            eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
            self.rtol[key] = max(1e-5, 64 * eps)
        self.prints.setdefault(key, []).append(row_prints(t, dirs))

    def verdicts(self) -> dict[str, int | str]:
        """Per layer key seen with folded-looking rows: its rows per sample, or why they are not read per sample."""
        return {key: judge(prints, self.k, self.rtol[key]) for key, prints in self.prints.items()}
