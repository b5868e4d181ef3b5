"""A model named by where it lives (``timm:NAME``, ``torchvision:NAME``, ``robustbench:NAME``, ``hf:ORG/NAME``,
a transformers folder, ``model.onnx``), parsed once at the entry, and the options that say how to build it."""
from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RobauditError


class SourceKind(enum.Enum):
    """The library a model comes from; ``value`` is its prefix in a spec and the name of its pip extra."""

    TIMM = "timm"
    TORCHVISION = "torchvision"
    ROBUSTBENCH = "robustbench"
    HF = "hf"
    ONNX = "onnx"


PREFIXED = (SourceKind.TIMM, SourceKind.TORCHVISION, SourceKind.ROBUSTBENCH, SourceKind.HF)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")  # a library's model name: no path, no spaces
_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")


@dataclass(frozen=True)
class ModelSource:
    """A library model: its kind and its name there (an ONNX file or a transformers folder: its path)."""

    kind: SourceKind
    name: str

    @classmethod
    def parse(cls, text: str | os.PathLike) -> "ModelSource | None":
        """The source ``text`` names, or None for an ordinary model file (``.pt2``, checkpoint, state dict)."""
        raw = os.fspath(text)
        for kind in PREFIXED:
            prefix = f"{kind.value}:"
            if raw.startswith(prefix):
                return cls(kind, _checked_name(kind, raw[len(prefix):]))
        path = Path(raw)
        if path.suffix.lower() == ".onnx":
            return cls(SourceKind.ONNX, raw)
        if path.is_dir() and (path / "config.json").is_file():
            return cls(SourceKind.HF, raw)
        return None

    @property
    def local_path(self) -> Path | None:
        """The file or folder this source reads from disk by its own name (ONNX file, transformers folder); as in
        transformers, an existing folder ``ORG/NAME`` with a ``config.json`` is that folder, not the hub's model."""
        if self.kind is SourceKind.ONNX or (self.kind is SourceKind.HF and (
                not _HF_NAME.fullmatch(self.name) or (Path(self.name) / "config.json").is_file())):
            return Path(self.name)
        return None

    def spec(self) -> str:
        """The spec as a user writes it (what manifests record and commands repeat)."""
        return self.name if self.local_path is not None else f"{self.kind.value}:{self.name}"

    @property
    def stem(self) -> str:
        """A short name for default run directories: ``timm-resnet18``."""
        if self.local_path is not None:
            return self.local_path.stem or self.local_path.name
        return f"{self.kind.value}-{self.name.replace('/', '-')}"


def _checked_name(kind: SourceKind, name: str) -> str:
    if kind is SourceKind.HF:
        if _HF_NAME.fullmatch(name) or (Path(name).is_dir() and (Path(name) / "config.json").is_file()):
            return name
        raise RobauditError(f"hf:{name[:80]!r} is neither ORG/NAME on the Hugging Face hub nor a folder with a "
                            "config.json: e.g. hf:google/vit-base-patch16-224")
    if not _NAME.fullmatch(name):
        raise RobauditError(f"{kind.value}:{name[:80]!r} is not a model name: e.g. {kind.value}:{_EXAMPLE[kind]}")
    return name


_EXAMPLE = {SourceKind.TIMM: "resnet18", SourceKind.TORCHVISION: "resnet18",
            SourceKind.ROBUSTBENCH: "Standard", SourceKind.HF: "google/vit-base-patch16-224"}

THREAT_MODELS = ("Linf", "L2", "corruptions")


def shown_model(record) -> str | None:
    """How a manifest's ``model`` record names the model to a reader: a library model by its spec
    (``timm:resnet18``), a file by its path."""
    record = record if isinstance(record, dict) else {}
    source = record.get("source")
    if isinstance(source, dict) and isinstance(source.get("spec"), str):
        return source["spec"]
    return record.get("path")


@dataclass(frozen=True)
class SourceOptions:
    """How to build a library model: its weights, class count and the library's own settings.

    ``pretrained`` asks the library for its published weights (timm: any true value; torchvision: a weights
    enum such as ``IMAGENET1K_V1`` or ``DEFAULT``); ``download`` says whether the library may fetch them."""

    weights: Path | None = None
    pretrained: str | None = None
    num_classes: int | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    model_dir: Path = Path("models")
    threat_model: str = "Linf"
    download: bool = True
    trust_model: bool = False
    force_convert: bool = False
    dataset: str | None = None  # robaudit's name of the data set (robustbench picks its leaderboard by it)

    def __post_init__(self) -> None:
        if self.threat_model not in THREAT_MODELS:
            raise RobauditError(f"--threat-model {self.threat_model!r}: use one of {', '.join(THREAT_MODELS)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise RobauditError("--num-classes must be at least 1")
        if self.weights is not None and self.pretrained is not None:
            raise RobauditError("give either --weights FILE or --pretrained, not both")

    def record(self) -> dict[str, Any]:
        """What a manifest keeps to build the same model again."""
        return {"weights": str(Path(self.weights).resolve()) if self.weights else None,
                "pretrained": self.pretrained, "num_classes": self.num_classes,
                "arch_kwargs": dict(self.arch_kwargs), "model_dir": str(self.model_dir),
                "threat_model": self.threat_model, "dataset": self.dataset}


@dataclass
class Built:
    """What a source's builder returns: the module, the normalization its library gives, the library's version,
    the file whose digest names the weights (None for weights the library fetched), the class count the library
    says the model has (None: built for the data set's) and what else the manifest should keep."""

    module: nn.Module
    norm: Any  # models.InputNorm | None
    version: str
    weights_file: Path | None = None
    classes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
