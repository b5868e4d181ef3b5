"""``model.onnx``: the file converted to a ``torch.nn`` graph by onnx2torch (weights from the file, or
``--weights`` for hardened ones), checked against onnxruntime on a few of the data set's inputs. An ONNX graph
takes its inputs as they are: no normalization unless ``--mean``/``--std`` put one in front."""
from __future__ import annotations

import logging
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import RobauditError
from ..models import InputNorm
from .extras import require
from .onnx_compat import opset, prepared
from .onnx_file import GraphIO, graph_io, read_model, safe_node_names
from .spec import Built, ModelSource, SourceOptions
from .weights import load_weights, read_state_dict

log = logging.getLogger(__name__)

FIDELITY_TOL = 1e-4  # the largest logit difference to onnxruntime's, relative to its largest logit
NORM = InputNorm(None, None, "ONNX file (its graph takes the inputs as they are)")


def build(source: ModelSource, options: SourceOptions, *, num_classes: int, example=None) -> Built:
    """The converted graph, checked against onnxruntime on ``example`` (refused above :data:`FIDELITY_TOL`
    unless ``force_convert``); ``options.weights`` then replace the file's weights."""
    onnx = require("onnx", "onnx")
    require("onnx2torch", "onnx")
    require("onnxruntime", "onnx")
    path = Path(source.name)
    model, digest = read_model(path, onnx)
    io = graph_io(model, path, example)
    original = model.SerializeToString()  # what onnxruntime runs: the file with its external data read in
    module = convert(model, path)
    extra = {"onnx_sha256": digest, "onnx_opset": opset(model),
             "onnxruntime_version": version("onnxruntime"),
             **fidelity(module, original, example, io, path, force=options.force_convert)}
    if options.weights is not None:
        load_weights(module, read_state_dict(options.weights), what=f"the graph of {path.name}",
                     source=Path(options.weights).name)
    return Built(module, NORM, version("onnx2torch"), weights_file=options.weights, classes=io.classes, extra=extra)


def convert(model, path: Path) -> nn.Module:
    """``model`` as a ``torch.fx`` graph of ``torch.nn`` modules named after its (sanitized) node names."""
    from onnx2torch import convert as onnx2torch_convert

    safe_node_names(model.graph)
    try:
        model = prepared(model, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its converters warn about every op they approximate
            return onnx2torch_convert(model).eval()
    except RobauditError:
        raise
    except Exception as e:  # onnx and onnx2torch raise bare ValueError/KeyError/NotImplementedError on bad graphs
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise RobauditError(f"onnx2torch cannot convert {path.name} ({type(e).__name__}: {detail}): export the "
                            f"model with standard operators and opset 17") from e


def fidelity(module: nn.Module, original: bytes, example: torch.Tensor | None, io: GraphIO, path: Path, *,
             force: bool) -> dict:
    """The converted graph's logits against onnxruntime's on ``example`` (the raw graphs on the same tensor):
    the differences for the manifest; above :data:`FIDELITY_TOL` relative, refused unless ``force``."""
    if example is None:
        return {"onnx_fidelity": "not checked: no inputs of the data set to run"}
    x = example.detach().float().cpu().contiguous()
    if io.batch is not None and len(x) == io.batch:  # the graph must also take batches of other sizes
        x = torch.cat([x, x[:1]])
    ours = _converted_logits(module, x, io, path)
    theirs = torch.from_numpy(ort_logits(original, x.numpy(), io, path))
    if ours.shape != theirs.shape:
        raise RobauditError(f"the converted {path.name} gives logits of shape {tuple(ours.shape)} and onnxruntime "
                            f"{tuple(theirs.shape)}: the conversion is wrong; run it in onnxruntime instead")
    diff = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    log.info("%s: converted graph vs onnxruntime on %d inputs: max abs logit difference %.3g (%.3g of the largest "
             "logit)", path.name, len(x), diff, rel)
    record = {"onnx_max_abs_diff": diff, "onnx_max_rel_diff": rel, "onnx_checked_inputs": len(x)}
    if not rel <= FIDELITY_TOL:  # NaN fails too
        if not force:
            raise RobauditError(f"the converted {path.name} differs from onnxruntime by {diff:.3g} in its logits "
                                f"({rel:.3g} of the largest, above {FIDELITY_TOL:g}): audit it as converted only with "
                                "--force-convert")
        warnings.warn(f"{path.name}: the converted graph's logits differ from onnxruntime's by {rel:.3g} relative; "
                      "kept because of --force-convert", stacklevel=2)
        record["onnx_forced"] = True
    return record


def _converted_logits(module: nn.Module, x: torch.Tensor, io: GraphIO, path: Path) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as e:  # a graph built for one batch size, a shape the converter got wrong
        hint = (f"it fixes the batch size at {io.batch}: export it with a dynamic batch axis "
                "(torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))" if io.batch not in (None, len(x))
                else "run it in onnxruntime to see whether the file itself works")
        raise RobauditError(f"the converted {path.name} fails on {len(x)} inputs of the data set "
                            f"({type(e).__name__}); {hint}") from e
    if not isinstance(out, torch.Tensor):
        raise RobauditError(f"the converted {path.name} gives {type(out).__name__}, not a logits tensor: export the "
                            "classifier with its logits as the one output")
    return out.float()


def ort_logits(original: bytes, x: np.ndarray, io: GraphIO, path: Path) -> np.ndarray:
    """onnxruntime's (CPU) logits for ``x``, in chunks of the batch size the file fixes (the last one padded
    with copies of its last input, their logits dropped)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: its warnings would repeat what the checks above say
    step = io.batch or len(x)
    try:
        session = ort.InferenceSession(original, sess_options=opts, providers=["CPUExecutionProvider"])
        out = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            out.append(session.run(None, {io.input: padded})[0][:len(chunk)])
    except Exception as e:  # onnxruntime's own exception classes
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise RobauditError(f"onnxruntime cannot run {path.name} ({type(e).__name__}: {detail}): check the file "
                            "with onnx.checker") from e
    return np.concatenate(out).astype(np.float32)
