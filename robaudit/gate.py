"""Robustness bars for CI: ``--fail-under worst-case=0.40,clean=0.90,pgd@8/255=0.35,sanity`` and ``--max-re``.

An accuracy bar judges the estimate, or with ``--gate-on lower`` the lower end of its 95 % interval (a bar met
only by the luck of the sample then fails). Bars are parsed once, before any work (:func:`parse_bars`), and held
against a run directory (:func:`evaluate`, or :func:`judge` for a run directory with its sanity checks). A run
that misses a bar is still written whole; the command then exits with :data:`EXIT_MISSED`.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path

from . import sanity, verdict
from .attacks import parse_number
from .errors import RobauditError
from .labels import CLEAN, attack_family, attack_name, format_eps
from .rundir import Run, read_run, rows_at

EXIT_MISSED = 3
SANITY = "sanity"
MAX_RE = "max-re"


class GateOn(str, enum.Enum):
    """What an accuracy bar judges: the accuracy itself, or the lower end of its 95 % interval."""

    ESTIMATE = "estimate"
    LOWER = "lower"

    @classmethod
    def parse(cls, text: str | GateOn) -> GateOn:
        try:
            return cls(text)
        except ValueError:
            raise RobauditError(f"--gate-on must be one of {', '.join(g.value for g in cls)}, got {text!r}") from None


@dataclass(frozen=True)
class Bar:
    """One bar: an accuracy metric (``attack``, optional ``eps``) at least ``value``, no sanity warning, or
    every layer's RE at most ``value``."""

    kind: str  # "accuracy" | "sanity" | "max-re"
    attack: str = ""
    eps: float | None = None
    eps_text: str = ""
    value: float | None = None
    on: GateOn = GateOn.ESTIMATE  # an accuracy bar: what it judges

    @property
    def name(self) -> str:
        if self.kind == SANITY:
            return SANITY
        if self.kind == MAX_RE:
            return f"{MAX_RE}={self.value:g}"
        return f"{self.attack}{'@' + self.eps_text if self.eps_text else ''}={self.value:g}"


@dataclass(frozen=True)
class Outcome:
    bar: Bar
    met: bool
    value: float | None
    text: str

    def to_dict(self) -> dict:
        judged = {"judged": self.bar.on.value} if self.bar.kind == "accuracy" else {}
        return {"bar": self.bar.name, "met": self.met, "value": self.value, **judged, "text": self.text}


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses: ``pgd(steps=50,alpha=0.01)@0.1=0.3`` stays one item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [i.strip() for i in items if i.strip()]


def _fraction(text: str, what: str) -> float:
    text = text.strip()
    value = parse_number(text[:-1]) / 100 if text.endswith("%") else parse_number(text)
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise RobauditError(f"{what} needs an accuracy between 0 and 1 (or a percentage), got {text!r}")
    return value


def _refuse_minimal(attack: str, item: str) -> None:
    """A minimal-perturbation attack (CW, DeepFool) leaves no robust accuracy to hold to a bar: say what it has."""
    from .attacks import KINDS

    kind = KINDS.get(attack_family(attack))
    if kind is not None and kind.kind == "adversarial" and not kind.bounded:
        raise RobauditError(f"--fail-under {item!r}: {attack_name(attack)} finds a minimal perturbation, so its "
                            "accuracy is no robust accuracy and takes no bar; its metrics are the success rate and the "
                            "perturbation size (accuracy.csv's success_rate, pert_median_all, pert_median): bar an "
                            "attack with an eps instead, e.g. pgd@8/255=0.35 or worst-case=0.4")


def parse_bars(fail_under: str | None = None, *, max_re: float | None = None, strict: bool = False,
               gate_on: str | GateOn = GateOn.ESTIMATE) -> list[Bar]:
    """Parse ``--fail-under``, ``--max-re``, ``--strict`` and ``--gate-on`` (what an accuracy bar judges) into
    bars; one-line errors for bad syntax."""
    on = GateOn.parse(gate_on)
    bars: list[Bar] = []
    for item in _split(fail_under or ""):
        if item.lower() == SANITY:
            bars.append(Bar(SANITY))
            continue
        metric, sep, value = item.rpartition("=")
        if not sep or not metric.strip():
            raise RobauditError(f"--fail-under item {item!r} must look like metric=value (e.g. worst-case=0.4, "
                                "clean=0.9, pgd@8/255=0.35) or be 'sanity'")
        attack, at, eps_text = metric.strip().rpartition("@") if "@" in metric else (metric.strip(), "", "")
        _refuse_minimal(attack.strip(), item)
        eps = None
        if at:
            eps = parse_number(eps_text)
            if not math.isfinite(eps) or eps <= 0:
                raise RobauditError(f"--fail-under {item!r}: eps must be positive")
        bars.append(Bar("accuracy", attack.strip(), eps, eps_text.strip(), _fraction(value, f"--fail-under {item!r}"),
                        on=on))
    if strict and not any(b.kind == SANITY for b in bars):
        bars.append(Bar(SANITY))
    if max_re is not None:
        if not math.isfinite(max_re) or max_re <= 0:
            raise RobauditError(f"--max-re must be a positive number, got {max_re}")
        bars.append(Bar(MAX_RE, value=float(max_re)))
    return bars


def _accuracy(bar: Bar, run: Run) -> Outcome:
    acc = run.accuracy
    rows = acc[acc["attack"] == bar.attack]
    if rows.empty:
        known = ", ".join(sorted(set(acc["attack"])))
        raise RobauditError(f"--fail-under names {bar.attack!r}, which is not in this run's accuracy.csv: "
                            f"use one of {known}")
    if bar.attack != CLEAN:
        bounded = rows[rows["eps"].notna()]
        if bar.eps is None:
            rows = bounded[bounded["eps"] == bounded["eps"].max()] if not bounded.empty else rows
        else:
            rows = rows_at(bounded, bar.attack, bar.eps)
            if rows.empty:
                known = ", ".join(format_eps(e) for e in sorted(set(bounded["eps"])))
                raise RobauditError(f"--fail-under {bar.name}: {bar.attack} ran at eps {known or 'no eps'}, not "
                                    f"{bar.eps_text}")
    estimate = float(rows["accuracy"].min())
    eps = rows["eps"].iloc[0] if rows["eps"].notna().any() else None
    where = f"{bar.attack}" + (f" at eps {format_eps(float(eps))}" if eps is not None else "")
    if bar.on is GateOn.ESTIMATE:
        met = estimate >= bar.value
        return Outcome(bar, met, estimate, f"{where}: {100 * estimate:.1f}% {'>=' if met else '<'} "
                                           f"{100 * bar.value:.1f}%")
    lows = rows["ci_low"] if "ci_low" in rows.columns else rows["accuracy"] * math.nan
    if lows.isna().any():
        raise RobauditError(f"--gate-on lower: {where} has no 95% interval (accuracy.csv lacks its n_samples): "
                            "rerun robaudit analyze, or judge the estimate with --gate-on estimate")
    value = float(lows.min())
    met = value >= bar.value
    return Outcome(bar, met, value, f"{where}: lower 95% bound {100 * value:.1f}% {'>=' if met else '<'} "
                                    f"{100 * bar.value:.1f}% (estimate {100 * estimate:.1f}%)")


def _sanity(bar: Bar, checks: list[sanity.Check]) -> Outcome:
    warns = [c.name for c in checks if c.status == "warn"]
    text = "no sanity check warns" if not warns else f"{len(warns)} sanity check(s) warn: {'; '.join(warns)}"
    return Outcome(bar, not warns, float(len(warns)), text)


def _max_re(bar: Bar, run: Run) -> Outcome:
    mvl = run.mvl or {}
    metric = "re_mean" if mvl.get("metric") in (None, "", "re_gain") else mvl["metric"]  # a bar on RE, not on gain
    lsa = rows_at(run.lsa, mvl.get("attack"), mvl.get("eps"))
    lsa = lsa[lsa[metric].notna()]
    if lsa.empty:
        raise RobauditError(f"--max-re: this run has no RE under its ranking attack {mvl.get('attack')!r}")
    worst = lsa.loc[lsa[metric].idxmax()]
    value = float(worst[metric])
    met = value <= bar.value
    return Outcome(bar, met, value, f"largest {metric} under {mvl.get('attack')}: {worst['layer']} {value:.4f} "
                                    f"{'<=' if met else '>'} {bar.value:g}")


def evaluate(bars: list[Bar], run: Run, checks: list[sanity.Check]) -> list[Outcome]:
    """Hold every bar against a run (and its sanity checks)."""
    out = []
    for bar in bars:
        if bar.kind == SANITY:
            out.append(_sanity(bar, checks))
        elif bar.kind == MAX_RE:
            out.append(_max_re(bar, run))
        else:
            out.append(_accuracy(bar, run))
    return out


@dataclass
class Judgement:
    """A run directory held to bars: its sanity checks, each bar's outcome and, for a hardened run (``before``:
    the original run), the masking warnings hardening introduced."""

    run: Run
    run_dir: Path
    checks: list[sanity.Check]
    outcomes: list[Outcome]
    before: Path | None = None
    introduced: list[str] | None = None

    @property
    def passed(self) -> bool:
        return all(o.met for o in self.outcomes)

    def to_dict(self, extra: dict | None = None) -> dict:
        """The JSON object of ``--json``: the run's summary, ``extra``, the bars and whether all were met."""
        obj = verdict.summarize(self.run, self.checks)
        if self.introduced is not None:
            obj["introduced_warnings"] = self.introduced
        obj.update(extra or {})
        obj["bars"] = [o.to_dict() for o in self.outcomes]
        obj["passed"] = self.passed
        return obj


def judge(bars: list[Bar], run_dir: Path, *, before: Path | None = None) -> Judgement:
    """Read ``run_dir`` and hold every bar against it; ``before`` (the run it was hardened from) adds the
    masking warnings that hardening introduced."""
    run = read_run(run_dir)
    checks = verdict.checks_of(run)
    outcomes = evaluate(bars, run, checks)
    introduced = verdict.introduced_warnings(verdict.checks_of(read_run(before)), checks) if before else None
    return Judgement(run, Path(run_dir), checks, outcomes, before=before, introduced=introduced)
