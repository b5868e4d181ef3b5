"""Render a run directory into one self-contained HTML audit.

The file stands on its own: plots are inline SVG (matplotlib, no pyplot state), the stylesheet
and the table-sorting script are inlined and allowed by their sha256 hashes in a
Content-Security-Policy meta tag, and nothing is fetched. Every value that comes from the model
or the user (module names, paths, class names, command lines) is autoescaped by jinja2.
This module reads the run and builds the sections; the page kit (:mod:`.html`), the figures
(:mod:`.plots`) and the verdict (:mod:`.report_verdict`) are its parts.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np
import pandas as pd
from markupsafe import Markup

from .. import safeio, verdict
from ..errors import RobauditError
from ..cmdline import command_line, with_force
from ..labels import CLEAN, WORST_CASE, attack_name
from ..rundir import Run, check_inside, read_document, read_run, read_table
from ..fragile import FRAGILE_SHOWN
from .report_fragile import fragile_examples
from ..writelock import write_lock
from .html import (Cell, Column, Row, Table, check_page_out, content_security_policy, environment, flatten, fmt_eps,
                   fmt_num, fmt_pct, fmt_points, fmt_re, fmt_size, interval_cell, is_missing, kv_table, num_cell,
                   read_resource, version, write_atomic)
from .plots import (ACCURACY_HISTORY_COLUMNS, BN_LABELS, MPL_RC, Palette, config_label, plot_accuracy, plot_batchnorm,
                    plot_heatmap, plot_history, plot_profile, plot_re_before_after)
from .report_classes import classes_section
from .report_verdict import METHOD_NAMES, minimal_rows, sanity_group, value_of, verdict_section

__all__ = ["render_report"]

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
HASHED_SUFFIXES = (".csv", ".json", ".pt2", ".pt", ".pth", ".safetensors")


# ------------------------------------------------------------------------------------- loading


def _find(run: Path, name: str) -> Path:
    """The directory of a hardening output: ``hardened/`` when it holds one (never through a link out of the
    run), else the run itself."""
    inner = run / "hardened"
    check_inside(inner, run)
    return inner if os.path.lexists(inner / name) else run


# ---------------------------------------------------------------------------- the layer matrix


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
    """``metric`` per layer (rows) and configuration (columns); NaN where a layer was not probed."""
    index = {name: i for i, (_, name, _) in enumerate(layers)}
    mat = np.full((len(layers), len(configs)), np.nan)
    for j, (attack, eps, norm, _) in enumerate(configs):
        sel = (lsa["attack"] == attack) & (lsa["norm"] == norm)
        sel &= lsa["eps"].isna() if is_missing(eps) else np.isclose(lsa["eps"], eps)
        for name, value in lsa.loc[sel, ["layer", metric]].itertuples(index=False):
            mat[index[name], j] = value
    return mat


# ------------------------------------------------------------------------------------- sections


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
    depth = any(item.get("depth") is not None for item in layers)  # runs before depth was recorded have none
    rows = [Row([num_cell(i + 1), Cell(str(item.get("layer", "")), cls="layer"), Cell(str(item.get("layer_type", ""))),
                 *([num_cell(item.get("depth"))] if depth else []), num_cell(item.get("score"), fmt_re)], cls="mvl")
            for i, item in enumerate(layers)]
    columns = [Column("Rank", True), Column("Layer"), Column("Type"), *([Column("Depth", True)] if depth else []),
               Column("Score (RE)", True)]
    caption = "MVL list, most vulnerable first" + ("; depth: position among the probed layers in forward order, "
                                                    "1 nearest the input" if depth else "")
    table = Table(columns, rows, caption=caption)
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
        if attack == mvl["attack"] and (is_missing(eps) if mvl.get("eps") is None else
                                        not is_missing(eps) and np.isclose(eps, float(mvl["eps"]))):
            label = config_label(attack, eps, norm, show_norm=False)
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
    columns += [Column(config_label(a, e, n, show_norm=show_norm), True) for a, e, n, _ in configs]
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
    unprobed = sorted((run.manifest.get("unprobed_layers") or {}).items())
    folded = sorted((run.manifest.get("folded_layers") or {}).items())
    return {"metric": metric, "n_layers": len(layers), "n_configs": len(configs), "figures": figures, "table": table,
            "unprobed": unprobed, "folded": folded}


def _perturbation_table(acc: pd.DataFrame, after: pd.DataFrame | None) -> Table | None:
    """Minimal-perturbation attacks by the size of the perturbation they needed, never by accuracy."""
    rows_before = minimal_rows(acc)
    if rows_before.empty:
        return None
    columns = [Column("Attack"), Column("Norm"), Column("Success rate", True), Column("Median, all samples", True),
               Column("Median, fooled", True), Column("90th percentile, fooled", True), Column("Samples", True)]
    after_map = {}
    if after is not None:
        columns += [Column("Median, all, after hardening", True), Column("Success rate after", True)]
        after_map = {r.attack: r for r in minimal_rows(after).itertuples(index=False)}
    rows = []
    for r in rows_before.itertuples(index=False):
        cells = [Cell(attack_name(r.attack)), Cell(r.norm), num_cell(value_of(r, "success_rate"), fmt_pct),
                 num_cell(value_of(r, "pert_median_all"), fmt_size), num_cell(value_of(r, "pert_median"), fmt_re),
                 num_cell(value_of(r, "pert_p90"), fmt_re), num_cell(value_of(r, "n_samples"))]
        if after is not None:
            a = after_map.get(r.attack)
            cells += [num_cell(value_of(a, "pert_median_all"), fmt_size),
                      num_cell(value_of(a, "success_rate"), fmt_pct)]
        rows.append(Row(cells))
    return Table(columns, rows, caption=(
        "Minimal-perturbation attacks (no eps): the share of correctly classified samples they fooled and the "
        "norm of the perturbation each sample needed. The median over all samples counts a sample misclassified "
        "already as 0 and one never fooled as ∞: half of all samples are misclassified at that size, and a "
        "larger one means a more robust model. The median over the fooled samples alone can shrink as a model "
        "grows more robust (it is fooled only on its easiest samples). Their accuracy is not a robust accuracy "
        "and is not shown."))


def _accuracy_section(run: Run, hardened: Run | None, palette: Palette) -> dict | None:
    acc = run.accuracy
    if acc is None:
        return None
    after = hardened.accuracy if hardened is not None else None
    plot = plot_accuracy(acc, after, palette)
    perturbation = _perturbation_table(acc, after)
    acc = acc.drop(index=minimal_rows(acc).index)
    columns = [Column("Attack"), Column("Kind"), Column("Norm"), Column("eps", True), Column("Accuracy", True),
               Column("95 % CI", True), Column("Success rate", True), Column("Samples", True)]
    after_map = {}
    if after is not None:
        columns += [Column("Hardened", True), Column("Hardened 95 % CI", True), Column("Change", True)]
        after_map = {(r.attack, fmt_eps(r.eps), r.norm): r for r in after.itertuples(index=False)}
    rows = []
    for r in acc.itertuples(index=False):
        cells = [Cell(attack_name(r.attack)), Cell(r.kind if r.attack != CLEAN else ""),
                 Cell(r.norm if not is_missing(r.eps) else ""), num_cell(r.eps, fmt_eps), num_cell(r.accuracy, fmt_pct),
                 interval_cell(value_of(r, "ci_low"), value_of(r, "ci_high")), num_cell(value_of(r, "success_rate"), fmt_pct),
                 num_cell(getattr(r, "n_samples", None))]
        if after is not None:
            a = after_map.get((r.attack, fmt_eps(r.eps), r.norm))
            v = None if a is None else a.accuracy
            cells += [num_cell(v, fmt_pct), interval_cell(value_of(a, "ci_low"), value_of(a, "ci_high")),
                      num_cell(None if v is None else v - r.accuracy, fmt_points)]
        rows.append(Row(cells, cls="strong" if r.attack in (CLEAN, WORST_CASE) else ""))
    return {"figures": [plot] if plot else [], "perturbation": perturbation,
            "table": Table(columns, rows, caption=(
                "Accuracy under every attack with an eps budget, with its 95 % Wilson interval (the range the "
                "accuracy on all such data plausibly lies in, given this many samples); success rate: the share of "
                "correctly classified samples the attack fooled."))}


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
            [Row([Cell(attack_name(r.attack)), Cell("" if is_missing(r.eps) else r.norm), num_cell(r.eps, fmt_eps),
                  num_cell(r.before, fmt_pct), num_cell(r.after, fmt_pct), num_cell(r.delta, fmt_points)],
                 cls="strong" if r.attack in (CLEAN, WORST_CASE) else "")
             for r in acc_cmp.itertuples(index=False) if not (is_missing(r.eps) and r.attack != CLEAN)],
            caption="Accuracy before and after hardening (attacks with an eps budget)."))
    if history is not None and not history.empty:
        pct_cols = set(ACCURACY_HISTORY_COLUMNS)
        tables.append(Table(
            [Column(c, True) for c in history.columns],
            [Row([num_cell(v, fmt_pct if c in pct_cols else fmt_num) for c, v in zip(history.columns, r)])
             for r in history.itertuples(index=False)],
            caption="Training history per epoch (accuracies on the validation split)."))
    return {"description": description,
            "settings": kv_table(flatten(settings), caption="harden.json") if settings else None,
            "figures": figures, "tables": tables}


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
    if man.get("command"):  # the run (and its hardened/) exist: each command replaces them, as printed
        commands.append({"title": "Rerun the audit", "text": with_force(str(man["command"]))})
    if settings and settings.get("command"):
        commands.append({"title": "Rerun the hardening", "text": with_force(str(settings["command"]))})
    commands.append({"title": "Render this report again", "text": command_line("report", run=shown)})
    shown_manifest = {k: v for k, v in man.items() if k != "files"}  # the files table below lists them
    manifest = kv_table(flatten(shown_manifest), caption="manifest.json") if man else Table(
        [Column("Field"), Column("Value")], [Row([Cell("manifest.json"), Cell("missing")])], sortable=False)
    return {"commands": commands, "manifest": manifest, "files": _files_table(run_dir, out)}


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
        # an earlier harden is replaced (--force): the command must run as printed
        command = command_line("harden", run=shown, dual_bn=True, force=os.path.lexists(run_dir / "hardened"))
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
    return {"href": "samples.csv", "n": len(samples), "n_configs": n_conf, "examples": fragile_examples(run_dir),
            "table": Table([Column("Index", True), Column("Label", True), Column("Fooled by", True),
                            Column("Configurations that fooled it")], rows) if rows else None}


def _after_shift(after: pd.DataFrame, layer: str) -> float | None:
    hit = after.loc[after["layer"] == layer, "adv_vs_clean"]
    return float(hit.iloc[0]) if len(hit) else None


# ------------------------------------------------------------------------------------ rendering


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
    source = model.get("source") if isinstance(model.get("source"), dict) else None
    model_name = (str(source.get("spec")) if source and source.get("spec") else
                  Path(str(model.get("path"))).name if model.get("path") else shown.name)
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
        batchnorm = _batchnorm_section(run_dir, shown)  # in the report's style, with its fixed SVG ids

    sanity_groups = [sanity_group("Audited model" if checks_after is not None else "Checks", checks, run.checks)]
    if checks_after is not None:
        sanity_groups.append(sanity_group("Hardened model", checks_after, hardened.checks,
                                           introduced=verdict.introduced_warnings(checks, checks_after)))
    title, subtitle = _headline(run.manifest, shown)
    css, script = read_resource("report.css"), read_resource("sort.js")
    context = {
        "title": title,
        "subtitle": subtitle,
        "version": version(),
        "run_name": str(shown),
        "css": Markup(css),
        "script": Markup(script),
        "csp": content_security_policy(css, script),
        "verdict": verdict_section(run, hardened, acc_cmp, settings, checks, checks_after),
        "layers": layers,
        "mvl": _mvl_section(run),
        "accuracy": accuracy,
        "hardening": hardening,
        "sanity": sanity_groups,
        "reproduce": _reproduce_section(run, settings, run_dir, out, shown),
        "batchnorm": batchnorm,
        "fragile": _fragile_section(run_dir),
        "classes": classes_section(run_dir, run.accuracy, hardened.accuracy if hardened is not None else None),
    }
    text = environment().get_template(TEMPLATE).render(**context)
    write_atomic(out, text)
    log.info("wrote %s (%.0f kB)", out, len(text.encode("utf-8")) / 1024)
    return out
