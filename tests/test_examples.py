"""Every shipped example model, with its data set and the default battery, end to end through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from robaudit.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATASETS = {"digits_cnn": "digits", "digits_deep_cnn": "digits", "moons_mlp": "moons"}
SHIPPED = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".pt2", ".pt"))


def test_every_example_has_a_data_set():
    assert SHIPPED and {p.stem for p in SHIPPED} == set(DATASETS)


@pytest.mark.parametrize("model", SHIPPED, ids=lambda p: p.name)
def test_example_with_the_default_battery(model, tmp_path):
    out = tmp_path / "run"
    # the default battery (no --attack), few samples: every attack of it must run on this input shape
    result = CliRunner().invoke(main, ["analyze", str(model), "--dataset", DATASETS[model.stem],
                                       "--samples", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    acc = pd.read_csv(out / "accuracy.csv")
    families = {a.split("(")[0] for a in acc["attack"]}
    assert {"fgsm", "pgd", "apgd", "apgdt", "cw", "square", "gaussian", "uniform", "saltpepper"} <= families
    checks = json.loads((out / "checks.json").read_text())
    assert 1 <= checks["n_samples"] == checks["plan"]["n_samples"] <= 16  # sized to the battery's cost
    assert (out / "report.html").stat().st_size > 0
    # where the MVL layers sit: each one's depth among the probed layers, stored and printed
    lsa = pd.read_csv(out / "lsa.csv")
    probed = lsa.drop_duplicates("layer").sort_values("order")["layer"].tolist()
    mvl = json.loads((out / "mvl.json").read_text())["layers"]
    assert mvl and [m["depth"] for m in mvl] == [probed.index(m["layer"]) + 1 for m in mvl]
    assert "depth" in result.output
    page = (out / "report.html").read_text()  # and in the report's MVL table
    assert "depth: position among the probed layers in forward order" in page
    if model.stem == "digits_deep_cnn":  # healthy and deep: the default run warns of nothing it cannot show
        from robaudit import verdict
        from robaudit.rundir import read_run

        assert [c.name for c in verdict.checks_of(read_run(out)) if c.status == "warn"] == []


def test_the_deep_example_is_small_and_deep():
    import torch

    from robaudit.examples.models import DigitsDeepCNN

    model = DigitsDeepCNN()
    stages = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(stages) >= 6 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) >= 6
    for suffix in (".pt2", ".pt"):
        assert (EXAMPLES / f"digits_deep_cnn{suffix}").stat().st_size < 1_000_000


REPRODUCE = EXAMPLES / "reproduce_lsa.py"
CONTROLS = {"at", "atlr", "atlr-gain", "atlr-deepest", "atlr-random", "atlr-lvl"}


def reproduce(tmp_path, name: str, *args: str) -> Path:
    import os
    import subprocess
    import sys

    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(REPRODUCE), "--quick", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_quick_reproduction_runs_every_control_on_every_model_in_both_regimes(tmp_path):
    out = reproduce(tmp_path, "all")
    summary = pd.read_csv(out / "summary.csv")
    for (model, regime), methods in summary.groupby(["model", "regime"])["method"]:
        assert set(methods) == CONTROLS, (model, regime)
    assert {(m, r) for m, r in zip(summary["model"], summary["regime"])} == {
        (m, r) for m in ("moons", "digits", "digits-deep") for r in ("pretrained", "scratch")}
    assert {"mean", "std", "mean_vs_deepest", "wins_vs_deepest", "mean_vs_at", "wins_vs_at"} <= set(summary.columns)
    assert sorted(summary["eps"].unique()) == [0.0, 0.1, 0.15, 0.2]
    rows = pd.read_csv(out / "per_seed.csv")
    assert sorted(rows.loc[rows["method"] == "atlr-random", "draw"].unique()) == [0, 1, 2]
    assert (out / "accuracy_vs_eps.png").stat().st_size > 0 and "atlr-deepest" in (out / "table.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] and len(run["tasks"]) == 6 and run["cpu_seconds"] > 0 and "256" in run["settings"]
    # the tables rebuilt from per_seed.csv (what --tables-from does, nothing trained) are the run's own, to the digit
    from robaudit.examples.reproduce_tables import read_rows, write_outputs

    rebuilt = write_outputs(read_rows(out / "per_seed.csv"), tmp_path / "rebuilt", run["settings"], train_eps=0.1)
    assert rebuilt == (out / "table.md").read_text()
    # the same seeds give the same numbers, whatever else runs beside them
    again = pd.read_csv(reproduce(tmp_path, "moons", "--models", "moons", "--init", "pretrained") / "per_seed.csv")
    first = rows[(rows["model"] == "moons") & (rows["regime"] == "pretrained")].reset_index(drop=True)
    cols = ["method", "draw", "eps", "accuracy", "pgd_accuracy", "layers"]
    pd.testing.assert_frame_equal(first[cols], again[cols])
