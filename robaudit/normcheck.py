"""Whether the input normalization fits the model: a model at chance under it, and far above without it.

A data set's usual mean/std (MNIST, CIFAR) is applied by default; a model trained on [0, 1] inputs then sits
at chance and every number of the audit is meaningless. The battery's first batch (its clean logits are
computed anyway) is judged: only when it is at chance are the other normalizations tried, one forward pass
each, and the run stops in one line that names the option to change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .errors import RobauditError
from .models import with_normalization

Stats = tuple[tuple[float, ...], tuple[float, ...]] | None  # (mean, std), or None: inputs in [0, 1] as they are


def at_chance(correct: int, n: int, num_classes: int) -> bool:
    """Whether ``correct`` of ``n`` is no better than guessing among ``num_classes``: within three standard
    errors (or five points of the way to perfect) above 1/classes."""
    p = 1.0 / num_classes
    return correct / n <= p + max(0.05 * (1 - p), 3 * math.sqrt(p * (1 - p) / n))


def far_above_chance(correct: int, n: int, num_classes: int) -> bool:
    """Whether ``correct`` of ``n`` is clearly a working classifier: a quarter of the way from chance to perfect,
    and not within the noise of chance."""
    p = 1.0 / num_classes
    return correct / n >= p + 0.25 * (1 - p) and not at_chance(correct, n, num_classes)


def describe(stats: Stats) -> str:
    """A normalization as the messages and the summary name it."""
    if stats is None:
        return "none (inputs in [0, 1])"
    mean, std = stats
    return f"mean {_values(mean)} std {_values(std)}"


def _values(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _stats(mean, std) -> Stats:
    return None if mean is None else (tuple(float(v) for v in mean), tuple(float(v) for v in std))


@dataclass
class NormalizationCheck:
    """The normalization the analysis applies and the ones to try when the first batch is at chance: none, and
    the data set's usual one (``usual``, when it has one and another is applied)."""

    applied: Stats
    usual: Stats
    num_classes: int

    @classmethod
    def of(cls, *, mean, std, data_mean, data_std, num_classes: int) -> "NormalizationCheck":
        return cls(_stats(mean, std), _stats(data_mean, data_std), int(num_classes))

    def alternatives(self) -> list[Stats]:
        """The normalizations to try: none (if one is applied), then the data set's usual one (if another)."""
        out = [None] if self.applied is not None else []
        if self.usual is not None and self.usual != self.applied:
            out.append(self.usual)
        return out

    def __call__(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        """Judge the first batch: ``logits`` are ``module``'s (the user's model without normalization) on ``x``
        under the applied normalization. Stop in one line when they are at chance and another is far above."""
        n = len(y)
        correct = int((logits.argmax(1) == y).sum())
        if n == 0 or self.num_classes < 2 or not at_chance(correct, n, self.num_classes):
            return
        for other in self.alternatives():
            wrapped = with_normalization(module, *(other or (None, None)), ndim=x.dim())
            with torch.no_grad():
                hits = int((wrapped.to(x.device).eval()(x).argmax(1) == y).sum())
            if far_above_chance(hits, n, self.num_classes):
                raise RobauditError(self._message(correct / n, other, hits / n))

    def _message(self, acc: float, other: Stats, other_acc: float) -> str:
        """The one line that says which normalization works and which option gives it."""
        applied = ("without input normalization" if self.applied is None
                   else f"with the input normalization {describe(self.applied)}")
        if other is None:
            works = "without it: the model takes inputs in [0, 1]"
            fix = "rerun with --no-normalize" if self.applied == self.usual else "rerun without --mean/--std"
        else:
            works = f"with the data set's usual normalization {describe(other)}"
            fix = ("rerun without --no-normalize (or give the model's own --mean/--std)" if self.applied is None
                   else "rerun without --mean/--std")
        return (f"the model classifies the first batch no better than chance ({100 * acc:.0f} %) {applied}, "
                f"but {100 * other_acc:.0f} % {works}; {fix}")
