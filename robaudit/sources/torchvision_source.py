"""``torchvision:NAME``: ``torchvision.models.get_model`` with the data set's class count, weights from
``--weights`` or a weights enum (``--pretrained IMAGENET1K_V1``), normalization from the weights' transforms."""
from __future__ import annotations

from torch import nn

from ..errors import RobauditError
from ..models import InputNorm
from .extras import require
from .spec import Built, ModelSource, SourceOptions
from .weights import load_weights, read_state_dict


def build(source: ModelSource, options: SourceOptions, *, num_classes: int, example=None) -> Built:
    """The torchvision model and the normalization of its weights' transforms."""
    tv = require("torchvision", "torchvision")
    models = tv.models
    if source.name not in models.list_models():
        raise RobauditError(f"torchvision has no model {source.name!r}: see torchvision.models.list_models()")
    weights = _weights_enum(models, source.name, options.pretrained)
    if weights is not None and not options.download:
        raise RobauditError("--pretrained downloads torchvision's weights, but --no-download forbids it: drop one")
    kwargs = dict(options.arch_kwargs)
    if weights is None or options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes or num_classes
    try:
        module = models.get_model(source.name, weights=weights, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise RobauditError(f"torchvision cannot build {source.name} with {kwargs}: {str(e).splitlines()[0][:200]}; "
                            "check --arch-kwargs and --num-classes") from e
    if options.weights is not None:
        load_weights(module, read_state_dict(options.weights), what=f"torchvision:{source.name}",
                     source=options.weights.name)
    classes = len(weights.meta.get("categories") or []) or None if weights is not None else None
    return Built(module, _norm(models, source.name, weights), tv.__version__, weights_file=options.weights,
                 classes=classes if options.num_classes is None else None,
                 extra={"weights_enum": str(weights)} if weights is not None else {})


def _weights_enum(models, name: str, pretrained: str | None):
    if pretrained is None:
        return None
    try:
        enum = models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise RobauditError(f"torchvision publishes no weights for {name}: pass --weights FILE") from e
    key = "DEFAULT" if pretrained in ("", "true", "DEFAULT") else pretrained
    try:
        return enum[key]
    except KeyError:
        choices = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise RobauditError(f"--pretrained {pretrained!r} is not a weights name of {name}: use one of {choices}") from None


def _norm(models, name: str, weights) -> InputNorm | None:
    """The weights' own transforms' mean and std; for weights from a file, those of the model's default weights."""
    origin = "torchvision weights transforms"
    if weights is None:
        try:
            weights = models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            return None
        origin = f"torchvision {weights} transforms (the model's default weights)"
    transform = weights.transforms()
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    if mean is None or std is None:
        return None
    return InputNorm(tuple(float(m) for m in mean), tuple(float(s) for s in std), origin)
