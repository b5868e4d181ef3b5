"""The attack spec language, the eps sweep, every attack on a tiny model, and the noise baselines."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import make_cnn, make_data
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit import attacks as atk
from robaudit import batteries
from robaudit.attacks import KINDS, AttackSpec, build, expand, parse, parse_eps_list, parse_number
from robaudit.errors import RobauditError
from robaudit.models import Normalized

# ---------------------------------------------------------------------------------------------
# parsing


def test_fractions_and_numbers():
    spec = parse("pgd:eps=8/255,alpha=2/255")
    assert spec.eps == 8 / 255 and spec.explicit_eps
    assert spec.param_dict["alpha"] == 2 / 255
    assert parse_number(" 8 / 255 ") == 8 / 255
    assert parse_number("1e-3") == 0.001
    assert parse_number("0.25") == 0.25


@pytest.mark.parametrize("text", ["1/0", "abc", "", "8/", "0x10"])
def test_bad_numbers(text):
    with pytest.raises(RobauditError, match="not a number"):
        parse_number(text)


def test_int_bool_and_string_parameters():
    spec = parse("pgd:steps=20,random_start=false")
    assert spec.param_dict == {"steps": 20, "alpha": None, "random_start": False}
    assert isinstance(spec.param_dict["steps"], int)
    assert parse("pgd:steps=2e1").param_dict["steps"] == 20
    for text, value in [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False),
                        ("0", False), ("no", False)]:
        assert parse(f"pgd:random_start={text}").param_dict["random_start"] is value, text
    assert parse("autoattack:version=rand").param_dict["version"] == "rand"
    assert parse("cw:c=0.5,kappa=1,lr=1/100").param_dict == {"c": 0.5, "kappa": 1.0, "steps": 50, "lr": 0.01}
    assert parse("square:n_queries=20").param_dict["n_queries"] == 20


@pytest.mark.parametrize("text, name", [
    ("PGD", "pgd"), ("pgd-linf", "pgd"), ("PGD_Linf", "pgd"), ("aa", "autoattack"), ("salt-and-pepper", "saltpepper"),
    ("salt_and_pepper", "saltpepper"), ("sp", "saltpepper"), ("gauss", "gaussian"), ("noise", "gaussian"),
    ("Deep-Fool", "deepfool"), (" fgsm ", "fgsm"),
])
def test_aliases(text, name):
    assert parse(text).name == name


@pytest.mark.parametrize("text, match", [
    ("foo", "unknown attack 'foo'.*fgsm"),
    ("pgd:foo=1", "unknown parameter 'foo' for pgd: it takes eps, norm, steps, alpha, random_start"),
    ("cw:foo=1", "unknown parameter 'foo' for cw: it takes c, kappa, steps, lr"),
    ("pgd:steps", "needs a value"),
    ("pgd:steps=abc", "not a number"),
    ("pgd:steps=1.5", "positive whole number"),
    ("pgd:steps=0", "positive whole number"),
    ("pgd:random_start=maybe", "true or false"),
    ("cw:c=inf", "finite"),
    ("cw:eps=0.1", "takes no eps"),
    ("deepfool:eps=0.1", "takes no eps"),
    ("pgd:norm=l2", "does not support norm=l2"),
    ("fgsm:norm=l7", "does not support norm=l7"),
    ("fgsm:eps=0", "positive"),
    ("fgsm:eps=-1/255", "positive"),
])
def test_parse_errors(text, match):
    with pytest.raises(RobauditError, match=match):
        parse(text)


def test_bool_for_a_count_is_refused():
    with pytest.raises(RobauditError):
        parse("pgd:steps=true")


def test_unknown_autoattack_version_is_refused():
    with pytest.raises(RobauditError):
        build(parse("autoattack:eps=0.1,version=fast"), make_cnn(), num_classes=4)


def test_parse_eps_list():
    assert parse_eps_list("2/255, 4/255,8/255") == [2 / 255, 4 / 255, 8 / 255]
    assert parse_eps_list(["0.1,0.2", "0.3"]) == [0.1, 0.2, 0.3]
    assert parse_eps_list(None) is None and parse_eps_list(" , ") is None
    for bad in ("0", "-0.1", "inf", "nan"):
        with pytest.raises(RobauditError):
            parse_eps_list(bad)


def test_labels():
    assert parse("pgd:steps=50").label == "pgd(steps=50)"
    assert parse("pgd:steps=10").label == "pgd"  # the default
    assert parse("pgd:eps=0.1").label == "pgd"  # eps is its own column
    assert parse("pgd:random_start=false,steps=3").label == "pgd(random_start=False,steps=3)"
    assert parse("square:norm=l2,n_queries=20").label == "square(norm=L2,n_queries=20)"
    assert parse("cw:c=0.5").label == "cw(c=0.5)"


@pytest.mark.parametrize("text", [
    "fgsm", "fgsm:eps=0.1", "pgd:eps=0.25,steps=20,random_start=false", "pgdl2:eps=0.5,alpha=0.1",
    "square:norm=l2,eps=0.5,n_queries=20", "cw:c=0.5,steps=7", "deepfool:overshoot=0.05",
    "autoattack:version=rand,eps=0.1", "gaussian:eps=0.25", "saltpepper", "uniform:norm=l2,eps=2",
])
def test_spec_string_round_trips(text):
    spec = parse(text)
    assert parse(spec.spec_string()) == spec
    assert parse(spec.spec_string()).spec_string() == spec.spec_string()


def test_spec_string_of_an_expanded_spec_pins_its_eps():
    (spec,) = expand(["pgd:steps=3"], [0.25])
    again = parse(spec.spec_string())
    assert (again.name, again.params, again.eps, again.norm) == (spec.name, spec.params, spec.eps, spec.norm)
    assert again.explicit_eps  # re-expanding it no longer sweeps


def test_spec_string_keeps_fractions_exact():
    spec = parse("pgd:eps=8/255,alpha=2/255")
    assert parse(spec.spec_string()) == spec


# ---------------------------------------------------------------------------------------------
# the eps sweep


def test_expand_applies_the_sweep():
    specs = expand(["fgsm", "pgd:eps=0.5", "cw", "pgdl2", "gaussian", parse("square:n_queries=20")], [0.1, 0.2])
    got = [(s.label, s.eps) for s in specs]
    assert got == [("fgsm", 0.1), ("fgsm", 0.2), ("pgd", 0.5), ("cw", None), ("pgdl2", 0.5),
                   ("gaussian", 0.1), ("gaussian", 0.2), ("square(n_queries=20)", 0.1), ("square(n_queries=20)", 0.2)]
    assert all(isinstance(s, AttackSpec) for s in specs)


def test_expand_drops_duplicates():
    specs = expand(["fgsm", "fgsm:eps=0.1", "pgd:steps=10", "pgd"], [0.1])
    assert [(s.label, s.eps) for s in specs] == [("fgsm", 0.1), ("pgd", 0.1)]


def test_expand_without_eps():
    with pytest.raises(RobauditError, match="fgsm needs an eps"):
        expand(["fgsm"], None)
    assert [(s.label, s.eps) for s in expand(["cw", "pgd:eps=0.1", "square:norm=l2"], None)] == [
        ("cw", None), ("pgd", 0.1), ("square(norm=L2)", 0.5)]


def test_default_battery():
    battery = batteries.battery(batteries.BatteryName.DEFAULT)
    assert battery == [parse(s) for s in batteries.BATTERIES[batteries.BatteryName.DEFAULT]]
    assert any(s.kind == "noise" for s in battery) and any(s.kind == "adversarial" for s in battery)
    assert any(s.kind == "adversarial" and not s.bounded for s in battery)  # a minimal-perturbation attack too
    for spec in expand(battery, [0.1, 0.2]):
        assert spec.eps is None if not spec.bounded else spec.eps in (0.1, 0.2)


# ---------------------------------------------------------------------------------------------
# every attack on a tiny model

TINY = {  # each attack in the cheapest setting that still exercises it
    "fgsm": "fgsm:eps=0.05",
    "pgd": "pgd:eps=0.05,steps=3",
    "pgdl2": "pgdl2:eps=0.5,steps=3",
    "cw": "cw:steps=3",
    "deepfool": "deepfool:steps=3",
    "autoattack": "autoattack:eps=0.1",  # every sample falls to its first attack (APGD-CE): the rest is skipped
    "square": "square:eps=0.1,n_queries=30",
    "apgd": "apgd:eps=0.1,steps=3",
    "apgdt": "apgdt:eps=0.1,steps=3,targets=2",
    "gaussian": "gaussian:eps=0.05",
    "uniform": "uniform:eps=0.05",
    "saltpepper": "saltpepper:eps=0.05",
}


def test_every_kind_has_a_tiny_setting():
    assert set(TINY) == set(KINDS)


@pytest.fixture(scope="module")
def victim():
    """A normalized tiny CNN and 4 inputs touching both ends of [0, 1], labelled by the model."""
    model = Normalized(make_cnn(1), [0.5], [0.25], ndim=4).eval()
    data = make_data(model, 4, seed=2)
    x = data.x.clone()
    x[:, :, 0, :] = 0.0
    x[:, :, -1, :] = 1.0
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("name", list(TINY))
def test_every_attack_builds_and_runs(name, victim):
    model, x, y = victim
    spec = parse(TINY[name])
    torch.manual_seed(0)
    x_adv = build(spec, model, num_classes=4, seed=0)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1  # the attacks clamp to the input space
    delta = (x_adv - x).flatten(1)
    if spec.bounded and spec.kind == "adversarial":
        bound = delta.abs().amax(1) if spec.norm == "Linf" else delta.norm(dim=1)
        assert (bound <= spec.eps + 1e-5).all(), bound
    if name not in ("cw", "deepfool", "square", "saltpepper", "apgd", "apgdt"):  # these may leave a sample unchanged
        assert (delta != 0).any(1).all()
    if name in ("fgsm", "pgd", "autoattack", "square", "apgd", "apgdt"):
        with torch.no_grad():
            assert (model(x_adv).argmax(1) != y).any()  # this model is easy to fool
    assert not model.training


def test_autoattack_on_a_three_class_model_refuses_standard_and_runs_rand():
    model = make_cnn(1, num_classes=3)
    data = make_data(model, 2, num_classes=3)
    with pytest.raises(RobauditError, match="at least 4 classes") as info:
        build(parse("autoattack:eps=0.001"), model, num_classes=3)
    assert "autoattack:version=rand" in str(info.value) and "\n" not in str(info.value)
    # the alternative the message suggests builds and runs, inside its budget
    fn = build(parse("autoattack:eps=0.001,version=rand"), model, num_classes=3)
    x_adv = fn(data.x, data.y)
    assert x_adv.shape == data.x.shape
    assert float((x_adv.detach() - data.x).abs().max()) <= 0.001 + 1e-6


def test_autoattack_rand_on_a_two_class_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.rand(2, 2)
    y = model(x).argmax(1).detach()
    try:
        fn = build(parse("autoattack:eps=0.0001,version=rand"), model, num_classes=2)  # nothing gets fooled
    except RobauditError as e:
        assert "version=rand" not in str(e)  # a refusal must not recommend what fails the same way
        return
    assert fn(x, y).shape == x.shape


@pytest.mark.parametrize("version", ["standard", "plus"])
def test_autoattack_refuses_fewer_than_four_classes(version):
    with pytest.raises(RobauditError, match="at least 4 classes"):
        build(parse(f"autoattack:eps=0.1,version={version}"), make_cnn(1, num_classes=3), num_classes=3)


# ---------------------------------------------------------------------------------------------
# the noise baselines


@pytest.mark.parametrize("name", ["gaussian", "uniform"])
def test_noise_has_the_l2_energy_of_a_full_budget_perturbation(name):
    x = torch.full((6, 1, 8, 8), 0.5)  # mid-range, so clamping never bites at this eps
    eps = 0.01
    x_noisy = build(parse(f"{name}:eps={eps}"), None, num_classes=4)(x, torch.zeros(6, dtype=torch.long))
    norms = (x_noisy - x).flatten(1).norm(dim=1)
    # d = 64 components: ||delta||_2 = eps * sqrt(d) = 0.01 * 8 = 0.08, like a +-eps perturbation of every pixel
    torch.testing.assert_close(norms, torch.full((6,), eps * math.sqrt(64)), rtol=1e-4, atol=0)
    assert (x_noisy - x).abs().max() < 0.5
    assert not torch.equal(x_noisy[0], x_noisy[1])  # independent draws per sample


def test_noise_in_the_l2_norm():
    x = torch.full((3, 1, 8, 8), 0.5)
    x_noisy = build(parse("gaussian:norm=l2,eps=0.3"), None, num_classes=4)(x, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close((x_noisy - x).flatten(1).norm(dim=1), torch.full((3,), 0.3), rtol=1e-4, atol=0)


def test_noise_is_clamped():
    x = torch.cat([torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)])
    for name in ("gaussian", "uniform", "saltpepper"):
        x_noisy = build(parse(f"{name}:eps=0.5"), None, num_classes=4)(x, torch.zeros(4, dtype=torch.long))
        assert x_noisy.min() >= 0 and x_noisy.max() <= 1, name


def test_salt_and_pepper_hits_eps_squared_of_the_components():
    torch.manual_seed(0)
    x = torch.full((4, 1, 50, 50), 0.5)  # 10,000 components, none already at 0 or 1
    eps = 0.3
    x_noisy = build(parse(f"saltpepper:eps={eps}"), None, num_classes=4)(x, torch.zeros(4, dtype=torch.long))
    changed = x_noisy != x
    # expected fraction eps^2 = 0.09 (900 of 10,000; binomial std ~29): same expected energy as +-eps everywhere
    assert 0.08 < changed.float().mean().item() < 0.10
    assert set(x_noisy[changed].unique().tolist()) == {0.0, 1.0}
    assert 0.4 < x_noisy[changed].mean().item() < 0.6  # salt and pepper about equally often


def test_noise_follows_the_global_seed():
    x = torch.full((2, 1, 8, 8), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    fn = build(parse("gaussian:eps=0.1"), None, num_classes=4)
    torch.manual_seed(5)
    a = fn(x, y)
    torch.manual_seed(5)
    b = fn(x, y)
    c = fn(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Square on vector inputs


def _linear_vector_model() -> torch.nn.Module:
    """Two classes on D=4 inputs: logit difference 1 - sum_j w_j x_j, so class 0 wins near 0."""
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([1.0, 0.0]))
    return lin.eval()


@pytest.mark.parametrize("norm,eps,budget", [("Linf", 0.3, 0.3), ("L2", 0.6, 0.6)])
def test_square_on_vectors_stays_in_the_ball_and_in_range(norm, eps, budget):
    model = _linear_vector_model()
    x = torch.tensor([[0.1, 0.2, 0.0, 0.2], [0.9, 0.0, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0]])
    y = torch.zeros(3, dtype=torch.long)
    fn = build(parse(f"square:norm={norm},eps={eps},n_queries=50"), model, num_classes=2, seed=0)
    adv = fn(x, y)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).abs().amax(1) if norm == "Linf" else (adv - x).norm(dim=1)
    assert (delta <= budget + 1e-6).all()
    # sample 0: sum 0.5, a +0.3 step on each coordinate reaches 1.7 > 1 (Linf) -- the margin is fooled
    if norm == "Linf":
        assert model(adv).argmax(1)[0] == 1
        # sample 2 sits at 0: the best vertex adds 0.3 to each of 4 coordinates, sum 1.2 > 1, fooled too
        assert model(adv).argmax(1)[2] == 1
    assert torch.equal(adv, fn(x, y))  # same seed, same numbers


def test_square_on_vectors_keeps_images_to_torchattacks():
    model = make_cnn()
    data = make_data(model, n=4)
    x, y = data.x, data.y
    fn = build(parse("square:eps=0.1,n_queries=5"), model, num_classes=4, seed=0)
    assert type(fn.image_attack).__name__ == "Square"
    assert fn(x, y).shape == x.shape


def test_autoattack_on_vectors_fails_in_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    fn = build(parse("autoattack:eps=0.1"), model, num_classes=4, seed=0)
    with pytest.raises(RobauditError, match=r"needs image inputs .* use pgd, pgdl2 and square"):
        fn(torch.rand(5, 6), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("steps,overshoot", [(50, 0.02), (2, 0.5)])
def test_batched_deepfool_matches_torchattacks_per_sample(steps, overshoot):
    import torchattacks

    from robaudit.attacks import batched_deepfool

    torch.manual_seed(0)
    model = Normalized(make_cnn(3), [0.5], [0.25], ndim=4).eval().double()
    # inputs inside (0, 1): DeepFool's steps then cross the boundary instead of stalling on the clip,
    # so every prediction is decided by more than float noise (in float64)
    x = 0.3 + 0.4 * make_data(model.float(), 24, seed=5).x.double()
    model.double()
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4  # three samples misclassified from the start: left as they are
    reference, ref_targets = torchattacks.DeepFool(model, steps=steps, overshoot=overshoot)\
        .forward_return_target_labels(x, y)
    ours, targets = batched_deepfool(model, steps=steps, overshoot=overshoot).forward_return_target_labels(x, y)
    with torch.no_grad():
        ref_pred, our_pred = model(reference).argmax(1), model(ours).argmax(1)
    assert (ref_pred != y).sum() >= 12 and torch.equal(reference[:3], x[:3])  # the attack does something here
    assert torch.equal(our_pred, ref_pred) and torch.equal(targets, ref_targets)
    torch.testing.assert_close(ours - x, reference - x, rtol=0, atol=1e-12)


def test_batched_deepfool_on_clipped_inputs_and_in_the_battery(victim):
    import torchattacks

    model, x, y = victim  # inputs at both ends of [0, 1]: the clip to [0, 1] matters
    reference = torchattacks.DeepFool(model, steps=5, overshoot=0.02)(x, y)
    ours = build(parse("deepfool:steps=5"), model, num_classes=4)(x, y)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_batch_seeds_differ_per_batch_and_configuration_and_repeat():
    seeds = {(b, i): atk.batch_seed(7, b, i) for b in range(4) for i in range(3)}
    assert len(set(seeds.values())) == len(seeds)
    assert atk.batch_seed(7, 2, 1) == seeds[(2, 1)] and atk.batch_seed(8, 2, 1) != seeds[(2, 1)]


@pytest.mark.parametrize("spec", ["gaussian:eps=0.1", "saltpepper:eps=0.3", "pgd:eps=0.1,steps=2",
                                  "square:eps=0.1,n_queries=5"])
def test_reseed_makes_a_batch_draw_the_same_whatever_ran_before(spec):
    model = make_cnn()
    data = make_data(model, n=6)
    fn = build(parse(spec), model, num_classes=4, seed=0)
    atk.reseed(fn, 123)
    first = fn(data.x, data.y)
    fn(data.x, data.y)  # draws that a batch run earlier would have taken
    atk.reseed(fn, 123)
    torch.testing.assert_close(fn(data.x, data.y), first, rtol=0, atol=0)
    atk.reseed(fn, 124)
    assert not torch.equal(fn(data.x, data.y), first)


def test_reseed_reaches_square_and_autoattack_members():
    model = make_cnn()
    square = build(parse("square:eps=0.1"), model, num_classes=4, seed=0)
    auto = build(parse("autoattack:eps=0.1"), model, num_classes=4, seed=0)
    atk.reseed(square, 99)
    atk.reseed(auto, 99)
    assert square.image_attack.seed == square.vector_attack.seed == 99
    assert [m.seed for m in auto.atk._autoattack.attacks] == [99] * 4
