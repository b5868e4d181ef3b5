"""Hardening: every method trains, the AT-LR loss is what the paper writes, gamma 0 is AT, resume is exact,
the run-directory stage writes a hardened model that reloads and re-analyzes, and bad input fails in one line."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from robaudit.training import checkpoint as H
from robaudit.errors import NonFiniteError, RobauditError
from robaudit.training.loop import Trainer
from robaudit.stages.harden import harden_run
from robaudit.training.checkpoint import CHECKPOINT_NAME
from robaudit.training.config import HardenConfig
from robaudit.training.fit import harden
from robaudit.training.layers import DualBatchNorm
from robaudit.training.loop import HardenInterrupted
from robaudit.training.objectives import atlr_loss, atlr_objective, layer_relative_error
from tests.helpers import TinyCNN, single_thread  # noqa: F401  (single_thread: autouse fixture)

FAST = dict(eps=0.1, steps=3, batch_size=16, seed=0)


def tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(width=4, num_classes=3)


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def blobs(n: int = 48, seed: int = 0) -> SimpleNamespace:
    """Three classes of 1x8x8 images in [0, 1] that a tiny CNN can learn (bright rows differ by class)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand((n, 1, 8, 8), generator=g) * 0.3
    for c in range(3):
        x[y == c, :, 2 * c:2 * c + 3, :] += 0.6
    return SimpleNamespace(x=x.clamp(0, 1), y=y, num_classes=3, name="blobs", split="train")


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# the regularizer and the loss


def test_relative_error_modes_match_the_formulas():
    torch.manual_seed(0)
    clean, adv = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    pooled = (adv - clean).norm() / clean.norm()
    per = ((adv - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)).mean()
    assert torch.allclose(layer_relative_error(clean, adv, "pooled"), pooled)
    assert torch.allclose(layer_relative_error(clean, adv, "per-sample"), per)
    # a sample whose clean activation is zero has no RE: it is left out, and gradients stay finite
    clean[0] = 0
    c = clean.clone().requires_grad_(True)
    re = layer_relative_error(c, adv, "per-sample")
    expected = ((adv - clean)[1:].flatten(1).norm(dim=1) / clean[1:].flatten(1).norm(dim=1)).mean()
    assert torch.allclose(re, expected)
    re.backward()
    assert torch.isfinite(c.grad).all()
    zero = torch.zeros(2, 3, requires_grad=True)
    out = layer_relative_error(zero, torch.ones(2, 3), "pooled")
    out.backward()
    assert math.isnan(out.item()) and torch.isfinite(zero.grad).all()  # undefined: NaN, as in the analysis
    # in the AT-LR loss an undefined RE adds nothing (and the gradient stays finite)
    zero = torch.zeros(2, 3, requires_grad=True)
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    loss, terms = atlr_loss(logits, y, {"l": zero}, {"l": torch.ones(2, 3)}, gammas={"l": 1.0})
    loss.backward()
    assert loss.item() == pytest.approx(float(F.cross_entropy(logits, y))) and math.isnan(terms["re:l"].item())
    assert torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("re_mode", ["pooled", "per-sample"])
def test_atlr_loss_is_ce_plus_the_hand_computed_regularizer(re_mode):
    model = tiny_cnn().train()
    reference = copy.deepcopy(model)
    data = blobs(8)
    x, y = data.x, data.y
    x_adv = (x + 0.1 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1)
    layers, gamma = ["features.2", "features.5"], [0.7, 1.3]
    loss, terms = atlr_objective(model, x, x_adv, y, layers=layers, gamma=gamma, re_mode=re_mode)

    # by hand: the two ReLU outputs, clean then adversarial pass, in train mode (batch statistics) as in training

    def run(m, inp):
        h = m.features[1](m.features[0](inp))
        a1 = torch.relu(h)
        a2 = torch.relu(m.features[4](m.features[3](a1)))
        return m.classifier(m.features[6](a2)), [a1, a2]

    _, clean_acts = run(reference, x)
    logits_adv, adv_acts = run(reference, x_adv)
    if re_mode == "pooled":
        res = [(a - c).norm() / c.norm() for c, a in zip(clean_acts, adv_acts)]
    else:
        res = [((a - c).flatten(1).norm(dim=1) / c.flatten(1).norm(dim=1)).mean() for c, a in zip(clean_acts, adv_acts)]
    expected = F.cross_entropy(logits_adv, y) + gamma[0] * res[0] + gamma[1] * res[1]
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms["re:features.2"], res[0], rtol=1e-5)
    assert torch.allclose(terms["ce_adv"], F.cross_entropy(logits_adv, y), rtol=1e-5)
    # gradients flow through both passes: the clean pass alone moves the first conv's weights
    loss.backward()
    assert model.features[0].weight.grad.abs().sum() > 0


def test_one_joint_pass_equals_two_passes_without_batchnorm():
    torch.manual_seed(0)
    model = TinyMLP().train()
    x = torch.rand(10, 2)
    x_adv = (x + 0.1).clamp(0, 1)
    y = torch.arange(10) % 2
    kw = dict(layers=["net.1", "net.3"], gamma=[1.0, 0.5], clean_weight=0.3)
    two, t2 = atlr_objective(model, x, x_adv, y, **kw)
    one, t1 = atlr_objective(model, x, x_adv, y, joint=True, **kw)
    assert torch.allclose(one, two, rtol=1e-5, atol=1e-6)
    for k in t2:
        assert torch.allclose(t1[k], t2[k], rtol=1e-5, atol=1e-6), k


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("method", ["atlr", "at", "layerwise", "standard"])
def test_one_epoch_of_each_method_runs_and_changes_the_weights(method):
    model = tiny_cnn()
    before = weights(model)
    res = harden(model, blobs(), method=method, mvl_layers=["features.2", "features.5"], epochs=1, **FAST)
    assert not same_weights(before, weights(model))
    h = res.history
    assert list(h["epoch"]) == [0, 1]
    assert {"loss", "val_clean_acc", "val_robust_acc", "seconds"} <= set(h.columns)
    assert math.isfinite(h["loss"].iloc[-1]) and h["seconds"].iloc[-1] > 0
    if method == "atlr":
        assert {"ce_adv", "reg", "re:features.2", "re:features.5"} <= set(h.columns)
        assert h["loss"].iloc[-1] == pytest.approx(h["ce_adv"].iloc[-1] + h["reg"].iloc[-1], rel=1e-6)
    if method == "layerwise":
        assert "ce_perturbed" in h.columns
    assert not model.training
    assert "held-out" in res.validation


def test_gamma_zero_reduces_atlr_to_at_exactly():
    a, b = tiny_cnn(), tiny_cnn()
    ra = harden(a, blobs(), method="at", mvl_layers=["features.2"], epochs=2, **FAST)
    rb = harden(b, blobs(), method="atlr", mvl_layers=["features.2"], gamma=0.0, epochs=2, **FAST)
    assert same_weights(weights(a), weights(b))
    assert list(ra.history["loss"]) == pytest.approx(list(rb.history["loss"]), nan_ok=True, abs=0)
    # and gamma > 0 does change the result
    c = tiny_cnn()
    harden(c, blobs(), method="atlr", mvl_layers=["features.2"], gamma=1.0, epochs=2, **FAST)
    assert not same_weights(weights(a), weights(c))


def test_same_seed_same_numbers_and_the_callers_rng_is_untouched():
    a, b = tiny_cnn(), tiny_cnn()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    harden(a, blobs(), method="layerwise", mvl_layers=["features.2"], epochs=1, **FAST)
    assert torch.equal(torch.rand(1), expected_next)
    harden(b, blobs(), method="layerwise", mvl_layers=["features.2"], epochs=1, **FAST)
    assert same_weights(weights(a), weights(b))


@pytest.mark.parametrize("method,dual", [("atlr", True), ("layerwise", False)])
def test_resume_after_an_interrupted_epoch_equals_an_uninterrupted_run(tmp_path, monkeypatch, method, dual):
    kw = dict(method=method, mvl_layers=["features.2", "features.5"], epochs=3, dual_bn=dual, **FAST)
    full = tiny_cnn()
    r_full = harden(full, blobs(), checkpoint_dir=tmp_path / "a", **kw)


    class CtrlC:  # a Trainer callback: Ctrl-C as epoch 2 starts
        def on_epoch_start(self, trainer, epoch):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(HardenInterrupted, match="--resume"):
        harden(tiny_cnn(), blobs(), checkpoint_dir=tmp_path / "b", callbacks=[CtrlC()], **kw)
    assert H.load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["epoch"] == 1
    resumed = tiny_cnn()
    r_res = harden(resumed, blobs(), checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert r_res.resumed_from_epoch == 1
    assert same_weights(weights(full), weights(resumed))
    cols = [c for c in r_full.history.columns if "seconds" not in c]
    pd.testing.assert_frame_equal(r_full.history[cols], r_res.history[cols])


def test_resume_refuses_other_settings(tmp_path):
    harden(tiny_cnn(), blobs(), method="at", epochs=1, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(RobauditError, match="other settings"):
        harden(tiny_cnn(), blobs(), method="at", epochs=1, checkpoint_dir=tmp_path, resume=True, lr=0.5,
               **FAST)


def test_dual_bn_keeps_clean_statistics_apart():
    model = tiny_cnn()
    bn = model.features[1]
    dual = DualBatchNorm(model)
    main_before = bn.running_mean.clone()
    model.train()
    with dual.clean():
        model(blobs(8).x + 0.5)
    assert torch.equal(bn.running_mean, main_before)  # the adversarial (main) set is untouched by a clean pass
    assert not torch.equal(dual.aux["features.1"]["running_mean"], main_before)
    model(blobs(8).x)
    assert not torch.equal(bn.running_mean, main_before)
    res = harden(tiny_cnn(), blobs(), method="atlr", mvl_layers=["features.2"], epochs=1, dual_bn=True, **FAST)
    assert res.bn_at_test.startswith("adversarial")


# ---------------------------------------------------------------------------------------------
# bad input: one line, nothing written


def test_bad_settings_fail_in_one_line():
    cases = [
        (dict(eps=0.0), "positive"),
        (dict(eps=-0.1), "positive"),
        (dict(dual_bn=True, model=TinyMLP()), "BatchNorm"),
        (dict(mvl_layers=["nope"]), "no layer named"),
        (dict(gamma=[1.0, 2.0, 3.0]), "gamma"),
        (dict(method="magic"), "unknown method"),
    ]
    for overrides, needle in cases:
        kw = dict(method="atlr", mvl_layers=["features.2"], epochs=1, **FAST)
        model = overrides.pop("model", tiny_cnn())
        data = blobs() if not isinstance(model, TinyMLP) else SimpleNamespace(
            x=torch.rand(20, 2), y=torch.arange(20) % 2, num_classes=2, name="pts", split="train")
        if isinstance(model, TinyMLP):
            kw["mvl_layers"] = ["net.1"]
        kw.update(overrides)
        with pytest.raises(RobauditError, match=needle) as info:
            harden(model, data, **kw)
        assert "\n" not in str(info.value)


class Diverging(TinyCNN):
    """Its training outputs turn NaN from the 5th training forward pass on (epoch 2 of 3 batches each)."""

    calls = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            Diverging.calls += 1
            if Diverging.calls >= 5:
                out = out * float("nan")
        return out


def test_a_diverging_loss_stops_with_a_message_and_keeps_the_last_complete_epoch(tmp_path):
    torch.manual_seed(0)
    Diverging.calls = 0
    with pytest.raises(NonFiniteError, match="lower --lr") as info:
        harden(Diverging(width=4, num_classes=3), blobs(), method="at", epochs=3, checkpoint_dir=tmp_path, **FAST)
    assert "\n" not in str(info.value) and "epoch 2" in str(info.value)
    state = H.load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_collapse_to_chance_stops_training(monkeypatch):
    calls = {"n": 0}

    def collapsing(self):  # a model that was accurate before hardening, then at chance (1 of 3 classes)
        calls["n"] += 1
        return (1.0, 0.5) if calls["n"] == 1 else (0.2, 0.0)

    monkeypatch.setattr(Trainer, "evaluate", collapsing)
    with pytest.raises(RobauditError, match="collapsed at epoch 1") as info:
        harden(tiny_cnn(), blobs(), method="atlr", mvl_layers=["classifier.1"], epochs=2, **FAST)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# the run-directory stage and the command


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    """A tiny MLP checkpoint, trained a little on moons, analyzed with PGD on 60 test samples."""
    from robaudit.models import save_checkpoint
    from robaudit.stages.analyze import analyze_run

    root = tmp_path_factory.mktemp("harden")
    torch.manual_seed(0)
    from robaudit.data import load_dataset
    from robaudit.examples.models import MoonsMLP

    model = MoonsMLP(hidden=8)
    harden(model, load_dataset("moons", split="train", samples=300), method="standard", eps=0.1, epochs=3,
           batch_size=64, lr=1e-2)
    path = save_checkpoint(root / "mlp.pt", model, arch="robaudit.examples.models:MoonsMLP",
                           arch_kwargs={"hidden": 8})
    run = analyze_run(path, "moons", out=root / "run", samples=60, attacks=["pgd:steps=3"], eps=[0.05, 0.1, 0.2],
                      checks=False, report=False, mvl_top=2)
    return run.path


def test_harden_run_writes_a_hardened_model_that_reloads_and_reanalyzes(moons_run):
    from robaudit import analyze
    from robaudit.data import load_dataset
    from robaudit.models import load_model

    done = harden_run(moons_run, mvl_top=2, epochs=1, steps=3, batch_size=256, device="cpu")
    hdir = moons_run / "hardened"
    for name in ("model.pt", "lsa.csv", "accuracy.csv", "mvl.json", "manifest.json", "history.csv",
                 "comparison.csv", "harden.json"):
        assert (hdir / name).is_file(), name
    assert not (moons_run / CHECKPOINT_NAME).exists()
    comp = pd.read_csv(hdir / "comparison.csv")
    assert list(comp.columns) == ["kind", "attack", "eps", "norm", "layer", "before", "after", "delta"]
    assert set(comp["kind"]) == {"accuracy", "re"}
    assert list(comp.loc[comp["kind"] == "re", "layer"]) == done.result.mvl_layers
    settings = json.loads((hdir / "harden.json").read_text())
    assert settings["method"] == "atlr" and settings["eps"] == 0.1 and "command" in settings
    manifest = json.loads((hdir / "manifest.json").read_text())
    assert manifest["model"]["trust_model"] is False and manifest["hardened_from"]["method"] == "atlr"
    # the hardened model loads without --trust-model and analyzes to the numbers written
    loaded = load_model(hdir / "model.pt")
    test = load_dataset("moons", split="test", samples=60)
    again = analyze(loaded, test, attacks=["pgd:steps=3"], eps=[0.05, 0.1, 0.2], device="cpu", seed=0)
    written = pd.read_csv(hdir / "accuracy.csv")
    assert list(again.accuracy["accuracy"]) == pytest.approx(list(written["accuracy"]))


def test_harden_run_bad_input_leaves_everything_in_place(moons_run, tmp_path):
    before = {p.name: p.read_bytes() for p in moons_run.iterdir() if p.is_file()}
    for kw, needle in [(dict(mvl_top=99), "more than"), (dict(mvl_top=2, eps=0), "positive"),
                       (dict(mvl_top=2, dual_bn=True), "BatchNorm")]:
        with pytest.raises(RobauditError, match=needle):
            harden_run(moons_run, force=True, epochs=1, **kw)
    after = {p.name: p.read_bytes() for p in moons_run.iterdir() if p.is_file()}
    assert before == after
    with pytest.raises(RobauditError, match="not a robaudit run directory"):
        harden_run(tmp_path, mvl_top=2)


def test_cli_harden(moons_run):
    from robaudit.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["harden", "--run", str(moons_run), "--mvl-top", "1", "--epochs", "1", "--steps", "2",
                               "--batch-size", "256", "--method", "at", "--force", "--no-report", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "hardened model:" in res.output and "before" in res.output
    assert json.loads((moons_run / "hardened" / "harden.json").read_text())["method"] == "at"
    res = runner.invoke(main, ["harden", "--run", str(moons_run), "--mvl-top", "1", "--epochs", "1"])
    assert res.exit_code == 2 and "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(main, ["harden", "--run", str(moons_run), "--eps", "-1", "--force"])
    assert res.exit_code == 2 and "positive" in res.stderr


def test_the_control_rules_pick_the_layers_they_say(moons_run):
    """MoonsMLP's candidates in forward order: net.0 ... net.5 (Linear, ReLU, ...); net.6 is the output layer."""
    from robaudit.rundir import read_run
    from robaudit.stages.harden import _select_layers
    from robaudit.training.layers import LayerRule

    run = read_run(moons_run)
    pick = lambda rule, seed=0, **kw: _select_layers(run, kw.pop("top", 2), kw.pop("out", False), rule, seed)[0]
    assert pick(LayerRule.DEEPEST) == ["net.5", "net.4"]
    assert pick(LayerRule.DEEPEST, top=None) == ["net.5", "net.4"]  # as many as the run's MVL list (2)
    assert pick(LayerRule.DEEPEST, top=3, out=True) == ["net.6", "net.5", "net.4"]
    assert pick(LayerRule.RANDOM, 0) == ["net.3", "net.5"] == pick(LayerRule.RANDOM, 0)  # the same seed, the same draw
    assert pick(LayerRule.RANDOM, 1) == ["net.1", "net.4"]  # another seed, another draw
    names, ranking = _select_layers(run, 2, False, LayerRule.RANDOM, 0)
    assert ranking["layers_from"] == "random" and ranking["layers_rule"] == \
        "2 probed layers drawn at random (control), not the MVL list"
    with pytest.raises(RobauditError, match="--mvl-top 7 is more than the 6 layers"):
        _select_layers(run, 7, False, LayerRule.DEEPEST, 0)
    with pytest.raises(RobauditError, match="unknown --layers-from 'widest': use mvl, deepest, random"):
        LayerRule.of("widest")


def test_a_control_harden_records_its_rule_and_the_report_names_it(moons_run):
    from robaudit.stages.report import render_report

    done = harden_run(moons_run, mvl_top=2, layers_from="deepest", epochs=1, steps=1, batch_size=256, force=True,
                      device="cpu")
    assert done.result.mvl_layers == ["net.5", "net.4"]
    settings = json.loads((moons_run / "hardened" / "harden.json").read_text())
    assert settings["layers_from"] == "deepest" and settings["mvl_layers"] == ["net.5", "net.4"]
    assert "--layers-from deepest" in settings["command"]  # the command that reruns it
    manifest = json.loads((moons_run / "hardened" / "manifest.json").read_text())
    assert manifest["hardened_from"]["layers_from"] == "deepest"
    text = render_report(moons_run).read_text(encoding="utf-8")
    assert "Layers regularized: the 2 deepest probed layers (control), not the MVL list (net.5, net.4)." in text


def test_the_layerwise_perturbation_stays_within_layer_eps():
    from robaudit.metrics import relative_error
    from robaudit.training.layers import LayerwisePerturber

    layer = SimpleNamespace(name="l")
    p = LayerwisePerturber(0.1)
    p.active = True
    out = torch.tensor([[3.0, 4.0]], requires_grad=True)
    first = p(layer, out)  # the first batch runs unperturbed; its gradient's sign is kept
    assert torch.equal(first, out)
    (first * torch.tensor([[2.0, -1.0]])).sum().backward()
    # by hand: rms = 5 / sqrt(2), sign (1, -1): delta = 0.1 * 5 / sqrt(2) * (1, -1), ||delta|| = 0.5 = 0.1 * ||out||
    second = p(layer, torch.tensor([[3.0, 4.0]]))
    step = 0.5 / math.sqrt(2)
    assert torch.allclose(second, torch.tensor([[3.0 + step, 4.0 - step]]))
    torch.manual_seed(0)
    for eps in (0.05, 0.5):
        p = LayerwisePerturber(eps)
        p.active = True
        x = torch.randn(4, 3, 5, requires_grad=True)
        grad = torch.randn(4, 3, 5)
        grad[0, 0] = 0  # a zero gradient entry: no push there, so strictly less than eps
        (p(layer, x) * grad).sum().backward()
        batch = torch.randn(6, 3, 5)  # another batch size reuses the signs cyclically
        re = relative_error(batch, p(layer, batch))
        assert (re <= eps * (1 + 1e-6)).all()
        assert re[0] < eps and re[4] < eps  # rows 0 and 4 reuse the sign with zeros
        assert torch.allclose(re[[1, 2, 3, 5]], torch.full((4,), eps))


# ---------------------------------------------------------------------------------------------
# training streams its data


class ImageNet(nn.Module):
    """Conv-BN-ReLU, Conv-ReLU, pool, Linear: a tiny CNN for MNIST- or CIFAR-shaped inputs."""

    def __init__(self, channels: int, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(channels, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("fmt,method", [("idx", "atlr"), ("idx.gz", "layerwise"), ("cifar10", "at"),
                                        ("imagefolder", "atlr")])
def test_a_streamed_training_split_trains_exactly_as_the_same_split_in_memory(tmp_path, fmt, method):
    """Files in the real formats, loaded as float tensors and streamed: the same permutation, the same batches,
    so the same history and weights, bit for bit (validation held out of the streamed set too)."""
    from robaudit.data import Dataset, StreamingDataset, load_dataset
    from tests.test_data import write_cifar10, write_idx, write_images

    name, channels, classes = ("cifar10", 3, 10) if fmt == "cifar10" else ("mnist", 1, 10)
    if fmt == "cifar10":
        write_cifar10(tmp_path, n=14, protocol="py2")  # 5 training batches as published: 70 images read in place
    elif fmt == "imagefolder":  # decoded a sample at a time: no batch read
        write_images(tmp_path / "imgs", {"cat": [(8, 8)] * 35, "dog": [(8, 8)] * 35})
        name, channels, classes = f"imagefolder:{tmp_path / 'imgs'}", 3, 2
    else:
        write_idx(tmp_path, prefix="train", n=70, gz=fmt == "idx.gz")
    sets = [load_dataset(name, split="train", data_dir=tmp_path, download=False, stream=s) for s in (False, True)]
    assert isinstance(sets[0], Dataset) and isinstance(sets[1], StreamingDataset)
    if fmt != "imagefolder":
        assert sets[1].items.x.dtype == np.uint8  # the stored pixels, never a float copy
    kw = dict(method=method, mvl_layers=["features.2", "features.4"], epochs=2, eps=8 / 255, steps=2,
              batch_size=16, seed=3, check_collapse=False)
    models = [ImageNet(channels, classes), ImageNet(channels, classes)]
    results = [harden(m, d, **kw) for m, d in zip(models, sets)]
    cols = [c for c in results[0].history.columns if "seconds" not in c]
    pd.testing.assert_frame_equal(results[0].history[cols], results[1].history[cols])
    assert same_weights(weights(models[0]), weights(models[1]))
    assert results[0].validation == results[1].validation and "7 of 70" in results[0].validation


def test_data_workers_read_the_same_training_batches(tmp_path):
    """Worker processes decoding an image folder ahead (training and validation batches) change nothing:
    the same history and weights as reading in the main process."""
    from robaudit.data import load_dataset
    from tests.test_data import write_images

    write_images(tmp_path / "imgs", {"cat": [(8, 8)] * 20, "dog": [(8, 8)] * 20})
    data = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", split="train", stream=True)
    kw = dict(method="atlr", mvl_layers=["features.2"], epochs=2, eps=8 / 255, steps=2, batch_size=16, seed=3,
              check_collapse=False)
    models = [ImageNet(3, 2), ImageNet(3, 2)]
    results = [harden(m, data, workers=w, **kw) for m, w in zip(models, (0, 2))]
    cols = [c for c in results[0].history.columns if "seconds" not in c]
    pd.testing.assert_frame_equal(results[0].history[cols], results[1].history[cols])
    assert same_weights(weights(models[0]), weights(models[1]))
    assert results[1].settings["workers"] == 2


def test_workers_must_be_a_whole_number():
    with pytest.raises(RobauditError, match="--workers must be a whole number >= 0"):
        HardenConfig(workers=-1)


# ---------------------------------------------------------------------------------------------
# the re-analysis reloads the run's data as the analysis loaded it, streamed


def analyzed_run(tmp_path, fmt: str) -> tuple:
    """An exported tiny CNN analyzed on 12 shuffled test samples of an IDX, .npz or image folder data set written
    here; returns the run directory, the data set name and the keywords of its ``load_dataset`` call."""
    from robaudit.stages.analyze import analyze_run
    from tests.test_data import write_idx, write_images

    channels, kw = 1, dict(samples=12, shuffle=True, seed=5)
    if fmt == "idx":
        write_idx(tmp_path, prefix="t10k", n=20, gz=False)
        write_idx(tmp_path, prefix="train", n=32, gz=False)
        name, kw = "mnist", dict(kw, data_dir=tmp_path, download=False)
    elif fmt == "npz":
        rng = np.random.default_rng(2)
        for split, n in (("test", 20), ("train", 32)):
            np.savez(tmp_path / f"{split}.npz", x=rng.random((n, 1, 28, 28)).astype(np.float32), y=np.arange(n) % 10)
        name = str(tmp_path / "test.npz")
    else:
        write_images(tmp_path / "imgs", {"cat": [(30, 28)] * 10, "dog": [(28, 31)] * 10})
        (tmp_path / "map.json").write_text('["dog", "cat"]')
        channels, name = 3, f"imagefolder:{tmp_path / 'imgs'}"
        kw = dict(kw, image_size=28, class_map=tmp_path / "map.json")
    model_path = tmp_path / "m.pt2"
    from robaudit.models import export_model

    export_model(model_path, ImageNet(channels, 10 if fmt != "imagefolder" else 2), torch.rand(2, channels, 28, 28))
    run = analyze_run(model_path, name, out=tmp_path / "run", attacks=["pgd:steps=40"], eps=[0.1], report=False,
                      mvl_top=2, batch_size=5, **kw)
    return run.path, name, kw


@pytest.mark.parametrize("fmt", ["idx", "npz", "imagefolder"])
def test_the_run_data_reloads_the_samples_the_analysis_saw(tmp_path, fmt):
    from robaudit.data import Dataset, StreamingDataset, load_dataset
    from robaudit.rundir import read_run
    from robaudit.stages.analyze import load_run_data

    run_dir, name, kw = analyzed_run(tmp_path, fmt)
    seen = load_dataset(name, **kw)
    man = read_run(run_dir).manifest
    again, streamed = load_run_data(man, stream=False), load_run_data(man)
    assert isinstance(again, Dataset) and isinstance(streamed, StreamingDataset)
    assert torch.equal(again.x, seen.x) and torch.equal(again.y, seen.y) and torch.equal(streamed.y, seen.y)
    assert torch.equal(streamed.head(len(seen))[0], seen.x)
    samples = pd.read_csv(run_dir / "samples.csv")
    assert samples["label"].tolist() == seen.y.tolist()


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_a_streamed_reanalysis_writes_what_the_in_memory_one_writes(tmp_path, monkeypatch, fmt):
    """The hardened model's re-analysis (battery, samples.csv, BatchNorm audit, model checks) reads the run's
    test split batch by batch and writes the numbers it writes when the split is loaded as float tensors."""
    import robaudit.stages.harden as stage
    from robaudit.data import Dataset, StreamingDataset

    run_dir, _, _ = analyzed_run(tmp_path, fmt)
    loads, real = [], stage.load_run_data

    def spied(manifest, *, stream=True, download=True):
        loads.append(real(manifest, stream=stream, download=download))
        return loads[-1]

    kw = dict(mvl_top=2, epochs=1, steps=2, batch_size=8, device="cpu", check_collapse=False,
              train_data=tmp_path / "train.npz" if fmt == "npz" else None)
    outputs = []
    for stream in (True, False):
        monkeypatch.setattr(stage, "load_run_data", spied if stream else
                            lambda manifest, **k: spied(manifest, **{**k, "stream": False}))
        harden_run(run_dir, force=True, **kw)
        hdir = run_dir / "hardened"
        outputs.append({f: pd.read_csv(hdir / f).filter(regex="^(?!seconds)") for f in
                        ("lsa.csv", "accuracy.csv", "samples.csv", "bn.csv")})
        outputs[-1]["checks"] = {k: v for k, v in json.loads((hdir / "checks.json").read_text()).items()
                                 if "seconds" not in k}
    assert isinstance(loads[0], StreamingDataset) and isinstance(loads[1], Dataset)
    for f in ("lsa.csv", "accuracy.csv", "samples.csv", "bn.csv"):
        pd.testing.assert_frame_equal(outputs[0][f], outputs[1][f])
    assert outputs[0]["checks"] == outputs[1]["checks"] and outputs[0]["checks"]["n_samples"] > 0
    assert len(outputs[0]["bn.csv"]) == 1  # the BatchNorm audit read the stream too


def test_the_resume_fingerprint_leaves_out_processes_and_workers():
    """A checkpoint written with some number of processes or data workers resumes with any other."""
    from robaudit.training.fit import _fingerprint

    module = nn.Linear(2, 2)
    prints = [_fingerprint({"method": "atlr", "processes": p, "workers": w}, module, None) for p, w in ((1, 0), (2, 4))]
    assert prints[0] == prints[1] and "workers" not in prints[0]
