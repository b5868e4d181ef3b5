"""95 % confidence intervals for accuracies: every accuracy robaudit reports is a share of a finite sample.

Wilson score intervals: closed form (no iteration, so thousands of per-class rows cost nothing), never outside
[0, 1], and with coverage close to the nominal 95 % even at accuracies near 0 or 1, where the normal
approximation fails. An accuracy of ``k`` correct out of ``n`` samples has the interval

    (k/n + z²/2n ± z·sqrt(k/n·(1 - k/n)/n + z²/4n²)) / (1 + z²/n),  z = 1.95996 (the normal 97.5 % quantile).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["CI_COLUMNS", "LEVEL", "Z", "format_interval", "wilson", "wilson_arrays", "with_intervals"]

LEVEL = 0.95
Z = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval
CI_COLUMNS = ("ci_low", "ci_high")


def wilson_arrays(correct, n) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson 95 % interval of ``correct`` out of ``n`` samples, element-wise (NaN where ``n`` is missing or
    not positive)."""
    k = np.asarray(correct, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(k) & np.isfinite(n) & (n > 0)
        n_ = np.where(ok, n, 1.0)
        p = np.where(ok, k, 0.0) / n_
        z2 = Z * Z
        denom = 1.0 + z2 / n_
        center = (p + z2 / (2.0 * n_)) / denom
        half = Z / denom * np.sqrt(np.maximum(p * (1.0 - p) / n_ + z2 / (4.0 * n_ * n_), 0.0))
        # at k = 0 or k = n one end is exactly 0 or 1: no rounding error left there
        low = np.where(ok, np.where(p <= 0.0, 0.0, np.clip(center - half, 0.0, 1.0)), np.nan)
        high = np.where(ok, np.where(p >= 1.0, 1.0, np.clip(center + half, 0.0, 1.0)), np.nan)
    return low, high


def wilson(correct: int, n: int) -> tuple[float, float]:
    """The Wilson 95 % interval of ``correct`` out of ``n`` samples (NaN, NaN for no samples)."""
    low, high = wilson_arrays([correct], [n])
    return float(low[0]), float(high[0])


def with_intervals(frame: pd.DataFrame, *, accuracy: str = "accuracy", n: str = "n_samples") -> pd.DataFrame:
    """``frame`` with ``ci_low``/``ci_high`` for each row's ``accuracy`` of ``n`` samples, filled where missing
    (the counts are the accuracies times ``n``, rounded: robaudit's accuracies are counts over ``n``). A row
    without ``n`` keeps a missing interval."""
    out = frame.copy()
    acc = pd.to_numeric(out[accuracy], errors="coerce").to_numpy(dtype=float)
    size = (pd.to_numeric(out[n], errors="coerce").to_numpy(dtype=float) if n in out.columns
            else np.full(len(out), np.nan))
    low, high = wilson_arrays(np.round(acc * size), size)
    for col, values in zip(CI_COLUMNS, (low, high)):
        if col in out.columns:
            have = pd.to_numeric(out[col], errors="coerce")
            out[col] = have.where(have.notna(), values).astype(float)
        else:
            out[col] = values
    return out


def format_interval(low, high, *, unit: str = "%") -> str:
    """An interval in percent with one decimal, ``41.2-48.9%``; empty when either end is missing."""
    try:
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        return ""
    if not (math.isfinite(low) and math.isfinite(high)):
        return ""
    return f"{100 * low:.1f}-{100 * high:.1f}{unit}"
