"""The robustness gate (--fail-under, --max-re, --strict), robaudit check, --json and the sanity verdict in
the terminal, on a gradient-masking model built here and on the healthy example."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from robaudit import gate, sanity, verdict
from robaudit.errors import RobauditError
from robaudit.rundir import Run
from tests.test_cli import DIGITS_PT2, ROOT, assert_one_line_failure, invoke

BATTERY = ["--dataset", "digits", "--samples", "60", "--attack", "fgsm", "--attack", "pgd", "--attack",
           "square:n_queries=100", "--eps", "0.2"]
RUN_FILES = {"lsa.csv", "accuracy.csv", "mvl.json", "manifest.json", "checks.json", "report.html"}


# -- parsing and evaluation against a hand-made run --------------------------------------------
def tiny_run() -> Run:
    acc = pd.DataFrame([
        {"attack": "clean", "eps": None, "accuracy": 0.95, "n_samples": 100, "kind": "clean", "norm": None},
        {"attack": "pgd", "eps": 8 / 255, "accuracy": 0.40, "n_samples": 100, "kind": "adversarial", "norm": "Linf"},
        {"attack": "pgd", "eps": 16 / 255, "accuracy": 0.10, "n_samples": 100, "kind": "adversarial", "norm": "Linf"},
        {"attack": "worst-case", "eps": 8 / 255, "accuracy": 0.38, "n_samples": 100, "kind": "adversarial",
         "norm": "Linf"},
        {"attack": "worst-case", "eps": 16 / 255, "accuracy": 0.08, "n_samples": 100, "kind": "adversarial",
         "norm": "Linf"},
    ])
    lsa = pd.DataFrame([
        {"layer": "conv1", "attack": "pgd", "eps": 16 / 255, "re_mean": 0.30},
        {"layer": "relu1", "attack": "pgd", "eps": 16 / 255, "re_mean": 0.85},
        {"layer": "relu1", "attack": "pgd", "eps": 8 / 255, "re_mean": 0.95},  # not the ranking eps
        {"layer": "fc", "attack": "fgsm", "eps": 16 / 255, "re_mean": 2.0},  # not the ranking attack
    ])
    mvl = {"attack": "pgd", "eps": 16 / 255, "metric": "re_mean", "layers": [{"layer": "relu1", "score": 0.85}]}
    return Run(Path("tiny"), lsa, acc, mvl, {"dataset": {"num_classes": 10}}, None)


def test_bars_parse_every_form():
    bars = gate.parse_bars("worst-case=0.40, clean=90%, pgd@8/255=0.35,pgd(steps=50,alpha=0.01)@0.1=0.2,sanity",
                           max_re=0.8)
    assert [(b.kind, b.attack, b.eps, b.value) for b in bars] == [
        ("accuracy", "worst-case", None, 0.40), ("accuracy", "clean", None, 0.90),
        ("accuracy", "pgd", 8 / 255, 0.35), ("accuracy", "pgd(steps=50,alpha=0.01)", 0.1, 0.2),
        ("sanity", "", None, None), ("max-re", "", None, 0.8)]
    assert bars[2].name == "pgd@8/255=0.35"  # the user's fraction is kept
    assert [b.kind for b in gate.parse_bars(None, strict=True)] == ["sanity"]


@pytest.mark.parametrize("text, needle", [("worst-case", "metric=value"), ("clean=1.5", "between 0 and 1"),
                                          ("pgd@0=0.3", "eps"), ("clean=abc", "not a number")])
def test_bad_bars_fail_in_one_line(text, needle):
    with pytest.raises(RobauditError, match=needle):
        gate.parse_bars(text)


def test_bars_against_a_hand_made_run():
    run = tiny_run()
    out = gate.evaluate(gate.parse_bars("worst-case=0.08,clean=0.96,pgd@8/255=0.40,pgd=0.11", max_re=0.85), run, [])
    # worst-case and pgd without an eps are read at the largest eps (16/255)
    assert [(o.met, o.value) for o in out] == [(True, 0.08), (False, 0.95), (True, 0.40), (False, 0.10),
                                               (True, 0.85)]
    assert "relu1" in out[-1].text  # the layer with the largest RE under the ranking attack at its eps
    assert not gate.evaluate(gate.parse_bars(None, max_re=0.849), run, [])[0].met


@pytest.mark.parametrize("text", ["cw=0.5", "deepfool@0.1=0.2", "worst-case=0.3,cw(c=2)=50%"])
def test_no_accuracy_bar_on_a_minimal_perturbation_attack(text):
    """CW and DeepFool leave no robust accuracy: a bar on one is refused in one line naming the metrics they have."""
    with pytest.raises(RobauditError, match="success rate and the perturbation size") as err:
        gate.parse_bars(text)
    assert "\n" not in str(err.value) and "minimal perturbation" in str(err.value)


def test_a_bar_on_a_metric_the_run_lacks_names_what_it_has():
    with pytest.raises(RobauditError, match="clean, pgd, worst-case"):
        gate.evaluate(gate.parse_bars("autoattack=0.5"), tiny_run(), [])
    with pytest.raises(RobauditError, match="8/255, 16/255"):
        gate.evaluate(gate.parse_bars("pgd@0.5=0.1"), tiny_run(), [])


def test_sanity_bar_and_introduced_warnings():
    ok = sanity.Check("A", "pass", "fine")
    warn = sanity.Check(sanity.MORE_STEPS, "warn", "PGD-50 leaves 2.3 % but PGD-10 1.6 %: a stronger attack...")
    assert gate.evaluate([gate.Bar("sanity")], tiny_run(), [ok])[0].met
    assert not gate.evaluate([gate.Bar("sanity")], tiny_run(), [ok, warn])[0].met
    assert verdict.introduced_warnings([ok, sanity.Check(sanity.MORE_STEPS, "pass", "")], [ok, warn]) == \
        [sanity.MORE_STEPS]
    assert verdict.introduced_warnings([warn], [warn]) == []
    assert verdict.verdict_line([ok, warn]) == "sanity checks: 1 warn, 1 pass"
    assert verdict.short(warn) == f"{sanity.MORE_STEPS}: PGD-50 leaves 2.3 % but PGD-10 1.6 % -> " \
                                  f"{verdict.DEFAULT_MEANING}"


# -- end to end: a model whose input quantization zeroes its gradients ----------------------------
class Quantized(nn.Module):
    """Rounds its input to 1/8 steps before the CNN: input gradients are zero, so gradient attacks fail."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)


@pytest.fixture(scope="module")
def masked_pt2(tmp_path_factory):
    from robaudit.models import export_model, load_model

    cnn = load_model(ROOT / "examples" / "digits_cnn.pt").module
    return export_model(tmp_path_factory.mktemp("masked") / "masked.pt2", Quantized(cnn).eval(),
                        torch.rand(2, 1, 8, 8))


@pytest.fixture(scope="module")
def masked_run(masked_pt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "masked"
    return out, invoke("analyze", masked_pt2, *BATTERY, "--out", out, "--fail-under", "sanity")


def test_the_terminal_names_the_warning_and_the_gate_exits_3(masked_run):
    out, result = masked_run
    assert result.exit_code == gate.EXIT_MISSED, result.output
    lines = result.stdout.splitlines()
    verdict_line = next(l for l in lines if l.startswith("sanity checks:"))
    assert "warn" in verdict_line and "all pass" not in verdict_line
    assert any(l.startswith("  warn: White-box attacks at least as strong as black-box ones") and "masked" in l
               for l in lines), result.stdout
    assert any(f"{out / 'report.html'}#sanity" in l for l in lines)
    assert any(l.startswith("MISSED: sanity") for l in lines)
    assert RUN_FILES <= {p.name for p in out.iterdir()}  # a missed bar still writes the whole run


def test_json_carries_the_same_verdict_and_nothing_else(masked_pt2, masked_run, tmp_path):
    _, text = masked_run
    result = invoke("analyze", masked_pt2, *BATTERY, "--out", tmp_path / "run", "--json", "--strict")
    assert result.exit_code == gate.EXIT_MISSED
    obj = json.loads(result.stdout)  # stdout holds the JSON object only
    warned = [w["check"] for w in obj["sanity"]["warnings"]]
    assert warned and all(f"  warn: {w['line']}" in text.stdout for w in obj["sanity"]["warnings"])
    assert obj["passed"] is False and obj["bars"] == [
        {"bar": "sanity", "met": False, "value": float(len(warned)), "text": obj["bars"][0]["text"]}]
    assert obj["run_dir"] == str(tmp_path / "run")
    assert {"accuracy", "worst_case", "mvl", "clean_accuracy"} <= set(obj)
    assert obj["worst_case"][0]["eps"] == pytest.approx(0.2)


def test_check_applies_the_same_bars_without_recomputing(masked_run):
    out, _ = masked_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    strict = invoke("check", out, "--strict")
    assert strict.exit_code == gate.EXIT_MISSED and "MISSED: sanity" in strict.stdout
    as_json = json.loads(invoke("check", out, "--json", "--fail-under", "clean=0.5").stdout)
    assert as_json["passed"] is True and as_json["bars"][0]["met"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    missing = invoke("check", out, "--fail-under", "autoattack=0.5")
    assert_one_line_failure(missing, "not in this run")
    assert missing.stdout == ""  # the bar is held against the run before the summary is printed
    assert invoke("check", out, "--fail-under", "clean=0.5", "--max-re", "1000").exit_code == 0


def test_a_healthy_model_gets_all_pass_and_exit_0(tmp_path):
    result = invoke("analyze", DIGITS_PT2, *BATTERY, "--out", tmp_path / "run", "--strict",
                    "--fail-under", "clean=0.9")
    assert result.exit_code == 0, result.output
    assert any(l.startswith("sanity checks: all pass") for l in result.stdout.splitlines())
    assert "bar met: clean=0.9" in result.stdout and "MISSED" not in result.stdout


def test_bars_are_checked_before_the_analysis(tmp_path):
    result = invoke("analyze", tmp_path / "missing.pt2", "--dataset", "digits", "--fail-under", "clean=2")
    assert_one_line_failure(result, "between 0 and 1")
    minimal = invoke("analyze", tmp_path / "missing.pt2", "--dataset", "digits", "--fail-under", "cw=0.5")
    assert_one_line_failure(minimal, "success rate and the perturbation size")


def test_harden_json_and_gate_speak_of_the_hardened_model(tmp_path):
    from tests.test_cli import MOONS_PT2

    out = tmp_path / "run"
    assert invoke("analyze", MOONS_PT2, "--dataset", "moons", "--attack", "fgsm", "--eps", "0.1", "--samples", "40",
                  "--no-report", "--out", out).exit_code == 0
    result = invoke("harden", "--run", out, "--epochs", "1", "--steps", "1", "--no-report", "--json",
                    "--fail-under", "clean=0.5")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["run_dir"] == str(out / "hardened") and obj["original_run_dir"] == str(out)
    assert isinstance(obj["introduced_warnings"], list) and obj["passed"] is True
    assert Path(obj["hardened_model"]).is_file()
    missed = invoke("harden", "--run", out, "--epochs", "1", "--steps", "1", "--no-report", "--force",
                    "--fail-under", "clean=1")
    assert missed.exit_code == gate.EXIT_MISSED and "MISSED: clean=1" in missed.stdout
    assert (out / "hardened" / "harden.json").exists()
