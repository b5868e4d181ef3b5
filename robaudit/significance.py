"""Exact tests: is one attack's excess over another, a rate over a bound, or the difference between two runs'
accuracies on the same samples more than chance?

Two outcomes on the same samples are compared on the samples where they disagree (McNemar's exact test, a sign
test); a robust count against an expected rate by a binomial test. A sanity warning needs a one-sided
p < :data:`ALPHA`; ``compare`` calls a difference between two runs within noise when its two-sided
p >= :data:`NOISE_ALPHA`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ALPHA", "EXACT_MAX_N", "MIN_PAIRED_SAMPLES", "NOISE_ALPHA", "Paired", "binomial_tail", "format_p",
           "mcnemar", "min_conclusive_pairs", "paired", "rate_test", "sign_test"]

# A check warns only on a significant difference: an exact one-sided test at this level (a sign test on the samples
# where two attacks disagree, McNemar's exact test; a binomial test against a rate). Otherwise it is inconclusive.
ALPHA = 0.01

# Two runs' accuracies on the same samples differ beyond noise when the two-sided exact McNemar test gives
# p < this level (the usual 5 %); at or above it ``compare`` marks the difference as within noise.
NOISE_ALPHA = 0.05


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


def mcnemar(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar test of two outcomes on the same samples: ``a_only`` samples right under the first
    and wrong under the second, ``b_only`` the reverse; twice the smaller tail of ``Binomial(a_only + b_only, 1/2)``,
    at most 1 (1 when they never disagree)."""
    a_only, b_only = int(a_only), int(b_only)
    return min(1.0, 2.0 * sign_test(max(a_only, b_only), min(a_only, b_only)))


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


def format_p(p: float) -> str:
    """A p-value in a message: two significant digits."""
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
                    f"McNemar p = {format_p(self.p)}")
        return (f"{self.strong} vs {self.weak} of {self.n} samples robust, p <= {format_p(self.p)} for any pairing of "
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
