"""The ``robaudit`` command lines that manifests record: the one a user typed, or the one equivalent to an
API call, so that every run says how to reproduce it."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence


def command_line(stage: str, *args, **options) -> str:
    """The command line equivalent to an API call: ``robaudit STAGE ARGS --option value ...``.

    Options are given in order, ``snake_case`` as ``--kebab-case``; ``None`` and ``False`` are left out, ``True``
    is a flag and a list repeats its option.
    """
    parts = ["robaudit", stage, *map(str, args)]
    for name, value in options.items():
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                parts.append(f"--{name.replace('_', '-')}")
            elif v is not None and v is not False:
                parts += [f"--{name.replace('_', '-')}", str(v)]
    return shlex.join(parts)


def with_force(command: str) -> str:
    """``command`` with ``--force`` (unless it has it): a command a report prints for its own run directory meets
    the files that run left, and must run as printed."""
    try:
        parts = shlex.split(command)
    except ValueError:  # not a command line robaudit recorded: shown as it is
        return command
    return command if "--force" in parts else shlex.join([*parts, "--force"])


def invoked_command(argv: Sequence[str] | None = None) -> str | None:
    """The command line as typed (``argv``: ``sys.argv``), quoted for a shell, when the program run was
    ``robaudit``; ``None`` otherwise (e.g. a test or a script calling the command), so that the stage records
    its API equivalent instead."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not Path(argv[0]).name.startswith("robaudit"):
        return None
    return shlex.join(["robaudit", *argv[1:]])
