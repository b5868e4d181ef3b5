"""Layer selection and forward hooks: capture every probed layer's output, always cleaning up.

A layer is a call of a module in one forward pass: a module called k times gives the layers
``name``, ``name#2``, ..., ``name#k`` (in the order the calls happen).
"""
from __future__ import annotations

import contextlib
import fnmatch
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import RobauditError


@dataclass(frozen=True)
class Layer:
    """One probed layer: the module's qualified name, its call index and its original class name."""

    module: str
    call: int
    layer_type: str
    order: int

    @property
    def name(self) -> str:
        return self.module if self.call == 1 else f"{self.module}#{self.call}"


def module_types(model: nn.Module, type_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """Qualified module name -> class name, preferring ``type_map`` (original classes of an export)."""
    out = {}
    for name, mod in model.named_modules():
        if name == "":
            continue
        out[name] = (type_map or {}).get(name, type(mod).__name__)
    return out


def select_modules(
    model: nn.Module,
    *,
    layer_types: Sequence[str] | None = None,
    patterns: Sequence[str] | None = None,
    type_map: Mapping[str, str] | None = None,
) -> list[str]:
    """Names of the leaf modules to probe, filtered by class name and/or qualified-name glob.

    Without filters every leaf module is a candidate; modules whose output is not a tensor are
    dropped later, when the probe first sees them run.
    """
    types = module_types(model, type_map)
    leaves = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    wanted_types = {t.strip().lower() for t in layer_types or [] if t.strip()}
    if wanted_types:
        known = {t.lower() for t in types.values()}
        unknown = sorted(wanted_types - known)
        if unknown:
            raise RobauditError(
                f"no module of type {', '.join(unknown)} in the model; "
                f"its layer types are {', '.join(sorted(set(types[n] for n in leaves)))}"
            )
    selected = []
    for name in leaves:
        if wanted_types and types[name].lower() not in wanted_types:
            continue
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        selected.append(name)
    if not selected:
        what = []
        if layer_types:
            what.append(f"types {','.join(layer_types)}")
        if patterns:
            what.append(f"names {','.join(patterns)}")
        raise RobauditError(
            f"no layer matches {' and '.join(what) or 'the filters'}; "
            f"available layers: {', '.join(leaves[:20])}{' ...' if len(leaves) > 20 else ''}"
        )
    return selected


Transform = Callable[[Layer, torch.Tensor], torch.Tensor]


class LayerProbe:
    """Context manager that hooks modules and records each call's output tensor.

    ``detach=True`` (analysis) stores detached outputs; ``detach=False`` (training) keeps them in
    the autograd graph. ``transform(layer, output)``, when given, replaces a layer's output (used
    to perturb activations); the recorded value is the transformed one. Hooks are removed on exit,
    whatever happened inside the ``with`` block.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str],
        *,
        type_map: Mapping[str, str] | None = None,
        detach: bool = True,
        transform: Transform | None = None,
    ) -> None:
        self.model = model
        self.module_names = list(modules)
        self.types = module_types(model, type_map)
        self.detach = detach
        self.transform = transform
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self._outputs: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._layers: dict[str, Layer] = {}

    # -- hook management -------------------------------------------------------------------
    def __enter__(self) -> "LayerProbe":
        named = dict(self.model.named_modules())
        missing = [n for n in self.module_names if n not in named]
        if missing:
            raise RobauditError(f"the model has no module named {missing[0]!r}")
        self._register()
        return self

    def _register(self) -> None:
        named = dict(self.model.named_modules())
        try:
            for name in self.module_names:
                self._handles.append(named[name].register_forward_hook(self._make_hook(name)))
        except Exception:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Remove the hooks for the duration of the block (e.g. while attacks run), then restore them."""
        self.remove()
        try:
            yield
        finally:
            self._register()

    def remove(self) -> None:
        """Remove every hook this probe registered (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return None
            call = self._calls.get(name, 0) + 1
            self._calls[name] = call
            key = name if call == 1 else f"{name}#{call}"
            layer = self._layers.get(key)
            if layer is None:
                layer = Layer(name, call, self.types.get(name, type(module).__name__), len(self._layers))
                self._layers[key] = layer
            new = None
            if self.transform is not None:
                new = self.transform(layer, output)
                output = new
            # clone: a later in-place op (ReLU(inplace=True), ``out += identity``) would otherwise
            # rewrite the recorded activation through shared storage
            self._outputs[key] = output.detach().clone() if self.detach else output
            return new

        return hook

    # -- results ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the outputs of the last forward pass (call before each forward)."""
        self._calls.clear()
        self._outputs = OrderedDict()

    def outputs(self) -> "OrderedDict[str, torch.Tensor]":
        """Outputs recorded since the last ``reset``, keyed by layer name, in call order."""
        return self._outputs

    def run(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        """Reset, run ``forward(x)`` and return ``(logits, outputs)``."""
        self.reset()
        logits = forward(x)
        return logits, self.outputs()

    @property
    def layers(self) -> list[Layer]:
        """Layers seen so far, in first-call order."""
        return sorted(self._layers.values(), key=lambda l: l.order)
