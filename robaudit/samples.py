"""``samples.csv``: one row per sample, streamed batch by batch, never holding past batches.

Per sample: its index in the data set, label, clean prediction; per attack configuration whether it
stayed correct and the norm of its perturbation (in the attack's own norm); per eps whether it survived
every bounded adversarial attack (the worst case). :func:`most_fragile` ranks the samples the report links.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .labels import format_eps


def config_key(label: str, eps: float | None) -> str:
    """A configuration's column prefix: ``pgd@0.1``, or the bare label for attacks without eps."""
    return label if eps is None else f"{label}@{format_eps(eps)}"


def worst_key(norm: str, eps: float) -> str:
    """The worst case's column prefix at ``eps``: ``worst-case@0.1``, with the norm when it is not Linf."""
    return f"worst-case@{format_eps(eps)}" + ("" if norm == "Linf" else f"({norm})")


def outcome_column(attack: str, eps: float | None, norm: str | None) -> str:
    """The column of ``samples.csv`` holding each sample's outcome under a row of ``accuracy.csv`` (``clean``, an
    attack configuration, or the worst case at ``eps``): 1 where the sample stayed correct."""
    eps = None if eps is None or eps != eps else float(eps)  # NaN: a row without eps
    if attack == "clean":
        return "clean_correct"
    if attack == "worst-case" and eps is not None:
        return f"{worst_key(norm or 'Linf', eps)}:robust"
    return f"{config_key(attack, eps)}:correct"


class SampleLog:
    """Writes ``samples.csv`` row by row; the columns are fixed by the battery when it is opened."""

    def __init__(self, path: str | Path, configs: Sequence[tuple[str, float | None]],
                 worst: Sequence[tuple[str, float]]) -> None:
        self.path = Path(path)
        self.keys = [config_key(label, eps) for label, eps in configs]
        self.worst = [worst_key(norm, eps) for norm, eps in worst]
        self.columns = ["index", "label", "clean_pred", "clean_correct"]
        for k in self.keys:
            self.columns += [f"{k}:correct", f"{k}:pert"]
        self.columns += [f"{w}:robust" for w in self.worst]
        self._fh = open(self.path, "w", newline="")
        self._csv = csv.writer(self._fh)
        self._csv.writerow(self.columns)

    def write(self, index: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, correct: Sequence[torch.Tensor],
              pert: Sequence[torch.Tensor], robust: Sequence[torch.Tensor]) -> None:
        """One batch: ``correct``/``pert`` per configuration, ``robust`` per worst-case eps (same order)."""
        cols = [index, y, pred, pred == y, *[t for pair in zip(correct, pert) for t in pair], *robust]
        cols = [c.detach().cpu().tolist() for c in cols]
        for row in zip(*cols):
            self._csv.writerow([_cell(v) for v in row])

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SampleLog":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is not None:  # a failed analysis leaves no half-written table behind
            self.path.unlink(missing_ok=True)


def _cell(v) -> object:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def perturbation_norms(x: torch.Tensor, adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample size of ``adv - x`` in ``norm`` (``Linf`` or ``L2``), in float64."""
    delta = (adv - x).detach().flatten(1).double()
    return torch.linalg.vector_norm(delta, ord=math.inf if norm == "Linf" else 2, dim=1)


def most_fragile(samples: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The clean-correct samples fooled by the most configurations (ties: data-set order), with their names."""
    correct_cols = [c for c in samples.columns if c.endswith(":correct")]
    if samples.empty or not correct_cols:
        return samples.head(0).assign(fooled_by=[], fooled_configs=[])
    ok = samples[samples["clean_correct"] == 1].copy()
    fooled = ok[correct_cols] == 0
    ok["fooled_by"] = fooled.sum(axis=1)
    names = [c[: -len(":correct")] for c in correct_cols]
    ok["fooled_configs"] = [", ".join(n for n, f in zip(names, row) if f) for row in fooled.to_numpy()]
    ok = ok[ok["fooled_by"] > 0]
    return ok.sort_values(["fooled_by", "index"], ascending=[False, True]).head(k)
