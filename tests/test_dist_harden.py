"""Hardening under torchrun (2 processes, gloo, one thread each): one run directory written by rank 0, a killed
job resumed exactly, one DDP step equal to one step of one process, and errors that end every process."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from robaudit.models import load_model
from robaudit.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tests import dist_worker
from tests.test_cli import DIGITS_PT2, ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
HARDEN = ["--dataset", "digits", "--samples", "48", "--method", "atlr", "--mvl-top", "2", "--steps", "2",
          "--epochs", "4", "--batch-size", "64", "--no-report"]
HARDENED = {"model.pt2", "lsa.csv", "accuracy.csv", "mvl.json", "manifest.json", "checks.json", "history.csv",
            "comparison.csv", "harden.json", "samples.csv", "classes.csv"}


def torchrun(args, cwd: Path, *, module: bool = True) -> subprocess.Popen:
    """A 2-process torchrun job in its own session (so that a test can kill all of it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [*TORCHRUN, *(["-m", "robaudit"] if module else []), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise AssertionError("the torchrun job hung") from None
    return proc.returncode, out, err


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (torchrun starts them in sessions of their own), as a scheduler would."""
    found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proc.pid, *map(int, found)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, str, str]:
    """``harden MODEL --dataset digits`` under torchrun, start to end: (run directory, stdout, stderr)."""
    root = tmp_path_factory.mktemp("dist")
    rc, out, err = finish(torchrun(["harden", DIGITS_PT2, *HARDEN, "--out", root / "run"], root))
    assert rc == 0, err[-3000:]
    return root / "run", out, err


def test_torchrun_harden_writes_one_run_directory_and_the_model_reloads(uninterrupted):
    run, out, err = uninterrupted
    assert HARDENED <= {p.name for p in (run / "hardened").iterdir()}
    assert not (run / CHECKPOINT_NAME).exists() and staging_left(run) == [] and staging_left(run.parent) == []
    assert out.count("hardened model:") == 1 and out.count("analyzed ") == 1  # rank 0 alone printed
    assert "error" not in err.lower()
    history = pd.read_csv(run / "hardened" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3, 4] and history["loss"].iloc[1:].notna().all()
    assert '"processes": 2' in (run / "hardened" / "harden.json").read_text()
    checks = (run / "hardened" / "checks.json").read_text()
    assert '"plan"' in checks  # the re-analysis sizes its checks as the analysis does
    hardened = load_model(run / "hardened" / "model.pt2")
    x = torch.rand(3, 1, 8, 8)
    assert hardened.module(x).shape == (3, 10)


def test_torchrun_harden_killed_after_a_checkpoint_resumes_like_an_uninterrupted_run(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(["harden", DIGITS_PT2, *HARDEN, "--out", run], tmp_path)
    checkpoint = run / CHECKPOINT_NAME
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_job(proc)
    assert checkpoint.exists(), "no checkpoint was written before the job ended"
    epoch = int(load_checkpoint(checkpoint)["epoch"])
    assert 1 <= epoch < 4 and not (run / "hardened").exists()

    rc, out, err = finish(torchrun(["harden", DIGITS_PT2, *HARDEN, "--out", run, "--resume"], tmp_path))
    assert rc == 0, err[-3000:]
    assert f"resuming from the checkpoint of epoch {epoch}" in out
    assert f'"resumed_from_epoch": {epoch}' in (run / "hardened" / "harden.json").read_text()
    assert not checkpoint.exists()
    # the same world size continues exactly like the uninterrupted job
    done, _, _ = uninterrupted
    a, b = (pd.read_csv(r / "hardened" / "history.csv") for r in (done, run))
    cols = [c for c in a.columns if "seconds" not in c]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    wa, wb = (load_model(r / "hardened" / "model.pt2").module.state_dict() for r in (done, run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_ddp_step_equals_the_step_of_one_process_on_the_whole_batch(tmp_path):
    """AT and AT-LR (pooled and per-sample RE, with clean CE mixed in) on a batch split 4 + 3 over 2 processes."""
    rc, out, err = finish(torchrun([ROOT / "tests" / "dist_worker.py", tmp_path / "two.pt"], tmp_path, module=False))
    assert rc == 0, err[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    torch.manual_seed(0)
    start = dist_worker.PlainCNN().state_dict()
    for name, settings in dist_worker.CASES:
        one = dist_worker.one_step(settings).state_dict()
        d1 = torch.cat([(one[k] - start[k]).flatten() for k in start])
        d2 = torch.cat([(two[name][k] - start[k]).flatten() for k in start])
        assert d1.norm() > 0, name
        assert float((d1 - d2).norm() / d1.norm()) <= 1e-5, name


def test_an_error_ends_every_process_with_one_line_each(uninterrupted, tmp_path):
    done, _, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(done, run, ignore=shutil.ignore_patterns("hardened"))
    rc, out, err = finish(torchrun(["harden", "--run-dir", run, "--batch-size", "3", "--epochs", "1"], tmp_path),
                          timeout=200)
    assert rc != 0
    lines = [l for l in err.splitlines() if l.startswith("error")]
    assert "error: --batch-size 3 is too small for 2 processes" in err, err[-3000:]
    assert "error (process 1): --batch-size 3 is too small" in err
    assert len(lines) == 2 and "Traceback" not in err.split("error:")[0]
    assert out == "" and not (run / "hardened").exists()


def test_an_error_in_one_process_ends_the_job_without_hanging(uninterrupted, tmp_path):
    """Process 1 fails alone while process 0 waits for it in a collective: both end, nothing is written."""
    done, _, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(done, run, ignore=shutil.ignore_patterns("hardened"))
    args = [ROOT / "tests" / "dist_worker.py", "--fail-in-1", "--run-dir", run, "--epochs", "3", "--steps", "1",
            "--mvl-top", "2", "--batch-size", "64", "--no-report"]
    rc, out, err = finish(torchrun(args, tmp_path, module=False), timeout=200)
    assert rc != 0
    assert "error (process 1): the disk of process 1 is full" in err, err[-3000:]
    assert not (run / "hardened").exists()
    assert int(load_checkpoint(run / CHECKPOINT_NAME)["epoch"]) == 1  # the last complete epoch is kept
