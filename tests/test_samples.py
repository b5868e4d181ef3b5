"""samples.csv: streamed rows equal a hand-written table; the most fragile samples are ranked as stated."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from robaudit.samples import SampleLog, most_fragile, perturbation_norms


def test_rows_stream_batch_by_batch(tmp_path):
    path = tmp_path / "samples.csv"
    with SampleLog(path, [("fgsm", 0.1), ("cw", None)], [("Linf", 0.1)]) as log:
        log.write(torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([2, 1]),
                  [torch.tensor([False, False]), torch.tensor([True, False])],
                  [torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.0])], [torch.tensor([False, False])])
        log.write(torch.tensor([2]), torch.tensor([1]), torch.tensor([1]),
                  [torch.tensor([True]), torch.tensor([False])], [torch.tensor([0.1]), torch.tensor([0.25])],
                  [torch.tensor([True])])
    df = pd.read_csv(path)
    assert list(df.columns) == ["index", "label", "clean_pred", "clean_correct", "fgsm@0.1:correct", "fgsm@0.1:pert",
                                "cw:correct", "cw:pert", "worst-case@0.1:robust"]
    assert df.values.tolist() == [[0, 2, 2, 1, 0, 0.1, 1, 0.0, 0], [1, 0, 1, 0, 0, 0.1, 0, 0.0, 0],
                                  [2, 1, 1, 1, 1, 0.1, 0, 0.25, 1]]
    fragile = most_fragile(df)
    assert fragile["index"].tolist() == [0, 2]  # sample 1 was never correct; 0 and 2 were fooled once each
    assert fragile["fooled_configs"].tolist() == ["fgsm@0.1", "cw"]


def test_perturbation_norms_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    adv = torch.tensor([[[[0.3, -0.4], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.1]]]])
    assert torch.allclose(perturbation_norms(x, adv, "Linf"), torch.tensor([0.4, 0.1], dtype=torch.float64))
    assert torch.allclose(perturbation_norms(x, adv, "L2"), torch.tensor([0.5, 0.1], dtype=torch.float64))


def test_samples_csv_agrees_with_accuracy_csv(tmp_path):
    from tests.test_cli import DIGITS_PT2, invoke

    out = tmp_path / "run"
    result = invoke("analyze", DIGITS_PT2, "--dataset", "digits", "--samples", "50", "--batch-size", "16",
                    "--attack", "fgsm", "--attack", "pgd:steps=3", "--attack", "gaussian", "--eps", "0.05,0.1",
                    "--no-checks", "--out", out)
    assert result.exit_code == 0, result.output
    samples, acc = pd.read_csv(out / "samples.csv"), pd.read_csv(out / "accuracy.csv")
    assert samples["index"].tolist() == list(range(50))  # every sample once, in order, across 4 batches
    assert samples["clean_correct"].mean() == acc.loc[acc["attack"] == "clean", "accuracy"].item()
    for r in acc[acc["eps"].notna()].itertuples():
        key = f"{r.attack}@{r.eps:g}"
        column = f"worst-case@{r.eps:g}:robust" if r.attack == "worst-case" else f"{key}:correct"
        assert samples[column].mean() == pytest.approx(r.accuracy), column
        if r.attack in ("fgsm", "pgd(steps=3)"):
            assert (samples[f"{key}:pert"] <= r.eps + 1e-6).all()
    assert (out / "report.html").read_text().count('href="samples.csv"') == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the streamed file moved in
