"""Render a run directory into one self-contained HTML audit.

The file stands on its own: plots are inline SVG (matplotlib, no pyplot state), the stylesheet
and the table-sorting script are inlined and allowed by their sha256 hashes in a
Content-Security-Policy meta tag, and nothing is fetched. Every value that comes from the model
or the user (module names, paths, class names, command lines) is autoescaped by jinja2.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import contextlib
import os
import re
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterable

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure  # never pyplot: no global figure state, no GUI backend
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from .. import safeio, sanity, verdict
from ..errors import RobauditError
from ..rundir import (Run, _remove_stale_staging, check_inside, is_own_report, read_document, read_run, read_table,
                      rows_at)
from ..writelock import write_lock
from ..labels import CLEAN, WORST_CASE, attack_name, format_eps

__all__ = ["render_report"]

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
HASHED_SUFFIXES = (".csv", ".json", ".pt2", ".pt", ".pth", ".safetensors")

METHOD_NAMES = {"atlr": "AT-LR", "at-lr": "AT-LR", "at": "adversarial training", "pgd-at": "adversarial training",
                "layerwise": "layer-wise perturbation training", "lat": "layer-wise perturbation training"}

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


# ------------------------------------------------------------------------------------ formatting


def _isnan(v: Any) -> bool:
    """None, NaN or NA (a missing CSV cell); False for anything that is not a scalar."""
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def fmt_pct(v: Any) -> str:
    """A fraction as a percentage with one decimal: ``0.964 -> "96.4 %"``."""
    return "n/a" if _isnan(v) else f"{100.0 * float(v):.1f} %"


def fmt_points(v: Any) -> str:
    """An accuracy change in percentage points: ``0.3 -> "+30.0 points"``."""
    return "n/a" if _isnan(v) else f"{100.0 * float(v):+.1f} points"


def fmt_eps(v: Any) -> str:
    """An eps as the user wrote it (``8/255`` stays a fraction)."""
    return "" if _isnan(v) else format_eps(v)


def fmt_re(v: Any) -> str:
    return "" if _isnan(v) else f"{float(v):.3g}"


def fmt_num(v: Any) -> str:
    if _isnan(v):
        return ""
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    return f"{float(v):.4g}"


def _sort_key(v: Any) -> str | None:
    return None if _isnan(v) else repr(float(v))


# ---------------------------------------------------------------------------------- table model


@dataclass
class Cell:
    text: Any
    sort: str | None = None
    cls: str = ""


@dataclass
class Column:
    label: str
    numeric: bool = False


@dataclass
class Row:
    cells: list[Cell]
    cls: str = ""


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    caption: str = ""
    sortable: bool = True


def num_cell(v: Any, fmt=fmt_num) -> Cell:
    return Cell(fmt(v), _sort_key(v), "num")


def _kv_table(items: Iterable[tuple[str, Any]], caption: str = "") -> Table:
    rows = [Row([Cell(k), Cell(_plain(v), cls="wrap")]) for k, v in items]
    return Table([Column("Field"), Column("Value")], rows, caption=caption, sortable=False)


def _plain(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


# ------------------------------------------------------------------------------------- loading


def _find(run: Path, name: str) -> Path:
    """The directory of a hardening output: ``hardened/`` when it holds one (never through a link out of the
    run), else the run itself."""
    inner = run / "hardened"
    check_inside(inner, run)
    return inner if os.path.lexists(inner / name) else run


# -------------------------------------------------------------------------------------- plotting


def _svg(fig: Figure, prefix: str, label: str, dpi: int = 100) -> Markup:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", dpi=dpi, metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    return Markup(clean_svg(buf.getvalue(), prefix, label))


# matplotlib quotes an attribute with ' when its value holds a " (see backend_svg._quote_escape_attrib).
_STYLE_RE = re.compile(r"""\sstyle=(["'])(.*?)\1""")
_ID_RE = re.compile(r"""\sid=(["'])(.*?)\1""")
_REF_RE = re.compile(r'url\(#([^)"]+)\)|href="#([^"]+)"')


def clean_svg(svg: str, prefix: str, label: str) -> str:
    """Make matplotlib's SVG fit for inline use under a strict CSP.

    Drops the XML prolog, metadata, comments and the <style> element; turns every ``style``
    attribute into presentation attributes (CSP blocks style attributes, not presentation
    attributes); keeps only referenced ids, prefixed so that several plots share one document.
    """
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r"<style[^>]*>.*?</style>", "", svg, flags=re.S)
    svg = re.sub(r"<defs>\s*</defs>", "", svg)
    referenced = {a or b for a, b in _REF_RE.findall(svg)}

    def tag(m: re.Match) -> str:
        t = m.group(0)
        if t.startswith("</"):
            return t

        def style(sm: re.Match) -> str:
            props: dict[str, str] = {}
            for decl in html.unescape(sm.group(2)).split(";"):
                name, sep, value = decl.partition(":")
                if sep and name.strip():
                    props[name.strip()] = value.strip()
            return "".join(f' {k}="{html.escape(v, quote=True)}"' for k, v in props.items())

        t = _STYLE_RE.sub(style, t)
        t = _ID_RE.sub(lambda im: f' id="{prefix}-{im.group(2)}"' if im.group(2) in referenced else "", t)
        return _REF_RE.sub(lambda rm: f"url(#{prefix}-{rm.group(1)})" if rm.group(1)
                           else f'href="#{prefix}-{rm.group(2)}"', t)

    svg = re.sub(r"<[^>]+>", tag, svg)
    root_end = svg.index(">")
    root = svg[:root_end]
    root = re.sub(r'\sxmlns(:\w+)?="[^"]*"', "", root)
    root += (f' class="plot" role="img" aria-label="{html.escape(label, quote=True)}"'
             ' stroke-linejoin="round" stroke-linecap="butt"')
    svg = root + svg[root_end:]
    return re.sub(r"\n\s+", "\n", svg).strip()


@dataclass
class Plot:
    svg: Markup
    caption: str


def _config_label(attack: str, eps: float, norm: str, *, show_norm: bool) -> str:
    label = attack_name(attack)
    if _isnan(eps):
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


def _layers(lsa: pd.DataFrame) -> list[tuple[int, str, str]]:
    """(order, layer, layer_type) in forward order."""
    first = lsa.sort_values("order", kind="stable").drop_duplicates("layer")
    return [(int(o), str(n), str(t)) for o, n, t in first[["order", "layer", "layer_type"]].itertuples(index=False)]


def _configs(lsa: pd.DataFrame) -> list[tuple[str, float, str, str]]:
    """(attack, eps, norm, kind): adversarial before noise, then by attack and eps."""
    cfg = lsa[["attack", "eps", "norm", "kind"]].drop_duplicates()
    cfg = cfg.assign(_noise=cfg["kind"] == "noise", _minimal=cfg["eps"].isna())
    cfg = cfg.sort_values(["_noise", "_minimal", "attack", "norm", "eps"])
    return [(a, e, n, k) for a, e, n, k in cfg[["attack", "eps", "norm", "kind"]].itertuples(index=False)]


def _re_matrix(lsa: pd.DataFrame, layers, configs, metric: str) -> np.ndarray:
    index = {name: i for i, (_, name, _) in enumerate(layers)}
    mat = np.full((len(layers), len(configs)), np.nan)
    for j, (attack, eps, norm, _) in enumerate(configs):
        sel = (lsa["attack"] == attack) & (lsa["norm"] == norm)
        sel &= lsa["eps"].isna() if _isnan(eps) else np.isclose(lsa["eps"], eps)
        for name, value in lsa.loc[sel, ["layer", metric]].itertuples(index=False):
            mat[index[name], j] = value
    return mat


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
    ax.set_xticks(range(n_c), [_config_label(a, e, n, show_norm=show_norm) for a, e, n, _ in configs],
                  rotation=50, ha="right", rotation_mode="anchor", fontsize=7.5)
    _mark_mvl_ticks(ax.get_yticklabels(), mvl)
    ax.set_ylabel("layer (forward order)")
    bar = fig.colorbar(image, ax=ax, label=f"RE ({metric})", shrink=min(1.0, 6.0 / max(1.0, 0.17 * n_l)), pad=0.02)
    if isinstance(norm, LogNorm):
        _plain_log_ticks(bar.ax.yaxis)
    return Plot(_svg(fig, "heatmap", "Heatmap of RE per layer and perturbation configuration", dpi=150),
                f"RE of every layer (rows, forward order) under every perturbation configuration (columns); "
                f"{'log' if isinstance(norm, LogNorm) else 'linear'} color scale. MVL layers in red.")


def plot_profile(layers, configs, mat, mvl: set[str], palette: Palette, metric: str, show_norm: bool) -> Plot:
    groups: dict[Any, list[int]] = {}
    for j, (_, eps, _, _) in enumerate(configs):
        groups.setdefault("min" if _isnan(eps) else float(eps), []).append(j)
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
                    label=_config_label(attack, eps, norm, show_norm=show_norm), **st)
        ax.set_ylabel(f"RE ({metric})")
        ax.set_title("minimal-perturbation attacks" if key == "min" else f"ε = {fmt_eps(key)}", fontsize=9, loc="left")
        if log_scale:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xticks(x, [name for _, name, _ in layers], rotation=90, fontsize=7)
    _mark_mvl_ticks(axes[-1].get_xticklabels(), mvl)
    axes[-1].set_xlim(-0.6, n_l - 0.4)
    return Plot(_svg(fig, "profile", "RE profile per layer, adversarial and noise perturbations"),
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
    fig = accuracy_figure(before, after, palette)
    if fig is None:
        return None
    caption = ("Accuracy against eps, one curve per attack (solid; statistical noise dotted); eps 0 is the clean "
               "accuracy; worst case in black. An attack measured at a single eps is a marker alone.")
    if after is not None:
        caption += " Dashed curves with square markers: the hardened model."
    return Plot(_svg(fig, "accuracy", "Robust accuracy against eps"), caption)


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
    return Plot(_svg(fig, "history", "Hardening training history"),
                "Training history: loss terms and validation accuracy per epoch (epoch 0: before hardening).")


def plot_re_before_after(re_rows: pd.DataFrame) -> Plot | None:
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
    return Plot(_svg(fig, "rebeforeafter", "RE of the MVL layers before and after hardening"),
                "RE of the MVL layers before and after hardening, under the attack that ranked them.")


# ------------------------------------------------------------------------------------- sections


def _at_eps(df: pd.DataFrame, attack: str, eps: float, norm: str | None = None) -> float | None:
    rows = rows_at(df, attack, eps, norm)
    return None if rows.empty else float(rows["accuracy"].iloc[0])


def _clean_acc(df: pd.DataFrame | None) -> tuple[float | None, Any]:
    if df is None:
        return None, None
    rows = df[df["attack"] == CLEAN]
    if rows.empty:
        return None, None
    n = rows["n_samples"].iloc[0] if "n_samples" in rows.columns else None
    return float(rows["accuracy"].iloc[0]), n


def _accuracy_comparison(comparison: pd.DataFrame | None, before: pd.DataFrame | None) -> pd.DataFrame:
    """Rows attack, eps, norm, before, after, delta: the accuracy rows of ``comparison.csv`` as harden wrote them.
    Runs hardened before the file had a ``norm`` column take each attack's norm from the audited run."""
    cols = ["attack", "eps", "norm", "before", "after", "delta"]
    if comparison is None:
        return pd.DataFrame(columns=cols)
    rows = comparison[comparison["kind"] == "accuracy"].copy()
    rows["eps"] = pd.to_numeric(rows["eps"], errors="coerce")
    rows["attack"] = rows["attack"].astype(str)
    if "norm" not in rows.columns:
        norms = dict(zip(before["attack"], before["norm"])) if before is not None else {}
        rows["norm"] = [norms.get(a, "Linf") for a in rows["attack"]]
    rows["norm"] = rows["norm"].fillna("Linf").astype(str)
    for c in ("before", "after"):
        rows[c] = pd.to_numeric(rows[c], errors="coerce")
    rows["delta"] = rows["after"] - rows["before"]
    return rows[cols].reset_index(drop=True)


def _re_comparison(comparison: pd.DataFrame | None) -> pd.DataFrame:
    """Rows label, layer, attack, eps, before, after, delta: the MVL layers' RE rows of ``comparison.csv``."""
    cols = ["label", "layer", "attack", "eps", "before", "after", "delta"]
    if comparison is None or "layer" not in comparison.columns:
        return pd.DataFrame(columns=cols)
    rows = comparison[comparison["kind"] == "re"].copy()
    rows["eps"] = pd.to_numeric(rows["eps"], errors="coerce")
    rows["layer"] = rows["layer"].astype(str)
    rows["attack"] = rows["attack"].astype(str)
    for c in ("before", "after"):
        rows[c] = pd.to_numeric(rows[c], errors="coerce")
    rows["delta"] = rows["after"] - rows["before"]
    multi = rows[["attack", "eps"]].drop_duplicates().shape[0] > 1
    rows["label"] = [f"{l} · {attack_name(a)} ε={fmt_eps(e)}" if multi else l
                     for l, a, e in rows[["layer", "attack", "eps"]].itertuples(index=False)]
    return rows[cols].reset_index(drop=True)


def _mvl_section(run: Run) -> dict | None:
    if not run.mvl:
        return None
    mvl = run.mvl
    layers = mvl.get("layers") or []
    crit = mvl.get("criterion")
    where = f"{mvl.get('metric', 're_mean')} under {attack_name(mvl.get('attack', '?'))}"
    if mvl.get("eps") is not None:
        where += f" at eps {fmt_eps(mvl['eps'])}"
    if crit == "z":
        how = f"layers whose RE exceeds the mean across layers by more than {fmt_num(mvl.get('z'))} standard deviations"
    else:
        how = f"the top {fmt_num(mvl.get('k', len(layers)))} layers"
    rows = [Row([num_cell(i + 1), Cell(str(item.get("layer", "")), cls="layer"), Cell(str(item.get("layer_type", ""))),
                 num_cell(item.get("score"), fmt_re)], cls="mvl")
            for i, item in enumerate(layers)]
    table = Table([Column("Rank", True), Column("Layer"), Column("Type"), Column("Score (RE)", True)], rows,
                  caption="MVL list, most vulnerable first")
    description = f"Ranked by {where}; selected: {how}. {len(layers)} layers."
    if mvl.get("excluded"):
        description += f" Not ranked (the output layer and pass-through layers such as Flatten): {', '.join(map(str, mvl['excluded']))}."
    return {"description": description, "table": table}


def _gain_column(run: Run, lsa: pd.DataFrame, layers, configs) -> tuple[str, np.ndarray] | None:
    """Each layer's own gain (``re_gain``) under the ranking configuration: its header and values, or None."""
    mvl = run.mvl or {}
    if "re_gain" not in lsa.columns or not mvl.get("attack"):
        return None
    for j, (attack, eps, norm, _) in enumerate(configs):
        if attack == mvl["attack"] and (_isnan(eps) if mvl.get("eps") is None else
                                        not _isnan(eps) and np.isclose(eps, float(mvl["eps"]))):
            label = _config_label(attack, eps, norm, show_norm=False)
            return f"Gain re_gain ({label})", _re_matrix(lsa, layers, configs[j:j + 1], "re_gain")[:, 0]
    return None


def _layers_section(run: Run, palette: Palette, mvl_names: set[str]) -> dict:
    lsa = run.lsa
    ranked_by = (run.mvl or {}).get("metric", "re_mean")
    # the RE shown: the ranking's own column, or re_mean when the ranking is by gain (shown in its own column)
    metric = ranked_by if ranked_by in lsa.columns and ranked_by != "re_gain" else "re_mean"
    layers, configs = _layers(lsa), _configs(lsa)
    show_norm = lsa.loc[lsa["eps"].notna(), "norm"].nunique() > 1
    mat = _re_matrix(lsa, layers, configs, metric)
    figures = [plot_heatmap(layers, configs, mat, mvl_names, metric, show_norm),
               plot_profile(layers, configs, mat, mvl_names, palette, metric, show_norm)]
    gain = _gain_column(run, lsa, layers, configs)
    columns = [Column("#", True), Column("Layer"), Column("Type")]
    columns += [Column(gain[0], True)] if gain is not None else []
    columns += [Column(_config_label(a, e, n, show_norm=show_norm), True) for a, e, n, _ in configs]
    rows = []
    for i, (order, name, ltype) in enumerate(layers):
        cells = [num_cell(order), Cell(name, cls="layer"), Cell(ltype)]
        cells += [num_cell(gain[1][i], fmt_re)] if gain is not None else []
        cells += [num_cell(v, fmt_re) for v in mat[i]]
        rows.append(Row(cells, cls="mvl" if name in mvl_names else ""))
    caption = f"RE ({metric}) per layer; click a column header to sort."
    if gain is not None:
        caption = (f"RE ({metric}) per layer, and each layer's own gain under the ranking attack (its RE over the "
                   "RE of the layer before it; above 1: the layer amplifies the perturbation); click a column "
                   "header to sort.")
    table = Table(columns, rows, caption=caption)
    return {"metric": metric, "n_layers": len(layers), "n_configs": len(configs), "figures": figures, "table": table}


def _minimal_rows(df: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of minimal-perturbation attacks (CW, DeepFool): adversarial, no eps."""
    if df is None:
        return pd.DataFrame(columns=["attack"])
    return df[df["eps"].isna() & (df["kind"] == "adversarial") & ~df["attack"].isin([CLEAN, WORST_CASE])]


def _col(r, name: str) -> Any:
    return getattr(r, name, None)


def _perturbation_table(acc: pd.DataFrame, after: pd.DataFrame | None) -> Table | None:
    """Minimal-perturbation attacks by the size of the perturbation they needed, never by accuracy."""
    rows_before = _minimal_rows(acc)
    if rows_before.empty:
        return None
    columns = [Column("Attack"), Column("Norm"), Column("Success rate", True), Column("Median perturbation", True),
               Column("90th percentile", True), Column("Samples", True)]
    after_map = {}
    if after is not None:
        columns += [Column("Median after hardening", True), Column("Success rate after", True)]
        after_map = {r.attack: r for r in _minimal_rows(after).itertuples(index=False)}
    rows = []
    for r in rows_before.itertuples(index=False):
        cells = [Cell(attack_name(r.attack)), Cell(r.norm), num_cell(_col(r, "success_rate"), fmt_pct),
                 num_cell(_col(r, "pert_median"), fmt_re), num_cell(_col(r, "pert_p90"), fmt_re),
                 num_cell(_col(r, "n_samples"))]
        if after is not None:
            a = after_map.get(r.attack)
            cells += [num_cell(_col(a, "pert_median"), fmt_re), num_cell(_col(a, "success_rate"), fmt_pct)]
        rows.append(Row(cells))
    return Table(columns, rows, caption=(
        "Minimal-perturbation attacks (no eps): the share of correctly classified samples they fooled and the "
        "norm of the perturbation that fooled them (a larger perturbation means a more robust model). Their "
        "accuracy is not a robust accuracy and is not shown."))


def _accuracy_section(run: Run, hardened: Run | None, palette: Palette) -> dict | None:
    acc = run.accuracy
    if acc is None:
        return None
    after = hardened.accuracy if hardened is not None else None
    plot = plot_accuracy(acc, after, palette)
    perturbation = _perturbation_table(acc, after)
    acc = acc.drop(index=_minimal_rows(acc).index)
    columns = [Column("Attack"), Column("Kind"), Column("Norm"), Column("eps", True), Column("Accuracy", True),
               Column("Success rate", True), Column("Samples", True)]
    after_map = {}
    if after is not None:
        columns += [Column("Hardened", True), Column("Change", True)]
        after_map = {(a, fmt_eps(e), n): v for a, e, n, v in after[["attack", "eps", "norm", "accuracy"]].itertuples(index=False)}
    rows = []
    for r in acc.itertuples(index=False):
        cells = [Cell(attack_name(r.attack)), Cell(r.kind if r.attack != CLEAN else ""),
                 Cell(r.norm if not _isnan(r.eps) else ""), num_cell(r.eps, fmt_eps), num_cell(r.accuracy, fmt_pct),
                 num_cell(_col(r, "success_rate"), fmt_pct), num_cell(getattr(r, "n_samples", None))]
        if after is not None:
            v = after_map.get((r.attack, fmt_eps(r.eps), r.norm))
            cells += [num_cell(v, fmt_pct), num_cell(None if v is None else v - r.accuracy, fmt_points)]
        rows.append(Row(cells, cls="strong" if r.attack in (CLEAN, WORST_CASE) else ""))
    return {"figures": [plot] if plot else [], "perturbation": perturbation,
            "table": Table(columns, rows, caption=(
                "Accuracy under every attack with an eps budget; success rate: the share of correctly classified "
                "samples the attack fooled."))}


def _hardening_section(run: Run, hardened: Run | None, history, settings, acc_cmp, re_cmp) -> dict | None:
    if hardened is None and history is None and settings is None and acc_cmp.empty and re_cmp.empty:
        return None
    settings = settings or {}
    method = settings.get("method")
    bits = [f"Method: {METHOD_NAMES.get(str(method).lower(), method) if method else 'not recorded'}"]
    if settings.get("base_attack"):
        bits.append(f"base attack {attack_name(settings['base_attack'])}"
                    + (f" at eps {fmt_eps(settings['eps'])}" if settings.get("eps") is not None else ""))
    if settings.get("epochs") is not None:
        bits.append(f"{fmt_num(settings['epochs'])} epochs")
    description = "; ".join(bits) + "."
    regularized = settings.get("mvl_layers")
    if isinstance(regularized, list) and regularized:  # which rule chose them: the MVL list, or a control
        rule = settings.get("layers_rule")
        rule = rule if isinstance(rule, str) and rule else f"the {len(regularized)} most vulnerable layers (the MVL list)"
        description += f" Layers regularized: {rule} ({', '.join(map(str, regularized))})."
    figures, tables = [], []
    if history is not None:
        plot = plot_history(history)
        if plot:
            figures.append(plot)
    if not re_cmp.empty:
        plot = plot_re_before_after(re_cmp)
        if plot:
            figures.append(plot)
        tables.append(Table(
            [Column("Layer"), Column("Attack"), Column("eps", True), Column("RE before", True), Column("RE after", True),
             Column("Change", True)],
            [Row([Cell(r.layer, cls="mvl"), Cell(attack_name(r.attack)), num_cell(r.eps, fmt_eps), num_cell(r.before, fmt_re),
                  num_cell(r.after, fmt_re), num_cell(r.delta, fmt_re)]) for r in re_cmp.itertuples(index=False)],
            caption="RE of the MVL layers before and after hardening."))
    if not acc_cmp.empty and (hardened is None or hardened.accuracy is None):  # else section 3 shows it
        tables.append(Table(
            [Column("Attack"), Column("Norm"), Column("eps", True), Column("Before", True), Column("After", True),
             Column("Change", True)],
            [Row([Cell(attack_name(r.attack)), Cell("" if _isnan(r.eps) else r.norm), num_cell(r.eps, fmt_eps),
                  num_cell(r.before, fmt_pct), num_cell(r.after, fmt_pct), num_cell(r.delta, fmt_points)],
                 cls="strong" if r.attack in (CLEAN, WORST_CASE) else "")
             for r in acc_cmp.itertuples(index=False) if not (_isnan(r.eps) and r.attack != CLEAN)],
            caption="Accuracy before and after hardening (attacks with an eps budget)."))
    if history is not None and not history.empty:
        pct_cols = set(ACCURACY_HISTORY_COLUMNS)
        tables.append(Table(
            [Column(c, True) for c in history.columns],
            [Row([num_cell(v, fmt_pct if c in pct_cols else fmt_num) for c, v in zip(history.columns, r)])
             for r in history.itertuples(index=False)],
            caption="Training history per epoch (accuracies on the validation split)."))
    return {"description": description,
            "settings": _kv_table(_flatten(settings), caption="harden.json") if settings else None,
            "figures": figures, "tables": tables}


def _checks_note(model_checks: dict | None) -> str:
    """How many samples the model checks used and what they cost next to the battery."""
    if not model_checks or model_checks.get("n_samples") is None:
        return ""
    n = int(model_checks["n_samples"])
    text = f"The model checks used {n} sample{'s' if n != 1 else ''}"
    plan = model_checks.get("plan") or {}
    if plan.get("share") is not None:
        text += (f", sized to cost at most {100 * plan['share']:.0f} % of the battery "
                 f"({plan.get('check_cost_per_sample', 0):.3g} vs {plan.get('battery_cost_per_sample', 0):.3g} "
                 "forward+backward passes per sample)")
    if plan.get("note"):  # e.g. raised to the samples a conclusive comparison needs, beyond the share
        text += f" ({plan['note']})"
    if plan.get("reused"):
        text += "; reused the battery's own " + " and ".join(
            {"fgsm": "FGSM", "pgd10": "PGD-10"}.get(k, k) for k in plan["reused"]) + " outcomes"
    if model_checks.get("seconds") is not None and model_checks.get("battery_seconds"):
        text += f"; they took {model_checks['seconds']:.3g} s against the battery's {model_checks['battery_seconds']:.3g} s"
    if model_checks.get("skipped"):
        text += f" ({model_checks['skipped']})"
    elif (model_checks.get("attacks") or {}).get("skipped"):
        text += f"; no attack probes ran ({model_checks['attacks']['skipped']})"
    return text + "."


def _sanity_group(title: str, checks: list[sanity.Check], model_checks: dict | None = None, *,
                  introduced: list[str] = ()) -> dict:
    warns = [c for c in checks if c.status == "warn"]
    new = ("Hardening introduced " + ("a warning" if len(introduced) == 1 else f"{len(introduced)} warnings")
           + " that the audited model did not have (" + "; ".join(introduced) + "): the classic sign of a defence "
           "that only masks gradients. Do not read the hardened accuracies as robustness until a stronger or "
           "gradient-free attack confirms them.") if introduced else ""
    rows = [Row([Cell(Markup('<span class="badge {0}">{0}</span>').format(c.status), c.status),
                 Cell(c.name), Cell(c.detail, cls="wrap"), Cell(getattr(c, "threshold", ""), cls="wrap")])
            for c in checks]
    return {"title": title, "introduced": new, "note": _checks_note(model_checks),
            "warn": f"{len(warns)} of {len(checks)} checks warn." if warns else "",
            "table": Table([Column("Status"), Column("Check"), Column("Numbers"), Column("Threshold")], rows)}


def _sanity_sentence(who: str, checks: list[sanity.Check]) -> Markup:
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "skip")}
    skipped = f" ({counts['skip']} skipped for lack of data)" if counts["skip"] else ""
    if not counts["warn"]:
        return Markup("{}: all {} sanity checks that ran pass{}.").format(who, counts["pass"], skipped)
    names = "; ".join(c.name for c in checks if c.status == "warn")
    verb = "warns" if counts["warn"] == 1 else "warn"
    why = []
    if any(c.status == "warn" and c.name == sanity.CHANCE for c in checks):
        why.append("The model is at or near chance: every robustness number is noise.")
    if any(c.status == "warn" and c.name != sanity.CHANCE and getattr(c, "masking", True) for c in checks):
        why.append("The model may be masking gradients.")
    why += sorted({f"{c.meaning[:1].upper()}{c.meaning[1:]}." for c in checks
                   if c.status == "warn" and not getattr(c, "masking", True) and getattr(c, "meaning", "")})
    return Markup("{}: <strong>{} sanity check{} {}</strong>: {}. {} See section 5.{}").format(
        who, counts["warn"], "" if counts["warn"] == 1 else "s", verb, names, " ".join(why), Markup(skipped))


def _verdict(run: Run, hardened: Run | None, acc_cmp: pd.DataFrame, settings: dict | None,
             checks: list[sanity.Check], checks_after: list[sanity.Check] | None) -> dict:
    """The report's opening: plain sentences and number cards, each card warned by the checks it concerns."""
    man = run.manifest
    sentences: list[Markup] = []
    cards: list[dict] = []
    acc = run.accuracy
    clean, n = _clean_acc(acc)
    n = n if n is not None else man.get("n_samples")
    if clean is not None:
        sentences.append(Markup("Clean accuracy <strong>{}</strong> ({} samples).").format(fmt_pct(clean), fmt_num(n)))
        cards.append({"label": "Clean accuracy", "value": fmt_pct(clean), "sub": f"{fmt_num(n)} samples", "cls": "",
                      "concerns": [c for c in checks if c.name == sanity.CHANCE]})
    mvl = run.mvl or {}
    _verdict_worst_case(acc, mvl, checks, sentences, cards)
    _verdict_minimal(acc, sentences)
    _verdict_mvl(mvl, sentences, cards)
    if hardened is not None or not acc_cmp.empty:
        _verdict_hardening(acc_cmp, mvl, settings, checks_after, sentences, cards)
    _verdict_sanity(checks, checks_after, sentences, cards)
    return {"sentences": sentences, "cards": cards, "table": _verdict_table(acc, hardened.accuracy if hardened else None)}


def _verdict_worst_case(acc: pd.DataFrame | None, mvl: dict, checks, sentences: list, cards: list) -> None:
    """Worst case over the battery at the ranking eps (else the largest), and at the other eps."""
    worst = acc[(acc["attack"] == WORST_CASE) & acc["eps"].notna()].sort_values("eps") if acc is not None else None
    if acc is not None and worst is not None:
        head_eps = None
        if mvl.get("eps") is not None and _at_eps(acc, WORST_CASE, float(mvl["eps"])) is not None:
            head_eps = float(mvl["eps"])
        elif not worst.empty:
            head_eps = float(worst["eps"].iloc[-1])
        if head_eps is not None:
            head_norm = worst.loc[np.isclose(worst["eps"], head_eps), "norm"].iloc[0]
            w = _at_eps(acc, WORST_CASE, head_eps, head_norm)
            a = _at_eps(acc, str(mvl["attack"]), head_eps, head_norm) if mvl.get("attack") else None
            if a is not None:
                sentences.append(Markup("Under {} at eps {}, accuracy falls to <strong>{}</strong>; worst case over "
                                        "the battery <strong>{}</strong>.").format(
                    attack_name(mvl["attack"]), fmt_eps(head_eps), fmt_pct(a), fmt_pct(w)))
            else:
                sentences.append(Markup("At eps {}, worst-case accuracy over the battery is <strong>{}</strong>.").format(
                    fmt_eps(head_eps), fmt_pct(w)))
            cards.append({"label": "Worst-case accuracy", "value": fmt_pct(w), "sub": f"eps {fmt_eps(head_eps)} {head_norm}",
                          "cls": "", "concerns": checks})
            others = [(e, nm, v) for e, nm, v in worst[["eps", "norm", "accuracy"]].itertuples(index=False)
                      if not (np.isclose(e, head_eps) and nm == head_norm)]
            if others:
                sentences.append(Markup("Worst case at the other eps: {}.").format(
                    ", ".join(f"{fmt_pct(v)} at eps {fmt_eps(e)}" + (f" {nm}" if nm != head_norm else "")
                              for e, nm, v in others)))



def _verdict_minimal(acc: pd.DataFrame | None, sentences: list) -> None:
    """Minimal-perturbation attacks (CW, DeepFool) speak by success rate and perturbation size, not accuracy."""
    for r in _minimal_rows(acc).itertuples(index=False):
        if _isnan(_col(r, "pert_median")):
            continue
        sentences.append(Markup("{} (minimal perturbation) fools {} of the correctly classified samples with a median "
                                "{} perturbation of <strong>{}</strong> (90th percentile {}).").format(
            attack_name(r.attack), fmt_pct(_col(r, "success_rate")), r.norm, fmt_re(r.pert_median),
            fmt_re(_col(r, "pert_p90"))))



def _verdict_mvl(mvl: dict, sentences: list, cards: list) -> None:
    """The MVL list in a sentence, and its first layer as a card."""
    layers = mvl.get("layers") or []
    if layers:
        listed = ", ".join(f"{item.get('layer')} (RE {fmt_re(item.get('score'))})" for item in layers)
        where = f"{attack_name(mvl.get('attack', '?'))}" + (f" at eps {fmt_eps(mvl['eps'])}" if mvl.get("eps") is not None else "")
        sentences.append(Markup("The most vulnerable layers under {} are {}.").format(where, listed))
        cards.append({"label": "Most vulnerable layer", "value": str(layers[0].get("layer")),
                      "sub": f"RE {fmt_re(layers[0].get('score'))}; {len(layers)} MVL layers", "cls": ""})



def _verdict_hardening(acc_cmp: pd.DataFrame, mvl: dict, settings: dict | None, checks_after, sentences: list,
                       cards: list) -> None:
    """Worst-case and clean accuracy before and after hardening, from comparison.csv."""
    method = (settings or {}).get("method")
    method = METHOD_NAMES.get(str(method).lower(), method) if method else "hardening"
    parts = []
    for r in acc_cmp[acc_cmp["attack"] == WORST_CASE].dropna(subset=["delta"]).sort_values("eps").itertuples(index=False):
        verb = "rose" if r.delta >= 0 else "fell"
        parts.append(f"at eps {fmt_eps(r.eps)} it {verb} from {fmt_pct(r.before)} to {fmt_pct(r.after)} "
                     f"({fmt_points(r.delta)})")
    clean_rows = acc_cmp[acc_cmp["attack"] == CLEAN].dropna(subset=["delta"])
    if parts:
        sentences.append(Markup("After {}, worst-case accuracy changed: <strong>{}</strong>.").format(method, "; ".join(parts)))
    if not clean_rows.empty:
        r = clean_rows.iloc[0]
        sentences.append(Markup("Clean accuracy after {}: {} (was {}, {}).").format(
            method, fmt_pct(r["after"]), fmt_pct(r["before"]), fmt_points(r["delta"])))
    head = acc_cmp[acc_cmp["attack"] == WORST_CASE].dropna(subset=["delta"])
    if mvl.get("eps") is not None and not head.empty:
        match = head[np.isclose(head["eps"].astype(float), float(mvl["eps"]))]
        head = match if not match.empty else head
    if not head.empty:
        r = head.iloc[-1]
        cards.append({"label": "After hardening", "value": fmt_pct(r["after"]),
                      "sub": f"worst case, eps {fmt_eps(r['eps'])}: {fmt_points(r['delta'])}",
                      "cls": "pass" if r["delta"] > 0 else "", "concerns": checks_after or []})
    if not parts and clean_rows.empty:
        sentences.append(Markup("The model was hardened ({}), but no before/after accuracy was recorded.").format(method))



def _verdict_sanity(checks, checks_after, sentences: list, cards: list) -> None:
    """The sanity verdict of both models, what hardening introduced, and the warn marks on every card."""
    sentences.append(_sanity_sentence("Audited model", checks))
    if checks_after is not None:
        sentences.append(_sanity_sentence("Hardened model", checks_after))
        introduced = verdict.introduced_warnings(checks, checks_after)
        if introduced:
            sentences.append(Markup("<strong>Hardening introduced {}</strong> ({}): the classic sign of a defence "
                                    "that only masks gradients.").format(
                "a sanity warning" if len(introduced) == 1 else f"{len(introduced)} sanity warnings",
                "; ".join(introduced)))
    all_checks = checks + (checks_after or [])
    n_warn = sum(c.status == "warn" for c in all_checks)
    cards.append({"label": "Sanity checks", "value": f"{n_warn} warn" if n_warn else "all pass",
                  "sub": f"{sum(c.status == 'pass' for c in all_checks)} pass, {sum(c.status == 'skip' for c in all_checks)} skipped",
                  "cls": "warn" if n_warn else "pass"})
    for card in cards:  # a card is never green while a check that concerns its number warns
        concerns = card.pop("concerns", [])
        if any(c.status == "warn" for c in concerns):
            card["cls"] = "warn"
            card["sub"] += f"; {sum(c.status == 'warn' for c in concerns)} check(s) warn"


def _verdict_table(acc: pd.DataFrame | None, after: pd.DataFrame | None) -> Table | None:
    """Attack x eps accuracy matrix ("before -> after" for hardened runs)."""
    if acc is None:
        return None
    adv = acc[(acc["kind"] != "noise") & acc["eps"].notna()]
    if adv.empty:
        return None
    eps_cols = sorted({(n, float(e)) for e, n in adv[["eps", "norm"]].itertuples(index=False)})
    show_norm = len({n for n, _ in eps_cols}) > 1
    columns = [Column("Attack")] + [Column(f"eps {fmt_eps(e)}" + (f" {n}" if show_norm else ""), True) for n, e in eps_cols]
    attacks = sorted(adv["attack"].unique(), key=lambda a: (a == WORST_CASE, a))
    rows = []
    for attack in attacks:
        cells = [Cell(attack_name(attack))]
        for norm, eps in eps_cols:
            v = _at_eps(acc, attack, eps, norm)
            text = fmt_pct(v) if v is not None else ""
            if after is not None and v is not None:
                w = _at_eps(after, attack, eps, norm)
                if w is not None:
                    text += f" → {fmt_pct(w)}"
            cells.append(Cell(text, _sort_key(v) if v is not None else None, "num"))
        rows.append(Row(cells, cls="strong" if attack == WORST_CASE else ""))
    caption = "Accuracy under attack" + (" (before → after hardening)" if after is not None else "")
    return Table(columns, rows, caption=caption + ".", sortable=False)


def _run_files(run_dir: Path, depth: int = 3) -> Iterable[Path]:
    """The regular files of a run, ``depth`` levels deep, never through a symlink (a link is not the run's)."""
    try:
        entries = sorted(os.scandir(run_dir), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink() or entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False) and depth > 1:
            yield from _run_files(Path(entry.path), depth - 1)
        elif entry.is_file(follow_symlinks=False):
            yield Path(entry.path)


def _digest(path: Path) -> tuple[str, int]:
    """sha256 and size of a regular file, opened without following a symlink."""
    fd = safeio.open_regular(path, what="run file")
    h, size = hashlib.sha256(), 0
    with os.fdopen(fd, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _files_table(run_dir: Path, skip: Path) -> Table | None:
    rows = []
    for path in _run_files(run_dir):
        if path.suffix.lower() not in HASHED_SUFFIXES or os.path.abspath(path) == os.path.abspath(skip):
            continue
        try:
            digest, size = _digest(path)
        except (OSError, RobauditError):
            continue
        rows.append(Row([Cell(str(path.relative_to(run_dir))), num_cell(size), Cell(digest, cls="wrap")]))
    if not rows:
        return None
    return Table([Column("File"), Column("Bytes", True), Column("SHA-256")], rows,
                 caption="The machine-readable files behind this report, as they were when it was rendered.")


def _reproduce_section(run: Run, settings: dict | None, run_dir: Path, out: Path, shown: Path) -> dict:
    man = run.manifest
    commands = []
    if man.get("command"):
        commands.append({"title": "Rerun the audit", "text": str(man["command"])})
    if settings and settings.get("command"):
        commands.append({"title": "Rerun the hardening", "text": str(settings["command"])})
    commands.append({"title": "Render this report again", "text": f"robaudit report --run {shown}"})
    shown_manifest = {k: v for k, v in man.items() if k != "files"}  # the files table below lists them
    manifest = _kv_table(_flatten(shown_manifest), caption="manifest.json") if man else Table(
        [Column("Field"), Column("Value")], [Row([Cell("manifest.json"), Cell("missing")])], sortable=False)
    return {"commands": commands, "manifest": manifest, "files": _files_table(run_dir, out)}


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
    return Plot(_svg(fig, "batchnorm", "BatchNorm statistics: clean, adversarial and running"),
                "Per BatchNorm layer: how far clean and adversarial batch statistics lie from the running ones "
                "the model uses at test time, and from each other.")


def _batchnorm_section(run_dir: Path, shown: Path) -> dict | None:
    from .. import bnaudit

    bn = read_table(run_dir, "bn.csv")
    if bn is None or bn.empty:
        return None
    after = read_table(run_dir / "hardened", "bn.csv", root=run_dir) if (run_dir / "hardened").is_dir() else None
    v = bnaudit.verdict(bn)
    if v["recommend_dual_bn"]:
        sentence = Markup("Adversarial inputs shift the BatchNorm statistics <strong>{:.3g}x</strong> as far as clean "
                          "ones do ({:.3g} vs {:.3g}): the two domains want separate statistics (Xie &amp; Yuille). "
                          "Harden with separate clean BatchNorm statistics:").format(
            v["ratio"], v["adversarial_shift"], v["clean_shift"])
        command = f"robaudit harden --run {shown} --dual-bn"
    else:
        sentence = Markup("Adversarial inputs shift the BatchNorm statistics {:.3g}x as far as clean ones do "
                          "({:.3g} vs {:.3g}): no sign that BatchNorm mixes two domains.").format(
            v["ratio"], v["adversarial_shift"], v["clean_shift"])
        command = None
    rows = [Row([Cell(r["layer"]), Cell(r.get("layer_type", "")), num_cell(r.get("channels")),
                 num_cell(r.get("n_clean"))] + [num_cell(r[c], fmt_re) for c in BN_LABELS]
                + ([num_cell(_after_shift(after, r["layer"]), fmt_re)] if after is not None else []))
            for r in bn.to_dict("records")]
    columns = [Column("Layer"), Column("Type"), Column("Channels", True), Column("Values / domain", True)] + \
        [Column(BN_LABELS[c], True) for c in BN_LABELS] + \
        ([Column("adversarial vs clean, after hardening", True)] if after is not None else [])
    return {"sentence": sentence, "command": command, "threshold": v["threshold"],
            "plot": plot_batchnorm(bn, after), "table": Table(columns, rows)}


FRAGILE_SHOWN = 10


def _fragile_section(run_dir: Path) -> dict | None:
    """The samples fooled by the most configurations, from samples.csv, which the report links."""
    from ..samples import most_fragile

    samples = read_table(run_dir, "samples.csv")
    if samples is None:
        return None
    fragile = most_fragile(samples, FRAGILE_SHOWN)
    rows = [Row([num_cell(int(r["index"])), num_cell(int(r["label"])), num_cell(int(r["fooled_by"])),
                 Cell(r["fooled_configs"], cls="wrap")]) for r in fragile.to_dict("records")]
    n_conf = sum(c.endswith(":correct") for c in samples.columns)
    return {"href": "samples.csv", "n": len(samples), "n_configs": n_conf,
            "table": Table([Column("Index", True), Column("Label", True), Column("Fooled by", True),
                            Column("Configurations that fooled it")], rows) if rows else None}


def _after_shift(after: pd.DataFrame, layer: str) -> float | None:
    hit = after.loc[after["layer"] == layer, "adv_vs_clean"]
    return float(hit.iloc[0]) if len(hit) else None


# ------------------------------------------------------------------------------------ rendering


def _read_resource(name: str) -> str:
    try:
        return resources.files("robaudit.templates").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise RobauditError(f"robaudit's report template {name} is missing: reinstall robaudit") from exc


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_read_resource),
        autoescape=True,  # forced: select_autoescape would not cover a .j2 name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(css: str, script: str) -> str:
    """Nothing may load; only the inline stylesheet and script with exactly these contents may apply."""
    return (f"default-src 'none'; img-src data:; style-src {_csp_hash(css)}; script-src {_csp_hash(script)}; "
            "base-uri 'none'; form-action 'none'")


def _version() -> str:
    try:
        return metadata.version("robaudit")
    except metadata.PackageNotFoundError:
        return "unknown"


def _is_own_report(path: Path) -> bool:
    """A regular file (never through a symlink) whose head carries the generator tag of robaudit's template."""
    return is_own_report(path)


def check_page_out(out: Path, what: str = "report") -> None:
    """Refuse, in one line, to replace anything at ``out`` but a robaudit page: a symlink, a directory, a FIFO or a
    user's file stays as it is."""
    if out.is_symlink():
        raise RobauditError(f"{out} is a symbolic link: give --out a path of its own (robaudit replaces only its own "
                            f"{what}s)")
    if os.path.lexists(out) and not (out.is_file() and _is_own_report(out)):
        raise RobauditError(f"{out} exists and is not a robaudit {what}: choose another --out (robaudit replaces "
                            f"only its own {what}s)")


def _write_atomic(out: Path, text: str) -> None:
    """Write a page through an exclusive temporary file beside ``out`` (a random name, never followed), renamed
    into place; a full disk or an unwritable folder is one line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobauditError(f"cannot write {out} ({exc.strerror}): pass --out with a writable path") from exc
    _remove_stale_staging(out)  # what a killed render left beside the page (its exact name, its process gone)
    with safeio.atomic_file(out, binary=False) as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _hardened_run(run_dir: Path) -> Run | None:
    """``run_dir/hardened`` read back, or ``None`` when there is no hardened analysis to show."""
    check_inside(run_dir / "hardened", run_dir)
    if not (run_dir / "hardened").is_dir():
        return None
    hardened = read_run(run_dir / "hardened", required=(), root=run_dir)
    return hardened if hardened.lsa is not None or hardened.accuracy is not None else None


def _headline(man: dict, shown: Path) -> tuple[str, str]:
    """The report's title and the line under it: model, data set, samples, seed, when, model hash."""
    model = man.get("model") or {}
    dataset = man.get("dataset") or {}
    model_name = Path(str(model.get("path"))).name if model.get("path") else shown.name
    data_name = str(dataset.get("name") or "unknown data")
    sub = [f"data set {data_name}" + (f" ({dataset['split']} split)" if dataset.get("split") else "")]
    if man.get("n_samples") is not None:
        sub.append(f"{fmt_num(man['n_samples'])} samples")
    if man.get("seed") is not None:
        sub.append(f"seed {man['seed']}")
    if man.get("finished"):
        sub.append(f"finished {man['finished']}")
    if model.get("sha256"):
        sub.append(f"model sha256 {str(model['sha256'])[:12]}…")
    return f"Robustness audit: {model_name} on {data_name}", "; ".join(sub)


def render_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                  name: str | os.PathLike | None = None) -> Path:
    """Render ``run_dir`` into one self-contained HTML file; return its path (default ``<run_dir>/report.html``).

    ``name`` is the directory the report speaks of, when ``run_dir`` is a staging copy not yet renamed into place.
    """
    run_dir = Path(run_dir)
    shown = Path(name) if name is not None else run_dir
    try:
        is_dir = run_dir.is_dir()
    except OSError:
        is_dir = False
    if not is_dir:
        raise RobauditError(f"{run_dir} is not a robaudit run directory: run `robaudit analyze` first")
    if out is not None and Path(out).is_dir() and not Path(out).is_symlink():
        out = Path(out) / "report.html"
    out = Path(out) if out is not None else run_dir / "report.html"
    # one robaudit at a time writes the page: the run's lock for a report inside the run, else the page's own;
    # a staging copy (``name``) is the analysis' own and already locked
    inside_run = os.path.abspath(out.parent) == os.path.abspath(run_dir)
    with contextlib.nullcontext() if name is not None else write_lock(run_dir if inside_run else out):
        check_page_out(out)
        return _render(run_dir, out, shown)


def _render(run_dir: Path, out: Path, shown: Path) -> Path:
    """:func:`render_report` once the page may be written."""
    run = read_run(run_dir, required=("lsa.csv",))
    hardened = _hardened_run(run_dir)
    history = read_table(_find(run_dir, "history.csv"), "history.csv", root=run_dir)
    comparison = read_table(_find(run_dir, "comparison.csv"), "comparison.csv", root=run_dir)
    settings = read_document(_find(run_dir, "harden.json"), "harden.json", root=run_dir)
    hardened_any = hardened is not None or history is not None or comparison is not None or settings is not None

    mvl_layers = [str(item.get("layer")) for item in (run.mvl or {}).get("layers") or []]
    acc_cmp = _accuracy_comparison(comparison, run.accuracy)
    re_cmp = _re_comparison(comparison)
    num_classes = (run.manifest.get("dataset") or {}).get("num_classes")
    checks = verdict.checks_of(run)
    checks_after = None
    if hardened is not None and hardened.accuracy is not None:
        checks_after = verdict.checks_of(hardened, num_classes=num_classes)

    with matplotlib.rc_context(MPL_RC):
        palette = Palette([run.lsa, run.accuracy, hardened.accuracy if hardened else None])
        layers = _layers_section(run, palette, set(mvl_layers))
        accuracy = _accuracy_section(run, hardened, palette)
        hardening = _hardening_section(run, hardened, history, settings, acc_cmp, re_cmp) if hardened_any else None

    sanity_groups = [_sanity_group("Audited model" if checks_after is not None else "Checks", checks, run.checks)]
    if checks_after is not None:
        sanity_groups.append(_sanity_group("Hardened model", checks_after, hardened.checks,
                                           introduced=verdict.introduced_warnings(checks, checks_after)))
    title, subtitle = _headline(run.manifest, shown)
    css, script = _read_resource("report.css"), _read_resource("sort.js")
    context = {
        "title": title,
        "subtitle": subtitle,
        "version": _version(),
        "run_name": str(shown),
        "css": Markup(css),
        "script": Markup(script),
        "csp": content_security_policy(css, script),
        "verdict": _verdict(run, hardened, acc_cmp, settings, checks, checks_after),
        "layers": layers,
        "mvl": _mvl_section(run),
        "accuracy": accuracy,
        "hardening": hardening,
        "sanity": sanity_groups,
        "reproduce": _reproduce_section(run, settings, run_dir, out, shown),
        "batchnorm": _batchnorm_section(run_dir, shown),
        "fragile": _fragile_section(run_dir),
    }
    text = _environment().get_template(TEMPLATE).render(**context)
    _write_atomic(out, text)
    log.info("wrote %s (%.0f kB)", out, len(text.encode("utf-8")) / 1024)
    return out
