"""Op-level probing: functional activations, residual additions and attention outputs as layers."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_no_hooks, export_dynamic, make_cnn, make_data
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit.errors import RobauditError
from robaudit.training.fit import harden
from robaudit.lsa import analyze
from robaudit.exported import as_graph, make_trainable
from robaudit.models import load_model
from robaudit.probe import LayerProbe, select_modules

FUNCS = {  # layer type -> the call, on a tensor of values in (-2, 2)
    "relu": F.relu, "relu#torch": torch.relu, "relu#method": torch.Tensor.relu, "gelu": F.gelu, "silu": F.silu,
    "relu6": F.relu6, "leaky_relu": lambda t: F.leaky_relu(t, 0.1), "elu": F.elu, "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


class Block(nn.Module):
    """``fc2(relu(fc1(relu(x)))) + x``, the activations functional (a PreAct block's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        out = self.fc2(F.relu(self.fc1(F.relu(x))))
        out += x
        return out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(torch.tanh(self.blocks(x))))


NET_LAYERS = ["blocks.0:relu", "blocks.0.fc1", "blocks.0:relu#2", "blocks.0.fc2", "blocks.0:add",
              "blocks.1:relu", "blocks.1.fc1", "blocks.1:relu#2", "blocks.1.fc2", "blocks.1:add",
              ":tanh", "act", "head"]


def net():
    torch.manual_seed(0)
    return Net().eval()


def data_for(model, n=6, shape=(4,)):
    x = torch.rand(n, *shape) * 2 - 0.5
    with torch.no_grad():
        y = model(x).argmax(1)
    return SimpleNamespace(x=x, y=y, num_classes=3)


def test_functional_ops_are_layers_named_after_their_caller():
    model = net()
    graph, types = as_graph(model, torch.rand(2, 4))
    names = select_modules(graph, type_map=types)
    x = torch.rand(3, 4)
    with LayerProbe(graph, names, type_map=types) as probe, torch.no_grad():
        logits, outs = probe.run(graph, x)
        outs = dict(outs)
    assert list(outs) == NET_LAYERS
    assert {l.name: l.layer_type for l in probe.layers}[":tanh"] == "tanh"
    b0 = model.blocks[0]
    with torch.no_grad():
        h = b0.fc1(F.relu(x))
        torch.testing.assert_close(outs["blocks.0:relu"], F.relu(x))
        torch.testing.assert_close(outs["blocks.0:relu#2"], F.relu(h))
        torch.testing.assert_close(outs["blocks.0:add"], b0(x))
        torch.testing.assert_close(logits, model(x))
    assert_no_hooks(graph)


@pytest.mark.parametrize("mode, expected", [
    ("all", NET_LAYERS),
    ("modules", [n for n in NET_LAYERS if ":" not in n]),
    ("ops", [n for n in NET_LAYERS if ":" in n]),
])
def test_probe_modes(mode, expected):
    model = net()
    res = analyze(model, data_for(model), attacks=["gaussian"], eps=[0.1], device="cpu", probe=mode)
    assert [l.name for l in res.layers] == expected


def test_layer_types_match_modules_and_ops():
    model = net()
    graph, types = as_graph(model, torch.rand(2, 4))
    assert select_modules(graph, type_map=types, layer_types=["relu"]) == [
        "act", "blocks.0:relu", "blocks.1:relu"]
    assert select_modules(graph, type_map=types, layer_types=["add"]) == ["blocks.0:add", "blocks.1:add"]
    with pytest.raises(RobauditError, match="unknown probe mode"):
        select_modules(graph, type_map=types, probe="everything")


def test_eager_and_export_give_the_same_op_layers(tmp_path):
    model = net()
    loaded = load_model(export_dynamic(model, tmp_path / "net.pt2", torch.rand(2, 4)))
    data = data_for(model)
    a = analyze(model, data, attacks=["pgd:steps=2"], eps=[0.2], device="cpu")
    b = analyze(loaded, data, attacks=["pgd:steps=2"], eps=[0.2], device="cpu")
    assert list(a.lsa["layer"]) == list(b.lsa["layer"])
    assert list(b.lsa.drop_duplicates("layer")["layer"]) == NET_LAYERS
    torch.testing.assert_close(torch.tensor(a.lsa["re_mean"].values), torch.tensor(b.lsa["re_mean"].values))


@pytest.mark.parametrize("kind", list(FUNCS))
def test_each_functional_activation_is_probed(kind):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(FUNCS[kind](x))

    graph, types = as_graph(One().eval(), torch.rand(2, 4))
    names = select_modules(graph, type_map=types, probe="ops")
    op = kind.split("#")[0]
    assert names == [f":{op}"]
    x = torch.rand(3, 4) * 4 - 2
    with LayerProbe(graph, names, type_map=types) as probe, torch.no_grad():
        _, outs = probe.run(graph, x)
    torch.testing.assert_close(outs[f":{op}"], FUNCS[kind](x))


def test_scalar_additions_are_not_layers():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x + 1.0)

    graph, types = as_graph(Shift().eval(), torch.rand(2, 4))
    assert select_modules(graph, type_map=types, probe="all") == ["fc"]


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.head((x + y).mean(1))


def test_attention_output_is_its_first_tensor(tmp_path):
    torch.manual_seed(1)
    model = Attn().eval()
    x = torch.rand(3, 5, 4)
    with torch.no_grad():
        expected = model.attn(x, x, x)[0]
    loaded = load_model(export_dynamic(model, tmp_path / "attn.pt2", x))
    for module, types in ((model, None), (loaded.module, loaded.type_map)):
        names = select_modules(module, type_map=types, probe="modules")
        assert names == ["attn", "head"]
        with LayerProbe(module, names, type_map=types) as probe, torch.no_grad():
            _, outs = probe.run(module, x)
        torch.testing.assert_close(outs["attn"], expected)
        assert probe.layers[0].layer_type == "MultiheadAttention"


def test_a_transform_on_an_op_layer_changes_what_follows():
    model = net()
    graph, types = as_graph(model, torch.rand(2, 4))
    x = torch.rand(3, 4)
    with LayerProbe(graph, ["blocks.1:add"], type_map=types, transform=lambda layer, t: torch.zeros_like(t)) as p:
        with torch.no_grad():
            logits, _ = p.run(graph, x)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.head(model.act(torch.zeros(3, 4))))


def test_harden_an_eager_model_on_op_layers():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = data_for(model, 16)
    res = harden(model, data, method="atlr", mvl_layers=["blocks.0:relu#2", "blocks.1:add"], eps=0.1, epochs=1,
                 steps=1, batch_size=8, device="cpu", val_fraction=0.25)
    assert res.module is model  # trained in place, through its graph
    assert not torch.equal(model.state_dict()["blocks.0.fc1.weight"], before["blocks.0.fc1.weight"])
    assert res.final["re:blocks.1:add"] > 0  # the regularizer saw the op layer


def test_rebuilt_leaves_train_like_eager(tmp_path):
    cnn = make_cnn(3)
    loaded = load_model(export_dynamic(cnn, tmp_path / "cnn.pt2", torch.rand(2, 1, 8, 8)))
    keys = list(loaded.module.state_dict())
    rebuilt, frozen = make_trainable(loaded.module, loaded.type_map)
    assert rebuilt == ["features.1"] and frozen == []
    assert list(loaded.module.state_dict()) == keys
    x = torch.rand(6, 1, 8, 8)
    cnn.train()
    loaded.module.train()
    torch.testing.assert_close(loaded.module(x), cnn(x))  # batch statistics, and the running ones updated alike
    torch.testing.assert_close(loaded.module.state_dict()["features.1.running_mean"], cnn.features[1].running_mean)
    cnn.eval()
    loaded.module.eval()
    torch.testing.assert_close(loaded.module(x), cnn(x))


def test_dual_bn_on_an_export(tmp_path):
    cnn = make_cnn(4)
    loaded = load_model(export_dynamic(cnn, tmp_path / "cnn.pt2", torch.rand(2, 1, 8, 8)))
    start = loaded.module.state_dict()["features.1.running_mean"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "frozen" warning any more
        res = harden(loaded, make_data(cnn, 16), method="atlr", mvl_layers=["features.2"], eps=0.05, epochs=1,
                     steps=1, batch_size=8, dual_bn=True, device="cpu", val_fraction=0.25)
    assert res.bn_at_test.startswith("adversarial")
    assert not torch.equal(loaded.module.state_dict()["features.1.running_mean"], start)


def test_harden_a_fixed_batch_export(tmp_path):
    from tests.helpers import export_fixed

    cnn = make_cnn(5)
    with pytest.warns(UserWarning, match="fixed batch size of 4"):
        loaded = load_model(export_fixed(cnn, tmp_path / "fixed.pt2", torch.rand(4, 1, 8, 8)))
    res = harden(loaded, make_data(cnn, 14), method="atlr", mvl_layers=["features.2", "features.5"], eps=0.05,
                 epochs=1, steps=1, batch_size=8, device="cpu", val_fraction=0.25, check_collapse=False)
    assert any("batches of 4" in n for n in res.notes)
    assert res.settings["batch_size"] == 4
    assert res.final["re:features.5"] > 0


@pytest.mark.parametrize("mode", ["modules", "ops"])
def test_cli_probe_option(tmp_path, mode):
    import json

    import numpy as np
    import pandas as pd
    from click.testing import CliRunner

    from robaudit.cli import main

    model = net()
    data = data_for(model, 8)
    pt2 = export_dynamic(model, tmp_path / "net.pt2", data.x)
    np.savez(tmp_path / "d.npz", x=(data.x.clamp(0, 1)).numpy(), y=data.y.numpy())
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["analyze", str(pt2), "--dataset", str(tmp_path / "d.npz"), "--attack",
                                    "fgsm", "--eps", "0.1", "--probe", mode, "--no-checks", "--no-report",
                                    "--mvl-top", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    layers = list(dict.fromkeys(pd.read_csv(out / "lsa.csv")["layer"]))
    assert layers == [n for n in NET_LAYERS if (":" in n) == (mode == "ops")]
    assert json.loads((out / "manifest.json").read_text())["layers"]["probe"] == mode


def test_a_model_that_cannot_be_exported_is_probed_by_modules():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return F.relu(h) if float(h.sum()) > 1e9 else h  # data-dependent: torch.export refuses it

    torch.manual_seed(0)
    model = Branchy().eval()
    with pytest.warns(UserWarning, match="cannot be exported.*only its modules"):
        res = analyze(model, data_for(model), attacks=["gaussian"], eps=[0.1], device="cpu")
    assert [l.name for l in res.layers] == ["fc"]
