"""An ONNX file read as untrusted input: its size bounded, parsed without its external data, every external
tensor's file kept inside the model's folder and its byte range inside that file before a byte of it is read,
and its node names made safe before ``torch.fx`` writes them into the code it generates."""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Iterator

import torch
from torch import nn

from ..errors import RobauditError

ONNX_BYTES_MAX = 2**31 - 1  # protobuf's limit on one message: the model with its external data read in
_EXTERNAL, _DEFAULT = 1, 0  # TensorProto.DataLocation
_FLOAT = 1  # TensorProto.FLOAT
# bytes per element of the tensor types external data may hold (TensorProto.DataType -> size)
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2,
               17: 1, 18: 1, 19: 1, 20: 1}
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_/.\-]")  # torch.fx pastes module names into Python source
_NAME_MAX = 120


@dataclass(frozen=True)
class Span:
    """Where an external tensor's bytes are: a checked file inside the model's folder, offset and length."""

    file: Path
    offset: int
    length: int


@dataclass(frozen=True)
class GraphIO:
    """A classifier's one input and one output: the input's name, rank and fixed dims (None where symbolic),
    and the class count its output fixes (None when symbolic)."""

    input: str
    dims: tuple[int | None, ...]
    classes: int | None

    @property
    def batch(self) -> int | None:
        """The batch size the file fixes, or None for a dynamic batch axis."""
        return self.dims[0] if self.dims else None


def read_model(path: Path, onnx) -> tuple:
    """The ``ModelProto`` in ``path`` with its external data read in, each external file checked first, and the
    SHA-256 of the bytes parsed."""
    if not path.is_file():
        raise RobauditError(f"ONNX file {path} not found: check the path")
    with open(path, "rb") as fh:
        too_large = os.fstat(fh.fileno()).st_size > ONNX_BYTES_MAX
        data = b"" if too_large else fh.read(ONNX_BYTES_MAX + 1)
    if too_large or len(data) > ONNX_BYTES_MAX:
        raise RobauditError(f"{path.name} is larger than ONNX's 2 GiB limit for one file: keep its weights as "
                            "external data beside it")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError, or onnx's own errors on a malformed message
        raise RobauditError(f"{path.name} is not an ONNX model ({type(e).__name__}): check the file") from e
    if not model.HasField("graph") or not model.graph.node:
        raise RobauditError(f"{path.name} is not an ONNX model (it holds no graph): check the file")
    if model.functions:
        raise RobauditError(f"{path.name} defines its own ONNX functions ({model.functions[0].name[:60]!r}), "
                            "which onnx2torch does not convert: export with standard operators only")
    spans = [(t, external_span(t, path)) for t in tensors(model.graph) if t.data_location == _EXTERNAL]
    total = len(data) + sum(span.length for _, span in spans)
    if total > ONNX_BYTES_MAX:
        raise RobauditError(f"{path.name} with its external data is {total:,} bytes, above ONNX's 2 GiB limit for "
                            "a model robaudit converts")
    for tensor, span in spans:
        _read_into(tensor, span, path)
    return model, hashlib.sha256(data).hexdigest()


def tensors(graph) -> Iterator:
    """Every ``TensorProto`` of ``graph``: initializers, sparse ones, node attributes and nested graphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from tensors(sub)


def external_span(tensor, path: Path) -> Span:
    """The checked place of ``tensor``'s external data: a relative path without ``..`` that resolves (links
    followed) to a regular file inside ``path``'s folder, and a byte range inside that file of the tensor's size."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    what = f"{path.name}: tensor {tensor.name[:60]!r} keeps its data in {location[:80]!r}"
    if not location:
        raise RobauditError(f"{what}, which names no file: export the model again")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or PureWindowsPath(location).drive:
        raise RobauditError(f"{what}, an absolute path; ONNX external data must lie beside the model: refused")
    if ".." in re.split(r"[/\\]", location):
        raise RobauditError(f"{what}, a path out of the model's folder: refused")
    try:
        folder, target = path.parent.resolve(), (path.parent / location).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a loop of links
        raise RobauditError(f"{what}, which is not a usable path ({type(e).__name__}): refused") from e
    if not target.is_relative_to(folder):
        raise RobauditError(f"{what}, which resolves to {target} outside the model's folder (a link): refused")
    if not target.is_file():
        raise RobauditError(f"{what}, which is not a file beside the model: put it there or export again")
    expected = _tensor_bytes(tensor, what)
    try:
        offset = int(entries.get("offset", "0"))
        size = target.stat().st_size
        length = int(entries["length"]) if "length" in entries else size - offset
    except ValueError as e:
        raise RobauditError(f"{what} at an offset or length that is not a number: export the model again") from e
    if offset < 0 or length != expected or offset + length > size:
        raise RobauditError(f"{what} at bytes {offset}+{length} of {size}, where its shape needs {expected} bytes "
                            "inside the file: the file is truncated or forged")
    return Span(target, offset, length)


def _tensor_bytes(tensor, what: str) -> int:
    """The bytes ``tensor``'s type and dims need (dims non-negative, type of a fixed size)."""
    if tensor.data_type not in _ITEM_BYTES or any(d < 0 for d in tensor.dims):
        raise RobauditError(f"{what} with a type or shape external data cannot hold: export the model again")
    return math.prod(tensor.dims) * _ITEM_BYTES[tensor.data_type]


def _read_into(tensor, span: Span, path: Path) -> None:
    """Read ``span`` into ``tensor`` as in-file data: nothing later resolves a path of the file's again."""
    with open(span.file, "rb") as fh:
        fh.seek(span.offset)
        data = fh.read(span.length)
    if len(data) != span.length:
        raise RobauditError(f"{path.name}: the external data of tensor {tensor.name[:60]!r} ends early: the file "
                            "changed or is truncated")
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = _DEFAULT


def graph_io(model, path: Path, example: torch.Tensor | None) -> GraphIO:
    """The one float input and one output of a classifier, the input's rank and fixed dims checked against
    ``example`` (a few of the data set's inputs) when there is one."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in inits]  # old exporters list initializers as inputs too
    if len(inputs) != 1 or len(graph.output) != 1:
        raise RobauditError(f"{path.name} has {len(inputs)} inputs and {len(graph.output)} outputs; robaudit audits "
                            "a classifier with one input and one output (its logits)")
    kinds = (inputs[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type)
    if kinds != (_FLOAT, _FLOAT):
        raise RobauditError(f"{path.name} takes or gives tensors that are not float32: export it in float32")
    dims = _dims(inputs[0])
    out = _dims(graph.output[0])
    if out and len(out) != 2:
        raise RobauditError(f"{path.name} gives outputs of rank {len(out)}; a classifier's logits are (batch, "
                            "classes): export the model without its post-processing")
    io = GraphIO(inputs[0].name, dims, out[1] if out else None)
    if example is not None:
        _check_shape(io, path, tuple(example.shape))
    return io


def _dims(value) -> tuple[int | None, ...]:
    shape = value.type.tensor_type.shape if value.type.tensor_type.HasField("shape") else None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in shape.dim) if shape is not None else ()


def _check_shape(io: GraphIO, path: Path, shape: tuple[int, ...]) -> None:
    if not io.dims:
        return
    if len(io.dims) != len(shape):
        raise RobauditError(f"{path.name} takes inputs of rank {len(io.dims)} and the data set gives rank "
                            f"{len(shape)} ({'x'.join(map(str, shape[1:]))} per sample): pick the data set it takes")
    fixed = [(d, s) for d, s in zip(io.dims[1:], shape[1:]) if d is not None and d != s]
    if fixed:
        want = "x".join("?" if d is None else str(d) for d in io.dims[1:])
        raise RobauditError(f"{path.name} takes {want} inputs and the data set gives "
                            f"{'x'.join(map(str, shape[1:]))}: pick the data set it takes (or --image-size)")


def safe_node_names(graph) -> None:
    """Give every node a unique name of letters, digits and ``_/.-``: onnx2torch names a submodule after it and
    ``torch.fx`` writes that name into Python source, where a quote would end the string and run the rest."""
    taken = {"", "initializers"} | set(dir(nn.Module))  # no name, onnx2torch's container, nn.Module's attributes
    for node in graph.node:
        base = _UNSAFE_NAME.sub("_", node.name or node.op_type)[:_NAME_MAX] or "node"
        name, k = base, 0
        while _module_name(name) in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(_module_name(name))
        node.name = name


def _module_name(node_name: str) -> str:
    """The submodule name onnx2torch gives a node of the standard domain called ``node_name``."""
    return node_name.replace(".", "/").lstrip("/")
