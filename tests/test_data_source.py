"""What ``--dataset`` names, parsed once (robaudit.data.source): the name a run carries, the value that names it
again, and ``harden MODEL --dataset X --resume`` finding the run that analyze wrote for X."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robaudit.data import DataKind, DataSource, load_dataset
from robaudit.errors import RobauditError
from robaudit.stages.analyze import default_out
from tests.helpers import interrupt_training
from tests.test_cli import MOONS_PT2, invoke
from tests.test_data import write_cifar10, write_images


@pytest.mark.parametrize("text, kind, name", [
    ("CIFAR-10", DataKind.BUILTIN, "cifar10"),
    ("Fashion_MNIST", DataKind.BUILTIN, "fashion-mnist"),
    ("data/x.npy", DataKind.ARRAYS, "x"),
    ("data/set.npz", DataKind.ARRAYS, "set"),
    ("imagefolder:pets/test/", DataKind.IMAGEFOLDER, "imagefolder-test"),
])
def test_a_dataset_value_is_parsed_once_into_its_kind_and_name(text, kind, name):
    source = DataSource.parse(text)
    assert source.kind is kind and source.name == name
    assert DataSource.parse(source.argument) == source  # the value it gives names it again
    assert default_out(Path("m.pt2"), source) == Path("reports") / f"m-{name}"


def test_image_options_belong_to_an_image_folder():
    with pytest.raises(RobauditError, match="apply to --dataset imagefolder:DIR only"):
        DataSource.parse("digits", image_size=8)
    folder = DataSource.parse("imagefolder:pets", image_size=8, class_map="~/map.json")
    assert folder.image_size == 8 and folder.class_map == Path("~/map.json").expanduser()


def test_a_run_record_gives_back_the_source_it_analyzed(tmp_path):
    write_images(tmp_path / "pets")
    folder = load_dataset(f"imagefolder:{tmp_path / 'pets'}", image_size=4)
    record = {"name": folder.name, "source": folder.source, "image_size": 4}
    again = DataSource.of_record(record)
    assert again.kind is DataKind.IMAGEFOLDER and again.image_size == 4 and again.name == folder.name
    assert DataSource.of_record({"name": "cifar10", "source": "/data/cifar-10-batches-py"}).key == "cifar10"
    arrays = DataSource.of_record({"name": "x", "source": str(tmp_path / "x.npy")})
    assert arrays.kind is DataKind.ARRAYS and arrays.path == tmp_path / "x.npy"
    with pytest.raises(RobauditError, match="apply to --dataset imagefolder:DIR only"):  # a record edited by hand
        DataSource.of_record({"name": "digits", "source": "scikit-learn", "image_size": 4})


# -- harden MODEL --dataset X --resume --------------------------------------------------------------------
# A harden interrupted after its first epoch leaves its checkpoint in the run that analyze wrote for X under
# reports/; the same command with --resume must find that run (named after the canonical data set), not analyze
# again somewhere else.

FAST = ["--samples", "6", "--eps", "0.05", "--epochs", "2", "--steps", "1", "--batch-size", "8", "--mvl-top", "1",
        "--no-report", "--device", "cpu"]


def tiny_cnn(tmp_path: Path, shape: tuple[int, int, int], classes: int) -> Path:
    """A small exported CNN for C×H×W inputs."""
    from robaudit.models import export_model

    torch.manual_seed(0)
    c, h, w = shape
    model = torch.nn.Sequential(torch.nn.Conv2d(c, 2, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * ((h - 3) // 2 + 1) * ((w - 3) // 2 + 1), classes))
    return export_model(tmp_path / "m.pt2", model.eval(), torch.rand(2, *shape))


def cifar_case(tmp_path: Path):
    write_cifar10(tmp_path / "cifar", n=8)
    return tiny_cnn(tmp_path, (3, 32, 32), 10), "CIFAR-10", "m-cifar10", ["--data-dir", tmp_path / "cifar",
                                                                          "--no-download"]


def npy_case(tmp_path: Path):
    rng = np.random.default_rng(0)
    for part, n in (("test", 12), ("train", 40)):
        (tmp_path / part).mkdir()
        np.save(tmp_path / part / "x.npy", rng.random((n, 2), dtype=np.float32))
        np.save(tmp_path / part / "y.npy", rng.integers(0, 2, n))
    return MOONS_PT2, tmp_path / "test" / "x.npy", "moons_mlp-x", ["--train-data", tmp_path / "train" / "x.npy"]


def folder_case(tmp_path: Path):
    write_images(tmp_path / "test", {"cat": [(8, 8)] * 4, "dog": [(8, 8)] * 4})
    write_images(tmp_path / "train", {"cat": [(8, 8)] * 8, "dog": [(8, 8)] * 8})
    return (tiny_cnn(tmp_path, (3, 8, 8), 2), f"imagefolder:{tmp_path / 'test'}", "m-imagefolder-test",
            ["--train-data", f"imagefolder:{tmp_path / 'train'}"])


@pytest.mark.parametrize("case", [cifar_case, npy_case, folder_case], ids=["CIFAR-10", "x.npy", "imagefolder"])
def test_harden_model_resume_finds_the_run_analyze_wrote(tmp_path, monkeypatch, case):
    model, dataset, run_name, extra = case(tmp_path)
    monkeypatch.chdir(tmp_path)
    resume_training = interrupt_training(monkeypatch, 2)
    stopped = invoke("harden", model, "--dataset", dataset, *extra, *FAST)
    assert stopped.exit_code == 130, stopped.output
    run = Path("reports") / run_name
    assert (run / "harden-checkpoint.pt").is_file(), sorted(map(str, Path("reports").rglob("*")))
    analyzed = (run / "lsa.csv").read_bytes()
    resume_training()
    resumed = invoke("harden", model, "--dataset", dataset, *extra, *FAST, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.splitlines()[0] == f"resuming the interrupted harden in {run}"
    assert (run / "lsa.csv").read_bytes() == analyzed  # the run was not analyzed again
    assert json.loads((run / "hardened" / "harden.json").read_text())["resumed_from_epoch"] == 1
    assert sorted(p.name for p in Path("reports").iterdir()) == [run_name]
