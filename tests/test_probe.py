"""Layer selection and hooks: repeated modules, filters on eager and exported models, cleanup."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.helpers import CNN_LAYERS, CNN_RELUS, assert_no_hooks, export_dynamic, make_cnn, make_data, make_twice
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit.errors import RobauditError
from robaudit.lsa import analyze
from robaudit.models import load_model
from robaudit.probe import LayerProbe, module_types, select_modules

TWICE_LAYERS = ["fc1", "act", "fc2", "act#2", "fc3"]


@pytest.fixture(scope="module")
def cnn():
    return make_cnn()


@pytest.fixture(scope="module")
def cnn_pt2(cnn, tmp_path_factory):
    return load_model(export_dynamic(cnn, tmp_path_factory.mktemp("probe") / "cnn.pt2", torch.rand(2, 1, 8, 8)))


@pytest.fixture(params=["eager", "pt2"])
def model_and_types(request, cnn, cnn_pt2):
    """The same CNN as an eager module and as an unflattened ``.pt2`` (original classes from the type map)."""
    if request.param == "eager":
        return cnn, None
    return cnn_pt2.module, cnn_pt2.type_map


# ---------------------------------------------------------------------------------------------
# repeated modules


def probe_twice(model, type_map=None):
    names = select_modules(model, type_map=type_map)
    assert names == ["fc1", "act", "fc2", "fc3"]
    with LayerProbe(model, names, type_map=type_map) as probe:
        logits, outs = probe.run(model, torch.rand(3, 4))
        outs = dict(outs)
    assert_no_hooks(model)
    return probe, logits, outs


def test_module_called_twice_gives_two_layers():
    model = make_twice()
    probe, logits, outs = probe_twice(model)
    assert list(outs) == TWICE_LAYERS
    assert [(l.name, l.module, l.call, l.order, l.layer_type) for l in probe.layers] == [
        ("fc1", "fc1", 1, 0, "Linear"), ("act", "act", 1, 1, "ReLU"), ("fc2", "fc2", 1, 2, "Linear"),
        ("act#2", "act", 2, 3, "ReLU"), ("fc3", "fc3", 1, 4, "Linear")]
    # each call's own output: act is relu(fc1), act#2 is relu(fc2)
    torch.testing.assert_close(outs["act"], outs["fc1"].clamp_min(0))
    torch.testing.assert_close(outs["act#2"], outs["fc2"].clamp_min(0))
    torch.testing.assert_close(outs["fc3"], logits)


def test_module_called_twice_in_an_export(tmp_path):
    model = make_twice()
    loaded = load_model(export_dynamic(model, tmp_path / "twice.pt2", torch.rand(2, 4)))
    assert loaded.format == "export"
    probe, logits, outs = probe_twice(loaded.module, loaded.type_map)
    assert list(outs) == TWICE_LAYERS
    assert [l.layer_type for l in probe.layers] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    torch.testing.assert_close(outs["act#2"], outs["fc2"].clamp_min(0))
    # and analyze names the layers the same way for both
    x = torch.rand(6, 4)
    data = SimpleNamespace(x=x, y=model(x).argmax(1).detach(), num_classes=3)
    eager = analyze(model, data, attacks=["gaussian"], eps=[0.1], device="cpu")
    exported = analyze(loaded, data, attacks=["gaussian"], eps=[0.1], device="cpu")
    assert list(eager.lsa["layer"]) == list(exported.lsa["layer"]) == TWICE_LAYERS
    assert list(exported.lsa["layer_type"]) == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


class _Block(nn.Module):
    """A residual block calling its one in-place ReLU twice (as torchvision's BasicBlock does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        out += x
        return self.relu(out)


def test_nested_module_called_twice_in_an_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block(), nn.Flatten(), nn.Linear(32, 3)).eval()
    loaded = load_model(export_dynamic(model, tmp_path / "blocks.pt2", torch.rand(2, 2, 4, 4)))
    x = torch.rand(5, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x))
    names = select_modules(loaded.module, layer_types=["ReLU"], type_map=loaded.type_map)
    assert names == ["0.relu", "1.relu"]
    with LayerProbe(loaded.module, names, type_map=loaded.type_map) as probe, torch.no_grad():
        _, outs = probe.run(loaded.module, x)
        outs = dict(outs)
    assert list(outs) == ["0.relu", "0.relu#2", "1.relu", "1.relu#2"]
    with torch.no_grad():
        first = model[0].relu(model[0].conv1(x).clone())
    torch.testing.assert_close(outs["0.relu"], first)


def test_reset_restarts_call_counting():
    model = make_twice()
    with LayerProbe(model, ["act"]) as probe:
        for _ in range(2):
            _, outs = probe.run(model, torch.rand(2, 4))
            assert list(outs) == ["act", "act#2"]
        probe.reset()
        model(torch.rand(2, 4))
        model(torch.rand(2, 4))  # without reset the calls keep counting
        assert list(probe.outputs()) == ["act", "act#2", "act#3", "act#4"]


# ---------------------------------------------------------------------------------------------
# layer filters, on an eager module and an unflattened .pt2


def test_all_leaf_layers(model_and_types):
    model, types = model_and_types
    assert select_modules(model, type_map=types) == CNN_LAYERS


def test_filter_by_type(model_and_types):
    model, types = model_and_types
    assert select_modules(model, layer_types=["ReLU"], type_map=types) == CNN_RELUS
    assert select_modules(model, layer_types=["relu", " conv2d "], type_map=types) == [
        "features.0", "features.2", "features.4", "features.5"]


def test_filter_by_glob(model_and_types):
    model, types = model_and_types
    assert select_modules(model, patterns=["features.*"], type_map=types) == CNN_LAYERS[:7]
    assert select_modules(model, patterns=["classifier.1", "features.[02]"], type_map=types) == [
        "features.0", "features.2", "classifier.1"]
    assert select_modules(model, layer_types=["Linear"], patterns=["classifier.*"], type_map=types) == [
        "classifier.1"]


def test_unknown_type_is_refused(model_and_types):
    model, types = model_and_types
    with pytest.raises(RobauditError, match=r"no layer \(module or functional op\) of type gelu.*ReLU"):
        select_modules(model, layer_types=["GELU"], type_map=types)


def test_filters_that_match_nothing(model_and_types):
    model, types = model_and_types
    with pytest.raises(RobauditError, match="no layer matches names head.*features.0"):
        select_modules(model, patterns=["head.*"], type_map=types)
    with pytest.raises(RobauditError, match="no layer matches types ReLU and names classifier"):
        select_modules(model, layer_types=["ReLU"], patterns=["classifier.*"], type_map=types)


def test_export_keeps_original_classes(cnn_pt2):
    types = module_types(cnn_pt2.module, cnn_pt2.type_map)
    assert [types[n] for n in CNN_LAYERS] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU",
                                              "MaxPool2d", "Flatten", "Linear"]
    # without the type map the unflattened modules are generic
    assert "ReLU" not in module_types(cnn_pt2.module).values()


def test_relu_hooks_fire_on_an_export(cnn, cnn_pt2):
    x = torch.rand(5, 1, 8, 8)
    got = {}
    for key, (model, types) in {"eager": (cnn, None), "pt2": (cnn_pt2.module, cnn_pt2.type_map)}.items():
        names = select_modules(model, layer_types=["ReLU"], type_map=types)
        with LayerProbe(model, names, type_map=types) as probe:
            _, outs = probe.run(model, x)
            got[key] = dict(outs)
        assert_no_hooks(model)
    assert list(got["pt2"]) == CNN_RELUS
    for name in CNN_RELUS:
        torch.testing.assert_close(got["pt2"][name], got["eager"][name], rtol=1e-5, atol=1e-6)
        assert (got["pt2"][name] >= 0).all()


def test_analyze_with_layer_types_on_an_export(cnn, cnn_pt2):
    data = make_data(cnn, 6)
    res = analyze(cnn_pt2, data, attacks=["gaussian"], eps=[0.05], layer_types=["ReLU"], device="cpu")
    assert list(res.lsa["layer"]) == CNN_RELUS
    assert set(res.lsa["layer_type"]) == {"ReLU"}
    assert_no_hooks(cnn_pt2.module)


# ---------------------------------------------------------------------------------------------
# hooks never outlive the probe


def test_hooks_removed_after_success(cnn):
    with LayerProbe(cnn, CNN_LAYERS) as probe:
        assert sum(len(m._forward_hooks) for m in cnn.modules()) == len(CNN_LAYERS)
        probe.run(cnn, torch.rand(2, 1, 8, 8))
    assert_no_hooks(cnn)
    probe.remove()  # idempotent
    assert_no_hooks(cnn)


def test_hooks_removed_after_an_exception_in_the_block(cnn):
    with pytest.raises(ValueError, match="boom"):
        with LayerProbe(cnn, CNN_LAYERS) as probe:
            probe.run(cnn, torch.rand(2, 1, 8, 8))
            raise ValueError("boom")
    assert_no_hooks(cnn)


def test_hooks_removed_after_an_exception_in_the_forward(cnn):
    def bad_transform(layer, out):
        if layer.name == "features.4":
            raise RuntimeError("transform failed")
        return out

    with pytest.raises(RuntimeError, match="transform failed"):
        with LayerProbe(cnn, CNN_LAYERS, transform=bad_transform) as probe:
            probe.run(cnn, torch.rand(2, 1, 8, 8))
    assert_no_hooks(cnn)


def test_unknown_module_name_registers_nothing(cnn):
    with pytest.raises(RobauditError, match="no module named 'features.9'"):
        with LayerProbe(cnn, ["features.0", "features.9"]):
            pass  # pragma: no cover
    assert_no_hooks(cnn)


class Bomb(nn.Module):
    """Wraps a model and raises on its ``n``-th forward pass run without gradients (or with them)."""

    def __init__(self, inner: nn.Module, *, n: int, grad: bool) -> None:
        super().__init__()
        self.inner, self.n, self.grad, self.calls = inner, n, grad, 0

    def forward(self, x):
        if torch.is_grad_enabled() == self.grad:
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError("model exploded")
        return self.inner(x)


@pytest.mark.parametrize("where, n, grad", [
    # no-grad calls: one hooked pass per batch (clean and perturbed stacked; the first batch's also checks
    # that model and data fit, and after a failure a small forward pass tells a misfit from other errors)
    ("hooked pass of the first batch", 1, False),
    ("inside the attack", 1, True),
    ("hooked pass of the second batch", 2, False),
])
def test_hooks_removed_when_analyze_fails(where, n, grad):
    model = Bomb(make_cnn(), n=n, grad=grad).eval()
    data = make_data(model.inner, 6)
    with pytest.raises(RuntimeError, match="model exploded"):
        analyze(model, data, attacks=["fgsm"], eps=[0.03], batch_size=4, device="cpu", probe="modules")
    assert_no_hooks(model)


def test_hooks_removed_when_analyze_fails_with_normalization():
    model = Bomb(make_cnn(), n=1, grad=False).eval()  # the first hooked pass
    data = make_data(model.inner, 4)
    with pytest.raises(RuntimeError, match="model exploded"):
        analyze(model, data, attacks=["fgsm"], eps=[0.03], mean=[0.5], std=[0.25], device="cpu", probe="modules")
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------
# in-place operations after a probed layer


class Residual(nn.Module):
    """``head(relu(lin(x) + x))``, with the addition done in place (as ResNet blocks do) or not."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out = self.lin(x)
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.head(self.act(out))


def relu_mlp(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3)).eval()


def residual(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return Residual(inplace).eval()


@pytest.mark.parametrize("make, layer", [(relu_mlp, "0"), (residual, "lin")], ids=["inplace-relu", "residual-add"])
def test_in_place_ops_do_not_rewrite_recorded_outputs(make, layer):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    recorded = {}
    for inplace in (False, True):
        model = make(inplace)
        with LayerProbe(model, [layer]) as probe, torch.no_grad():
            _, outs = probe.run(model, x)
            recorded[inplace] = outs[layer]
    torch.testing.assert_close(recorded[True], recorded[False])


@pytest.mark.parametrize("make", [relu_mlp, residual], ids=["inplace-relu", "residual-add"])
def test_an_export_records_the_right_outputs_in_every_pass(make, tmp_path):
    """Every pass of an export with in-place ops records what the model without in-place ops computes."""
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    reference = make(False)
    graph = load_model(export_dynamic(make(True), tmp_path / "m.pt2", xs[0])).module
    names = select_modules(graph, probe="modules")
    with LayerProbe(graph, names) as probe, LayerProbe(reference, names) as ref, torch.no_grad():
        for x in xs:
            got, want = dict(probe.run(graph, x)[1]), dict(ref.run(reference, x)[1])
            assert list(got) == list(want)
            for name in names:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_analyze_is_blind_to_in_place_ops():
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(2))
    frames = []
    for inplace in (False, True):
        model = residual(inplace)
        data = SimpleNamespace(x=x, y=model(x).argmax(1).detach(), num_classes=3)
        frames.append(analyze(model, data, attacks=["fgsm"], eps=[0.05], device="cpu").lsa)
    assert frames[0]["re_mean"].tolist() == pytest.approx(frames[1]["re_mean"].tolist(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# recording modes


def test_transform_replaces_the_output(cnn):
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        plain = cnn(x)
    with LayerProbe(cnn, ["features.5"], transform=lambda layer, out: torch.zeros_like(out)) as probe:
        with torch.no_grad():
            logits, outs = probe.run(cnn, x)
    assert (outs["features.5"] == 0).all()
    # with the last ReLU zeroed, the logits are the classifier's bias
    torch.testing.assert_close(logits, cnn.classifier[1].bias.expand(3, -1))
    assert not torch.allclose(logits, plain)
    assert_no_hooks(cnn)


def test_detach_false_keeps_the_graph(cnn):
    x = torch.rand(2, 1, 8, 8)
    with LayerProbe(cnn, CNN_RELUS, detach=False) as probe:
        _, outs = probe.run(cnn, x)
        outs["features.5"].sum().backward()
    assert cnn.features[0].weight.grad is not None
    cnn.zero_grad(set_to_none=True)
    with LayerProbe(cnn, CNN_RELUS) as probe:
        _, outs = probe.run(cnn, x)
    assert not outs["features.5"].requires_grad


def test_paused_probe_records_nothing_and_resumes(cnn):
    with LayerProbe(cnn, CNN_LAYERS) as probe:
        with probe.paused():
            _, outs = probe.run(cnn, torch.rand(2, 1, 8, 8))
            assert len(outs) == 0 and probe.layers == []
            assert all(not m._forward_hooks for m in cnn.modules())
        _, outs = probe.run(cnn, torch.rand(2, 1, 8, 8))
        assert list(outs) == CNN_LAYERS


class SeqFirst(nn.Module):
    """A sequence-first block: ``mix`` sees ``(L, N, E)``, as nn.MultiheadAttention's default layout does."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 3)
        self.pool = nn.Identity()
        with torch.no_grad():
            self.mix.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]))
            self.mix.bias.zero_()

    def forward(self, x):  # x: N x L x 3
        h = self.mix(x.transpose(0, 1))  # L x N x 3
        return self.pool(h.sum(0))  # N x 3


def test_a_sequence_first_layer_is_recorded_batch_first():
    model = SeqFirst().eval()
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3) / 10  # N=2, L=5
    with LayerProbe(model, ["mix", "pool"]) as probe:
        _, outs = probe.run(model, x)
    expected = torch.einsum("nld,ed->nle", x, model.mix.weight)  # the mixed sequence of each sample, batch first
    torch.testing.assert_close(outs["mix"], expected)
    assert outs["pool"].shape == (2, 3)


def test_a_sequence_first_layer_gives_per_sample_relative_error():
    from dataclasses import replace

    from robaudit import attacks

    model = SeqFirst().eval()
    x = torch.rand(6, 5, 3, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    res = analyze(model, (x, y), attacks=["fgsm"], eps=[0.1], device="cpu", seed=0, probe="modules", batch_size=4)
    row = res.lsa.set_index("layer").loc["mix"]
    assert row["n_samples"] == 6  # samples, not sequence positions
    # by hand: FGSM has no random start, so the same adversarial batches, and RE over each sample's L x E block
    fgsm = attacks.build(replace(attacks.parse("fgsm"), eps=0.1), model, num_classes=3)
    x_adv = torch.cat([fgsm(x[:4], y[:4]), fgsm(x[4:], y[4:])])
    clean, adv = model.mix(x).detach().double(), model.mix(x_adv).detach().double()
    per_sample = (adv - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)
    assert row["re_mean"] == pytest.approx(float(per_sample.mean()), rel=1e-5)
    pooled = (adv - clean).norm() / clean.norm()
    assert row["re_pooled"] == pytest.approx(float(pooled), rel=1e-5)


def test_an_output_without_a_batch_dimension_is_not_probed():
    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Linear(3, 3)
            self.summary = nn.Identity()

        def forward(self, x):
            h = self.scale(x)
            self.summary(h.mean(0))  # one vector for the whole batch: no per-sample activation
            return h

    model = Stats().eval()
    with pytest.warns(UserWarning, match="summary.*no dimension of the batch of 4,"):
        with LayerProbe(model, ["scale", "summary"]) as probe:
            _, outs = probe.run(model, torch.rand(4, 3))
    assert list(outs) == ["scale"]
    # in the analysis' pass, the clean batch and the perturbed one are stacked: the warning says so
    x, y = torch.rand(4, 3), torch.arange(4) % 3
    with pytest.warns(UserWarning, match=r"summary.*no dimension of 8 rows \(2 stacked batches of 4 samples\)"):
        res = analyze(model, (x, y), attacks=["fgsm"], eps=[0.1], batch_size=4, device="cpu", probe="modules")
    assert res.lsa["layer"].unique().tolist() == ["scale"]


class FoldWindows(nn.Module):
    """A Swin-like block: 2x2 windows of an n x 3 x 2m x 2m map folded into the batch as (4n, 3, m, m), batch-major
    (sample i's windows are rows 4i..4i+3, as Swin folds them) or sample-minor (window w of sample i is row w*n + i).

    With m equal to the rows of a pass, the folded output has that many entries at dims 2 and 3 and none at
    dim 0, so which dimension holds the samples cannot be told from its shape: only a proof pass tells."""

    def __init__(self, m: int, num_classes: int = 3, *, major: bool = True) -> None:
        super().__init__()
        self.m, self.major = m, major
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.window = nn.ReLU()
        self.head = nn.Linear(3 * 4 * m * m, num_classes)

    def windows(self, h):
        n, m = h.shape[0], self.m
        w = h.reshape(n, 3, 2, m, 2, m).permute(0, 2, 4, 1, 3, 5).reshape(n, 4, 3, m, m)
        return (w if self.major else w.transpose(0, 1)).reshape(4 * n, 3, m, m)

    def forward(self, x):
        n, m = x.shape[0], self.m
        h = self.window(self.windows(self.conv(x)))
        w = h.reshape(n, 4, 3, m, m) if self.major else h.reshape(4, n, 3, m, m).transpose(0, 1)
        back = w.reshape(n, 2, 2, 3, m, m).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, 2 * m, 2 * m)
        return self.head(back.flatten(1))


def _analyze_run(model, tmp_path):
    import numpy as np

    from robaudit.models import LoadedModel
    from robaudit.stages.analyze import analyze_run

    np.savez(tmp_path / "w.npz", x=torch.rand(12, 1, 16, 16).numpy(), y=(np.arange(12) % 3))
    done = analyze_run(LoadedModel(module=model, format="checkpoint"), str(tmp_path / "w.npz"), out=tmp_path / "run",
                       attacks=["fgsm"], eps=[0.1], batch_size=4, probe="modules", checks=False, device="cpu")
    return done, (tmp_path / "run" / "report.html").read_text()


def test_a_layer_of_unclear_layout_is_skipped_and_the_audit_goes_on(tmp_path):
    """One internal op's layout never stops an audit: the layer is left out with a warning, recorded in the
    result, the manifest and the report, and every other layer is analyzed."""
    torch.manual_seed(0)
    # sample-minor windows: the proof that each sample's rows are a block fails. The analysis stacks 2 batches of
    # 4 samples: 8 rows, like the window side
    model = FoldWindows(m=8, major=False).eval()
    with pytest.warns(UserWarning, match=r"window: its output \(32, 3, 8, 8\) has 8 entries at dims 2, 3 .*not probed"):
        with LayerProbe(model, ["conv", "window", "head"]) as probe:
            _, outs = probe.run(model, torch.rand(8, 1, 16, 16))
    assert list(outs) == ["conv", "head"] and list(probe.unprobed) == ["window"] and not probe.folded
    assert "changing sample 0 alone changed row" in probe.unprobed["window"]
    x, y = torch.rand(12, 1, 16, 16), torch.arange(12) % 3
    with pytest.warns(UserWarning, match="window: .*not probed"):
        res = analyze(model, (x, y), attacks=["fgsm"], eps=[0.1], batch_size=4, device="cpu", probe="modules")
    assert res.lsa["layer"].unique().tolist() == ["conv", "head"] and list(res.unprobed) == ["window"]
    assert "dims 2, 3" in res.unprobed["window"]
    with pytest.warns(UserWarning, match="window: .*not probed"):
        done, page = _analyze_run(model, tmp_path)
    assert list(done.manifest["unprobed_layers"]) == ["window"] and done.manifest["folded_layers"] == {}
    assert "Not probed (1)" in page and "<code>window</code>" in page and "folded into the batch (" not in page


def test_windows_folded_batch_major_are_read_per_sample_and_listed(tmp_path):
    """Swin's layout: each sample's windows are a block of rows; the proof shows it, and the layer is read per
    sample even where its shape alone is unclear (8 entries at dims 2 and 3, for 8 rows)."""
    torch.manual_seed(0)
    model = FoldWindows(m=8).eval()
    x = torch.rand(8, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped
        with LayerProbe(model, ["conv", "window", "head"]) as probe, torch.no_grad():
            _, outs = probe.run(model, x)
    assert list(outs) == ["conv", "window", "head"] and probe.folded == {"window": 4}
    with torch.no_grad():  # by hand: each sample's 4 windows
        torch.testing.assert_close(outs["window"], model.windows(model.conv(x)).relu().reshape(8, 4, 3, 8, 8))
    done, page = _analyze_run(model, tmp_path)
    assert done.manifest["folded_layers"] == {"window": 4} and done.manifest["unprobed_layers"] == {}
    assert "window" in set(done.result.lsa["layer"])
    assert "folded into the batch (1)" in page and "<code>window</code> (4 rows per sample)" in page
    assert "Not probed (" not in page
