"""What a run says, in a form for the terminal and for scripts: accuracies, worst case, MVL, sanity verdict.

The report shows the same facts at length; :func:`summarize` is the JSON object that ``--json`` prints, and
:func:`sanity_lines` the lines that the terminal summary prints, so that a reader of CI logs sees the
sanity verdict too.
"""
from __future__ import annotations

import math
from typing import Any

from . import sanity
from .labels import CLEAN, WORST_CASE
from .rundir import Run
from .sources.spec import shown_model

SECTION_TITLE = "Evaluation sanity checks"
# What a warning of each check means, in a few words.
MEANING = {
    sanity.CHANCE: "the model is at chance: every other number is noise",
    sanity.PROBABILITIES: "attacks on probabilities see vanishing gradients",
    sanity.DETERMINISM: "a random forward pass defeats gradient attacks",
}
DEFAULT_MEANING = "gradients may be masked: the robust accuracies are upper bounds"


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def checks_of(run: Run, *, num_classes: int | None = None) -> list[sanity.Check]:
    """The sanity checks of a run, decided from its accuracy.csv and checks.json (``num_classes`` from its
    manifest unless given: a hardened run is judged against the audited run's data set)."""
    num_classes = num_classes or (run.manifest.get("dataset") or {}).get("num_classes")
    return sanity.evaluate(run.accuracy, run.checks, num_classes=num_classes)


def meaning(check: sanity.Check) -> str:
    """What a warning of ``check`` means, in a few words: its own (e.g. an attack that had not converged), its
    check's, or masked gradients."""
    return getattr(check, "meaning", "") or MEANING.get(check.name, DEFAULT_MEANING)


def short(check: sanity.Check) -> str:
    """One terminal line for a warning: the check, the numbers that tripped it (with the p-value that made them
    significant), what it means."""
    numbers = check.detail.split(": a ")[0].split(". ")[0].split("; ")[0].rstrip(".")
    if len(numbers) > 140:
        numbers = numbers[:137] + "..."
    p = getattr(check, "p_value", None)
    if p is not None and "p = " not in numbers and "p <= " not in numbers:
        numbers += f" (p = {p:.2g})"
    return f"{check.name}: {numbers} -> {meaning(check)}"


def sanity_verdict(checks: list[sanity.Check]) -> dict:
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "skip")}
    return {**counts, "all_pass": counts["warn"] == 0,
            "warnings": [{"check": c.name, "detail": c.detail, "threshold": c.threshold, "p_value": c.p_value,
                          "meaning": meaning(c), "line": short(c)}
                         for c in checks if c.status == "warn"]}


def verdict_line(checks: list[sanity.Check]) -> str:
    v = sanity_verdict(checks)
    skipped = f", {v['skip']} skipped" if v["skip"] else ""
    if v["all_pass"]:
        return f"sanity checks: all pass ({v['pass']} pass{skipped})"
    return f"sanity checks: {v['warn']} warn, {v['pass']} pass{skipped}"


def sanity_lines(checks: list[sanity.Check], *, report: str | None = None, run_dir: str | None = None) -> list[str]:
    """The verdict line, then one line per warning, then where the report explains them."""
    lines = [verdict_line(checks)]
    warns = [c for c in checks if c.status == "warn"]
    lines += [f"  warn: {short(c)}" for c in warns]
    if warns and report:
        lines.append(f"  see {report}#sanity (section 5, {SECTION_TITLE})")
    elif warns:
        lines.append(f"  see section 5 ({SECTION_TITLE}) of the report: robaudit report --run {run_dir or 'RUN'}")
    return lines


def introduced_warnings(before: list[sanity.Check], after: list[sanity.Check]) -> list[str]:
    """Checks that warn of masked gradients after hardening but did not before: the classic sign of a defence that
    masks gradients. Only a significant difference warns (each check's exact test at p < 0.01; an inconclusive one
    is ``skip``), so a change decided by a sample or two is never one; a warning that means something else (an
    attack that had not converged, a model at chance) is no sign of masking."""
    warned = {c.name for c in before if c.status == "warn" and getattr(c, "masking", True)}
    return [c.name for c in after if c.status == "warn" and getattr(c, "masking", True) and c.name not in warned]


def summarize(run: Run, checks: list[sanity.Check] | None = None) -> dict:
    """The JSON object of ``--json``: accuracies, worst case per eps, MVL, sanity verdict, run directory."""
    checks = checks_of(run) if checks is None else checks
    acc = run.accuracy
    cols = [c for c in ("attack", "eps", "norm", "kind", "accuracy", "ci_low", "ci_high", "n_samples", "success_rate",
                        "pert_median", "pert_p90") if c in acc.columns]
    rows = [{k: _num(v) for k, v in r.items()} for r in acc[cols].astype(object).where(acc[cols].notna(), None)
            .to_dict("records")]
    worst = acc[(acc["attack"] == WORST_CASE) & acc["eps"].notna()]
    clean = acc.loc[acc["attack"] == CLEAN, "accuracy"]
    mvl = run.mvl or {}
    return {
        "run_dir": str(run.path),
        "model": shown_model(run.manifest.get("model")),
        "dataset": (run.manifest.get("dataset") or {}).get("name"),
        "n_samples": run.manifest.get("n_samples"),
        "battery": run.manifest.get("battery"),
        "clean_accuracy": float(clean.iloc[0]) if len(clean) else None,
        "accuracy": rows,
        "worst_case": [{"eps": float(r.eps), "norm": getattr(r, "norm", None), "accuracy": float(r.accuracy),
                        "ci_low": _num(getattr(r, "ci_low", None)), "ci_high": _num(getattr(r, "ci_high", None))}
                       for r in worst.sort_values("eps").itertuples()],
        "mvl": {"attack": mvl.get("attack"), "eps": mvl.get("eps"), "metric": mvl.get("metric"),
                "layers": [{"layer": l.get("layer"), "layer_type": l.get("layer_type"), "score": l.get("score")}
                           for l in mvl.get("layers") or []]},
        "sanity": sanity_verdict(checks),
    }
