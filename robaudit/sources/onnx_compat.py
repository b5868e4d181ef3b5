"""What onnx2torch converts: the operators of a model checked against its converters, and the exact rewrites
that let it convert what current exporters write (an older opset, constant ``Identity`` nodes folded, a
``Reshape`` whose ``allowzero`` cannot matter). The fidelity check against onnxruntime judges the result."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import RobauditError

log = logging.getLogger(__name__)

STANDARD_DOMAINS = ("", "ai.onnx")
FALLBACK_OPSET = 17  # the newest opset whose common operators onnx2torch 1.5 converts


def prepared(model, path: Path):
    """``model`` rewritten for onnx2torch; one line naming the first operator none of its converters takes."""
    from onnx import version_converter
    from onnx2torch.node_converters import registry

    _custom_domains(model, path)
    _fold_constant_identities(model.graph)
    _reshapes_without_allowzero(model.graph)
    if unsupported(model, registry) and opset(model) > FALLBACK_OPSET:
        try:
            older = version_converter.convert_version(model, FALLBACK_OPSET)
        except Exception as e:  # onnx's converter has no adapter for some operator: report the operator below
            log.info("%s: opset %d -> %d failed (%s)", path.name, opset(model), FALLBACK_OPSET, type(e).__name__)
        else:
            if not unsupported(older, registry):
                log.info("%s: converted from opset %d to %d for onnx2torch", path.name, opset(model), FALLBACK_OPSET)
                model = older
    missing = unsupported(model, registry)
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else ""
        raise RobauditError(f"onnx2torch cannot convert the operator {missing[0]} of {path.name}{more}: export the "
                            f"model with opset {FALLBACK_OPSET} or without that operation")
    return model


def opset(model) -> int:
    """The model's opset of the standard domain."""
    return max((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), default=0)


def unsupported(model, registry) -> list[str]:
    """``Op (opset N)`` for each operator of the standard domain that no onnx2torch converter takes."""
    version, out = opset(model), []
    for op in dict.fromkeys(node.op_type for node in model.graph.node):
        try:
            registry.get_converter(operation_type=op, version=version)
        except NotImplementedError:
            out.append(f"{op} (opset {version})")
    return out


def _custom_domains(model, path: Path) -> None:
    """Refuse an operator of another domain than ONNX's own (onnxruntime's contrib ops, a vendor's)."""
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise RobauditError(f"{path.name} uses the operator {node.domain[:40]}.{node.op_type[:40]} of a custom "
                                "domain, which onnx2torch cannot convert: export with standard ONNX operators")
        node.domain = ""  # onnx2torch looks the opset up under "" only


def _fold_constant_identities(graph) -> None:
    """An ``Identity`` of an initializer becomes an initializer of its output's name (onnx2torch reads a Conv's
    weight and bias from initializers only; the legacy exporter shares equal constants through Identity)."""
    inits = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity"]:
        if node.input[0] in inits and node.output[0] not in outputs and node.output[0] not in inits:
            copy = graph.initializer.add()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            inits[copy.name] = copy
            graph.node.remove(node)


def _reshapes_without_allowzero(graph) -> None:
    """``allowzero=1`` (which onnx2torch refuses) set to 0 on a Reshape whose constant shape has no zero, where
    the two mean the same; the dynamo exporter writes it on every Reshape."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if 0 in numpy_helper.to_array(inits[node.input[1]]).tolist():
            continue
        for attr in node.attribute:
            if attr.name == "allowzero":
                attr.i = 0
