"""torchvision models by name (``torchvision:NAME --weights FILE``): ResNet-18 and ViT-B/16 at a small image size
from saved state dicts, analyzed end to end; normalization from the weights' transforms; the options that only a
library model takes are refused for a file."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit.cli import main
from robaudit.errors import RobauditError
from robaudit.sources import SourceOptions, load_any

tv = pytest.importorskip("torchvision")

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CASES = {"resnet18": ({}, 32), "vit_b_16": ({"image_size": 32}, 32)}


def _data(folder, model, size, n=4):
    """An .npz of ``n`` images labelled by the model itself (under ImageNet normalization), plus one of class 9."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n + 1, 3, size, size, generator=g)
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in IMAGENET)
    with torch.no_grad():
        y = model((x[:n] - mean) / std).argmax(1)
    np.savez(folder / "data.npz", x=x.numpy(), y=np.r_[y.numpy(), 9])
    return folder / "data.npz"


@pytest.mark.parametrize("name", list(CASES))
def test_a_torchvision_model_from_a_state_dict_is_analyzed(tmp_path, name):
    kwargs, size = CASES[name]
    torch.manual_seed(0)
    model = tv.models.get_model(name, num_classes=10, **kwargs).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    data = _data(tmp_path, model, size)
    args = ["analyze", f"torchvision:{name}", "--weights", tmp_path / "w.pth", "--dataset", data, "--samples", 4,
            "--attack", "pgd:steps=1", "--eps", "8/255", "--no-checks", "--no-report", "--out", tmp_path / "run"]
    if kwargs:
        args += ["--arch-kwargs", json.dumps(kwargs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["model"]["source"]["spec"] == f"torchvision:{name}"
    assert man["model"]["source"]["library_version"] == tv.__version__
    assert man["normalization"]["mean"] == pytest.approx(IMAGENET[0])
    assert man["normalization"]["origin"].startswith("torchvision")
    table = pd.read_csv(tmp_path / "run" / "lsa.csv")  # torchvision's own module names
    modules = dict(model.named_modules())
    assert all(layer.split("#")[0].split(":")[0] in modules for layer in table["layer"]), list(table["layer"])
    expected = {"resnet18": "layer4.1.relu#2", "vit_b_16": "encoder.layers.encoder_layer_11.mlp.1"}[name]
    assert expected in set(table["layer"])  # ResNet's ReLU called twice; ViT's GELU in its MLP


def test_the_options_of_library_models_are_refused_for_files(tmp_path):
    from robaudit import examples

    with pytest.raises(RobauditError, match="--weights applies to a library model"):
        load_any(examples.path("digits_cnn"), num_classes=10, options=SourceOptions(weights=tmp_path / "w.pth"))
    with pytest.raises(RobauditError, match="--arch applies to a state dict"):
        load_any("torchvision:resnet18", num_classes=10, arch="x.py:Net")
    with pytest.raises(RobauditError, match="torchvision has no model 'resnet_nope'"):
        load_any("torchvision:resnet_nope", num_classes=10)
    with pytest.raises(RobauditError, match="is not a weights name of resnet18: use one of DEFAULT, IMAGENET1K_V1"):
        load_any("torchvision:resnet18", num_classes=1000, options=SourceOptions(pretrained="NOPE"))


def test_pretrained_weights_are_never_downloaded_under_no_download():
    with pytest.raises(RobauditError, match="--no-download forbids"):
        load_any("torchvision:resnet18", num_classes=10, options=SourceOptions(pretrained="IMAGENET1K_V1",
                                                                                download=False))


def test_a_pickle_given_as_weights_is_refused_without_running(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"fc.weight": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(RobauditError, match="holds more than weights"):
        load_any("torchvision:resnet18", num_classes=10, options=SourceOptions(weights=tmp_path / "evil.pth"))


def test_a_forged_safetensors_header_is_refused(tmp_path):
    """A header that promises more than the file holds, or a tensor outside the file, is refused before a byte of
    weights is read."""
    import struct

    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(RobauditError, match="declares a 1,099,511,627,776-byte header in a 10-byte file"):
        load_any("torchvision:resnet18", num_classes=10, options=SourceOptions(weights=path))
    header = json.dumps({"fc.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 4000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 40)
    with pytest.raises(RobauditError, match="tensor 'fc.bias' lies outside the file"):
        load_any("torchvision:resnet18", num_classes=10, options=SourceOptions(weights=path))
