"""The package's shape, kept by tests: small files, short functions, no private name borrowed across modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robaudit"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str) -> list[str]:
    """``module.name`` for each ``_name`` imported from a robaudit module (relative or absolute)."""
    borrowed = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("robaudit")):
            borrowed += [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names if _is_private(a.name)]
    return borrowed


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_name(path):
    borrowed = private_imports(path.read_text(encoding="utf-8"))
    assert not borrowed, f"{path.name} imports private names: {borrowed}"


def test_no_file_or_function_is_too_long():
    too_long = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(PACKAGE)
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "over the limits: " + "; ".join(too_long)


def test_the_private_name_check_sees_a_borrowed_name():
    """The check above is not vacuous: it finds ``from .x import _y`` and leaves other packages alone."""
    source = "from .config import _Hidden\nfrom robaudit.data import _x, fine, __all__\nfrom torch import _C\n"
    assert private_imports(source) == [".config._Hidden", "robaudit.data._x"]
