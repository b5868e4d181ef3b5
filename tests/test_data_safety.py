"""robaudit deletes only what it wrote: --out checks, --force, interrupts and SIGKILL at any moment."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import MOONS_PT2, assert_one_line_failure, invoke

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "moons", "--attack", "fgsm", "--eps", "0.1", "--samples", "40", "--no-checks", "--no-report"]


def analyze(out, *extra):
    return invoke("analyze", MOONS_PT2, *QUICK, "--out", out, *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


def test_a_folder_of_the_users_files_is_refused(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\section{Results}")
    before = snapshot(folder)
    for extra in ((), ("--force",)):
        result = analyze(folder, *extra)
        assert_one_line_failure(result, "not a robaudit run directory")
        assert snapshot(folder) == before
    assert staging_left(tmp_path) == []


def test_a_run_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    first = snapshot(out)
    assert_one_line_failure(analyze(out, "--seed", "1"), "--force")
    assert snapshot(out) == first
    result = analyze(out, "--seed", "1", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


def test_force_never_deletes_a_file_robaudit_did_not_write(tmp_path):
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    (out / "notes.md").write_text("mine")
    (out / "hardened").mkdir()
    (out / "hardened" / "plot.svg").write_text("<svg/>")
    result = analyze(out, "--force")
    assert_one_line_failure(result, "did not write", "notes.md")
    assert (out / "notes.md").read_text() == "mine" and (out / "hardened" / "plot.svg").exists()


@pytest.mark.parametrize("case", ["file", "below a file", "empty", "proc", "symlink"])
def test_the_output_path_is_checked_before_the_model_is_even_read(case, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "keep").write_text("k")
    out = {"file": afile, "below a file": afile / "sub", "empty": "", "proc": "/proc/robaudit-run",
           "symlink": tmp_path / "link"}[case]
    # the model does not exist: a failure about --out proves the check comes first
    result = invoke("analyze", tmp_path / "missing.pt2", "--dataset", "moons", "--out", out)
    assert_one_line_failure(result, "--out")
    assert afile.read_text() == "x" and (tmp_path / "real" / "keep").exists()


@pytest.mark.parametrize("args, needle", [
    (["--attack", "pgd:alpha=-1"], "alpha"),
    (["--attack", "pgd:steps=0"], "steps"),
    (["--attack", "square:n_queries=0"], "n_queries"),
    (["--attack", "pgd:eps="], "eps"),
    (["--eps", "1e9"], "eps"),
    (["--mvl-z", "nan"], "--mvl-z"),
    (["--mvl-top", "0"], "--mvl-top"),
    (["--seed", "1180591620717411303424"], "seed"),
])
def test_bad_values_are_refused_up_front(args, needle, tmp_path):
    result = invoke("analyze", tmp_path / "missing-model.pt2", "--dataset", "moons", *args, "--out",
                    tmp_path / "out")
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert needle.lower() in err.lower() and "Traceback" not in result.output
    assert "not found" not in err  # refused before the model is looked at
    assert not (tmp_path / "out").exists()


def test_run_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert analyze(tmp_path / "run").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755


def test_the_report_is_in_place_before_the_run_is(tmp_path, monkeypatch):
    """An interrupt while the report renders leaves no run at all, never one without its report."""
    import robaudit.stages.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(robaudit.stages.report, "render_report", interrupted)
    result = invoke("analyze", MOONS_PT2, *[a for a in QUICK if a != "--no-report"], "--out", tmp_path / "run")
    assert result.exit_code == 130
    assert not (tmp_path / "run").exists() and staging_left(tmp_path) == []


def test_report_out_never_overwrites_another_file(tmp_path):
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    mine = tmp_path / "thesis.tex"
    mine.write_text("mine")
    assert_one_line_failure(invoke("report", "--run", out, "--out", mine), "not a robaudit report")
    assert mine.read_text() == "mine"
    assert invoke("report", "--run", out, "--out", tmp_path / "r.html").exit_code == 0
    assert invoke("report", "--run", out, "--out", tmp_path / "r.html").exit_code == 0  # its own report: replaced


# -- SIGKILL at random moments ---------------------------------------------------------------
def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "robaudit", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _assert_safe(parent: Path, out: Path, user_files: dict[str, bytes]) -> None:
    assert {k: v for k, v in snapshot(parent).items() if k in user_files} == user_files, "a user's file changed"
    if out.exists():
        names = {p.name for p in out.iterdir()}
        assert {"lsa.csv", "accuracy.csv", "mvl.json", "manifest.json", "report.html"} <= names, names


def test_sigkill_during_analyze_leaves_no_half_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    user = snapshot(tmp_path)
    out = tmp_path / "run"
    rng = random.Random(7)
    args = ["analyze", MOONS_PT2, "--dataset", "moons", "--attack", "fgsm", "--attack", "pgd:steps=5", "--eps",
            "0.1", "--samples", "100", "--no-checks", "--force", "--out", out]
    for delay in sorted(rng.uniform(0.5, 6.0) for _ in range(3)):
        proc = _spawn(args, tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_safe(tmp_path, out, user)
    # the next run removes what a killed one may have left while staging, and completes
    proc = _spawn(args, tmp_path)
    assert proc.wait(timeout=300) == 0
    _assert_safe(tmp_path, out, user)
    assert staging_left(tmp_path) == []


def test_sigkill_during_harden_then_resume_in_the_model_form(tmp_path):
    """The interrupt message suggests rerunning with --resume; in the ``harden MODEL --out DIR`` form that must
    find the checkpoint, not analyze again (which would replace the run and its checkpoint)."""
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    train = ["--epochs", "4", "--steps", "1", "--no-report"]
    proc = _spawn(["harden", "--run", out, *train], tmp_path)
    checkpoint = out / "harden-checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    analyzed = (out / "lsa.csv").read_bytes()
    result = invoke("harden", MOONS_PT2, "--dataset", "moons", "--out", out, *train, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stdout.lower()
    assert (out / "lsa.csv").read_bytes() == analyzed  # not analyzed again
    assert (out / "hardened" / "harden.json").exists() and not checkpoint.exists()
    assert staging_left(out) == []
