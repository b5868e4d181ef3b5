"""The architecture matrix: each family, as a ``.pt2`` and as a state dict + ``--arch``, loads, probes
the same layers with the same RE in both forms, shows every activation call as a layer, and goes
through analyze, one epoch of harden, and report."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.overrides import TorchFunctionMode

from tests import archs
from tests.helpers import ROOT, export_dynamic, rel_diff
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit.cli import main
from robaudit.lsa import analyze
from robaudit.models import load_model

KEYS = list(archs.ARCHS)
ATTACK = ["pgd:steps=2"]
EPS = [8 / 255]
N = 4
# calls that compute an activation, whether through a module (nn.ReLU calls F.relu) or directly
ACTIVATION_FUNCS = {F.relu, torch.relu, torch.Tensor.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.leaky_relu, F.elu,
                    torch.sigmoid, torch.tanh, torch.Tensor.sigmoid, torch.Tensor.tanh, F.relu_, torch.relu_,
                    torch.Tensor.relu_}
ACTIVATION_TYPES = {"relu", "relu6", "hardtanh", "gelu", "silu", "leakyrelu", "leaky_relu", "elu", "sigmoid", "tanh"}


class CountActivations(TorchFunctionMode):
    """Counts activation calls (the mode is off inside each call, so nested calls are not counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ACTIVATION_FUNCS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def importable(request):
    """The repository root on sys.path, so that ``tests.archs:Class`` resolves as an --arch."""
    import sys

    sys.path.insert(0, str(ROOT))
    yield
    sys.path.remove(str(ROOT))


@pytest.fixture(scope="module", params=KEYS)
def case(request, tmp_path_factory, importable):
    key = request.param
    folder = tmp_path_factory.mktemp(key)
    model = archs.build(key)
    cls, kwargs = archs.ARCHS[key]
    g = torch.Generator().manual_seed(3)
    x = torch.rand(N, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt2 = export_dynamic(model, folder / f"{key}.pt2", x)
    sd = folder / f"{key}.pt"
    torch.save(model.state_dict(), sd)
    arch = f"tests.archs:{cls.__name__}"
    kwargs = {**kwargs, "num_classes": 10}
    data = type("Data", (), {"x": x, "y": y, "num_classes": 10})()
    return {"key": key, "model": model, "pt2": pt2, "sd": sd, "arch": arch, "kwargs": kwargs, "x": x, "y": y,
            "data": data, "folder": folder}


@pytest.fixture(scope="module")
def analyses(case):
    """The analysis of the ``.pt2`` and of the state dict + --arch, with one cheap attack."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = load_model(case["pt2"])
        eager = load_model(case["sd"], arch=case["arch"], arch_kwargs=case["kwargs"])
        res_pt2 = analyze(exported, case["data"], attacks=ATTACK, eps=EPS, device="cpu", seed=0)
        res_eager = analyze(eager, case["data"], attacks=ATTACK, eps=EPS, device="cpu", seed=0)
    return exported, eager, res_pt2, res_eager


def test_both_forms_load_and_agree(case, analyses):
    exported, eager, _, _ = analyses
    assert exported.format == "export" and eager.format == "state_dict"
    with torch.no_grad():
        ref = case["model"](case["x"])
        torch.testing.assert_close(exported.module(case["x"]), ref)
        torch.testing.assert_close(eager.module(case["x"]), ref)


def test_same_layers_and_relative_error(analyses):
    _, _, a, b = analyses
    assert [l.name for l in a.layers] == [l.name for l in b.layers]
    assert list(a.lsa["layer"]) == list(b.lsa["layer"])
    assert list(a.lsa["layer_type"]) == list(b.lsa["layer_type"])
    for col in ("re_mean", "re_pooled"):
        assert rel_diff(a.lsa[col], b.lsa[col]) <= 1e-5
    assert (a.lsa["re_mean"] > 0).any()


def test_statistics_are_per_sample(analyses):
    """Every layer's statistics count the N samples, whatever its layout (a sequence-first encoder's (L, N, E))."""
    for res in analyses[2:]:
        assert (res.lsa["n_samples"] == N).all(), res.lsa.loc[res.lsa["n_samples"] != N, ["layer", "n_samples"]]


def test_module_hooks_on_the_eager_model_match_the_export(case, analyses):
    """Without ops, the eager model itself is hooked (no internal export): its layers and RE still match."""
    exported, eager, _, _ = analyses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = analyze(exported, case["data"], attacks=ATTACK, eps=EPS, device="cpu", seed=0, probe="modules")
        b = analyze(eager, case["data"], attacks=ATTACK, eps=EPS, device="cpu", seed=0, probe="modules")
    assert list(a.lsa["layer"]) == list(b.lsa["layer"])
    assert list(a.lsa["layer_type"]) == list(b.lsa["layer_type"])
    for col in ("re_mean", "re_pooled"):
        assert rel_diff(a.lsa[col], b.lsa[col]) <= 1e-5


def test_every_activation_call_is_a_layer(case, analyses):
    counter = CountActivations()
    with torch.no_grad(), counter:
        case["model"](case["x"][:2])
    assert counter.n > 0
    _, _, res, _ = analyses
    activations = [l.name for l in res.layers if l.layer_type.lower() in ACTIVATION_TYPES]
    assert len(activations) == counter.n, activations


def _invoke(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_analyze_harden_report(case):
    folder = case["folder"]
    np.savez(folder / "test.npz", x=case["x"].numpy(), y=case["y"].numpy())
    g = torch.Generator().manual_seed(5)
    xt = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        yt = case["model"](xt).argmax(1)
    np.savez(folder / "train.npz", x=xt.numpy(), y=yt.numpy())
    run = folder / "run"
    res = _invoke("analyze", case["pt2"], "--dataset", folder / "test.npz", "--attack", ATTACK[0], "--eps", "8/255",
                  "--no-checks", "--no-normalize", "--mvl-top", "2", "--out", run, "--no-progress")
    assert res.exit_code == 0, res.output
    mvl = json.loads((run / "mvl.json").read_text())
    assert len(mvl["layers"]) == 2
    dual = ["--dual-bn"] if case["key"] == "resnet18" else []
    res = _invoke("harden", "--run", run, "--epochs", "1", "--steps", "1", "--batch-size", "4", "--val-fraction",
                  "0.25", "--train-data", folder / "train.npz", "--eps", "8/255", *dual, "--no-progress")
    assert res.exit_code == 0, res.output
    hardened = run / "hardened"
    assert (hardened / "model.pt2").is_file() and (hardened / "lsa.csv").is_file()
    assert (run / "report.html").is_file()
    assert (hardened / "samples.csv").is_file()
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in case["model"].modules()):
        # the BatchNorm audit ran before and after hardening, and the report shows the shift after it
        assert (run / "bn.csv").is_file() and (hardened / "bn.csv").is_file()
        assert "adversarial vs clean, after hardening" in (run / "report.html").read_text()
    reloaded = load_model(hardened / "model.pt2")  # the hardened archive loads as safely as the original
    assert reloaded.format == "export"
