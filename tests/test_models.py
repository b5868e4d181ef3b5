"""Model loading in every supported format, refusals with one-line errors, compatibility checks, saving."""
from __future__ import annotations

import hashlib
import os
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

from tests.helpers import (CNN_LAYERS, CNN_RELUS, HELPERS_FILE, ROOT, accuracy_numbers, assert_no_hooks,
                           export_dynamic, export_fixed, make_cnn, make_data, rel_diff)
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit.errors import NonFiniteError, RobauditError
from robaudit.lsa import LSA_COLUMNS, analyze
from robaudit.models import (Normalized, check_compatible, load_model, save_checkpoint, save_exported_weights,
                             with_normalization)
from robaudit.probe import LayerProbe, select_modules

ARCH_KWARGS = {"width": 4, "num_classes": 4}
RE_COLS = ["re_mean", "re_std", "re_pooled"]


@pytest.fixture(scope="module")
def cnn():
    return make_cnn(2)


@pytest.fixture(scope="module")
def data(cnn):
    return make_data(cnn, 10, seed=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def pt2_file(cnn, folder):
    return export_dynamic(cnn, folder / "cnn.pt2", torch.rand(2, 1, 8, 8))


def write(fmt: str, cnn: nn.Module, folder, pt2_file):
    """Save ``cnn`` in format ``fmt``; return the path and the keyword arguments that load it."""
    sd = cnn.state_dict()
    if fmt == "pt2":
        return pt2_file, {}
    if fmt == "checkpoint":  # names its architecture as module:Class
        return save_checkpoint(folder / "ck.pt", cnn, arch="tests.helpers:TinyCNN", arch_kwargs=ARCH_KWARGS), {}
    if fmt == "checkpoint-file-arch":  # ... or as path/to/file.py:Class, which runs that file: only when trusted
        path = save_checkpoint(folder / "ck_file.pt", cnn, arch=f"{HELPERS_FILE}:TinyCNN", arch_kwargs=ARCH_KWARGS)
        return path, {"trust_model": True}
    if fmt == "state_dict":
        torch.save(sd, folder / "sd.pt")
        return folder / "sd.pt", {"arch": "tests.helpers:TinyCNN", "arch_kwargs": '{"width": 4}'}
    if fmt == "state_dict-wrapped":
        torch.save({"state_dict": sd, "epoch": 3}, folder / "sd_wrapped.pth")
        return folder / "sd_wrapped.pth", {"arch": f"{HELPERS_FILE}:TinyCNN"}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(folder / "cnn.safetensors"))
        return folder / "cnn.safetensors", {"arch": "tests.helpers:TinyCNN", "arch_kwargs": ARCH_KWARGS}
    if fmt == "pickle":
        torch.save(cnn, folder / "pickled.pt")
        return folder / "pickled.pt", {"trust_model": True}
    raise AssertionError(fmt)


FORMATS = {"pt2": "export", "checkpoint": "checkpoint", "checkpoint-file-arch": "checkpoint",
           "state_dict": "state_dict", "state_dict-wrapped": "state_dict", "safetensors": "state_dict",
           "pickle": "pickle"}


@pytest.fixture
def importable_tests(monkeypatch):
    """Put the repository root on sys.path so that ``tests.helpers:TinyCNN`` resolves."""
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.fixture(scope="module")
def eager_result(cnn, data):
    return analyze(cnn, data, attacks=["fgsm", "pgd:random_start=false,steps=2"], eps=[0.03], batch_size=4,
                   device="cpu")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gives_the_same_model(fmt, cnn, data, folder, pt2_file, eager_result, importable_tests):
    path, kwargs = write(fmt, cnn, folder, pt2_file)
    loaded = load_model(path, **kwargs)
    assert loaded.format == FORMATS[fmt]
    assert loaded.path == path and loaded.stem == path.stem
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not any(m.training for m in loaded.module.modules())
    with torch.no_grad():
        want, got = cnn(data.x), loaded.module(data.x)
    if fmt == "pt2":
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)
    assert select_modules(loaded.module, type_map=loaded.type_map) == CNN_LAYERS

    res = analyze(loaded, data, attacks=["fgsm", "pgd:random_start=false,steps=2"], eps=[0.03], batch_size=4,
                  device="cpu")
    cols = [c for c in LSA_COLUMNS if c not in RE_COLS]
    pd.testing.assert_frame_equal(res.lsa[cols], eager_result.lsa[cols])
    pd.testing.assert_frame_equal(accuracy_numbers(res), accuracy_numbers(eager_result))
    tol = 1e-5 if fmt == "pt2" else 1e-12
    assert rel_diff(res.lsa[RE_COLS], eager_result.lsa[RE_COLS]) < tol
    assert_no_hooks(loaded.module)


def test_checkpoint_records_its_architecture(cnn, folder, importable_tests):
    path = save_checkpoint(folder / "ck_arch.pt", cnn, arch="tests.helpers:TinyCNN", arch_kwargs=ARCH_KWARGS)
    loaded = load_model(path)
    assert (loaded.arch, loaded.arch_kwargs) == ("tests.helpers:TinyCNN", ARCH_KWARGS)
    assert type(loaded.module).__name__ == "TinyCNN"
    # an explicit --arch overrides the recorded one
    other = load_model(path, arch=f"{HELPERS_FILE}:TinyCNN")
    assert other.arch == f"{HELPERS_FILE}:TinyCNN"
    # a checkpoint is loadable without running code from it
    assert torch.load(path, weights_only=True)["arch"] == "tests.helpers:TinyCNN"


def test_saved_in_train_mode_loads_in_eval_mode(folder):
    model = make_cnn(3).train()
    torch.save(model.state_dict(), folder / "train.pt")
    loaded = load_model(folder / "train.pt", arch=f"{HELPERS_FILE}:TinyCNN")
    assert not loaded.module.training


# ---------------------------------------------------------------------------------------------
# .pt2 archives


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_export_accepts_any_batch_size(cnn, pt2_file, batch):
    loaded = load_model(pt2_file)
    x = torch.rand(batch, 1, 8, 8)
    with LayerProbe(loaded.module, CNN_RELUS, type_map=loaded.type_map) as probe:
        with torch.no_grad():
            logits, outs = probe.run(loaded.module, x)
    assert list(outs) == CNN_RELUS and logits.shape == (batch, 4)
    with torch.no_grad():
        torch.testing.assert_close(logits, cnn(x), rtol=1e-5, atol=1e-5)


def test_export_with_a_fixed_batch_runs_padded(cnn, folder, data, pt2_file):
    path = export_fixed(cnn, folder / "fixed.pt2", torch.rand(4, 1, 8, 8))
    with pytest.warns(UserWarning, match="fixed batch size of 4.*padded") as caught:
        loaded = load_model(path)
    assert len([w for w in caught if "fixed batch" in str(w.message)]) == 1
    x = torch.rand(7, 1, 8, 8)  # one full batch of 4, one of 3 padded to 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), cnn(x))
    with LayerProbe(loaded.module, CNN_RELUS, type_map=loaded.type_map) as probe, torch.no_grad():
        _, outs = probe.run(loaded.module, x)
        assert list(outs) == CNN_RELUS and outs["features.5"].shape[0] == 7
    # the same numbers as the dynamic archive, batch sizes 3 and 5 included
    kw = dict(attacks=["fgsm", "pgd:steps=2"], eps=[0.05], batch_size=5, device="cpu", seed=1)
    fixed = analyze(loaded, data, **kw)
    dynamic = analyze(load_model(pt2_file), data, **kw)
    assert list(fixed.lsa["layer"]) == list(dynamic.lsa["layer"])
    assert rel_diff(fixed.lsa[RE_COLS], dynamic.lsa[RE_COLS]) <= 1e-5
    pd.testing.assert_frame_equal(accuracy_numbers(fixed), accuracy_numbers(dynamic))


def test_hardened_weights_saved_back_into_the_export(pt2_file, folder):
    loaded = load_model(pt2_file)
    linear = dict(loaded.module.named_modules())["classifier.1"]
    with torch.no_grad():  # what a training step would do to the unflattened module
        linear.weight.add_(0.5)
        linear.bias.mul_(-1)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        want = loaded.module(x)
    out = save_exported_weights(folder / "hardened.pt2", loaded, loaded.module)
    again = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), want)
    assert again.type_map == loaded.type_map


def test_export_model_keeps_the_training_mode(folder):
    model = make_cnn(4).train()
    export_dynamic(model, folder / "from_train.pt2", torch.rand(3, 1, 8, 8))
    assert model.training


# ---------------------------------------------------------------------------------------------
# refusals: one RobauditError each


def test_bare_state_dict_needs_an_arch(cnn, folder):
    torch.save(cnn.state_dict(), folder / "bare.pt")
    with pytest.raises(RobauditError, match="bare state dict: pass --arch"):
        load_model(folder / "bare.pt")
    from safetensors.torch import save_file

    save_file(cnn.state_dict(), str(folder / "bare.safetensors"))
    with pytest.raises(RobauditError, match="--arch"):
        load_model(folder / "bare.safetensors")


def test_pickled_module_needs_trust(cnn, folder):
    torch.save(cnn, folder / "module.pt")
    with pytest.raises(RobauditError, match="pickled module.*--trust-model"):
        load_model(folder / "module.pt")
    assert load_model(folder / "module.pt", trust_model=True).format == "pickle"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("trust", [False, True])
def test_torchscript_is_refused(cnn, folder, trust):
    torch.jit.script(cnn).save(str(folder / "scripted.pt"))
    with pytest.raises(RobauditError, match="TorchScript.*torch.export"):
        load_model(folder / "scripted.pt", trust_model=trust)


def test_missing_file_and_folder(folder):
    with pytest.raises(RobauditError, match="not found"):
        load_model(folder / "nope.pt")
    with pytest.raises(RobauditError, match="not a file"):
        load_model(folder)


@pytest.mark.parametrize("name", ["junk.pt", "junk.pth", "junk.pt2", "junk.safetensors", "junk.bin"])
@pytest.mark.parametrize("content", ["random", "empty", "truncated"])
def test_corrupt_files(name, content, folder, cnn):
    path = folder / f"{content}-{name}"
    if content == "random":
        path.write_bytes(os.urandom(512))
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save(cnn.state_dict(), path)
        path.write_bytes(path.read_bytes()[:700])
    for trust in (False, True):
        with pytest.raises(RobauditError) as info:
            load_model(path, arch=f"{HELPERS_FILE}:TinyCNN", trust_model=trust)
        assert "\n" not in str(info.value)
        assert "--trust-model" not in str(info.value)  # a damaged file is not a pickled module


def test_file_without_a_model(folder):
    torch.save({"epoch": 3, "notes": ["a"]}, folder / "other.pt")
    with pytest.raises(RobauditError, match="holds no model"):
        load_model(folder / "other.pt")


@pytest.mark.parametrize("arch, kwargs, match", [
    ("tests.helpers:TinyCNN", {"depth": 3}, "cannot build.*arch-kwargs"),
    ("tests.helpers:TinyCNN", {"width": 8}, "do not fit"),
    ("tests.helpers:TinyCNN", '{"width": 4', "JSON object"),
    ("tests.helpers:TinyCNN", "[4]", "JSON object"),
    ("tests.helpers:NoSuchClass", None, "no attribute 'NoSuchClass'"),
    ("no_such_module_xyz:Net", None, "cannot import 'no_such_module_xyz'"),
    ("missing_file.py:Net", None, "architecture file missing_file.py not found"),
    ("TinyCNN", None, "must look like"),
])
def test_bad_architecture(cnn, folder, arch, kwargs, match, importable_tests):
    torch.save(cnn.state_dict(), folder / "for_arch.pt")
    with pytest.raises(RobauditError, match=match):
        load_model(folder / "for_arch.pt", arch=arch, arch_kwargs=kwargs)


# ---------------------------------------------------------------------------------------------
# compatibility checks and normalization


def test_check_compatible_accepts_a_fitting_model(cnn):
    check_compatible(cnn, torch.rand(5, 1, 8, 8), 4)


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 6, 6), (64,)])
def test_check_compatible_wrong_input_shape(cnn, shape):
    with pytest.raises(RobauditError, match=r"does not accept inputs of shape"):
        check_compatible(cnn, torch.rand(2, *shape), 4)


def test_check_compatible_too_few_outputs(cnn):
    with pytest.raises(RobauditError, match="4 outputs but the data set has 10 classes"):
        check_compatible(cnn, torch.rand(2, 1, 8, 8), 10)


def test_check_compatible_more_outputs_warns(cnn):
    with pytest.warns(UserWarning, match="4 outputs for 3 classes"):
        check_compatible(cnn, torch.rand(2, 1, 8, 8), 3)


def test_check_compatible_needs_logits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Unflatten(1, (4, 1)))
    with pytest.raises(RobauditError, match=r"logits of shape \(batch, classes\)"):
        check_compatible(model, torch.rand(2, 1, 8, 8), 4)


def test_check_compatible_non_finite():
    model = make_cnn(6)
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):
        check_compatible(model, torch.rand(2, 1, 8, 8), 4)
    with pytest.raises(NonFiniteError):
        analyze(model, make_data(make_cnn(6), 4), attacks=["fgsm"], eps=[0.1], device="cpu")
    assert_no_hooks(model)


def test_normalized_wrapper(cnn):
    wrapped = with_normalization(cnn, [0.5], [0.25], ndim=4)
    assert isinstance(wrapped, Normalized)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), cnn((x - 0.5) / 0.25))
    assert with_normalization(cnn, None, None, ndim=4) is cnn
    flat = with_normalization(nn.Linear(2, 2), [0.1, 0.2], [1.0, 2.0], ndim=2)
    assert flat.mean.shape == (1, 2)


@pytest.mark.parametrize("mean, std, match", [
    ([0.5], None, "both --mean and --std"),
    ([0.5, 0.5], [0.2], "same number"),
    ([0.5], [0.0], "positive"),
])
def test_bad_normalization(cnn, mean, std, match):
    with pytest.raises(RobauditError, match=match):
        with_normalization(cnn, mean, std, ndim=4)


def test_no_warning_for_a_matching_model(cnn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(cnn, torch.rand(2, 1, 8, 8), 4)


def test_check_compatible_tells_a_failure_from_a_shape_mismatch():
    class Broken(nn.Module):
        def forward(self, x):
            return self.missing(x)

    with pytest.raises(RobauditError, match=r"failed to run .*AttributeError.*not the cause"):
        check_compatible(Broken(), torch.rand(2, 1, 8, 8), 4)


def test_a_loaded_model_carries_its_context(tmp_path):
    """in_context sets device and normalization once; normalized() is the module behind (x - mean) / std."""
    from robaudit.models import LoadedModel

    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    loaded = LoadedModel(module=module, format="checkpoint")
    assert loaded.device is None and loaded.mean is None and loaded.fixed_batch is None
    ctx = loaded.in_context(device=torch.device("cpu"), mean=[0.5], std=[0.25])
    assert ctx is not loaded and ctx.module is module and (ctx.mean, ctx.std) == ((0.5,), (0.25,))
    x = torch.rand(2, 1, 2, 2)
    expected = module((x - 0.5) / 0.25)
    assert torch.allclose(ctx.normalized(ndim=4)(x), expected)
    assert torch.allclose(loaded.in_context(device=torch.device("cpu")).normalized(ndim=4)(x), module(x))
