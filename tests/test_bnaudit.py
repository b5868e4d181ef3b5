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
    # each sample's channel sums are float32 (then added in float64): the KL agrees to float32 precision
    assert row.adv_vs_clean == pytest.approx(want.item(), rel=1e-6) and row.adv_vs_clean > 0
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
    from robaudit.stages.report import render_report  # the BatchNorm plot is drawn in the report's style too:
    again = render_report(out, tmp_path / "again.html").read_text()  # fixed SVG ids, the same bytes twice
    assert again == html.replace(str(out / "report.html"), str(tmp_path / "again.html")) or again == html
    moons = tmp_path / "moons"
    assert invoke("analyze", MOONS_PT2, "--dataset", "moons", "--samples", "20", "--attack", "fgsm", "--eps", "0.1",
                  "--no-checks", "--out", moons).exit_code == 0
    assert not (moons / "bn.csv").exists() and 'id="batchnorm"' not in (moons / "report.html").read_text()


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


@pytest.mark.parametrize("form", ["eager", "pt2", "pt2 fixed batch"])
def test_the_analysis_measures_the_audit_in_its_own_passes(tmp_path, form):
    """bn.csv from the moments the analysis took in its hooked passes equals the audit that attacks the data
    again with the analysis' draws (PGD: random starts), without a fixed-batch archive's padded rows."""
    import warnings

    from robaudit.lsa import analyze
    from robaudit.models import export_model, load_model
    from tests.helpers import export_fixed

    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(10, 1, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    eager = _BNNet().eval()
    model = eager
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixed batch's padding warning
        if form == "pt2":
            model = load_model(export_model(tmp_path / "m.pt2", eager, x[:2]))
        elif form == "pt2 fixed batch":
            model = load_model(export_fixed(eager, tmp_path / "m.pt2", x[:4]))
        result = analyze(model, (x, y), attacks=["fgsm", "pgd:steps=3"], eps=[0.1], batch_size=4, device="cpu",
                         seed=5)
    inner = getattr(model, "module", model)
    config = [s.label for s in result.attacks].index("pgd(steps=3)")
    measured = result.bn_moments.table(config, inner)
    assert measured["n_clean"].tolist() == [10 * 36] and measured["n_adv"].tolist() == [10 * 36]
    spec = result.attacks[config]
    again = bnaudit.audit_batchnorm(eager, eager, (x, y), attack=spec, num_classes=3, batch_size=4, seed=5,
                                    config=config)
    pd.testing.assert_frame_equal(measured, again, rtol=1e-6)
    assert measured["adv_vs_clean"].iloc[0] > 0


class _TokenBN(nn.Module):
    """BatchNorm1d over every token's features: the samples' tokens folded into the batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(4 * 6, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        tokens = self.embed(x.reshape(len(x), 4, 4))  # (batch, 4 tokens, 6 features)
        return self.head(self.bn(tokens.reshape(-1, 6)).reshape(len(x), -1))


@pytest.mark.filterwarnings("ignore:layer bn:UserWarning")  # its token rows are not probed as a layer
def test_the_analysis_measures_tokens_folded_into_the_batch_and_every_group_of_configurations():
    """The moments of a BatchNorm whose rows are the samples' tokens (batch-major) are split by sample, and a
    configuration that shares a pass without the clean batch (beyond the first JOINT_CONFIGS) is still measured:
    both equal the audit that attacks again."""
    from robaudit.battery import JOINT_CONFIGS
    from robaudit.lsa import analyze

    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(10, 16, generator=g), torch.randint(0, 3, (10,), generator=g)
    model = _TokenBN().eval()
    eps = [0.02 * k for k in range(1, 6)]
    result = analyze(model, (x, y), attacks=["fgsm", "pgd:steps=2"], eps=eps, batch_size=4, device="cpu", seed=1,
                     probe="modules")
    labels = [(s.label, s.eps) for s in result.attacks]
    config = labels.index(("pgd(steps=2)", eps[-1]))
    assert config >= JOINT_CONFIGS  # in the second pass of each batch, which holds no clean rows
    for i in (0, config):
        measured = result.bn_moments.table(i, model)
        assert measured["n_clean"].tolist() == [10 * 4] and measured["n_adv"].tolist() == [10 * 4]
        again = bnaudit.audit_batchnorm(model, model, (x, y), attack=result.attacks[i], num_classes=3, batch_size=4,
                                        seed=1, config=i)
        pd.testing.assert_frame_equal(measured, again, rtol=1e-6)


def test_a_batchnorm_whose_rows_are_not_the_samples_is_refused_in_one_line():
    """A model that mixes its batch into rows that are no multiple of it: the moments cannot be split by sample."""
    from robaudit.errors import RobauditError
    from robaudit.lsa import analyze

    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            pooled = self.bn(x[:1].reshape(-1, 3))  # one row for the whole batch
            return self.head(x.reshape(len(x), -1)[:, :3] + pooled.mean(0))

    x, y = torch.rand(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(RobauditError, match="BatchNorm layer bn sees"):
        analyze(Mixing().eval(), (x, y), attacks=["fgsm"], eps=[0.1], batch_size=4, device="cpu", probe="modules")
