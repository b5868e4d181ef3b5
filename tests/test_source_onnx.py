"""``model.onnx`` as MODEL: a CNN exported with ``torch.onnx.export`` analyzed and hardened like its original, the
conversion checked against onnxruntime, and the ways a hostile file could reach outside itself refused."""
from __future__ import annotations

import builtins
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from robaudit.data import load_dataset
from robaudit.errors import RobauditError
from robaudit.models import LoadedModel
from robaudit.sources import SourceOptions, load_any, onnx_source, reload_recorded
from robaudit.sources.weights import read_state_dict
from robaudit.stages.analyze import analyze_run
from robaudit.stages.harden import harden_run
from tests.helpers import make_cnn
from tests.test_cli import assert_one_line_failure, invoke

DIGITS_CLASSES = 10
ANALYSIS = dict(samples=16, attacks=["pgd:steps=2"], eps=[0.1], checks=False, report=False, device="cpu")
# onnx2torch's module for each layer of TinyCNN, in order (features.0 ... classifier.1)
CONVERTED = [("Conv", "Conv2d"), ("BatchNormalization", "BatchNorm2d"), ("Relu", "ReLU"), ("MaxPool", "MaxPool2d"),
             ("Conv", "Conv2d"), ("Relu", "ReLU"), ("MaxPool", "MaxPool2d"), ("Flatten", "Flatten"),
             ("Gemm", "Linear")]


def export(module: torch.nn.Module, path: Path, *, batch: int | None = None, fold: bool = True) -> Path:
    """``module`` exported by torch's TorchScript-based exporter (``fold``: BatchNorm folded into the Conv before
    it, as that exporter does by default), with a dynamic batch axis, or the batch size ``batch`` fixed."""
    x = torch.rand(batch or 2, 1, 8, 8)
    dynamic = {"input": {0: "batch"}} if batch is None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=["logits"], dynamo=False,
                          dynamic_axes=dynamic, do_constant_folding=fold)
    return path


@pytest.fixture(scope="module")
def cnn():
    return make_cnn(num_classes=DIGITS_CLASSES)


@pytest.fixture(scope="module")
def cnn_onnx(cnn, tmp_path_factory) -> Path:
    """The CNN with a dynamic batch axis, BatchNorm kept as its own node (one ONNX node per torch module)."""
    return export(cnn, tmp_path_factory.mktemp("onnx") / "cnn.onnx", batch=None, fold=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def onnx_run(cnn_onnx, tmp_path_factory):
    return analyze_run(cnn_onnx, "digits", out=tmp_path_factory.mktemp("runs") / "onnx", **ANALYSIS)


# -- analysis ------------------------------------------------------------------------------------------------

def test_the_converted_cnn_is_analyzed_as_its_original(cnn, cnn_onnx, onnx_run, tmp_path):
    """Same layers in the same order, each of onnx2torch's class for the op, and the same relative errors: the
    graph takes its inputs as they are, so the original runs without normalization too."""
    original = analyze_run(LoadedModel(module=cnn, format="checkpoint"), "digits", out=tmp_path / "torch",
                           normalize=False, **ANALYSIS)
    ours, theirs = onnx_run.result.lsa, original.result.lsa
    assert list(ours["layer"]) == [f"features/features/{i}/{op}" for i, (op, _) in enumerate(CONVERTED[:7])] + [
        f"classifier/classifier/{i}/{op}" for i, (op, _) in enumerate(CONVERTED[7:])]
    assert list(ours["layer_type"]) == [cls for _, cls in CONVERTED] == list(theirs["layer_type"])
    assert (ours["re_mean"] > 0).all() and (ours["re_pooled"] > 0).all()
    for column in ("re_mean", "re_pooled"):
        np.testing.assert_allclose(ours[column].to_numpy(), theirs[column].to_numpy(), rtol=0, atol=1e-4)
    pd.testing.assert_frame_equal(onnx_run.result.accuracy.drop(columns="seconds"),
                                  original.result.accuracy.drop(columns="seconds"))
    source = onnx_run.manifest["model"]["source"]
    assert source["library"] == "onnx" and source["spec"] == str(cnn_onnx) and source["weights"] is None
    assert source["onnx_checked_inputs"] == 8 and source["onnx_max_abs_diff"] < 1e-5
    assert source["onnx_max_rel_diff"] <= onnx_source.FIDELITY_TOL


def test_analyze_model_onnx_from_the_command_line(cnn_onnx, tmp_path):
    out = tmp_path / "run"
    result = invoke("analyze", cnn_onnx, "--dataset", "digits", "--samples", "16", "--attack", "pgd:steps=2",
                    "--eps", "0.1", "--no-checks", "--no-report", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    lsa = pd.read_csv(out / "lsa.csv")
    assert {"features/features/2/Relu", "features/features/5/Relu"} <= set(lsa["layer"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["format"] == "onnx" and manifest["model"]["source"]["spec"] == str(cnn_onnx)
    assert manifest["model"]["source"]["onnx_opset"] == 20
    line = next(l for l in result.output.splitlines() if l.startswith("ONNX conversion:"))
    assert line.endswith(f"on {manifest['model']['source']['onnx_checked_inputs']} inputs")  # printed, not only logged


@pytest.mark.parametrize("batch, checked", [(1, 8), (8, 9)])
def test_a_fixed_batch_file_is_checked_in_chunks_and_on_another_batch_size(cnn, digits, tmp_path, batch, checked):
    """A file exported at one batch size (torch.onnx.export's default without dynamic axes): onnxruntime runs
    the inputs in chunks of that size, the converted graph all at once, with one input more when the example
    has that size, so that the graph is seen to take another."""
    path = export(cnn, tmp_path / "fixed.onnx", batch=batch)
    x = digits.head(8)[0]
    loaded = load_any(path, num_classes=DIGITS_CLASSES, example=x)
    with torch.no_grad():
        expected = cnn(x[:3])
        got = loaded.module(x[:3])
    assert torch.allclose(got, expected, atol=1e-5)
    assert loaded.source["onnx_checked_inputs"] == checked and loaded.source["onnx_max_rel_diff"] < 1e-5


def test_a_graph_that_fixes_its_batch_size_is_refused_with_the_export_hint(tmp_path):
    shape = numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "shape")
    model = _model([helper.make_node("Reshape", ["X", "shape"], ["Y"])], [2, 2], [2, 2], [shape])
    path = _save(model, tmp_path / "fixed.onnx")
    moons = load_dataset("moons")
    with pytest.raises(RobauditError, match="fixes the batch size at 2: export it with a dynamic batch axis"):
        load_any(path, num_classes=2, example=moons.head(8)[0])


# -- fidelity ------------------------------------------------------------------------------------------------

@pytest.fixture
def off_by(monkeypatch):
    """A converter that adds ``delta`` to the last layer's bias: every logit moves by exactly ``delta``."""
    real = onnx_source.convert

    def set_delta(delta: float) -> None:
        def convert(model, path):
            module = real(model, path)
            with torch.no_grad():
                dict(module.named_modules())["classifier/classifier/1/Gemm"].bias.add_(delta)
            return module
        monkeypatch.setattr(onnx_source, "convert", convert)
    return set_delta


def test_a_conversion_that_differs_from_onnxruntime_is_refused(cnn, cnn_onnx, digits, off_by, tmp_path):
    x = digits.head(8)[0]
    with torch.no_grad():
        largest = float(cnn(x).abs().max())
    off_by(0.01)
    result = invoke("analyze", cnn_onnx, "--dataset", "digits", "--samples", "16", "--out", tmp_path / "r")
    assert_one_line_failure(result, "differs from onnxruntime", "--force-convert")
    assert not (tmp_path / "r").exists()
    with pytest.warns(UserWarning, match="kept because of --force-convert"):
        loaded = load_any(cnn_onnx, num_classes=DIGITS_CLASSES, example=x,
                          options=SourceOptions(force_convert=True))
    assert loaded.source["onnx_max_abs_diff"] == pytest.approx(0.01, rel=1e-4)
    assert loaded.source["onnx_max_rel_diff"] == pytest.approx(0.01 / largest, rel=1e-3)
    assert loaded.source["onnx_forced"] is True


def test_the_difference_is_logged_and_a_model_without_inputs_is_not_checked(cnn_onnx, digits, caplog):
    with caplog.at_level(logging.INFO, logger="robaudit.sources.onnx_source"):
        load_any(cnn_onnx, num_classes=DIGITS_CLASSES, example=digits.head(4)[0])
    assert "cnn.onnx: converted graph vs onnxruntime on 4 inputs: max abs logit difference" in caplog.text
    unchecked = load_any(cnn_onnx, num_classes=DIGITS_CLASSES)
    assert unchecked.source["onnx_fidelity"].startswith("not checked")
    assert "onnx_max_abs_diff" not in unchecked.source


# -- hardening -----------------------------------------------------------------------------------------------

def test_harden_one_epoch_saves_the_graphs_weights_and_rebuilds_it(onnx_run, cnn_onnx):
    done = harden_run(onnx_run.path, mvl_top=2, epochs=1, steps=1, batch_size=256, device="cpu")
    assert done.model_path.name == "model.safetensors"
    manifest = json.loads((done.hardened_dir / "manifest.json").read_text())
    source = manifest["model"]["source"]
    assert source["library"] == "onnx" and source["spec"] == str(cnn_onnx)
    assert Path(source["weights"]) == done.model_path and manifest["model"]["format"] == "onnx"
    rebuilt = reload_recorded(source, num_classes=DIGITS_CLASSES, trust_model=False)
    saved = read_state_dict(done.model_path)
    state = rebuilt.module.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    original = load_any(cnn_onnx, num_classes=DIGITS_CLASSES).module.state_dict()
    assert any(not torch.equal(original[k], saved[k]) for k in saved)  # training changed the weights


# -- hostile and malformed files -----------------------------------------------------------------------------

def _model(nodes, in_dims, out_dims, initializers=(), *, opset: int = 17, outputs=("Y",)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, in_dims)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_dims) for o in outputs],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def external(tmp_path):
    """A linear classifier whose weight lies in ``w.bin`` beside it, and a copy of those bytes outside."""
    folder, outside = tmp_path / "model", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    w = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    weight = numpy_helper.from_array(w, "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(w.nbytes))):
        weight.external_data.add(key=key, value=value)
    (folder / "w.bin").write_bytes(w.tobytes())
    (outside / "w.bin").write_bytes(w.tobytes())
    model = _model([helper.make_node("Gemm", ["X", "W"], ["Y"], transB=1)], ["N", 4], ["N", 2], [weight])
    return folder, outside, model, w


def _located(model, location: str, length: int | None = None):
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
        if entry.key == "length" and length is not None:
            entry.value = str(length)
    return model


def test_external_data_beside_the_model_is_read(external):
    folder, _, model, w = external
    loaded = load_any(_save(model, folder / "m.onnx"), num_classes=2, example=torch.rand(3, 4))
    x = torch.rand(5, 4)
    assert torch.allclose(loaded.module(x), x @ torch.from_numpy(w).T)
    assert loaded.source["onnx_max_rel_diff"] < 1e-6


@pytest.mark.parametrize("where, message", [
    ("absolute", "an absolute path"),
    ("parent", "a path out of the model's folder"),
    ("link", "outside the model's folder (a link)"),
])
def test_external_data_outside_the_models_folder_is_refused_unread(external, monkeypatch, where, message):
    folder, outside, model, _ = external
    target = outside / "w.bin"
    location = {"absolute": str(target), "parent": "../outside/w.bin", "link": "link.bin"}[where]
    (folder / "link.bin").symlink_to(target)
    path = _save(_located(model, location), folder / "m.onnx")
    opened = []
    for module in (builtins, io, os):  # every way Python code opens a file
        real = getattr(module, "open")
        monkeypatch.setattr(module, "open", lambda f, *a, real=real, **k: opened.append(f) or real(f, *a, **k))
    with pytest.raises(RobauditError, match=re.escape(message)) as err:
        load_any(path, num_classes=2, example=torch.rand(3, 4))
    assert "\n" not in str(err.value)
    assert not [f for f in opened if Path(f).resolve() == target.resolve()]


def test_external_data_must_fit_its_file_and_its_tensor(external):
    folder, _, model, w = external
    path = _save(_located(model, "w.bin", length=w.nbytes + 4), folder / "m.onnx")
    with pytest.raises(RobauditError, match="truncated or forged"):
        load_any(path, num_classes=2)


def test_what_current_exporters_write_is_rewritten_for_onnx2torch(tmp_path, caplog):
    """Opset 20, a Conv weight shared through Identity, ReduceMean with its axes as an input (opset 18) and
    Reshape with allowzero=1, as torch's exporters write them: onnx2torch takes none of the three as written."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "W0"),
             numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape")]
    nodes = [helper.make_node("Identity", ["W0"], ["W"]), helper.make_node("Conv", ["X", "W"], ["C"], pads=[1] * 4),
             helper.make_node("Relu", ["C"], ["R"]), helper.make_node("ReduceMean", ["R", "axes"], ["M"]),
             helper.make_node("Reshape", ["M", "shape"], ["Y"], allowzero=1)]
    path = _save(_model(nodes, ["N", 1, 8, 8], ["N", 4], inits, opset=20), tmp_path / "new.onnx")
    x = torch.rand(8, 1, 8, 8)
    with caplog.at_level(logging.INFO, logger="robaudit.sources"):
        loaded = load_any(path, num_classes=4, example=x)
    assert "new.onnx: converted from opset 20 to 17 for onnx2torch" in caplog.text
    expected = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(numpy_helper.to_array(inits[0]).copy()),
                                                     padding=1)).mean(dim=(2, 3))
    assert torch.allclose(loaded.module(x), expected, atol=1e-6)
    assert loaded.source["onnx_max_rel_diff"] < 1e-6


def test_a_file_that_is_not_onnx_is_one_line(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe definitely not a protobuf \x00\x01")
    result = invoke("analyze", junk, "--dataset", "digits", "--out", tmp_path / "r")
    assert_one_line_failure(result, "junk.onnx is not an ONNX model")
    assert_one_line_failure(invoke("analyze", tmp_path / "missing.onnx", "--dataset", "digits"), "not found")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(RobauditError, match="empty.onnx is not an ONNX model"):
        load_any(tmp_path / "empty.onnx", num_classes=10)


def test_a_hostile_node_name_never_reaches_generated_code(tmp_path):
    """torch.fx writes submodule names into the Python source of ``forward``: a quote in an ONNX node name would
    end the string there and run what follows at every call."""
    mark = tmp_path / "ran"
    evil = f'r"); open({str(mark)!r}, "w"); getattr(self, "x'
    model = _model([helper.make_node("Relu", ["X"], ["Y"], name=evil)], ["N", 4], ["N", 4])
    loaded = load_any(_save(model, tmp_path / "m.onnx"), num_classes=4, example=torch.rand(3, 4) - 0.5)
    loaded.module(torch.rand(2, 4))
    assert not mark.exists()
    names = [n for n, _ in loaded.module.named_modules() if n]
    assert len(names) == 1 and set(names[0]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_/-")


@pytest.mark.parametrize("node, needle", [
    (helper.make_node("FusedConv", ["X"], ["Y"], domain="com.microsoft"), "com.microsoft.FusedConv of a custom domain"),
    (helper.make_node("Hardmax", ["X"], ["Y"]), "cannot convert the operator Hardmax (opset 17)"),
])
def test_operators_onnx2torch_cannot_convert_are_named(tmp_path, node, needle):
    model = _model([node], ["N", 4], ["N", 4])
    with pytest.raises(RobauditError, match=re.escape(needle)):
        load_any(_save(model, tmp_path / "m.onnx"), num_classes=4)


def test_a_graph_that_is_not_a_classifier_for_the_data_is_refused(tmp_path, digits):
    two = _model([helper.make_node("Relu", ["X"], ["Y"]), helper.make_node("Relu", ["X"], ["Z"])], ["N", 4],
                 ["N", 4], outputs=("Y", "Z"))
    with pytest.raises(RobauditError, match="1 inputs and 2 outputs"):
        load_any(_save(two, tmp_path / "two.onnx"), num_classes=4)
    flat = _model([helper.make_node("Relu", ["X"], ["Y"])], ["N", 64], ["N", 10])
    with pytest.raises(RobauditError, match="takes inputs of rank 2 and the data set gives rank 4"):
        load_any(_save(flat, tmp_path / "flat.onnx"), num_classes=10, example=digits.head(2)[0])
    wide = _model([helper.make_node("Flatten", ["X"], ["Y"])], ["N", 3, 8, 8], ["N", 192])
    with pytest.raises(RobauditError, match="takes 3x8x8 inputs and the data set gives 1x8x8"):
        load_any(_save(wide, tmp_path / "wide.onnx"), num_classes=10, example=digits.head(2)[0])


def test_the_class_count_comes_from_the_files_output(tmp_path):
    model = _model([helper.make_node("Relu", ["X"], ["Y"])], ["N", 4], ["N", 4])
    with pytest.raises(RobauditError, match="has 4 classes and the data set 10: pass --num-classes 4"):
        load_any(_save(model, tmp_path / "m.onnx"), num_classes=10)


def test_a_missing_onnx_package_names_the_extra(monkeypatch, cnn_onnx):
    monkeypatch.setitem(__import__("sys").modules, "onnx2torch", None)
    with pytest.raises(RobauditError, match=r"pip install 'robaudit\[onnx\]'"):
        load_any(cnn_onnx, num_classes=DIGITS_CLASSES)
