"""classes.csv: accuracy per class from samples.csv, by hand and from a real analysis, and the report's table."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from robaudit.classes import CLASS_COLUMNS, class_table, weakest_class
from robaudit.rundir import read_run, read_table
from tests._rundir import make_run, write_samples

# 3 classes: label 0 (4 samples), 1 (3), 2 (3)
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
CLEAN = [1, 1, 1, 1, 1, 1, 0, 1, 1, 1]
W05 = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
W10 = [1, 1, 0, 0, 0, 0, 0, 1, 1, 0]


def test_class_accuracy_by_hand(tmp_path):
    root = make_run(tmp_path / "run", eps=(0.05, 0.1))
    path = write_samples(root, LABELS, {"worst-case@0.05:robust": W05, "worst-case@0.1:robust": W10}, clean=CLEAN)
    classes = class_table(path, read_run(root).accuracy)
    assert list(classes.columns) == CLASS_COLUMNS
    got = {(r.label, r.attack, None if r.eps != r.eps else r.eps): (r.n_samples, r.accuracy)
           for r in classes.itertuples()}
    assert got == {(0, "clean", None): (4, 1.0), (0, "worst-case", 0.05): (4, 0.75), (0, "worst-case", 0.1): (4, 0.5),
                   (1, "clean", None): (3, 2 / 3), (1, "worst-case", 0.05): (3, 2 / 3), (1, "worst-case", 0.1): (3, 0.0),
                   (2, "clean", None): (3, 1.0), (2, "worst-case", 0.05): (3, 1.0),
                   (2, "worst-case", 0.1): (3, 2 / 3)}
    one = classes[(classes["label"] == 0) & (classes["attack"] == "worst-case") & (classes["eps"] == 0.1)].iloc[0]
    # 2 of 4: half = 1.959964 / 1.960365 * sqrt(0.0625 + 0.060023) = 0.349961 around 0.5
    assert (one["ci_low"], one["ci_high"]) == pytest.approx((0.150039, 0.849961), abs=1e-6)
    weakest = weakest_class(classes)
    assert (weakest["label"], weakest["attack"], weakest["eps"]) == (1, "worst-case", 0.1)


def test_the_report_names_and_highlights_the_weakest_class(tmp_path):
    from robaudit.stages.report import render_report

    root = make_run(tmp_path / "run", eps=(0.05, 0.1))
    path = write_samples(root, LABELS, {"worst-case@0.05:robust": W05, "worst-case@0.1:robust": W10}, clean=CLEAN)
    class_table(path, read_run(root).accuracy).to_csv(root / "classes.csv", index=False)
    html = render_report(root).read_text()
    assert "Accuracy per class" in html
    assert "Weakest class: label 1, worst-case accuracy at eps 0.1 0.0 % (0.0-56.1 %, 3 samples)" in html
    assert '<tr class="weakest">' in html and html.count('class="weakest"') == 1


def test_analyze_writes_classes_csv_that_agrees_with_samples_csv(tmp_path):
    from tests.test_cli import DIGITS_PT2, invoke

    out = tmp_path / "run"
    result = invoke("analyze", DIGITS_PT2, "--dataset", "digits", "--samples", "40", "--attack", "fgsm",
                    "--eps", "0.05,0.1", "--no-checks", "--out", out)
    assert result.exit_code == 0, result.output
    assert "; 95% Wilson intervals in parentheses)" in result.output
    assert re.search(r"^clean accuracy: \d+\.\d% \(\d+\.\d-\d+\.\d%\)$", result.output, re.M), result.output
    samples, classes = pd.read_csv(out / "samples.csv"), read_table(out, "classes.csv")
    for label, group in samples.groupby("label"):
        mine = classes[classes["label"] == label]
        assert set(mine["n_samples"]) == {len(group)}
        assert mine[mine["attack"] == "clean"]["accuracy"].item() == pytest.approx(group["clean_correct"].mean())
        for eps in (0.05, 0.1):
            row = mine[(mine["attack"] == "worst-case") & (mine["eps"] == eps)]
            assert row["accuracy"].item() == pytest.approx(group[f"worst-case@{eps:g}:robust"].mean())
    acc = pd.read_csv(out / "accuracy.csv")
    assert {"ci_low", "ci_high"} <= set(acc.columns) and (acc["ci_low"] <= acc["accuracy"]).all()
    assert (acc["accuracy"] <= acc["ci_high"]).all()
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert files["classes.csv"] == (out / "classes.csv").stat().st_size
    assert "Weakest class: label " in (out / "report.html").read_text()


def test_a_report_of_many_classes_lists_the_weakest(tmp_path):
    from robaudit.stages.report import render_report
    from robaudit.stages.report_classes import CLASSES_SHOWN

    root = make_run(tmp_path / "run", eps=(0.1,))
    n = CLASSES_SHOWN + 5
    labels = [i for i in range(n) for _ in range(4)]  # 4 samples per class; class c keeps min(c, 4) robust
    robust = [int(k < min(c, 4)) for c in range(n) for k in range(4)]
    path = write_samples(root, labels, {"worst-case@0.1:robust": robust})
    class_table(path, read_run(root).accuracy).to_csv(root / "classes.csv", index=False)
    html = render_report(root).read_text()
    assert f"The {CLASSES_SHOWN} weakest of {n} classes." in html
    assert "Weakest class: label 0," in html
    section = html[html.index("Accuracy per class"):html.index("Most fragile samples") if "Most fragile" in html
                   else None]
    assert section.count("<tr") == CLASSES_SHOWN + 1  # the header and the 20 weakest
