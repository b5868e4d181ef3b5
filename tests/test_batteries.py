"""The named batteries (--battery fast|default|standard), the APGD kinds they add, and what a run records of them."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import make_cnn, make_data
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit import attacks as atk
from robaudit import examples
from robaudit.batteries import BATTERIES, BatteryName, battery, check_standard, describe
from robaudit.cli import main
from robaudit.errors import RobauditError
from robaudit.labels import WORST_CASE, WORST_CASE_MEANING
from robaudit.model_checks import attack_cost
from robaudit.runschema import check_document
from robaudit.stages.analyze import analyze_run

# the battery every analysis ran before batteries were named: --battery fast must stay exactly this
ORIGINAL = ("fgsm", "pgd", "cw", "square:n_queries=200", "gaussian", "uniform", "saltpepper")


def test_fast_is_the_original_battery_configuration_for_configuration():
    assert BATTERIES[BatteryName.FAST] == ORIGINAL
    eps = [0.05, 0.1, 0.2]
    got = [s.spec_string() for s in atk.expand(battery(BatteryName.FAST, eps), eps)]
    want = [s.spec_string() for s in atk.expand([atk.parse(s) for s in ORIGINAL], eps)]
    want = [w.replace("square:n_queries=200", "square:eps=0.2,n_queries=200") for w in want
            if not w.startswith("square:eps=0.05") and not w.startswith("square:eps=0.1,")]
    assert got == want


def test_default_adds_the_apgd_pair_to_the_fast_battery():
    default = battery(BatteryName.DEFAULT)
    assert {s.name for s in default} == {s.name for s in battery(BatteryName.FAST)} | {"apgd", "apgdt"}
    assert [s.name for s in battery(BatteryName.STANDARD)] == ["autoattack"]
    assert battery(BatteryName.STANDARD)[0].param_dict["version"] == "standard"


def test_battery_names_parse_once_and_refuse_others():
    assert BatteryName.of("Fast") is BatteryName.FAST and BatteryName.of(BatteryName.STANDARD) is BatteryName.STANDARD
    with pytest.raises(RobauditError, match="not a battery: choose from fast, default, standard"):
        BatteryName.of("strong")
    assert describe(None).startswith("not recorded") and describe("custom").startswith("custom")
    assert describe("default").startswith("default (") and "APGD-T" in describe("default")


@pytest.mark.parametrize("num_classes, shape", [(3, (1, 8, 8)), (10, (2,))])
def test_standard_is_refused_in_one_line_where_autoattack_cannot_run(num_classes, shape):
    with pytest.raises(RobauditError, match="--battery default") as info:
        check_standard(num_classes, shape)
    assert "\n" not in str(info.value)
    check_standard(4, (1, 8, 8))  # enough classes, images: no error


# -- the APGD kinds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_classes():
    model = make_cnn(3, num_classes=4).eval()
    data = make_data(model, 24, seed=1, num_classes=4)
    with torch.no_grad():
        y = model(data.x).argmax(1)
    return model, data.x, y


@pytest.mark.parametrize("text", ["apgd:steps=10", "apgd:steps=10,loss=dlr", "apgdt:steps=10,targets=3",
                                  "apgd:norm=l2,steps=10"])
def test_apgd_kinds_build_and_lower_accuracy(four_classes, text):
    model, x, y = four_classes
    spec = atk.expand([atk.parse(text)], [0.1] if "l2" not in text else None)[0]
    x_adv = atk.build(spec, model, num_classes=4, seed=0)(x, y)
    delta = (x_adv - x).flatten(1)
    bound = delta.abs().amax(1) if spec.norm == "Linf" else delta.norm(dim=1)
    assert (bound <= spec.eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < 1.0  # the model starts at 100 % on its own labels


@pytest.mark.parametrize("num_classes, name, loss", [(2, "apgdt", "ce"), (3, "apgdt", "dlr"), (2, "apgd", "ce")])
def test_class_count_fallbacks_are_the_documented_substitutions(num_classes, name, loss):
    """APGD-T needs 4 logits and DLR 3: on 3 classes APGD-T runs as APGD-DLR, on 2 every loss as APGD-CE."""
    import torchattacks

    model = make_cnn(0, num_classes=num_classes).eval()
    spec = atk.expand([atk.parse(f"{name}:steps=5" + (",loss=dlr" if name == "apgd" else ""))], [0.1])[0]
    built = atk.build(spec, model, num_classes=num_classes)
    assert type(built.image_attack) is torchattacks.APGD and built.image_attack.loss == loss
    x = make_data(model, 6, num_classes=num_classes).x
    with torch.no_grad():
        y = model(x).argmax(1)
    assert built(x, y).shape == x.shape  # runs where torchattacks' own would index a missing logit
    assert (("runs as APGD-DLR" if num_classes == 3 else "as APGD-CE") in atk.KINDS[name].description
            or "on 2 it runs as CE" in atk.KINDS[name].description)


def test_apgd_on_vectors_runs_through_the_same_attack():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.rand(32, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
    spec = atk.expand([atk.parse("apgdt:steps=10")], [0.2])[0]
    fn = atk.build(spec, model, num_classes=4)
    atk.reseed(fn, 5)
    x_adv = fn(x, y)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.2 + 1e-6
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < 1.0
    atk.reseed(fn, 5)
    assert torch.equal(fn(x, y), x_adv)  # reseeded: the same draws


def test_the_checks_plan_counts_the_apgd_steps():
    for text in ("apgd:steps=25", "apgdt:steps=25,targets=3"):
        assert 25 <= attack_cost(atk.parse(text), num_classes=10) < 26


# -- what a run records ---------------------------------------------------------------------------


def test_fast_battery_runs_exactly_the_original_configurations(tmp_path):
    run = analyze_run(examples.path("moons_mlp.pt2"), "moons", out=tmp_path / "run", samples=8, battery="fast",
                      checks=False, report=False)
    eps = run.manifest["eps"]
    assert run.manifest["battery"] == "fast"
    assert run.manifest["configurations"] == [s.spec_string() for s in atk.expand(battery(BatteryName.FAST, eps), eps)]


def test_standard_runs_autoattack_and_the_report_names_the_battery(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["analyze", str(examples.path("digits_cnn.pt2")), "--dataset", "digits",
                                       "--samples", "8", "--eps", "0.3", "--battery", "standard", "--no-checks",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["battery"] == "standard" and manifest["configurations"] == ["autoattack:eps=0.3"]
    assert check_document(manifest, "manifest.json", out / "manifest.json")["battery"] == "standard"
    assert "battery: standard (AutoAttack standard" in result.output
    assert f"worst case = {WORST_CASE_MEANING}" in result.output
    report = (out / "report.html").read_text()
    assert "Battery: standard (AutoAttack standard" in report and WORST_CASE_MEANING in report


def test_battery_and_attack_together_are_refused(tmp_path):
    result = CliRunner().invoke(main, ["analyze", str(examples.path("moons_mlp.pt2")), "--dataset", "moons",
                                       "--battery", "fast", "--attack", "pgd", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "give either --battery or --attack" in result.output
    assert not (tmp_path / "run").exists()


def test_a_run_without_a_battery_reads_as_before(tmp_path):
    manifest = {"robaudit_version": "0.1", "seed": 0, "batch_size": 128, "attacks": ["pgd"], "files": {}}
    assert "battery" not in check_document(manifest, "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(RobauditError, match="battery is not one of"):
        check_document({**manifest, "battery": "strong"}, "manifest.json", tmp_path / "manifest.json")


def test_worst_case_is_never_above_any_single_attack(tmp_path):
    run = analyze_run(examples.path("digits_cnn.pt2"), "digits", out=tmp_path / "run", samples=24, eps=[0.1],
                      checks=False, report=False)
    acc = pd.read_csv(tmp_path / "run" / "accuracy.csv")
    bounded = acc[(acc["kind"] == "adversarial") & acc["eps"].notna() & (acc["attack"] != WORST_CASE)]
    worst = acc.loc[acc["attack"] == WORST_CASE, "accuracy"].iloc[0]
    assert {"apgd", "apgdt", "pgd", "fgsm", "square"} <= {a.split("(")[0] for a in bounded["attack"]}
    assert worst <= bounded["accuracy"].min() + 1e-12
    assert run.manifest["battery"] == "default"
