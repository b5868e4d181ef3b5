"""Evaluation sanity checks (Carlini et al. 2019) and the model checks AutoAttack runs."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from robaudit import labels, sanity, significance, verdict
from robaudit.model_checks import CALL_OVERHEAD, FORWARD_COST, plan_model_checks, run_model_checks
from robaudit.sanity import Check, evaluate

from tests._rundir import model_checks


def frame(rows, n=1000) -> pd.DataFrame:
    """accuracy.csv rows from (attack, eps, accuracy[, kind]) tuples, with a clean row."""
    out = [{"attack": "clean", "eps": math.nan, "accuracy": 0.95, "n_samples": n, "kind": "clean", "norm": None}]
    for r in rows:
        attack, eps, acc = r[:3]
        kind = r[3] if len(r) > 3 else "adversarial"
        out.append({"attack": attack, "eps": eps, "accuracy": acc, "n_samples": n, "kind": kind, "norm": "Linf"})
    return pd.DataFrame(out)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


HEALTHY = [
    ("fgsm", 0.1, 0.40), ("pgd", 0.1, 0.20), ("square", 0.1, 0.30), ("gaussian", 0.1, 0.94, "noise"),
    ("fgsm", 0.3, 0.10), ("pgd", 0.3, 0.01), ("square", 0.3, 0.05), ("gaussian", 0.3, 0.93, "noise"),
    ("worst-case", 0.1, 0.18), ("worst-case", 0.3, 0.0), ("cw", math.nan, 0.0),
]


def test_healthy_evaluation_passes_everything():
    checks = evaluate(frame(HEALTHY), model_checks(), num_classes=10)
    assert [c.name for c in checks] == [sanity.CHANCE, sanity.ITERATIVE, sanity.WHITE_BOX, sanity.MONOTONE, sanity.LARGE_EPS,
                                        sanity.MORE_STEPS, sanity.PROBABILITIES, sanity.GRADIENTS, sanity.DETERMINISM]
    assert {c.name: c.status for c in checks} == {c.name: "pass" for c in checks}, checks
    iterative = by_name(checks)[sanity.ITERATIVE]
    assert "PGD 20.0 % vs FGSM 40.0 %" in iterative.detail  # the numbers behind the status
    assert "PGD 1.0 % vs FGSM 10.0 %" in iterative.detail
    assert all(c.threshold for c in checks)  # every check states what it held the numbers to


def test_chance_level_model_warns():
    """10 classes, 360 samples: chance 10 %, bar 10 % + max(10 points, 3 * sqrt(0.1 * 0.9 / 360) = 4.7) = 20 %."""
    assert sanity.chance_threshold(10, 360) == pytest.approx(0.20)
    assert sanity.chance_threshold(2, 16) == pytest.approx(0.5 + 3 * math.sqrt(0.25 / 16))  # 87.5 %
    at_chance = frame([("pgd", 0.1, 0.05)], n=360)
    at_chance.loc[at_chance["attack"] == "clean", "accuracy"] = 0.094
    check = by_name(evaluate(at_chance, num_classes=10))[sanity.CHANCE]
    assert check.status == "warn" and "9.4 %" in check.detail and "chance is 10.0 %" in check.detail
    assert "20.0 %" in check.threshold
    at_chance.loc[at_chance["attack"] == "clean", "accuracy"] = 0.201
    assert by_name(evaluate(at_chance, num_classes=10))[sanity.CHANCE].status == "pass"
    assert by_name(evaluate(at_chance))[sanity.CHANCE].status == "skip"  # no class count recorded


def test_more_steps_on_a_sample_or_two_is_inconclusive_not_a_warning():
    """PGD-50 leaving 3 of 128 samples robust where PGD-10 leaves 2 is no evidence: at most 3 samples disagree one
    way, so p >= 0.125 whatever the pairing. The run that prompted this: PGD-10 100 %, PGD-50 50 % on 2 samples."""
    mc = model_checks(n_samples=128, attacks={**model_checks()["attacks"], "pgd10": 2 / 128, "pgd50": 3 / 128})
    check = by_name(evaluate(frame(HEALTHY), mc))[sanity.MORE_STEPS]
    assert check.status == "skip" and check.detail.startswith("inconclusive on 128 samples")
    assert "3 vs 2 of 128 samples robust" in check.detail and "not a warning" in check.detail
    assert check.p_value >= 0.125 and "p < 0.01" in check.threshold and "at least 7 samples" in check.threshold
    two = model_checks(n_samples=2, attacks={**model_checks()["attacks"], "pgd10": 1.0, "pgd50": 0.5})
    check = by_name(evaluate(frame(HEALTHY), two))[sanity.MORE_STEPS]
    assert check.status == "skip" and "inconclusive on 2 samples" in check.detail and "fewer than the 7" in check.detail


def test_more_steps_warns_only_when_significant_and_shows_the_p_value():
    base = model_checks()["attacks"]
    # 9 samples robust to PGD-50 but fooled by PGD-10, none the reverse: one-sided p = 0.5 ** 9 = 0.001953125
    masked = model_checks(n_samples=128, attacks={**base, "pgd10": 0.10, "pgd50": 0.10 + 9 / 128,
                                                   "robust_only": {"pgd50": {"pgd10": 9}, "pgd10": {"pgd50": 0}}})
    check = by_name(evaluate(frame(HEALTHY), masked))[sanity.MORE_STEPS]
    assert check.status == "warn" and check.masking and check.p_value == pytest.approx(0.001953125)
    assert "9 samples robust to PGD-50 but fooled by PGD-10, 0 the reverse, exact McNemar p = 0.002" in check.detail
    assert "p = 0.002" in verdict.short(check) and verdict.short(check).endswith(verdict.DEFAULT_MEANING)
    # 6 one way, none the other: p = 0.5 ** 6 = 0.015625, not significant at 0.01
    six = model_checks(n_samples=128, attacks={**base, "pgd10": 0.10, "pgd50": 0.10 + 6 / 128,
                                                "robust_only": {"pgd50": {"pgd10": 6}, "pgd10": {"pgd50": 0}}})
    check = by_name(evaluate(frame(HEALTHY), six))[sanity.MORE_STEPS]
    assert check.status == "skip" and check.p_value == pytest.approx(0.015625) and "p = 0.016" in check.detail


def test_pgd50_finding_more_means_pgd10_had_not_converged_not_masking():
    """PGD-50 fools 20 samples PGD-10 left robust (none the reverse): the battery's PGD had not converged."""
    base = model_checks()["attacks"]
    mc = model_checks(n_samples=128, attacks={**base, "pgd10": 0.50, "pgd50": 0.50 - 20 / 128,
                                               "robust_only": {"pgd50": {"pgd10": 0}, "pgd10": {"pgd50": 20}}})
    check = by_name(evaluate(frame(HEALTHY), mc))[sanity.MORE_STEPS]
    assert check.status == "warn" and not check.masking and check.p_value == pytest.approx(0.5 ** 20)
    assert "had not converged" in check.detail and "not a sign of masked gradients" in check.detail
    assert verdict.short(check).endswith(sanity.NOT_CONVERGED) and "masked" not in verdict.short(check)
    healthy = by_name(evaluate(frame(HEALTHY), model_checks()))[sanity.MORE_STEPS]
    assert verdict.introduced_warnings([healthy], [check]) == []  # not a sign of masking


def test_hardening_introduces_only_significant_masking_warnings():
    base = model_checks()["attacks"]
    before = evaluate(frame(HEALTHY), model_checks())
    noise = evaluate(frame(HEALTHY), model_checks(attacks={**base, "pgd10": 2 / 128, "pgd50": 3 / 128}))
    masked = evaluate(frame(HEALTHY), model_checks(attacks={**base, "pgd10": 0.1, "pgd50": 0.1 + 9 / 128,
                                                            "robust_only": {"pgd50": {"pgd10": 9},
                                                                            "pgd10": {"pgd50": 0}}}))
    assert verdict.introduced_warnings(before, noise) == []  # one sample more: inconclusive, never introduced
    assert verdict.introduced_warnings(before, masked) == [sanity.MORE_STEPS]
    assert verdict.introduced_warnings(masked, masked) == []


def test_the_exact_tests_by_hand():
    assert significance.MIN_PAIRED_SAMPLES == 7  # 0.5 ** 6 = 0.015625 >= 0.01 > 0.5 ** 7
    assert significance.sign_test(7, 0) == pytest.approx(0.0078125, rel=1e-12)  # one-sided: 0.5 ** 7
    assert significance.sign_test(6, 0) == pytest.approx(0.015625, rel=1e-12)
    assert significance.sign_test(8, 1) == pytest.approx(10 / 512, rel=1e-12)  # (C(9, 8) + C(9, 9)) / 2 ** 9
    assert significance.sign_test(0, 5) == 1.0 and significance.sign_test(0, 0) == 1.0
    assert significance.binomial_tail(2, 4, 0.5) == pytest.approx(11 / 16, rel=1e-12)  # (6 + 4 + 1) / 16
    assert significance.rate_test(3, 3, 0.05) == pytest.approx(0.05 ** 3, rel=1e-12)
    # only the robust counts recorded: 12 vs 2 of 128 robust allow at most 2 samples the other way, so
    # p <= P(X >= 12 | X ~ Bin(14, 1/2)) = (C(14, 12) + C(14, 13) + C(14, 14)) / 2 ** 14 = 106 / 16384
    ev = significance.paired(12, 2, 128)
    assert (ev.bad, ev.good, ev.exact) == (12, 2, False) and ev.p == pytest.approx(106 / 16384, rel=1e-12)
    assert significance.paired(12, 2, 128, (11, 1)).p == pytest.approx(13 / 4096, rel=1e-12)  # (C(12, 11) + 1) / 2 ** 12


def test_single_step_stronger_than_iterative_warns():
    rows = [("fgsm", 0.1, 0.20), ("pgd", 0.1, 0.45), ("worst-case", 0.1, 0.2)]
    check = by_name(evaluate(frame(rows)))[sanity.ITERATIVE]
    assert check.status == "warn"
    assert "FGSM" in check.detail and "20.0 %" in check.detail and "45.0 %" in check.detail
    assert "masking gradients" in check.detail


def test_black_box_stronger_than_white_box_warns():
    rows = [("fgsm", 0.1, 0.50), ("pgd", 0.1, 0.40), ("square", 0.1, 0.25)]
    check = by_name(evaluate(frame(rows)))[sanity.WHITE_BOX]
    assert check.status == "warn"
    assert "Square" in check.detail and "25.0 %" in check.detail and "40.0 %" in check.detail


def test_accuracy_increasing_in_eps_warns():
    rows = [("pgd", 0.1, 0.20), ("pgd", 0.2, 0.35), ("pgd", 0.3, 0.10)]
    check = by_name(evaluate(frame(rows)))[sanity.MONOTONE]
    assert check.status == "warn"
    assert "20.0 % at eps 0.1 to 35.0 % at eps 0.2" in check.detail


def test_attack_above_clean_accuracy_warns():
    check = by_name(evaluate(frame([("pgd", 0.1, 0.99)])))[sanity.MONOTONE]
    assert check.status == "warn"  # clean accuracy (95 %) is the curve's value at eps 0


def test_differences_within_one_sample_are_noise():
    rows = [("fgsm", 0.1, 0.300), ("pgd", 0.1, 0.3025), ("pgd", 0.2, 0.3050)]
    checks = by_name(evaluate(frame(rows, n=400)))
    for name in (sanity.ITERATIVE, sanity.MONOTONE):
        assert checks[name].status == "skip" and checks[name].detail.startswith("inconclusive on 400 samples")
        assert checks[name].p_value > 0.4


def test_large_eps_accuracy_not_near_zero_warns():
    mc = model_checks(attacks={**model_checks()["attacks"], "pgd_large": 0.31})
    check = by_name(evaluate(frame(HEALTHY), mc))[sanity.LARGE_EPS]
    assert check.status == "warn"
    assert "31.0 %" in check.detail and "eps 0.5" in check.detail


def test_large_eps_from_the_battery_without_model_checks():
    rows = [("pgd", 0.1, 0.2), ("pgd", 0.5, 0.4)]
    check = by_name(evaluate(frame(rows)))[sanity.LARGE_EPS]
    assert check.status == "warn" and "40.0 %" in check.detail
    assert by_name(evaluate(frame([("pgd", 0.1, 0.2)])))[sanity.LARGE_EPS].status == "skip"


def test_more_steps_helping_the_model_warns():
    mc = model_checks(attacks={**model_checks()["attacks"], "pgd10": 0.10, "pgd50": 0.25})
    check = by_name(evaluate(frame(HEALTHY), mc))[sanity.MORE_STEPS]
    assert check.status == "warn" and "PGD-10 10.0 %, PGD-50 25.0 %" in check.detail


def test_probe_fgsm_beating_pgd_warns():
    mc = model_checks(attacks={**model_checks()["attacks"], "fgsm": 0.05, "pgd10": 0.30, "pgd50": 0.30})
    assert by_name(evaluate(None, mc))[sanity.ITERATIVE].status == "warn"


def test_missing_inputs_skip():
    checks = evaluate(None, None)
    assert {c.status for c in checks} == {"skip"}
    assert all(c.detail for c in checks)


def test_model_check_flags_from_checks_json():
    mc = model_checks(outputs={"finite": True, "min": 0.0, "max": 0.9, "max_row_sum_error": 1e-7},
                      gradients={"error": None, "finite": True, "zero_fraction": 0.25},
                      determinism={"max_rel_diff": 0.03})
    checks = by_name(evaluate(frame(HEALTHY), mc))
    assert checks[sanity.PROBABILITIES].status == "warn" and "softmax" in checks[sanity.PROBABILITIES].detail
    assert checks[sanity.GRADIENTS].status == "warn" and "25.0 %" in checks[sanity.GRADIENTS].detail
    assert checks[sanity.DETERMINISM].status == "warn" and "0.03" in checks[sanity.DETERMINISM].detail


# ----------------------------------------------------------------------------- run_model_checks


class Round(nn.Module):
    def forward(self, x):
        return torch.round(x * 4) / 4


class Sign(nn.Module):
    def forward(self, x):
        return torch.sign(x - 0.5)


class Noisy(nn.Module):
    """Randomness that eval mode does not switch off."""

    def forward(self, x):
        return x + 0.1 * torch.rand_like(x)


def mlp(*pre, post=()):
    torch.manual_seed(0)
    return nn.Sequential(*pre, nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), *post)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(200, 1, 8, 8, generator=g), torch.randint(0, 10, (200,), generator=g)


def statuses(model, batch, **kw):
    x, y = batch
    result = run_model_checks(model, x, y, device="cpu", seed=0, eps_max=0.1, **kw)
    json.dumps(result, allow_nan=False)  # checks.json is plain JSON
    return result, {c.name: c.status for c in evaluate(None, result)}


def test_plain_mlp_passes_model_checks(batch):
    model = mlp()
    model.train()
    result, status = statuses(model, batch)
    assert result["n_samples"] == 128  # at most 128 samples
    assert status[sanity.PROBABILITIES] == status[sanity.GRADIENTS] == status[sanity.DETERMINISM] == "pass"
    assert status[sanity.LARGE_EPS] == "skip" and "pgd_large" not in result["attacks"]  # never beyond eps_max
    assert status[sanity.ITERATIVE] == status[sanity.MORE_STEPS] == "pass"
    assert model.training  # the caller's mode is restored


def test_softmax_output_is_flagged(batch):
    _, status = statuses(mlp(post=(nn.Softmax(dim=1),)), batch)
    assert status[sanity.PROBABILITIES] == "warn"


@pytest.mark.parametrize("step", [Round(), Sign()], ids=["round", "sign"])
def test_zero_gradients_are_flagged(batch, step):
    result, status = statuses(mlp(step), batch)
    assert result["gradients"]["zero_fraction"] == 1.0
    assert status[sanity.GRADIENTS] == "warn"


def test_detached_graph_is_flagged(batch):
    class Detach(nn.Module):
        def forward(self, x):
            return x.detach()

    result, status = statuses(mlp(Detach()), batch)
    assert status[sanity.GRADIENTS] == "warn"


def test_randomized_forward_is_flagged(batch):
    result, status = statuses(mlp(Noisy()), batch)
    assert result["determinism"]["max_rel_diff"] > 0
    assert status[sanity.DETERMINISM] == "warn"


def test_nonfinite_outputs_are_flagged(batch):
    class Inf(nn.Module):
        def forward(self, x):
            return x / (x - x)

    x, y = batch
    result = run_model_checks(mlp(Inf()), x, y, device="cpu", seed=0, eps_max=None)
    assert by_name(evaluate(None, result))[sanity.GRADIENTS].status == "warn"


def test_inputs_outside_unit_range_skip_the_default_attacks(batch):
    x, y = batch
    result = run_model_checks(mlp(), x * 4 - 2, y, device="cpu", seed=0, eps_max=0.1)
    assert "not [0, 1]" in result["attacks"]["skipped"]
    checks = by_name(evaluate(None, result))
    assert checks[sanity.MORE_STEPS].status == "skip" and "not [0, 1]" in checks[sanity.MORE_STEPS].detail


def test_custom_attack_fn_is_used(batch):
    calls = []

    def attack_fn(model, x, y, *, kind, eps, steps):
        calls.append((kind, eps, steps))
        return x

    x, y = batch
    result = run_model_checks(mlp(), x, y, device="cpu", seed=0, eps_max=0.2, attack_fn=attack_fn)
    assert sorted(calls) == sorted([("fgsm", 0.2, 1), ("pgd", 0.2, 10), ("pgd", 0.2, 50)])  # only at eps_max
    assert result["attacks"]["pgd50"] == result["clean_accuracy"]


def test_model_checks_are_seeded(batch):
    x, y = batch
    a = run_model_checks(mlp(), x, y, device="cpu", seed=3, eps_max=0.1)
    b = run_model_checks(mlp(), x, y, device="cpu", seed=3, eps_max=0.1)
    assert a["attacks"] == b["attacks"]


def test_eps_keeps_the_users_fraction():
    assert [labels.format_eps(v) for v in (0.1, 0.05, 8 / 255, 2 / 255, 1 / 3, 0.0313725)] == [
        "0.1", "0.05", "8/255", "2/255", "1/3", "0.03137"]
    assert labels.format_eps(float(repr(8 / 255)[:-1])) == "8/255"  # one digit less after a CSV round trip


# ----------------------------------------------------------------------------- proportionate checks


def specs(*texts, eps=(0.05, 0.1)):
    from robaudit import attacks as atk

    return atk.expand([atk.parse(t) for t in texts], list(eps))


def test_plan_uses_the_batterys_largest_linf_eps_and_reuses_its_pgd10_and_fgsm():
    plan = plan_model_checks(specs("fgsm", "pgd", "pgdl2:eps=2.0", "pgd:eps=0.08,steps=20"), n_battery=1000,
                             num_classes=10)
    assert plan.eps_max == 0.1  # not the L2 eps 2.0, not a larger default
    assert sorted(plan.reuse) == ["fgsm", "pgd10"]
    f = FORWARD_COST
    assert plan.check_cost == pytest.approx(2 * f + 1 + 50 + f)  # determinism, gradient, PGD-50 only


def test_plan_keeps_the_checks_within_a_tenth_of_the_battery():
    # PGD-10 alone at one eps: (10 + 2/3) passes per sample; the checks reuse PGD-10 and run FGSM and PGD-50.
    # Each pass over a batch of b costs b + CALL_OVERHEAD: 8 batches of 128 for the battery, one of n for the checks.
    f, k = FORWARD_COST, CALL_OVERHEAD
    plan = plan_model_checks(specs("pgd", eps=(0.1,)), n_battery=1024, num_classes=10, batch_size=128)
    battery = f + 10 + f
    check = 2 * f + 1 + (1 + f) + (50 + f)
    budget = 0.1 * battery * 8 * (128 + k)
    assert plan.battery_cost == pytest.approx(battery) and plan.budget == pytest.approx(budget)
    assert plan.attacks and plan.n_samples == int(budget // check) - k == 7
    assert (plan.n_samples + k) * plan.check_cost <= budget < (plan.n_samples + 1 + k) * plan.check_cost
    # a long battery buys the cap of 128
    assert plan_model_checks(specs("pgd:steps=100", eps=(0.1,)), n_battery=10_000,
                             num_classes=10).n_samples == 128
    assert not plan.over_budget and plan.to_dict()["min_samples"] == 7
    # too short a battery to pay for 7 samples: raised to 7 anyway, beyond the budget, and the plan says so
    short = plan_model_checks(specs("pgd", eps=(0.1,)), n_battery=256, num_classes=10)
    assert short.attacks and short.n_samples == significance.MIN_PAIRED_SAMPLES == 7 and short.over_budget
    assert (short.n_samples + k) * short.check_cost > short.budget
    assert "raised to the 7 samples" in short.to_dict()["note"] and "more than 10 %" in short.to_dict()["note"]


def test_plan_never_gives_the_attack_probes_fewer_samples_than_a_conclusive_comparison_needs():
    plan = plan_model_checks(specs("gaussian", "fgsm", eps=(0.1,)), n_battery=1000, num_classes=10)
    assert plan.attacks and plan.n_samples == 7 and plan.over_budget and plan.reuse == {"fgsm": 1}
    few = plan_model_checks(specs("fgsm", eps=(0.1,)), n_battery=6, num_classes=10)  # 6 samples: never conclusive
    assert not few.attacks and few.reuse == {} and "fewer than the 7 samples" in few.note
    assert plan_model_checks(specs("gaussian", eps=(0.1,)), n_battery=2, num_classes=10).n_samples == 0


def test_model_checks_read_reused_outcomes_instead_of_attacking(batch):
    calls = []

    def attack_fn(model, x, y, *, kind, eps, steps):
        calls.append((kind, steps))
        return x

    x, y = batch
    ok = torch.zeros(len(x), dtype=torch.bool)
    ok[:3] = True
    result = run_model_checks(mlp(), x, y, device="cpu", seed=0, eps_max=0.1, attack_fn=attack_fn, max_samples=10,
                              reuse={"pgd10": ok[:10], "fgsm": ok[:10]})
    assert calls == [("pgd", 50)]
    a = result["attacks"]
    assert result["n_samples"] == 10 and a["pgd10"] == 0.3 and a["fgsm"] == 0.3
    assert a["pgd10_source"] == a["fgsm_source"] == "battery"


def test_battery_comparisons_read_the_recorded_pairs():
    """FGSM 20 %, PGD 22 % of 1000: 20 samples more robust to PGD. Recorded pairs decide: 20 one way and none the
    other is significant; the counts alone allow 200 the other way (p <= 0.34), which is not."""
    rows = [("fgsm", 0.1, 0.20), ("pgd", 0.1, 0.22)]
    alone = by_name(evaluate(frame(rows)))[sanity.ITERATIVE]
    assert alone.status == "skip" and "for any pairing" in alone.detail
    pairs = {"rows": [["clean", None, None], ["fgsm", 0.1, "Linf"], ["pgd", 0.1, "Linf"]],
             "robust_only": [[0, 750, 730], [0, 0, 0], [0, 20, 0]]}
    check = by_name(evaluate(frame(rows), {"battery_pairs": pairs}))[sanity.ITERATIVE]
    assert check.status == "warn" and check.p_value == pytest.approx(0.5 ** 20)
    assert "20 samples robust to PGD but fooled by FGSM, 0 the reverse" in check.detail
    broken = by_name(evaluate(frame(rows), {"battery_pairs": {"rows": [1], "robust_only": "x"}}))[sanity.ITERATIVE]
    assert broken.status == "skip"  # a malformed record is no record


def test_analyze_run_sizes_its_checks_and_reuses_the_batterys_pgd(tmp_path):
    from robaudit.examples.models import MoonsMLP
    from robaudit.models import save_checkpoint
    from robaudit.stages.analyze import analyze_run

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "mlp.pt", MoonsMLP(hidden=8), arch="robaudit.examples.models:MoonsMLP",
                           arch_kwargs={"hidden": 8})
    run = analyze_run(path, "moons", out=tmp_path / "run", samples=500, attacks=["fgsm", "pgd"], eps=[0.05, 0.1],
                      report=False, seed=1)
    checks = json.loads((run.path / "checks.json").read_text())
    plan = plan_model_checks(run.result.attacks, n_battery=500, num_classes=2, batch_size=128)
    assert 1 <= checks["n_samples"] == plan.n_samples == checks["plan"]["n_samples"] < 128
    assert checks["attacks"]["eps_max"] == 0.1 and checks["plan"]["reused"] == ["fgsm", "pgd10"]
    pgd = [i for i, s in enumerate(run.result.attacks) if s.name == "pgd" and s.eps == 0.1][0]
    ok = run.result.outcomes[pgd]
    assert len(ok) == checks["n_samples"]
    assert checks["attacks"]["pgd10"] == pytest.approx(float(ok.double().mean()))
    assert checks["attacks"]["pgd10_source"] == "battery"


# ----------------------------------------------------------------------------- significance end to end


def test_a_healthy_model_with_the_default_battery_warns_on_nothing_below_the_minimum(tmp_path):
    """The example digits CNN on 48 samples: the share of the battery buys fewer than 7 samples of model checks, so
    the plan raises them to 7 and says so; no check warns, and a warning could only come with p < 0.01."""
    from robaudit import examples
    from robaudit.rundir import read_run
    from robaudit.stages.analyze import analyze_run

    run = analyze_run(examples.path("digits_cnn.pt2"), "digits", out=tmp_path / "run", samples=48, report=False,
                      battery="fast")  # the original battery: its share buys fewer samples than the minimum
    written = json.loads((run.path / "checks.json").read_text())
    plan = written["plan"]
    assert written["n_samples"] == plan["n_samples"] == plan["min_samples"] == significance.MIN_PAIRED_SAMPLES
    assert plan["over_budget"] and "raised to the 7 samples" in plan["note"]
    assert set(written["attacks"]["robust_only"]) == {"fgsm", "pgd10", "pgd50"}  # the probes' per-sample pairs
    assert written["battery_pairs"]["rows"][0] == ["clean", None, None]
    checks = verdict.checks_of(read_run(run.path))
    assert [c.name for c in checks if c.status == "warn"] == []
    assert all(c.p_value is not None and c.p_value < significance.ALPHA for c in checks if c.status == "warn")


class _Misleading(torch.autograd.Function):
    """Identity forward; backward passes the true gradient only at inputs on the 1/8 grid of the data, and its
    opposite anywhere else: FGSM (from the clean input) works, PGD (from a random start) climbs the wrong way."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        on_grid = ((x * 8 - (x * 8).round()).abs() < 1e-4).flatten(1).all(1)
        return grad * torch.where(on_grid, 1.0, -1.0).view(-1, *[1] * (grad.dim() - 1))


class Misleading(nn.Module):
    def forward(self, x):
        return _Misleading.apply(x)


def test_a_model_with_misleading_gradients_still_warns_with_its_p_value():
    model = mlp(Misleading()).eval()
    x = torch.randint(0, 9, (64, 1, 8, 8), generator=torch.Generator().manual_seed(1)).float() / 8
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample classified correctly
    result = run_model_checks(model, x, y, device="cpu", seed=0, eps_max=0.1, max_samples=32)
    a = result["attacks"]
    assert a["fgsm"] < 0.5 and a["pgd10"] == a["pgd50"] == 1.0
    checks = by_name(evaluate(None, result))
    iterative = checks[sanity.ITERATIVE]
    fooled = a["robust_only"]["pgd10"]["fgsm"]  # robust to PGD-10, fooled by FGSM; never the reverse
    assert iterative.status == "warn" and iterative.p_value == pytest.approx(0.5 ** fooled, rel=1e-9)
    assert (f"{fooled} samples robust to PGD-10 but fooled by FGSM, 0 the reverse, exact McNemar p = "
            in iterative.detail)
    assert checks[sanity.GRADIENTS].status == "pass"  # only the comparison shows it
    assert f"p = {iterative.p_value:.2g}" in verdict.short(iterative)


def test_tampered_pairs_and_counts_decide_nothing_and_cost_nothing():
    base = model_checks()["attacks"]
    forged = model_checks(n_samples=128, attacks={**base, "pgd10": 2 / 128, "pgd50": 3 / 128,
                                                   "robust_only": {"pgd50": {"pgd10": 10 ** 15}, "pgd10": {"pgd50": 0}}})
    check = by_name(evaluate(frame(HEALTHY), forged))[sanity.MORE_STEPS]
    assert check.status == "skip" and "for any pairing" in check.detail  # more pairs than samples: no record
    huge = frame([("fgsm", 0.1, 0.20), ("pgd", 0.1, 0.2000001)], n=2 ** 53)  # ~9e8 samples more: still answered
    assert by_name(evaluate(huge))[sanity.ITERATIVE].status in ("skip", "warn")
    assert significance.binomial_tail(2 ** 40, 2 ** 41, 0.5) == pytest.approx(0.5, abs=1e-6)
