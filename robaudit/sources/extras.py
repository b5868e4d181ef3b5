"""Optional libraries behind the model sources: import one, or say in one line which pip command installs it."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import RobauditError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (e.g. ``timm``); if it is missing, one line with the exact pip command for ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RobauditError(f"this model source needs the {module.split('.')[0]} package: "
                            f"pip install 'robaudit[{extra}]' ({e})") from e
