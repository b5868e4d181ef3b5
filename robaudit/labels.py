"""How attacks and eps read: attack families and names, and eps as the user wrote it.

The analysis core labels its rows and columns with these (``samples.csv``, the terminal tables) without
importing the sanity checks, which classify attacks by the same families.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["CLEAN", "WORST_CASE", "WORST_CASE_MEANING", "ATTACK_NAMES", "SINGLE_STEP_ATTACKS", "ITERATIVE_ATTACKS",
           "BLACK_BOX_ATTACKS", "attack_family", "attack_name", "eps_in_text", "format_eps"]

SINGLE_STEP_ATTACKS = frozenset({"fgsm", "ffgsm", "rfgsm", "fgm"})
ITERATIVE_ATTACKS = frozenset({
    "pgd", "pgdl2", "pgdrs", "pgdrsl2", "bim", "apgd", "apgdt", "mifgsm", "difgsm", "tifgsm",
    "vmifgsm", "vnifgsm", "nifgsm", "sinifgsm", "eotpgd", "tpgd", "upgd", "autoattack", "fab",
    "cw", "deepfool", "jsma", "sparsefool", "eaden", "eadl1", "jitter", "spsa",
})
BLACK_BOX_ATTACKS = frozenset({"square", "onepixel", "pixle", "simba", "hsja", "boundary"})
WORST_CASE = "worst-case"
# what the worst case is, said wherever it is shown: no battery proves robustness, a stronger attack may go lower
WORST_CASE_MEANING = "the lowest accuracy over the attacks run: an upper bound on the true robust accuracy"
CLEAN = "clean"
ATTACK_NAMES = {
    "clean": "clean", "worst-case": "worst case", "fgsm": "FGSM", "ffgsm": "FFGSM", "rfgsm": "R+FGSM",
    "pgd": "PGD", "pgdl2": "PGD-L2", "bim": "BIM", "apgd": "APGD", "apgdt": "APGD-T", "mifgsm": "MI-FGSM",
    "cw": "CW", "deepfool": "DeepFool", "fab": "FAB", "square": "Square", "autoattack": "AutoAttack",
    "gaussian": "Gaussian noise", "uniform": "uniform noise", "saltpepper": "salt-and-pepper noise",
}


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


_EPS_IN_TEXT = re.compile(r"(?<![\w.])(eps=)(\d+\.\d+(?:e-?\d+)?)")


def eps_in_text(text: str) -> str:
    """Every ``eps=NUMBER`` of an attack spec as :func:`format_eps` writes it: ``pgd:eps=0.0313725`` stays
    ``pgd:eps=8/255`` as the user wrote it."""
    return _EPS_IN_TEXT.sub(lambda m: m.group(1) + format_eps(float(m.group(2))), text)


def format_eps(value: float) -> str:
    """An eps as the user wrote it: ``0.1`` stays ``0.1``, ``8/255`` stays ``8/255`` (not ``0.03137``)."""
    v = float(value)
    short = f"{v:.4g}"
    if not math.isfinite(v) or float(short) == v:
        return short
    frac = Fraction(v).limit_denominator(1024)
    # 1e-9 relative: an eps a CSV stored to 9 or 10 significant digits (0.031372549) still reads 8/255
    if frac.denominator > 1 and abs(float(frac) - v) <= 1e-9 * abs(v):
        return f"{frac.numerator}/{frac.denominator}"
    return short
