"""The allowed range of every number a user gives robaudit (attack specs, harden and data options), in one place.

``analyze``, ``harden`` and the Python API check the same values against the same bounds here, so a value one
command refuses is never accepted by another. Each check gives back the typed value or raises a one-line
:class:`~robaudit.errors.RobauditError` that names the option and the allowed range.
"""
from __future__ import annotations

import math
from typing import Sequence

from .errors import RobauditError

# budgets in the [0, 1] input space: an Linf eps or step above 1 covers every input; an L2 one above
# L2_MAX exceeds the L2 diameter of any input robaudit reads (sqrt of 16 G values is 1.3e5 / 1.3 ~ 1e5)
EPS_LINF = (0.0, 1.0)
L2_MAX = 1e5
LAYER_EPS_MAX = 100.0  # layerwise AT: the activation perturbation relative to the activations' RMS
PARAM_MAX = 1e6  # any other float parameter of an attack (cw's c, kappa and lr, deepfool's overshoot)

STEPS_MAX = 100_000  # iterations of an attack or of training's PGD
QUERIES_MAX = 1_000_000  # queries of a black-box attack
EPOCHS_MAX = 100_000
BATCH_MAX = 1 << 20
WORKERS_MAX = 64
THREADS_MAX = 1024  # torch's CPU threads per process (--threads)
SEED_MAX = 2**32 - 1  # numpy's and torch's generators both take it
IMAGE_SIZE_MAX = 4096  # pixels of --image-size: 4096 x 4096 x 3 bytes is 48 MB a decoded image
CLASSES_MAX = 100_000  # labels are below this (ImageNet-21k has 21,841 classes)
NORM_RANGE = (1e-6, 1e6)  # |--mean| at most the upper bound; --std within both bounds


def _shown(value) -> str:
    """A value as the user gave it, short."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)[:40]


def _number(value, what: str) -> float:
    """``value`` as a float: numbers as they are, strings parsed as ``0.1`` or ``8/255``."""
    if isinstance(value, bool):
        raise RobauditError(f"{what} must be a number, not {value}")
    if isinstance(value, str):
        from .attacks import parse_number

        try:
            return parse_number(value)
        except RobauditError as e:
            raise RobauditError(f"{what}: {e}") from None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise RobauditError(f"{what} must be a number, not {_shown(value)}") from None


def whole(value, what: str, *, low: int = 1, high: int, hint: str = "") -> int:
    """``value`` as an int: finite, integral, ``low <= value <= high``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number: float | int = value
    else:
        number = _number(value, what)
    ok = (isinstance(number, int) or (math.isfinite(number) and number == int(number))) and low <= number <= high
    if not ok:
        bounds = f"a whole number >= {low}, at most {high}" if low < 1 else \
            f"at least {low} and at most {high} (a positive whole number)"
        raise RobauditError(f"{what} must be {bounds}, not {_shown(value)}" + (f": {hint}" if hint else ""))
    return int(number)


def real(value, what: str, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
         hint: str = "") -> float:
    """``value`` as a float: finite, above ``low`` (or equal unless ``low_open``), at most ``high``."""
    number = _number(value, what)
    if not (math.isfinite(number) and (number > low or (number == low and not low_open)) and number <= high):
        if low == 0:
            lower = "positive" if low_open else "non-negative"
        elif low > -math.inf:
            lower = f"{'greater than' if low_open else 'at least'} {low:g}"
        else:
            lower = ""
        upper = f"at most {high:g}" if high < math.inf else ""
        bounds = " and ".join(p for p in (lower, upper) if p)
        raise RobauditError(f"{what} must be finite{', ' + bounds if bounds else ''}, not {_shown(number)}"
                            + (f": {hint}" if hint else ""))
    return number


def eps(value, what: str = "--eps", *, norm: str = "Linf", hint: str | None = None) -> float:
    """A perturbation budget (or step): (0, 1] in Linf (the whole [0, 1] input range), (0, L2_MAX] in L2."""
    if norm == "L2":
        return real(value, what, low=0.0, low_open=True, high=L2_MAX, hint=hint or "an L2 budget, e.g. 0.5")
    return real(value, what, low=0.0, low_open=True, high=EPS_LINF[1],
                hint=hint or "an Linf budget in the [0, 1] input range, e.g. 8/255 (L2 attacks take their own eps)")


def steps(value, what: str = "steps") -> int:
    return whole(value, what, high=STEPS_MAX)


def threads(value, what: str = "--threads") -> int:
    """A number of CPU threads for torch: a whole number from 1 to :data:`THREADS_MAX`."""
    return whole(value, what, high=THREADS_MAX, hint="torch's CPU threads in this process, e.g. 1 on a busy machine")


def image_size(value, what: str = "--image-size") -> int | None:
    """The side of the square images are resized and cropped to, or None."""
    if value is None:
        return None
    return whole(value, what, high=IMAGE_SIZE_MAX, hint="the side in pixels of the square each image is cropped to")


def label_count(n: int, where: str) -> int:
    """A number of classes (the largest label + 1), refused above :data:`CLASSES_MAX`."""
    if n > CLASSES_MAX:
        raise RobauditError(f"{where} has labels up to {n - 1}: labels must lie in 0..{CLASSES_MAX - 1}; "
                            "number the classes from 0")
    return n


def mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """``--mean`` values finite within +-NORM_RANGE[1]; ``--std`` finite within NORM_RANGE (positive)."""
    lo, hi = NORM_RANGE
    for v in mean or ():
        real(v, "--mean", low=-hi, high=hi, hint="one value per channel in input units [0, 1], e.g. 0.5")
    for v in std or ():
        real(v, "--std", low=lo, high=hi, hint="one positive value per channel in input units, e.g. 0.25")


# float parameters of the attack specs: (low, low excluded, high); a step size of 0 or less leaves the input where
# it is and would read as perfect robustness
ATTACK_FLOATS = {"alpha": (0.0, True, None), "lr": (0.0, True, PARAM_MAX), "c": (0.0, True, PARAM_MAX),
                 "kappa": (0.0, False, PARAM_MAX), "overshoot": (0.0, False, PARAM_MAX), "p_init": (0.0, True, 1.0),
                 "rho": (0.0, True, 1.0)}
RESTARTS_MAX = 1_000  # random restarts of an attack
ATTACK_INTS = {"steps": STEPS_MAX, "n_queries": QUERIES_MAX, "n_restarts": RESTARTS_MAX, "targets": CLASSES_MAX}


def attack_param(key: str, value, what: str, *, norm: str):
    """An attack parameter's number within its range (``alpha`` is a budget in the attack's norm)."""
    if key in ATTACK_INTS:
        return whole(value, what, high=ATTACK_INTS[key])
    low, low_open, high = ATTACK_FLOATS.get(key, (-PARAM_MAX, False, PARAM_MAX))
    if high is None:  # a step in the attack's norm
        high = EPS_LINF[1] if norm == "Linf" else L2_MAX
    return real(value, what, low=low, low_open=low_open, high=high)
