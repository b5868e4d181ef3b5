"""``classes.csv``: accuracy per class, clean and worst case per eps, each with its 95 % interval.

A model robust on average can be fragile on one class; the per-sample outcomes of ``samples.csv`` say which.
Classes are named by their label (the index the model predicts); rows are long, one per class and accuracy
row of ``accuracy.csv`` (clean, then the worst case at each eps), with the columns of :data:`CLASS_COLUMNS`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .intervals import wilson_arrays
from .labels import CLEAN, WORST_CASE
from .samples import outcome_column

__all__ = ["CLASS_COLUMNS", "class_accuracy", "class_table", "per_class_rows", "weakest_class"]

CLASS_COLUMNS = ["label", "n_samples", "attack", "eps", "norm", "accuracy", "ci_low", "ci_high"]
CHUNK_ROWS = 200_000  # samples.csv is read this many rows at a time: a large audit never sits in memory whole


def per_class_rows(accuracy: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``accuracy.csv`` that ``classes.csv`` breaks down by class: clean and the worst case per eps."""
    keep = (accuracy["attack"] == CLEAN) | ((accuracy["attack"] == WORST_CASE) & accuracy["eps"].notna())
    return accuracy[keep]


def _columns(accuracy: pd.DataFrame) -> list[tuple[str, float | None, str, str]]:
    """(attack, eps, norm, samples.csv column) of each row broken down by class."""
    out = []
    for r in per_class_rows(accuracy).itertuples(index=False):
        eps = None if r.eps is None or (isinstance(r.eps, float) and math.isnan(r.eps)) else float(r.eps)
        norm = "" if r.attack == CLEAN else str(r.norm or "Linf")
        out.append((r.attack, eps, norm, outcome_column(r.attack, eps, norm)))
    return out


def class_accuracy(counts: pd.DataFrame, sizes: pd.Series, accuracy: pd.DataFrame) -> pd.DataFrame:
    """``classes.csv`` from per-class sums: ``counts`` (index label, one column per samples.csv outcome column: the
    samples correct under it) and ``sizes`` (samples per label)."""
    rows = []
    for attack, eps, norm, col in _columns(accuracy):
        if col not in counts.columns:
            continue
        for label, k in counts[col].items():
            rows.append({"label": int(label), "n_samples": int(sizes[label]), "attack": attack, "eps": eps,
                         "norm": norm, "accuracy": float(k) / int(sizes[label]), "_k": int(k)})
    frame = pd.DataFrame(rows, columns=CLASS_COLUMNS[:6] + ["_k"])
    low, high = wilson_arrays(frame["_k"].to_numpy(dtype=float), frame["n_samples"].to_numpy(dtype=float))
    frame["ci_low"], frame["ci_high"] = low, high
    order = {a: i for i, a in enumerate((CLEAN, WORST_CASE))}
    frame = frame.assign(_o=frame["attack"].map(order)).sort_values(["label", "_o", "eps"], na_position="first")
    return frame[CLASS_COLUMNS].reset_index(drop=True)


def class_table(samples_csv: Path, accuracy: pd.DataFrame) -> pd.DataFrame | None:
    """``classes.csv`` of an analysis from the ``samples.csv`` it streamed (read in chunks, only the columns
    needed); None when there is no such file or it holds no outcome column."""
    samples_csv = Path(samples_csv)
    if not samples_csv.is_file() or samples_csv.stat().st_size == 0:
        return None
    header = pd.read_csv(samples_csv, nrows=0).columns
    wanted = [col for *_, col in _columns(accuracy) if col in header]
    if "label" not in header or not wanted:
        return None
    counts, sizes = None, None
    for chunk in pd.read_csv(samples_csv, usecols=["label", *wanted], chunksize=CHUNK_ROWS):
        group = chunk.groupby("label")
        c, s = group[wanted].sum(), group.size()
        counts = c if counts is None else counts.add(c, fill_value=0)
        sizes = s if sizes is None else sizes.add(s, fill_value=0)
    if counts is None:  # a header and no sample
        return None
    return class_accuracy(counts.astype(np.int64), sizes.astype(np.int64), accuracy)


def weakest_class(classes: pd.DataFrame) -> pd.Series | None:
    """The class with the lowest worst-case accuracy at the largest eps (the lowest clean accuracy when the run
    has no worst case; ties: the lower upper bound, the better attested weakness, then the smaller label), or None
    for an empty table."""
    worst = classes[(classes["attack"] == WORST_CASE) & classes["eps"].notna()]
    rows = worst[np.isclose(worst["eps"], worst["eps"].max())] if not worst.empty else classes[classes["attack"] == CLEAN]
    if rows.empty:
        return None
    return rows.sort_values(["accuracy", "ci_high", "label"]).iloc[0]
