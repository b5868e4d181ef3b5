"""The named attack batteries that ``--battery`` chooses between: fast, default and standard.

``fast`` is the original battery (FGSM, PGD-10, CW, a short Square, noise baselines); ``default`` adds
AutoAttack's white-box pair (APGD-CE and APGD-T with the DLR loss), whose worst case stays within a point of
full AutoAttack on the shipped examples (``benchmarks/bench_battery.py``); ``standard`` is AutoAttack's
standard version as RobustBench runs it (``torchattacks.AutoAttack``, version ``standard``) at every eps.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from . import attacks as atk
from .errors import RobauditError
from .training.config import Choice

__all__ = ["BatteryName", "BATTERIES", "CUSTOM", "MEMBERS", "STANDARD_MIN_CLASSES", "battery", "check_standard", "describe"]


class BatteryName(Choice):
    """Which battery an analysis runs when no ``--attack`` names the attacks."""

    FAST = "fast"
    DEFAULT = "default"
    STANDARD = "standard"

    @classmethod
    def of(cls, value) -> "BatteryName":
        return cls.parse(value, "--battery {value!r} is not a battery: choose from {choices}")


# what a manifest records when --attack named the attacks instead of a battery
CUSTOM = "custom"

BATTERIES: dict[BatteryName, tuple[str, ...]] = {
    BatteryName.FAST: ("fgsm", "pgd", "cw", "square:n_queries=200", "gaussian", "uniform", "saltpepper"),
    BatteryName.DEFAULT: ("fgsm", "pgd", "apgd:steps=25", "apgdt:steps=25,targets=3", "cw", "square:n_queries=200",
                          "gaussian", "uniform", "saltpepper"),
    BatteryName.STANDARD: ("autoattack",),
}
# torchattacks' AutoAttack (standard) targets 9 other classes with APGD-T and FAB-T: it needs 4 classes at least
STANDARD_MIN_CLASSES = 4


def battery(name: BatteryName, eps: Sequence[float] | None = None) -> list[atk.AttackSpec]:
    """The specs of battery ``name``. Square, a black-box attack that costs hundreds of forward passes, runs
    once at the largest eps in the fast and default batteries: enough for the white-box-vs-black-box check."""
    specs = [atk.parse(s) for s in BATTERIES[name]]
    if eps:
        specs = [replace(s, eps=float(max(eps)), explicit_eps=True) if s.name == "square" else s for s in specs]
    return specs


def check_standard(num_classes: int, input_shape: Sequence[int]) -> None:
    """Refuse ``--battery standard`` in one line where torchattacks' AutoAttack cannot run."""
    if num_classes < STANDARD_MIN_CLASSES or len(input_shape) != 3:
        raise RobauditError(
            f"--battery standard runs AutoAttack, which needs image inputs and at least {STANDARD_MIN_CLASSES} "
            f"classes (this data set: {num_classes} classes, inputs {tuple(input_shape)}): use --battery default, "
            "whose APGD members substitute losses defined on fewer classes")


MEMBERS = {BatteryName.FAST: "FGSM, PGD-10, CW, Square and noise",
           BatteryName.DEFAULT: "FGSM, PGD-10, APGD-CE, APGD-T, CW, Square and noise",
           BatteryName.STANDARD: "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square"}


def describe(recorded: str | None) -> str:
    """What a manifest's ``battery`` says in words: the battery's name and members, the attacks given with
    --attack, or that a run from before batteries were named does not say."""
    if recorded is None:
        return "not recorded (a run from an earlier robaudit)"
    if recorded == CUSTOM:
        return "custom (the attacks given with --attack)"
    name = BatteryName.of(recorded)
    return f"{name.value} ({MEMBERS[name]})"
