"""The ``robaudit`` command end to end through click's CliRunner, and every bad input's one-line failure."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from robaudit.cli import main
from robaudit.errors import RobauditError
from robaudit.models import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PT2 = ROOT / "examples" / "digits_cnn.pt2"
MOONS_PT2 = ROOT / "examples" / "moons_mlp.pt2"
FAST = ["--attack", "fgsm", "--attack", "pgd:steps=3", "--attack", "gaussian", "--eps", "0.1,0.2",
        "--samples", "48", "--batch-size", "20", "--no-checks", "--no-report"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_one_line_failure(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in err.lower(), err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("analyze", DIGITS_PT2, "--dataset", "digits", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_analyze_writes_the_run_directory_contract(digits_run):
    out, result = digits_run
    lsa = pd.read_csv(out / "lsa.csv")
    assert list(lsa.columns[:8]) == ["layer", "layer_type", "attack", "eps", "re_mean", "re_std", "re_pooled",
                                     "n_samples"]
    # 11 probed layers of the example CNN x (fgsm, pgd, gaussian) x 2 eps
    assert lsa["layer"].nunique() == 11
    assert len(lsa) == 11 * 3 * 2
    assert set(lsa["layer_type"]) >= {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Linear"}
    assert (lsa["n_samples"] <= 48).all() and (lsa["re_pooled"] >= 0).all()
    acc = pd.read_csv(out / "accuracy.csv")
    assert list(acc.columns[:4]) == ["attack", "eps", "accuracy", "n_samples"]
    assert list(acc.columns[-2:]) == ["ci_low", "ci_high"]
    assert ((acc["ci_low"] <= acc["accuracy"]) & (acc["accuracy"] <= acc["ci_high"])).all()
    assert acc.loc[acc["attack"] == "clean", "accuracy"].item() > 0.9
    for eps in (0.1, 0.2):
        at = acc[np.isclose(acc["eps"], eps)]
        worst = at.loc[at["attack"] == "worst-case", "accuracy"].item()
        assert worst <= at.loc[at["kind"] == "adversarial", "accuracy"].min() + 1e-12
    mvl = json.loads((out / "mvl.json").read_text())
    assert mvl["criterion"] == "top-k" and mvl["attack"] in ("pgd(steps=3)", "fgsm")
    scores = [l["score"] for l in mvl["layers"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    assert "classifier.3" not in [l["layer"] for l in mvl["layers"]]  # output layer left out
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("robaudit_version", "torch_version", "command", "model", "dataset", "n_samples", "seed", "device",
                "attacks", "started", "finished"):
        assert key in manifest
    assert manifest["model"]["sha256"] and manifest["n_samples"] == 48
    assert "Most Vulnerable Layers" in result.stdout and str(out) in result.stdout


def test_same_seed_same_numbers(digits_run, tmp_path):
    out, _ = digits_run
    again = invoke("analyze", DIGITS_PT2, "--dataset", "digits", *FAST, "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "lsa.csv"), pd.read_csv(tmp_path / "again" / "lsa.csv"))
    timing = ["seconds"]  # wall-clock time differs from run to run; every number measured must not
    pd.testing.assert_frame_equal(pd.read_csv(out / "accuracy.csv").drop(columns=timing),
                                  pd.read_csv(tmp_path / "again" / "accuracy.csv").drop(columns=timing))


def test_moons_mlp_and_layer_filters(tmp_path):
    result = invoke("analyze", MOONS_PT2, "--dataset", "moons", "--attack", "pgd:steps=5", "--eps", "0.1",
                    "--layer-types", "ReLU", "--mvl-top", "2", "--samples", "100", "--no-checks", "--no-report",
                    "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    lsa = pd.read_csv(tmp_path / "m" / "lsa.csv")
    assert set(lsa["layer_type"]) == {"ReLU"} and lsa["layer"].nunique() == 3
    assert len(json.loads((tmp_path / "m" / "mvl.json").read_text())["layers"]) == 2


def test_attacks_command_lists_the_battery():
    result = invoke("attacks")
    assert result.exit_code == 0
    for name in ("fgsm", "pgd", "pgdl2", "cw", "deepfool", "autoattack", "square", "gaussian", "uniform",
                 "saltpepper"):
        assert name in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line and not line[0].isspace()}
    assert "Linf/L2" in lines["square"] and "Linf/L2" in lines["autoattack"] and "Linf/L2" not in lines["pgd"]
    assert "norm=Linf (or norm=L2)" in result.stdout


# -- bad input: one line, non-zero exit, no traceback, no partial run directory ---------------------
@pytest.fixture
def nan_checkpoint(tmp_path):
    from robaudit.examples.models import MoonsMLP

    model = MoonsMLP()
    with torch.no_grad():
        model.net[0].weight.fill_(float("nan"))
    return save_checkpoint(tmp_path / "nan.pt", model, arch="robaudit.examples.models:MoonsMLP")


def _bad_cases(tmp_path: Path, nan_checkpoint: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"not a zip archive at all" * 10)
    corrupt_pt = tmp_path / "corrupt.pt"
    corrupt_pt.write_bytes(bytes(range(256)) * 4)
    pickled = tmp_path / "pickled.pt"
    from robaudit.examples.models import MoonsMLP

    torch.save(MoonsMLP(), pickled)
    many = tmp_path / "five_classes.npz"
    np.savez(many, x=np.random.default_rng(0).random((20, 2), dtype=np.float32), y=np.arange(20) % 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing model": (["analyze", tmp_path / "nope.pt2", "--dataset", "digits"], ("not found",)),
        "corrupt pt2": (["analyze", corrupt, "--dataset", "digits"], ("export",)),
        "corrupt pt": (["analyze", corrupt_pt, "--dataset", "digits"], ("not a readable",)),
        "pickle without trust": (["analyze", pickled, "--dataset", "moons"], ("--trust-model",)),
        "unknown data set": (["analyze", MOONS_PT2, "--dataset", "imagenet7"], ("unknown",)),
        "empty data dir": (["analyze", DIGITS_PT2, "--dataset", "mnist", "--data-dir", empty, "--no-download"],
                           (str(empty),)),
        "input shape": (["analyze", MOONS_PT2, "--dataset", "digits"], ("shape",)),
        "class count": (["analyze", MOONS_PT2, "--dataset", many], ("classes",)),
        "non-finite": (["analyze", nan_checkpoint, "--dataset", "moons"], ("non-finite",)),
        "unknown attack": (["analyze", MOONS_PT2, "--dataset", "moons", "--attack", "pgdd"], ("unknown attack",)),
        "unknown parameter": (["analyze", MOONS_PT2, "--dataset", "moons", "--attack", "pgd:stepz=3"],
                              ("unknown parameter",)),
        "zero eps": (["analyze", MOONS_PT2, "--dataset", "moons", "--eps", "0"], ("eps",)),
        "negative eps": (["analyze", MOONS_PT2, "--dataset", "moons", "--attack", "fgsm:eps=-0.1"], ("eps",)),
        "bad arch": (["analyze", nan_checkpoint, "--dataset", "moons", "--arch", "no_such_module_xyz:Net"],
                     ("cannot import",)),
        "too many mvl": (["analyze", MOONS_PT2, "--dataset", "moons", "--mvl-top", "50", "--attack", "fgsm",
                          "--samples", "20", "--no-checks"], ("--mvl-top",)),
    }


CASES = ["missing model", "corrupt pt2", "corrupt pt", "pickle without trust", "unknown data set", "empty data dir",
         "input shape", "class count", "non-finite", "unknown attack", "unknown parameter", "zero eps",
         "negative eps", "bad arch", "too many mvl"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_line(case, tmp_path, nan_checkpoint):
    args, needles = _bad_cases(tmp_path, nan_checkpoint)[case]
    out = tmp_path / "out"
    result = invoke(*args, "--out", out)
    assert_one_line_failure(result, *needles)
    assert not out.exists(), "a failed analysis must leave no run directory"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary directory left behind"


def test_failure_keeps_an_existing_run_directory(digits_run, tmp_path):
    out, _ = digits_run
    before = (out / "lsa.csv").read_bytes()
    result = invoke("analyze", MOONS_PT2, "--dataset", "digits", "--out", out, "--force")
    assert_one_line_failure(result, "shape")
    assert (out / "lsa.csv").read_bytes() == before


def test_debug_shows_the_exception():
    result = CliRunner().invoke(main, ["--debug", "analyze", "missing.pt2", "--dataset", "digits"])
    assert isinstance(result.exception, RobauditError)


def test_trusted_pickle_loads(tmp_path):
    from robaudit.examples.models import MoonsMLP

    torch.manual_seed(0)
    pickled = tmp_path / "pickled.pt"
    torch.save(MoonsMLP(), pickled)
    result = invoke("analyze", pickled, "--trust-model", "--dataset", "moons", "--attack", "fgsm", "--eps", "0.1",
                    "--samples", "16", "--no-checks", "--no-report", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["model"]["format"] == "pickle"


def test_report_without_a_run_fails_cleanly(tmp_path):
    assert_one_line_failure(invoke("report", "--run", tmp_path / "missing"), "run")


def test_harden_says_which_run_and_epoch_and_warns_once(tmp_path, monkeypatch):
    import robaudit.exported

    monkeypatch.chdir(tmp_path)
    # an archive whose BatchNorm cannot be rebuilt as a trainable module keeps it frozen, and says so
    monkeypatch.setattr(robaudit.exported, "_rebuild_leaf", lambda *args: None)
    first = invoke("analyze", DIGITS_PT2, "--dataset", "digits", "--attack", "fgsm", "--eps", "0.1", "--samples", "24",
                   "--no-checks", "--no-report", "--out", "reports/digits")
    assert first.exit_code == 0, first.output
    from tests.helpers import interrupt_training

    resume_training = interrupt_training(monkeypatch, 2)
    with pytest.warns(UserWarning, match="stay frozen"):
        stopped = invoke("harden", "--epochs", "2", "--steps", "2", "--batch-size", "256", "--no-report")
    assert stopped.exit_code == 130, stopped.output
    assert stopped.stdout.startswith("hardening the latest run under reports/: reports")  # said before training
    # after its first epoch, harden says how long it will take (the epoch's time for the one left, plus the
    # re-analysis at the analysis' own time)
    assert re.search(r"^time estimate: epoch 1/2 took [\d.]+ s; about [\d.]+ s to go \(1 more epoch and the "
                     r"re-analysis\), about [\d.]+ s in all$", stopped.stdout, re.M), stopped.stdout
    resume_training()
    with pytest.warns(UserWarning, match="stay frozen while hardening") as shown:
        resumed = invoke("harden", "--run", "reports/digits", "--resume", "--epochs", "2", "--steps", "2",
                         "--batch-size", "256", "--no-report")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.splitlines()[0].startswith("resuming from the checkpoint of epoch 1 ")
    assert "continues at epoch 2" in resumed.stdout
    assert "time estimate: epoch 2/2 took " in resumed.stdout and "to go (the re-analysis)" in resumed.stdout
    # before and after with their intervals, and the paired test of the same 24 samples
    assert re.search(r"^  accuracy +before \(95% CI\) +after \(95% CI\) +delta  paired test$", resumed.stdout, re.M)
    row = re.search(r"^  fgsm eps 0\.1 +(\S+)% \((\S+)-(\S+)%\) +(\S+)% \((\S+)-(\S+)%\) +\S+  p=(\S+), "
                    r"(within|beyond) noise$", resumed.stdout, re.M)
    assert row, resumed.stdout
    before, low, high = (float(v) for v in row.groups()[:3])
    assert low <= before <= high and 0 <= float(row.group(7)) <= 1
    # the frozen-BatchNorm message: once as a warning, not again among the notes at the end
    assert len([w for w in shown if "stay frozen" in str(w.message)]) == 1
    assert "stay frozen while hardening" not in resumed.output


def test_eps_fraction_stays_a_fraction_in_labels(tmp_path):
    out = tmp_path / "run"
    result = invoke("analyze", DIGITS_PT2, "--dataset", "digits", "--attack", "fgsm", "--eps", "8/255",
                    "--samples", "16", "--no-checks", "--out", out)
    assert result.exit_code == 0, result.output
    assert "eps 8/255: fgsm" in result.stdout and "0.0313" not in result.stdout
    report = (out / "report.html").read_text()
    assert "FGSM ε=8/255" in report and "at eps 8/255" in report


def test_harden_checks_its_settings_before_analyzing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("harden", DIGITS_PT2, "--dataset", "digits", "--epochs", "0", "--no-report")
    assert res.exit_code == 2 and "--epochs must be at least 1" in res.stderr
    assert not (tmp_path / "reports").exists()  # nothing was analyzed, nothing written


def analyzed_image_folders(tmp_path: Path, test: dict, train: dict, class_map: str | None, *options) -> Path:
    """Test and train image folders of ``{class: sizes}`` written to ``tmp_path``, and a tiny exported CNN on
    3x8x8 images analyzed on the test folder (``class_map``: the JSON of ``--class-map``); returns the run."""
    from robaudit.models import export_model
    from tests.test_data import write_images

    write_images(tmp_path / "test", test)
    write_images(tmp_path / "train", train)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    export_model(tmp_path / "m.pt2", model.eval(), torch.rand(2, 3, 8, 8))
    if class_map is not None:
        (tmp_path / "map.json").write_text(class_map)
        options = (*options, "--class-map", tmp_path / "map.json")
    run = tmp_path / "run"
    analyzed = invoke("analyze", tmp_path / "m.pt2", "--dataset", f"imagefolder:{tmp_path / 'test'}", *options,
                      "--eps", "0.05", "--no-checks", "--no-report", "--out", run)
    assert analyzed.exit_code == 0, analyzed.output
    return run


@pytest.mark.parametrize("class_map", [None, '{"dog": 0, "cat": 1}'])
def test_harden_trains_an_image_folder_run_on_a_train_folder(tmp_path, class_map):
    run = analyzed_image_folders(tmp_path, {"cat": [(10, 12)] * 5, "dog": [(12, 10)] * 5},
                                 {"cat": [(9, 11)] * 8, "dog": [(11, 9)] * 8}, class_map,
                                 "--image-size", "8", "--attack", "pgd:steps=2")
    hardened = invoke("harden", "--run-dir", run, "--train-data", f"imagefolder:{tmp_path / 'train'}", "--epochs", "1",
                      "--steps", "2", "--mvl-top", "2", "--no-report", "--device", "cpu")
    assert hardened.exit_code == 0, hardened.output
    for name in ("model.pt2", "lsa.csv", "accuracy.csv", "mvl.json", "manifest.json", "samples.csv", "classes.csv",
                 "history.csv", "comparison.csv", "harden.json"):
        assert (run / "hardened" / name).is_file(), name
    assert set(pd.read_csv(run / "hardened" / "comparison.csv")["kind"]) == {"accuracy", "re"}
    settings = json.loads((run / "hardened" / "harden.json").read_text())
    assert settings["train"] == f"imagefolder:{tmp_path / 'train'}"
    reported = invoke("report", "--run", run)
    assert reported.exit_code == 0, reported.output
    assert (run / "report.html").is_file()


@pytest.mark.parametrize("class_map", [None, '["dog", "cat"]'])
def test_harden_refuses_a_train_folder_of_other_classes(tmp_path, class_map):
    run = analyzed_image_folders(tmp_path, {"cat": [(8, 8)] * 4, "dog": [(8, 8)] * 4},
                                 {"bird": [(8, 8)] * 4, "cat": [(8, 8)] * 4}, class_map, "--attack", "fgsm")
    res = invoke("harden", "--run-dir", run, "--train-data", f"imagefolder:{tmp_path / 'train'}", "--epochs", "1",
                 "--mvl-top", "1", "--no-report", "--device", "cpu")
    if class_map:  # the run's class map labels the train folder too: a folder it does not name is refused
        assert_one_line_failure(res, "class folder 'bird' is not in class map")
    else:
        assert_one_line_failure(res, "class folders", "only in the train folder: bird", "only in the run's: dog")
    assert not (run / "hardened").exists()
    res = invoke("harden", "--run-dir", run, "--epochs", "1", "--mvl-top", "1", "--no-report", "--device", "cpu")
    assert_one_line_failure(res, "image folder with no train split", "--train-data imagefolder:DIR")


def test_harden_model_analyzes_an_image_folder_with_its_options_and_workers(tmp_path):
    """harden MODEL takes --image-size and --workers (decoding processes for the analysis, training and
    re-analysis); a run already decodes as its analysis did, so --image-size with --run-dir is refused."""
    from robaudit.models import export_model
    from tests.test_data import write_images

    write_images(tmp_path / "test", {"cat": [(10, 12)] * 5, "dog": [(12, 10)] * 5})
    write_images(tmp_path / "train", {"cat": [(9, 11)] * 8, "dog": [(11, 9)] * 8})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    export_model(tmp_path / "m.pt2", model.eval(), torch.rand(2, 3, 8, 8))
    run = tmp_path / "run"
    res = invoke("harden", tmp_path / "m.pt2", "--dataset", f"imagefolder:{tmp_path / 'test'}", "--image-size", "8",
                 "--workers", "2", "--train-data", f"imagefolder:{tmp_path / 'train'}", "--eps", "0.05",
                 "--epochs", "1", "--steps", "2", "--mvl-top", "1", "--no-report", "--device", "cpu",
                 "--out", run)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "manifest.json").read_text())["dataset"]["image_size"] == 8
    assert json.loads((run / "hardened" / "harden.json").read_text())["workers"] == 2
    res = invoke("harden", "--run-dir", run, "--image-size", "8", "--epochs", "1", "--no-report", "--force")
    assert_one_line_failure(res, "--image-size and --class-map apply to harden MODEL")


def test_threads_sets_torchs_threads_and_refuses_a_bad_count(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = invoke("analyze", MOONS_PT2, "--dataset", "moons", "--samples", "20", "--attack", "fgsm", "--eps", "0.1",
                        "--no-checks", "--no-report", "--threads", "1", "--out", tmp_path / "run")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "-2", "1.5", "many"):
        for command in (["analyze", MOONS_PT2, "--dataset", "moons"], ["harden", "--run", tmp_path / "run"]):
            result = invoke(*command, "--threads", bad, "--out" if command[0] == "analyze" else "--epochs",
                            tmp_path / "other" if command[0] == "analyze" else "1")
            assert_one_line_failure(result, "--threads")
    assert not (tmp_path / "other").exists() and not (tmp_path / "run" / "hardened").exists()


def test_time_estimate_after_the_first_epoch_with_a_fake_clock():
    from types import SimpleNamespace

    from robaudit.training.loop import TimeEstimate

    now, said = [100.0], []
    estimate = TimeEstimate(said.append, after=30.0, clock=lambda: now[0])
    trainer = SimpleNamespace(data=SimpleNamespace(epochs=10))
    estimate.on_epoch_start(trainer, 1)
    now[0] += 12.0
    estimate.on_epoch_end(trainer, 1, {})
    estimate.on_epoch_start(trainer, 2)
    now[0] += 50.0
    estimate.on_epoch_end(trainer, 2, {})  # said once, after the first epoch only
    assert said == ["time estimate: epoch 1/10 took 12 s; about 2 min 18 s to go (9 more epochs and the "
                    "re-analysis), about 2 min 30 s in all"]
    last = TimeEstimate(said.append, clock=lambda: now[0])
    last.on_epoch_start(trainer, 10)
    now[0] += 4000.0
    last.on_epoch_end(trainer, 10, {})
    assert said[-1] == "time estimate: epoch 10/10 took 1 h 6 min; about 0.0 s to go (nothing), about 1 h 6 min in all"
