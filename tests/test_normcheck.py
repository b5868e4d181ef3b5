"""The input normalization is judged on the first batch: a model at chance under it, and far above chance under
another, stops the analysis in one line that names the option to change."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robaudit.data import Dataset
from robaudit.errors import RobauditError
from robaudit.lsa import analyze
from robaudit.normcheck import NormalizationCheck, at_chance, far_above_chance

from tests.helpers import export_dynamic
from tests.test_cli import assert_one_line_failure, invoke

MNIST = ((0.1307,), (0.3081,))  # the usual MNIST normalization


class MidGray(nn.Module):
    """Hand-set for [0, 1] inputs of 10 rows: class k is the row whose mean is closest to 0.5. ``expects``
    (mean, std) makes it a model for normalized inputs instead (it undoes that normalization first)."""

    def __init__(self, expects=None) -> None:
        super().__init__()
        mean, std = expects or ((0.0,), (1.0,))
        self.register_buffer("mean", torch.tensor(mean[0]))
        self.register_buffer("std", torch.tensor(std[0]))
        self.rows = nn.AvgPool2d((1, 4))  # each row's mean: the layer the analysis probes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -100 * (self.rows(x * self.std + self.mean).flatten(1) - 0.5) ** 2


def mid_gray_data(n: int = 60, *, stats=MNIST) -> Dataset:
    """Class k: row k at 0.5, every other row at 0.25 or 0.75; ``stats``: the data set's usual normalization."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 10
    x = np.repeat(rng.choice([0.25, 0.75], size=(n, 1, 10, 1)), 4, axis=3).astype(np.float32)
    x[np.arange(n), 0, y, :] = 0.5
    mean, std = stats or (None, None)
    return Dataset(name="mid-gray", split="test", x=torch.from_numpy(x), y=torch.from_numpy(y), num_classes=10,
                   mean=mean, std=std, default_eps=(0.05,), source="test")


def run(model, data, *, mean, std):
    return analyze(model, data, attacks=["fgsm"], eps=[0.01], mean=mean, std=std, batch_size=32, device="cpu",
                   probe="modules")


def test_the_model_works_where_it_should():
    data = mid_gray_data()
    for model, stats in ((MidGray(), (None, None)), (MidGray(expects=MNIST), MNIST)):
        assert run(model, data, mean=stats[0], std=stats[1]).clean_accuracy == 1.0


def test_a_zero_one_model_under_the_usual_normalization_names_no_normalize():
    data = mid_gray_data()
    with pytest.raises(RobauditError) as err:
        run(MidGray(), data, mean=data.mean, std=data.std)
    msg = str(err.value)
    assert "\n" not in msg and "--no-normalize" in msg and "no better than chance" in msg and "100 %" in msg
    assert "mean (0.1307) std (0.3081)" in msg


def test_a_normalized_model_without_normalization_names_the_option():
    data = mid_gray_data()
    with pytest.raises(RobauditError) as err:
        run(MidGray(expects=MNIST), data, mean=None, std=None)
    msg = str(err.value)
    assert "\n" not in msg and "without --no-normalize" in msg and "usual normalization mean (0.1307)" in msg


def test_no_hint_without_another_normalization_to_try():
    """A model at chance with nothing else to try (no normalization, none usual) runs to its end: at chance."""
    data = mid_gray_data(stats=None)
    assert run(MidGray(expects=MNIST), data, mean=None, std=None).clean_accuracy <= 0.2


def test_the_command_line_stops_in_one_line_naming_mean_and_std(tmp_path):
    """An .npz has no usual normalization: the --mean/--std given leave the model at chance, none works."""
    data = mid_gray_data(stats=None)
    np.savez(tmp_path / "gray.npz", x=data.x.numpy(), y=data.y.numpy())
    model = export_dynamic(MidGray(), tmp_path / "gray.pt2", data.x[:2])
    result = invoke("analyze", model, "--dataset", tmp_path / "gray.npz", "--mean", "0.1307", "--std", "0.3081",
                    "--attack", "fgsm", "--no-checks", "--no-report", "--out", tmp_path / "run")
    assert_one_line_failure(result, "no better than chance", "without --mean/--std")
    assert not (tmp_path / "run").exists()


def test_chance_thresholds():
    assert at_chance(13, 100, 10) and not at_chance(25, 100, 10)
    assert far_above_chance(40, 100, 10) and not far_above_chance(30, 100, 10)
    assert at_chance(0, 100, 10)  # below chance is no better than guessing
    assert at_chance(30, 50, 2) and not far_above_chance(35, 50, 2) and far_above_chance(45, 50, 2)


def test_alternatives():
    usual = NormalizationCheck.of(mean=MNIST[0], std=MNIST[1], data_mean=MNIST[0], data_std=MNIST[1], num_classes=10)
    assert usual.alternatives() == [None]
    custom = NormalizationCheck.of(mean=(0.5,), std=(0.5,), data_mean=MNIST[0], data_std=MNIST[1], num_classes=10)
    assert custom.alternatives() == [None, (MNIST[0], MNIST[1])]
    off = NormalizationCheck.of(mean=None, std=None, data_mean=MNIST[0], data_std=MNIST[1], num_classes=10)
    assert off.alternatives() == [(MNIST[0], MNIST[1])]


def test_the_summary_always_prints_the_normalization_used(tmp_path):
    from tests.test_cli import DIGITS_PT2, FAST

    plain = invoke("analyze", DIGITS_PT2, "--dataset", "digits", *FAST, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert "input normalization: none (inputs in [0, 1])" in plain.output
    given = invoke("analyze", DIGITS_PT2, "--dataset", "digits", *FAST, "--mean", "0", "--std", "1",
                   "--out", tmp_path / "given")
    assert given.exit_code == 0, given.output
    assert "input normalization: mean (0) std (1)" in given.output
