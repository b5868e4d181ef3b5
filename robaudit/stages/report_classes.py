"""The report's per-class table: clean and worst-case accuracy of every class, from ``classes.csv``.

A model robust on average can be fragile on one class; the weakest class (lowest worst-case accuracy at the
largest eps) is named in a sentence and its row highlighted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..classes import weakest_class
from ..intervals import format_interval
from ..labels import CLEAN
from ..rundir import read_table
from .html import Cell, Column, Row, Table, fmt_eps, fmt_pct, is_missing, num_cell, sort_key

__all__ = ["CLASSES_SHOWN", "classes_section"]

CLASSES_SHOWN = 20  # more classes than this (ImageNet's 1,000): the weakest ones, the rest in classes.csv


def _header(attack: str, eps, norm: str) -> str:
    if attack == CLEAN:
        return "Clean"
    return f"Worst case eps {fmt_eps(eps)}" + ("" if norm in ("", "Linf") else f" {norm}")


def _cell(row: pd.Series | None) -> Cell:
    """An accuracy with its interval in one cell, sorted by the accuracy."""
    if row is None:
        return Cell("")
    ci = format_interval(row["ci_low"], row["ci_high"], unit=" %")
    return Cell(fmt_pct(row["accuracy"]) + (f" ({ci})" if ci else ""), sort_key(row["accuracy"]), "num")


def _table(classes: pd.DataFrame, weakest: pd.Series | None, caption: str) -> Table:
    keys = list(dict.fromkeys((r.attack, None if is_missing(r.eps) else float(r.eps), r.norm if isinstance(r.norm, str)
                               else "") for r in classes.itertuples(index=False)))
    columns = [Column("Class (label)", True), Column("Samples", True)] + [Column(_header(*k), True) for k in keys]
    rows = []
    groups = dict(tuple(classes.groupby("label", sort=True)))
    for label in _shown(classes, weakest):
        group = groups[label]
        cells = [num_cell(int(label)), num_cell(int(group["n_samples"].iloc[0]))]
        for attack, eps, norm in keys:
            hit = group[group["attack"] == attack]
            if eps is not None:
                hit = hit[np.isclose(hit["eps"].astype(float), eps)]
            cells.append(_cell(hit.iloc[0] if len(hit) else None))
        is_weakest = weakest is not None and int(label) == int(weakest["label"])
        rows.append(Row(cells, cls="weakest" if is_weakest else ""))
    return Table(columns, rows, caption=caption)


def _shown(classes: pd.DataFrame, weakest: pd.Series | None) -> list:
    """The labels the table lists: every class, or the :data:`CLASSES_SHOWN` weakest (by the weakest class's
    measure, worst first), in label order."""
    labels = sorted(classes["label"].unique())
    if len(labels) <= CLASSES_SHOWN or weakest is None:
        return labels
    measure = classes[classes["attack"] == weakest["attack"]]
    if not is_missing(weakest["eps"]):
        measure = measure[np.isclose(measure["eps"].astype(float), float(weakest["eps"]))]
        measure = measure[measure["norm"] == weakest["norm"]]
    worst = measure.sort_values(["accuracy", "ci_high", "label"])["label"].head(CLASSES_SHOWN)
    return sorted(worst)


def _sentence(weakest: pd.Series | None, accuracy: pd.DataFrame | None) -> str:
    """The weakest class against the accuracy over all classes."""
    if weakest is None:
        return ""
    what = "clean accuracy" if weakest["attack"] == CLEAN else f"worst-case accuracy at eps {fmt_eps(weakest['eps'])}"
    ci = format_interval(weakest["ci_low"], weakest["ci_high"], unit=" %")
    text = (f"Weakest class: label {int(weakest['label'])}, {what} {fmt_pct(weakest['accuracy'])}"
            + (f" ({ci}, {int(weakest['n_samples'])} samples)" if ci else ""))
    if accuracy is not None:
        overall = accuracy[accuracy["attack"] == weakest["attack"]]
        if weakest["attack"] != CLEAN:
            overall = overall[np.isclose(overall["eps"].astype(float), float(weakest["eps"]))]
            overall = overall[overall["norm"] == weakest["norm"]]
        if len(overall):
            text += f", against {fmt_pct(overall['accuracy'].iloc[0])} over all classes"
    return text + "."


def classes_section(run_dir: Path, accuracy: pd.DataFrame | None, hardened_accuracy: pd.DataFrame | None) -> list[dict]:
    """One entry per model with a ``classes.csv`` (the audited one, then the hardened one): its weakest-class
    sentence and its table."""
    out = []
    for title, directory, acc in (("Audited model", run_dir, accuracy),
                                  ("Hardened model", run_dir / "hardened", hardened_accuracy)):
        if not directory.is_dir():
            continue
        classes = read_table(directory, "classes.csv", root=run_dir)
        if classes is None or classes.empty:
            continue
        weakest = weakest_class(classes)
        n_classes = classes["label"].nunique()
        shown = "" if n_classes <= CLASSES_SHOWN else f" The {CLASSES_SHOWN} weakest of {n_classes} classes."
        caption = (f"{title}: accuracy per class (95 % Wilson interval in parentheses), clean and worst case over "
                   f"the battery per eps; the weakest class is highlighted.{shown}")
        out.append({"title": title, "sentence": _sentence(weakest, acc), "table": _table(classes, weakest, caption),
                    "href": str(Path(directory.name) / "classes.csv") if directory != run_dir else "classes.csv"})
    return out
