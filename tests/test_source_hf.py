"""Hugging Face models as MODEL: a tiny ViT saved with save_pretrained, analyzed end to end (API and CLI) on digits
with transformers' own layer names, hardened and rebuilt; pickles, custom code, forged headers, wrong class counts
and image sizes refused in one line. No network: every model is built here."""
from __future__ import annotations

import json
import pickle
import shutil
from copy import deepcopy
import struct
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.overrides import TorchFunctionMode

from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit.cli import main
from robaudit.data import load_dataset
from robaudit.errors import RobauditError
from robaudit.models import InputNorm, sha256_file
from robaudit.sources import ModelSource, SourceOptions, load_any, reload_recorded, source_flags
from robaudit.sources.hf_source import ORIGIN, processor_norm

transformers = pytest.importorskip("transformers")

SAMPLES, ATTACKS = 16, ["pgd:steps=2"]
MEAN, STD = 0.5, 0.25
TINY = dict(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=10)


class CountGelu(TorchFunctionMode):
    """Counts calls of F.gelu, however they are reached (the mode is off inside a call: no double count)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func is F.gelu
        return func(*args, **(kwargs or {}))


def save_vit(folder: Path, *, seed: int = 0, processor: dict | None = None, **overrides) -> Path:
    """A random tiny ViT written by save_pretrained (config.json + model.safetensors) and a processor config."""
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**{**TINY, **overrides}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, safe_serialization=True)
    proc = processor if processor is not None else {"do_normalize": True, "image_mean": [MEAN], "image_std": [STD]}
    (folder / "preprocessor_config.json").write_text(json.dumps(proc))
    return folder


def hf_model(folder: Path):
    """The model as transformers itself loads it (the reference for robaudit's logits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.ViTForImageClassification.from_pretrained(folder, local_files_only=True).eval()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def refused(call, *needles: str) -> str:
    with pytest.raises(RobauditError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("hf") / "tiny-vit")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", samples=SAMPLES)


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    from robaudit.stages.analyze import analyze_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze_run(folder, "digits", attacks=ATTACKS, samples=SAMPLES, checks=False, report=False,
                           device="cpu", out=tmp_path_factory.mktemp("runs") / "api")


def test_the_model_returns_transformers_logits_and_keeps_its_names(folder, digits):
    loaded = load_any(folder, num_classes=10, example=digits.x[:8])
    reference = hf_model(folder)
    x = digits.x[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference(x).logits, rtol=0, atol=0)
    assert [n for n, _ in loaded.module.named_modules()] == [n for n, _ in reference.named_modules()]
    with torch.no_grad():  # copies (harden, torchrun) keep the logits hook
        for copy in (deepcopy(loaded.module), pickle.loads(pickle.dumps(loaded.module))):
            torch.testing.assert_close(copy(x), reference(x).logits, rtol=0, atol=0)
    assert loaded.format == "hf" and loaded.sha256 == sha256_file(folder / "model.safetensors")
    assert loaded.input_norm.mean == (MEAN,) and loaded.input_norm.std == (STD,) and loaded.input_norm.origin == ORIGIN
    assert loaded.source["weights"] == str((folder / "model.safetensors").resolve())
    assert loaded.source["image_size"] == 8 and loaded.source["model_type"] == "vit"
    assert loaded.source["library_version"] == transformers.__version__


def test_analysis_probes_every_module_and_gelu_call_under_transformers_names(folder, run, digits):
    reference = hf_model(folder)
    lsa = pd.read_csv(run.path / "lsa.csv")
    names = set(lsa["layer"])
    modules = dict(reference.named_modules())
    owners = {n.split(":")[0].split("#")[0] for n in names}
    assert owners <= set(modules), owners - set(modules)
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    assert linears and linears <= names
    counter = CountGelu()
    with torch.no_grad(), counter:
        reference(digits.x[:2])
    acts = [n for n, m in modules.items() if type(m).__name__ == "GELUActivation"]
    gelus = sorted(set(lsa.loc[lsa["layer_type"] == "gelu", "layer"]))
    assert counter.n == TINY["num_hidden_layers"] == len(gelus)
    assert gelus == sorted(f"{n}:gelu" for n in acts)
    assert (lsa["n_samples"] == SAMPLES).all()


def test_clean_accuracy_is_that_of_the_processor_normalized_logits(folder, run, digits):
    with torch.no_grad():
        predicted = hf_model(folder)((digits.x - MEAN) / STD).logits.argmax(1)
    assert run.manifest["clean_accuracy"] == pytest.approx((predicted == digits.y).float().mean().item())
    norm = run.manifest["normalization"]
    assert norm == {"mean": [MEAN], "std": [STD], "origin": ORIGIN}
    assert run.manifest["model"]["class"] == "ViTForImageClassification"


def test_cli_analyzes_the_folder_and_hf_prefix_as_the_api_does(folder, run, tmp_path):
    api = pd.read_csv(run.path / "lsa.csv")
    for model in (folder, f"hf:{folder}"):
        out = tmp_path / ("prefixed" if str(model).startswith("hf:") else "plain")
        res = invoke("analyze", model, "--dataset", "digits", "--attack", ATTACKS[0], "--samples", SAMPLES,
                     "--no-checks", "--no-report", "--device", "cpu", "--out", out)
        assert res.exit_code == 0, res.output
        pd.testing.assert_frame_equal(pd.read_csv(out / "lsa.csv"), api)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model"]["source"]["spec"] == str(folder)


def test_harden_one_epoch_saves_safetensors_and_rebuilds_the_model(run, digits):
    from robaudit.stages.harden import harden_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = harden_run(run.path, epochs=1, steps=1, batch_size=256, device="cpu")
    weights = run.path / "hardened" / "model.safetensors"
    manifest = json.loads((run.path / "hardened" / "manifest.json").read_text())
    source = manifest["model"]["source"]
    assert source["library"] == "hf" and source["weights"] == str(weights.resolve())
    assert manifest["model"]["sha256"] == sha256_file(weights)
    rebuilt = reload_recorded(source, num_classes=10, trust_model=False)
    original = run.manifest["model"]["source"]
    before = reload_recorded(original, num_classes=10, trust_model=False)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.module(digits.x), done.result.module.cpu().eval()(digits.x))
        assert not torch.equal(rebuilt.module(digits.x), before.module(digits.x))  # training changed it
    assert set(pd.read_csv(run.path / "hardened" / "lsa.csv")["layer"]) == set(pd.read_csv(run.path / "lsa.csv")["layer"])


def test_weights_file_overrides_the_folders_strictly(folder, digits, tmp_path):
    from safetensors.torch import save_file

    loaded = load_any(folder, num_classes=10)
    state = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    state["classifier.bias"] += 1.0
    save_file(state, str(tmp_path / "shifted.safetensors"))
    shifted = load_any(folder, num_classes=10, options=SourceOptions(weights=tmp_path / "shifted.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(shifted.module(digits.x[:4]), loaded.module(digits.x[:4]) + 1.0)
    assert shifted.source["weights"] == str((tmp_path / "shifted.safetensors").resolve())
    save_file({f"backbone.{k}": v for k, v in state.items()}, str(tmp_path / "foreign.safetensors"))
    refused(lambda: load_any(folder, num_classes=10, options=SourceOptions(weights=tmp_path / "foreign.safetensors")),
            "does not name ViTForImageClassification's tensors", "save_pretrained")
    del state["classifier.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    refused(lambda: load_any(folder, num_classes=10, options=SourceOptions(weights=tmp_path / "partial.safetensors")),
            "do not fit", "classifier.weight")


def test_class_count_mismatch_is_one_line(tmp_path):
    three = save_vit(tmp_path / "three", num_labels=3)
    one_line_error(invoke("analyze", three, "--dataset", "digits", "--samples", 8, "--no-report"),
                   "has 3 classes and the data set 10", "--num-classes 3")
    refused(lambda: load_any(three, num_classes=10, options=SourceOptions(num_classes=5)), "has 3 classes")


def test_a_pickled_checkpoint_is_refused_unread(folder, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    marker = tmp_path / "ran"
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    for trust in (False, True):
        refused(lambda: load_any(bad, num_classes=10, trust_model=trust), "pytorch_model.bin", "safetensors")
    assert not marker.exists()


class _Touch:
    """Unpickling it creates ``path``: proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_custom_code_needs_trust_model(folder, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (custom / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    one_line_error(invoke("analyze", custom, "--dataset", "digits", "--samples", 8, "--no-report"),
                   "auto_map", "--trust-model")
    assert not marker.exists()


def test_a_forged_safetensors_header_is_refused_before_reading(folder, tmp_path):
    forged = tmp_path / "forged"
    shutil.copytree(folder, forged)
    data = bytearray((forged / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    (forged / "model.safetensors").write_bytes(bytes(data))
    refused(lambda: load_any(forged, num_classes=10), "header", f"{len(data):,}-byte file")


def test_an_image_size_the_position_embeddings_do_not_fit_is_one_line(tmp_path, digits):
    big = save_vit(tmp_path / "big", image_size=16)
    refused(lambda: load_any(big, num_classes=10, example=digits.x[:8]), "16x16", "8x8", "image_size")


def test_hub_name_reads_model_dir_and_never_downloads_when_told(folder, tmp_path, digits):
    shutil.copytree(folder, tmp_path / "models" / "hf" / "acme" / "tiny-vit")
    options = SourceOptions(model_dir=tmp_path / "models", download=False)
    loaded = load_any("hf:acme/tiny-vit", num_classes=10, options=options, example=digits.x[:8])
    assert loaded.source["spec"] == "hf:acme/tiny-vit" and loaded.source["hub"] is True
    assert source_flags(loaded.source)["model_dir"] == str(tmp_path / "models")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(digits.x[:4]), hf_model(folder)(digits.x[:4]).logits)
    refused(lambda: load_any("hf:acme/absent", num_classes=10, options=options), "--no-download",
            str(tmp_path / "models" / "hf" / "acme" / "absent"))


def test_hub_offline_environment_means_no_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    options = SourceOptions(model_dir=tmp_path, download=True)
    refused(lambda: load_any("hf:acme/absent", num_classes=10, options=options), "HF_HUB_OFFLINE")


def test_a_checkpoint_without_the_classifier_or_of_another_task_is_refused(tmp_path):
    base = tmp_path / "base"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.ViTModel(transformers.ViTConfig(**TINY)).save_pretrained(base)
    refused(lambda: load_any(base, num_classes=10), "classifier.", "would start at random")
    text = tmp_path / "text"
    shutil.copytree(base, text)
    (text / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 8, "hidden_size": 16}))
    refused(lambda: load_any(text, num_classes=10), "cannot build an image classifier")


def test_a_relative_org_name_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "vit").mkdir(parents=True)
    (tmp_path / "acme" / "vit" / "config.json").write_text("{}")
    assert ModelSource.parse("hf:acme/vit").local_path == Path("acme/vit")
    assert ModelSource.parse("hf:acme/other").local_path is None


def test_processor_normalization(tmp_path):
    assert processor_norm(tmp_path) is None  # no processor config: the data set's normalization applies
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "image_mean": [0.5]}))
    assert processor_norm(tmp_path) == InputNorm(None, None, f"{ORIGIN} (do_normalize false)")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": [0.2, 0.3]}))
    norm = processor_norm(tmp_path)
    assert (norm.mean, norm.std, norm.origin) == ((0.5,), (0.2, 0.3), ORIGIN)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": ["a"], "image_std": [1]}))
    refused(lambda: processor_norm(tmp_path), "image_mean")
