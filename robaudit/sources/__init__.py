"""Models where they already live: timm, torchvision, RobustBench, Hugging Face transformers and ONNX files.

``load_any`` is the one entry: a source spec (``timm:resnet18``, ``model.onnx``, ...) is built by its library's
module here, anything else is a model file for :func:`robaudit.models.load_model`. A library model is a
:class:`~robaudit.models.LoadedModel` like any other; its ``source`` record (spec, library version, build options)
lets a later stage build it again, and its hardened weights are a ``.safetensors`` file beside that record."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import RobauditError
from ..models import LoadedModel, load_model, sha256_file
from .spec import THREAT_MODELS, Built, ModelSource, SourceKind, SourceOptions

log = logging.getLogger(__name__)

_MODULES = {SourceKind.TIMM: "timm_source", SourceKind.TORCHVISION: "torchvision_source",
            SourceKind.ROBUSTBENCH: "robustbench_source", SourceKind.HF: "hf_source", SourceKind.ONNX: "onnx_source"}
WEIGHTS_FILE = "model.safetensors"  # a hardened library model's weights

__all__ = ["ModelSource", "SourceKind", "SourceOptions", "THREAT_MODELS", "Built", "load_any", "load_source",
           "reload_recorded", "save_weights", "source_flags", "state_digest", "WEIGHTS_FILE"]


def load_any(model: str | os.PathLike, *, num_classes: int, arch: str | None = None, arch_kwargs: dict | None = None,
             trust_model: bool = False, options: SourceOptions | None = None,
             example: torch.Tensor | None = None, dataset: str | None = None) -> LoadedModel:
    """Load ``model``: a source spec through its library (for the data set ``dataset`` of ``num_classes`` classes;
    ``example``, a few of its inputs, checks a conversion), or a model file; options only a library model takes
    are refused for a file, in one line."""
    source = ModelSource.parse(model)
    options = options or SourceOptions()
    if source is None:
        given = [flag for flag, value in (("--weights", options.weights), ("--pretrained", options.pretrained),
                                          ("--num-classes", options.num_classes)) if value is not None]
        if given:
            raise RobauditError(f"{given[0]} applies to a library model (timm:NAME, torchvision:NAME, robustbench:NAME, "
                                f"hf:ORG/NAME, model.onnx), not to the file {Path(model).name}")
        return load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_model=trust_model)
    if arch:
        raise RobauditError(f"--arch applies to a state dict; {source.spec()} names its own architecture")
    if arch_kwargs:
        options = dataclasses.replace(options, arch_kwargs={**options.arch_kwargs, **arch_kwargs})
    if dataset is not None:
        options = dataclasses.replace(options, dataset=dataset)
    return load_source(source, dataclasses.replace(options, trust_model=trust_model), num_classes=num_classes,
                       example=example)


def load_source(source: ModelSource, options: SourceOptions, *, num_classes: int,
                example: torch.Tensor | None = None) -> LoadedModel:
    """Build ``source`` with ``options`` (class count: ``--num-classes``, else the data set's) in eval mode.

    A builder is ``build(source, options, *, num_classes, example) -> Built``; ``example`` (a few inputs of the
    data set, in [0, 1], or None) lets a converted model be checked against its original."""
    builder = importlib.import_module(f".{_MODULES[source.kind]}", __name__)
    built: Built = builder.build(source, options, num_classes=num_classes, example=example)
    expected = options.num_classes or num_classes
    if built.classes is not None and built.classes != expected:
        raise RobauditError(f"{source.spec()} has {built.classes} classes and the data set {num_classes}: pass "
                            f"--num-classes {built.classes} if the data set's labels are the model's, or give "
                            "weights trained for this data set")
    module = built.module.eval()
    weights = built.weights_file
    record = {"spec": source.spec(), "library": source.kind.value, "library_version": built.version,
              "stem": source.stem, **options.record(), **built.extra}
    if weights is not None:
        record["weights"] = str(Path(weights).resolve())
    return LoadedModel(module=module, format=source.kind.value, path=Path(weights) if weights else None,
                       sha256=sha256_file(Path(weights)) if weights else state_digest(module), source=record,
                       input_norm=built.norm)


def reload_recorded(record: Mapping[str, Any], *, num_classes: int, trust_model: bool,
                    weights: Path | None = None, download: bool = True,
                    example: torch.Tensor | None = None) -> LoadedModel:
    """Build again the library model a manifest's ``model.source`` records (``weights``: other weights for it,
    e.g. the hardened ones); only this command's ``trust_model``, never the record's, lets code run."""
    source = ModelSource.parse(str(record.get("spec") or ""))
    if source is None:
        raise RobauditError(f"the run records the model source {str(record.get('spec'))[:80]!r}, which is not a "
                            "library model: analyze it again")
    kwargs = record.get("arch_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RobauditError("the run's model source records arch_kwargs that are not a mapping: analyze it again")
    recorded = record.get("weights")
    options = SourceOptions(
        weights=weights or (Path(recorded) if recorded else None),
        pretrained=None if (weights or recorded) else record.get("pretrained"),
        num_classes=record.get("num_classes"), arch_kwargs=dict(kwargs),
        model_dir=Path(str(record.get("model_dir") or "models")),
        threat_model=str(record.get("threat_model") or "Linf"), download=download, trust_model=trust_model,
        dataset=record.get("dataset"))
    return load_source(source, options, num_classes=num_classes, example=example)


def save_weights(path: Path, module: nn.Module) -> Path:
    """Write ``module``'s state dict as ``.safetensors`` (each tensor its own copy: tied weights are saved twice)."""
    from safetensors.torch import save

    from ..safeio import atomic_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_file(path) as fh:
        fh.write(save(state))
    return path


def source_flags(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The command-line options that build the library model ``record`` describes (for the recorded command)."""
    if not record:
        return {}
    kwargs = record.get("arch_kwargs") or {}
    rb = record.get("library") == SourceKind.ROBUSTBENCH.value
    return {"weights": record.get("weights"), "pretrained": record.get("pretrained"),
            "num_classes": record.get("num_classes"),
            "arch_kwargs": json.dumps(kwargs, sort_keys=True) if kwargs else None,
            "model_dir": record.get("model_dir") if rb or record.get("hub") else None,  # where downloads go
            "threat_model": record.get("threat_model") if rb else None}


def state_digest(module: nn.Module) -> str:
    """A SHA-256 over a module's state dict (names, dtypes, shapes, bytes): names weights no file holds."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
