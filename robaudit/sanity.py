"""Evaluation sanity checks after Carlini et al. 2019, "On Evaluating Adversarial Robustness".

:func:`evaluate` reads an ``accuracy.csv`` frame and the ``checks.json`` dict that
:func:`robaudit.model_checks.run_model_checks` wrote, and decides pass / warn / skip, each with the numbers behind
it. A comparison warns only when an exact one-sided test (:mod:`robaudit.significance`) finds its difference
significant at :data:`ALPHA` (the p-value is in the message); otherwise it is inconclusive (``skip``), not a
warning. All thresholds live here, so re-rendering an old run applies them again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .labels import (BLACK_BOX_ATTACKS, CLEAN, ITERATIVE_ATTACKS, SINGLE_STEP_ATTACKS, attack_family, attack_name,
                     format_eps)
from .significance import ALPHA, MIN_PAIRED_SAMPLES, Paired, format_p, paired, rate_test

__all__ = [
    "Check",
    "CHANCE",
    "evaluate",
    "chance_threshold",
    "ITERATIVE",
    "WHITE_BOX",
    "MONOTONE",
    "LARGE_EPS",
    "MORE_STEPS",
    "PROBABILITIES",
    "GRADIENTS",
    "DETERMINISM",
    "NOT_CONVERGED",
    "BatteryPairs",
]

# Check names, in the order evaluate() returns them.
CHANCE = "Clean accuracy well above chance"
ITERATIVE = "Iterative attacks at least as strong as single-step ones"
WHITE_BOX = "White-box attacks at least as strong as black-box ones"
MONOTONE = "Accuracy non-increasing in eps"
LARGE_EPS = "Accuracy near zero at a very large eps"
MORE_STEPS = "More PGD steps do not help the model"
PROBABILITIES = "Outputs are logits, not probabilities"
GRADIENTS = "Input gradients non-zero and finite"
DETERMINISM = "Forward pass deterministic"

MASKING = "the model may be masking gradients, so the robust accuracies above are upper bounds"

# "Near zero": the accuracy an untargeted attack should reach at LARGE_EPS_VALUE.
LARGE_EPS_MAX_ACCURACY = 0.05
LARGE_EPS_VALUE = 0.5  # Linf, on inputs in [0, 1]
LARGE_EPS_STEPS = 10  # checks.json of older runs: their probe at LARGE_EPS_VALUE
# PGD-50 falling this far below PGD-10 (and significantly) means PGD-10 had not converged.
CONVERGENCE_GAP = 0.05
# "Well above chance": clean accuracy above 1/K plus this margin, or plus 3 binomial standard deviations of
# an at-chance model on n samples where that is larger (a chance-level model on a few samples can reach 1/K + 10 points).
CHANCE_MARGIN = 0.10
CHANCE_SIGMAS = 3.0
# Two forward passes of one batch may differ by this much (relative to the output scale).
DETERMINISM_RTOL = 1e-5
PROBABILITY_ATOL = 1e-4


@dataclass(frozen=True)
class Check:
    """One sanity check: its name, ``pass`` / ``warn`` / ``skip`` (``skip`` also when the data are inconclusive),
    the numbers behind the status, the threshold they were held to, the p-value that decided a statistical check,
    and whether a warning is a sign of masked gradients (``masking``) or of something else (``meaning`` says what)."""

    name: str
    status: str
    detail: str
    threshold: str = ""
    p_value: float | None = None
    masking: bool = True
    meaning: str = ""


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def _eps(e: float) -> str:
    return format_eps(e)


def _inconclusive(n: float | None) -> str:
    return f"inconclusive on {int(n)} samples" if n else "inconclusive (the sample count is not recorded)"


PAIRED_TEST = (f"one-sided exact McNemar test on the samples where the two disagree, a warning at p < {ALPHA:g}, "
               f"which needs at least {MIN_PAIRED_SAMPLES} samples")


# --------------------------------------------------------------------------- accuracy frame checks


def _attack_rows(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Adversarial rows with a finite eps, with a ``family`` column."""
    df = accuracy.copy()
    df["eps"] = pd.to_numeric(df["eps"], errors="coerce")
    df["accuracy"] = pd.to_numeric(df["accuracy"], errors="coerce")
    if "kind" not in df:
        df["kind"] = "adversarial"
    if "norm" not in df:
        df["norm"] = "Linf"
    df["norm"] = df["norm"].fillna("Linf")
    df = df[(df["kind"].fillna("adversarial") == "adversarial") & df["eps"].notna() & df["accuracy"].notna()]
    df = df[df["attack"].astype(str) != CLEAN]
    return df.assign(family=df["attack"].map(attack_family))


def _n(rows: pd.DataFrame) -> float | None:
    if "n_samples" not in rows:
        return None
    n = pd.to_numeric(rows["n_samples"], errors="coerce").dropna()
    return float(n.min()) if len(n) else None


class BatteryPairs:
    """The battery's per-sample pairs as ``checks.json`` records them (``battery_pairs``): ``rows`` are (attack,
    eps, norm) of ``accuracy.csv`` (the clean row, every configuration, the worst-case rows) and
    ``robust_only[i][j]`` counts the samples classified correctly under row i and wrongly under row j. A missing
    or malformed record holds nothing: the comparisons then take the pairing least favourable to a warning."""

    def __init__(self, raw) -> None:
        self.rows: list[tuple[str, float | None, str | None]] = []
        self.counts: list[list[int]] = []
        try:
            rows, counts = raw["rows"], raw["robust_only"]
            keys = [(str(a), None if e is None else float(e), None if m is None else str(m)) for a, e, m in rows]
            table = [[int(v) for v in line] for line in counts]
            if len(table) != len(keys) or any(len(line) != len(keys) or min(line, default=0) < 0 for line in table):
                return
        except (KeyError, TypeError, ValueError, OverflowError):
            return
        self.rows, self.counts = keys, table

    def _index(self, attack, eps, norm) -> int | None:
        for i, (a, e, m) in enumerate(self.rows):
            if a != str(attack):
                continue
            if a == CLEAN:
                return i
            if (e is None) != (eps is None or (isinstance(eps, float) and math.isnan(eps))):
                continue
            if e is not None and not math.isclose(e, float(eps), rel_tol=1e-9, abs_tol=1e-12):
                continue
            if m is None or norm is None or str(norm) == m:
                return i
        return None

    def pair(self, strong: tuple, weak: tuple) -> tuple[int, int] | None:
        """(robust under ``strong`` but fooled under ``weak``, the reverse) for two (attack, eps, norm) rows."""
        i, j = self._index(*strong), self._index(*weak)
        if i is None or j is None:
            return None
        return self.counts[i][j], self.counts[j][i]


def _counted(strong_acc: float, weak_acc: float, n: float | None, pair: tuple[int, int] | None) -> Paired | None:
    """Two attacks' accuracies on the same ``n`` samples as a :class:`Paired` comparison (None without ``n``)."""
    if not n:
        return None
    n = int(n)
    return paired(int(round(strong_acc * n)), int(round(weak_acc * n)), n, pair)


def _stronger_check(
    name: str,
    rows: pd.DataFrame,
    strong: frozenset[str],
    weak: frozenset[str],
    strong_word: str,
    weak_word: str,
    extra: list[tuple] = (),
    pairs: BatteryPairs | None = None,
) -> Check:
    """Per (eps, norm): the best attack of ``strong`` must leave no significantly more samples robust than the
    best of ``weak``, on the samples where the two disagree.

    ``extra`` holds comparisons from the model probes: (eps, norm, strong label, acc, weak label, acc, Paired, n).
    """
    comparisons = []  # (eps, norm, strong label, strong acc, weak label, weak acc, Paired or None, n)
    for (eps, norm), group in rows.groupby(["eps", "norm"], sort=True):
        s = group[group["family"].isin(strong)]
        w = group[group["family"].isin(weak)]
        if s.empty or w.empty:
            continue
        sb = s.loc[s["accuracy"].idxmin()]
        wb = w.loc[w["accuracy"].idxmin()]
        n = _n(group)
        pair = pairs.pair((sb["attack"], eps, norm), (wb["attack"], eps, norm)) if pairs is not None else None
        comparisons.append((eps, norm, attack_name(sb["attack"]), sb["accuracy"], attack_name(wb["attack"]),
                            wb["accuracy"], _counted(sb["accuracy"], wb["accuracy"], n, pair), n))
    comparisons += list(extra)
    threshold = (f"at each eps, the best {strong_word} attack leaves no more samples robust than the best "
                 f"{weak_word} one beyond chance ({PAIRED_TEST})")
    if not comparisons:
        return Check(name, "skip", f"no {strong_word} and {weak_word} attack ran at the same eps", threshold)
    parts = "All comparisons: " + "; ".join(
        f"eps {_eps(e)} {m}: {sl} {_pct(sa)} vs {wl} {_pct(wa)}" for e, m, sl, sa, wl, wa, _, _ in comparisons) + "."
    bad = [c for c in comparisons if c[6] is not None and c[6].significant]
    if bad:
        e, m, sl, sa, wl, wa, ev, _ = min(bad, key=lambda c: c[6].p)
        return Check(name, "warn", (
            f"{wl} ({weak_word}) leaves {_pct(wa)} accuracy at eps {_eps(e)} {m} but {sl} ({strong_word}) leaves "
            f"{_pct(sa)} ({ev.text(sl, wl)}): a {strong_word} attack should be at least as strong; {MASKING}. "
            + parts), threshold, p_value=ev.p)
    unclear = [c for c in comparisons if (c[6].excess if c[6] is not None else c[3] > c[5])]
    if unclear:
        e, m, sl, sa, wl, wa, ev, n = unclear[0]
        evidence = f" ({ev.text(sl, wl)})" if ev is not None else ""
        return Check(name, "skip", (
            f"{_inconclusive(n)}: {sl} ({strong_word}) leaves {_pct(sa)} at eps {_eps(e)} {m}, {wl} ({weak_word}) "
            f"{_pct(wa)}{evidence}, not significant at p < {ALPHA:g}; not a warning. " + parts), threshold,
            p_value=ev.p if ev is not None else None)
    return Check(name, "pass", parts[len("All comparisons: "):], threshold)


def _monotone_check(accuracy: pd.DataFrame, rows: pd.DataFrame, pairs: BatteryPairs | None = None) -> Check:
    clean = accuracy[accuracy["attack"].astype(str) == CLEAN]
    clean_acc = float(pd.to_numeric(clean["accuracy"], errors="coerce").iloc[0]) if len(clean) else None
    curves, bad, unclear = 0, [], []
    for (attack, norm), group in rows.groupby(["attack", "norm"], sort=True):
        group = group.sort_values("eps")
        n = _n(group)
        points = [(0.0, clean_acc, (CLEAN, None, None))] if clean_acc is not None else []
        points += [(e, a, (attack, e, norm)) for e, a in zip(group["eps"], group["accuracy"])]
        if len(points) < 2:
            continue
        curves += 1
        for (e0, a0, k0), (e1, a1, k1) in zip(points, points[1:]):
            if a1 <= a0:
                continue
            ev = _counted(a1, a0, n, pairs.pair(k1, k0) if pairs is not None else None)
            text = (f"{attack_name(attack)} ({norm}) rises from {_pct(a0)} at eps {_eps(e0)} to {_pct(a1)} at eps "
                    f"{_eps(e1)}")
            if ev is not None:
                name = attack_name(attack)
                weak = f"{name} at eps {_eps(e0)}" if k0[0] != CLEAN else "the clean inputs (misclassified)"
                text += f" ({ev.text(f'{name} at eps {_eps(e1)}', weak)})"
            (bad if ev is not None and ev.significant else unclear).append((text, ev, n))
    threshold = f"no rise between consecutive eps (clean accuracy at eps 0) beyond chance ({PAIRED_TEST})"
    if not curves:
        return Check(MONOTONE, "skip", "no attack ran at more than one eps", threshold)
    if bad:
        return Check(MONOTONE, "warn", "; ".join(t for t, _, _ in bad)
                     + f": a larger eps can only help the attacker; {MASKING}.", threshold,
                     p_value=min(ev.p for _, ev, _ in bad))
    if unclear:
        text, ev, n = unclear[0]
        return Check(MONOTONE, "skip", f"{_inconclusive(n)}: {text}, not significant at p < {ALPHA:g}; not a warning.",
                     threshold, p_value=ev.p if ev is not None else None)
    return Check(MONOTONE, "pass", f"{curves} accuracy curves (clean accuracy at eps 0) never rise with eps.", threshold)


def _large_eps_check(rows: pd.DataFrame, attacks: dict | None, n_checks: float | None) -> Check:
    threshold = (f"accuracy at most {_pct(LARGE_EPS_MAX_ACCURACY)} at eps >= {_eps(LARGE_EPS_VALUE)} Linf, beyond "
                 f"chance (one-sided exact binomial test against {_pct(LARGE_EPS_MAX_ACCURACY)}, a warning at "
                 f"p < {ALPHA:g})")
    if attacks and attacks.get("pgd_large") is not None:
        eps, acc, n = attacks["large_eps"], attacks["pgd_large"], n_checks
        source = f"PGD-{attacks.get('pgd_large_steps', LARGE_EPS_STEPS)} at eps {_eps(eps)} Linf (model checks)"
    else:
        large = rows[(rows["norm"] == "Linf") & (rows["eps"] >= LARGE_EPS_VALUE)]
        if large.empty:
            reason = (attacks or {}).get("skipped") or "model checks not run"
            if attacks and not attacks.get("skipped"):
                reason = (f"the model checks attack at the battery's own largest eps only; add "
                          f"--eps {_eps(LARGE_EPS_VALUE)} to run this check")
            return Check(LARGE_EPS, "skip", f"no attack ran at eps >= {_eps(LARGE_EPS_VALUE)} Linf ({reason}).",
                         threshold)
        best = large.loc[large["accuracy"].idxmin()]
        eps, acc, n = float(best["eps"]), float(best["accuracy"]), _n(large)
        source = f"{attack_name(best['attack'])} at eps {_eps(eps)} Linf"
    if acc <= LARGE_EPS_MAX_ACCURACY:
        return Check(LARGE_EPS, "pass", f"{source}: {_pct(acc)} accuracy.", threshold)
    if not n:
        return Check(LARGE_EPS, "skip", f"{_inconclusive(n)}: {source} leaves {_pct(acc)} accuracy; not a warning.",
                     threshold)
    k, n = int(round(acc * n)), int(n)
    p = rate_test(k, n, LARGE_EPS_MAX_ACCURACY)
    numbers = (f"{source} leaves {_pct(acc)} accuracy ({k} of {n} samples robust, expected <= "
               f"{_pct(LARGE_EPS_MAX_ACCURACY)}, exact binomial p = {format_p(p)})")
    if p < ALPHA:
        return Check(LARGE_EPS, "warn", f"{numbers}: an attack this large should break almost every input; {MASKING}.",
                     threshold, p_value=p)
    return Check(LARGE_EPS, "skip", f"{_inconclusive(n)}: {numbers}, not significant at p < {ALPHA:g}; not a warning.",
                 threshold, p_value=p)


NOT_CONVERGED = "the battery's PGD had not converged: its robust accuracies are upper bounds; use more steps"


def _probe_pair(attacks: dict, strong: str, weak: str, n: float | None) -> Paired | None:
    """The model probes ``strong`` and ``weak`` (``pgd50``, ``pgd10``, ``fgsm``) as a :class:`Paired` comparison,
    exact when ``checks.json`` recorded their per-sample pairs (``robust_only``)."""
    table = attacks.get("robust_only")
    pair = None
    try:
        pair = (int(table[strong][weak]), int(table[weak][strong]))
        if min(pair) < 0:
            pair = None
    except (KeyError, TypeError, ValueError, OverflowError):
        pair = None
    return _counted(attacks[strong], attacks[weak], n, pair)


def _more_steps_check(attacks: dict | None, n: float | None) -> Check:
    """PGD-50 and PGD-10 on the same samples: PGD-50 leaving significantly more of them robust is a sign of masked
    gradients; PGD-50 fooling significantly (and 5 points) more means the battery's PGD-10 had not converged."""
    threshold = (f"PGD-50 leaves no more samples robust than PGD-10 beyond chance ({PAIRED_TEST}); PGD-50 "
                 f"significantly and more than {100 * CONVERGENCE_GAP:.3g} points below PGD-10 means PGD-10 had not "
                 "converged")
    if not attacks or attacks.get("pgd10") is None or attacks.get("pgd50") is None:
        reason = (attacks or {}).get("skipped") or "model checks not run"
        return Check(MORE_STEPS, "skip", f"PGD-10 vs PGD-50 not compared ({reason}).", threshold)
    a10, a50 = attacks["pgd10"], attacks["pgd50"]
    numbers = f"PGD-10 {_pct(a10)}, PGD-50 {_pct(a50)} at eps {_eps(attacks['eps_max'])} Linf"
    if attacks.get("pgd10_source", "checks") != "checks":
        numbers += " (PGD-10 from the battery, on the same samples)"
    ev = _probe_pair(attacks, "pgd50", "pgd10", n)
    if ev is None or ev.n < MIN_PAIRED_SAMPLES:
        return Check(MORE_STEPS, "skip", (
            f"{_inconclusive(n)}: {numbers}; fewer than the {MIN_PAIRED_SAMPLES} samples a significant difference "
            f"needs at p < {ALPHA:g}, so no conclusion either way; not a warning."), threshold)
    if ev.significant:
        return Check(MORE_STEPS, "warn", f"{numbers} ({ev.text('PGD-50', 'PGD-10')}): more steps raised the accuracy; "
                     f"{MASKING}.", threshold, p_value=ev.p)
    if ev.reverse_p < ALPHA and a50 < a10 - CONVERGENCE_GAP:
        reverse = (f"{ev.good} samples robust to PGD-10 but fooled by PGD-50, {ev.bad} the reverse, "
                   + ("exact McNemar" if ev.exact else "for any pairing,") + f" p = {format_p(ev.reverse_p)}")
        return Check(MORE_STEPS, "warn", (
            f"{numbers} ({reverse}): PGD-50 finds significantly more adversarial examples, so the battery's PGD-10 "
            "had not converged and its robust accuracies overstate robustness (upper bounds). This is not a sign of "
            "masked gradients: rerun the battery with more steps, e.g. --attack pgd:steps=50."), threshold,
            p_value=ev.reverse_p, masking=False, meaning=NOT_CONVERGED)
    if ev.excess:
        return Check(MORE_STEPS, "skip", (
            f"{_inconclusive(ev.n)}: {numbers} ({ev.text('PGD-50', 'PGD-10')}), not significant at p < {ALPHA:g}; "
            "not a warning."), threshold, p_value=ev.p)
    return Check(MORE_STEPS, "pass", f"{numbers} ({ev.bad} vs {ev.good} samples robust to only one of them).",
                 threshold)


def chance_threshold(num_classes: int, n: float | None) -> float:
    """The clean accuracy a model must exceed to count as well above chance (1/K plus a margin)."""
    chance = 1.0 / num_classes
    sigma = math.sqrt(chance * (1 - chance) / n) if n else 0.0
    return min(1.0, chance + max(CHANCE_MARGIN, CHANCE_SIGMAS * sigma))


def _chance_check(accuracy: pd.DataFrame, num_classes: int | None) -> Check:
    clean = accuracy[accuracy["attack"].astype(str) == CLEAN]
    acc = pd.to_numeric(clean["accuracy"], errors="coerce").dropna()
    threshold = (f"clean accuracy above 1/K + max({100 * CHANCE_MARGIN:.3g} points, {CHANCE_SIGMAS:g} binomial "
                 "standard deviations at chance)")
    if not num_classes or num_classes < 2 or acc.empty:
        why = "the number of classes is not recorded" if acc.size else "no clean accuracy"
        return Check(CHANCE, "skip", f"not compared ({why}).", threshold)
    n = _n(clean)
    bar = chance_threshold(int(num_classes), n)
    threshold = f"clean accuracy above {_pct(bar)} ({threshold})"
    value = float(acc.iloc[0])
    numbers = (f"clean accuracy {_pct(value)}"
               + (f" on {int(n)} samples" if n else "") + f"; chance is {_pct(1 / num_classes)} ({num_classes} classes)")
    if value <= bar:
        return Check(CHANCE, "warn", (
            f"{numbers}: the model is at or near chance, so every robustness number in this report is noise; "
            "check the model file, its normalization (--mean/--std) and the data set."), threshold, masking=False)
    return Check(CHANCE, "pass", numbers + ".", threshold)


# ------------------------------------------------------------------------ model check rules


def _probability_check(outputs: dict | None) -> Check:
    threshold = f"warn when every output is in [0, 1] and every row sums to 1 within {PROBABILITY_ATOL:g}"
    if not outputs or outputs.get("min") is None:
        return Check(PROBABILITIES, "skip", "model checks not run.", threshold)
    lo, hi, err = outputs["min"], outputs["max"], outputs.get("max_row_sum_error")
    numbers = f"outputs in [{lo:.4g}, {hi:.4g}]" + ("" if err is None else f", row sums differ from 1 by up to {err:.2g}")
    if lo >= 0.0 and hi <= 1.0 and err is not None and err <= PROBABILITY_ATOL:
        return Check(PROBABILITIES, "warn", (
            f"{numbers}: the model outputs probabilities (softmax); cross-entropy on them saturates, so "
            f"gradient attacks are weakened and {MASKING}. Audit the model without its final softmax."), threshold)
    return Check(PROBABILITIES, "pass", numbers + ".", threshold)


def _gradient_check(gradients: dict | None) -> Check:
    threshold = "no sample with an all-zero input gradient; every gradient finite"
    if not gradients or gradients.get("zero_fraction") is None:
        return Check(GRADIENTS, "skip", "model checks not run.", threshold)
    frac, finite = gradients["zero_fraction"], gradients.get("finite", True)
    numbers = f"{_pct(frac)} of samples have an all-zero input gradient of the cross-entropy"
    numbers += "" if finite else "; some gradients or outputs are NaN or infinite"
    if gradients.get("error"):
        numbers += f" ({gradients['error']})"
    if frac > 0 or not finite:
        return Check(GRADIENTS, "warn", (
            f"{numbers}: gradient attacks have nothing to follow there (a rounding, sign or detached step, "
            f"or saturated outputs); {MASKING}."), threshold)
    return Check(GRADIENTS, "pass", numbers + ".", threshold)


def _determinism_check(determinism: dict | None) -> Check:
    threshold = f"outputs of two passes differ by at most {DETERMINISM_RTOL:g} (relative)"
    if not determinism or determinism.get("max_rel_diff") is None:
        return Check(DETERMINISM, "skip", "model checks not run.", threshold)
    diff = determinism["max_rel_diff"]
    numbers = f"two forward passes of one batch differ by at most {diff:.3g} (relative to the output scale)"
    if diff > DETERMINISM_RTOL:
        return Check(DETERMINISM, "warn", (
            f"{numbers}: the model is randomized in eval mode; attacks must average over its randomness "
            f"(EOT) or {MASKING}."), threshold)
    return Check(DETERMINISM, "pass", numbers + ".", threshold)


def evaluate(accuracy: pd.DataFrame | None, model_checks: dict | None = None, *,
             num_classes: int | None = None) -> list[Check]:
    """Decide every sanity check from an ``accuracy.csv`` frame and the ``checks.json`` dict.

    ``accuracy`` has the columns ``attack, eps, accuracy, n_samples, kind, norm``; either argument may be
    None, which turns the checks that need it into ``skip``. ``num_classes`` (the manifest's, or
    ``checks.json``'s) sets chance level for the clean-accuracy check. The comparisons of two attacks on the same
    samples read their per-sample pairs from ``checks.json`` (``battery_pairs``, and the probes' ``robust_only``)
    where it has them; without them they take the pairing least favourable to a warning.
    """
    if accuracy is None:
        accuracy = pd.DataFrame(columns=["attack", "eps", "accuracy", "n_samples", "kind", "norm"])
    rows = _attack_rows(accuracy)
    mc = model_checks or {}
    attacks = mc.get("attacks")
    n = mc.get("n_samples")
    pairs = BatteryPairs(mc.get("battery_pairs"))
    white = SINGLE_STEP_ATTACKS | ITERATIVE_ATTACKS

    probes = []
    if attacks and attacks.get("fgsm") is not None:
        eps = attacks["eps_max"]
        for key, label in (("pgd10", "PGD-10"), ("pgd50", "PGD-50")):
            if attacks.get(key) is not None:
                probes.append((eps, "Linf (model checks)", label, attacks[key], "FGSM", attacks["fgsm"],
                               _probe_pair(attacks, key, "fgsm", n), n))
        if len(probes) == 2:  # compare the stronger of the two PGD probes, as for the battery
            probes = [min(probes, key=lambda p: p[3])]

    return [
        _chance_check(accuracy, num_classes or mc.get("num_classes")),
        _stronger_check(ITERATIVE, rows, ITERATIVE_ATTACKS, SINGLE_STEP_ATTACKS, "iterative", "single-step", probes,
                        pairs),
        _stronger_check(WHITE_BOX, rows, white, BLACK_BOX_ATTACKS, "white-box", "black-box", pairs=pairs),
        _monotone_check(accuracy, rows, pairs),
        _large_eps_check(rows, attacks, n),
        _more_steps_check(attacks, n),
        _probability_check(mc.get("outputs")),
        _gradient_check(mc.get("gradients")),
        _determinism_check(mc.get("determinism")),
    ]
