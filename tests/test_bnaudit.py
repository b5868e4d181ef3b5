"""BatchNorm two-domain audit: the distance against a hand computation, streaming against one pass, bn.csv
and the report's section end to end."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robaudit import attacks as atk
from robaudit import bnaudit
from tests.test_cli import DIGITS_PT2, MOONS_PT2, invoke


def test_symmetric_kl_by_hand():
    m1, v1, m2, v2 = (torch.tensor([v], dtype=torch.float64) for v in (0.0, 1.0, 1.0, 4.0))
    # KL(N(0,1)||N(1,4)) = ln 2 + (1 + 1)/8 - 1/2 ; KL(N(1,4)||N(0,1)) = -ln 2 + (4 + 1)/2 - 1/2
    want = (math.log(2) + 2 / 8 - 0.5) + (-math.log(2) + 5 / 2 - 0.5)
    assert bnaudit.symmetric_kl(m1, v1, m2, v2, eps=0.0).item() == pytest.approx(want, rel=1e-12)
    assert bnaudit.symmetric_kl(m1, v1, m1, v1, eps=0.0).item() == 0.0


def test_channel_moments_streamed_equal_one_pass():
    x = torch.randn(37, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    m = bnaudit.ChannelMoments()
    for chunk in x.split(8):
        m.update(chunk)
    mean, var = m.compute()
    flat = x.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(var, flat.var(1, unbiased=False))
    assert m.n == 37 * 20


def _bn_model(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 3)).eval()
    with torch.no_grad():  # running statistics equal to the clean data's: no clean shift at all
        model[0].running_mean.copy_(x.mean(0))
        model[0].running_var.copy_(x.var(0, unbiased=False))
    return model


def test_audit_against_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(20, 2, generator=g), torch.randint(0, 3, (20,), generator=g)
    model = _bn_model(x)
    spec = atk.parse("fgsm:eps=0.1")
    bn = bnaudit.audit_batchnorm(model, model, (x, y), attack=spec, num_classes=3, batch_size=6)
    assert list(bn.columns) == bnaudit.BN_COLUMNS and bn["layer"].tolist() == ["0"]
    row = bn.iloc[0]
    assert (row.n_clean, row.n_adv, row.channels) == (20, 20, 2)
    assert row.clean_vs_running == pytest.approx(0.0, abs=1e-9)
    adv = atk.build(spec, model, num_classes=3)(x, y).double()  # FGSM is deterministic: the same batch
    am, av = adv.mean(0), adv.var(0, unbiased=False)
    cm, cv = x.double().mean(0), x.double().var(0, unbiased=False)
    e = 1e-5
    want = ((av + e + (am - cm) ** 2) / (2 * (cv + e)) + (cv + e + (am - cm) ** 2) / (2 * (av + e)) - 1).mean()
    assert row.adv_vs_clean == pytest.approx(want.item(), rel=1e-9) and row.adv_vs_clean > 0
    assert row.adv_vs_running == pytest.approx(row.adv_vs_clean, rel=1e-6)
    assert not any(h for h in model[0]._forward_pre_hooks.values())


def test_verdict_threshold():
    frame = lambda clean, adv: pd.DataFrame({"clean_vs_running": [clean], "adv_vs_clean": [adv],  # noqa: E731
                                             "adv_vs_running": [adv]})
    assert bnaudit.verdict(frame(0.001, 0.02))["recommend_dual_bn"]
    assert not bnaudit.verdict(frame(0.01, 0.02))["recommend_dual_bn"]  # only 2x the clean shift
    assert not bnaudit.verdict(frame(0.0001, 0.005))["recommend_dual_bn"]  # too small to matter
    assert bnaudit.verdict(pd.DataFrame(columns=bnaudit.BN_COLUMNS)) is None


def test_bn_csv_and_the_report_section(tmp_path):
    out = tmp_path / "digits"
    result = invoke("analyze", DIGITS_PT2, "--dataset", "digits", "--samples", "60", "--attack", "pgd", "--eps",
                    "0.1", "--no-checks", "--out", out)
    assert result.exit_code == 0, result.output
    bn = pd.read_csv(out / "bn.csv")
    assert bn["layer"].tolist() == ["features.1", "features.4"] and (bn["n_clean"] > 0).all()
    assert np.isfinite(bn[["clean_vs_running", "adv_vs_clean", "adv_vs_running"]].to_numpy()).all()
    html = (out / "report.html").read_text()
    assert 'id="batchnorm"' in html and "symmetric KL" in html
    v = bnaudit.verdict(bn)
    assert (f"robaudit harden --run {out} --dual-bn" in html) == v["recommend_dual_bn"]
    moons = tmp_path / "moons"
    assert invoke("analyze", MOONS_PT2, "--dataset", "moons", "--samples", "20", "--attack", "fgsm", "--eps", "0.1",
                  "--no-checks", "--out", moons).exit_code == 0
    assert not (moons / "bn.csv").exists() and 'id="batchnorm"' not in (moons / "report.html").read_text()
