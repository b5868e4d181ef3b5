"""The report's figures: matplotlib ``Figure`` objects (never pyplot) rendered as inline SVG.

One style for every figure (:data:`MPL_RC`, which also makes the SVG ids deterministic), one color and line
style per attack (:class:`Palette`), and a plot function per figure, each returning the SVG and its caption.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure  # never pyplot: no global figure state, no GUI backend
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ..labels import CLEAN, WORST_CASE, attack_name
from .html import figure_svg, fmt_eps, is_missing

__all__ = ["ACCURACY_HISTORY_COLUMNS", "BN_LABELS", "MPL_RC", "Palette", "Plot", "accuracy_figure", "config_label",
           "plot_accuracy", "plot_batchnorm", "plot_heatmap", "plot_history", "plot_profile", "plot_re_before_after"]

MPL_RC = {
    "svg.fonttype": "none",  # text stays text: small, searchable, selectable
    "svg.hashsalt": "robaudit",  # deterministic ids (then made unique per figure)
    "text.parse_math": False,  # module names may contain "$"
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial"],
    "font.size": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e6ea",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 7.5,
    "figure.dpi": 100,
}
ADVERSARIAL_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b"]
NOISE_COLORS = ["#7f7f7f", "#bcbd22", "#a0785a", "#5f9ea0"]
MVL_COLOR = "#b3261e"


@dataclass
class Plot:
    """A figure as inline SVG and the caption printed under it."""

    svg: Markup
    caption: str


def config_label(attack: str, eps: float, norm: str, *, show_norm: bool) -> str:
    """A perturbation configuration in a legend or a column header: ``PGD ε=8/255`` (``CW (min. L2)``)."""
    label = attack_name(attack)
    if is_missing(eps):
        return f"{label} (min. {norm})"
    return f"{label} ε={fmt_eps(eps)}" + (f" {norm}" if show_norm else "")


class Palette:
    """One color and line style per attack label, shared by every plot of the report."""

    def __init__(self, frames: Iterable[pd.DataFrame | None]):
        adversarial, noise = [], []
        for df in frames:
            if df is None:
                continue
            for attack, kind in df[["attack", "kind"]].drop_duplicates().itertuples(index=False):
                if attack in (CLEAN, WORST_CASE):
                    continue
                target = noise if kind == "noise" else adversarial
                if attack not in target:
                    target.append(attack)
        self.style: dict[str, dict] = {WORST_CASE: {"color": "#111111", "linestyle": "-", "linewidth": 2.4}}
        for i, a in enumerate(sorted(adversarial)):
            self.style[a] = {"color": ADVERSARIAL_COLORS[i % len(ADVERSARIAL_COLORS)], "linestyle": "-", "linewidth": 1.5}
        for i, a in enumerate(sorted(noise)):
            self.style.setdefault(a, {"color": NOISE_COLORS[i % len(NOISE_COLORS)], "linestyle": ":", "linewidth": 1.4})

    def __call__(self, attack: str) -> dict:
        return dict(self.style.get(attack, {"color": "#444444", "linestyle": "-", "linewidth": 1.2}))


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (the default ones are mathtext, which is switched off)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _mark_mvl_ticks(labels, mvl: set[str]) -> None:
    for t in labels:
        if t.get_text() in mvl:
            t.set_color(MVL_COLOR)
            t.set_fontweight("bold")


def plot_heatmap(layers, configs, mat, mvl: set[str], metric: str, show_norm: bool) -> Plot:
    """RE per layer (rows) and configuration (columns), on a log color scale where it spans decades."""
    n_l, n_c = mat.shape
    fig = Figure(figsize=(min(11.0, 2.8 + 0.55 * n_c), 1.6 + 0.17 * n_l), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(False)
    finite = mat[np.isfinite(mat)]
    positive = finite[finite > 0]
    if len(positive) and len(positive) == len(finite) and positive.max() / positive.min() > 20:
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    else:
        norm = Normalize(vmin=float(finite.min()) if len(finite) else 0.0, vmax=float(finite.max()) if len(finite) else 1.0)
    image = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    ax.set_yticks(range(n_l), [name for _, name, _ in layers], fontsize=7)
    ax.set_xticks(range(n_c), [config_label(a, e, n, show_norm=show_norm) for a, e, n, _ in configs],
                  rotation=50, ha="right", rotation_mode="anchor", fontsize=7.5)
    _mark_mvl_ticks(ax.get_yticklabels(), mvl)
    ax.set_ylabel("layer (forward order)")
    bar = fig.colorbar(image, ax=ax, label=f"RE ({metric})", shrink=min(1.0, 6.0 / max(1.0, 0.17 * n_l)), pad=0.02)
    if isinstance(norm, LogNorm):
        _plain_log_ticks(bar.ax.yaxis)
    return Plot(figure_svg(fig, "heatmap", "Heatmap of RE per layer and perturbation configuration", dpi=150),
                f"RE of every layer (rows, forward order) under every perturbation configuration (columns); "
                f"{'log' if isinstance(norm, LogNorm) else 'linear'} color scale. MVL layers in red.")


def plot_profile(layers, configs, mat, mvl: set[str], palette: Palette, metric: str, show_norm: bool) -> Plot:
    """RE along the layers, one panel per eps, adversarial against noise; the MVL layers shaded."""
    groups: dict[Any, list[int]] = {}
    for j, (_, eps, _, _) in enumerate(configs):
        groups.setdefault("min" if is_missing(eps) else float(eps), []).append(j)
    keys = sorted((k for k in groups if k != "min")) + (["min"] if "min" in groups else [])
    n_l = len(layers)
    fig = Figure(figsize=(min(11.0, max(8.5, 3.0 + 0.16 * n_l)), 1.1 + 2.3 * len(keys)), layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(n_l)
    mvl_idx = [i for i, (_, name, _) in enumerate(layers) if name in mvl]
    finite = mat[np.isfinite(mat)]
    log_scale = len(finite) and (finite > 0).all() and finite.max() / finite.min() > 100
    for ax, key in zip(axes, keys):
        for i in mvl_idx:
            ax.axvspan(i - 0.4, i + 0.4, color=MVL_COLOR, alpha=0.12, linewidth=0)
        for j in groups[key]:
            attack, eps, norm, kind = configs[j]
            st = palette(attack)
            ax.plot(x, mat[:, j], marker="o" if kind != "noise" else "x", markersize=3,
                    label=config_label(attack, eps, norm, show_norm=show_norm), **st)
        ax.set_ylabel(f"RE ({metric})")
        ax.set_title("minimal-perturbation attacks" if key == "min" else f"ε = {fmt_eps(key)}", fontsize=9, loc="left")
        if log_scale:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xticks(x, [name for _, name, _ in layers], rotation=90, fontsize=7)
    _mark_mvl_ticks(axes[-1].get_xticklabels(), mvl)
    axes[-1].set_xlim(-0.6, n_l - 0.4)
    return Plot(figure_svg(fig, "profile", "RE profile per layer, adversarial and noise perturbations"),
                "Per-layer RE profile: adversarial attacks (solid) against statistical noise of the same "
                "size (dotted), one panel per eps; MVL layers shaded red.")


HARDENED_STYLE = {"linestyle": (0, (5, 2)), "alpha": 0.9}  # dashed, square markers: after hardening


def accuracy_figure(before: pd.DataFrame, after: pd.DataFrame | None, palette: Palette) -> Figure | None:
    """Accuracy against eps: a curve from the clean accuracy at eps 0 for attacks measured at several eps,
    a marker alone for an attack measured at one eps (no line through eps where it never ran).
    Adversarial solid with circles, noise dotted with crosses, the hardened model dashed with squares."""
    curves = before[before["eps"].notna() & (before["attack"] != CLEAN)]
    if curves.empty:
        return None
    norms = sorted(curves["norm"].unique())
    fig = Figure(figsize=(min(11.0, 4.6 * len(norms) + 2.0), 3.4), layout="constrained")
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    for ax, norm in zip(axes, norms):
        for frame, tag, dashed in ((before, "", False), (after, " (hardened)", True)):
            if frame is None:
                continue
            clean = frame.loc[frame["attack"] == CLEAN, "accuracy"]
            part = frame[frame["eps"].notna() & (frame["norm"] == norm) & (frame["attack"] != CLEAN)]
            if dashed:
                part = part[part["kind"] != "noise"]
            for attack in sorted(part["attack"].unique(), key=lambda a: (a == WORST_CASE, a)):
                pts = part[part["attack"] == attack].sort_values("eps")
                xs, ys = list(pts["eps"]), list(pts["accuracy"] * 100)
                single = len(pts) == 1
                if len(clean) and not single:
                    xs, ys = [0.0] + xs, [float(clean.iloc[0]) * 100] + ys
                st = palette(attack)
                if dashed:
                    st.update(HARDENED_STYLE)
                if single:
                    st.update(linestyle="none")
                marker = "s" if dashed else ("x" if pts["kind"].iloc[0] == "noise" else "o")
                ax.plot(xs, ys, marker=marker, markersize=6 if single else 3.5,
                        label=attack_name(attack) + tag + (f" (eps {fmt_eps(xs[0])} only)" if single else ""), **st)
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return fig


def plot_accuracy(before: pd.DataFrame, after: pd.DataFrame | None, palette: Palette) -> Plot | None:
    """:func:`accuracy_figure` with its caption; None when no attack ran with an eps."""
    fig = accuracy_figure(before, after, palette)
    if fig is None:
        return None
    caption = ("Accuracy against eps, one curve per attack (solid; statistical noise dotted); eps 0 is the clean "
               "accuracy; worst case in black. An attack measured at a single eps is a marker alone.")
    if after is not None:
        caption += " Dashed curves with square markers: the hardened model."
    return Plot(figure_svg(fig, "accuracy", "Robust accuracy against eps"), caption)


LOSS_COLUMNS = {"loss": ("total", "#111111"), "ce": ("cross-entropy", "#1f77b4"),
                "ce_adv": ("cross-entropy (adversarial)", "#1f77b4"), "ce_clean": ("cross-entropy (clean)", "#2ca02c"),
                "ce_perturbed": ("cross-entropy (perturbed)", "#9467bd"), "reg": ("layer regularizer", "#d62728")}
ACCURACY_HISTORY_COLUMNS = {"clean_acc": ("clean", "#2ca02c"), "val_clean_acc": ("clean", "#2ca02c"),
                            "robust_acc": ("robust", "#d62728"), "val_robust_acc": ("robust", "#d62728")}


def plot_history(history: pd.DataFrame) -> Plot | None:
    """Loss terms and validation accuracies per epoch (``clean_acc`` or ``val_clean_acc`` alike)."""
    losses = [c for c in LOSS_COLUMNS if c in history.columns]
    accs = [c for c in ACCURACY_HISTORY_COLUMNS if c in history.columns]
    if "epoch" not in history.columns or history.empty or not (losses or accs):
        return None
    fig = Figure(figsize=(10.5, 3.1), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    epoch = pd.to_numeric(history["epoch"], errors="coerce")
    first, last = (int(epoch.min()), int(epoch.max())) if epoch.notna().any() else (0, 1)
    for col in losses:
        label, color = LOSS_COLUMNS[col]
        ax_loss.plot(epoch, pd.to_numeric(history[col], errors="coerce"), marker="o", markersize=3, color=color,
                     label=label)
    for col in accs:
        label, color = ACCURACY_HISTORY_COLUMNS[col]
        ax_acc.plot(epoch, pd.to_numeric(history[col], errors="coerce") * 100, marker="o", markersize=3,
                    color=color, label=f"{label} (validation)")
    for ax, title, ylabel in ((ax_loss, "loss terms", "training loss"), (ax_acc, "accuracy", "accuracy (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(10, last - first + 1)))
        ax.set_xlim(first - 0.5, last + 0.5)  # whole epochs only, even for a one-epoch run
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9, loc="left")
        if ax.lines:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the data, never over it
    ax_acc.set_ylim(-3, 103)
    return Plot(figure_svg(fig, "history", "Hardening training history"),
                "Training history: loss terms and validation accuracy per epoch (epoch 0: before hardening).")


def plot_re_before_after(re_rows: pd.DataFrame) -> Plot | None:
    """The MVL layers' RE before and after hardening, as paired bars; None without rows."""
    if re_rows.empty:
        return None
    labels = list(re_rows["label"])
    y = np.arange(len(labels))
    fig = Figure(figsize=(8.0, 1.0 + 0.36 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(y - 0.19, re_rows["before"], height=0.38, color="#9aa3ad", label="before")
    ax.barh(y + 0.19, re_rows["after"], height=0.38, color="#1f77b4", label="after hardening")
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlabel("RE")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return Plot(figure_svg(fig, "rebeforeafter", "RE of the MVL layers before and after hardening"),
                "RE of the MVL layers before and after hardening, under the attack that ranked them.")


BN_LABELS = {"clean_vs_running": "clean vs running", "adv_vs_clean": "adversarial vs clean",
             "adv_vs_running": "adversarial vs running"}
BN_COLORS = {"clean_vs_running": "#9aa3ad", "adv_vs_clean": "#d62728", "adv_vs_running": "#1f77b4"}


def plot_batchnorm(bn: pd.DataFrame, after: pd.DataFrame | None) -> Plot:
    """The three distances per BatchNorm layer (log scale), and the adversarial shift after hardening."""
    labels = list(bn["layer"])
    y = np.arange(len(labels))
    fig = Figure(figsize=(8.0, 1.2 + 0.5 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    h = 0.8 / (3 + (after is not None))
    for i, col in enumerate(BN_LABELS):
        ax.barh(y - 0.4 + h * (i + 0.5), bn[col].clip(lower=1e-6), height=h, color=BN_COLORS[col],
                label=BN_LABELS[col])
    if after is not None:
        shifted = bn[["layer"]].merge(after[["layer", "adv_vs_clean"]], on="layer", how="left")["adv_vs_clean"]
        ax.barh(y - 0.4 + h * 3.5, shifted.clip(lower=1e-6), height=h, color="#d62728", alpha=0.45, hatch="//",
                label="adversarial vs clean, after hardening")
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.xaxis.set_major_locator(LogLocator(base=10))  # decades only: the axis spans several of them
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlabel("symmetric KL between per-channel Gaussians (mean over channels)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return Plot(figure_svg(fig, "batchnorm", "BatchNorm statistics: clean, adversarial and running"),
                "Per BatchNorm layer: how far clean and adversarial batch statistics lie from the running ones "
                "the model uses at test time, and from each other.")
