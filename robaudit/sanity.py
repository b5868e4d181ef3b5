"""Evaluation sanity checks after Carlini et al. 2019, "On Evaluating Adversarial Robustness".

Two halves:

- :func:`run_model_checks` probes a model on a small batch: outputs that are already probabilities,
  zero or non-finite input gradients, a forward pass that is not deterministic (the checks AutoAttack
  runs), and FGSM, PGD-10 and PGD-50 at the battery's own largest Linf eps (never a larger one),
  reusing the battery's own FGSM and PGD-10 outcomes where it ran them. :func:`plan_checks` sizes the
  sample count so that the checks cost at most :data:`CHECK_SHARE` of the battery, but never fewer than the
  :data:`MIN_PAIRED_SAMPLES` on which a comparison can be conclusive. It returns raw numbers and the probes'
  per-sample pairs as a JSON-serializable dict, written to the run directory as ``checks.json``.
- :func:`evaluate` reads an ``accuracy.csv`` frame and that dict and decides pass / warn / skip, each
  with the numbers behind it. A comparison warns only when an exact one-sided test finds its difference
  significant at :data:`ALPHA` (the p-value is in the message); otherwise it is inconclusive (``skip``), not a
  warning. All thresholds live here, so re-rendering an old run applies them again.
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
    "ALPHA",
    "MIN_PAIRED_SAMPLES",
    "binomial_tail",
    "sign_test",
    "rate_test",
    "Paired",
    "paired",
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

# The model checks cost at most this share of the battery (in forward+backward passes per sample).
CHECK_SHARE = 0.10
# A forward pass alone counts as this share of a forward+backward pass (backward is about 2 forwards).
FORWARD_COST = 1.0 / 3.0
# The fixed cost of one pass over a batch, in samples: a pass over b samples costs b + CALL_OVERHEAD.
# Small models on CPU pay about this much per call (the digits CNN: 0.8 ms fixed, 0.056 ms per sample).
CALL_OVERHEAD = 16

# A check warns only on a significant difference: an exact one-sided test at this level (a sign test on the samples
# where two attacks disagree, McNemar's exact test; a binomial test against a rate). Otherwise it is inconclusive.
ALPHA = 0.01
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


# ------------------------------------------------------------------------------------------- statistics


# Up to this many samples a tail is summed exactly; beyond it (no real battery, but a tampered checks.json could
# claim one) a normal approximation with continuity correction answers in constant time.
EXACT_MAX_N = 10_000_000


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, summed exactly term by term in log space from the end nearer to
    ``k`` (the upper tail above the mean, one minus the lower tail below it), until the terms stop counting."""
    k, n = int(k), int(n)
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if n > EXACT_MAX_N:
        return 0.5 * math.erfc((k - 0.5 - n * p) / math.sqrt(2.0 * n * p * (1.0 - p)))
    if k > n * p:
        return min(1.0, _tail_sum(k, n, p, +1))
    return max(0.0, 1.0 - _tail_sum(k - 1, n, p, -1))


def _tail_sum(start: int, n: int, p: float, step: int) -> float:
    """The binomial terms from ``start`` away from the mean (``step`` +1 up to n, -1 down to 0), summed."""
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms, i = [], start
    while 0 <= i <= n:
        term = math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        terms.append(term)
        if term == 0.0 or (len(terms) > 1 and term < 1e-18 * terms[0]):
            break  # every further term is smaller still: beyond the start the terms fall away from the mean
        i += step
    return math.fsum(terms)


def sign_test(bad: int, good: int) -> float:
    """One-sided exact McNemar test: of the ``bad + good`` samples on which two attacks disagree, ``bad`` went the
    way the check looks for; ``P(X >= bad)`` for ``X ~ Binomial(bad + good, 1/2)`` (1 when they never disagree)."""
    return binomial_tail(int(bad), int(bad) + int(good), 0.5)


def rate_test(k: int, n: int, rate: float) -> float:
    """One-sided exact binomial test that ``k`` of ``n`` exceeds ``rate``: ``P(X >= k)``, ``X ~ Binomial(n, rate)``."""
    return binomial_tail(int(k), int(n), rate)


def min_conclusive_pairs(alpha: float = ALPHA) -> int:
    """The fewest samples on which a paired comparison can be significant at all: the smallest m with the most
    extreme outcome (all m disagreements one way) at ``0.5 ** m < alpha`` (7 at 0.01)."""
    m = 1
    while 0.5 ** m >= alpha:
        m += 1
    return m


# The model checks never attack fewer samples than a paired comparison needs to be conclusive.
MIN_PAIRED_SAMPLES = min_conclusive_pairs()


def _p(p: float) -> str:
    return f"{p:.2g}"


@dataclass(frozen=True)
class Paired:
    """Two attacks on the same samples, the ``strong`` one expected to leave no more robust: ``bad`` samples are
    robust to it but fooled by the weak one, ``good`` the reverse; ``p`` is the one-sided exact test of the excess.
    ``exact``: the per-sample pairs were recorded; otherwise only the robust counts were, and the pairing least
    favourable to a warning that they allow is taken (the largest p any pairing gives)."""

    strong: int  # samples robust to the strong attack
    weak: int  # samples robust to the weak attack
    n: int
    bad: int
    good: int
    exact: bool

    @property
    def excess(self) -> bool:
        return self.bad > self.good

    @property
    def p(self) -> float:
        return sign_test(self.bad, self.good) if self.excess else 1.0

    @property
    def reverse_p(self) -> float:
        """The same test the other way: the weak attack leaving more robust (the strong one finding more)."""
        return sign_test(self.good, self.bad) if self.good > self.bad else 1.0

    @property
    def significant(self) -> bool:
        return self.excess and self.p < ALPHA

    def text(self, strong: str, weak: str) -> str:
        """The evidence in a few words: the discordant samples and the p-value."""
        if self.exact:
            return (f"{self.bad} samples robust to {strong} but fooled by {weak}, {self.good} the reverse, exact "
                    f"McNemar p = {_p(self.p)}")
        return (f"{self.strong} vs {self.weak} of {self.n} samples robust, p <= {_p(self.p)} for any pairing of "
                "them")


def paired(strong: int, weak: int, n: int, pair: tuple[int, int] | None = None) -> Paired:
    """The comparison of two attacks that left ``strong`` and ``weak`` of the same ``n`` samples robust; ``pair``:
    the recorded (robust to strong but fooled by weak, the reverse) counts, when there are any."""
    if pair is not None and 0 <= pair[0] and 0 <= pair[1] and pair[0] + pair[1] <= n:  # else not a real record
        return Paired(strong, weak, n, int(pair[0]), int(pair[1]), True)
    d = strong - weak  # = bad - good, whatever the pairing; the most disagreements the counts allow is the least
    if d >= 0:  # favourable to a finding either way
        good = max(0, min(weak, n - strong))
        return Paired(strong, weak, n, good + d, good, False)
    bad = max(0, min(strong, n - weak))
    return Paired(strong, weak, n, bad, bad - d, False)


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
               f"{_pct(LARGE_EPS_MAX_ACCURACY)}, exact binomial p = {_p(p)})")
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
                   + ("exact McNemar" if ev.exact else "for any pairing,") + f" p = {_p(ev.reverse_p)}")
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
    min_samples: int = MIN_PAIRED_SAMPLES  # the fewest samples the attack probes' comparisons can be conclusive on
    over_budget: bool = False  # raised to min_samples beyond the share of the battery

    @property
    def note(self) -> str:
        """What the plan decided beyond the share, in a sentence ("" when nothing)."""
        if self.over_budget:
            return (f"raised to the {self.min_samples} samples a paired comparison needs to be conclusive at "
                    f"p < {ALPHA:g}, which costs more than {100 * self.share:.0f} % of the battery")
        if self.eps_max is not None and not self.attacks:
            return (f"no attack probes: the data set has fewer than the {self.min_samples} samples a paired "
                    f"comparison needs to be conclusive at p < {ALPHA:g}")
        return ""

    def to_dict(self) -> dict:
        return {"n_samples": self.n_samples, "attacks": self.attacks, "eps_max": self.eps_max,
                "reused": sorted(self.reuse), "battery_cost_per_sample": round(self.battery_cost, 4),
                "check_cost_per_sample": round(self.check_cost, 4), "budget": round(self.budget, 4),
                "share": self.share, "min_samples": self.min_samples, "over_budget": self.over_budget,
                "note": self.note}


def plan_checks(specs, *, n_battery: int, num_classes: int, batch_size: int = 128, max_samples: int = 128,
                share: float = CHECK_SHARE) -> CheckPlan:
    """Size the model checks so that they cost at most ``share`` of the battery on ``n_battery`` samples, but never
    fewer than :data:`MIN_PAIRED_SAMPLES` for the attack probes, whose comparisons could not be conclusive on fewer
    (the plan says so when that costs more than the share).

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
    cap = min(int(max_samples), int(n_battery))
    affordable = lambda cost: min(cap, int(budget // cost) - CALL_OVERHEAD)  # noqa: E731
    if eps_max is not None and cap >= MIN_PAIRED_SAMPLES:  # the attack probes, on at least as many as they need
        cost = base + (50 + FORWARD_COST) + sum(steps + FORWARD_COST for key, steps in (("fgsm", 1), ("pgd10", 10))
                                                if key not in reuse)
        n = affordable(cost)
        return CheckPlan(n_samples=max(n, MIN_PAIRED_SAMPLES), attacks=True, eps_max=eps_max, reuse=reuse,
                         battery_cost=battery_cost(specs, num_classes=num_classes), check_cost=cost, budget=budget,
                         share=share, over_budget=n < MIN_PAIRED_SAMPLES)
    return CheckPlan(n_samples=max(0, affordable(base)), attacks=False, eps_max=eps_max, reuse={},
                     battery_cost=battery_cost(specs, num_classes=num_classes), check_cost=base, budget=budget,
                     share=share)


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

        if attacks and len(x) >= MIN_PAIRED_SAMPLES:
            result["attacks"] = _attack_probes(model, x, y, eps_max=eps_max, attack_fn=attack_fn, reuse=reuse or {})
        elif attacks:
            result["attacks"] = {"skipped": f"{len(x)} samples are fewer than the {MIN_PAIRED_SAMPLES} on which a "
                                            f"paired comparison can be conclusive at p < {ALPHA:g}"}
        else:
            result["attacks"] = {"skipped": "the plan left the attack probes out (no Linf eps, or fewer than "
                                            f"{MIN_PAIRED_SAMPLES} samples)"}
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

    def robust(kind: str, eps: float, steps: int) -> "Tensor":
        torch.manual_seed(seed)  # every probe from the same random start: PGD-10 and PGD-50 compare like for like
        x_adv = attack_fn(model, x, y, kind=kind, eps=eps, steps=steps)
        with torch.no_grad():
            return (model(x_adv).argmax(dim=1) == y).cpu()

    def reused(key: str) -> "Tensor":
        ok = torch.as_tensor(reuse[key])[:len(x)]
        if len(ok) != len(x):
            raise ValueError(f"the battery's {key} outcomes cover {len(ok)} samples, not the {len(x)} checked")
        return ok.bool().cpu()

    probes: dict = {"norm": "Linf", "eps_max": eps_max, "fgsm": None, "pgd10": None, "pgd50": None,
                    "fgsm_source": None, "pgd10_source": None}
    if not eps_max:
        return probes
    outcomes = {}  # probe -> per sample: still classified correctly
    try:
        for key, kind, steps in (("fgsm", "fgsm", 1), ("pgd10", "pgd", 10)):
            if key in reuse:
                outcomes[key], probes[key + "_source"] = reused(key), "battery"
            else:
                outcomes[key], probes[key + "_source"] = robust(kind, eps_max, steps), "checks"
        outcomes["pgd50"] = robust("pgd", eps_max, 50)
    except RuntimeError as exc:  # no gradient to follow at all: the gradient check reports why
        return {"skipped": "the attack probes failed: " + str(exc).splitlines()[0][:200]}
    for key, ok in outcomes.items():
        probes[key] = float(ok.double().mean())
    # the per-sample pairs the comparisons test: robust_only[a][b] = samples robust to a but fooled by b
    probes["robust_only"] = {a: {b: int((oa & ~ob).sum()) for b, ob in outcomes.items() if b != a}
                             for a, oa in outcomes.items()}
    return probes
