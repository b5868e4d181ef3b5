"""samples.csv: streamed rows equal a hand-written table; the most fragile samples are ranked as stated."""
from __future__ import annotations

import pandas as pd
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
    assert torch.allclose(perturbation_norms(x, adv, "Linf"), torch.tensor([0.4, 0.1]))
    assert torch.allclose(perturbation_norms(x, adv, "L2"), torch.tensor([0.5, 0.1]))
