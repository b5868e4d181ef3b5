"""The plain-text tables the commands print: an analysis' summary and MVL table, a run's accuracies, a
hardening's before/after comparison, the bars' outcomes and the attack list.

Each function returns lines; a line may begin with blank lines (a new section). Names and values from a run
or a model may hold anything, so every line goes through :func:`terminal_line` on its way out, and a name
padded into a column is made :func:`printable` first (its width is then the one shown).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .sources.spec import shown_model

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text) -> str:
    """``text`` without control characters (C0, DEL, C1: no escape sequence from a file or a model reaches the
    terminal); tabs and line breaks become spaces, so a value stays on its line."""
    return _CONTROL.sub("", re.sub(r"[\t\n\r]", " ", str(text)))


def terminal_line(text) -> str:
    """``text`` made :func:`printable`, its leading blank lines kept."""
    text = str(text)
    body = text.lstrip("\n")
    return "\n" * (len(text) - len(body)) + printable(body)


def _eps(value) -> str:
    from .labels import format_eps

    return format_eps(value)


def _conversion_line(model) -> list[str]:
    """For a converted model (ONNX), how far its logits were from the original runtime's on the first inputs."""
    source = (model or {}).get("source") if isinstance(model, dict) else None
    if not isinstance(source, dict) or "onnx_max_abs_diff" not in source:
        return []
    forced = " (kept by --force-convert)" if source.get("onnx_forced") else ""
    return [f"ONNX conversion: largest logit difference from onnxruntime {source['onnx_max_abs_diff']:.3g} "
            f"({source.get('onnx_max_rel_diff', float('nan')):.3g} of the largest logit) on "
            f"{source.get('onnx_checked_inputs')} inputs{forced}"]


def analysis_summary(run) -> list[str]:
    """An analysis (:class:`~robaudit.stages.analyze.AnalysisRun`): its accuracies, its MVL table and where
    its outputs are."""
    from .normcheck import describe

    res = run.result
    norm = run.manifest.get("normalization") or {}
    stats = None if norm.get("mean") is None else (norm["mean"], norm["std"])
    clean = res.accuracy[res.accuracy["attack"] == "clean"].iloc[0]
    lines = [f"{shown_model(run.manifest['model'])} on {run.manifest['dataset']['name']} "
             f"({res.n_samples} samples, {res.seconds:.1f} s; 95% Wilson intervals in parentheses)",
             f"input normalization: {describe(stats)}", *_conversion_line(run.manifest.get("model")),
             f"clean accuracy: {_row_with_interval(clean)}", *_accuracy_by_eps(res.accuracy),
             *worst_case_note(run.manifest), *mvl_table(run.mvl), f"\nrun directory: {run.path}"]
    report = Path(run.path) / "report.html"
    if report.exists():
        lines.append(f"report: {report}")
    return lines


def with_interval(accuracy, low=None, high=None) -> str:
    """An accuracy and its interval as ``57.5% (48.6-66.0%)``; the interval left out where it is missing."""
    from .intervals import format_interval

    ci = format_interval(low, high)
    return f"{100 * float(accuracy):.1f}%" + (f" ({ci})" if ci else "")


def _row_with_interval(row) -> str:
    """An accuracy.csv row (a namedtuple or a Series) as :func:`with_interval` shows it."""
    return with_interval(row.accuracy, getattr(row, "ci_low", None), getattr(row, "ci_high", None))


def _accuracy_by_eps(acc) -> list[str]:
    """One line per eps with every attack's accuracy; minimal-perturbation attacks on a line of their own."""
    lines = []
    for eps_val, rows in acc[acc["attack"] != "clean"].groupby(acc["eps"].fillna(-1.0), sort=True):
        if eps_val < 0:  # minimal-perturbation attacks: the size they needed, not an accuracy
            lines.append(f"  minimal perturbation: {'; '.join(_minimal_item(r) for r in rows.itertuples())}")
            continue
        items = ", ".join(f"{r.attack} {_row_with_interval(r)}" for r in rows.itertuples())
        lines.append(f"  eps {_eps(eps_val)}: {items}")
    return lines


def _size(v) -> str:
    """A perturbation size for the terminal: ``inf`` for none that fooled, ``n/a`` when missing."""
    return "n/a" if v is None or v != v else f"{v:.3g}"


def _minimal_item(r) -> str:
    """A minimal-perturbation attack's row: its success rate, the median size over all samples (misclassified
    already: 0, never fooled: inf), which grows with robustness, and the median over the fooled ones."""
    text = f"{r.attack} fools {100 * r.success_rate:.1f}%"
    over_all = getattr(r, "pert_median_all", None)
    if over_all is not None and over_all == over_all:
        text += f", median {r.norm} {_size(over_all)} over all samples"
    if r.pert_median == r.pert_median:
        text += f", {_size(r.pert_median)} over the fooled"
    return text


def mvl_table(mvl) -> list[str]:
    """The Most Vulnerable Layers (:class:`~robaudit.lsa.MVL`): rank, layer, type, depth (when known) and score."""
    eps_txt = f" at eps {_eps(mvl.eps)}" if mvl.eps is not None else ""
    width = max([len(n) for n in mvl.names] + [5])
    has_depth = "depth" in mvl.layers
    depth_head = f" {'depth':>5}" if has_depth else ""
    lines = [f"\nMost Vulnerable Layers (ranked by {mvl.metric} under {mvl.attack}{eps_txt}):",
             f"  {'rank':>4}  {'layer':<{width}}  {'type':<14}{depth_head} {mvl.metric:>9}"]
    for i, r in enumerate(mvl.layers.itertuples(), 1):
        depth = f" {int(r.depth):>5}" if has_depth else ""
        lines.append(f"  {i:>4}  {printable(r.layer):<{width}}  {printable(r.layer_type):<14}{depth} {r.score:>9.4f}")
    if has_depth:
        lines.append("  (depth: the layer's position among the probed layers in forward order, 1 nearest the input)")
    if mvl.excluded:
        lines.append(f"  (not ranked: {', '.join(mvl.excluded)} -- output and pass-through layers; "
                     "--include-output ranks the output layer)")
    return lines


def accuracy_summary(run, run_dir: Path) -> list[str]:
    """A run's clean and worst-case accuracies, one line each (``run``: the :class:`~robaudit.rundir.Run` read
    from ``run_dir``)."""
    from .verdict import summarize

    summary = summarize(run)
    lines = [f"{summary['model']} on {summary['dataset']} ({summary['n_samples']} samples): {run_dir}"]
    clean = run.accuracy[run.accuracy["attack"] == "clean"]
    if len(clean):
        lines.append(f"clean accuracy: {_row_with_interval(clean.iloc[0])}")
    for w in summary["worst_case"]:
        lines.append(f"  worst case at eps {_eps(w['eps'])}: {with_interval(w['accuracy'], w['ci_low'], w['ci_high'])}")
    return lines + (worst_case_note(run.manifest) if summary["worst_case"] else [])


def worst_case_note(manifest) -> list[str]:
    """What the worst case is, and which battery produced it."""
    from .batteries import describe
    from .labels import WORST_CASE_MEANING

    return [f"  worst case = {WORST_CASE_MEANING}", f"  battery: {describe((manifest or {}).get('battery'))}"]


def harden_summary(done, *, warned: Iterable[str] = ()) -> list[str]:
    """A hardening (:class:`~robaudit.stages.harden.HardenRun`): its settings, the before/after comparison and
    where its outputs are; notes already shown as ``warned`` warnings are not repeated."""
    s, res = done.settings, done.result
    lines = [f"{s['method']} on {', '.join(s['mvl_layers']) or 'no layer'} (eps {_eps(s['eps'])}, "
             f"{s['epochs']} epochs, {s['seconds_training']:.1f} s); validation: {res.validation}",
             f"BatchNorm at test: {res.bn_at_test}"]
    if s.get("layers_rule"):
        lines.append(f"layers regularized: {s['layers_rule']}")
    warned = set(warned)
    lines += [f"note: {note}" for note in res.notes if note not in warned]
    from .rundir import read_run

    before, after = read_run(done.run_dir), read_run(done.hardened_dir)  # read once, as every run is: checked
    lines += _accuracy_before_after(done.comparison, before, after)
    lines += _perturbation_before_after(before, done.analysis.accuracy)
    lines += _re_before_after(done.comparison, s["mvl_ranking"]["metric"])
    return lines + [f"\nhardened model: {done.model_path}",
                    f"outputs: {done.hardened_dir}/ (history.csv, comparison.csv, harden.json, lsa.csv, "
                    "accuracy.csv, classes.csv, mvl.json)"]


def _accuracy_before_after(comp, before, after) -> list[str]:
    """The accuracy rows of a comparison: before and after with their 95 % intervals, the difference in points and
    whether it is more than the noise of the sample (exact McNemar on the two runs' samples.csv)."""
    import pandas as pd

    from .paired_runs import pair_samples, paired_tests

    acc = comp[comp["kind"] == "accuracy"]
    acc = acc[acc["eps"].notna() | (acc["attack"] == "clean")]  # minimal-perturbation attacks: no robust accuracy
    acc = paired_tests(acc.reset_index(drop=True), pair_samples(before.table("samples.csv"),
                                                                after.table("samples.csv")))
    keys = ["attack", "eps", "norm"]

    def keyed(frame):  # the clean row has no eps or norm: None in one frame, NaN in another
        return frame.assign(eps=pd.to_numeric(frame["eps"], errors="coerce").fillna(-1.0),
                            norm=frame["norm"].where(frame["norm"].notna(), ""))

    acc = keyed(acc)
    for tag, run in (("before", before), ("after", after)):
        cis = keyed(run.accuracy)[keys + ["ci_low", "ci_high"]]
        acc = acc.merge(cis.rename(columns={"ci_low": f"{tag}_low", "ci_high": f"{tag}_high"}), on=keys, how="left")
    acc["eps"] = acc["eps"].where(acc["eps"] >= 0)
    labels = [r.attack if r.eps is None or r.eps != r.eps else f"{r.attack} eps {_eps(r.eps)}"
              for r in acc.itertuples()]
    width = max([len(x) for x in labels] + [8])
    lines = [f"\n  {'accuracy':<{width}}  {'before (95% CI)':>21}  {'after (95% CI)':>21}  {'delta':>6}  paired test"]
    for label, r in zip(labels, acc.itertuples()):
        test = "no test" if r.p is None else f"p={r.p:.2g}, {'within' if r.within_noise else 'beyond'} noise"
        lines.append(f"  {label:<{width}}  {with_interval(r.before, r.before_low, r.before_high):>21}  "
                     f"{with_interval(r.after, r.after_low, r.after_high):>21}  {100 * r.delta:+6.1f}  {test}")
    return lines


def _perturbation_before_after(run, after_accuracy) -> list[str]:
    """The median perturbation each minimal-perturbation attack needed, before (the original run's) and after."""
    minimal = after_accuracy[after_accuracy["eps"].isna() & (after_accuracy["kind"] == "adversarial")]
    if not len(minimal):
        return []
    before = run.accuracy.set_index("attack")
    lines = []
    for r in minimal.itertuples():
        if r.attack not in before.index or "pert_median" not in before.columns:
            continue
        was = before.loc[r.attack]
        text = f"  {r.attack}: median {r.norm} perturbation"
        if "pert_median_all" in before.columns and was["pert_median_all"] == was["pert_median_all"]:
            text += f" over all samples {_size(was['pert_median_all'])} -> {_size(r.pert_median_all)};"
        lines.append(f"{text} to fool a fooled sample {_size(was['pert_median'])} -> {_size(r.pert_median)}")
    return lines


def _re_before_after(comp, metric: str) -> list[str]:
    """The RE rows of a comparison: each regularized layer's RE before and after."""
    re_rows = comp[comp["kind"] == "re"]
    if not len(re_rows):
        return []
    r0 = re_rows.iloc[0]
    eps_txt = f" eps {_eps(r0['eps'])}" if r0["eps"] == r0["eps"] and r0["eps"] is not None else ""
    lw = max([len(str(x)) for x in re_rows["layer"]] + [5])
    lines = [f"\nRE ({'re_mean' if metric == 're_gain' else metric}) of the regularized layers under "
             f"{r0['attack']}{eps_txt}:",
             f"  {'layer':<{lw}}  {'before':>8}  {'after':>8}"]
    for r in re_rows.itertuples():
        lines.append(f"  {printable(r.layer):<{lw}}  {r.before:8.4f}  {r.after:8.4f}")
    return lines


def comparison_lines(cmp) -> list[str]:
    """The accuracy rows of a comparison (:class:`~robaudit.stages.compare.Comparison`): A and B with their
    intervals, the difference and its paired test, marked within or beyond noise."""
    from .significance import NOISE_ALPHA, format_p

    both = cmp.accuracy[cmp.accuracy["a"].notna() & cmp.accuracy["b"].notna()]
    labels = [r.attack if r.eps != r.eps else f"{r.attack} eps {_eps(r.eps)}" for r in both.itertuples()]
    width = max([len(printable(x)) for x in labels] + [8])
    head = (f"accuracy, A -> B (95% Wilson intervals; exact McNemar test on the paired samples, within noise at "
            f"p >= {NOISE_ALPHA:g}):" if not cmp.unpaired else
            f"accuracy, A -> B (95% Wilson intervals); no paired test: {cmp.unpaired}")
    lines = [head]
    for label, r in zip(labels, both.itertuples()):
        a, b = with_interval(r.a, r.a_ci_low, r.a_ci_high), with_interval(r.b, r.b_ci_low, r.b_ci_high)
        delta = f"  {100 * r.delta:+.1f} points"
        test = "" if r.p is None or r.p != r.p else \
            f", p = {format_p(r.p)}, {'within noise' if r.within_noise else 'beyond noise'}"
        lines.append(f"  {printable(label):<{width}}  {a} -> {b}{delta}{test}")
    only = len(cmp.accuracy) - len(both)
    return lines + ([f"  ({only} rows ran in one run only: the page lists them)"] if only else [])


def judgement_lines(judgement) -> list[str]:
    """The sanity verdict, the warnings hardening introduced and each bar's outcome
    (``judgement``: :class:`robaudit.gate.Judgement`), after a blank line."""
    from . import verdict

    report = judgement.run_dir / "report.html"
    lines = [""] + verdict.sanity_lines(
        judgement.checks, report=str(report) if report.exists() else None,
        run_dir=str(judgement.run_dir.parent if judgement.before else judgement.run_dir))
    lines += [f"  hardening introduced a warning the original model did not have: {name} -- the classic sign of "
              "a defence that only masks gradients" for name in judgement.introduced or []]
    return lines + [f"{'bar met' if o.met else 'MISSED'}: {o.bar.name} ({o.text})" for o in judgement.outcomes]


def attack_kinds() -> list[str]:
    """The attacks and noise baselines the spec language knows, with their parameters, and an example."""
    from .attacks import KINDS

    lines = []
    for k in KINDS.values():
        norms = k.norms or (k.norm,)
        params = ", ".join(f"{p}={v}" for p, v in k.defaults.items())
        eps = "eps, " if k.bounded else ""
        choice = (f"norm={k.norm} (or {', '.join(f'norm={n}' for n in norms if n != k.norm)}), "
                  if len(norms) > 1 else "")
        lines.append(f"{k.name:<11} {k.kind:<11} {'/'.join(norms):<7}  {k.description}")
        if eps or params or choice:
            lines.append(f"{'':<11} params: {eps}{choice}{params}".rstrip(", "))
    return lines + ["\ne.g. robaudit analyze MODEL -d digits --attack pgd:eps=8/255,steps=20 --attack "
                    "square:norm=L2,eps=0.5"]
