"""robaudit: find where inside a PyTorch classifier adversarial perturbations do their damage,
harden those layers, and report the evidence in one HTML file."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("robaudit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

from . import examples  # noqa: E402  (robaudit.examples.names() works after a bare `import robaudit`)
from .errors import RobauditError  # noqa: E402
from .lsa import MVL, LSAResult, analyze, relative_error, pooled_relative_error  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .training.config import HardenConfig  # noqa: E402
from .training.fit import HardenResult, harden  # noqa: E402


def load_example(name: str) -> LoadedModel:
    """Load a shipped example model by name (``"digits_cnn"`` for its ``.pt2``, or ``"digits_cnn.pt"``)."""
    return load_model(examples.path(name))


__all__ = ["examples", "analyze", "harden", "HardenConfig", "HardenResult", "load_model", "load_example", "LoadedModel", "LSAResult", "MVL", "RobauditError",
           "relative_error", "pooled_relative_error", "__version__"]
