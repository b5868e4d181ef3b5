"""The 95 % Wilson interval of every accuracy, checked against hand computations, and the gate on its lower end."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from robaudit.errors import RobauditError
from robaudit.gate import GateOn, evaluate, parse_bars
from robaudit.intervals import format_interval, wilson, wilson_arrays, with_intervals
from robaudit.rundir import read_run
from tests._rundir import make_run


# Hand computation, z = 1.959964 (z² = 3.841459): for k of n, p = k/n,
# center = (p + z²/2n) / (1 + z²/n), half = z / (1 + z²/n) * sqrt(p(1 - p)/n + z²/4n²).
#   5 of 10:  center = (0.5 + 0.192073) / 1.384146 = 0.5;  half = 1.959964 / 1.384146 * sqrt(0.025 + 0.009604)
#             = 1.416010 * 0.186022 = 0.263407  ->  (0.236593, 0.763407)
#   0 of 10:  center = 0.192073 / 1.384146 = 0.138766;  half = 1.416010 * sqrt(0.009604) = 0.138766  ->  (0, 0.277533)
#  81 of 100: center = (0.81 + 0.019207) / 1.038415 = 0.798532;  half = 1.887454 * sqrt(0.001539 + 0.0000960)
#             = 0.076320  ->  (0.722212, 0.874852)
HAND = [(5, 10, 0.236593, 0.763407), (0, 10, 0.0, 0.277533), (10, 10, 0.722467, 1.0), (81, 100, 0.722212, 0.874852)]


@pytest.mark.parametrize("k, n, low, high", HAND)
def test_wilson_interval_by_hand(k, n, low, high):
    assert wilson(k, n) == pytest.approx((low, high), abs=1e-6)


def test_the_interval_ends_at_0_and_1_exactly_and_is_missing_without_samples():
    assert wilson(0, 25)[0] == 0.0 and wilson(25, 25)[1] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))
    low, high = wilson_arrays([5, 3], [10, float("nan")])
    assert low[0] == pytest.approx(0.236593, abs=1e-6) and np.isnan(low[1]) and np.isnan(high[1])


def test_intervals_are_filled_from_accuracy_and_n_samples_where_missing():
    frame = pd.DataFrame({"accuracy": [0.5, 0.81, 0.4], "n_samples": [10, 100, None],
                          "ci_low": [0.1, None, None], "ci_high": [0.9, None, None]})
    out = with_intervals(frame)
    assert out["ci_low"].tolist()[:2] == pytest.approx([0.1, 0.722212], abs=1e-6)  # a recorded interval is kept
    assert out["ci_high"].tolist()[:2] == pytest.approx([0.9, 0.874852], abs=1e-6)
    assert out[["ci_low", "ci_high"]].iloc[2].isna().all()  # no n_samples: no interval


def test_format_interval():
    assert format_interval(0.48557, 0.65977) == "48.6-66.0%"
    assert format_interval(0.1, None) == ""


def test_a_run_written_before_the_intervals_reads_with_them(tmp_path):
    run = read_run(make_run(tmp_path / "run"))  # its accuracy.csv has no ci columns
    clean = run.accuracy[run.accuracy["attack"] == "clean"].iloc[0]
    assert (clean["accuracy"], clean["n_samples"]) == (pytest.approx(347 / 360), 360)
    # 347 of 360: center = (0.963889 + 0.005335) / 1.010671 = 0.958991, half = 0.019786
    assert (clean["ci_low"], clean["ci_high"]) == pytest.approx((0.939205, 0.978777), abs=1e-6)


def test_the_gate_judges_the_estimate_or_the_lower_end(tmp_path):
    run = read_run(make_run(tmp_path / "run"))  # clean 96.4 % (93.9-97.9 %) on 360 samples
    estimate = evaluate(parse_bars("clean=0.95"), run, [])[0]
    assert estimate.met and estimate.value == pytest.approx(347 / 360)
    lower = evaluate(parse_bars("clean=0.95", gate_on="lower"), run, [])[0]
    assert not lower.met and lower.value == pytest.approx(0.939205, abs=1e-6)
    assert "lower 95% bound 93.9% < 95.0% (estimate 96.4%)" in lower.text
    assert lower.to_dict()["judged"] == "lower" and estimate.to_dict()["judged"] == "estimate"
    assert evaluate(parse_bars("clean=0.93", gate_on=GateOn.LOWER), run, [])[0].met


def test_gate_on_is_parsed_once_into_an_enum():
    assert {b.on for b in parse_bars("clean=0.9,worst-case=0.3", gate_on="lower")} == {GateOn.LOWER}
    assert parse_bars("clean=0.9")[0].on is GateOn.ESTIMATE
    with pytest.raises(RobauditError, match="--gate-on must be one of estimate, lower"):
        parse_bars("clean=0.9", gate_on="upper")


def test_the_lower_end_needs_n_samples(tmp_path):
    root = make_run(tmp_path / "run")
    acc = pd.read_csv(root / "accuracy.csv").drop(columns="n_samples")
    acc.to_csv(root / "accuracy.csv", index=False)
    run = read_run(root)
    assert evaluate(parse_bars("clean=0.9"), run, [])[0].met
    with pytest.raises(RobauditError, match="no 95% interval .* --gate-on estimate"):
        evaluate(parse_bars("clean=0.9", gate_on="lower"), run, [])


def test_check_exits_3_when_the_lower_end_misses_the_bar(tmp_path):
    from tests.test_cli import invoke

    root = make_run(tmp_path / "run")
    met = invoke("check", root, "--fail-under", "clean=0.95")
    assert met.exit_code == 0, met.output
    assert "clean accuracy: 96.4% (93.9-97.9%)" in met.output
    missed = invoke("check", root, "--fail-under", "clean=0.95", "--gate-on", "lower")
    assert missed.exit_code == 3, missed.output
    assert "MISSED: clean=0.95 (clean: lower 95% bound 93.9% < 95.0% (estimate 96.4%))" in missed.output
