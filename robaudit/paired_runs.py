"""Two runs' accuracies tested sample by sample: is a difference more than the noise of a finite sample?

Two audits of the same samples (same ``index`` and ``label`` in both ``samples.csv``, in the same order) are
compared per accuracy row on the samples where their outcomes disagree, by the two-sided exact McNemar test
(:func:`robaudit.significance.mcnemar`); a difference with p >= :data:`~robaudit.significance.NOISE_ALPHA` is
within noise. Runs of different samples are not paired: no test is made, and one line says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .samples import outcome_column
from .significance import NOISE_ALPHA, mcnemar

__all__ = ["PAIRED_COLUMNS", "Pairing", "pair_samples", "paired_tests"]

PAIRED_COLUMNS = ["a_only", "b_only", "p", "within_noise"]


@dataclass(frozen=True)
class Pairing:
    """The per-sample outcomes of two runs (``None`` where they cannot be paired) and, when unpaired, why."""

    a: pd.DataFrame | None
    b: pd.DataFrame | None
    unpaired: str | None = None

    @property
    def paired(self) -> bool:
        return self.unpaired is None


def pair_samples(samples_a: pd.DataFrame | None, samples_b: pd.DataFrame | None) -> Pairing:
    """Pair two runs' ``samples.csv`` tables: both present, the same number of rows, and the same ``index`` and
    ``label`` in every row; otherwise a :class:`Pairing` that says why the differences are unpaired."""
    missing = [name for name, s in (("A", samples_a), ("B", samples_b)) if s is None]
    if missing:
        return Pairing(None, None, f"run {' and '.join(missing)} has no samples.csv, so the differences are "
                                   "unpaired and no test is made")
    if len(samples_a) != len(samples_b):
        return Pairing(None, None, f"the runs audited different samples ({len(samples_a)} against {len(samples_b)}), "
                                   "so the differences are unpaired and no test is made")
    for col in ("index", "label"):
        same = np.array_equal(samples_a[col].to_numpy(dtype=np.int64), samples_b[col].to_numpy(dtype=np.int64))
        if not same:
            return Pairing(None, None, f"the runs audited different samples (their samples.csv differ in {col}), "
                                       "so the differences are unpaired and no test is made")
    return Pairing(samples_a, samples_b)


def _outcomes(samples: pd.DataFrame, attack: str, eps, norm) -> np.ndarray | None:
    """One accuracy row's per-sample outcome as floats (1 correct, 0 wrong, NaN unknown), or None if unrecorded."""
    col = outcome_column(attack, None if eps is None or (isinstance(eps, float) and math.isnan(eps)) else eps, norm)
    if col not in samples.columns:
        return None
    return pd.to_numeric(samples[col], errors="coerce").astype(float).to_numpy()


def paired_tests(accuracy: pd.DataFrame, pairing: Pairing) -> pd.DataFrame:
    """``accuracy`` (rows attack, eps, norm of a comparison) with, per row both runs recorded sample by sample:
    ``a_only`` (samples right in A, wrong in B), ``b_only`` (the reverse), the exact McNemar ``p`` and
    ``within_noise`` (p >= NOISE_ALPHA); missing where no test is made."""
    out = accuracy.copy()
    values: dict[str, list] = {c: [] for c in PAIRED_COLUMNS}
    for r in accuracy.itertuples(index=False):
        oa = _outcomes(pairing.a, r.attack, r.eps, r.norm) if pairing.paired else None
        ob = _outcomes(pairing.b, r.attack, r.eps, r.norm) if pairing.paired else None
        if oa is None or ob is None:
            for c in PAIRED_COLUMNS:
                values[c].append(None)
            continue
        known = ~(np.isnan(oa) | np.isnan(ob))
        a_only = int(np.sum((oa == 1) & (ob == 0) & known))
        b_only = int(np.sum((oa == 0) & (ob == 1) & known))
        p = mcnemar(a_only, b_only)
        for c, v in zip(PAIRED_COLUMNS, (a_only, b_only, p, p >= NOISE_ALPHA)):
            values[c].append(v)
    for c in PAIRED_COLUMNS:
        out[c] = pd.Series(values[c], index=out.index, dtype=object)
    return out
