"""robaudit compare: deltas equal to the two runs' own files, one self-contained page, JSON for scripts."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from tests.test_cli import MOONS_PT2, assert_one_line_failure, invoke

QUICK = ["--dataset", "moons", "--attack", "fgsm", "--attack", "pgd:steps=3", "--eps", "0.05,0.1", "--samples",
         "40", "--no-checks", "--no-report"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a, b = root / "v1", root / "v2"
    assert invoke("analyze", MOONS_PT2, *QUICK, "--out", a).exit_code == 0
    assert invoke("analyze", MOONS_PT2, *QUICK, "--seed", "3", "--shuffle", "--out", b).exit_code == 0
    return a, b


def test_json_deltas_are_the_files_differences(two_runs):
    a, b = two_runs
    result = invoke("compare", a, b, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    acc_a, acc_b = pd.read_csv(a / "accuracy.csv"), pd.read_csv(b / "accuracy.csv")
    for row in obj["accuracy"]:
        pick = lambda df: df[(df["attack"] == row["attack"]) & (  # noqa: E731
            df["eps"].isna() if row["eps"] is None else np.isclose(df["eps"], row["eps"]))]["accuracy"].item()
        assert row["a"] == pytest.approx(pick(acc_a)) and row["b"] == pytest.approx(pick(acc_b))
        assert row["delta"] == pytest.approx(pick(acc_b) - pick(acc_a))
    mvl = json.loads((a / "mvl.json").read_text())
    lsa_a, lsa_b = pd.read_csv(a / "lsa.csv"), pd.read_csv(b / "lsa.csv")
    assert obj["re_ranking"]["attack"] == mvl["attack"]
    assert len(obj["re"]) == lsa_a["layer"].nunique()  # the same model: every layer matches by name
    for row in obj["re"]:
        pick = lambda df: df[(df["layer"] == row["layer"]) & (df["attack"] == mvl["attack"])  # noqa: E731
                             & np.isclose(df["eps"], mvl["eps"])]["re_mean"].item()
        assert row["delta"] == pytest.approx(pick(lsa_b) - pick(lsa_a))
    fields = {d["field"]: (d["a"], d["b"]) for d in obj["manifest_differences"]}
    assert fields["seed"] == (0, 3) and "model.sha256" not in fields
    assert obj["mvl_a"] == [l["layer"] for l in mvl["layers"]]


def test_the_page_is_self_contained_and_never_overwrites_a_foreign_file(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "cmp.html"
    result = invoke("compare", a, b, "--out", out)
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert 'http-equiv="Content-Security-Policy"' in html and '<meta name="generator" content="robaudit' in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<svg" in html and "What differs" in html and "seed" in html
    assert invoke("compare", a, b, "--out", out).exit_code == 0  # its own page: replaced
    mine = tmp_path / "mine.html"
    mine.write_text("<p>mine</p>")
    assert_one_line_failure(invoke("compare", a, b, "--out", mine), "not a robaudit page")
    assert mine.read_text() == "<p>mine</p>"


def test_compare_needs_two_runs(two_runs, tmp_path):
    assert_one_line_failure(invoke("compare", two_runs[0], tmp_path / "nothing"), "not found")


def test_minimal_perturbation_attacks_by_size_and_both_sanity_verdicts(tmp_path):
    """CW is compared by success rate and perturbation size, never as an accuracy; each run's sanity verdict shows."""
    from robaudit.stages.compare import compare_runs, render_compare
    from robaudit.verdict import checks_of, verdict_line
    from robaudit.rundir import read_run
    from tests._rundir import make_run

    run = make_run(tmp_path / "run", n_layers=4, attacks=("pgd",), noise=(), eps=(0.1,), minimal=("cw",),
                   hardened=True)
    cmp = compare_runs(run, run / "hardened")
    assert "cw" not in set(cmp.accuracy["attack"])
    (cw,) = cmp.minimal.itertuples()
    before = pd.read_csv(run / "accuracy.csv").set_index("attack").loc["cw"]
    after = pd.read_csv(run / "hardened" / "accuracy.csv").set_index("attack").loc["cw"]
    assert (cw.success_a, cw.all_a, cw.fooled_a) == pytest.approx(
        (before["success_rate"], before["pert_median_all"], before["pert_median"]))
    assert (cw.success_b, cw.all_b, cw.fooled_b) == pytest.approx(
        (after["success_rate"], after["pert_median_all"], after["pert_median"]))
    obj = cmp.to_dict()
    assert obj["minimal_perturbation"][0]["attack"] == "cw" and "cw" not in {r["attack"] for r in obj["accuracy"]}
    assert obj["sanity"]["a"]["line"] == verdict_line(checks_of(read_run(run)))
    html = render_compare(cmp, tmp_path / "cmp.html").read_text(encoding="utf-8")
    assert "Minimal-perturbation attacks" in html and "Median, all samples A" in html
    assert html.count("A: run: sanity checks: ") == 1 and html.count("B: hardened: sanity checks: ") == 1
    assert not re.search(r"<td>CW</td>\s*<td[^>]*>[^<]*</td>\s*<td[^>]*>L2</td>", html)  # no accuracy row for CW
