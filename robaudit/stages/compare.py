"""``robaudit compare RUN_A RUN_B``: what changed between two audits, as deltas and one self-contained page.

Model v1 against v2, or before against after a change: accuracy per attack and eps with its 95 % interval
and, for runs of the same samples, an exact paired test of each difference, RE per layer where
the layer names match (under A's ranking attack), the two MVL lists, and the manifest fields that differ.
The page uses the report's style, CSP and table macros, and fetches nothing.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure

from ..errors import RobauditError
from ..intervals import CI_COLUMNS
from ..paired_runs import pair_samples, paired_tests
from ..significance import NOISE_ALPHA, format_p
from ..labels import attack_name
from ..rundir import Run, read_run, rows_at
from ..verdict import checks_of, sanity_verdict, verdict_line
from ..writelock import write_lock
from .html import (Cell, Column, Row, Table, check_page_out, content_security_policy, environment, figure_svg, fmt_eps,
                   fmt_pct, fmt_points, fmt_re, fmt_size, interval_cell, is_missing, num_cell, plain, read_resource,
                   sort_key, version, write_atomic)
from .plots import MPL_RC
from .report_verdict import minimal_rows

# manifest fields whose difference explains a difference in the numbers
MANIFEST_FIELDS = (
    ("model", "path"), ("model", "sha256"), ("model", "format"), ("model", "arch"), ("dataset", "name"),
    ("dataset", "split"), ("dataset", "samples"), ("n_samples",), ("seed",), ("attacks",), ("eps",),
    ("layers", "probe"), ("normalization", "mean"), ("normalization", "std"), ("torch_version",),
    ("robaudit_version",), ("device",),
)


@dataclass
class Comparison:
    """Two runs side by side: accuracy and RE frames with deltas, the MVL lists, the manifest differences."""

    a: Run
    b: Run
    accuracy: pd.DataFrame  # attack, eps, norm, a, b, delta, their intervals, the paired test (paired_runs)
    re: pd.DataFrame  # layer, order, a, b, delta (under A's ranking attack at its eps)
    ranking: dict
    mvl_a: list[str]
    mvl_b: list[str]
    manifest: list[tuple[str, Any, Any]]
    # minimal-perturbation attacks (no eps), by success rate and perturbation size: attack, norm and per run
    # success_*, all_* (median over all samples) and fooled_* (median over the fooled ones)
    minimal: pd.DataFrame = field(default_factory=pd.DataFrame)
    sanity: dict = field(default_factory=dict)  # "a", "b": each run's sanity verdict (verdict.sanity_verdict)
    unpaired: str | None = None  # why the differences were not tested (None: tested sample by sample)

    def to_dict(self) -> dict:
        def records(df: pd.DataFrame) -> list[dict]:
            return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                    for r in df.astype(object).where(df.notna(), None).to_dict("records")]

        return {"run_a": str(self.a.path), "run_b": str(self.b.path), "accuracy": records(self.accuracy),
                "paired_test": {"test": "exact McNemar, two-sided", "within_noise_at_p": NOISE_ALPHA,
                                "unpaired": self.unpaired},
                "re": records(self.re), "re_ranking": self.ranking, "mvl_a": self.mvl_a, "mvl_b": self.mvl_b,
                "mvl_common": [l for l in self.mvl_a if l in self.mvl_b],
                "manifest_differences": [{"field": f, "a": x, "b": y} for f, x, y in self.manifest],
                "minimal_perturbation": records(self.minimal), "sanity": self.sanity}


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _accuracy(a: Run, b: Run) -> pd.DataFrame:
    cols = ["attack", "eps", "norm"]

    def frame(run: Run, name: str) -> pd.DataFrame:
        df = run.accuracy[[c for c in cols if c in run.accuracy] + ["accuracy", *CI_COLUMNS]].copy()
        df["eps"] = df["eps"].astype(float).round(12)
        return df.rename(columns={"accuracy": name, **{c: f"{name}_{c}" for c in CI_COLUMNS}})

    merged = frame(_bounded(a), "a").merge(frame(_bounded(b), "b"), on=cols, how="outer", sort=False)
    merged["delta"] = merged["b"] - merged["a"]
    order = {name: i for i, name in enumerate(dict.fromkeys(list(a.accuracy["attack"]) + list(b.accuracy["attack"])))}
    merged["_o"] = merged["attack"].map(order)
    return merged.sort_values(["_o", "eps"], na_position="first").drop(columns="_o").reset_index(drop=True)


def _bounded(run: Run) -> Run:
    """``run`` without its minimal-perturbation rows: their accuracy is no robust accuracy (see :func:`_minimal`)."""
    return replace(run, accuracy=run.accuracy.drop(index=minimal_rows(run.accuracy).index))


MINIMAL_FIELDS = {"success": "success_rate", "all": "pert_median_all", "fooled": "pert_median"}


def _minimal(a: Run, b: Run) -> pd.DataFrame:
    """CW and DeepFool side by side by success rate and perturbation size (median over all samples, where a more
    robust model reads larger, and over the fooled ones), never by accuracy."""
    def frame(run: Run, side: str) -> pd.DataFrame:
        rows = minimal_rows(run.accuracy)
        out = pd.DataFrame({"attack": rows["attack"], "norm": rows["norm"] if "norm" in rows else None})
        for name, column in MINIMAL_FIELDS.items():
            out[f"{name}_{side}"] = rows[column].astype(float) if column in rows else np.nan
        return out

    return frame(a, "a").merge(frame(b, "b"), on=["attack", "norm"], how="outer", sort=False).reset_index(drop=True)


def _sanity(a: Run, b: Run) -> dict:
    """Each run's sanity verdict (a hardened run's manifest may leave the number of classes to its original's)."""
    classes = [(run.manifest.get("dataset") or {}).get("num_classes") for run in (a, b)]
    out = {}
    for side, run, n in (("a", a, classes[0]), ("b", b, classes[1])):
        checks = checks_of(run, num_classes=n or classes[0] or classes[1])
        out[side] = {**sanity_verdict(checks), "line": verdict_line(checks)}
    return out


def _re(a: Run, b: Run) -> tuple[pd.DataFrame, dict]:
    mvl = a.mvl or {}
    attack, eps, metric = mvl.get("attack"), mvl.get("eps"), mvl.get("metric") or "re_mean"

    def pick(run: Run) -> pd.DataFrame:
        lsa = rows_at(run.lsa, attack, eps)
        keep = ["layer", metric] + (["order"] if "order" in lsa else [])
        return lsa[keep].drop_duplicates("layer")

    left, right = pick(a), pick(b)
    merged = left.rename(columns={metric: "a"}).merge(
        right[["layer", metric]].rename(columns={metric: "b"}), on="layer", how="inner")
    merged["delta"] = merged["b"] - merged["a"]
    if "order" in merged:
        merged = merged.sort_values("order")
    ranking = {"attack": attack, "eps": eps, "metric": metric, "layers_a": int(len(left)), "layers_b": int(len(right)),
               "matched": int(len(merged))}
    return merged.reset_index(drop=True), ranking


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> Comparison:
    """Read two run directories and put them side by side."""
    a, b = read_run(run_a), read_run(run_b)
    re_frame, ranking = _re(a, b)
    manifest = []
    for path in MANIFEST_FIELDS:
        x, y = _get(a.manifest, path), _get(b.manifest, path)
        if x != y:
            manifest.append((".".join(path), x, y))
    names = lambda run: [str(l.get("layer")) for l in (run.mvl or {}).get("layers") or []]  # noqa: E731
    pairing = pair_samples(a.table("samples.csv"), b.table("samples.csv"))
    accuracy = paired_tests(_accuracy(a, b), pairing)
    return Comparison(a, b, accuracy, re_frame, ranking, names(a), names(b), manifest, minimal=_minimal(a, b),
                      sanity=_sanity(a, b), unpaired=pairing.unpaired)


def _plot_re(cmp: Comparison, label_a: str, label_b: str) -> Markup | None:
    if cmp.re.empty:
        return None
    with matplotlib.rc_context(MPL_RC):
        fig = Figure(figsize=(8.0, 3.2), layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(len(cmp.re))
        ax.plot(x, cmp.re["a"], marker="o", markersize=3, color="#9aa3ad", label=label_a)
        ax.plot(x, cmp.re["b"], marker="s", markersize=3, color="#1f77b4", linestyle=(0, (5, 2)), label=label_b)
        ax.set_xticks(x, list(cmp.re["layer"]), rotation=90, fontsize=6.5)
        ax.set_ylabel(cmp.ranking["metric"])
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return figure_svg(fig, "comparere", "RE per layer, run A and run B")


def render_compare(cmp: Comparison, out: str | os.PathLike) -> Path:
    """Write the comparison page (refusing to overwrite a file that is not robaudit's own)."""
    out = Path(out)
    if out.is_dir() and not out.is_symlink():
        raise RobauditError(f"--out {out} is a directory: give the HTML file to write")
    with write_lock(out):
        check_page_out(out, "page")
        return _render_compare(cmp, out)


def accuracy_note(cmp: Comparison) -> str:
    """How the accuracy differences were judged: the intervals, the paired test and its threshold, or why no
    test was made."""
    intervals = "Intervals: 95 % Wilson score intervals of each run's accuracy."
    if cmp.unpaired:
        return f"{intervals} No paired test: {cmp.unpaired}."
    return (f"{intervals} Each difference is tested on the samples both runs audited (two-sided exact McNemar test on "
            f"the samples whose outcome differs); p >= {NOISE_ALPHA:g} is within noise: the sample alone could "
            "produce it.")


def noise_verdict(within) -> str:
    """A tested difference in words: within noise or beyond it; empty when untested."""
    if within is None or is_missing(within):
        return ""
    return "within noise" if within else "beyond noise"


def _accuracy_table(cmp: Comparison) -> Table:
    """Accuracy per attack and eps: A and B with their intervals, the difference and its paired test."""
    rows = []
    for r in cmp.accuracy.itertuples():
        tested = r.p is not None and not is_missing(r.p)
        rows.append(Row([Cell(attack_name(r.attack)), num_cell(r.eps, fmt_eps), Cell(r.norm or ""),
                         num_cell(r.a, fmt_pct), interval_cell(r.a_ci_low, r.a_ci_high),
                         num_cell(r.b, fmt_pct), interval_cell(r.b_ci_low, r.b_ci_high),
                         num_cell(r.delta, fmt_points),
                         Cell(format_p(r.p) if tested else "", sort_key(r.p) if tested else None, "num"),
                         Cell(noise_verdict(r.within_noise))],
                        cls="strong" if r.attack in ("clean", "worst-case") else ""))
    return Table([Column("Attack"), Column("eps", True), Column("Norm"), Column("A", True), Column("A 95 % CI", True),
                  Column("B", True), Column("B 95 % CI", True), Column("Δ (points)", True),
                  Column("McNemar p", True), Column("Difference")], rows)


def _render_compare(cmp: Comparison, out: Path) -> Path:
    """:func:`render_compare` once the page may be written."""
    la, lb = f"A: {cmp.a.path.name}", f"B: {cmp.b.path.name}"
    re_rows = [Row([Cell(r.layer), num_cell(r.a, fmt_re), num_cell(r.b, fmt_re), num_cell(r.delta, fmt_re)])
               for r in cmp.re.itertuples()]
    depth = max(len(cmp.mvl_a), len(cmp.mvl_b))
    mvl_rows = [Row([Cell(str(i + 1)), Cell(cmp.mvl_a[i] if i < len(cmp.mvl_a) else ""),
                     Cell(cmp.mvl_b[i] if i < len(cmp.mvl_b) else "")]) for i in range(depth)]
    man_rows = [Row([Cell(f), Cell(plain(x), cls="wrap"), Cell(plain(y), cls="wrap")])
                for f, x, y in cmp.manifest]
    css, script = read_resource("report.css"), read_resource("sort.js")
    rk = cmp.ranking
    context_minimal = {"minimal": _minimal_table(cmp), "sanity": _sanity_lines(cmp, la, lb)}
    context = {
        "title": f"Audit comparison: {cmp.a.path.name} vs {cmp.b.path.name}",
        "subtitle": f"A = {cmp.a.path}; B = {cmp.b.path}; delta = B - A",
        "version": version(), "css": Markup(css), "script": Markup(script),
        "csp": content_security_policy(css, script),
        "accuracy": _accuracy_table(cmp),
        "accuracy_note": accuracy_note(cmp),
        "re": Table([Column("Layer"), Column("A", True), Column("B", True), Column("Δ", True)], re_rows),
        "re_note": (f"{rk['metric']} under {attack_name(rk['attack'])}"
                    + (f" at eps {fmt_eps(rk['eps'])}" if rk["eps"] is not None else "")
                    + f" (run A's ranking attack); {rk['matched']} layers match by name, of {rk['layers_a']} in A "
                    f"and {rk['layers_b']} in B."),
        "re_plot": _plot_re(cmp, la, lb),
        "mvl": Table([Column("Rank"), Column("A"), Column("B")], mvl_rows, sortable=False),
        "mvl_common": ", ".join(l for l in cmp.mvl_a if l in cmp.mvl_b) or "none",
        "manifest": Table([Column("Field"), Column("A"), Column("B")], man_rows, sortable=False)
        if man_rows else None,
    }
    text = environment().get_template("compare.html.j2").render(**context, **context_minimal)
    write_atomic(out, text)
    return out


def _minimal_table(cmp: Comparison) -> Table | None:
    """The minimal-perturbation attacks of both runs: success rate and perturbation size, with their change."""
    if cmp.minimal.empty:
        return None
    rows = []
    for r in cmp.minimal.itertuples():
        rows.append(Row([Cell(attack_name(r.attack)), Cell(r.norm or ""), num_cell(r.success_a, fmt_pct),
                         num_cell(r.success_b, fmt_pct), num_cell(r.all_a, fmt_size), num_cell(r.all_b, fmt_size),
                         num_cell(r.fooled_a, fmt_re), num_cell(r.fooled_b, fmt_re)]))
    return Table([Column("Attack"), Column("Norm"), Column("Success rate A", True), Column("Success rate B", True),
                  Column("Median, all samples A", True), Column("Median, all samples B", True),
                  Column("Median, fooled A", True), Column("Median, fooled B", True)], rows, caption=(
        "Minimal-perturbation attacks (no eps) by the share of correctly classified samples they fooled and the "
        "norm of the perturbation each sample needed; their accuracy is no robust accuracy and is not compared. "
        "The median over all samples counts a sample misclassified already as 0 and one never fooled as ∞: the "
        "more robust model has the larger one. The median over the fooled samples alone can shrink as a model "
        "grows more robust (it is fooled only on its easiest samples)."))


def _sanity_lines(cmp: Comparison, label_a: str, label_b: str) -> list[str]:
    """Each run's sanity verdict in a line, as the terminal says it."""
    def line(v: dict) -> str:
        warned = "; ".join(w["check"] for w in v["warnings"])
        return v["line"] + (f" ({warned})" if warned else "")

    return [f"{label}: {line(cmp.sanity[side])}" for side, label in (("a", label_a), ("b", label_b)) if side in cmp.sanity]
