"""timm models by name (``timm:NAME --weights FILE.safetensors``): eleven families built at a small input size
with random weights, analyzed end to end with every activation call probed under the library's own module names;
the manifest records the source; three of them go through one epoch of harden and come back from their record."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from tests.test_archs import ACTIVATION_FUNCS, ACTIVATION_TYPES, CountActivations
from robaudit.cli import main
from robaudit.errors import RobauditError
from robaudit.safeio import file_digest
from robaudit.sources import SourceOptions, load_any
from robaudit.stages.analyze import analyze_run

timm = pytest.importorskip("timm")

# name -> (timm arguments that make it small, input size)
ARCHS = {
    "resnet18d": ({}, 32),  # ResNet-D: deep stem, average-pool downsample; one ReLU module per block called twice
    "efficientnet_b0": ({}, 32),
    "mobilenetv3_small_050": ({}, 32),  # hard-swish / hard-sigmoid
    "convnext_atto": ({}, 32),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "deit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "swin_tiny_patch4_window7_224": ({"img_size": 32, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1),
                                      "num_heads": (1, 2, 2, 2)}, 32),  # windows folded into the batch
    "mobilevit_xxs": ({}, 64),  # patches folded into the batch
    "regnetx_002": ({}, 32),
    "densenet121": ({"growth_rate": 8, "block_config": (2, 2, 2, 2)}, 32),
    "mixer_s32_224": ({"img_size": 32}, 32),  # MLP-Mixer: one 32x32 patch
}
HARDENED = ("vit_tiny_patch16_224", "regnetx_002", "densenet121")
N = 4
FUNCS = ACTIVATION_FUNCS | {torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid}
TYPES = ACTIVATION_TYPES | {"hardswish", "hardsigmoid"}


class CountAll(CountActivations):
    """Activation calls, hard-swish and hard-sigmoid (MobileNetV3) included."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in FUNCS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request, tmp_path_factory):
    name = request.param
    kwargs, size = ARCHS[name]
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N + 1, 3, size, size, generator=g)
    cfg = model.pretrained_cfg  # the labels are the model's own answers under the normalization robaudit applies
    mean, std = (torch.tensor(cfg[k]).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        y = model((x - mean) / std).argmax(1)
    np.savez(folder / "data.npz", x=x.numpy(), y=np.r_[y[:N].numpy(), 9])  # label 9 once: ten classes
    x = x[:N]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = analyze_run(f"timm:{name}", str(folder / "data.npz"), arch_kwargs=kwargs, samples=N,
                          attacks=["pgd:steps=1"], eps=[8 / 255], checks=False, report=False, out=folder / "run",
                          source_options=SourceOptions(weights=weights))
    return {"name": name, "model": model, "x": x, "weights": weights, "folder": folder, "run": run}


def test_every_activation_call_is_probed(case):
    counter = CountAll()
    with torch.no_grad(), counter:
        case["model"](case["x"][:2])
    lsa = case["run"].result.lsa
    probed = lsa.loc[lsa["layer_type"].str.lower().isin(TYPES), "layer"].unique()
    assert counter.n > 0 and len(probed) == counter.n, (counter.n, list(probed))
    # per sample, folded layouts too; 0 only where the clean output is exactly zero (timm's zero-initialized
    # last BatchNorm of a residual block, a zero-initialized head)
    assert lsa["n_samples"].isin([0, N]).all(), lsa.loc[lsa["n_samples"] != N, ["layer", "n_samples"]]
    assert not case["run"].result.unprobed, case["run"].result.unprobed


def test_layer_names_are_the_librarys_own(case):
    modules = dict(case["model"].named_modules())
    for layer in case["run"].result.lsa["layer"].unique():
        module = re.sub(r"(#\d+)?(:.*)?$", "", layer)  # `blocks.0.act#2`, `layers.0.blocks.0.attn:add`
        assert module in modules or module == "", layer


def test_the_manifest_records_the_source(case):
    man = json.loads((case["folder"] / "run" / "manifest.json").read_text())
    src = man["model"]["source"]
    assert src["spec"] == f"timm:{case['name']}" and src["library"] == "timm"
    assert src["library_version"] == timm.__version__
    assert src["arch_kwargs"] == json.loads(json.dumps(ARCHS[case["name"]][0]))
    assert man["model"]["format"] == "timm" and man["model"]["sha256"] == file_digest(case["weights"])
    cfg = case["model"].pretrained_cfg
    assert man["normalization"] == {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "origin": "timm pretrained_cfg"}
    assert "--weights" in man["command"]
    assert ("--arch-kwargs" in man["command"]) == bool(ARCHS[case["name"]][0])


def test_harden_one_epoch_and_rebuild_from_the_record(case):
    if case["name"] not in HARDENED:
        pytest.skip("three families are hardened")
    from robaudit.stages.harden import harden_run

    run_dir = case["folder"] / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = harden_run(run_dir, epochs=1, batch_size=N, mvl_top=2, device="cpu", train_data=run_dir.parent /
                          "data.npz")
    man = json.loads((run_dir / "hardened" / "manifest.json").read_text())
    assert man["model"]["source"]["weights"] == str(run_dir.resolve() / "hardened" / "model.safetensors")
    again = load_any(f"timm:{case['name']}", num_classes=10, arch_kwargs=ARCHS[case["name"]][0],
                     options=SourceOptions(weights=run_dir / "hardened" / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again.module(case["x"]), done.result.module.cpu().eval()(case["x"]))
    # downstream commands read the run as any other: the report, the comparison and the gate name its spec
    runner = CliRunner()
    page = runner.invoke(main, ["report", "--run", str(run_dir)], catch_exceptions=False)
    assert page.exit_code == 0 and f"timm:{case['name']}" in (run_dir / "report.html").read_text()
    both = runner.invoke(main, ["compare", str(run_dir), str(run_dir / "hardened"), "--json"], catch_exceptions=False)
    assert both.exit_code == 0 and json.loads(both.output)
    gate = runner.invoke(main, ["check", str(run_dir), "--json"], catch_exceptions=False)
    assert gate.exit_code == 0 and json.loads(gate.output)["model"] == f"timm:{case['name']}"


def test_unknown_names_and_mismatched_weights_are_one_line(tmp_path):
    with pytest.raises(RobauditError, match="timm has no model 'resnet_nope'"):
        load_any("timm:resnet_nope", num_classes=10)
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t", num_classes=10).state_dict().items()},
              str(weights))
    with pytest.raises(RobauditError, match="do not fit timm:resnet10t.*--num-classes"):
        load_any("timm:resnet10t", num_classes=100, options=SourceOptions(weights=weights))
    with pytest.raises(RobauditError, match="--no-download forbids"):
        load_any("timm:resnet10t", num_classes=10, options=SourceOptions(pretrained="DEFAULT", download=False))
