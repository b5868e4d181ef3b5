"""What every file of a run directory may hold, checked once as the run is read.

A run directory may have been edited or planted by someone else: each table's columns get their types
(numbers numeric, finite where they must be, accuracies in [0, 1], eps non-negative) and each JSON document
the types of the fields that robaudit reads, so that no reader further on meets a string where it expects a
number. A violation is one line naming the file, the field (and row) and what to do.
"""
from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import limits
from .errors import RobauditError

SEED_MAX = 2**32 - 1
KINDS = ("adversarial", "noise", "clean")
PROBES = ("modules", "ops", "all")
BATTERIES = ("fast", "default", "standard", "custom")  # robaudit.batteries' names, and attacks given by --attack


def fix_for(path: Path) -> str:
    """What to do about a bad file: rerun the step that writes it."""
    return "rerun robaudit harden" if Path(path).parent.name == "hardened" else "rerun robaudit analyze"


def _bad(path: Path, what: str) -> RobauditError:
    return RobauditError(f"{path}: {what}: {fix_for(path)}")


# ------------------------------------------------------------------------------------------- tables

# column -> (kind, missing cells allowed); kinds: text, kind, eps, fraction, nonneg, ratio (>= 0, may be
# infinite), finite, count, flag
TEXT, KIND, EPS, FRACTION, NONNEG, RATIO, FINITE, COUNT, FLAG = "text", "kind", "eps", "fraction", "nonneg", \
    "ratio", "finite", "count", "flag"

TABLES: dict[str, dict[str, tuple[str, bool]]] = {
    "lsa.csv": {"layer": (TEXT, False), "layer_type": (TEXT, True), "attack": (TEXT, False), "eps": (EPS, True),
                "re_mean": (NONNEG, True), "re_std": (NONNEG, True), "re_pooled": (NONNEG, True),
                "re_gain": (RATIO, True), "n_samples": (COUNT, True), "order": (COUNT, False), "kind": (KIND, True),
                "norm": (TEXT, True), "is_output": (FLAG, True)},
    "accuracy.csv": {"attack": (TEXT, False), "eps": (EPS, True), "accuracy": (FRACTION, False),
                     "ci_low": (FRACTION, True), "ci_high": (FRACTION, True), "n_samples": (COUNT, True),
                     "kind": (KIND, True), "norm": (TEXT, True), "seconds": (NONNEG, True),
                     "success_rate": (FRACTION, True), "pert_median": (NONNEG, True), "pert_p90": (NONNEG, True),
                     "pert_median_all": (RATIO, True)},
    "bn.csv": {"layer": (TEXT, False), "layer_type": (TEXT, True), "channels": (COUNT, True),
               "n_clean": (COUNT, True), "n_adv": (COUNT, True), "clean_vs_running": (NONNEG, True),
               "adv_vs_clean": (NONNEG, True), "adv_vs_running": (NONNEG, True)},
    "comparison.csv": {"kind": (TEXT, False), "attack": (TEXT, True), "eps": (EPS, True), "norm": (TEXT, True),
                       "layer": (TEXT, True), "before": (FINITE, True), "after": (FINITE, True),
                       "delta": (FINITE, True)},
    "classes.csv": {"label": (COUNT, False), "n_samples": (COUNT, False), "attack": (TEXT, False),
                    "eps": (EPS, True), "norm": (TEXT, True), "accuracy": (FRACTION, False),
                    "ci_low": (FRACTION, True), "ci_high": (FRACTION, True)},
    "history.csv": {"epoch": (COUNT, False)},  # every other column: a finite number or empty
    "samples.csv": {"index": (COUNT, False), "label": (COUNT, False), "clean_pred": (COUNT, False),
                    "clean_correct": (FLAG, False)},  # plus per configuration :correct, :pert and :robust
}
REQUIRED_COLUMNS = {"lsa.csv": ("layer", "attack", "eps", "re_mean", "order", "kind"),
                    "accuracy.csv": ("attack", "eps", "accuracy"),
                    "bn.csv": ("layer", "clean_vs_running", "adv_vs_clean", "adv_vs_running"),
                    "classes.csv": ("label", "n_samples", "attack", "accuracy"),
                    "comparison.csv": ("kind", "before", "after"), "history.csv": ("epoch",),
                    "samples.csv": ("index", "label", "clean_correct")}
TEXT_COLUMNS = {name: [c for c, (kind, _) in cols.items() if kind in (TEXT, KIND)] for name, cols in TABLES.items()}
FORMULA_START = "=+-@\t\r"
# what pandas reads as a missing number; a text cell is missing only when empty (a layer may be named "None")
NA_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
_ESCAPED = re.compile(r"'+[=+\-@\t\r]")


def column_kind(table: str, column: str) -> tuple[str, bool] | None:
    """The kind of a column of ``table`` (None: a column robaudit does not read, left as it is)."""
    known = TABLES.get(table, {})
    if column in known:
        return known[column]
    if table == "history.csv":
        return (FINITE, True)
    if table == "lsa.csv" and column.startswith("re_"):  # an RE column of a newer robaudit
        return (RATIO, True)
    if table == "samples.csv":
        if column.endswith(":correct") or column.endswith(":robust"):
            return (FLAG, True)
        if column.endswith(":pert"):
            return (NONNEG, True)
        return (FINITE, True)
    return None


def neutralize(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` in which no text cell (or column name) starts a spreadsheet formula: such a cell
    (``=``, ``+``, ``-``, ``@``, tab or CR first, after any quotes) gets a leading ``'``. Numbers stay numbers."""
    def cell(v: Any) -> Any:
        if isinstance(v, str) and v.lstrip("'")[:1] in tuple(FORMULA_START):
            return "'" + v
        return v

    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col].dtype):
            out[col] = out[col].map(cell)
    out.columns = [cell(c) if isinstance(c, str) else c for c in out.columns]
    return out


def has_carriage_return(frame: pd.DataFrame) -> bool:
    """Whether a text cell or a column name holds a CR (which the csv writer would leave unquoted)."""
    if any(isinstance(c, str) and "\r" in c for c in frame.columns):
        return True
    return any(frame[c].map(lambda v: isinstance(v, str) and "\r" in v).any() for c in frame.columns
               if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c].dtype))


def unescape(value: Any) -> Any:
    """Undo :func:`neutralize` for one cell (the one leading quote it added)."""
    if isinstance(value, str) and _ESCAPED.match(value):
        return value[1:]
    return value


def is_metric(lsa: pd.DataFrame, name: str) -> bool:
    """Whether ``name`` is a numeric RE column of an ``lsa.csv`` frame (what an MVL list may be ranked by)."""
    return (name in lsa.columns and name.startswith("re_") and pd.api.types.is_numeric_dtype(lsa[name])
            and not pd.api.types.is_bool_dtype(lsa[name]))


def check_table(frame: pd.DataFrame, name: str, path: Path) -> pd.DataFrame:
    """``frame`` (``name`` as read from ``path``) with its columns checked and typed, or a one-line error."""
    frame.columns = [unescape(str(c)) for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS.get(name, ()) if c not in frame.columns]
    if missing:
        raise _bad(path, f"lacks the columns {', '.join(missing)}")
    for col in list(frame.columns):
        spec = column_kind(name, col)
        if spec is None:
            continue
        kind, optional = spec
        frame[col] = _check_column(frame[col], kind, optional, col, path)
    return frame


def _check_column(values: pd.Series, kind: str, optional: bool, col: str, path: Path) -> pd.Series:
    present = values.notna()
    if not optional and not present.all():
        raise _bad(path, f"{col} is empty in row {_first(~present)}")
    if kind == TEXT:
        return values.map(lambda v: unescape(str(v)) if isinstance(v, str) or not _na(v) else v)
    if kind == KIND:
        text = values.map(lambda v: v if _na(v) else str(v))
        wrong = present & ~text.isin(KINDS)
        if wrong.any():
            raise _bad(path, f"{col} in row {_first(wrong)} is not one of {', '.join(KINDS)}")
        return text
    if kind == FLAG:
        if pd.api.types.is_bool_dtype(values.dtype):
            return values
        if pd.api.types.is_numeric_dtype(values.dtype):  # 0/1 (samples.csv): checked without a Python loop
            wrong = present & ~np.isin(values.to_numpy(dtype=float), (0.0, 1.0))
            flags = values
        else:
            mapping = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
            flags = values.map(lambda v: v if _na(v) else mapping.get(str(v).strip().lower()))
            wrong = present & flags.isna()
        if wrong.any():
            raise _bad(path, f"{col} in row {_first(wrong)} is not true/false (or 1/0)")
        return flags
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    wrong = present & numbers.isna()
    arr = numbers.to_numpy()
    with np.errstate(invalid="ignore"):
        if kind == FRACTION:
            wrong |= present & ~((arr >= 0) & (arr <= 1))
            rule = "a number in [0, 1]"
        elif kind == EPS:
            wrong |= present & ~((arr >= 0) & (arr <= limits.L2_MAX))
            rule = f"a number in [0, {limits.L2_MAX:g}]"
        elif kind == NONNEG:
            wrong |= present & ~((arr >= 0) & np.isfinite(arr))
            rule = "a finite number >= 0"
        elif kind == RATIO:
            wrong |= present & ~(arr >= 0)
            rule = "a number >= 0"
        elif kind == COUNT:
            wrong |= present & ~((arr >= 0) & (arr < 2**53) & (np.floor(arr) == arr))
            rule = "a whole number >= 0"
        else:
            wrong |= present & ~np.isfinite(arr)
            rule = "a finite number"
    if wrong.any():
        raise _bad(path, f"{col} in row {_first(wrong)} is not {rule}")
    if kind == COUNT and not optional:
        return numbers.astype(np.int64)
    return numbers


def _na(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _first(mask: pd.Series) -> int:
    """The 1-based data row (the header not counted) of the first ``True`` in ``mask``."""
    return int(np.flatnonzero(mask.to_numpy())[0]) + 1


# -------------------------------------------------------------------------------------- JSON documents

Check = Callable[[Any, str, Path], Any]


def _where(field: str) -> str:
    return field or "the document"


def text(value: Any, field: str, path: Path) -> Any:
    if not isinstance(value, str):
        raise _bad(path, f"{_where(field)} is not a string")
    return value


def flag(value: Any, field: str, path: Path) -> Any:
    if not isinstance(value, bool):
        raise _bad(path, f"{_where(field)} is not true or false")
    return value


def _number(value: Any, field: str, path: Path, rule: str, ok: Callable[[float], bool]) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise _bad(path, f"{_where(field)} is not {rule}")
    return value


def finite(value, field, path):
    return _number(value, field, path, "a finite number", lambda v: True)


def nonneg(value, field, path):
    return _number(value, field, path, "a finite number >= 0", lambda v: v >= 0)


def fraction(value, field, path):
    return _number(value, field, path, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def sweep_eps(value, field, path):
    """An eps of the analysis' sweep: ``--eps`` takes (0, 1] (the Linf budgets the sweep gives its attacks)."""
    high = limits.EPS_LINF[1]
    return _number(value, field, path, f"an eps in (0, {high:g}]", lambda v: 0 < v <= high)


def whole(low: int, high: int) -> Check:
    def check(value, field, path):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _bad(path, f"{_where(field)} is not a whole number in [{low}, {high}]")
        return value
    return check


def between(low: float, high: float) -> Check:
    def check(value, field, path):
        return _number(value, field, path, f"a number in [{low:g}, {high:g}]", lambda v: low <= v <= high)
    return check


def one_of(*choices: str) -> Check:
    def check(value, field, path):
        if value not in choices:
            raise _bad(path, f"{_where(field)} is not one of {', '.join(choices)}")
        return value
    return check


def opt(check: Check) -> Check:
    """``check``, or null."""
    def inner(value, field, path):
        return None if value is None else check(value, field, path)
    return inner


def list_of(item: Check) -> Check:
    def check(value, field, path):
        if not isinstance(value, list):
            raise _bad(path, f"{_where(field)} is not a list")
        return [item(v, f"{field}[{i}]", path) for i, v in enumerate(value)]
    return check


def obj(fields: dict[str, Check] | None = None, *, required: tuple[str, ...] = ()) -> Check:
    """A JSON object whose listed ``fields`` (optional unless ``required``) pass their checks; others pass."""
    def check(value, field, path):
        if not isinstance(value, dict):
            raise _bad(path, f"{_where(field)} is not a JSON object")
        for key in required:
            if key not in value:
                raise _bad(path, f"{field + '.' if field else ''}{key} is missing")
        for key, sub in (fields or {}).items():
            if key in value:
                sub(value[key], f"{field}.{key}" if field else key, path)
        return value
    return check


def map_of(item: Check) -> Check:
    def check(value, field, path):
        if not isinstance(value, dict):
            raise _bad(path, f"{_where(field)} is not a JSON object")
        for key, v in value.items():
            item(v, f"{field}.{key}", path)
        return value
    return check


ANY_OBJECT = obj()
STR, OSTR = text, opt(text)
OSTRS = opt(list_of(text))
COUNT_ = whole(0, 2**53)
POSITIVE = whole(1, 2**53)
NORM_LO, NORM_HI = limits.NORM_RANGE

MANIFEST = obj({
    "robaudit_version": STR, "torch_version": OSTR, "python_version": OSTR, "platform": OSTR, "command": OSTR,
    "argv": OSTRS,
    "model": opt(obj({"path": OSTR, "sha256": OSTR, "format": OSTR, "arch": OSTR, "arch_kwargs": opt(ANY_OBJECT),
                      "trust_model": opt(flag), "class": OSTR,
                      "source": opt(obj({"spec": STR, "library": OSTR, "library_version": OSTR, "stem": OSTR,
                                         "weights": OSTR, "pretrained": OSTR, "num_classes": opt(POSITIVE),
                                         "arch_kwargs": opt(ANY_OBJECT), "model_dir": OSTR, "threat_model": OSTR,
                                         "dataset": OSTR, "onnx_max_abs_diff": opt(nonneg),
                                         "onnx_max_rel_diff": opt(nonneg), "onnx_checked_inputs": opt(COUNT_),
                                         "onnx_forced": opt(flag)}, required=("spec",)))})),
    "normalization": opt(obj({"mean": opt(list_of(between(-NORM_HI, NORM_HI))),
                              "std": opt(list_of(between(NORM_LO, NORM_HI)))})),
    "dataset": opt(obj({"name": OSTR, "split": opt(one_of("test", "train")), "samples": opt(POSITIVE),
                        "shuffle": opt(flag), "data_dir": OSTR, "source": OSTR,
                        "num_classes": opt(whole(1, limits.CLASSES_MAX)), "input_shape": opt(list_of(POSITIVE)),
                        "image_size": opt(whole(1, limits.IMAGE_SIZE_MAX)), "class_map": OSTR})),
    "n_samples": opt(COUNT_), "seed": whole(0, SEED_MAX), "device": OSTR, "batch_size": whole(1, limits.BATCH_MAX),
    "battery": opt(one_of(*BATTERIES)), "attacks": OSTRS, "configurations": OSTRS, "eps": opt(list_of(sweep_eps)),
    "layers": opt(obj({"patterns": OSTRS, "types": OSTRS, "probe": opt(one_of(*PROBES))})),
    "num_layers": opt(COUNT_), "unprobed_layers": opt(map_of(text)),
    "folded_layers": opt(map_of(POSITIVE)),
    "mvl": opt(obj({"top": opt(POSITIVE), "z": opt(finite), "attack": OSTR, "metric": OSTR,
                    "include_output": opt(flag)})),
    "clean_accuracy": opt(fraction), "seconds": opt(nonneg), "started": OSTR, "finished": OSTR,
    "hardened_from": opt(obj({"run": OSTR, "model": OSTR, "sha256": OSTR, "method": OSTR})),
    "files": map_of(opt(COUNT_)),
})

MVL = obj({
    "criterion": OSTR, "k": opt(POSITIVE), "z": opt(finite), "attack": OSTR, "eps": opt(nonneg),
    "metric": OSTR, "excluded": OSTRS,
    "layers": opt(list_of(obj({"layer": STR, "score": opt(finite), "layer_type": OSTR, "depth": opt(POSITIVE)},
                              required=("layer",)))),
})

CHECKS = obj({
    "n_samples": opt(COUNT_), "seed": opt(whole(0, SEED_MAX)), "device": OSTR, "clean_accuracy": opt(fraction),
    "num_classes": opt(whole(1, limits.CLASSES_MAX)), "skipped": OSTR, "seconds": opt(nonneg),
    "battery_seconds": opt(nonneg),
    "determinism": opt(obj({"max_rel_diff": opt(nonneg)})),
    "outputs": opt(obj({"finite": opt(flag), "min": opt(finite), "max": opt(finite),
                        "max_row_sum_error": opt(nonneg)})),
    "gradients": opt(obj({"error": OSTR, "finite": opt(flag), "zero_fraction": opt(fraction)})),
    "attacks": opt(obj({"norm": OSTR, "large_eps": opt(nonneg), "pgd_large_steps": opt(COUNT_),
                        "pgd_large": opt(fraction), "eps_max": opt(nonneg), "fgsm": opt(fraction),
                        "pgd10": opt(fraction), "pgd50": opt(fraction), "fgsm_source": OSTR, "pgd10_source": OSTR,
                        "skipped": OSTR})),
    "plan": opt(obj({"n_samples": opt(COUNT_), "share": opt(nonneg), "check_cost_per_sample": opt(nonneg),
                     "battery_cost_per_sample": opt(nonneg), "budget": opt(nonneg), "eps_max": opt(nonneg),
                     "reused": OSTRS})),
})

HARDEN = obj({
    "method": OSTR, "base_attack": OSTR, "eps": opt(nonneg), "epochs": opt(COUNT_), "command": OSTR,
    "mvl_layers": OSTRS, "dual_bn": opt(flag), "mvl_top": opt(POSITIVE),
    "mvl_ranking": opt(obj({"attack": OSTR, "eps": opt(nonneg), "metric": OSTR})), "layers_rule": OSTR,
})

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_SIDE_MAX = 1024  # pixels a side of a stored image may have (robaudit stores at most 256)


def png_data(value, field, path):
    """A PNG image as base64 text (the page embeds it as it is): strict base64 (nothing else can reach the
    page), the PNG signature and a header of a sane size; the pixels are never decoded here."""
    if not isinstance(value, str):
        raise _bad(path, f"{_where(field)} is not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(path, f"{_where(field)} is not base64") from None
    if raw[:8] != PNG_SIGNATURE or raw[12:16] != b"IHDR" or len(raw) < 33:
        raise _bad(path, f"{_where(field)} is not a PNG image")
    width, height = struct.unpack(">II", raw[16:24])
    if not (1 <= width <= PNG_SIDE_MAX and 1 <= height <= PNG_SIDE_MAX):
        raise _bad(path, f"{_where(field)} is a {width}x{height} image, not one robaudit stores")
    return value


SIDE = whole(1, PNG_SIDE_MAX)
FRAGILE_SAMPLE = obj({"index": COUNT_, "label": COUNT_, "clean_pred": COUNT_, "adv_pred": COUNT_, "config": STR,
                      "amplification": nonneg, "clean": png_data, "adversarial": png_data, "perturbation": png_data},
                     required=("index", "label", "clean_pred", "adv_pred", "config", "amplification", "clean",
                               "adversarial", "perturbation"))
FRAGILE = obj({"image_size": list_of(POSITIVE), "stored_size": list_of(SIDE), "budget_bytes": opt(COUNT_),
               "left_out": opt(COUNT_), "samples": list_of(FRAGILE_SAMPLE)},
              required=("image_size", "stored_size", "samples"))

DOCUMENTS: dict[str, Check] = {"manifest.json": MANIFEST, "mvl.json": MVL, "checks.json": CHECKS,
                               "harden.json": HARDEN, "fragile.json": FRAGILE}


def check_document(value: Any, name: str, path: Path) -> dict:
    """A JSON document of a run (``name``) with the types robaudit reads, or a one-line error."""
    value = DOCUMENTS.get(name, ANY_OBJECT)(value, "", path)
    if name == "manifest.json":
        norm = value.get("normalization") or {}
        mean, std = norm.get("mean"), norm.get("std")
        if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
            raise _bad(path, "normalization.mean and normalization.std do not give one value each per channel")
    if name == "fragile.json" and not (len(value["image_size"]) == len(value["stored_size"]) == 2):
        raise _bad(path, "image_size and stored_size do not give a height and a width")
    return value
