"""``torch.export`` programs as probe-able modules: export with a dynamic batch, unflatten, op taps.

An exported program becomes a module tree again (:func:`unflatten_program`), with an :class:`OpTap`
after every functional activation and residual addition so that forward hooks see them as layers;
its BatchNorm/Dropout leaves can be rebuilt as real ``torch.nn`` modules for training
(:func:`make_trainable`); an archive exported with a fixed batch size runs any batch in chunks
(:func:`run_at_fixed_batch`), and :func:`fixed_batch` / :func:`current_chunk` tell the probes so.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.fx
from torch import nn

MAX_BATCH = 65536


def export_dynamic_batch(module: nn.Module, example: torch.Tensor):
    """``torch.export.export`` of ``module`` in eval mode with a dynamic batch dimension (train mode restored)."""
    was_training = module.training
    module.eval()
    try:
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        x = example[:2] if example.shape[0] >= 2 else example.repeat(2, *([1] * (example.dim() - 1)))
        return torch.export.export(module, (x.detach(),), dynamic_shapes=({0: batch},))
    finally:
        module.train(was_training)


def save_program(path: str | os.PathLike, ep) -> Path:
    """Write an exported program through an exclusive, random temporary name (never through a symlink)."""
    from . import safeio

    path = Path(path)
    with safeio.atomic_file(path) as fh:
        torch.export.save(ep, fh)
    return path


# functional activations (aten names, in-place variants included) probed as layers of their caller
ACTIVATION_OPS = frozenset({"relu", "relu6", "gelu", "silu", "hardtanh", "leaky_relu", "elu", "sigmoid", "tanh"})
# torch.nn modules whose output is a tuple: the first tensor is the layer's output (attention)
TUPLE_MODULES = frozenset({"MultiheadAttention"})
_CONTAINERS = {"Module", "Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict", "Container"}
# classes of torch.nn: ops inside them belong to the module, which is probed as a whole
NN_CLASSES = frozenset(n for n in dir(nn) if isinstance(getattr(nn, n), type)
                       and issubclass(getattr(nn, n), nn.Module) and n not in _CONTAINERS)


class OpTap(nn.Module):
    """An identity module inserted after a functional op in a graph, so that a forward hook sees its output."""

    def __init__(self, layer: str, op: str) -> None:
        super().__init__()
        self.layer = layer  # the layer name without call index, e.g. "layers.3:relu"
        self.op = op

    def forward(self, x):
        return x


def op_name(node: "torch.fx.Node") -> str | None:
    """The probed op a graph node runs (``relu``, ``relu6``, ``add`` ...), or None."""
    if node.op != "call_function":
        return None
    target = str(node.target)
    if not target.startswith("aten."):
        return None
    base = target.split(".")[1].rstrip("_")
    if base == "add" and target.split(".")[2] == "Tensor":
        vals = [getattr(a, "meta", {}).get("val") for a in node.args[:2]]
        if len(vals) == 2 and all(isinstance(v, torch.Tensor) for v in vals):
            return "add"
        return None
    if base not in ACTIVATION_OPS:
        return None
    if base == "hardtanh":
        lo, hi = (list(node.args[1:3]) + [-1.0, 1.0][len(node.args) - 1:])[:2]
        return "relu6" if (float(lo), float(hi)) == (0.0, 6.0) else "hardtanh"
    return base


def add_op_taps(root: nn.Module, type_map: Mapping[str, str]) -> int:
    """Insert an :class:`OpTap` after every probed op of an unflattened program's graphs; return how many.

    Ops inside torch.nn modules (the ReLU module's own ``relu``, attention's internals) are left to
    the module. Each changed graph's code is generated again.
    """
    n = 0
    for qual, sub in list(root.named_modules()):
        graph = sub.__dict__.get("graph")
        if not isinstance(graph, torch.fx.Graph) or not hasattr(sub, "finalize"):
            continue
        if qual and type_map.get(qual, type(sub).__name__) in NN_CLASSES:
            continue
        changed = False
        for node in list(graph.nodes):
            op = op_name(node)
            if op is None:
                continue
            tap_name = f"_robaudit_op{n}"
            n += 1
            sub.add_module(tap_name, OpTap(f"{qual}:{op}", op))
            with graph.inserting_after(node):
                tap = graph.create_node("call_module", tap_name, (node,))
            tap.meta = dict(node.meta)
            node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
            changed = True
        if changed:
            sub.finalize()  # builds a new GraphModule over the changed graph, and lints it
    return n


def unflatten_program(ep) -> tuple[nn.Module, dict[str, str]]:
    """Rebuild an exported program's module tree; return it with its original classes by qualified name.

    Every submodule runs its generated code (the fx Interpreter is about 7x slower on a small CNN),
    which still calls each submodule, so forward hooks fire; probed functional ops get a tap module.
    """
    module = torch.export.unflatten(ep)
    type_map: dict[str, str] = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        for qualname, cls in stack.values():
            if qualname:
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                type_map.setdefault(qualname, cls_name.rsplit(".", 1)[-1])
    # unflatten generates each submodule's code before it merges repeated calls (``relu``,
    # ``relu@1``) into one module, so that code can name modules that no longer exist: rebuild it.
    for sub in module.modules():
        if hasattr(sub, "_run_with_interpreter"):
            if hasattr(sub, "finalize"):
                sub.finalize()
            sub._run_with_interpreter = False
    add_op_taps(module, type_map)
    return module, type_map


def as_graph(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, dict[str, str]]:
    """Export an eager model internally and unflatten it, so its ops are layers named as in its ``.pt2``."""
    return unflatten_program(export_dynamic_batch(model, example))


# leaf modules whose train mode differs from eval mode, and the aten op each becomes in an export
TRAINABLE_LEAVES = {
    "BatchNorm1d": "batch_norm", "BatchNorm2d": "batch_norm", "BatchNorm3d": "batch_norm",
    "Dropout": "dropout", "Dropout1d": "feature_dropout", "Dropout2d": "feature_dropout",
    "Dropout3d": "feature_dropout", "LayerNorm": "layer_norm", "GroupNorm": "group_norm",
}


def _rebuild_leaf(sub: nn.Module, cls_name: str) -> nn.Module | None:
    """A real ``torch.nn`` module equivalent to the unflattened leaf ``sub``, sharing its tensors; or None."""
    graph = sub.__dict__.get("graph")
    if graph is None:
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    calls = [n for n in graph.nodes if n.op == "call_function"]
    if len(placeholders) != 1 or len(calls) != 1 or str(calls[0].target).split(".")[1] != TRAINABLE_LEAVES[cls_name]:
        return None
    args = list(calls[0].args)

    def attr(a):
        return getattr(sub, a.target) if getattr(a, "op", None) == "get_attr" else None

    cls = getattr(nn, cls_name)
    if cls_name.startswith("BatchNorm"):  # (x, weight, bias, running_mean, running_var, training, momentum, eps, _)
        weight, bias, mean, var = (attr(a) for a in args[1:5])
        if mean is None:
            return None
        new = cls(mean.shape[0], eps=float(args[7]), momentum=float(args[6]), affine=weight is not None)
        for name, value in (("weight", weight), ("bias", bias)):
            if value is not None:
                setattr(new, name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
        new.running_mean, new.running_var = mean, var
        if hasattr(sub, "num_batches_tracked"):
            new.num_batches_tracked = sub.num_batches_tracked
    elif cls_name.startswith("Dropout"):  # (x, p, train)
        new = cls(p=float(args[1]))
    elif cls_name == "LayerNorm":  # (x, normalized_shape, weight, bias, eps, _)
        weight, bias = attr(args[2]) if len(args) > 2 else None, attr(args[3]) if len(args) > 3 else None
        new = cls(list(args[1]), eps=float(args[4]) if len(args) > 4 else 1e-5, elementwise_affine=weight is not None,
                  bias=bias is not None)
        if weight is not None:
            new.weight = weight
        if bias is not None:
            new.bias = bias
    else:  # GroupNorm: (x, num_groups, weight, bias, eps, _)
        weight, bias = attr(args[2]), attr(args[3])
        if weight is None:
            return None
        new = cls(int(args[1]), weight.shape[0], eps=float(args[4]), affine=True)
        new.weight, new.bias = weight, bias
    return new


def make_trainable(module: nn.Module, type_map: dict[str, str]) -> tuple[list[str], list[str]]:
    """Replace an unflattened program's BatchNorm/Dropout/LayerNorm/GroupNorm leaves by real ``torch.nn``
    modules holding the same parameters and buffers, so that train mode behaves as in eager (BN statistics
    update, dropout drops). Returns ``(rebuilt, left_frozen)`` qualified names; the state dict keeps its keys.
    """
    rebuilt, frozen = [], []
    for name, sub in list(module.named_modules()):
        cls_name = type_map.get(name)
        if not name or cls_name not in TRAINABLE_LEAVES or "graph" not in sub.__dict__:
            continue
        new = _rebuild_leaf(sub, cls_name)
        if new is None:
            frozen.append(name)
            continue
        parent_name, _, attr_name = name.rpartition(".")
        new.train(sub.training)
        setattr(module.get_submodule(parent_name), attr_name, new)
        rebuilt.append(name)
    return rebuilt, frozen


@dataclass
class _Chunking:
    batch: int
    chunk: tuple[int, int] | None = None  # (index, valid rows) of the chunk running now


_CHUNKING: "weakref.WeakKeyDictionary[nn.Module, _Chunking]" = weakref.WeakKeyDictionary()


def exported_batch(ep) -> int | None:
    """The batch size an archive was exported with, or None when its batch dimension is dynamic."""
    inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in inputs:
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and len(shape) > 0 and isinstance(shape[0], int):
                return int(shape[0])
    return None


def fixed_batch(module: nn.Module) -> int | None:
    """The batch size ``module`` runs in when :func:`run_at_fixed_batch` made it chunk its inputs, else None."""
    state = _CHUNKING.get(module)
    return state.batch if state else None


def current_chunk(module: nn.Module) -> tuple[int, int] | None:
    """``(index, valid_rows)`` of the chunk a fixed-batch module is running now, or None."""
    state = _CHUNKING.get(module)
    return state.chunk if state else None


def run_at_fixed_batch(module: nn.Module, batch: int) -> None:
    """Let a module that accepts only batches of ``batch`` rows take any batch.

    Inputs are cut into chunks of ``batch`` rows, the last padded with copies of its last row; the
    padded rows are dropped from the output. While a chunk runs, :func:`current_chunk` gives
    ``(index, valid_rows)`` so that a :class:`~robaudit.probe.LayerProbe` can join the chunks' layer
    outputs and leave the padding out.
    """
    inner = type(module).forward
    state = _CHUNKING[module] = _Chunking(batch)

    def forward(x, *args, **kwargs):
        outs = []
        try:
            for i, start in enumerate(range(0, x.shape[0], batch)):
                part = x[start:start + batch]
                valid = part.shape[0]
                if valid < batch:
                    part = torch.cat([part, part[-1:].expand(batch - valid, *part.shape[1:])])
                state.chunk = (i, valid)
                outs.append(inner(module, part, *args, **kwargs)[:valid])
        finally:
            state.chunk = None
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    module.forward = forward
