"""Samples folded into the batch (Swin's windows, MobileViT's patches): read per sample once a proof shows the
layout batch-major, in every path the probe serves (analysis, fixed-batch chunks, transforms, ops, training);
skipped with a warning when the proof fails."""
from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from tests.helpers import export_dynamic, export_fixed, rel_diff
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit import attacks
from robaudit.lsa import analyze
from robaudit.models import load_model
from robaudit.probe import LayerProbe

S, C, P = 3, 2, 4  # patch side, channels, patches per sample (a 2x2 grid of S x S patches)
RE_COLS = ["re_mean", "re_std", "re_pooled"]


def to_patches(h: torch.Tensor, major: bool) -> torch.Tensor:
    """``(n, C, 2S, 2S)`` -> ``(n*P, C, S*S)``: sample i's patches are rows 4i..4i+3 (``major``), or patch p of
    sample i is row p*n + i (sample-minor)."""
    n = h.shape[0]
    grid = h.reshape(n, C, 2, S, 2, S).permute(0, 2, 4, 1, 3, 5).reshape(n, P, C, S * S)
    return (grid if major else grid.transpose(0, 1)).reshape(n * P, C, S * S)


def from_patches(p: torch.Tensor, n: int, major: bool) -> torch.Tensor:
    grid = p.reshape(n, P, C, S, S) if major else p.reshape(P, n, C, S, S).transpose(0, 1)
    return grid.reshape(n, 2, 2, C, S, S).permute(0, 3, 1, 4, 2, 5).reshape(n, C, 2 * S, 2 * S)


class Patches(nn.Module):
    """MobileViT-like: a conv, its map cut into P patches folded into the batch, a layer on the patches (``mix``,
    ``act``, a residual add), folded back, a head. ``major``: batch-major folding, else sample-minor."""

    def __init__(self, major: bool = True, num_classes: int = 3) -> None:
        super().__init__()
        self.major = major
        self.conv = nn.Conv2d(1, C, 3, padding=1)
        self.mix = nn.Linear(S * S, S * S)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(C * 4 * S * S, num_classes)

    def forward(self, x):
        n = x.shape[0]
        p = to_patches(self.conv(x), self.major)
        p = p + self.drop(self.act(self.mix(p)))
        return self.head(from_patches(p, n, self.major).flatten(1))


def patches(major: bool = True, seed: int = 0) -> Patches:
    torch.manual_seed(seed)
    return Patches(major).eval()


def inputs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, 2 * S, 2 * S, generator=torch.Generator().manual_seed(seed)), torch.arange(n) % 3


def per_sample_act(model: Patches, x: torch.Tensor) -> torch.Tensor:
    """By hand: ``act``'s output on the patches, each sample's P patches as one row."""
    with torch.no_grad():
        return model.act(model.mix(to_patches(model.conv(x), True))).reshape(len(x), -1).double()


def test_a_batch_major_fold_is_read_per_sample():
    model = patches()
    x, _ = inputs(5)
    with LayerProbe(model, ["conv", "mix", "act", "head"]) as probe, torch.no_grad():
        logits, outs = probe.run(model, x)
    assert probe.folded == {"mix": P, "act": P} and not probe.unprobed
    assert outs["act"].shape == (5, P, C, S * S)
    torch.testing.assert_close(outs["act"].reshape(5, -1).double(), per_sample_act(model, x))
    torch.testing.assert_close(logits, model(x))  # the observed pass computes what the model computes


def test_the_folded_layers_relative_error_is_per_sample():
    """FGSM draws nothing: the same adversarial batches by hand, and RE over each sample's P patches."""
    model = patches()
    x, y = inputs(6)
    res = analyze(model, (x, y), attacks=["fgsm"], eps=[0.1], device="cpu", seed=0, probe="modules", batch_size=4)
    assert res.folded == {"mix": P, "act": P, "drop": P} and not res.unprobed
    row = res.lsa.set_index("layer").loc["act"]
    assert row["n_samples"] == 6  # samples, not patches
    fgsm = attacks.build(replace(attacks.parse("fgsm"), eps=0.1), model, num_classes=3)
    x_adv = torch.cat([fgsm(x[:4], y[:4]), fgsm(x[4:], y[4:])])
    clean, adv = per_sample_act(model, x), per_sample_act(model, x_adv)
    per_sample = (adv - clean).norm(dim=1) / clean.norm(dim=1)
    assert row["re_mean"] == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert row["re_std"] == pytest.approx(float(per_sample.std(unbiased=False)), rel=1e-4)
    assert row["re_pooled"] == pytest.approx(float((adv - clean).norm() / clean.norm()), rel=1e-5)


def test_a_sample_minor_fold_fails_the_proof_and_is_skipped():
    model = patches(major=False)
    x, y = inputs(6)
    with pytest.warns(UserWarning, match=r"layer act: its output \(32, 2, 9\) has no dimension of 8 rows \(2 stacked "
                                         r"batches of 4 samples\).*changing sample 0 alone changed row \d+, outside "
                                         r"its rows 0\.\.3.*not probed"):
        res = analyze(model, (x, y), attacks=["fgsm"], eps=[0.1], device="cpu", probe="modules", batch_size=4)
    assert sorted(res.unprobed) == ["act", "drop", "mix"] and not res.folded
    assert res.lsa["layer"].unique().tolist() == ["conv", "head"]


def test_the_proof_costs_four_small_passes_once_and_only_where_a_layer_needs_it():
    """A base pass of 3 samples and one per altered sample (first, middle, last), once per analysis; an analysis
    whose layers hold no folded rows runs none."""
    model = patches()
    x, y = inputs(12)

    def passes(layers):  # the batch size of every forward pass the analysis runs
        sizes = []
        handle = model.conv.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
        try:
            res = analyze(model, (x, y), attacks=["fgsm"], eps=[0.1], device="cpu", probe="modules", batch_size=4,
                          layers=layers)
        finally:
            handle.remove()
        return res, sizes

    plain, plain_sizes = passes(["conv", "head"])
    folded, folded_sizes = passes(["conv", "act", "head"])
    assert not plain.folded and folded.folded == {"act": P}
    assert 3 not in plain_sizes and sorted(folded_sizes) == sorted(plain_sizes + [3, 3, 3, 3])


def test_a_transform_sees_each_sample_and_its_result_goes_back_folded():
    model = patches()
    x, _ = inputs(3)
    seen = []

    def silence_sample_1(layer, t):
        seen.append(tuple(t.shape))
        t = t.clone()
        t[1] = 0
        return t

    with LayerProbe(model, ["act"], transform=silence_sample_1) as probe, torch.no_grad():
        logits, _ = probe.run(model, x)
    assert seen == [(3, P, C, S * S)]
    with torch.no_grad():  # by hand: sample 1's patches after act are zero, the others untouched
        p = to_patches(model.conv(x), True)
        a = model.act(model.mix(p)).reshape(3, P, C, S * S)
        a[1] = 0
        expected = model.head(from_patches(p + a.reshape(3 * P, C, S * S), 3, True).flatten(1))
    torch.testing.assert_close(logits, expected)


def test_a_fixed_batch_archive_reads_its_folded_layers_per_sample(tmp_path):
    model = patches()
    x, y = inputs(7)
    with pytest.warns(UserWarning, match="fixed batch size of 4"):
        fixed = load_model(export_fixed(model, tmp_path / "fixed.pt2", x[:4]))
    kw = dict(attacks=["fgsm"], eps=[0.1], batch_size=5, device="cpu", seed=0, probe="modules")
    got, want = analyze(fixed, (x, y), **kw), analyze(model, (x, y), **kw)
    assert got.folded == {"mix": P, "act": P, "drop": P} and want.folded == {"mix": P, "act": P, "drop": P}
    assert list(got.lsa["layer"]) == list(want.lsa["layer"])
    assert rel_diff(got.lsa[RE_COLS], want.lsa[RE_COLS]) <= 1e-5


def test_op_layers_of_a_graph_are_read_per_sample(tmp_path):
    model = patches()
    x, y = inputs(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(export_dynamic(model, tmp_path / "m.pt2", x[:2]))
    res = analyze(loaded, (x, y), attacks=["fgsm"], eps=[0.1], device="cpu", seed=0, probe="ops", batch_size=4)
    assert res.folded == {":add": P} and not res.unprobed
    eager = analyze(model, (x, y), attacks=["fgsm"], eps=[0.1], device="cpu", seed=0, probe="all", batch_size=4)
    assert set(eager.folded) == {"mix", "act", "drop", ":add"}
    fgsm = attacks.build(replace(attacks.parse("fgsm"), eps=0.1), model, num_classes=3)
    x_adv = torch.cat([fgsm(x[:4], y[:4]), fgsm(x[4:], y[4:])])
    with torch.no_grad():  # by hand: the residual sum, each sample's P patches as one row
        sums = [(lambda p: p + model.act(model.mix(p)))(to_patches(model.conv(v), True)).reshape(6, -1).double()
                for v in (x, x_adv)]
    per_sample = (sums[1] - sums[0]).norm(dim=1) / sums[0].norm(dim=1)
    row = res.lsa.set_index("layer").loc[":add"]
    assert row["re_mean"] == pytest.approx(float(per_sample.mean()), rel=1e-5)


def test_training_reads_the_folded_layer_per_sample_in_train_mode():
    """AT-LR's per-sample RE of a folded layer is the mean over samples, not over patches; the proof passes run in
    eval mode (the model's dropout would change every row) and leave the model in train mode."""
    from robaudit.training.objectives import atlr_objective

    model = patches().train()
    x, y = inputs(4)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    torch.manual_seed(5)
    loss, terms = atlr_objective(model, x, x_adv, y, layers=["mix"], re_mode="per-sample")
    assert model.training and model.drop.training
    with torch.no_grad():  # mix draws nothing: the same outputs by hand
        clean, adv = (model.mix(to_patches(model.conv(v), True)).reshape(4, -1) for v in (x, x_adv))
    per_sample = (adv - clean).norm(dim=1) / clean.norm(dim=1)
    assert float(terms["re:mix"].detach()) == pytest.approx(float(per_sample.mean()), rel=1e-5)
    loss.backward()
    assert model.mix.weight.grad is not None and float(model.mix.weight.grad.abs().sum()) > 0
    # after the dropout in train mode: a proof pass in train mode would see every row change (new masks)
    with LayerProbe(model, ["drop"], detach=False) as probe:
        _, outs = probe.run(model, x)
    assert probe.folded == {"drop": P} and outs["drop"].shape == (4, P, C, S * S) and model.drop.training


def test_the_layerwise_perturbation_is_sized_per_sample():
    """Layerwise AT adds ``layer_eps * rms_i * sign(g)`` to each sample's activation: RE ``layer_eps`` per sample,
    which holds only if ``rms_i`` is taken over the sample's P patches."""
    from robaudit.training.layers import LayerwisePerturber

    model = patches()
    x, _ = inputs(4)
    perturber = LayerwisePerturber(0.1)
    with LayerProbe(model, ["act"], detach=False, transform=perturber) as probe:
        perturber.active = True
        probe.reset()
        model(x).sum().backward()  # unperturbed: it keeps the gradient's signs
        _, outs = probe.run(model, x)
    assert perturber.signs["act"].shape == (4, P, C, S * S)
    clean = per_sample_act(model, x)
    re = (outs["act"].detach().reshape(4, -1).double() - clean).norm(dim=1) / clean.norm(dim=1)
    torch.testing.assert_close(re, torch.full((4,), 0.1, dtype=torch.float64), rtol=1e-4, atol=0)


def test_harden_regularizes_a_folded_layer():
    from robaudit.training.fit import harden

    model = patches()
    x, y = inputs(12)
    res = harden(model, (x, y), method="atlr", mvl_layers=["act"],
                 eps=0.05, epochs=1, steps=1, batch_size=4, device="cpu", val_fraction=0.25, check_collapse=False)
    assert res.final["re:act"] > 0


# -- timm's folding architectures (random weights, no network) -------------------------------------------------------
TIMM = {  # name -> (create_model keywords, image side, probe mode, a folded module checked by hand, folded op layers)
    "mobilevit_xxs": ({}, 64, "modules", "stages.3.1.transformer.0.mlp.act", []),
    "swin_tiny_patch4_window7_224": (dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2)),
                                     32, "all", "layers.0.blocks.1.attn.proj",
                                     ["layers.0.blocks.0.attn:add", "layers.0.blocks.1.attn:add"]),  # the mask's sum
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_models_that_fold_are_probed_at_every_activation(name):
    """MobileViT folds patches into the batch, Swin windows: every activation call (counted by a TorchFunctionMode)
    is a layer, nothing is skipped, and a folded layer's RE is each sample's, as computed by hand on the model."""
    timm = pytest.importorskip("timm")
    from tests.test_archs import ACTIVATION_TYPES, CountActivations

    kwargs, side, probe, layer, ops = TIMM[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    x = torch.rand(6, 3, side, side, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 3
    counter = CountActivations()
    with torch.no_grad(), counter:
        model(x[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's and torch.export's own deprecations
        warnings.simplefilter("error", UserWarning)  # no layer skipped
        res = analyze(model, (x, y), attacks=["fgsm"], eps=[0.03], device="cpu", seed=0, probe=probe, batch_size=4)
    activations = [l.name for l in res.layers if l.layer_type.lower() in ACTIVATION_TYPES]
    assert counter.n > 0 and len(activations) == counter.n and not res.unprobed
    assert res.folded[layer] > 1 and all(res.folded[op] == res.folded[layer] for op in ops)
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    fgsm = attacks.build(replace(attacks.parse("fgsm"), eps=0.03), model, num_classes=3)
    x_adv = torch.cat([fgsm(x[:4], y[:4]), fgsm(x[4:], y[4:])])
    seen.clear()
    with torch.no_grad():
        model(x), model(x_adv)
    handle.remove()
    clean, adv = (t.reshape(6, -1).double() for t in seen)  # timm folds batch-major: sample i's rows are a block
    per_sample = (adv - clean).norm(dim=1) / clean.norm(dim=1)
    row = res.lsa.set_index("layer").loc[layer]
    assert row["n_samples"] == 6 and row["re_mean"] == pytest.approx(float(per_sample.mean()), rel=1e-4)
