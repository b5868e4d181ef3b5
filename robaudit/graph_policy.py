"""Which operators an untrusted ``torch.export`` graph may call: computation on its own tensors only.

A registered ATen operator is not harmless by being registered: ``aten.from_file`` maps a file into a
tensor (and ``copy_`` into it rewrites the file), ``aten.set_`` swaps a tensor's storage, ``aten.save``
and ``aten._print`` write. :func:`op_refusal` refuses operators that take a file name or a storage, and
:class:`MutationTracker` follows each tensor in a graph back to where it came from, so that an in-place
operator may write only into the graph's own buffers or into tensors the graph itself created.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

# Operators that read or write files, replace storages or print, whatever their schema says.
DENIED_OPS = frozenset({"from_file", "save", "set", "set_", "_print", "warn", "_set_item"})
_FILE_ARGS = frozenset({"filename", "path", "file", "fname"})
WRITABLE = frozenset({"buffer", "fresh"})  # where an in-place operator may write
MAX_ELEMENTS = 1 << 31  # a literal size beyond this (8 GB of float32) is an allocation bomb, not a layer
_SIZE_ARGS = frozenset({"size", "sizes", "shape"})


def resolve_op(target: str) -> torch._ops.OpOverload | None:
    """``torch.ops.aten.add.Tensor`` as a registered C++ operator overload, or None."""
    parts = target.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"] or parts[2] not in ("aten", "prims"):
        return None
    try:
        overload = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
    except (AttributeError, RuntimeError):
        return None
    return overload if isinstance(overload, torch._ops.OpOverload) else None


def op_refusal(op: torch._ops.OpOverload) -> str | None:
    """Why ``op`` may not run from an untrusted file (it does I/O or replaces a storage), or None."""
    schema = op._schema
    if schema.name.split("::", 1)[-1] in DENIED_OPS:
        return "reads or writes outside the graph's tensors"
    for arg in schema.arguments:
        kind = str(arg.type)
        if "Storage" in kind:
            return f"takes a storage ({arg.name})"
        if "str" in kind and arg.name in _FILE_ARGS:
            return f"takes a file name ({arg.name})"
    return None


def size_refusal(node: dict) -> str | None:
    """Why a node's literal size argument would exhaust memory (``aten.zeros([10**12])``), or None."""
    for item in node.get("inputs") or []:
        if not isinstance(item, dict) or item.get("name") not in _SIZE_ARGS or not isinstance(item.get("arg"), dict):
            continue
        dims = item["arg"].get("as_ints")
        if not isinstance(dims, list):
            dims = [d.get("as_int") for d in item["arg"].get("as_sym_ints") or [] if isinstance(d, dict)]
        numel = 1
        for d in dims:
            if isinstance(d, int) and not isinstance(d, bool) and d > 0:
                numel *= d
        if numel > MAX_ELEMENTS:
            return f"asks for {numel} elements (at most {MAX_ELEMENTS} are allowed)"
    return None


def tensor_names(arg: Any) -> Iterator[str]:
    """The tensor names an argument of a serialized node refers to (``as_tensor``, lists, optionals)."""
    stack = [arg]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            inner = value.get("as_tensor")
            if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                yield inner["name"]
            for item in value.get("as_tensors") or []:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    yield item["name"]
            stack.extend(v for k, v in value.items() if k not in ("as_tensor", "as_tensors", "as_graph"))
        elif isinstance(value, list):
            stack.extend(value)


def input_origins(signature: dict) -> dict[str, str]:
    """Each graph input's kind from the graph signature: ``parameter``, ``buffer``, ``user_input`` ..."""
    origins: dict[str, str] = {}
    for spec in signature.get("input_specs") or []:
        if not isinstance(spec, dict) or len(spec) != 1:
            continue
        (kind, body), = spec.items()
        arg = body.get("arg") if isinstance(body, dict) else None
        direct = isinstance(arg, dict) and isinstance(arg.get("name"), str)
        for name in [arg["name"]] if direct else tensor_names(arg):
            origins[name] = kind
    return origins


class MutationTracker:
    """Follows views back to their base so that an in-place write lands only where :data:`WRITABLE` allows.

    Names not seen before (the inputs of a nested graph) count as foreign: writing into them is refused.
    """

    def __init__(self, origins: dict[str, str]) -> None:
        self.origins = dict(origins)

    def _origin(self, name: str) -> str:
        return self.origins.get(name, "foreign")

    def visit(self, op: torch._ops.OpOverload, node: dict) -> str | None:
        """Record the node's outputs; the reason its in-place write is refused, or None."""
        inputs = {i.get("name"): i.get("arg") for i in node.get("inputs") or [] if isinstance(i, dict)}
        alias_of: dict[str, str] = {}
        for arg in op._schema.arguments:
            info = arg.alias_info
            if info is None:
                continue
            origins = [self._origin(n) for n in tensor_names(inputs.get(arg.name))]
            if info.is_write:
                bad = [o for o in origins if o not in WRITABLE]
                if bad:
                    return f"writes in place into {bad[0].replace('_', ' ')} {arg.name!r}"
            for alias_set in info.before_set:
                alias_of[alias_set] = origins[0] if origins else "fresh"
        outputs = node.get("outputs") or []
        for i, out in enumerate(outputs):
            ret = op._schema.returns[i] if i < len(op._schema.returns) else None
            origin = "fresh"
            if ret is not None and ret.alias_info is not None:
                origin = next((alias_of[s] for s in ret.alias_info.before_set if s in alias_of), "foreign")
            for name in tensor_names(out):
                self.origins[name] = origin
        return None
