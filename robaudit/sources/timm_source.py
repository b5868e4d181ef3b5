"""``timm:NAME``: ``timm.create_model`` with the data set's class count, weights from ``--weights`` (or timm's own
download with ``--pretrained``) and the normalization of timm's ``pretrained_cfg``."""
from __future__ import annotations

from torch import nn

from ..errors import RobauditError
from ..models import InputNorm
from .extras import require
from .spec import Built, ModelSource, SourceOptions
from .weights import load_weights, read_state_dict


def build(source: ModelSource, options: SourceOptions, *, num_classes: int, example=None) -> Built:
    """The timm model and the normalization its ``pretrained_cfg`` gives."""
    timm = require("timm", "timm")
    if source.name not in timm.list_models(pretrained=False) and not timm.is_model(source.name):
        raise RobauditError(f"timm has no model {source.name!r}: list them with python -c \"import timm; "
                            f"print(timm.list_models('{source.name.split('_')[0]}*'))\"")
    pretrained = options.pretrained is not None
    if pretrained and not options.download:
        raise RobauditError("--pretrained downloads timm's weights, but --no-download forbids it: drop one")
    kwargs = dict(options.arch_kwargs)
    if not pretrained or options.num_classes is not None:  # pretrained: keep its own head unless told
        kwargs["num_classes"] = options.num_classes or num_classes
    try:
        module = timm.create_model(source.name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise RobauditError(f"timm cannot build {source.name} with {kwargs}: {str(e).splitlines()[0][:200]}; "
                            "check --arch-kwargs") from e
    if options.weights is not None:
        load_weights(module, read_state_dict(options.weights), what=f"timm:{source.name}",
                     source=options.weights.name)
    return Built(module, _norm(module), timm.__version__, weights_file=options.weights,
                 classes=getattr(module, "num_classes", None) if pretrained and options.num_classes is None else None)


def _norm(module: nn.Module) -> InputNorm | None:
    cfg = getattr(module, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    return InputNorm(tuple(float(m) for m in mean), tuple(float(s) for s in std), "timm pretrained_cfg")
