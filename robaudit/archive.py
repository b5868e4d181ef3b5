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
import keyword
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NoReturn

import torch
from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

from .errors import RobauditError
from .graph_policy import MutationTracker, input_origins, op_refusal, resolve_op, size_refusal
from .pt2zip import STORED, ZipIndex, ZipProblem
from .safeio import MiB, parse_json

TRUST_HINT = "pass --trust-model only if you trust its source"
PROGRAM_MAX_BYTES = 64 * MiB  # a graph of tens of thousands of nodes
CONFIG_MAX_BYTES = 4 * MiB  # payload configs and the small version files
SAMPLE_MAX_BYTES = 64 * MiB  # the example inputs torch.export.save keeps
MAX_RATIO, RATIO_FLOOR = 100, 16 * MiB  # torch stores members uncompressed; a deflated one may not be a bomb
_DTYPES = {int(code): dtype for code, dtype in _SERIALIZE_TO_TORCH_DTYPE.items()}


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


def _target_refusal(target: object) -> str | None:
    """Why a node's call target may not run from an untrusted file, or None for plain computation."""
    if not isinstance(target, str):
        return "is not a torch operator"
    parts = target.split(".")
    if parts[0] == "_operator":
        ok = len(parts) == 2 and parts[1] in _OPERATOR_TARGETS
    elif parts[0] == "math":
        ok = len(parts) == 2 and parts[1] in _MATH_TARGETS
    elif parts[:1] == ["torch"] and len(parts) == 2:
        ok = parts[1] in _TORCH_TARGETS
    elif parts[:3] == ["torch", "ops", "higher_order"]:
        ok = len(parts) == 4 and parts[3] in _HIGHER_ORDER_TARGETS
    else:
        op = resolve_op(target)  # the operator registry only finds registered C++ operators
        return "is not a torch operator" if op is None else op_refusal(op)
    return None if ok else "is not a torch operator"


class _Refuse:
    """Raises the refusal, naming the archive and its member."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, member: str, what: str, hint: str = TRUST_HINT, *,
                 why: str = "loading it could run code from the file") -> NoReturn:
        raise UnsafeArchiveError(f"{self.path.name}: {member} {what}; refused because {why} ({hint})")


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


def _is_node(value: Any) -> bool:
    return isinstance(value, dict) and "target" in value and "inputs" in value and "outputs" in value


def _check_graph(graph: dict, origins: dict[str, str], member: str, refuse: _Refuse) -> None:
    """Each node (its target already admitted by :func:`_check_program`) allocates a bounded literal size and
    writes in place only into the graph's own buffers or into tensors it created (nested graphs are checked
    with their inputs counted as foreign)."""
    tracker = MutationTracker(origins)
    for node in graph.get("nodes") or []:
        if not _is_node(node):
            continue
        target = node["target"]
        reason = size_refusal(node)
        if reason:
            refuse(member, f"calls {target[:80]!r}, which {reason}", why="running it could exhaust memory")
        op = resolve_op(target)
        if op is not None:
            reason = tracker.visit(op, node)
            if reason:
                refuse(member, f"calls {target[:80]!r}, which {reason}", why="a model file may change only its "
                       "own buffers")
        for _, value in _walk(node.get("inputs")):
            if isinstance(value, dict) and isinstance(value.get("as_graph"), dict):
                _check_graph(value["as_graph"].get("graph") or {}, {}, member, refuse)


def _check_program(program: Any, member: str, refuse: _Refuse) -> None:
    gm = program.get("graph_module") if isinstance(program, dict) else None
    if not isinstance(gm, dict) or not isinstance(gm.get("graph"), dict):
        refuse(member, "has no graph module", "re-export the model with torch.export.save")
    for key in program.get("range_constraints") or {}:
        if not _safe_sympy(str(key)):
            refuse(member, f"has a shape constraint that is not a plain symbol ({str(key)[:60]!r})")
    for key, value in _walk(gm):
        if _is_node(value):
            target = value.get("target")
            reason = _target_refusal(target)
            if reason:  # every node, wherever it sits: only plain computation is called
                refuse(member, f"calls {str(target)[:80]!r}, which {reason}")
            name = value.get("name", "")
            if name and not (isinstance(name, str) and is_identifier(name)):
                refuse(member, f"has a node named {str(name)[:60]!r}, not a plain identifier")
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
    for tensor_name in gm["graph"].get("tensor_values") or {}:
        if not is_identifier(tensor_name):
            refuse(member, f"names a tensor value {tensor_name[:60]!r}, not a plain identifier")
    signature = gm.get("signature") if isinstance(gm.get("signature"), dict) else {}
    _check_graph(gm["graph"], input_origins(signature), member, refuse)


def is_class_path(name: str) -> bool:
    """``torch.nn.modules.conv.Conv2d`` or ``tests.test_x.<locals>.Net``: a class's qualified name."""
    return bool(name) and all(seg == "<locals>" or is_identifier(seg) for seg in name.split("."))


def _check_metadata(meta: dict, member: str, refuse: _Refuse) -> None:
    """The module stack names modules and classes that become layer names in tables, CSVs and the report."""
    stack = meta.get("nn_module_stack") if isinstance(meta, dict) else None
    if not stack:
        return
    for item in str(stack).split(";"):
        parts = item.split(",")
        if len(parts) != 3:
            refuse(member, f"has a malformed module stack entry {ascii(item[:60])}")
        key, path, cls = parts
        if not re.fullmatch(r"[A-Za-z0-9_.@]+", key):
            refuse(member, f"has a module stack key {ascii(key[:60])}, not a plain name")
        if not is_dotted_name(path, allow_empty=True):
            refuse(member, f"names a submodule {ascii(path[:60])}, not a plain dotted name")
        if not is_class_path(cls):
            refuse(member, f"names a module class {ascii(cls[:60])}, not a plain dotted identifier")


def _nbytes(meta: Any) -> int | None:
    """Bytes a tensor's storage must hold for its sizes, strides and offset (None when malformed)."""
    try:
        dtype = _DTYPES[int(meta["dtype"])]
        sizes = [int(d["as_int"]) for d in meta["sizes"]]
        strides = [int(d["as_int"]) for d in meta["strides"]]
        offset = int(meta["storage_offset"]["as_int"])
    except (KeyError, TypeError, ValueError):
        return None
    if len(sizes) != len(strides) or min(sizes + strides + [offset], default=0) < 0:
        return None
    if 0 in sizes:
        return 0
    span = offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1
    return span * dtype.itemsize


def _check_payload_config(config: Any, member: str, refuse: _Refuse, *, constants: bool) -> dict[str, int]:
    """The config's entries are plain tensors; returns the bytes each payload file must hold at most."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        refuse(member, "is not a payload config", "re-export the model with torch.export.save")
    needed: dict[str, int] = {}
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
        nbytes = _nbytes(meta.get("tensor_meta"))
        if not re.fullmatch(r"[A-Za-z0-9_]+", path_name) or nbytes is None:
            refuse(member, f"has a malformed entry for {fqn[:60]!r}", "re-export the model with torch.export.save")
        needed[path_name] = max(needed.get(path_name, 0), nbytes)
    return needed


def _member_cap(rel: str) -> int:
    """The most a member other than a tensor payload may declare: a few MB for configs and small files."""
    if rel.startswith("models/") and rel.endswith(".json"):
        return PROGRAM_MAX_BYTES
    if rel.startswith("data/sample_inputs/"):
        return SAMPLE_MAX_BYTES
    return CONFIG_MAX_BYTES


class _Archive:
    """The checked zip index of an export archive and the JSON members read through it."""

    def __init__(self, path: Path, fh: BinaryIO, refuse: _Refuse) -> None:
        self.path, self.refuse = path, refuse
        try:
            self.index = ZipIndex(fh)
        except ZipProblem as p:
            if p.hostile:
                refuse(p.member, p.what, why="two zip readers could read it differently or it could exhaust memory")
            raise RobauditError(f"{path.name} is not a readable torch.export archive ({p.member} {p.what}): "
                                "re-export it") from None
        names = [m.name for m in self.index.members]
        if any("/" not in n for n in names) or len({n.split("/", 1)[0] for n in names}) != 1:
            if "version" in names or "serialized_exported_program.json" in names:
                refuse("the archive", "is in the legacy torch.export format, which is unpickled",
                       f"re-export it with a current torch, or {TRUST_HINT}")
            raise RobauditError(f"{path.name} is not a readable torch.export archive: re-export it")
        self.members = {m.rel: m for m in self.index.members}
        if "archive_version" not in self.members or "models/model.json" not in self.members:
            raise RobauditError(f"{path.name} is not a readable torch.export archive (no archive_version or "
                                "models/model.json): re-export it with torch.export.save")

    def read(self, rel: str, cap: int) -> bytes:
        try:
            return self.index.read(self.members[rel], cap=cap)
        except ZipProblem as p:
            if p.hostile:
                self.refuse(rel, p.what, why="inflating it could exhaust memory")
            raise RobauditError(f"{self.path.name}: {rel} {p.what}: re-export the model") from None

    def json(self, rel: str) -> Any:
        return parse_json(self.read(rel, _member_cap(rel)), where=f"{self.path.name}: {rel}",
                          fix="re-export the model with torch.export.save")


def _check_sizes(archive: _Archive, payloads: dict[str, int]) -> None:
    """Every member declares no more than it may hold before anything is inflated: tensor payloads what
    their metadata says, the rest a fixed cap; a deflated member inflates at most :data:`MAX_RATIO` times."""
    for rel, m in archive.members.items():
        cap = payloads.get(rel, _member_cap(rel))
        if rel in payloads and m.size < payloads[rel]:
            archive.refuse(rel, f"holds {m.size} bytes but its tensors need {payloads[rel]}",
                           "re-export the model with torch.export.save", why="it is damaged")
        if m.size > cap and (m.method != STORED or rel not in payloads):
            archive.refuse(rel, f"declares {m.size} bytes, more than the {cap} it may hold",
                           why="inflating it could exhaust memory")
        if m.method != STORED and m.size > RATIO_FLOOR and m.size > MAX_RATIO * m.comp_size:
            archive.refuse(rel, f"inflates {m.size // max(m.comp_size, 1)}x ({m.comp_size} to {m.size} bytes)",
                           why="inflating it could exhaust memory")


def check_archive(path: Path, fh: BinaryIO) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle, import, paste code, do I/O or exhaust memory.

    ``fh`` is the open file torch will read next, so that what is checked is what is loaded.
    """
    refuse = _Refuse(path)
    archive = _Archive(path, fh, refuse)
    payloads: dict[str, int] = {}
    for rel in archive.members:
        if rel.startswith("data/aotinductor/"):
            refuse(rel, "is a compiled AOTInductor library, which would be loaded and run")
        if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt"):
            refuse(rel, "is a legacy pickled weight file")
    programs = [rel for rel in archive.members if rel.startswith("models/") and rel.endswith(".json")]
    for rel in programs:
        model_name = rel[len("models/"):-len(".json")]
        for kind, constants in (("weights", False), ("constants", True)):
            cfg = f"data/{kind}/{model_name}_{kind}_config.json"
            if cfg in archive.members:
                needed = _check_payload_config(archive.json(cfg), cfg, refuse, constants=constants)
                payloads.update({f"data/{kind}/{name}": n for name, n in needed.items()})
    _check_sizes(archive, payloads)
    for rel in programs:
        _check_program(archive.json(rel), rel, refuse)
        sample = f"data/sample_inputs/{rel[len('models/'):-len('.json')]}.pt"
        if sample in archive.members:
            _check_sample_inputs(archive.read(sample, SAMPLE_MAX_BYTES), sample, refuse)
    fh.seek(0)
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
