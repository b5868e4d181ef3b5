"""Evaluation sanity checks after Carlini et al. 2019, "On Evaluating Adversarial Robustness".

Two halves:

- :func:`run_model_checks` probes a model on a small batch: outputs that are already probabilities,
  zero or non-finite input gradients, a forward pass that is not deterministic (the checks AutoAttack
  runs), and FGSM, PGD-10 and PGD-50 at the battery's own largest Linf eps (never a larger one),
  reusing the battery's own FGSM and PGD-10 outcomes where it ran them. :func:`plan_checks` sizes the
  sample count so that the checks cost at most :data:`CHECK_SHARE` of the battery. It returns raw
  numbers as a JSON-serializable dict, written to the run directory as ``checks.json``.
- :func:`evaluate` reads an ``accuracy.csv`` frame and that dict and decides pass / warn / skip, each
  with the numbers behind it. All thresholds live here, so re-rendering an old run applies them
  again.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

import pandas as pd

if TYPE_CHECKING:  # torch is imported lazily: evaluate() only needs pandas
    from torch import Tensor, nn

__all__ = [
    "Check",
    "attack_name",
    "format_eps",
    "CHANCE",
    "evaluate",
    "run_model_checks",
    "plan_checks",
    "CheckPlan",
    "CHECK_SHARE",
    "ITERATIVE",
    "WHITE_BOX",
    "MONOTONE",
    "LARGE_EPS",
    "MORE_STEPS",
    "PROBABILITIES",
    "GRADIENTS",
    "DETERMINISM",
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

# The model checks cost at most this share of the battery (in forward+backward passes per sample).
CHECK_SHARE = 0.10
# A forward pass alone counts as this share of a forward+backward pass (backward is about 2 forwards).
FORWARD_COST = 1.0 / 3.0
# The fixed cost of one pass over a batch, in samples: a pass over b samples costs b + CALL_OVERHEAD.
# Small models on CPU pay about this much per call (the digits CNN: 0.8 ms fixed, 0.056 ms per sample).
CALL_OVERHEAD = 16

# A difference of half a point, or of one sample on small sets, is noise rather than evidence.
MIN_TOLERANCE = 0.005
# "Near zero": the accuracy an untargeted attack should reach at LARGE_EPS_VALUE.
LARGE_EPS_MAX_ACCURACY = 0.05
LARGE_EPS_VALUE = 0.5  # Linf, on inputs in [0, 1]
LARGE_EPS_STEPS = 10  # checks.json of older runs: their probe at LARGE_EPS_VALUE
# PGD-50 falling this far below PGD-10 means PGD-10 had not converged.
CONVERGENCE_GAP = 0.05
# "Well above chance": clean accuracy above 1/K plus this margin, or plus 3 binomial standard deviations of
# an at-chance model on n samples where that is larger (a chance-level model on a few samples can reach 1/K + 10 points).
CHANCE_MARGIN = 0.10
CHANCE_SIGMAS = 3.0
# Two forward passes of one batch may differ by this much (relative to the output scale).
DETERMINISM_RTOL = 1e-5
PROBABILITY_ATOL = 1e-4

SINGLE_STEP_ATTACKS = frozenset({"fgsm", "ffgsm", "rfgsm", "fgm"})
ITERATIVE_ATTACKS = frozenset({
    "pgd", "pgdl2", "pgdrs", "pgdrsl2", "bim", "apgd", "apgdt", "mifgsm", "difgsm", "tifgsm",
    "vmifgsm", "vnifgsm", "nifgsm", "sinifgsm", "eotpgd", "tpgd", "upgd", "autoattack", "fab",
    "cw", "deepfool", "jsma", "sparsefool", "eaden", "eadl1", "jitter", "spsa",
})
BLACK_BOX_ATTACKS = frozenset({"square", "onepixel", "pixle", "simba", "hsja", "boundary"})
WORST_CASE = "worst-case"
CLEAN = "clean"
ATTACK_NAMES = {
    "clean": "clean", "worst-case": "worst case", "fgsm": "FGSM", "ffgsm": "FFGSM", "rfgsm": "R+FGSM",
    "pgd": "PGD", "pgdl2": "PGD-L2", "bim": "BIM", "apgd": "APGD", "apgdt": "APGD-T", "mifgsm": "MI-FGSM",
    "cw": "CW", "deepfool": "DeepFool", "fab": "FAB", "square": "Square", "autoattack": "AutoAttack",
    "gaussian": "Gaussian noise", "uniform": "uniform noise", "saltpepper": "salt-and-pepper noise",
}

# attack_fn(model, x, y, *, kind, eps, steps) -> adversarial x; kind is "fgsm" or "pgd" (Linf).
AttackFn = Callable[..., "Tensor"]


@dataclass(frozen=True)
class Check:
    """One sanity check: its name, ``pass`` / ``warn`` / ``skip``, the numbers behind the status, and the
    threshold the numbers were held to."""

    name: str
    status: str
    detail: str
    threshold: str = ""


def attack_family(label: str) -> str:
    """The base name of an attack label: ``"PGD-50"`` -> ``"pgd"``, ``"pgdl2"`` -> ``"pgdl2"``."""
    token = re.split(r"[^a-z0-9]+", str(label).strip().lower())[0]
    known = SINGLE_STEP_ATTACKS | ITERATIVE_ATTACKS | BLACK_BOX_ATTACKS
    if token in known:
        return token
    stripped = token.rstrip("0123456789")
    return stripped if stripped in known else token


def attack_name(label) -> str:
    """How an attack label of the CSVs reads in prose: ``"pgd" -> "PGD"``; unknown labels stay as they are."""
    text = str(label)
    head = re.match(r"[A-Za-z0-9_-]+", text)
    if head is None:
        return text
    return ATTACK_NAMES.get(head.group(0).lower(), head.group(0)) + text[head.end():]


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def format_eps(value: float) -> str:
    """An eps as the user wrote it: ``0.1`` stays ``0.1``, ``8/255`` stays ``8/255`` (not ``0.03137``)."""
    v = float(value)
    short = f"{v:.4g}"
    if not math.isfinite(v) or float(short) == v:
        return short
    frac = Fraction(v).limit_denominator(1024)
    if frac.denominator > 1 and abs(float(frac) - v) <= 1e-12 * max(1.0, abs(v)):
        return f"{frac.numerator}/{frac.denominator}"
    return short


def _eps(e: float) -> str:
    return format_eps(e)


def _tolerance_text(n: float | None) -> str:
    return (f"{100 * _tolerance(n):.2g} points (the larger of {100 * MIN_TOLERANCE:.2g} points and one sample"
            + (f" of {int(n)})" if n else ")"))


def _tolerance(n: float | None) -> float:
    if n is None or not n or (isinstance(n, float) and math.isnan(n)):
        return MIN_TOLERANCE
    return max(MIN_TOLERANCE, 1.0 / float(n))


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


def _stronger_check(
    name: str,
    rows: pd.DataFrame,
    strong: frozenset[str],
    weak: frozenset[str],
    strong_word: str,
    weak_word: str,
    extra: list[tuple[str, float, str, float, float, str, float]] = (),
) -> Check:
    """Per (eps, norm): the best attack of ``strong`` must reach an accuracy no higher than the best of ``weak``.

    ``extra`` holds comparisons from the model probes: (strong label, acc, weak label, acc, eps, norm,
    tolerance).
    """
    comparisons = []  # (eps, norm, strong label, strong acc, weak label, weak acc, tolerance)
    for (eps, norm), group in rows.groupby(["eps", "norm"], sort=True):
        s = group[group["family"].isin(strong)]
        w = group[group["family"].isin(weak)]
        if s.empty or w.empty:
            continue
        sb = s.loc[s["accuracy"].idxmin()]
        wb = w.loc[w["accuracy"].idxmin()]
        comparisons.append((eps, norm, attack_name(sb["attack"]), sb["accuracy"], attack_name(wb["attack"]),
                            wb["accuracy"], _tolerance(_n(group))))
    for s_label, s_acc, w_label, w_acc, eps, norm, tol in extra:
        comparisons.append((eps, norm, s_label, s_acc, w_label, w_acc, tol))
    tolerances = " or ".join(f"{100 * t:.2g}" for t in sorted({c[6] for c in comparisons}))
    threshold = (f"at each eps, the best {strong_word} attack's accuracy at most the best {weak_word} attack's + "
                 + (f"{tolerances} points" if tolerances else "a tolerance")
                 + f" (the larger of {100 * MIN_TOLERANCE:.2g} points and one sample)")
    if not comparisons:
        return Check(name, "skip", f"no {strong_word} and {weak_word} attack ran at the same eps", threshold)
    bad = [c for c in comparisons if c[3] > c[5] + c[6]]
    parts = [f"eps {_eps(e)} {n}: {sl} {_pct(sa)} vs {wl} {_pct(wa)}" for e, n, sl, sa, wl, wa, _ in comparisons]
    if bad:
        e, n, sl, sa, wl, wa, _ = bad[0]
        return Check(name, "warn", (
            f"{wl} ({weak_word}) leaves {_pct(wa)} accuracy at eps {_eps(e)} {n} but {sl} ({strong_word}) "
            f"leaves {_pct(sa)}: a {strong_word} attack should be at least as strong; {MASKING}. "
            + "All comparisons: " + "; ".join(parts) + "."), threshold)
    return Check(name, "pass", "; ".join(parts) + ".", threshold)


def _monotone_check(accuracy: pd.DataFrame, rows: pd.DataFrame) -> Check:
    clean = accuracy[accuracy["attack"].astype(str) == CLEAN]
    clean_acc = float(pd.to_numeric(clean["accuracy"], errors="coerce").iloc[0]) if len(clean) else None
    curves, bad = 0, []
    for (attack, norm), group in rows.groupby(["attack", "norm"], sort=True):
        group = group.sort_values("eps")
        points = [(0.0, clean_acc)] if clean_acc is not None else []
        points += list(zip(group["eps"], group["accuracy"]))
        if len(points) < 2:
            continue
        curves += 1
        tol = _tolerance(_n(group))
        for (e0, a0), (e1, a1) in zip(points, points[1:]):
            if a1 > a0 + tol:
                bad.append(f"{attack_name(attack)} ({norm}) rises from {_pct(a0)} at eps {_eps(e0)} to {_pct(a1)} at eps {_eps(e1)}")
    threshold = (f"no rise between consecutive eps (clean accuracy at eps 0) above {_tolerance_text(_n(rows))}")
    if not curves:
        return Check(MONOTONE, "skip", "no attack ran at more than one eps", threshold)
    if bad:
        return Check(MONOTONE, "warn", "; ".join(bad) + f": a larger eps can only help the attacker; {MASKING}.",
                     threshold)
    return Check(MONOTONE, "pass", f"{curves} accuracy curves (clean accuracy at eps 0) never rise with eps.", threshold)


def _large_eps_check(rows: pd.DataFrame, attacks: dict | None) -> Check:
    threshold = f"accuracy at most {_pct(LARGE_EPS_MAX_ACCURACY)} at eps >= {_eps(LARGE_EPS_VALUE)} Linf"
    if attacks and attacks.get("pgd_large") is not None:
        eps, acc = attacks["large_eps"], attacks["pgd_large"]
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
        eps, acc = float(best["eps"]), float(best["accuracy"])
        source = f"{attack_name(best['attack'])} at eps {_eps(eps)} Linf"
    if acc > LARGE_EPS_MAX_ACCURACY:
        return Check(LARGE_EPS, "warn", (
            f"{source} leaves {_pct(acc)} accuracy (expected <= {_pct(LARGE_EPS_MAX_ACCURACY)}): an attack this "
            f"large should break almost every input; {MASKING}."), threshold)
    return Check(LARGE_EPS, "pass", f"{source}: {_pct(acc)} accuracy.", threshold)


def _more_steps_check(attacks: dict | None, n: float | None) -> Check:
    """PGD-50 and PGD-10 run on the same samples from the same random start: a single sample more left
    robust by PGD-50 is a warning (no tolerance that one or two samples could hide behind)."""
    threshold = (f"PGD-50 leaves no more samples robust than PGD-10 (0 samples tolerance from the same random "
                 f"start, 1 sample against the battery's PGD-10), and at most "
                 f"{100 * CONVERGENCE_GAP:.3g} points below it (else PGD-10 had not converged)")
    if not attacks or attacks.get("pgd10") is None or attacks.get("pgd50") is None:
        reason = (attacks or {}).get("skipped") or "model checks not run"
        return Check(MORE_STEPS, "skip", f"PGD-10 vs PGD-50 not compared ({reason}).", threshold)
    a10, a50 = attacks["pgd10"], attacks["pgd50"]
    where = f"at eps {_eps(attacks['eps_max'])} Linf"
    # The battery's PGD-10 started from its own random point: one sample may differ by the start alone.
    own_start = attacks.get("pgd10_source", "checks") == "checks"
    numbers = f"PGD-10 {_pct(a10)}, PGD-50 {_pct(a50)} {where}"
    if not own_start:
        numbers += " (PGD-10 from the battery, on the same samples)"
    if n:
        c10, c50 = round(a10 * n), round(a50 * n)
        numbers += f" ({c10} vs {c50} of {int(n)} samples robust)"
        more = c50 > c10 + (0 if own_start else 1)
    else:
        more = a50 > a10 + (1e-12 if own_start else MIN_TOLERANCE)
    if more:
        return Check(MORE_STEPS, "warn", f"{numbers}: more steps raised the accuracy; {MASKING}.", threshold)
    if a50 < a10 - CONVERGENCE_GAP:
        return Check(MORE_STEPS, "warn", (
            f"{numbers}: PGD-10 had not converged, so attacks with few steps overstate robustness; "
            "rerun the battery with more steps."), threshold)
    return Check(MORE_STEPS, "pass", numbers + ".", threshold)


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
            "check the model file, its normalization (--mean/--std) and the data set."), threshold)
    return Check(CHANCE, "pass", numbers + ".", threshold)


# ------------------------------------------------------------------------------- model checks


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
    ``checks.json``'s) sets chance level for the clean-accuracy check.
    """
    if accuracy is None:
        accuracy = pd.DataFrame(columns=["attack", "eps", "accuracy", "n_samples", "kind", "norm"])
    rows = _attack_rows(accuracy)
    mc = model_checks or {}
    attacks = mc.get("attacks")
    n = mc.get("n_samples")
    white = SINGLE_STEP_ATTACKS | ITERATIVE_ATTACKS

    probes = []
    if attacks and attacks.get("fgsm") is not None:
        eps, tol = attacks["eps_max"], _tolerance(n)
        for key, label in (("pgd10", "PGD-10"), ("pgd50", "PGD-50")):
            if attacks.get(key) is not None:
                probes.append((label, attacks[key], "FGSM", attacks["fgsm"], eps, "Linf (model checks)", tol))
        if len(probes) == 2:  # compare the stronger of the two PGD probes, as for the battery
            probes = [min(probes, key=lambda p: p[1])]

    return [
        _chance_check(accuracy, num_classes or mc.get("num_classes")),
        _stronger_check(ITERATIVE, rows, ITERATIVE_ATTACKS, SINGLE_STEP_ATTACKS, "iterative", "single-step", probes),
        _stronger_check(WHITE_BOX, rows, white, BLACK_BOX_ATTACKS, "white-box", "black-box"),
        _monotone_check(accuracy, rows),
        _large_eps_check(rows, attacks),
        _more_steps_check(attacks, n),
        _probability_check(mc.get("outputs")),
        _gradient_check(mc.get("gradients")),
        _determinism_check(mc.get("determinism")),
    ]


# --------------------------------------------------------------------------------- model probes


# Per-sample cost of one attack configuration in forward+backward passes: a lower bound (attacks that
# stop early, or on fooled samples, cost at least this), so the checks never outgrow their share.
def attack_cost(spec, *, num_classes: int) -> float:
    """A lower bound on what ``spec`` costs per sample, in forward+backward passes."""
    p = spec.param_dict
    name = spec.name
    if spec.kind == "noise":
        return 0.0
    if name == "fgsm":
        return 1.0
    if name in ("pgd", "pgdl2", "cw"):
        return float(p["steps"])
    if name == "deepfool":  # at least one Jacobian of every logit
        return float(num_classes)
    if name == "autoattack":  # at least APGD-CE's 100 iterations
        return 100.0
    if name == "square":  # at least one query
        return FORWARD_COST
    return 1.0


def battery_cost(specs, *, num_classes: int) -> float:
    """Per-sample cost of the battery: the clean rows of the hooked pass, and per configuration its attack
    plus its perturbed rows of that pass."""
    return FORWARD_COST + sum(attack_cost(s, num_classes=num_classes) + FORWARD_COST for s in specs)


def _reusable(spec, eps_max: float | None) -> str | None:
    """``"pgd10"`` or ``"fgsm"`` when the battery's configuration is that probe at ``eps_max``."""
    if eps_max is None or spec.norm != "Linf" or spec.eps is None or not math.isclose(spec.eps, eps_max):
        return None
    p = spec.param_dict
    if spec.name == "fgsm":
        return "fgsm"
    if (spec.name == "pgd" and p["steps"] == 10 and p["random_start"]
            and (p["alpha"] is None or math.isclose(p["alpha"], 2.5 * eps_max / 10))):
        return "pgd10"
    return None


def largest_linf_eps(specs) -> float | None:
    """The battery's largest Linf eps over its adversarial, eps-bounded configurations."""
    values = [float(s.eps) for s in specs
              if s.kind == "adversarial" and s.bounded and s.norm == "Linf" and s.eps is not None]
    return max(values) if values else None


@dataclass(frozen=True)
class CheckPlan:
    """How many samples the model checks use, which probes run, and the costs that decided it
    (per sample, in forward+backward passes)."""

    n_samples: int
    attacks: bool
    eps_max: float | None
    reuse: dict  # probe name -> index of the battery configuration it reuses
    battery_cost: float
    check_cost: float
    budget: float  # in sample-passes: share x the battery's passes x (batch + CALL_OVERHEAD) summed over batches
    share: float

    def to_dict(self) -> dict:
        return {"n_samples": self.n_samples, "attacks": self.attacks, "eps_max": self.eps_max,
                "reused": sorted(self.reuse), "battery_cost_per_sample": round(self.battery_cost, 4),
                "check_cost_per_sample": round(self.check_cost, 4), "budget": round(self.budget, 4),
                "share": self.share}


def plan_checks(specs, *, n_battery: int, num_classes: int, batch_size: int = 128, max_samples: int = 128,
                share: float = CHECK_SHARE) -> CheckPlan:
    """Size the model checks so that they cost at most ``share`` of the battery on ``n_battery`` samples.

    Costs are counted in forward+backward passes per sample (a forward alone is :data:`FORWARD_COST`),
    from the battery's configurations, each pass over a batch of b samples costing b + :data:`CALL_OVERHEAD`
    (the checks run as one batch), so the plan is the same on every machine and for every seed.
    Probes the battery already ran (FGSM, PGD-10 at its largest Linf eps) are reused, not rerun.
    """
    specs = list(specs)
    eps_max = largest_linf_eps(specs)
    reuse: dict[str, int] = {}
    for i, s in enumerate(specs):
        key = _reusable(s, eps_max)
        if key and key not in reuse:
            reuse[key] = i
    batches = [min(batch_size, n_battery - start) for start in range(0, n_battery, max(1, batch_size))]
    budget = share * battery_cost(specs, num_classes=num_classes) * sum(b + CALL_OVERHEAD for b in batches)
    base = 2 * FORWARD_COST + 1.0  # determinism (two forwards, the first also gives clean accuracy), gradient
    probes = 0.0
    if eps_max is not None:
        probes += (50 + FORWARD_COST) + sum(steps + FORWARD_COST for key, steps in (("fgsm", 1), ("pgd10", 10))
                                            if key not in reuse)
    cap = min(int(max_samples), int(n_battery))
    for cost, attacks in ((base + probes, eps_max is not None), (base, False)):
        n = min(cap, int(budget // cost) - CALL_OVERHEAD)
        if n >= 1 or not attacks:
            break
    return CheckPlan(n_samples=max(0, n), attacks=attacks and n >= 1, eps_max=eps_max,
                     reuse=reuse if attacks else {}, battery_cost=battery_cost(specs, num_classes=num_classes),
                     check_cost=cost, budget=budget, share=share)


def _battery_attack(model: "nn.Module", x: "Tensor", y: "Tensor", *, kind: str, eps: float, steps: int) -> "Tensor":
    """The probe's FGSM or PGD-``steps`` at Linf ``eps``, built as the battery builds its own (``attacks.build``)."""
    from dataclasses import replace

    from . import attacks

    spec = replace(attacks.parse("fgsm" if kind == "fgsm" else f"pgd:steps={int(steps)}"), eps=float(eps))
    return attacks.build(spec, model, num_classes=int(y.max()) + 1)(x, y)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def run_model_checks(
    model: "nn.Module",
    x: "Tensor",
    y: "Tensor",
    *,
    device,
    seed: int,
    eps_max: float | None = None,
    attack_fn: AttackFn | None = None,
    max_samples: int = 128,
    reuse: dict | None = None,
    attacks: bool = True,
) -> dict:
    """Probe ``model`` on at most ``max_samples`` of ``(x, y)`` and return the raw numbers (JSON-serializable).

    ``eps_max`` is the largest Linf eps of the battery (PGD-10, PGD-50 and FGSM run there; None skips them).
    ``reuse`` maps ``"fgsm"``/``"pgd10"`` to the battery's per-sample outcomes (True: still classified
    correctly) on the same leading samples: those probes are read from it, not rerun. ``attacks=False``
    leaves the attack probes out (a battery too cheap to pay for them).
    ``attack_fn(model, x, y, *, kind, eps, steps)`` returns adversarial inputs for ``kind`` ``"fgsm"`` or
    ``"pgd"`` (Linf); by default torchattacks runs, which needs inputs in [0, 1]. The model runs in eval
    mode and is returned to its previous mode.
    """
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    device = torch.device(device)
    x = x[:max_samples].to(device)
    y = y[:max_samples].to(device).long()
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    result: dict = {"n_samples": int(len(x)), "seed": int(seed), "device": str(device)}
    try:
        with torch.no_grad():
            out1 = model(x).float()
            out2 = model(x).float()
        finite_out = bool(torch.isfinite(out1).all())
        scale = max(1.0, float(out1[torch.isfinite(out1)].abs().max())) if out1.numel() and finite_out else 1.0
        diff = float((out1 - out2).abs().max()) if out1.numel() else 0.0
        result["determinism"] = {"max_rel_diff": _finite_or_none(diff / scale)}
        outputs = {"finite": finite_out, "min": None, "max": None, "max_row_sum_error": None}
        if finite_out and out1.numel():
            outputs["min"], outputs["max"] = float(out1.min()), float(out1.max())
            if out1.dim() == 2 and out1.shape[1] >= 2:
                outputs["max_row_sum_error"] = float((out1.sum(dim=1) - 1.0).abs().max())
        result["outputs"] = outputs
        result["clean_accuracy"] = float((out1.argmax(dim=1) == y).float().mean()) if out1.dim() == 2 else None

        xg = x.clone().requires_grad_(True)
        gradients: dict = {"error": None}
        try:
            logits = model(xg)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            grad = torch.autograd.grad(loss, xg, allow_unused=True)[0] if loss.requires_grad else None
        except RuntimeError as exc:  # a graph cut by .detach(), numpy, integer casts ...
            grad, gradients["error"] = None, str(exc).splitlines()[0][:200]
        if grad is None:
            grad = torch.zeros_like(x)
            gradients["error"] = gradients["error"] or "the output does not depend differentiably on the input"
        flat = grad.reshape(len(x), -1)
        gradients["finite"] = bool(torch.isfinite(flat).all()) and finite_out
        gradients["zero_fraction"] = float((flat.abs().sum(dim=1) == 0).float().mean())
        result["gradients"] = gradients

        if attacks:
            result["attacks"] = _attack_probes(model, x, y, eps_max=eps_max, attack_fn=attack_fn, reuse=reuse or {})
        else:
            result["attacks"] = {"skipped": f"the battery is too cheap to pay for attack probes within "
                                            f"{100 * CHECK_SHARE:.0f} % of its cost"}
    finally:
        model.train(was_training)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _attack_probes(model, x, y, *, eps_max, attack_fn, reuse) -> dict:
    import torch

    if attack_fn is None:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            return {"skipped": f"inputs span [{lo:.3g}, {hi:.3g}], not [0, 1]; pass attack_fn to probe them"}
        attack_fn = _battery_attack

    seed = torch.initial_seed()

    def accuracy(kind: str, eps: float, steps: int) -> float:
        torch.manual_seed(seed)  # every probe from the same random start: PGD-10 and PGD-50 compare like for like
        x_adv = attack_fn(model, x, y, kind=kind, eps=eps, steps=steps)
        with torch.no_grad():
            return float((model(x_adv).argmax(dim=1) == y).float().mean())

    def reused(key: str) -> float:
        ok = torch.as_tensor(reuse[key])[:len(x)]
        if len(ok) != len(x):
            raise ValueError(f"the battery's {key} outcomes cover {len(ok)} samples, not the {len(x)} checked")
        return float(ok.double().mean())

    probes: dict = {"norm": "Linf", "eps_max": eps_max, "fgsm": None, "pgd10": None, "pgd50": None,
                    "fgsm_source": None, "pgd10_source": None}
    if not eps_max:
        return probes
    try:
        for key, kind, steps in (("fgsm", "fgsm", 1), ("pgd10", "pgd", 10)):
            if key in reuse:
                probes[key], probes[key + "_source"] = reused(key), "battery"
            else:
                probes[key], probes[key + "_source"] = accuracy(kind, eps_max, steps), "checks"
        probes["pgd50"] = accuracy("pgd", eps_max, 50)
    except RuntimeError as exc:  # no gradient to follow at all: the gradient check reports why
        return {"skipped": "the attack probes failed: " + str(exc).splitlines()[0][:200]}
    return probes
