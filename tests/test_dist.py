"""``torchrun`` analyses (gloo, CPU): N processes give the files of one process, and an error anywhere
stops the group with one line from rank 0."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import robaudit as robaudit_package
from tests.helpers import ROOT, TinyCNN, rel_diff

MODEL = ROOT / "examples" / "digits_cnn.pt2"
BATTERY = ["--attack", "fgsm", "--attack", "pgd", "--attack", "gaussian", "--attack", "square:n_queries=20"]
RUN_FILES = ("lsa.csv", "accuracy.csv", "samples.csv", "mvl.json")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def robaudit(args: list, cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    """``python -m robaudit ARGS`` in one process, or under ``torchrun --standalone --nproc-per-node=nproc``."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "robaudit", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def analyze_both(tmp: Path, args: list, nproc: int) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The same analysis in one process (``one/``) and in ``nproc`` processes (``many/``)."""
    one = robaudit(["analyze", *args, "--out", "one", "--no-report"], tmp)
    assert one.returncode == 0, one.stderr
    many = robaudit(["analyze", *args, "--out", "many", "--no-report"], tmp, nproc=nproc)
    assert many.returncode == 0, many.stderr
    return tmp / "one", tmp / "many", many


def assert_same_run(one: Path, many: Path) -> None:
    a, b = pd.read_csv(one / "lsa.csv"), pd.read_csv(many / "lsa.csv")
    numeric = ["re_mean", "re_std", "re_pooled"]
    pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
    assert rel_diff(a[numeric].to_numpy(), b[numeric].to_numpy()) <= 1e-5
    pd.testing.assert_frame_equal(pd.read_csv(one / "accuracy.csv").drop(columns="seconds"),
                                  pd.read_csv(many / "accuracy.csv").drop(columns="seconds"))
    assert (one / "samples.csv").read_text() == (many / "samples.csv").read_text()
    mvl_one, mvl_many = (json.loads((d / "mvl.json").read_text()) for d in (one, many))
    # scores are sums added in another order (per process, then over processes): equal to rounding
    scores = [[layer.pop("score") for layer in m["layers"]] for m in (mvl_one, mvl_many)]
    assert mvl_one == mvl_many
    assert scores[0] == pytest.approx(scores[1], rel=1e-9)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    args = [MODEL, "--dataset", "digits", "--samples", 60, "--batch-size", 16, *BATTERY]
    return (tmp, *analyze_both(tmp, args, nproc=2))


def test_two_processes_write_the_files_of_one(two_processes):
    _, one, many, _ = two_processes
    assert_same_run(one, many)
    # the BatchNorm audit, shared by the processes too: moments added in another order
    a, b = pd.read_csv(one / "bn.csv"), pd.read_csv(many / "bn.csv")
    assert len(a) == 2
    shifts = ["clean_vs_running", "adv_vs_clean", "adv_vs_running"]
    pd.testing.assert_frame_equal(a.drop(columns=shifts), b.drop(columns=shifts))
    assert rel_diff(a[shifts].to_numpy(), b[shifts].to_numpy()) <= 1e-6
    # the model checks (rank 0 alone, reusing the gathered outcomes) find the same, clocks apart
    checks = [_without_clocks(json.loads((d / "checks.json").read_text())) for d in (one, many)]
    assert checks[0]["n_samples"] > 0 and checks[0] == checks[1]


def _without_clocks(obj):
    if isinstance(obj, dict):
        return {k: _without_clocks(v) for k, v in obj.items() if not k.endswith("seconds")}
    return [_without_clocks(v) for v in obj] if isinstance(obj, list) else obj


def test_only_rank_0_writes_and_prints(two_processes):
    tmp, _, many, proc = two_processes
    assert sorted(p.name for p in tmp.iterdir()) == ["many", "one"]  # no staging leftovers, no second run
    assert proc.stdout.count("clean accuracy:") == 1 and proc.stdout.count("run directory:") == 1
    assert "warning" not in proc.stderr


def test_uneven_split_and_a_process_without_a_batch(tmp_path):
    # 20 samples in batches of 16: two batches for three processes, the third has none
    args = [MODEL, "--dataset", "digits", "--samples", 20, "--batch-size", 16, "--attack", "fgsm",
            "--attack", "pgd", "--attack", "gaussian", "--eps", "0.1,0.2"]
    one, many, _ = analyze_both(tmp_path, args, nproc=3)
    assert_same_run(one, many)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "one"]


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_an_error_on_another_rank_stops_the_group_with_one_line(tmp_path):
    torch.manual_seed(0)
    torch.save(TinyCNN(num_classes=10).state_dict(), tmp_path / "model.pt")
    # 20 samples in batches of 16: the second batch (four samples) is rank 1's, and gives NaN logits
    proc = robaudit(["analyze", "model.pt", "--arch", "tests.helpers:NonFiniteOnFour", "--arch-kwargs",
                     '{"num_classes": 10}', "--probe", "modules", "--dataset", "digits", "--samples", 20,
                     "--batch-size", 16, "--attack", "fgsm", "--eps", "0.1", "--out", "run"], tmp_path, nproc=2)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 1 and "non-finite outputs on clean samples 16..19" in lines[0], proc.stderr
    assert "process 1 of 2" in lines[0]
    # no traceback through robaudit's code: no frame in a file of the package (torchrun's own summary has a
    # traceback of torch's launcher and names the interpreter, which may well sit in a checkout named robaudit/)
    package = Path(robaudit_package.__file__).resolve().parent
    frames = re.findall(r'^\s*File "([^"]+)", line \d+', proc.stderr, re.M)
    assert not [f for f in frames if Path(f).resolve().is_relative_to(package)], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_an_error_on_rank_0_alone_does_not_leave_the_others_waiting(tmp_path):
    (tmp_path / "taken").write_text("a file, not a run directory")
    proc = robaudit(["analyze", MODEL, "--dataset", "digits", "--samples", 20, "--attack", "fgsm", "--eps", "0.1",
                     "--out", "taken"], tmp_path, nproc=2)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 1 and "exists and is not a directory" in lines[0], proc.stderr
    assert (tmp_path / "taken").read_text() == "a file, not a run directory"


# -- the end of a command in torchrun's group (dist.lifetime), without starting processes -------------------
def _as_rank(monkeypatch, rank: int) -> list:
    """Pretend to be process ``rank`` of two; the calls to :func:`robaudit.dist.shutdown` are recorded."""
    from robaudit import dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    calls: list = []
    monkeypatch.setattr(dist, "shutdown", lambda *, failed=False: calls.append(failed))
    return calls


def test_lifetime_leaves_after_a_meeting_when_finished_and_at_once_after_a_failure(monkeypatch):
    from robaudit import dist

    calls = _as_rank(monkeypatch, 1)
    with dist.lifetime():
        pass
    with pytest.raises(ValueError), dist.lifetime():
        raise ValueError("boom")
    with pytest.raises(SystemExit), dist.lifetime(finished=lambda e: isinstance(e, SystemExit) and e.code == 3):
        raise SystemExit(3)  # e.g. a missed bar: the command ran to its end
    assert calls == [False, True, False]
    assert dist.process_tag() == " (process 1)"
    monkeypatch.setenv("RANK", "0")
    assert dist.process_tag() == ""
    monkeypatch.delenv("WORLD_SIZE")
    with dist.lifetime():  # without torchrun: just the block
        pass
    assert calls == [False, True, False]


def test_a_meeting_that_breaks_after_this_process_finished_is_one_error(monkeypatch):
    from robaudit import dist

    _as_rank(monkeypatch, 1)

    def broken(*, failed=False):
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(dist, "shutdown", broken)
    with pytest.raises(dist.GroupBroken, match="another process of the job failed before the end "
                                                r"\(RuntimeError\)") as info:
        with dist.lifetime():
            pass
    assert info.value.exit_code == 1 and not dist.reported_by_main(info.value)
    with pytest.raises(RuntimeError, match="connection reset"):  # this process failed: its own error stays
        with dist.lifetime():
            raise ValueError("first")
    assert dist.reported_by_main(dist.PeerError("rank 0 says it"))
