"""``robustbench:NAME``: an entry of RobustBench's model zoo for the run's data set and ``--threat-model``, its
checkpoint read with ``weights_only`` from ``--model-dir`` in RobustBench's layout (``DIR/cifar10/Linf/NAME.pt``),
downloaded by RobustBench only when the network is allowed. RobustBench models take [0, 1] inputs."""
from __future__ import annotations

import difflib
import sys
from pathlib import Path

from ..data.source import canonical
from ..errors import RobauditError
from ..models import InputNorm
from .extras import require
from .spec import Built, ModelSource, SourceOptions
from .weights import load_weights, read_state_dict, read_torch_file

ZOO_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}  # robaudit's name -> RobustBench's
IMAGENET_CLASSES = 1000
_LAST = ("Kireev2021Effectiveness", "Andriushchenko2020Understanding")  # checkpoints keeping {'last', 'best'}


def build(source: ModelSource, options: SourceOptions, *, num_classes: int, example=None) -> Built:
    """The zoo model with its checkpoint (or ``--weights``: a state dict of the same module, e.g. hardened)."""
    utils, zoo, enums = _robustbench()
    dataset = zoo_dataset(options.dataset, num_classes)
    entries = zoo[enums.BenchmarkDataset(dataset)][enums.ThreatModel(options.threat_model)]
    entry = entries.get(source.name)
    if entry is None:
        close = difflib.get_close_matches(source.name, list(entries), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RobauditError(f"RobustBench has no {dataset} {options.threat_model} model {source.name!r}{hint}: see "
                            "robustbench's model zoo")
    if isinstance(entry.get("gdrive_id"), list):
        raise RobauditError(f"robustbench:{source.name} is an ensemble of several checkpoints, which robaudit does "
                            "not load: pick a single model")
    module = entry["model"]()
    weights = options.weights
    if weights is not None:
        load_weights(module, read_state_dict(weights), what=source.spec(), source=Path(weights).name)
    else:
        weights = checkpoint_path(options.model_dir, dataset, options.threat_model, source.name)
        if not weights.is_file():
            _download(utils, entry, weights, options)
        state = _zoo_state(utils, read_torch_file(weights), source.name, module)
        try:
            module = utils._safe_load_state_dict(module, source.name, state, enums.BenchmarkDataset(dataset))
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
            raise RobauditError(f"the checkpoint {weights} does not fit robustbench:{source.name}: {detail[:240]}; "
                                "delete it to download it again") from e
    return Built(module, InputNorm(None, None, "RobustBench (its models take [0, 1] inputs)"),
                 _version(), weights_file=Path(weights), classes=utils.DATASET_CLASSES[enums.BenchmarkDataset(dataset)],
                 extra={"zoo_dataset": dataset})


def zoo_dataset(dataset: str | None, num_classes: int) -> str:
    """RobustBench's data set for robaudit's: CIFAR-10/100 by name, ImageNet for a 1000-class image folder."""
    key = canonical(dataset) if dataset else None
    if key in ZOO_DATASETS:
        return ZOO_DATASETS[key]
    if num_classes == IMAGENET_CLASSES:
        return "imagenet"
    raise RobauditError(f"RobustBench's models are for cifar10, cifar100 and ImageNet; the data set {dataset!r} has "
                        f"{num_classes} classes: use --dataset cifar10, cifar100 or an ImageNet image folder")


def checkpoint_path(model_dir: Path, dataset: str, threat_model: str, name: str) -> Path:
    """Where RobustBench keeps a model's checkpoint: ``MODEL_DIR/DATASET/THREAT/NAME.pt``."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def _download(utils, entry, path: Path, options: SourceOptions) -> None:
    if not options.download:
        raise RobauditError(f"the checkpoint {path} is missing and --no-download forbids fetching it: put it there "
                            "(RobustBench's layout) or drop --no-download")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        utils.download_gdrive_new(entry["gdrive_id"], path)
    except Exception as e:
        path.unlink(missing_ok=True)  # a partial download is not a checkpoint
        raise RobauditError(f"RobustBench could not download {path.name} ({type(e).__name__}): check the network, "
                            "or put the checkpoint in --model-dir") from e


def _zoo_state(utils, checkpoint, name: str, module) -> dict:
    """The state dict of a zoo checkpoint, unwrapped as RobustBench's own loader does: ``module.``/``model.``
    prefixes off, then ``model.`` on where the module's keys have it (its ImageNet wrappers around a network)."""
    if any(k in name for k in _LAST) and isinstance(checkpoint, dict) and "last" in checkpoint:
        checkpoint = checkpoint["last"]
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RobauditError(f"the checkpoint of robustbench:{name} holds no state dict: delete it to download it again")
    state = utils.rm_substr_from_state_dict(utils.rm_substr_from_state_dict(state, "module."), "model.")
    own = set(module.state_dict())
    prefixed = utils.add_substr_to_state_dict(state, "model.")
    return prefixed if len(own & set(prefixed)) > len(own & set(state)) else state


def _robustbench():
    """RobustBench's utilities and zoo. Its package imports ``autoattack``, which the PyPI release installs as
    ``pyautoattack``: robaudit never runs it, and names the installed one for that import."""
    if "autoattack" not in sys.modules:
        try:
            import autoattack  # noqa: F401
        except ImportError:
            sys.modules["autoattack"] = require("pyautoattack", "robustbench")
    require("robustbench", "robustbench")
    utils = require("robustbench.utils", "robustbench")
    zoo = require("robustbench.model_zoo", "robustbench").model_dicts
    return utils, zoo, require("robustbench.model_zoo.enums", "robustbench")


def _version() -> str:
    from importlib.metadata import version

    return version("robustbench")
