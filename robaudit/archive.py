"""Inspection of a ``torch.export`` archive before anything in it is deserialized.

``torch.export.load`` unpickles some members (pickled weights and constants, opaque objects,
the legacy format, sample inputs on a fallback), ``sympify``-s the symbolic shape expressions,
resolves call targets by attribute lookup on ``torch``, and ``torch.fx`` pastes module and node
names into the code it generates. :func:`check_archive` reads only the zip directory and its
JSON members and refuses, with one line naming the member, anything outside the plain subset
that a ``torch.export.save`` of an ordinary model writes. ``--trust-model`` skips it.
"""
from __future__ import annotations

import io
import json
import keyword
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import RobauditError

TRUST_HINT = "pass --trust-model only if you trust its source"


class UnsafeArchiveError(RobauditError):
    """The archive holds something that would run code when loaded."""


# Python-level call targets that an export of an ordinary model may hold (symbolic shape arithmetic).
_OPERATOR_TARGETS = {
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert",
}
_MATH_TARGETS = {"ceil", "floor", "sqrt", "trunc"}
_TORCH_TARGETS = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "sym_sum"}
_HIGHER_ORDER_TARGETS = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}

# sympy's srepr vocabulary, which the archive uses for symbolic shapes.
_SYMPY_WORDS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Min", "Max", "Mod", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "true", "false", "True", "False", "oo",
    "zoo", "nan", "Infinity", "NegativeInfinity", "Half", "One", "Zero", "NegativeOne", "S",
    "positive", "integer", "real", "nonnegative", "negative", "finite", "precision",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
}
_SYMPY_TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|'[a-z]+[0-9]+'|[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?|[(),=+\-*/.]")
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]+")  # shape symbols: s77, u0
_SEGMENT = re.compile(r"[A-Za-z0-9_]+(@[0-9]+)?")


def is_identifier(name: str) -> bool:
    """A Python identifier that is not a keyword and not a dunder."""
    return name.isidentifier() and not keyword.iskeyword(name) and not (name.startswith("__") and name.endswith("__"))


def is_dotted_name(name: str, *, allow_empty: bool = False) -> bool:
    """``layer1.0.conv`` (a module path, with an optional ``@N`` call suffix per segment)."""
    if name == "":
        return allow_empty
    return all(_SEGMENT.fullmatch(seg) and not seg.startswith("__") for seg in name.split("."))


def _safe_sympy(expr: str) -> bool:
    pos = 0
    while pos < len(expr):
        m = _SYMPY_TOKEN.match(expr, pos)
        if not m:
            return False
        tok = m.group(0)
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _SYMPY_WORDS and not _SYMBOL.fullmatch(tok):
            return False
        pos = m.end()
    return True


def _safe_target(target: str) -> bool:
    parts = target.split(".")
    if parts[0] == "_operator":
        return len(parts) == 2 and parts[1] in _OPERATOR_TARGETS
    if parts[0] == "math":
        return len(parts) == 2 and parts[1] in _MATH_TARGETS
    if parts[0] != "torch":
        return False
    if len(parts) == 2:
        return parts[1] in _TORCH_TARGETS
    if parts[1:3] == ["ops", "higher_order"]:
        return len(parts) == 4 and parts[3] in _HIGHER_ORDER_TARGETS
    if parts[1:3] in (["ops", "aten"], ["ops", "prims"]) and len(parts) == 5:
        # resolve through the operator registry: it only finds registered C++ operators
        try:
            packet = getattr(getattr(torch.ops, parts[2]), parts[3])
            overload = getattr(packet, parts[4])
        except (AttributeError, RuntimeError):
            return False
        return isinstance(overload, torch._ops.OpOverload)
    return False


class _Refuse:
    """Collects the first reason to refuse, naming the archive and its member."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, member: str, what: str, hint: str = TRUST_HINT) -> None:
        raise UnsafeArchiveError(f"{self.path.name}: {member} {what}; refused because loading it could run code "
                                 f"from the file ({hint})")


def _walk(obj: Any) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair of a JSON tree, depth first."""
    stack = [(None, obj)]
    while stack:
        key, value = stack.pop()
        yield key, value
        if isinstance(value, dict):
            stack.extend(value.items())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)


def _check_program(program: dict, member: str, refuse: _Refuse) -> None:
    gm = program.get("graph_module")
    if not isinstance(gm, dict):
        refuse(member, "has no graph module", "re-export the model with torch.export.save")
    for key in program.get("range_constraints") or {}:
        if not _safe_sympy(str(key)):
            refuse(member, f"has a shape constraint that is not a plain symbol ({str(key)[:60]!r})")
    for key, value in _walk(gm):
        if isinstance(value, dict) and "target" in value and "inputs" in value and "outputs" in value:
            target = value.get("target")
            if not isinstance(target, str) or not _safe_target(target):
                refuse(member, f"calls {str(target)[:80]!r}, which is not a torch operator")
            name = value.get("name", "")
            if name and not is_identifier(name):
                refuse(member, f"has a node named {name[:60]!r}, not a plain identifier")
            _check_metadata(value.get("metadata") or {}, member, refuse)
        elif key == "expr_str" and isinstance(value, str) and not _safe_sympy(value):
            refuse(member, f"has a shape expression that is not plain arithmetic ({value[:60]!r})")
        elif key == "name" and isinstance(value, str) and value and not is_identifier(value):
            refuse(member, f"names a value {value[:60]!r}, not a plain identifier")
        elif key == "fqn" and isinstance(value, str) and not is_dotted_name(value, allow_empty=True):
            refuse(member, f"names a module {value[:60]!r}, not a plain dotted name")
        elif key and key.endswith("_name") and isinstance(value, str) and not is_dotted_name(value):
            refuse(member, f"names a tensor {value[:60]!r}, not a plain dotted name")
        elif key == "forward_arg_names" and isinstance(value, str) and not is_identifier(value):
            refuse(member, f"names an argument {value[:60]!r}, not a plain identifier")
        elif key == "custom_obj_values" and value:
            refuse(member, "holds custom script objects")
    for tensor_name in (gm.get("graph") or {}).get("tensor_values") or {}:
        if not is_identifier(tensor_name):
            refuse(member, f"names a tensor value {tensor_name[:60]!r}, not a plain identifier")


def _check_metadata(meta: dict, member: str, refuse: _Refuse) -> None:
    stack = meta.get("nn_module_stack")
    if not stack:
        return
    for item in str(stack).split(";"):
        parts = item.split(",")
        if len(parts) < 3:
            refuse(member, f"has a malformed module stack entry {item[:60]!r}")
        key, path = parts[0], parts[1]
        if not re.fullmatch(r"[A-Za-z0-9_.@]+", key):
            refuse(member, f"has a module stack key {key[:60]!r}, not a plain name")
        if not is_dotted_name(path, allow_empty=True):
            refuse(member, f"names a submodule {path[:60]!r}, not a plain dotted name")


def _check_payload_config(config: dict, member: str, refuse: _Refuse, *, constants: bool) -> None:
    entries = config.get("config")
    if not isinstance(entries, dict):
        refuse(member, "is not a payload config", "re-export the model with torch.export.save")
    for fqn, meta in entries.items():
        if not is_dotted_name(fqn):
            refuse(member, f"names a tensor {fqn[:60]!r}, not a plain dotted name")
        if not isinstance(meta, dict):
            refuse(member, f"has a malformed entry for {fqn[:60]!r}", "re-export the model with torch.export.save")
        path_name = str(meta.get("path_name", ""))
        if constants and not path_name.startswith("tensor_"):
            refuse(member, f"stores {fqn[:60]!r} as an opaque or custom object ({path_name[:40]!r})")
        if meta.get("use_pickle"):
            refuse(member, f"stores {fqn[:60]!r} as a pickle (use_pickle)")
        if not re.fullmatch(r"[A-Za-z0-9_]+", path_name) or meta.get("tensor_meta") is None:
            refuse(member, f"has a malformed entry for {fqn[:60]!r}", "re-export the model with torch.export.save")


def check_archive(path: Path) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle, import or paste code; read nothing else."""
    refuse = _Refuse(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise RobauditError(f"{path.name} is not a readable torch.export archive (not a zip file): re-export it") from e
    with zf:
        names = zf.namelist()
        prefixes = {n.split("/", 1)[0] for n in names if "/" in n}
        if len(prefixes) != 1 or any("/" not in n for n in names):
            if "version" in names or "serialized_exported_program.json" in names:
                refuse("the archive", "is in the legacy torch.export format, which is unpickled",
                       f"re-export it with a current torch, or {TRUST_HINT}")
            raise RobauditError(f"{path.name} is not a readable torch.export archive: re-export it")
        root = prefixes.pop() + "/"
        members = {n[len(root):]: n for n in names}
        if "archive_version" not in members or "models/model.json" not in members:
            raise RobauditError(f"{path.name} is not a readable torch.export archive (no archive_version or "
                                "models/model.json): re-export it with torch.export.save")

        def read_json(rel: str) -> Any:
            try:
                return json.loads(zf.read(members[rel]))
            except (ValueError, UnicodeDecodeError) as e:
                raise RobauditError(f"{path.name}: {rel} is not valid JSON: re-export the model") from e

        for rel in members:
            if rel.startswith("data/aotinductor/"):
                refuse(rel, "is a compiled AOTInductor library, which would be loaded and run")
            if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt"):
                refuse(rel, "is a legacy pickled weight file")
            if rel.startswith("models/") and rel.endswith(".json"):
                model_name = rel[len("models/"):-len(".json")]
                _check_program(read_json(rel), rel, refuse)
                for kind, constants in (("weights", False), ("constants", True)):
                    cfg = f"data/{kind}/{model_name}_{kind}_config.json"
                    if cfg in members:
                        _check_payload_config(read_json(cfg), cfg, refuse, constants=constants)
                sample = f"data/sample_inputs/{model_name}.pt"
                if sample in members:
                    _check_sample_inputs(zf.read(members[sample]), sample, refuse)


def _check_sample_inputs(data: bytes, member: str, refuse: _Refuse) -> None:
    """torch retries a failed weights-only load of the sample inputs with full unpickling."""
    if not data:
        return
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of the very pickles refused here
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        refuse(member, "is not a plain tensor file (it needs full unpickling)")
