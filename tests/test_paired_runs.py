"""compare's exact McNemar test on two hand-made runs of the same samples, and what it says when they differ."""
from __future__ import annotations

import json

import pytest

from robaudit.significance import mcnemar
from robaudit.stages.compare import compare_runs
from tests._rundir import make_run, write_samples

LABELS = [i % 3 for i in range(12)]
# PGD at eps 0.1: samples 0-6 right only in B, sample 7 right only in A, 8-9 right in both, 10-11 wrong in both
A_PGD = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
B_PGD = [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0]
# the worst case at eps 0.1: 7 samples right only in B, none only in A
A_WORST = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
B_WORST = [1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0]


def pair(tmp_path, *, labels_b=None):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    write_samples(a, LABELS, {"pgd@0.1:correct": A_PGD, "worst-case@0.1:robust": A_WORST})
    write_samples(b, labels_b or LABELS, {"pgd@0.1:correct": B_PGD, "worst-case@0.1:robust": B_WORST})
    return a, b


def row(cmp, attack):
    rows = cmp.accuracy[(cmp.accuracy["attack"] == attack) & (cmp.accuracy["eps"] == 0.1)]
    return rows.iloc[0]


def test_mcnemar_by_hand():
    # 1 against 7 discordant samples: 2 * P(X >= 7), X ~ Binomial(8, 1/2) = 2 * (8 + 1) / 256
    assert mcnemar(1, 7) == mcnemar(7, 1) == pytest.approx(0.0703125, abs=1e-12)
    # 0 against 7: 2 * 1 / 128
    assert mcnemar(0, 7) == pytest.approx(0.015625, abs=1e-12)
    assert mcnemar(0, 0) == 1.0 and mcnemar(4, 4) == 1.0


def test_compare_tests_each_difference_on_the_paired_samples(tmp_path):
    cmp = compare_runs(*pair(tmp_path))
    assert cmp.unpaired is None
    pgd = row(cmp, "pgd")
    assert (pgd["a_only"], pgd["b_only"]) == (1, 7)
    assert pgd["p"] == pytest.approx(0.0703125, abs=1e-12) and pgd["within_noise"] is True
    worst = row(cmp, "worst-case")
    assert (worst["a_only"], worst["b_only"]) == (0, 7)
    assert worst["p"] == pytest.approx(0.015625, abs=1e-12) and worst["within_noise"] is False
    clean = cmp.accuracy[cmp.accuracy["attack"] == "clean"].iloc[0]
    assert (clean["a_only"], clean["b_only"], clean["p"]) == (0, 0, 1.0)
    fgsm = row(cmp, "fgsm")  # not in samples.csv: no test
    assert fgsm["p"] is None and fgsm["within_noise"] is None


def test_compare_marks_noise_on_the_page_in_the_terminal_and_in_json(tmp_path):
    from tests.test_cli import invoke

    a, b = pair(tmp_path)
    page = tmp_path / "cmp.html"
    result = invoke("compare", a, b, "--out", page)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "within noise at p >= 0.05" in lines[0]
    pgd = next(line for line in lines if line.lstrip().startswith("pgd eps 0.1"))
    assert pgd.endswith("p = 0.07, within noise")
    worst = next(line for line in lines if line.lstrip().startswith("worst-case eps 0.1"))
    assert worst.endswith("p = 0.016, beyond noise")
    html = page.read_text()
    assert "p &gt;= 0.05 is within noise" in html
    assert ">within noise<" in html and ">beyond noise<" in html and ">0.07<" in html
    assert "A 95 % CI" in html and "93.9-97.9 %" in html  # clean, 347 of 360
    data = json.loads(invoke("compare", a, b, "--json").output)
    assert data["paired_test"] == {"test": "exact McNemar, two-sided", "within_noise_at_p": 0.05, "unpaired": None}
    worst_row = next(r for r in data["accuracy"] if r["attack"] == "worst-case" and r["eps"] == 0.1)
    assert (worst_row["a_only"], worst_row["b_only"], worst_row["within_noise"]) == (0, 7, False)


def test_runs_of_other_samples_get_one_line_and_no_test(tmp_path):
    from tests.test_cli import invoke

    a, b = pair(tmp_path, labels_b=[(y + 1) % 3 if i == 5 else y for i, y in enumerate(LABELS)])
    cmp = compare_runs(a, b)
    assert cmp.unpaired == ("the runs audited different samples (their samples.csv differ in label), so the "
                            "differences are unpaired and no test is made")
    assert cmp.accuracy["p"].isna().all()
    result = invoke("compare", a, b, "--out", tmp_path / "cmp.html")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith(f"no paired test: {cmp.unpaired}")
    assert "noise" not in "\n".join(result.output.splitlines()[1:])
    (b / "samples.csv").unlink()
    assert compare_runs(a, b).unpaired.startswith("run B has no samples.csv")
