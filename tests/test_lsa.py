"""Layer Sustainability Analysis: the relative-error statistic, its streaming, analyze(), MVL selection."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tests.helpers import (CNN_LAYERS, NormTinyCNN, accuracy_numbers, assert_no_hooks, make_cnn, make_data,
                           rel_diff)
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit import attacks as atk
from robaudit.errors import NonFiniteError, RobauditError
from robaudit.lsa import (ACCURACY_COLUMNS, LSA_COLUMNS, RelativeError, analyze, pooled_relative_error,
                          relative_error, select_mvl, strongest_attack)
from robaudit.probe import LayerProbe

RE_COLS = ["re_mean", "re_std", "re_pooled"]


@pytest.fixture(scope="module")
def cnn():
    return make_cnn()


@pytest.fixture(scope="module")
def data(cnn):
    return make_data(cnn, 20)


def run(model, data, **kw):
    kw.setdefault("device", "cpu")
    return analyze(model, data, **kw)


# ---------------------------------------------------------------------------------------------
# the relative error, by hand


def hand_linear() -> nn.Module:
    """phi(x) = W x + b with W = [[2, 0], [0, 1]], b = [1, 0] (float64 so the arithmetic is exact)."""
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        lin.bias.copy_(torch.tensor([1.0, 0.0]))
    return nn.Sequential(lin).eval()


# clean x           -> phi      |phi|    perturbed x'      -> phi'       delta       |delta|  RE
# (1, 4)            -> (3, 4)     5      (1.5, 4)          -> (4, 4)     (1, 0)        1      1/5   = 0.2
# (2, 12)           -> (5, 12)   13      (3.25, 18)        -> (7.5, 18)  (2.5, 6)      6.5    6.5/13 = 0.5
# (-0.5, 8)         -> (0, 8)     8      (-0.5, 1.6)       -> (0, 1.6)   (0, -6.4)     6.4    6.4/8 = 0.8
# re_mean   = (0.2 + 0.5 + 0.8) / 3 = 0.5
# re_std    = sqrt(((-0.3)^2 + 0^2 + 0.3^2) / 3) = sqrt(0.06) = 0.2449489742783178   (population std)
# re_pooled = sqrt(1 + 42.25 + 40.96) / sqrt(25 + 169 + 64) = sqrt(84.21 / 258) = 0.5713102036872869
CLEAN = torch.tensor([[1.0, 4.0], [2.0, 12.0], [-0.5, 8.0]], dtype=torch.float64)
PERTURBED = torch.tensor([[1.5, 4.0], [3.25, 18.0], [-0.5, 1.6]], dtype=torch.float64)


def test_relative_error_matches_hand_computation():
    model = hand_linear()
    with LayerProbe(model, ["0"]) as probe:
        _, clean = probe.run(model, CLEAN)
        clean = dict(clean)
        _, pert = probe.run(model, PERTURBED)
    assert_no_hooks(model)
    phi, phi_p = clean["0"], pert["0"]
    torch.testing.assert_close(phi, torch.tensor([[3.0, 4.0], [5.0, 12.0], [0.0, 8.0]], dtype=torch.float64))

    per_sample = relative_error(phi, phi_p)
    torch.testing.assert_close(per_sample, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(pooled_relative_error(phi, phi_p)) == pytest.approx(0.5713102036872869, rel=1e-12)

    st = RelativeError()
    st.update(phi, phi_p)
    out = st.compute()
    assert out["re_mean"] == pytest.approx(0.5, rel=1e-12)
    assert out["re_std"] == pytest.approx(0.2449489742783178, rel=1e-9)
    assert out["re_pooled"] == pytest.approx(0.5713102036872869, rel=1e-12)
    assert out["n_samples"] == 3 and out["n_undefined"] == 0


def numpy_reference(clean: np.ndarray, pert: np.ndarray) -> dict:
    c = clean.reshape(len(clean), -1).astype(np.float64)
    d = pert.reshape(len(pert), -1).astype(np.float64) - c
    re = np.linalg.norm(d, axis=1) / np.linalg.norm(c, axis=1)
    return {"re_mean": re.mean(), "re_std": re.std(), "re_pooled": np.linalg.norm(d) / np.linalg.norm(c)}


# Norms are taken in the activations' own float32 (summed in float64): against a float64 reference
# they agree to float32 precision, not to float64's.
FLOAT32_REL = 1e-6


def test_streaming_over_uneven_batches_equals_one_pass():
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(13, 3, 4, generator=g)
    pert = clean + 0.3 * torch.randn(13, 3, 4, generator=g)
    st = RelativeError()
    start = 0
    for size in (1, 4, 2, 6):  # uneven batches covering all 13 samples
        st.update(clean[start:start + size], pert[start:start + size])
        start += size
    assert start == 13
    got = st.compute()
    ref = numpy_reference(clean.numpy(), pert.numpy())
    for key in RE_COLS:
        assert got[key] == pytest.approx(ref[key], rel=FLOAT32_REL), key
    assert got["n_samples"] == 13
    st.reset()
    assert st.compute()["n_samples"] == 0 and math.isnan(st.compute()["re_mean"])


def test_update_rejects_mismatched_shapes():
    with pytest.raises(RobauditError, match="shapes differ"):
        RelativeError().update(torch.ones(2, 3), torch.ones(2, 4))


def test_analyze_is_independent_of_batch_size(cnn, data):
    # Only deterministic attacks: the noise baselines draw from the global RNG batch by batch, so
    # their draws depend on how the data are cut (salt-and-pepper interleaves two draws per batch).
    battery = ["fgsm", "pgd:random_start=false,steps=3"]
    small = run(cnn, data, attacks=battery, eps=[0.03], batch_size=7)
    big = run(cnn, data, attacks=battery, eps=[0.03], batch_size=1000)
    cols = [c for c in LSA_COLUMNS if c not in RE_COLS]
    pd.testing.assert_frame_equal(small.lsa[cols], big.lsa[cols])
    assert rel_diff(small.lsa[RE_COLS], big.lsa[RE_COLS]) < 1e-9
    pd.testing.assert_frame_equal(accuracy_numbers(small), accuracy_numbers(big))
    assert (small.lsa["n_samples"] == 20).all()


def test_re_pooled_on_one_batch_is_one_frobenius_norm(cnn, data):
    """On a single batch re_pooled is the reference code's ||Phi' - Phi||_F / ||Phi||_F."""
    res = run(cnn, data, attacks=["fgsm"], eps=[0.03], batch_size=len(data.x))
    x_adv = atk.build(atk.parse("fgsm:eps=0.03"), cnn, num_classes=4)(data.x, data.y)
    with LayerProbe(cnn, CNN_LAYERS) as probe:
        _, clean = probe.run(cnn, data.x)
        clean = dict(clean)
        _, adv = probe.run(cnn, x_adv)
        adv = dict(adv)
    by_layer = res.lsa.set_index("layer")
    assert list(by_layer.index) == CNN_LAYERS
    for name in CNN_LAYERS:
        frob = torch.linalg.vector_norm(adv[name].double() - clean[name].double()) / torch.linalg.vector_norm(
            clean[name].double())
        assert by_layer.loc[name, "re_pooled"] == pytest.approx(float(frob), rel=FLOAT32_REL), name
        # the library helper computes the same measure in the tensors' own precision
        assert float(pooled_relative_error(clean[name], adv[name])) == pytest.approx(float(frob), rel=1e-5)
        per_sample = relative_error(clean[name].double(), adv[name].double())
        assert by_layer.loc[name, "re_mean"] == pytest.approx(float(per_sample.mean()), rel=FLOAT32_REL)


def test_zero_norm_clean_activation_is_left_out():
    clean = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 2.0]])
    pert = torch.tensor([[1.0, 0.0], [3.0, 5.0], [0.0, 3.0]])
    st = RelativeError()
    st.update(clean, pert)
    out = st.compute()
    # defined samples: RE = 1/5 = 0.2 and 1/2 = 0.5; the zero sample only enters the pooled ratio:
    # re_pooled = sqrt(1 + 1 + 1) / sqrt(0 + 25 + 4) = sqrt(3 / 29)
    assert out["n_samples"] == 2 and out["n_undefined"] == 1
    assert out["re_mean"] == pytest.approx(0.35)
    assert out["re_std"] == pytest.approx(0.15)
    assert out["re_pooled"] == pytest.approx(math.sqrt(3 / 29))


def relu_gate() -> nn.Module:
    """Linear(2, 2) with W = I, b = (-0.5, -0.5), then ReLU, then Linear(2, 2): the ReLU output is all
    zero for inputs with both coordinates <= 0.5."""
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.fill_(-0.5)
        last.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        last.bias.copy_(torch.tensor([0.1, 0.0]))
    return nn.Sequential(first, nn.ReLU(), last).eval()


def test_zero_norm_sample_in_analyze_gives_finite_statistics():
    model = relu_gate()
    x = torch.tensor([[0.1, 0.2], [0.9, 0.6], [0.7, 0.95], [0.8, 0.55]])  # sample 0: ReLU output (0, 0)
    y = model(x).argmax(1).detach()
    res = run(model, SimpleNamespace(x=x, y=y, num_classes=2), attacks=["fgsm", "gaussian"], eps=[0.05])
    relu = res.lsa[res.lsa["layer"] == "1"]
    assert len(relu) == 2
    assert (relu["n_samples"] == 3).all()  # the zero sample is left out of the per-sample statistics
    assert np.isfinite(relu[RE_COLS].to_numpy(float)).all()
    assert np.isfinite(res.lsa[RE_COLS].to_numpy(float)).all()
    assert_no_hooks(model)


def test_all_zero_activations_are_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()  # every activation, logits included, is exactly zero
    x = torch.rand(4, 2)
    with pytest.raises(NonFiniteError, match="undefined"):
        run(model, (x, torch.tensor([0, 1, 0, 1])), attacks=["gaussian"], eps=[0.1])
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------
# analyze(): frame layout, accuracy, normalization, reproducibility, argument errors


def test_lsa_frame_layout(cnn, data):
    res = run(cnn, data, attacks=["fgsm", "cw:steps=2"], eps=[0.01, 0.03], batch_size=8)
    assert list(res.lsa.columns) == LSA_COLUMNS
    assert list(res.accuracy.columns) == ACCURACY_COLUMNS
    assert [l.name for l in res.layers] == CNN_LAYERS
    assert len(res.lsa) == len(CNN_LAYERS) * 3  # fgsm at two eps, cw once (no eps)
    assert res.lsa.loc[res.lsa["is_output"], "layer"].unique().tolist() == ["classifier.1"]
    assert res.lsa.loc[res.lsa["attack"] == "cw(steps=2)", "eps"].isna().all()
    assert set(res.lsa.loc[res.lsa["attack"] == "fgsm", "eps"]) == {0.01, 0.03}
    assert res.lsa.loc[res.lsa["layer"] == "features.2", "layer_type"].unique().tolist() == ["ReLU"]
    assert res.n_samples == 20 and res.clean_accuracy == 1.0
    assert res.seconds > 0


def threshold_model() -> nn.Module:
    """1-D two-class model: logits (0.5 - x, x - 0.5), i.e. class 1 exactly when x > 0.5."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    return nn.Sequential(lin).eval()


def test_accuracy_by_hand():
    # x     y  clean   eps 0.1 (moved away from its class)   eps 0.3
    # 0.10  0  right   0.20 -> 0 right                        0.40 -> 0 right
    # 0.45  0  right   0.55 -> 1 wrong                        0.75 -> 1 wrong
    # 0.70  1  right   0.60 -> 1 right                        0.40 -> 0 wrong
    # 0.52  1  right   0.42 -> 0 wrong                        0.22 -> 0 wrong
    # 0.80  0  wrong   0.90 -> 1 wrong                        1.00 -> 1 wrong
    # clean 4/5, eps 0.1: 2/5, eps 0.3: 1/5 -- for FGSM and PGD alike on a linear model
    x = torch.tensor([[0.10], [0.45], [0.70], [0.52], [0.80]])
    y = torch.tensor([0, 0, 1, 1, 0])
    res = run(threshold_model(), (x, y), attacks=["fgsm", "pgd", "gaussian"], eps=[0.1, 0.3], batch_size=2)
    acc = res.accuracy.set_index(["attack", "eps"])["accuracy"]
    assert res.clean_accuracy == pytest.approx(0.8)
    for name in ("fgsm", "pgd", "worst-case"):
        assert acc[(name, 0.1)] == pytest.approx(0.4), name
        assert acc[(name, 0.3)] == pytest.approx(0.2), name
    worst = res.accuracy[res.accuracy["attack"] == "worst-case"]
    assert sorted(worst["eps"]) == [0.1, 0.3]  # noise never enters the worst case
    assert (res.accuracy["n_samples"] == 5).all()


def test_worst_case_is_at_most_every_attack(cnn, data):
    res = run(cnn, data, attacks=["fgsm", "pgd:steps=3", "square:n_queries=10", "gaussian", "cw:steps=2"],
              eps=[0.01, 0.03], batch_size=8)
    acc = res.accuracy
    clean = acc[acc["attack"] == "clean"]
    assert len(clean) == 1 and clean["eps"].isna().all() and float(clean["accuracy"].iloc[0]) == 1.0
    worst = acc[acc["attack"] == "worst-case"]
    assert sorted(worst["eps"]) == [0.01, 0.03]
    for row in worst.itertuples():
        at_eps = acc[(acc["kind"] == "adversarial") & (acc["attack"] != "worst-case") & np.isclose(acc["eps"], row.eps)]
        assert set(at_eps["attack"]) == {"fgsm", "pgd(steps=3)", "square(n_queries=10)"}
        assert row.accuracy <= at_eps["accuracy"].min()
    assert acc["accuracy"].between(0, 1).all()


def test_normalization_equals_model_with_it_built_in():
    mean, std = 0.4, 0.3
    plain = make_cnn(5)
    built_in = NormTinyCNN(mean, std).eval()
    built_in.load_state_dict(plain.state_dict())  # mean/std are not part of the state dict
    data = make_data(built_in, 12)
    battery = ["fgsm", "pgd:random_start=false,steps=2", "gaussian"]
    a = run(plain, data, attacks=battery, eps=[0.03], mean=[mean], std=[std], batch_size=5, seed=3)
    b = run(built_in, data, attacks=battery, eps=[0.03], batch_size=5, seed=3)
    assert [l.name for l in a.layers] == [l.name for l in b.layers] == CNN_LAYERS  # the wrapper is not probed
    cols = [c for c in LSA_COLUMNS if c not in RE_COLS]
    pd.testing.assert_frame_equal(a.lsa[cols], b.lsa[cols])
    assert rel_diff(a.lsa[RE_COLS], b.lsa[RE_COLS]) < 1e-6
    pd.testing.assert_frame_equal(accuracy_numbers(a), accuracy_numbers(b))
    assert_no_hooks(plain)


def test_same_seed_same_numbers_other_seed_other_noise(cnn, data):
    battery = ["pgd:steps=2", "gaussian", "uniform", "saltpepper"]
    one = run(cnn, data, attacks=battery, eps=[0.03], batch_size=8, seed=7)
    two = run(cnn, data, attacks=battery, eps=[0.03], batch_size=8, seed=7)
    pd.testing.assert_frame_equal(one.lsa, two.lsa)
    pd.testing.assert_frame_equal(accuracy_numbers(one), accuracy_numbers(two))
    other = run(cnn, data, attacks=battery, eps=[0.03], batch_size=8, seed=8)
    for name in ("gaussian", "uniform", "saltpepper"):
        a = one.lsa.loc[one.lsa["attack"] == name, "re_pooled"].to_numpy()
        b = other.lsa.loc[other.lsa["attack"] == name, "re_pooled"].to_numpy()
        assert not np.allclose(a, b), name


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch-size"),
    ({"device": "tpu9"}, "device"),
    ({"attacks": ["fgsm"]}, "needs an eps"),
    ({"attacks": ["gaussian"], "eps": [0.1], "layers": ["nothing.*"]}, "no layer matches"),
])
def test_analyze_argument_errors(cnn, data, kwargs, match):
    with pytest.raises(RobauditError, match=match):
        run(cnn, data, **kwargs)
    assert_no_hooks(cnn)


@pytest.mark.parametrize("as_pair", [True, False], ids=["pair", "dataset"])
def test_analyze_empty_data(cnn, as_pair):
    x, y = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    empty = (x, y) if as_pair else SimpleNamespace(x=x, y=y, num_classes=4)
    with pytest.raises(RobauditError, match="empty"):
        run(cnn, empty, attacks=["fgsm"], eps=[0.1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing CUDA device")
def test_analyze_cuda_without_cuda(cnn, data):
    with pytest.raises(RobauditError, match="no CUDA"):
        run(cnn, data, attacks=["fgsm"], eps=[0.1], device="cuda")


# ---------------------------------------------------------------------------------------------
# MVL selection and the strongest attack, on hand-made frames

def lsa_frame(values: dict[tuple[str, float | None], list[float]], layers: list[str], output: str) -> pd.DataFrame:
    rows = []
    for (attack, eps), res in values.items():
        for order, (layer, re) in enumerate(zip(layers, res)):
            rows.append({"layer": layer, "layer_type": "ReLU" if layer != output else "Linear", "attack": attack,
                         "eps": eps, "re_mean": re, "re_std": 0.1, "re_pooled": re / 2, "n_samples": 10,
                         "order": order, "kind": "adversarial", "norm": "Linf", "is_output": layer == output})
    return pd.DataFrame(rows, columns=LSA_COLUMNS)


def accuracy_frame(rows: list[tuple[str, float | None, float, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"attack": a, "eps": e, "accuracy": acc, "n_samples": 10, "kind": k, "norm": "Linf"}
                         for a, e, acc, k in rows], columns=ACCURACY_COLUMNS)


LAYERS = ["l1", "l2", "l3", "l4", "l5", "out"]
HAND_LSA = lsa_frame({
    ("pgd", 0.1): [0.5, 3.0, 0.4, 0.6, 0.2, 4.0],
    ("pgd", 0.3): [1.0, 1.1, 0.9, 5.0, 1.0, 9.0],
    ("fgsm", 0.1): [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ("fgsm", 0.3): [2.0, 0.1, 0.1, 0.1, 0.1, 0.1],
}, LAYERS, "out")
HAND_ACC = accuracy_frame([
    ("clean", None, 0.9, "clean"),
    ("fgsm", 0.1, 0.6, "adversarial"), ("fgsm", 0.3, 0.4, "adversarial"),
    ("pgd", 0.1, 0.5, "adversarial"), ("pgd", 0.3, 0.1, "adversarial"),
    ("gaussian", 0.3, 0.0, "noise"),  # noise never counts as the strongest attack
    ("worst-case", 0.3, 0.0, "adversarial"),  # nor does the worst-case row
])


def test_strongest_attack_is_lowest_accuracy_at_largest_eps():
    assert strongest_attack(HAND_ACC) == ("pgd", 0.3)
    # equal at the largest eps: the lower mean over the sweep wins (fgsm mean 0.3 < pgd mean 0.35)
    tie = accuracy_frame([("fgsm", 0.1, 0.5, "adversarial"), ("fgsm", 0.3, 0.1, "adversarial"),
                          ("pgd", 0.1, 0.6, "adversarial"), ("pgd", 0.3, 0.1, "adversarial")])
    assert strongest_attack(tie) == ("fgsm", 0.3)
    # fully equal: the stronger family wins
    fam = accuracy_frame([("fgsm", 0.3, 0.1, "adversarial"), ("autoattack", 0.3, 0.1, "adversarial"),
                          ("pgd", 0.3, 0.1, "adversarial")])
    assert strongest_attack(fam) == ("autoattack", 0.3)
    # a minimal-perturbation attack has no eps: its accuracy is no robust accuracy, so it ranks only alone
    cw = accuracy_frame([("pgd", 0.3, 0.1, "adversarial"), ("cw", None, 0.05, "adversarial")])
    assert strongest_attack(cw) == ("pgd", 0.3)
    assert strongest_attack(cw[cw["attack"] == "cw"]) == ("cw", None)
    with pytest.raises(RobauditError, match="no adversarial attack"):
        strongest_attack(accuracy_frame([("clean", None, 1.0, "clean"), ("gaussian", 0.1, 0.9, "noise")]))


def test_mvl_top_k_ranks_by_the_strongest_attack():
    mvl = select_mvl(HAND_LSA, HAND_ACC, k=3)
    assert (mvl.attack, mvl.eps, mvl.criterion, mvl.k) == ("pgd", 0.3, "top-k", 3)
    # pgd @ 0.3 without the output layer: l4 5.0 > l2 1.1 > l1 1.0 = l5 1.0 (tie -> earlier layer)
    assert mvl.names == ["l4", "l2", "l1"]
    assert list(mvl.layers["score"]) == [5.0, 1.1, 1.0]
    assert mvl.excluded == ["out"]
    assert mvl.to_dict()["layers"][0] == {"layer": "l4", "score": 5.0, "layer_type": "ReLU", "depth": 4}
    assert list(mvl.layers["depth"]) == [4, 2, 1]


def test_mvl_output_layer_on_request():
    mvl = select_mvl(HAND_LSA, HAND_ACC, k=2, include_output=True)
    assert mvl.names == ["out", "l4"] and mvl.excluded == []


def test_mvl_leaves_out_pass_through_layers():
    frame = HAND_LSA.copy()
    frame.loc[frame["layer"] == "l4", "layer_type"] = "Flatten"  # repeats the RE of the layer before it
    mvl = select_mvl(frame, HAND_ACC, k=2, include_output=True)
    assert mvl.names == ["out", "l2"] and mvl.excluded == ["l4"]


def test_mvl_chosen_attack_eps_and_metric():
    assert select_mvl(HAND_LSA, HAND_ACC, k=1, attack="pgd", eps=0.1).names == ["l2"]
    assert select_mvl(HAND_LSA, HAND_ACC, k=1, attack="fgsm").names == ["l1"]  # its largest eps, 0.3
    pooled = select_mvl(HAND_LSA, HAND_ACC, k=2, metric="re_pooled")
    assert pooled.names == ["l4", "l2"] and list(pooled.layers["score"]) == [2.5, 0.55]


def test_mvl_z_criterion():
    # pgd @ 0.3 without the output layer: 1.0, 1.1, 0.9, 5.0, 1.0
    # mean = 9.0 / 5 = 1.8; population std = sqrt((0.64 + 0.49 + 0.81 + 10.24 + 0.64) / 5) = sqrt(2.564) = 1.6012
    # z = 1 -> threshold 3.4012: only l4; z = 3 -> threshold 6.60: none; z = -1 -> 0.199: all, ranked
    one = select_mvl(HAND_LSA, HAND_ACC, z=1.0)
    assert one.criterion == "z" and one.z == 1.0 and one.k is None
    assert one.names == ["l4"]
    assert select_mvl(HAND_LSA, HAND_ACC, z=3.0).names == []
    assert select_mvl(HAND_LSA, HAND_ACC, z=-1.0).names == ["l4", "l2", "l1", "l5", "l3"]


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 6}, "more than the 5 layers"),
    ({"k": 0}, "at least 1"),
    ({"k": 2, "z": 1.0}, "choose one"),
    ({"k": 1, "attack": "nope"}, "no attack named"),
    ({"k": 1, "attack": "pgd", "eps": 0.2}, "not run at eps"),
    ({"k": 1, "metric": "re_max"}, "metric"),
])
def test_mvl_errors(kwargs, match):
    with pytest.raises(RobauditError, match=match):
        select_mvl(HAND_LSA, HAND_ACC, **kwargs)


def test_mvl_default_k_on_a_small_model():
    small = lsa_frame({("pgd", 0.3): [0.3, 0.9, 0.5, 2.0]}, ["l1", "l2", "l3", "out"], "out")
    mvl = select_mvl(small, accuracy_frame([("pgd", 0.3, 0.2, "adversarial")]))
    assert mvl.names == ["l2", "l3", "l1"]


def test_mvl_from_a_real_analysis(cnn, data):
    res = run(cnn, data, attacks=["fgsm", "gaussian"], eps=[0.03], batch_size=10)
    mvl = res.mvl(3)
    assert (mvl.attack, mvl.eps) == ("fgsm", 0.03)
    # the output layer and the pass-through Flatten (whose RE repeats the pool's) are left out
    assert mvl.excluded == ["classifier.0", "classifier.1"]
    fgsm = res.lsa[(res.lsa["attack"] == "fgsm") & ~res.lsa["layer"].isin(mvl.excluded)]
    assert mvl.names == list(fgsm.sort_values("re_mean", ascending=False)["layer"][:3])
    assert res.strongest() == ("fgsm", 0.03)


def test_relative_error_is_nan_not_inf_for_an_all_zero_activation():
    clean = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    perturbed = torch.tensor([[3.0, 5.0], [1.0, 0.0]])
    re = relative_error(clean, perturbed)
    assert re[0].item() == pytest.approx(1 / 5)  # ||(0, 1)|| / ||(3, 4)||
    assert torch.isnan(re[1])


# ---------------------------------------------------------------------------------------------
# success rate and perturbation size


def test_perturbation_sizes_by_hand():
    from robaudit.lsa import PerturbationSizes

    x = torch.zeros(7, 2)
    # L2 norms 0.1, 0.2, 0.3, 0.4, 1.0 (fooled), 5.0 (wrong already on clean), 2.0 (not fooled)
    x_adv = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.3, 0.0], [0.0, 0.4], [0.6, 0.8], [3.0, 4.0], [2.0, 0.0]])
    ok_clean = torch.tensor([True, True, True, True, True, False, True])
    ok_adv = torch.tensor([False, False, False, False, False, False, True])
    sizes = PerturbationSizes("L2")
    sizes.update(x[:3], x_adv[:3], ok_clean[:3], ok_adv[:3])  # two batches, as analyze streams them
    sizes.update(x[3:], x_adv[3:], ok_clean[3:], ok_adv[3:])
    out = sizes.compute()
    assert out["success_rate"] == pytest.approx(5 / 6)
    assert out["pert_median"] == pytest.approx(0.3)
    assert out["pert_p90"] == pytest.approx(0.4 + 0.6 * (1.0 - 0.4))  # position 0.9 * 4 = 3.6
    linf = PerturbationSizes("Linf")
    linf.update(x, x_adv, ok_clean, ok_adv)
    assert linf.compute()["pert_median"] == pytest.approx(0.3)  # Linf norms 0.1, 0.2, 0.3, 0.4, 0.8
    empty = PerturbationSizes("Linf")
    empty.update(x, x, ok_clean, ok_clean)
    assert empty.compute()["success_rate"] == 0 and math.isnan(empty.compute()["pert_median"])


def test_median_over_all_samples_reads_the_right_way_round():
    """0 for a sample misclassified already, its norm when fooled, infinite when not fooled: a model fooled only
    on its easy samples has the smaller median over the fooled ones but the larger median over all."""
    from robaudit.battery import PerturbationSizes, median_over_all

    ok = torch.tensor([True, True, True, True, False])
    weak = torch.tensor([0.3, 0.4, 0.5, 0.6, 9.0]), torch.tensor([True, True, True, True, False])
    robust = torch.tensor([0.1, 7.0, 7.0, 7.0, 9.0]), torch.tensor([True, False, False, False, False])
    assert median_over_all(*weak, ok) == pytest.approx(0.4)  # sizes 0.3, 0.4, 0.5, 0.6 and 0
    assert median_over_all(*robust, ok) == math.inf  # 0.1, inf, inf, inf and 0
    assert float(np.median(weak[0][weak[1]])) > float(np.median(robust[0][robust[1]]))  # the misleading one
    assert median_over_all(torch.tensor([0.1, 0.2]), torch.tensor([True, False]), torch.tensor([True, False])) \
        == pytest.approx(0.05)  # 0.1 and 0: an even count takes the middle two's mean
    assert math.isnan(median_over_all(torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)))
    x = torch.zeros(5, 1)
    minimal, bounded = PerturbationSizes("L2", minimal=True), PerturbationSizes("L2")
    for sizes in (minimal, bounded):
        sizes.update(x, weak[0][:, None], ok, ok & ~weak[1])
    assert minimal.compute()["pert_median_all"] == pytest.approx(0.4)
    assert math.isnan(bounded.compute()["pert_median_all"])  # an eps-bounded attack's miss says nothing of the size


def test_accuracy_csv_success_rate_and_perturbation_by_hand():
    """Logit(1) - logit(0) = x1 + x2 - 1; FGSM at eps 0.2 moves both coordinates by 0.2 toward the other class."""
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[0.1, 0.1], [0.35, 0.35], [0.9, 0.9], [0.6, 0.6], [0.9, 0.8]])
    y = torch.tensor([0, 0, 0, 1, 1])
    # correct on clean: 0, 1, 3, 4 (sample 2 is wrong already); FGSM flips 1 (0.7 -> 1.1) and 3 (1.2 -> 0.8)
    res = analyze(nn.Sequential(lin), (x, y), attacks=["fgsm"], eps=[0.2], device="cpu")
    acc = res.accuracy.set_index("attack")
    assert acc.loc["clean", "accuracy"] == pytest.approx(4 / 5)
    assert acc.loc["fgsm", "accuracy"] == pytest.approx(2 / 5)
    assert acc.loc["fgsm", "success_rate"] == pytest.approx(2 / 4)
    assert acc.loc["fgsm", "pert_median"] == pytest.approx(0.2, abs=1e-6)
    assert acc.loc["fgsm", "pert_p90"] == pytest.approx(0.2, abs=1e-6)
    assert acc.loc["worst-case", "success_rate"] == pytest.approx(2 / 4)
    assert math.isnan(acc.loc["clean", "success_rate"]) and math.isnan(acc.loc["worst-case", "pert_median"])


def test_one_relative_error_one_zero_policy():
    from robaudit.metrics import relative_error

    clean = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    perturbed = torch.tensor([[3.0, 5.0], [1.0, 0.0]])
    # per sample: 1/5 and undefined; the mean leaves the undefined sample out; pooled: ||(0,1,1,0)|| / ||(3,4,0,0)||
    assert relative_error(clean, perturbed, "per-sample").item() == pytest.approx(1 / 5)
    assert relative_error(clean, perturbed, "pooled").item() == pytest.approx(2 ** 0.5 / 5)
    zero = torch.zeros(2, 2)
    for reduction in ("none", "per-sample", "pooled"):
        assert torch.isnan(relative_error(zero, perturbed, reduction)).all()  # NaN, never inf or 0
    assert torch.isnan(pooled_relative_error(zero, perturbed))
    st = RelativeError()
    st.update(clean, perturbed)
    out = st.compute()
    assert out["re_mean"] == pytest.approx(1 / 5) and out["n_undefined"] == 1
    assert out["re_pooled"] == pytest.approx(2 ** 0.5 / 5)


def test_perturbation_sizes_joined_every_few_batches_keep_their_batches():
    """The queued host copies are joined every JOIN_EVERY batches; the per-batch parts and the statistics are
    those of one pass over all the batches, and setting parts (a merge of processes) round-trips."""
    from robaudit.battery import PerturbationSizes

    g = torch.Generator().manual_seed(0)
    sizes, batches = PerturbationSizes("L2"), []
    for b in range(2 * PerturbationSizes.JOIN_EVERY + 3):
        n = 3 + b % 4
        x, adv = torch.rand(n, 5, generator=g), torch.rand(n, 5, generator=g)
        ok_clean, ok_adv = torch.rand(n, generator=g) > 0.2, torch.rand(n, generator=g) > 0.5
        sizes.update(x, adv, ok_clean, ok_adv)
        batches.append(((adv - x).double().norm(dim=1), ok_clean & ~ok_adv, ok_clean))
    parts = sizes.parts
    assert len(parts) == len(batches) and all(torch.equal(a, b) for p, q in zip(parts, batches) for a, b in zip(p, q))
    norms, fooled, ok = (torch.cat(t) for t in zip(*batches))
    want = norms[fooled].numpy()
    got = sizes.compute()
    assert got["success_rate"] == len(want) / int(ok.sum())
    assert got["pert_median"] == pytest.approx(float(np.median(want)), rel=1e-12)
    again = PerturbationSizes("L2")
    again.parts = parts
    assert again.compute() == got


# -- model and data fit, checked on the first batch --------------------------------------------
class _Counting(nn.Module):
    """Counts its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_the_first_batch_checks_the_fit_without_a_forward_pass_of_its_own():
    """One batch, FGSM, module probing: the attack's forward and the hooked pass, nothing before them."""
    model = _Counting(make_cnn()).eval()
    d = make_data(model.inner, n=6)
    model.calls = 0
    analyze(model, (d.x, d.y), attacks=["fgsm"], eps=[0.1], batch_size=8, device="cpu", probe="modules")
    assert model.calls == 2


@pytest.mark.parametrize("case, match", [
    ("inputs", r"does not accept inputs of shape \(1, 6, 6\)"),
    ("classes", "4 outputs but the data set has 10 classes"),
    ("logits", r"must return logits of shape \(batch, classes\); it returned \(\d+, 4, 1\)"),
    ("broken", r"failed to run .*AttributeError.*not the cause"),
])
def test_a_model_that_does_not_fit_the_data_is_refused_in_one_line(case, match):
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 4, (5,))
    model = make_cnn()
    if case == "inputs":
        x = torch.rand(5, 1, 6, 6)
    elif case == "classes":
        y = torch.arange(5) % 10
        y[:2] = 9  # labels the model has no output for
    elif case == "logits":
        model = nn.Sequential(make_cnn(), nn.Unflatten(1, (4, 1)))
    else:
        class Broken(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(64, 4)

            def forward(self, x):
                return self.fc(self.missing(x))
        model = Broken()
    data = SimpleNamespace(x=x, y=y, num_classes=10 if case == "classes" else 4)
    with pytest.raises(RobauditError, match=match):
        analyze(model.eval(), data, attacks=["pgd:steps=2"], eps=[0.1], batch_size=4, device="cpu")


def test_more_outputs_than_classes_warn_once_and_the_analysis_runs():
    model = make_cnn()
    d = make_data(model, n=10)
    with pytest.warns(UserWarning, match="4 outputs for 3 classes") as caught:
        res = analyze(model, (d.x, d.y % 3), attacks=["fgsm"], eps=[0.1], batch_size=4, device="cpu")
    assert sum("outputs for 3 classes" in str(w.message) for w in caught) == 1
    assert res.n_samples == 10


def test_an_error_that_is_no_misfit_is_raised_as_it_is():
    """A model that runs on two samples but fails on a full batch: the check finds no misfit, the error stands."""
    class FailsOnFour(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_cnn()

        def forward(self, x):
            if len(x) == 4:
                raise RuntimeError("fails on four")
            return self.inner(x)

    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(RuntimeError, match="fails on four"):
        analyze(FailsOnFour().eval(), (x, y), attacks=["fgsm"], eps=[0.1], batch_size=4, device="cpu",
                probe="modules")


# ---------------------------------------------------------------------------------------------
# re_gain: a layer's own share of the RE, by hand


def hand_chain() -> nn.Module:
    """Three bias-free linear layers: diag(2, 1), then diag(1, 3), then diag(2, 1) (the logits)."""
    chain = nn.Sequential(*(nn.Linear(2, 2, bias=False) for _ in range(3)))
    with torch.no_grad():
        for layer, diag in zip(chain, ([2.0, 1.0], [1.0, 3.0], [2.0, 1.0])):
            layer.weight.copy_(torch.diag(torch.tensor(diag)))
    return chain.eval()


# One sample x = (0.5, 0.25), label 0, FGSM at eps 0.1. Every layer is diagonal with positive weights, so the input
# gradient of CE has the signs of dCE/dlogits = (p0 - 1, p1) = (-, +): x' = (0.4, 0.35).
#   input  x (0.5, 0.25)   x' (0.4, 0.35)   |d|^2 0.02   |x|^2 0.3125   RE^2 0.064
#   layer 0 (1.0, 0.25) -> (0.8, 0.35)      |d|^2 0.05   |phi|^2 1.0625 RE^2 0.05 / 1.0625
#   layer 1 (1.0, 0.75) -> (0.8, 1.05)      |d|^2 0.13   |phi|^2 1.5625 RE^2 0.13 / 1.5625 = 0.0832
#   layer 2 (2.0, 0.75) -> (1.6, 1.05)      |d|^2 0.25   |phi|^2 4.5625 RE^2 0.25 / 4.5625
# re_gain = RE_l / RE_(l-1):
#   layer 0: sqrt((0.05 / 1.0625) / 0.064) = sqrt(25 / 34) = 0.8574929257
#   layer 1: sqrt(0.0832 / (0.05 / 1.0625)) = sqrt(1.768) = 1.3296616111
#   layer 2: sqrt((0.25 / 4.5625) / 0.0832) = sqrt(0.390625 / 0.593125) = 0.8115343415
HAND_GAINS = [0.8574929257, 1.3296616111, 0.8115343415]
HAND_RE = [math.sqrt(0.05 / 1.0625), math.sqrt(0.0832), math.sqrt(0.25 / 4.5625)]


def test_re_gain_of_a_three_layer_chain_by_hand():
    x, y = torch.tensor([[0.5, 0.25]]), torch.tensor([0])
    res = run(hand_chain(), SimpleNamespace(x=x, y=y, num_classes=2), attacks=["fgsm"], eps=[0.1], probe="modules")
    lsa = res.lsa.set_index("layer").loc[["0", "1", "2"]]
    assert list(res.lsa.columns) == LSA_COLUMNS and LSA_COLUMNS[-1] == "re_gain"
    assert list(lsa["re_mean"]) == pytest.approx(HAND_RE, rel=1e-5)
    assert list(lsa["re_gain"]) == pytest.approx(HAND_GAINS, rel=1e-5)
    # the cumulative RE ranks layer 2 (0.234) above layer 0 (0.217); its own gain ranks layer 0 (0.857) above it
    by_re = select_mvl(res.lsa, res.accuracy, k=2, include_output=True)
    by_gain = select_mvl(res.lsa, res.accuracy, k=2, metric="re_gain", include_output=True)
    assert by_re.names == ["1", "2"] and by_gain.names == ["1", "0"]
    assert list(by_gain.layers["score"]) == pytest.approx(HAND_GAINS[1::-1], rel=1e-5)
    assert by_gain.to_dict()["metric"] == "re_gain"
    # depth: the position among the probed layers in forward order (the chain's three layers are 1, 2, 3)
    assert list(by_re.layers["depth"]) == [2, 3] and list(by_gain.layers["depth"]) == [2, 1]
    assert [l["depth"] for l in by_gain.to_dict()["layers"]] == [2, 1]


def test_the_mvl_table_shows_depth_and_an_older_mvl_json_without_it_still_reads(tmp_path):
    from robaudit import runschema
    from robaudit.lsa import MVL
    from robaudit.tables import mvl_table

    x, y = torch.tensor([[0.5, 0.25]]), torch.tensor([0])
    res = run(hand_chain(), SimpleNamespace(x=x, y=y, num_classes=2), attacks=["fgsm"], eps=[0.1], probe="modules")
    mvl = select_mvl(res.lsa, res.accuracy, k=2, metric="re_gain", include_output=True)
    lines = mvl_table(mvl)
    assert "depth" in lines[1] and lines[2].split()[:2] == ["1", "1"] and lines[2].split()[3] == "2"
    assert any("position among the probed layers" in line for line in lines)
    older = mvl.to_dict()
    for layer in older["layers"]:
        del layer["depth"]
    runschema.DOCUMENTS["mvl.json"](older, "", tmp_path / "mvl.json")  # no error: depth is optional
    table = mvl_table(MVL("top-k", "fgsm", 0.1, "re_gain", mvl.layers.drop(columns=["depth"]), k=2))
    assert "depth" not in table[1] and table[2].split()[:3] == ["1", "1", "Linear"]
    with pytest.raises(RobauditError, match="depth"):
        runschema.DOCUMENTS["mvl.json"]({**older, "layers": [{"layer": "0", "depth": 0}]}, "", tmp_path / "mvl.json")


def test_layer_gains_leave_undefined_ratios_nan():
    from robaudit.metrics import layer_gains

    assert layer_gains([0.2, 0.4, 0.1], 0.1) == pytest.approx([2.0, 2.0, 0.25])
    gains = layer_gains([0.0, 0.3, math.nan, 0.2], 0.1)  # a zero RE or an undefined one: no ratio after it
    assert gains[0] == 0.0 and math.isnan(gains[1]) and math.isnan(gains[2]) and math.isnan(gains[3])


def test_ranking_by_gain_on_an_older_lsa_csv_says_what_to_do():
    old = HAND_LSA.drop(columns=["re_gain"])
    with pytest.raises(RobauditError, match="no re_gain column.*analyze again"):
        select_mvl(old, HAND_ACC, k=1, metric="re_gain")
