"""RobustBench's model zoo (``robustbench:NAME``): one entry per data set, its checkpoint written by the test into
the ``--model-dir`` layout RobustBench expects, analyzed without input normalization; a missing checkpoint under
``--no-download`` is one line, and nothing is unpickled."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import single_thread  # noqa: F401  (autouse fixture)
from tests.test_data import write_cifar10, write_cifar100
from robaudit.cli import main
from robaudit.errors import RobauditError
from robaudit.sources import SourceOptions, load_any
from robaudit.sources.robustbench_source import _robustbench, checkpoint_path

try:
    _robustbench()  # its package imports ``autoattack`` (see robustbench_source._robustbench)
except RobauditError as e:  # pragma: no cover - robaudit[robustbench] not installed
    pytest.skip(str(e), allow_module_level=True)

# data set -> a small single-checkpoint entry of its Linf leaderboard
ENTRIES = {"cifar10": "Ding2020MMA", "cifar100": "Addepalli2021Towards_PARN18", "imagenet": "Salman2020Do_R18"}


def _zoo_module(dataset: str, name: str):
    utils, zoo, enums = _robustbench()
    torch.manual_seed(0)
    return zoo[enums.BenchmarkDataset(dataset)][enums.ThreatModel("Linf")][name]["model"]().eval()


def _write_checkpoint(model_dir, dataset: str, name: str, module) -> None:
    """A checkpoint as RobustBench publishes many: ``{"state_dict": ...}`` saved from DataParallel; an ImageNet
    one holds only the network inside RobustBench's normalizing wrapper."""
    path = checkpoint_path(model_dir, dataset, "Linf", name)
    path.parent.mkdir(parents=True)
    state = module.state_dict()
    if dataset == "imagenet":  # the network inside RobustBench's wrapper, which holds the normalization itself
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


def _data_args(tmp_path, dataset: str, module) -> list:
    if dataset == "cifar10":
        write_cifar10(tmp_path / "data")
        return ["--dataset", "cifar10", "--data-dir", tmp_path / "data"]
    if dataset == "cifar100":
        write_cifar100(tmp_path / "data")
        return ["--dataset", "cifar100", "--data-dir", tmp_path / "data"]
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # ImageNet: 1000 classes
    with torch.no_grad():
        y = module(x[:4]).argmax(1).numpy()
    np.savez(tmp_path / "imagenet.npz", x=x.numpy(), y=np.r_[y, 999])
    return ["--dataset", tmp_path / "imagenet.npz"]


@pytest.mark.parametrize("dataset", list(ENTRIES))
def test_a_zoo_entry_is_analyzed_from_its_checkpoint(tmp_path, dataset):
    name = ENTRIES[dataset]
    module = _zoo_module(dataset, name)
    _write_checkpoint(tmp_path / "models", dataset, name, module)
    args = ["analyze", f"robustbench:{name}", "--model-dir", tmp_path / "models", "--no-download",
            *_data_args(tmp_path, dataset, module), "--samples", 4, "--attack", "pgd:steps=1", "--eps", "8/255",
            "--no-checks", "--no-report", "--out", tmp_path / "run", "--probe", "modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    src = man["model"]["source"]
    assert (src["spec"], src["zoo_dataset"], src["threat_model"]) == (f"robustbench:{name}", dataset, "Linf")
    assert man["normalization"] == {"mean": None, "std": None, "origin": "RobustBench (its models take [0, 1] inputs)"}
    assert "--model-dir" in man["command"] and "--threat-model Linf" in man["command"]
    loaded = load_any(f"robustbench:{name}", num_classes=man["dataset"]["num_classes"], dataset=dataset,
                      options=SourceOptions(model_dir=tmp_path / "models"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the checkpoint's weights, unwrapped from DataParallel's prefix
        torch.testing.assert_close(loaded.module(x), module(x))


def test_a_missing_checkpoint_under_no_download_is_one_line(tmp_path):
    write_cifar10(tmp_path / "data")
    result = CliRunner().invoke(main, ["analyze", "robustbench:Ding2020MMA", "--dataset", "cifar10", "--data-dir",
                                       str(tmp_path / "data"), "--model-dir", str(tmp_path / "models"),
                                       "--no-download"])
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "models/cifar10/Linf/Ding2020MMA.pt is missing and --no-download forbids fetching it" in line
    assert not (tmp_path / "models" / "cifar10" / "Linf" / "Ding2020MMA.pt").exists()


def test_unknown_entries_data_sets_and_pickles_are_refused(tmp_path):
    with pytest.raises(RobauditError, match="no cifar10 Linf model 'Ding2020MM'.*did you mean Ding2020MMA"):
        load_any("robustbench:Ding2020MM", num_classes=10, dataset="cifar10")
    with pytest.raises(RobauditError, match="for cifar10, cifar100 and ImageNet; the data set 'digits'"):
        load_any("robustbench:Ding2020MMA", num_classes=10, dataset="digits")

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    path = checkpoint_path(tmp_path, "cifar10", "Linf", "Ding2020MMA")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": Boom()}, path)
    with pytest.raises(RobauditError, match="holds more than weights"):
        load_any("robustbench:Ding2020MMA", num_classes=10, dataset="cifar10", options=SourceOptions(model_dir=tmp_path))
