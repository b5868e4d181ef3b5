"""``hf:ORG/NAME`` or a folder with ``config.json``: transformers' ``AutoModelForImageClassification`` built from the
folder's config and its ``model.safetensors`` (header checked first; a ``pytorch_model.bin`` is never unpickled),
custom code only with ``--trust-model``, normalization from ``preprocessor_config.json``. A forward hook on the
model itself makes its call return the logits, so that its layers keep transformers' own module names."""
from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RobauditError
from ..models import InputNorm
from ..safeio import read_json
from .extras import require
from .spec import Built, ModelSource, SourceOptions
from .weights import check_safetensors, load_weights, read_state_dict

log = logging.getLogger(__name__)

CONFIG, PROCESSOR, WEIGHTS = "config.json", "preprocessor_config.json", "model.safetensors"
SHARDED, PICKLED = "model.safetensors.index.json", "pytorch_model.bin"
ORIGIN = "hf image processor"
HUB_DIR = "hf"  # hub models are downloaded to MODEL_DIR/hf/ORG/NAME: real files, as a local folder holds them


def build(source: ModelSource, options: SourceOptions, *, num_classes: int, example=None) -> Built:
    """The folder's (or the hub's) image classifier returning its logits, with its processor's normalization;
    its class count is its config's ``num_labels``, which the data set's (or ``--num-classes``) must match."""
    transformers = require("transformers", "hf")
    _check_options(options)
    folder, hub = model_folder(source, options)
    config = read_config(folder, trust_model=options.trust_model)
    state_file = module_weights(folder, options.weights)
    weights = state_file or checked_weights(folder)
    module = _load(transformers, folder, state_file, trust_model=options.trust_model, what=source.spec())
    check_input_size(module, config, example, spec=source.spec())
    module.register_forward_hook(logits_output)
    extra: dict[str, Any] = {"model_type": config.get("model_type"), "hub": hub}
    if config.get("image_size") is not None:
        extra["image_size"] = config["image_size"]
    return Built(module.float(), processor_norm(folder), transformers.__version__, weights_file=weights,
                 classes=int(module.config.num_labels), extra=extra)


def logits_output(module: nn.Module, args, output):
    """A forward hook: the logits of transformers' ``ModelOutput`` (or of a plain tuple), the tensor robaudit takes
    for a classifier's output; a hook on the model keeps every module name unprefixed."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple) and output:
        logits = output[0]
    return output if logits is None else logits


def _check_options(options: SourceOptions) -> None:
    if options.pretrained is not None:
        raise RobauditError("--pretrained applies to timm and torchvision: a Hugging Face model comes with its own "
                            "weights (downloaded for hf:ORG/NAME unless --no-download)")
    if options.arch_kwargs:
        raise RobauditError("a Hugging Face model's architecture is its config.json: edit it rather than pass "
                            "--arch-kwargs")


def model_folder(source: ModelSource, options: SourceOptions) -> tuple[Path, bool]:
    """The folder holding the model and whether it comes from the hub: a local folder as it is; ``hf:ORG/NAME``
    from ``MODEL_DIR/hf/ORG/NAME``, downloaded there only when downloads are allowed (and needed: rebuilt with
    ``--weights``, a folder that has its config already is used as it is)."""
    local = source.local_path
    if local is not None:
        if not (local / CONFIG).is_file():
            raise RobauditError(f"{local} has no {CONFIG}: give the folder transformers' save_pretrained wrote")
        return local, False
    folder = Path(options.model_dir) / HUB_DIR / source.name
    if options.weights is not None and (folder / CONFIG).is_file():
        return folder, True
    if not options.download or _hub_offline():
        if (folder / CONFIG).is_file():
            return folder, True
        raise RobauditError(f"{source.spec()} is not in {folder} and downloads are off (--no-download or "
                            "HF_HUB_OFFLINE): allow them once, or save the model there with save_pretrained")
    _download(source.name, folder, trust_model=options.trust_model)
    return folder, True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(name: str, folder: Path, *, trust_model: bool) -> None:
    """The files robaudit reads (config, processor config, safetensors weights; code only when trusted)."""
    from huggingface_hub import snapshot_download

    patterns = [CONFIG, PROCESSOR, WEIGHTS, SHARDED] + (["*.py"] if trust_model else [])
    try:
        snapshot_download(repo_id=name, local_dir=folder, allow_patterns=patterns)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise RobauditError(f"could not download hf:{name} ({type(e).__name__}: {first}): check the name and the "
                            f"network, or save the model to {folder} with save_pretrained") from e
    if not (folder / CONFIG).is_file():
        raise RobauditError(f"hf:{name} has no {CONFIG} on the hub: it is not a transformers model")


def read_config(folder: Path, *, trust_model: bool) -> dict:
    """``config.json`` read as data (size- and depth-capped); custom code it names (``auto_map``) is refused
    without ``--trust-model``, before transformers sees the folder."""
    config = read_json(folder / CONFIG, what="transformers config", fix="give the config.json save_pretrained wrote")
    if not isinstance(config, dict):
        raise RobauditError(f"{folder / CONFIG} is not a JSON object: give the config.json save_pretrained wrote")
    if config.get("auto_map") and not trust_model:
        names = ", ".join(sorted(config["auto_map"]))[:120] if isinstance(config["auto_map"], dict) else "its code"
        raise RobauditError(f"{folder / CONFIG} names custom code (auto_map: {names}) that loading would run: pass "
                            "--trust-model only if you trust it")
    return config


def checked_weights(folder: Path) -> Path:
    """The folder's ``model.safetensors``, its header checked against the file; a pickle is refused, unread."""
    path = folder / WEIGHTS
    if path.is_file():
        check_safetensors(path)
        return path
    if (folder / SHARDED).is_file():
        raise RobauditError(f"{folder} holds sharded weights ({SHARDED}); robaudit reads one {WEIGHTS}: save the "
                            "model again with save_pretrained(DIR, max_shard_size='100GB')")
    if (folder / PICKLED).is_file():
        raise RobauditError(f"{folder} holds {PICKLED}, a pickle that loading would run code from; robaudit reads "
                            f"{WEIGHTS} only: convert it to safetensors (save_pretrained, where you trust the file)")
    raise RobauditError(f"{folder} has no {WEIGHTS}: save the model with save_pretrained (safetensors) or pass "
                        "--weights FILE.safetensors")


def module_weights(folder: Path, weights: Path | None) -> Path | None:
    """``--weights`` as a state dict of the built module (a hardened model's), or None for the folder's own
    ``model.safetensors`` (a manifest records it): that file keeps its checkpoint's tensor names, which
    transformers maps to its modules' (they differ across versions), so transformers reads it."""
    if weights is None:
        return None
    own = folder / WEIGHTS
    return None if own.is_file() and Path(weights).resolve() == own.resolve() else Path(weights)


def _load(transformers, folder: Path, state_file: Path | None, *, trust_model: bool, what: str) -> nn.Module:
    """The classifier with the folder's weights (every tensor of the model present in the file: none left at
    random), or built from the config with ``state_file`` (a state dict of this module, loaded strictly)."""
    auto, trust = transformers.AutoModelForImageClassification, trust_model
    kwargs = {"local_files_only": True, "trust_remote_code": trust}
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
            if state_file is not None:
                module = auto.from_config(config, trust_remote_code=trust)
            else:
                module, info = auto.from_pretrained(str(folder), config=config, use_safetensors=True,
                                                    output_loading_info=True, **kwargs)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RobauditError(f"transformers cannot build an image classifier from {folder} ({first}): give a "
                            "folder of an AutoModelForImageClassification model") from e
    if state_file is not None:
        return _load_state(module, state_file, what=what)
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise RobauditError(f"{folder / WEIGHTS} does not hold all of {type(module).__name__}'s weights (e.g. "
                            f"{', '.join(missing[:3])}), which would start at random: give a classifier's checkpoint")
    if info.get("unexpected_keys"):
        log.warning("%s: %d tensors of %s are not part of %s and are not used", what, len(info["unexpected_keys"]),
                    WEIGHTS, type(module).__name__)
    return module


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' progress bars and load report off while it loads (robaudit says what matters in one line)."""
    tlog = transformers.utils.logging
    bars, verbosity = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _load_state(module: nn.Module, path: Path, *, what: str) -> nn.Module:
    """``path`` loaded strictly; names that are not the module's (a checkpoint's as save_pretrained writes them) are
    one line saying which file to give instead."""
    state = read_state_dict(path)
    own = set(module.state_dict())
    if set(state) != own and not set(state) & own:
        raise RobauditError(f"{path.name} does not name {type(module).__name__}'s tensors (e.g. {sorted(state)[0]}): "
                            "give a state dict of the module (harden writes one), or the folder save_pretrained wrote")
    return load_weights(module, state, what=what, source=path.name)


def check_input_size(module: nn.Module, config: dict, example: torch.Tensor | None, *, spec: str) -> None:
    """Refuse images of another size than a model with position embeddings (ViT, DeiT, BEiT: its forward takes
    ``interpolate_pos_encoding``) was built for: interpolating them would audit another model than the one given."""
    size = config.get("image_size")
    if example is None or example.dim() != 4 or size is None:
        return
    if "interpolate_pos_encoding" not in inspect.signature(module.forward).parameters:
        return  # convolutional models take any size
    expected = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    given = tuple(int(d) for d in example.shape[-2:])
    if given != tuple(int(d) for d in expected):
        raise RobauditError(f"{spec} takes {expected[0]}x{expected[1]} images (config.json image_size) and the data "
                            f"set's are {given[0]}x{given[1]}: give images of its size (--image-size for an image "
                            "folder); robaudit does not interpolate its position embeddings")


def processor_norm(folder: Path) -> InputNorm | None:
    """The image processor's ``image_mean``/``image_std`` (none when ``do_normalize`` is false); None when the
    folder has no processor config or it names no values (the data set's normalization applies)."""
    path = folder / PROCESSOR
    if not path.is_file():
        log.info("%s has no %s: the model's input normalization is not known from it", folder, PROCESSOR)
        return None
    cfg = read_json(path, what="image processor config", fix=f"give the {PROCESSOR} save_pretrained wrote")
    if not isinstance(cfg, dict):
        raise RobauditError(f"{path} is not a JSON object: give the {PROCESSOR} save_pretrained wrote")
    if cfg.get("do_normalize", True) is False:
        return InputNorm(None, None, f"{ORIGIN} (do_normalize false)")
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if mean is None or std is None:
        return None
    return InputNorm(_values(mean, path, "image_mean"), _values(std, path, "image_std"), ORIGIN)


def _values(value, path: Path, key: str) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RobauditError(f"{path}: {key} is not a number or a list of numbers: fix it, or pass --mean/--std")
    return tuple(float(v) for v in values)
