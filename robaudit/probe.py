"""Layer selection and forward hooks: capture every probed layer's output, always cleaning up.

A layer is a call of a module in one forward pass: a module called k times gives the layers
``name``, ``name#2``, ..., ``name#k`` (in the order the calls happen). In a graph (an unflattened
``torch.export`` program) functional activations and residual additions are layers too, named after
the module that calls them: the k-th ``relu`` op run by ``layers.3`` is ``layers.3:relu#k``
(``:relu`` at the top level). :func:`add_op_taps` makes them hookable.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import fold
from .errors import RobauditError
from .exported import TUPLE_MODULES, OpTap, current_chunk, fixed_batch


PROBE_MODES = ("modules", "ops", "all")

def op_layers(model: nn.Module) -> dict[str, list[str]]:
    """Op layer name (``layers.3:relu``) -> qualified names of its taps, in graph order."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, OpTap):
            out.setdefault(mod.layer, []).append(name)
    return out


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
        if isinstance(mod, OpTap):
            out[mod.layer] = mod.op
            continue
        out[name] = (type_map or {}).get(name, type(mod).__name__)
    return out


def _module_leaves(model: nn.Module, types: Mapping[str, str]) -> list[str]:
    """Modules probed as a whole: leaves, and tuple-returning torch.nn modules (not their insides)."""
    out, inside = [], ()
    for n, m in model.named_modules():
        if not n or isinstance(m, OpTap):
            continue
        if inside and any(n.startswith(p + ".") for p in inside):
            continue
        if types.get(n) in TUPLE_MODULES:
            out.append(n)
            inside = inside + (n,)
        elif not any(not isinstance(c, OpTap) for c in m.children()):
            out.append(n)
    return out


def select_modules(
    model: nn.Module,
    *,
    layer_types: Sequence[str] | None = None,
    patterns: Sequence[str] | None = None,
    type_map: Mapping[str, str] | None = None,
    probe: str = "all",
) -> list[str]:
    """Names of the layers to probe, filtered by class or op name and/or qualified-name glob.

    ``probe``: ``modules`` (leaf modules), ``ops`` (functional activations and residual additions of
    a graph with :class:`OpTap` s) or ``all``. Without filters every candidate is selected; modules
    whose output holds no tensor are dropped later, when the probe first sees them run.
    """
    if probe not in PROBE_MODES:
        raise RobauditError(f"unknown probe mode {probe!r}: use {', '.join(PROBE_MODES)}")
    types = module_types(model, type_map)
    leaves = _module_leaves(model, types) if probe != "ops" else []
    if probe != "modules":
        leaves += list(op_layers(model))
    wanted_types = {t.strip().lower() for t in layer_types or [] if t.strip()}
    if wanted_types:
        known = {t.lower() for t in types.values()}
        unknown = sorted(wanted_types - known)
        if unknown:
            raise RobauditError(
                f"no layer (module or functional op) of type {', '.join(unknown)} in the model; "
                f"its layer types are {', '.join(sorted(set(types[n] for n in leaves)))}"
                + ("; --probe all also probes functional activations and additions" if probe == "modules" else "")
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

    Outputs are recorded (and transformed) batch-first: a layer whose batch is not at dim 0 (a
    sequence-first transformer's ``(L, N, E)``) is seen with its batch dimension moved to the front,
    so per-sample statistics are per sample. The batch dimension is the one whose size is the input's
    batch size, learned per layer from the first call that shows it unambiguously; an output with no
    such dimension holds no per-sample activation and is not probed. An output whose dim 0 holds ``P`` rows per
    sample, batch-major (windows or patches folded into the batch), is seen as ``(n, P, ...)`` once
    :mod:`robaudit.fold`'s proof passes showed that layout (:attr:`folded`), and goes back folded.
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
        self.record = True  # False: only call ``transform`` (an observer may read each output as it runs)
        self.stacked = 1  # batches stacked in the pass now running (what messages about the batch size say)
        self._handles: list = []
        self._calls: dict[str, int] = {}
        self._chunk: int | None = None
        self._outputs: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._layers: dict[str, Layer] = {}
        self._batch: int | None = None  # the batch size of the forward pass now running
        self._batch_dims: dict[str, int] = {}  # per layer key, learned from an unambiguous call
        self.unprobed: dict[str, str] = {}  # layer key -> why its output holds no per-sample activation
        self.folded: dict[str, int] = {}  # layer key -> rows per sample of its output, folded batch-major
        # the context the proof passes run in: other observers of the hooked passes step aside
        self.aside: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self._input: tuple | None = None  # the running pass's input (a weak reference) and its other arguments
        self._proof: fold.FoldProof | None = None  # set while the proof passes run
        self._verdicts: tuple[dict[str, int | str], str] | None = None  # the proof's verdicts, once it ran
        self._targets: list[tuple[nn.Module, Callable]] | None = None  # (module, hook), found once

    # -- hook management -------------------------------------------------------------------
    def __enter__(self) -> "LayerProbe":
        if self._targets is None:  # the modules and hooks, found once: paused() registers them again often
            named = dict(self.model.named_modules())
            ops = op_layers(self.model)
            missing = [n for n in self.module_names if n not in named and n not in ops]
            if missing:
                raise RobauditError(f"the model has no module named {missing[0]!r}")
            targets = []
            for name in self.module_names:
                hook = self._make_hook(name)  # the taps of one op layer share its call count
                targets += [(named[qual], hook) for qual in ops.get(name, [name] if name in named else [])]
            self._targets = targets
        self._register()
        return self

    def _register(self) -> None:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._note_batch))
            for module, hook in self._targets or ():
                self._handles.append(module.register_forward_hook(hook))
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

    def _note_batch(self, module, args) -> None:
        x = args[0] if args else None
        self._batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else None
        self._input = (weakref.ref(x), args[1:]) if self._batch is not None else None

    def _batch_dim(self, key: str, t: torch.Tensor, n: int | None) -> int | None:
        """Where the batch of ``n`` samples is in ``t``: dim 0 unless this layer showed it elsewhere, dim 0 as well
        for rows folded batch-major (:attr:`folded`); ``None`` when no dimension holds the samples (the output
        does not hold one activation per sample) or which one does is unclear."""
        if n is None or t.dim() == 0:
            return 0 if t.dim() else None
        known, per = self._batch_dims.get(key), self.folded.get(key)
        if known is not None or per is not None:
            held = t.shape[known] == n if per is None else t.shape[0] == n * per
            if not held:
                where = f"dim {known}" if per is None else f"dim 0, {per} rows per sample"
                raise RobauditError(f"layer {key}: its output {tuple(t.shape)} no longer holds {self._rows(n)} at "
                                    f"{where}; the model's layout depends on its input: restrict --layers")
            return 0 if per is not None else known
        if key in self.unprobed:
            return None
        dims = [i for i, size in enumerate(t.shape) if size == n]
        if dims and dims[0] == 0:
            return 0
        not_folded = ""
        if t.shape[0] and t.shape[0] % n == 0:  # n blocks of P rows, one per sample? only a proof says so
            verdict = self._fold_verdict(key)
            if verdict == t.shape[0] // n:
                self.folded[key] = verdict
                return 0
            if isinstance(verdict, int):
                verdict = f"the proof passes showed {verdict} rows per sample"
            not_folded = f", and its {t.shape[0]} rows are not read per sample: {verdict}"
        if not dims:
            return self._skip(key, f"its output {tuple(t.shape)} has no dimension of {self._rows(n)}, so it holds "
                                   f"no per-sample activation{not_folded}")
        if len(dims) > 1:  # e.g. windows folded into the batch sample-minor: one op's layout never stops an audit
            return self._skip(key, f"its output {tuple(t.shape)} has {n} entries at dims "
                                   f"{', '.join(map(str, dims))} ({self._rows(n)}), so its batch dimension is "
                                   f"unclear{not_folded}")
        self._batch_dims[key] = dims[0]
        return dims[0]

    def _fold_verdict(self, key: str) -> int | str:
        """Rows per sample of layer ``key``'s output as the proof passes showed them, or why they do not; the proof
        runs once, at the first layer that needs it, inside the pass that met it."""
        if self._verdicts is None:
            self._verdicts = self._prove()
        verdicts, otherwise = self._verdicts
        return verdicts.get(key, otherwise)

    def _prove(self) -> tuple[dict[str, int | str], str]:
        """Run :mod:`robaudit.fold`'s proof passes on the running pass's input: the class's own forward (no
        fixed-batch chunking, no hook on the model itself), without gradients, in eval mode, beside :attr:`aside`."""
        x, rest = (self._input[0](), self._input[1]) if self._input is not None else (None, ())
        k = fixed_batch(self.model) or fold.PROOF_SAMPLES
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or k < 2:
            why = "the model's input is not floating-point" if k >= 2 else "a fixed batch of one sample has no order"
            return {}, f"no proof of its layout ran ({why})"
        proof = fold.FoldProof(k)
        self._proof = proof
        try:
            with torch.no_grad(), fold.eval_mode(self.model), self.aside():
                for batch in fold.proof_batches(x, k):
                    proof.start_pass()
                    type(self.model).forward(self.model, batch, *rest)
        except Exception as e:  # the layers it concerns are skipped with this reason: the audit goes on
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            return {}, f"the proof passes of {k} samples failed ({type(e).__name__}: {first})"
        finally:
            self._proof = None
        return proof.verdicts(), f"in a pass of {k} samples its rows are not a multiple of {k}"

    def _skip(self, key: str, why: str) -> None:
        """Leave layer ``key`` out of the analysis, once, with a warning; :attr:`unprobed` keeps the reason."""
        self.unprobed[key] = why
        warnings.warn(f"layer {key}: {why}; it is not probed", stacklevel=5)
        return None

    def _rows(self, n: int | None) -> str:
        """The batch of ``n`` rows, in a message: the samples of each stacked batch when there are several."""
        if self.stacked > 1 and n is not None:
            return f"{n} rows ({self.stacked} stacked batches of {n // self.stacked} samples)"
        return f"the batch of {n}"

    def _next_call(self, name: str, chunk: tuple[int, int] | None) -> tuple[str, int, int | None]:
        """The layer key of this call of module ``name``, its call index and the rows a batch has."""
        n = self._batch
        if chunk is not None:  # a fixed-batch model running one chunk
            n = fixed_batch(self.model)
            if chunk[0] != self._chunk:  # each chunk is the same forward pass again: count its calls afresh
                self._chunk = chunk[0]
                self._calls.clear()
        call = self._calls.get(name, 0) + 1
        self._calls[name] = call
        return (name if call == 1 else f"{name}#{call}"), call, n

    def _record(self, key: str, out: torch.Tensor, chunk: tuple[int, int] | None) -> None:
        """Keep a layer's output; a later chunk of a fixed-batch model appends its rows."""
        if not self.record:
            return
        # clone: a later in-place op (ReLU(inplace=True), ``out += identity``) would otherwise
        # rewrite the recorded activation through shared storage
        record = out.detach().clone() if self.detach else out
        if chunk is not None and chunk[0] > 0 and key in self._outputs:
            record = torch.cat([self._outputs[key], record])
        self._outputs[key] = record

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            whole, index = output, None
            if isinstance(output, (tuple, list)):  # attention: the first tensor is the layer's output
                index = next((i for i, t in enumerate(output) if isinstance(t, torch.Tensor)), None)
                if index is None:
                    return None
                output = output[index]
            if not isinstance(output, torch.Tensor):
                return None
            if self._proof is not None:  # a proof pass: only its record
                self._proof.see(name, output)
                return None
            new = self._observe(name, module, output)
            if new is None:
                return None
            if index is not None:
                items = list(whole)
                items[index] = new
                return type(whole)(items)
            return new

        return hook

    def _observe(self, name: str, module: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        """Record (and transform) one call's output per sample; the transformed output in the model's own layout,
        or ``None`` to leave it as it is."""
        chunk = current_chunk(self.model)
        key, call, n = self._next_call(name, chunk)
        dim = self._batch_dim(key, output, n)
        if dim is None:
            return None
        per = self.folded.get(key)
        view = output.unflatten(0, (-1, per)) if per is not None else output.movedim(dim, 0) if dim else output
        rest = None
        if chunk is not None and view.shape[0] > chunk[1]:
            view, rest = view[:chunk[1]], view[chunk[1]:]
        layer = self._layers.get(key)
        if layer is None:
            layer = self._layers[key] = Layer(name, call, self.types.get(name, type(module).__name__), len(self._layers))
        new = self.transform(layer, view) if self.transform is not None else None
        if new is view:  # an observer: the output goes on untouched, through the view it saw when in a graph
            new = view if view is not output and output.requires_grad else None  # (its gradient hooks run)
        self._record(key, new if new is not None else view, chunk)
        if new is None:
            return None
        if rest is not None:  # the padded rows go on unchanged
            new = torch.cat([new, rest])
        if per is not None:
            return new.flatten(0, 1)
        return new.movedim(0, dim) if dim else new

    # -- results ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the outputs of the last forward pass (call before each forward)."""
        self._calls.clear()
        self._chunk = None
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
