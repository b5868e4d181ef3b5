"""The hardening settings: one frozen object, validated once where it is built."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

from .. import limits
from ..errors import RobauditError


class Choice(str, Enum):
    """A string choice: compares equal to its value and prints as it."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value, message: str):
        """The member named by ``value`` (any case); ``message`` (formatted with ``value``) otherwise."""
        if isinstance(value, cls):
            return value
        text = str(value).lower()
        try:
            return cls(text)
        except ValueError:
            raise RobauditError(message.format(value=value, choices=", ".join(m.value for m in cls))) from None


class Method(Choice):
    ATLR = "atlr"
    AT = "at"
    LAYERWISE = "layerwise"
    STANDARD = "standard"


class ReMode(Choice):
    POOLED = "pooled"
    PER_SAMPLE = "per-sample"


_RE_ALIASES = {"per_sample": "per-sample", "persample": "per-sample", "mean": "per-sample"}


class BaseAttack(Choice):
    PGD = "pgd"
    FGSM = "fgsm"


class Optimizer(Choice):
    ADAM = "adam"
    SGD = "sgd"


class Schedule(Choice):
    COSINE = "cosine"
    NONE = "none"


DEFAULT_LR = {Optimizer.ADAM: 1e-3, Optimizer.SGD: 1e-2}


def check_eps(eps, what: str = "--eps") -> float:
    """An Linf budget or step in (0, 1] from a number or a string such as ``8/255`` (the range ``analyze``'s
    --eps has); a one-line error otherwise."""
    if eps is None:
        raise RobauditError(f"{what} is required: the training perturbation budget, e.g. {what} 0.1")
    return limits.eps(eps, what, hint="an Linf step in the [0, 1] input range, e.g. 2/255" if what == "--alpha" else None)


def _whole(value, least: int, most: int, what: str) -> int:
    return limits.whole(value, what, low=least, high=most)


def gamma_values(value: float | str | Sequence[float]) -> list[float]:
    """The gamma values of a scalar, a list, or a string such as ``1`` or ``1,0.5`` (finite, non-negative)."""
    from ..attacks import parse_number

    if isinstance(value, str):
        values = [parse_number(p) for p in value.split(",") if p.strip()]
    elif isinstance(value, (int, float)):
        values = [float(value)]
    else:
        values = [float(v) for v in value]
    if not values:
        raise RobauditError("--gamma needs a value, e.g. --gamma 1 or one per layer: --gamma 1,0.5")
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise RobauditError(f"--gamma values must be finite and non-negative, got {v:g}")
    return values


def parse_gamma(value: float | str | Sequence[float], n_layers: int) -> list[float]:
    """One gamma per MVL layer from a scalar, a list, or a string such as ``1`` or ``1,0.5``."""
    values = gamma_values(value)
    if len(values) == 1:
        return values * n_layers
    if len(values) != n_layers:
        raise RobauditError(f"--gamma has {len(values)} values for {n_layers} MVL layers: give one value or {n_layers}")
    return values


@dataclass(frozen=True)
class HardenConfig:
    """How to harden: method, attack, optimization and run settings, checked once in ``__post_init__``.

    ``eps`` may stay ``None`` until the run stage fills it from the analysis sweep; ``lr`` defaults by
    optimizer, ``layer_eps`` to ``eps``; ``seed`` ``None`` means 0 (or the analysis seed for a run).
    """

    method: Method | str = Method.ATLR
    eps: float | None = None
    gamma: float | str | Sequence[float] = 1.0
    re_mode: ReMode | str = ReMode.POOLED
    base_attack: BaseAttack | str = BaseAttack.PGD
    steps: int = 10
    alpha: float | None = None
    layer_eps: float | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    optimizer: Optimizer | str = Optimizer.ADAM
    weight_decay: float = 0.0
    schedule: Schedule | str = Schedule.COSINE
    clean_weight: float = 0.0
    dual_bn: bool = False
    val_fraction: float = 0.1
    seed: int | None = None
    device: str = "auto"
    workers: int = 0
    progress: bool = False
    check_collapse: bool = True
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: set once, here)
        set_("method", Method.parse(self.method, "unknown method {value!r}: choose from {choices}"))
        re_mode = _RE_ALIASES.get(self.re_mode, self.re_mode) if isinstance(self.re_mode, str) else self.re_mode
        set_("re_mode", ReMode.parse(re_mode, "unknown RE mode {value!r}: use pooled or per-sample"))
        set_("base_attack", BaseAttack.parse(self.base_attack, "--base-attack must be pgd or fgsm, not {value!r}"))
        set_("optimizer", Optimizer.parse(self.optimizer, "--optimizer must be adam or sgd, not {value!r}"))
        set_("schedule", Schedule.parse(self.schedule, "--schedule must be cosine or none, not {value!r}"))
        if self.eps is not None:
            set_("eps", check_eps(self.eps))
        gamma_values(self.gamma)
        set_("steps", _whole(self.steps, 1, limits.STEPS_MAX, "--steps"))
        if self.alpha is not None:
            set_("alpha", check_eps(self.alpha, "--alpha"))
        if self.layer_eps is not None:
            set_("layer_eps", limits.real(self.layer_eps, "--layer-eps", low=0.0, low_open=True,
                                          high=limits.LAYER_EPS_MAX, hint="relative to the activations' RMS"))
        elif self.eps is not None:
            set_("layer_eps", self.eps)
        set_("epochs", _whole(self.epochs, 1, limits.EPOCHS_MAX, "--epochs"))
        set_("batch_size", _whole(self.batch_size, 2, limits.BATCH_MAX, "--batch-size"))
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        set_("lr", limits.real(lr, "--lr", low=0.0, low_open=True, high=limits.PARAM_MAX))
        set_("weight_decay", limits.real(self.weight_decay, "--weight-decay", low=0.0, high=limits.PARAM_MAX))
        set_("clean_weight", limits.real(self.clean_weight, "--clean-weight", low=0.0, high=1.0))
        if self.method == Method.STANDARD and self.clean_weight:
            set_("notes", (*self.notes, "--clean-weight has no effect with method standard (all training is clean)"))
            set_("clean_weight", 0.0)
        if not 0 < limits.real(self.val_fraction, "--val-fraction") < 1:
            raise RobauditError(f"the validation fraction must lie in (0, 1), not {self.val_fraction}")
        if self.seed is not None:
            set_("seed", limits.whole(self.seed, "--seed", low=0, high=limits.SEED_MAX))
        set_("workers", _whole(self.workers, 0, limits.WORKERS_MAX, "--workers"))

    @property
    def uses_mvl(self) -> bool:
        """Whether the method works on MVL layers (and so needs some)."""
        return self.method in (Method.ATLR, Method.LAYERWISE)

    def require_eps(self) -> float:
        if self.eps is None:
            check_eps(None)
        return self.eps
