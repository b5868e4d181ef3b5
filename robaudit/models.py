"""Model loading for every supported format, the input-normalization wrapper, and saving.

Formats: ``torch.export`` archives (``.pt2``, safe, keep module names), robaudit checkpoints
(architecture + state dict, loaded with ``weights_only=True``), bare state dicts
(``.pt``/``.pth``/``.safetensors``) with an ``--arch``, and pickled modules (only when the user
trusts the file, because unpickling runs code from it). TorchScript cannot be hooked.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .archive import check_archive, is_dotted_name, is_identifier
from .exported import (export_dynamic_batch, exported_batch, fixed_batch, run_at_fixed_batch, save_program,
                       unflatten_program)
from .errors import NonFiniteError, RobauditError
from .safeio import file_digest

CHECKPOINT_KEY = "robaudit_checkpoint"
EXPORT_HINT = (
    "export it with a dynamic batch dimension: torch.export.save(torch.export.export(model.eval(), (x,), "
    "dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=65536)},)), 'model.pt2')"
)


@dataclass(frozen=True)
class InputNorm:
    """The input normalization a model's source expects: ``mean``/``std`` per channel, or None for both when the
    model takes [0, 1] inputs as they are (RobustBench); ``origin`` says where it was read, for the manifest."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    origin: str


@dataclass
class LoadedModel:
    """A model ready to probe: the module (in eval mode) plus where it came from."""

    module: nn.Module
    format: str  # "export" | "checkpoint" | "state_dict" | "pickle" | a library source ("timm", "onnx", ...)
    path: Path | None = None
    sha256: str | None = None
    type_map: dict[str, str] = field(default_factory=dict)  # qualified name -> original class
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    exported: Any = None  # the torch.export.ExportedProgram for .pt2 models
    # the context a stage runs it in, resolved once (in_context) and passed down with the module
    device: torch.device | None = None
    mean: tuple[float, ...] | None = None  # the input normalization in front of the module
    std: tuple[float, ...] | None = None
    source: dict[str, Any] | None = None  # a library model: its spec and build options (sources.ModelSource)
    input_norm: InputNorm | None = None  # the normalization its source expects, when it says

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a fixed-batch ``.pt2`` runs in (its inputs are chunked), or None."""
        return fixed_batch(self.module)

    def in_context(self, *, device: torch.device, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> "LoadedModel":
        """This model as a stage runs it: on ``device`` (already resolved), behind ``mean``/``std``."""
        return replace(self, device=device, mean=tuple(mean) if mean is not None else None,
                       std=tuple(std) if std is not None else None)

    def normalized(self, ndim: int) -> nn.Module:
        """The module behind its normalization on the context's device, in eval mode: what attacks see."""
        full = with_normalization(self.module, self.mean, self.std, ndim=ndim)
        return full.to(self.device or torch.device("cpu")).eval()

    @property
    def stem(self) -> str:
        if self.source is not None:
            return self.source["stem"]
        return self.path.stem if self.path else type(self.module).__name__


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a model file, as manifests record it."""
    return file_digest(path, "sha256")


# -- architecture --------------------------------------------------------------------------
def resolve_arch(arch: str) -> type:
    """Import ``package.module:Class`` or ``path/to/file.py:Class`` and return the class."""
    if ":" not in arch:
        raise RobauditError(f"--arch {arch!r} must look like 'package.module:Class' or 'file.py:Class'")
    mod_name, _, cls_name = arch.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise RobauditError(f"architecture file {path} not found: check the --arch path")
            spec = importlib.util.spec_from_file_location(f"robaudit_arch_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise RobauditError(f"cannot import {mod_name!r} for --arch ({e}); is it installed or on PYTHONPATH?") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise RobauditError(f"{mod_name} has no attribute {cls_name!r}: check the --arch class name")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RobauditError(f"architecture {arch!r} is not an nn.Module class: give --arch module:Class of the model")
    return cls


def check_stored_arch(arch: object, source: Path, *, trust_model: bool) -> str:
    """An ``arch`` read from a checkpoint is data from the file: it may only name an installed nn.Module class.

    A ``file.py:Class`` stored in the file would run that file, so it needs ``--trust-model`` (or the user's
    own ``--arch``).
    """
    if not isinstance(arch, str) or ":" not in arch:
        raise RobauditError(f"{source.name} names no usable architecture ({str(arch)[:60]!r}): pass --arch module:Class")
    mod_name, _, cls_name = arch.rpartition(":")
    if mod_name.endswith(".py"):
        if not trust_model:
            raise RobauditError(
                f"{source.name} names the architecture file {mod_name}: importing it runs that file; pass "
                f"--arch {arch} yourself if you trust it (or --trust-model)")
        return arch
    if not (is_dotted_name(mod_name) and is_identifier(cls_name)
            and all(is_identifier(part) for part in mod_name.split("."))):
        raise RobauditError(f"{source.name} names the architecture {arch[:80]!r}, which is not module:Class; "
                            "pass --arch module:Class")
    return arch


def build_arch(arch: str, kwargs: dict | None, state_dict: dict, source: Path) -> nn.Module:
    cls = resolve_arch(arch)
    try:
        module = cls(**(kwargs or {}))
    except TypeError as e:
        raise RobauditError(f"cannot build {arch} with arguments {kwargs or {}}: {e}; pass them with --arch-kwargs") from e
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(l.strip() for l in first[:3])
        raise RobauditError(f"the weights in {source.name} do not fit {arch}: {detail}") from e
    return module


# -- loaders -------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` archives have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in f"/{n}" for n in z.namelist())


@contextlib.contextmanager
def _quiet_torch_export_logs():
    """torch logs whole tracebacks while it reads a bad archive; robaudit reports it in one line."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export", "torch.export.pt2_archive")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_export(path: Path, *, trust_model: bool = False) -> LoadedModel:
    with open(path, "rb") as fh:  # one open file: torch reads exactly the bytes that were checked
        if not trust_model:
            check_archive(path, fh)  # before torch reads a byte: its loader unpickles and pastes names into code
        try:
            with _quiet_torch_export_logs(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.load(fh)
        except Exception as e:  # a corrupt or foreign archive
            raise RobauditError(f"{path.name} is not a readable torch.export archive ({type(e).__name__}): "
                                "re-export it") from e
    # shape guards are kept as Python source that ExportedProgram.module() would exec; robaudit never calls
    # it, and drops them so that a re-saved archive does not carry a stranger's code on
    if not trust_model:
        ep._guards_code = []
    fixed = exported_batch(ep)
    module, type_map = unflatten_program(ep)
    if fixed is not None:
        run_at_fixed_batch(module, fixed)
        warnings.warn(f"{path.name} was exported with a fixed batch size of {fixed}: it runs in batches of {fixed}, "
                      f"the last one padded (padded rows are dropped); {EXPORT_HINT}", stacklevel=3)
    return LoadedModel(module=module, format="export", type_map=type_map, exported=ep)


def _load_torch_file(path: Path, *, arch: str | None, arch_kwargs: dict | None, trust_model: bool) -> LoadedModel:
    if _is_torchscript(path):
        raise RobauditError(
            f"{path.name} is a TorchScript module, whose layers cannot be hooked; {EXPORT_HINT}"
        )
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
        raise RobauditError(f"{path.name} is not a readable PyTorch file: check the path (formats: README)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # the weights-only unpickler refuses globals: code to run
            raise RobauditError(f"{path.name} is not a readable PyTorch file ({str(e).splitlines()[0][:120]})") from e
        if not trust_model:
            raise RobauditError(
                f"{path.name} is a pickled module: loading it runs code from the file; "
                "pass --trust-model if you trust its source, or save it with torch.export (see README)"
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise RobauditError(f"cannot unpickle {path.name} ({type(e2).__name__}: {e2})") from e2
        if not isinstance(obj, nn.Module):
            raise RobauditError(f"{path.name} holds a {type(obj).__name__}, not an nn.Module")
        if isinstance(obj, torch.jit.ScriptModule):
            raise RobauditError(f"{path.name} is a TorchScript module, whose layers cannot be hooked; {EXPORT_HINT}")
        return LoadedModel(module=obj, format="pickle")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RobauditError(f"{path.name} is not a readable PyTorch file ({type(e).__name__}): check the path") from e
    if isinstance(obj, dict) and obj.get(CHECKPOINT_KEY):
        if not arch and not obj.get("arch"):
            raise RobauditError(f"{path.name} names no architecture: pass --arch module:Class")
        ck_arch = arch or check_stored_arch(obj.get("arch"), path, trust_model=trust_model)
        kwargs = arch_kwargs if arch_kwargs is not None else obj.get("arch_kwargs") or {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise RobauditError(f"{path.name} stores architecture arguments that are not a mapping: pass --arch-kwargs")
        module = build_arch(ck_arch, kwargs, obj["state_dict"], path)
        return LoadedModel(module=module, format="checkpoint", arch=ck_arch, arch_kwargs=dict(kwargs))
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_state_dict(obj, path, arch, arch_kwargs)
    raise RobauditError(f"{path.name} holds no model: expected a state dict, a robaudit checkpoint or a module")


def _from_state_dict(state: dict, path: Path, arch: str | None, arch_kwargs: dict | None) -> LoadedModel:
    if not arch:
        raise RobauditError(f"{path.name} is a bare state dict: pass --arch module:Class (and --arch-kwargs JSON)")
    module = build_arch(arch, arch_kwargs, state, path)
    return LoadedModel(module=module, format="state_dict", arch=arch, arch_kwargs=dict(arch_kwargs or {}))


def _load_safetensors(path: Path, *, arch: str | None, arch_kwargs: dict | None) -> LoadedModel:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise RobauditError("reading .safetensors needs the safetensors package: pip install safetensors") from e
    try:
        state = load_file(str(path))
    except Exception as e:
        raise RobauditError(f"{path.name} is not a readable safetensors file ({type(e).__name__})") from e
    return _from_state_dict(state, path, arch, arch_kwargs)


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_model: bool = False,
) -> LoadedModel:
    """Load a model file of any supported format and put it in eval mode."""
    path = Path(path)
    if not path.exists():
        raise RobauditError(f"model file {path} not found: check the path")
    if not path.is_file():
        raise RobauditError(f"{path} is not a file: give the model file itself")
    if isinstance(arch_kwargs, str):
        arch_kwargs = parse_arch_kwargs(arch_kwargs)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        loaded = _load_export(path, trust_model=trust_model)
    elif suffix == ".safetensors":
        loaded = _load_safetensors(path, arch=arch, arch_kwargs=arch_kwargs)
    else:
        loaded = _load_torch_file(path, arch=arch, arch_kwargs=arch_kwargs, trust_model=trust_model)
    loaded.path = path
    loaded.sha256 = sha256_file(path)
    loaded.module.eval()
    return loaded


def parse_arch_kwargs(text: str | None) -> dict | None:
    """``--arch-kwargs`` JSON; None when not given, so that a checkpoint's own arguments apply."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RobauditError(f"--arch-kwargs must be a JSON object such as '{{\"width\": 32}}' ({e.msg})") from e
    if not isinstance(value, dict):
        raise RobauditError("--arch-kwargs must be a JSON object such as '{\"width\": 32}'")
    return value


# -- normalization -------------------------------------------------------------------------
class Normalized(nn.Module):
    """``model((x - mean) / std)``: keeps attacks and eps in [0, 1] input space."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], ndim: int) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise RobauditError("--mean and --std need the same number of values (one per channel)")
        if any(s <= 0 for s in std):
            raise RobauditError("--std values must be positive")
        shape = (1, len(mean)) + (1,) * max(ndim - 2, 0)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(shape))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def with_normalization(model: nn.Module, mean, std, *, ndim: int) -> nn.Module:
    """Wrap ``model`` in a normalization layer, or return it unchanged when no mean/std is given."""
    if mean is None and std is None:
        return model
    if mean is None or std is None:
        raise RobauditError("give both --mean and --std (one value per channel), or neither")
    return Normalized(model, mean, std, ndim)


# -- checks --------------------------------------------------------------------------------
def check_compatible(model: nn.Module, x: torch.Tensor, num_classes: int, *, name: str = "the model") -> None:
    """Run one small forward pass and fail early, in one line, if model and data do not fit."""
    with torch.no_grad():
        try:
            out = model(x[:2])
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not isinstance(e, (RuntimeError, ValueError, IndexError)):
                # shape mismatches raise these; anything else (AttributeError, ...) is a failure to run
                raise RobauditError(
                    f"{name} failed to run on a batch of this data set ({type(e).__name__}: {msg[:200]}): "
                    "the inputs' shape is not the cause; rerun with --debug for the traceback"
                ) from e
            raise RobauditError(
                f"{name} does not accept inputs of shape {tuple(x.shape[1:])} from this data set ({msg[:200]}); "
                "pick the data set it was trained on"
            ) from e
    check_logits(out, num_classes, name=name)
    if not torch.isfinite(out).all():
        raise NonFiniteError(f"{name} returns non-finite outputs (NaN or inf) on clean data: check the weights")


def check_logits(out, num_classes: int, *, name: str = "the model") -> None:
    """Fail in one line unless ``out`` (a model's output) is shaped as logits for ``num_classes`` classes;
    warn when it has more outputs than classes."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RobauditError(f"{name} must return logits of shape (batch, classes); it returned {shape}")
    if out.shape[1] < num_classes:
        raise RobauditError(
            f"{name} has {out.shape[1]} outputs but the data set has {num_classes} classes: pick the matching data set"
        )
    if out.shape[1] > num_classes:
        warnings.warn(f"{name} has {out.shape[1]} outputs for {num_classes} classes", stacklevel=3)


# -- saving --------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, module: nn.Module, *, arch: str, arch_kwargs: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write a robaudit checkpoint (architecture + state dict), loadable with ``weights_only=True``."""
    path = Path(path)
    payload = {
        CHECKPOINT_KEY: 1,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    if extra:
        payload["extra"] = extra
    from . import safeio

    with safeio.atomic_file(path) as fh:  # an exclusive, random temporary name: never through a symlink
        torch.save(payload, fh)
    return path


def export_model(path: str | os.PathLike, module: nn.Module, example: torch.Tensor) -> Path:
    """Save ``module`` as a ``torch.export`` archive with a dynamic batch dimension."""
    return save_program(path, export_dynamic_batch(module, example.cpu()))


def save_exported_weights(path: str | os.PathLike, loaded: LoadedModel, module: nn.Module) -> Path:
    """Copy trained weights of an unflattened ``.pt2`` model back into its program and save it."""
    path = Path(path)
    ep = loaded.exported
    trained = module.state_dict()
    for key, old in list(ep.state_dict.items()):
        if key in trained:
            value = trained[key].detach().clone().cpu()
            # the program's verifier wants parameters to stay nn.Parameter objects
            ep.state_dict[key] = nn.Parameter(value, requires_grad=old.requires_grad) \
                if isinstance(old, nn.Parameter) else value
    return save_program(path, ep)
