"""The README's Python code blocks run as written, from a temporary directory, against the built wheel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """robaudit built as a wheel and installed into a bare directory (no checkout on the path)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("robaudit", "templates", "examples"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    dist, site = tmp / "dist", tmp / "site"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                   check=True, capture_output=True, cwd=tmp)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                    "--disable-pip-version-check", "--target", str(site), str(next(dist.glob("robaudit-*.whl")))],
                   check=True, capture_output=True)
    return site


def run_python(code: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2 and any("load_example" in b for b in BLOCKS)


def test_examples_resolve_inside_the_installed_package(installed, tmp_path):
    proc = run_python("import robaudit, robaudit.examples as e; print(robaudit.__file__); "
                      "print(e.path('digits_cnn.pt2')); print(','.join(e.names()))", installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, example, names = proc.stdout.strip().splitlines()
    assert Path(module).is_relative_to(installed) and Path(example).is_relative_to(installed)
    assert Path(example).is_file()
    assert set(names.split(",")) == {"digits_cnn.pt", "digits_cnn.pt2", "digits_deep_cnn.pt", "digits_deep_cnn.pt2",
                                     "moons_mlp.pt", "moons_mlp.pt2"}


def test_a_bare_import_reaches_the_examples_and_every_subpackage(installed, tmp_path):
    """``import robaudit`` alone gives ``robaudit.examples``; the wheel holds every package of the source tree."""
    proc = run_python("import robaudit; print(','.join(robaudit.examples.names()))", installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "digits_cnn.pt2" in proc.stdout.split(",")
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "robaudit").rglob("__init__.py")}
    shipped = {".".join(p.parent.relative_to(installed).parts) for p in (installed / "robaudit").rglob("__init__.py")}
    assert packages <= shipped, f"not in the wheel: {sorted(packages - shipped)} (list them in pyproject.toml)"


def test_safetensors_comes_with_the_package():
    """The README lists .safetensors among the model formats: ``pip install .`` brings the reader."""
    project = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    deps = re.search(r"^dependencies = \[(.*?)^\]", project, flags=re.S | re.M).group(1)
    assert re.search(r'^\s*"safetensors\b', deps, flags=re.M)
    assert "`.safetensors`" in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_outside_the_checkout(installed, tmp_path, index):
    proc = run_python(BLOCKS[index], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_security_promise_names_tests_that_exist():
    """The Security section names the test that keeps each promise: each name must be a test in that file."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Security\n"):text.index("\n## ", text.index("## Security\n") + 1)]
    cited, current = 0, None
    for file, name in re.findall(r"`([\w.]*)::(test_\w+)`", section):  # a bare ::name is in the file named last
        current = file or current
        assert current, f"{name} names no test file"
        source = (REPO / "tests" / current).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, flags=re.M), f"{current}::{name} does not exist"
        cited += 1
    assert cited >= 40


def test_every_readme_table_is_one_block():
    """A table row right after a paragraph renders as text: every row follows a row, or opens a table (a header
    row after a blank line, then its |---| separator)."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    fence = False
    for i, line in enumerate(lines):
        fence ^= line.startswith("```")
        if fence or not line.startswith("|"):
            continue
        before = lines[i - 1] if i else ""
        opens = not before.strip() and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1])
        assert before.startswith("|") or opens, f"README.md line {i + 1} is a table row outside a table: {line[:60]}"
