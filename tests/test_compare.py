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
