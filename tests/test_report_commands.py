"""Every ``robaudit ...`` command a report prints runs as printed: the reproduce commands and the BatchNorm
section's ``harden --dual-bn``, for an analyzed run and for a hardened one (whose hardened/ the commands meet).

Each command is taken from the page, split as a shell would and run through the CLI from the directory the run was
made in. A printed harden command trains on the whole train split with the default 10-step PGD; to keep the test
short, its cost options are appended (later options win): ``--steps 1 --batch-size 256 --val-fraction 0.05
--no-report``. Nothing is removed from what the page prints.
"""
from __future__ import annotations

import html
import re
import shlex

import pytest

from tests.test_cli import DIGITS_PT2, invoke

CHEAP_HARDEN = ["--steps", "1", "--batch-size", "256", "--val-fraction", "0.05", "--no-report"]


def printed_commands(report) -> list[str]:
    """The robaudit command lines the report shows in code blocks, the audit's rerun first (it replaces the run,
    hardened/ included, so the others run after it, as a user would)."""
    text = report.read_text(encoding="utf-8")
    found = [html.unescape(c).strip() for c in re.findall(r"<pre><code>(robaudit [^<]*)</code></pre>", text)]
    return sorted(found, key=lambda c: c.split()[1] != "analyze")


def run_printed(command: str):
    argv = shlex.split(command)
    assert argv[0] == "robaudit", command
    if argv[1] == "harden":
        argv += CHEAP_HARDEN
    return invoke(*argv[1:])


@pytest.fixture
def bn_recommended(monkeypatch):
    """The BatchNorm section recommends --dual-bn (whether it does depends on the model's statistics)."""
    from robaudit import bnaudit

    verdict = bnaudit.verdict
    monkeypatch.setattr(bnaudit, "verdict", lambda bn: None if verdict(bn) is None else
                        {**verdict(bn), "recommend_dual_bn": True})


def test_every_printed_command_runs_as_printed(tmp_path, monkeypatch, bn_recommended):
    monkeypatch.chdir(tmp_path)
    first = invoke("analyze", DIGITS_PT2, "--dataset", "digits", "--samples", "24", "--attack", "fgsm",
                   "--eps", "8/255", "--no-checks", "--out", "run")
    assert first.exit_code == 0, first.output
    audited = printed_commands(tmp_path / "run" / "report.html")
    assert {c.split()[1] for c in audited} == {"analyze", "report", "harden"}, audited
    assert "robaudit harden --run run --dual-bn" in audited  # no hardened/ yet: no --force needed
    assert any("--eps 8/255" in c and "--samples 24" in c for c in audited)  # the audit as it was made
    for command in audited:
        result = run_printed(command)
        assert result.exit_code == 0, f"{command}: {result.output[-2000:]}"
    assert (tmp_path / "run" / "hardened").is_dir()
    rendered = invoke("report", "--run", "run")  # the hardened run's report: its commands meet hardened/
    assert rendered.exit_code == 0, rendered.output
    hardened = printed_commands(tmp_path / "run" / "report.html")
    assert any(c.startswith("robaudit harden") and "--dual-bn" in c and "--force" in c for c in hardened)
    assert any(c.startswith("robaudit harden") and "--dual-bn" not in c for c in hardened)  # rerun the hardening
    for command in hardened:
        result = run_printed(command)
        assert result.exit_code == 0, f"{command}: {result.output[-2000:]}"
