"""Weights files for library models: ``.safetensors`` (header checked against the file before any tensor is
read) or a torch state dict read with ``weights_only``; nothing in either runs code."""
from __future__ import annotations

import math
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import RobauditError
from ..safeio import parse_json

HEADER_MAX = 100_000_000  # bytes of a safetensors header (the safetensors library's own limit)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net", "ema")  # training scripts' usual keys
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / torch.compile


def check_safetensors(path: Path) -> dict:
    """The tensors a ``.safetensors`` file declares, after checking its header against the file: the header fits
    the file, every tensor's bytes lie inside it, match its dtype and shape, and do not overlap."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise RobauditError(f"{path.name} is too short to be a safetensors file: check the path")
        n = struct.unpack("<Q", head)[0]
        if n > min(HEADER_MAX, size - 8):
            raise RobauditError(f"{path.name} declares a {n:,}-byte header in a {size:,}-byte file: it is not a "
                                "valid safetensors file")
        header = parse_json(fh.read(n), where=path.name, fix="re-save the weights with safetensors")
    if not isinstance(header, dict):
        raise RobauditError(f"{path.name}'s header is not a JSON object: re-save the weights with safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = sorted(_span(path, name, info, size - 8 - n) for name, info in tensors.items())
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise RobauditError(f"{path.name}: tensors {a!r} and {b!r} overlap: re-save the weights")
    return tensors


def _span(path: Path, name: str, info, data_size: int) -> tuple[int, int, str]:
    bad = f"{path.name}: tensor {name[:60]!r} is not described as safetensors describes a tensor: re-save the weights"
    if not isinstance(info, dict) or info.get("dtype") not in _DTYPE_BYTES:
        raise RobauditError(bad)
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise RobauditError(bad)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise RobauditError(f"{path.name}: tensor {name[:60]!r} lies outside the file (bytes {begin}-{end} of "
                            f"{data_size}): the file is truncated or forged")
    if end - begin != math.prod(shape) * _DTYPE_BYTES[info["dtype"]]:
        raise RobauditError(f"{path.name}: tensor {name[:60]!r} has {end - begin} bytes for shape {shape}: re-save "
                            "the weights")
    return begin, end, name


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (``.safetensors``, or ``torch.save`` read with ``weights_only``), unwrapped
    from a training script's ``{"state_dict": ...}`` and DataParallel's ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise RobauditError(f"weights file {path} not found: check --weights")
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise RobauditError(f"{path.name} is not a readable safetensors file ({type(e).__name__})") from e
    else:
        state = read_torch_file(path)
    return _unwrapped(state, path)


def read_torch_file(path: Path):
    """What ``torch.save`` wrote to ``path``, read with ``weights_only`` (tensors and containers, no code)."""
    with open(path, "rb") as fh:
        legacy = fh.read(1) == b"\x80"
    if not (legacy or zipfile.is_zipfile(path)):
        raise RobauditError(f"{path.name} is neither a .safetensors file nor a torch state dict: check --weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RobauditError(f"{path.name} holds more than weights (loading it would run code from the file): "
                            "save its state_dict() instead, or as .safetensors") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RobauditError(f"{path.name} is not a readable torch file ({type(e).__name__}): check --weights") from e


def _unwrapped(state, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {"model": {...}}} at most
        if isinstance(state, dict) and not _is_tensors(state):
            key = next((k for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if key is None:
                break
            state = state[key]
    if not (isinstance(state, dict) and state and _is_tensors(state)):
        raise RobauditError(f"{path.name} holds no state dict (a mapping of names to tensors): check --weights")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_tensors(state: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], *, what: str, source: str) -> nn.Module:
    """``module`` with ``state`` loaded strictly; a mismatch is one line that names the first differences."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])
        raise RobauditError(f"the weights in {source} do not fit {what}: {detail[:300]} (check --num-classes and "
                            "--arch-kwargs)") from e
    return module
