"""The example models shipped inside the package, reachable from any working directory.

``robaudit.examples.path("digits_cnn.pt2")`` gives the file; ``robaudit.load_example("digits_cnn")``
loads it. Their architectures are in :mod:`robaudit.examples.models`.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["names", "path"]

SUFFIXES = (".pt2", ".pt")


def names() -> list[str]:
    """The file names of the shipped example models, e.g. ``["digits_cnn.pt", "digits_cnn.pt2", ...]``."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.name.endswith(SUFFIXES))


def path(name: str) -> Path:
    """The installed file of one example model: ``"digits_cnn.pt2"``, or a bare stem for its ``.pt2``."""
    from robaudit.errors import RobauditError

    file = name if name.endswith(SUFFIXES) else f"{name}.pt2"
    if file in names():
        found = Path(str(resources.files(__name__).joinpath(file)))
        if found.is_file():
            return found
    raise RobauditError(f"no example model {name!r}: choose from {', '.join(names())}")
