"""Hostile model and data files: nothing from a file runs without --trust-model.

Every payload here would create a marker file when it runs; the proof that nothing ran is that the
marker does not exist afterwards. Where the payload is a pickle, the same file loaded with
``trust_model=True`` does create the marker, which proves that the test's file really is hostile.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import HELPERS_FILE, export_dynamic, make_cnn
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from robaudit.archive import UnsafeArchiveError
from robaudit.data import load_dataset
from robaudit.errors import RobauditError
from robaudit.models import load_model, save_checkpoint


class Payload:
    """Unpickling this creates ``marker``: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory):
    return export_dynamic(make_cnn(1), tmp_path_factory.mktemp("clean") / "cnn.pt2", torch.rand(2, 1, 8, 8))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 archive with ``edit(members)`` applied to its {relative name: bytes} map."""
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        root = names[0].split("/", 1)[0] + "/"
        members = {n[len(root):]: z.read(n) for n in names}
    edit(members)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for rel, data in members.items():
            z.writestr(root + rel, data)
    return dst


def edit_json(members: dict, rel: str, fn) -> None:
    doc = json.loads(members[rel])
    fn(doc)
    members[rel] = json.dumps(doc).encode()


def _sample_inputs_pickle(marker):
    def edit(m):
        m["data/sample_inputs/model.pt"] = pickle.dumps(Payload(marker))
    return edit


def _pickled_weight(marker):
    def edit(m):
        def fn(cfg):
            entry = cfg["config"]["features.0.bias"]
            entry["use_pickle"] = True
            m["data/weights/" + entry["path_name"]] = pickle.dumps(Payload(marker))
        edit_json(m, "data/weights/model_weights_config.json", fn)
    return edit


def _opaque_constant(marker):
    def edit(m):
        edit_json(m, "data/constants/model_constants_config.json", lambda cfg: cfg["config"].update(
            {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}))
        m["data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
    return edit


PICKLE_CASES = {
    "sample inputs replaced by a pickle": (_sample_inputs_pickle, "sample_inputs"),
    "a weight stored with use_pickle": (_pickled_weight, "use_pickle"),
    "an opaque constant": (_opaque_constant, "opaque"),
}


@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_pickles_inside_a_pt2_are_refused(case, clean_pt2, tmp_path, marker):
    make_edit, needle = PICKLE_CASES[case]
    path = rewrite(clean_pt2, tmp_path / "evil.pt2", make_edit(marker))
    with pytest.raises(UnsafeArchiveError, match=needle) as info:
        load_model(path)
    assert "--trust-model" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not marker.exists(), "code from the archive ran"
    # the same file with the user's consent does run its payload: the test's file is really hostile
    try:
        load_model(path, trust_model=True)
    except Exception:
        pass  # after its payload ran, the archive need not be loadable
    assert marker.exists()


def _module_stack_source(m):
    def fn(doc):
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["metadata"]["nn_module_stack"] = node["metadata"]["nn_module_stack"].replace(
            ",features.0,", ",features.0\n__import__('os').system('touch pwned')\n,", 1)
    edit_json(m, "models/model.json", fn)


def _call_target(m):
    def fn(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    edit_json(m, "models/model.json", fn)


def _sympy_expression(m):
    def fn(doc):
        text = json.dumps(doc)
        assert "expr_str" in text
        def walk(o):
            if isinstance(o, dict):
                for k, v in o.items():
                    if k == "expr_str":
                        o[k] = "__import__('os').system('touch pwned')"
                        return True
                    if walk(v):
                        return True
            elif isinstance(o, list):
                return any(walk(v) for v in o)
            return False
        assert walk(doc)
    edit_json(m, "models/model.json", fn)


def _node_name(m):
    def fn(doc):
        doc["graph_module"]["graph"]["nodes"][0]["name"] = "x; import os"
    edit_json(m, "models/model.json", fn)


def _state_dict_key(m):
    def fn(cfg):
        cfg["config"]["features.0.weight;import os"] = cfg["config"].pop("features.0.weight")
    edit_json(m, "data/weights/model_weights_config.json", fn)


def _aoti_library(m):
    m["data/aotinductor/model/model.so"] = b"\x7fELF not really"


def _legacy_weights(m):
    m["data/weights/model.pt"] = b"\x80\x02."


def _custom_object(m):
    edit_json(m, "data/constants/model_constants_config.json", lambda cfg: cfg["config"].update(
        {"evil": {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}))
    m["data/constants/custom_obj_0"] = b"PK"


CODE_CASES = {
    "a submodule name that is Python source": (_module_stack_source, "submodule"),
    "a call target outside torch's operators": (_call_target, "torch.os.system"),
    "a shape expression with code": (_sympy_expression, "shape expression"),
    "a node name that is not an identifier": (_node_name, "identifier"),
    "a state-dict key that is not a dotted name": (_state_dict_key, "dotted name"),
    "an AOTInductor library": (_aoti_library, "aotinductor"),
    "a legacy pickled weight file": (_legacy_weights, "legacy"),
    "a custom script object": (_custom_object, "custom object"),
}


@pytest.mark.parametrize("case", list(CODE_CASES))
def test_code_inside_a_pt2_is_refused(case, clean_pt2, tmp_path, monkeypatch):
    edit, needle = CODE_CASES[case]
    monkeypatch.chdir(tmp_path)
    path = rewrite(clean_pt2, tmp_path / "evil.pt2", edit)
    with pytest.raises(UnsafeArchiveError) as info:
        load_model(path)
    message = str(info.value)
    assert needle.lower() in message.lower() and "--trust-model" in message
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_legacy_export_format_is_refused(tmp_path, marker):
    path = tmp_path / "old.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("version", "5.1")
        z.writestr("serialized_exported_program.json", "{}")
        z.writestr("serialized_state_dict.pt", pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeArchiveError, match="legacy"):
        load_model(path)
    assert not marker.exists()


def test_clean_archive_still_loads(clean_pt2):
    assert load_model(clean_pt2).format == "export"


def test_truncated_pt2_gives_one_line_and_no_torch_log(clean_pt2, tmp_path, capfd):
    path = tmp_path / "cut.pt2"
    path.write_bytes(clean_pt2.read_bytes()[: clean_pt2.stat().st_size // 2])
    with pytest.raises(RobauditError) as info:
        load_model(path)
    assert len(str(info.value).splitlines()) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


# -- checkpoints and state dicts -------------------------------------------------------------
@pytest.mark.parametrize("arch", ["builtins:open", "os:system", "json:dumps"])
def test_checkpoint_arch_must_be_a_module_class(arch, tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", make_cnn(0), arch=arch, arch_kwargs={"file": str(tmp_path / "x")})
    with pytest.raises(RobauditError, match="not an nn.Module class"):
        load_model(path)
    assert not (tmp_path / "x").exists()


def test_checkpoint_naming_a_python_file_needs_consent(tmp_path, marker):
    evil = tmp_path / "evil_arch.py"
    evil.write_text(f"open({str(marker)!r}, 'w')\nfrom tests.helpers import TinyCNN\n")
    path = save_checkpoint(tmp_path / "ck.pt", make_cnn(0), arch=f"{evil}:TinyCNN",
                           arch_kwargs={"width": 4, "num_classes": 4})
    with pytest.raises(RobauditError, match="--trust-model"):
        load_model(path)
    assert not marker.exists()
    # the user's own --arch is their word for it
    assert load_model(path, arch=f"{HELPERS_FILE}:TinyCNN", arch_kwargs={"width": 4}).format == "checkpoint"
    assert not marker.exists()


def test_checkpoint_arch_that_is_not_module_colon_class(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", make_cnn(0), arch="os; import sys:X")
    with pytest.raises(RobauditError, match="not module:Class"):
        load_model(path)


def test_pickled_objects_in_a_state_dict_file(tmp_path, marker):
    torch.save({"w": Payload(marker)}, tmp_path / "sd.pt")
    with pytest.raises(RobauditError, match="--trust-model"):
        load_model(tmp_path / "sd.pt", arch=f"{HELPERS_FILE}:TinyCNN")
    assert not marker.exists()


def test_checkpoint_arch_kwargs_are_used(tmp_path):
    """The CLI used to pass {} for --arch-kwargs and override what the checkpoint recorded."""
    from robaudit.models import parse_arch_kwargs

    path = save_checkpoint(tmp_path / "ck.pt", make_cnn(0, width=8), arch="tests.helpers:TinyCNN",
                           arch_kwargs={"width": 8})
    import sys
    sys.path.insert(0, str(HELPERS_FILE.parent.parent))
    try:
        loaded = load_model(path, arch_kwargs=parse_arch_kwargs(None))
    finally:
        sys.path.remove(str(HELPERS_FILE.parent.parent))
    assert loaded.arch_kwargs == {"width": 8}


# -- data files ------------------------------------------------------------------------------
def _cifar_folder(tmp_path: Path, batch: bytes) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(batch)
    return tmp_path


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("where", ["data", "after the pixels"])
def test_cifar_batch_with_a_payload_is_refused(tmp_path, marker, stream, protocol, where):
    """Also where the payload follows pixels that a streamed read skips unread: the whole pickle is walked."""
    pixels = np.zeros((3, 3072), dtype=np.uint8)
    content = {b"data": Payload(marker), b"labels": [0]} if where == "data" else {
        b"data": pixels, b"labels": [0, 1, 2], b"filenames": Payload(marker)}
    batch = pickle.dumps(content, protocol=protocol)
    with pytest.raises(RobauditError, match="refusing to read .*test_batch: its pickle asks for") as err:
        load_dataset("cifar10", data_dir=_cifar_folder(tmp_path, batch), download=False, stream=stream)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dims", [(60000, 28, 28), (2**32 - 1,) * 3, (2**16, 2**16, 2**32 - 2**16 + 1)])
def test_idx_header_promising_more_than_the_file_holds_is_refused_without_allocating(tmp_path, gz, dims):
    """A header may claim any size (the last case's product overflows 64 bits to a small number): the claim
    is checked against what the file holds, and nothing near the claimed size is allocated."""
    import gzip
    import struct
    import tracemalloc

    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", *dims) + bytes(5 * 28 * 28)
    labels = bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes(5)
    for name, blob in (("t10k-images-idx3-ubyte", raw), ("t10k-labels-idx1-ubyte", labels)):
        if gz:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (tmp_path / name).write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(RobauditError, match="need .* data bytes, the file has 3920") as err:
            load_dataset("mnist", data_dir=tmp_path, download=False, stream=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value) and "not a valid IDX file" in str(err.value)
    assert peak < 8 * 2**20  # a read buffer (1 MB) for the file's few kB, not the 47 MB or more claimed


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batch_in_any_numpy_protocol_loads(tmp_path, protocol):
    data = np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)
    batch = pickle.dumps({b"data": data, b"labels": [0, 1, 2], b"batch_label": b"testing"}, protocol=protocol)
    folder = _cifar_folder(tmp_path, batch)
    ds = load_dataset("cifar10", data_dir=folder, download=False)
    assert ds.x.shape == (3, 3, 32, 32) and ds.y.tolist() == [0, 1, 2]
    assert torch.equal((ds.x[0] * 255).round().to(torch.uint8).flatten(), torch.from_numpy(data[0]))
    streamed = load_dataset("cifar10", data_dir=folder, download=False, stream=True)
    assert torch.equal(streamed.head(3)[0], ds.x) and streamed.y.tolist() == [0, 1, 2]


def test_npz_with_pickled_objects_is_refused(tmp_path, marker):
    x = np.empty(2, dtype=object)
    x[0] = Payload(marker)
    x[1] = 0
    np.savez(tmp_path / "evil.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(RobauditError, match="only a pickle can load"):
        load_dataset(str(tmp_path / "evil.npz"))
    assert not marker.exists()


def test_a_run_directory_cannot_grant_trust_or_name_a_python_file(tmp_path, marker):
    """harden --run reads the model's architecture from manifest.json: a file like any other."""
    from robaudit.examples.models import MoonsMLP
    from tests.test_cli import invoke

    torch.save(MoonsMLP().state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "run"
    result = invoke("analyze", tmp_path / "sd.pt", "--arch", "robaudit.examples.models:MoonsMLP", "--dataset",
                    "moons", "--attack", "fgsm", "--eps", "0.1", "--samples", "20", "--no-checks", "--no-report",
                    "--out", out)
    assert result.exit_code == 0, result.output
    evil = tmp_path / "evil_arch.py"
    evil.write_text(f"open({str(marker)!r}, 'w')\nfrom robaudit.examples.models import MoonsMLP\n")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"].update(arch=f"{evil}:MoonsMLP", trust_model=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("harden", "--run", out, "--epochs", "1", "--no-report")
    assert result.exit_code == 2 and "--trust-model" in result.stderr, result.output
    assert not marker.exists()


def test_npy_pair_with_pickled_objects_is_refused(tmp_path, marker):
    x = np.empty(2, dtype=object)
    x[0], x[1] = Payload(marker), 0
    np.save(tmp_path / "x.npy", x, allow_pickle=True)
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    with pytest.raises(RobauditError, match="without pickles"):
        load_dataset(str(tmp_path / "x.npy"))
    assert not marker.exists()
