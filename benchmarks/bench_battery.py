"""How close the default battery's worst case comes to full AutoAttack, and what it costs against --battery fast.

    python benchmarks/bench_battery.py            # about 10 minutes on 2 CPU cores: every test sample, 3 rounds
    python benchmarks/bench_battery.py --quick    # a few minutes: 120 samples, 2 rounds

For each shipped example (the digits CNN on ``--dataset digits``, the moons MLP on ``--dataset moons``) and its
hardened version (``harden_run`` with its defaults on the example's default-battery run), at every eps of the
data set's sweep:

1. Gap: the default battery's worst case (the lowest accuracy over its attacks, per sample) against full
   AutoAttack at the same eps, in points. Target: at most 1 point above AutoAttack. AutoAttack is
   ``--battery standard`` (torchattacks' AutoAttack, version ``standard``: APGD-CE, APGD-T, FAB-T, Square-5000)
   where it runs. On moons (2 classes, vector inputs) it cannot: targeted attacks and the DLR loss need 3 and 4
   classes, and torchattacks' members take images. There the reference is AutoAttack's members that are
   defined on two classes, made stronger rather than weaker: APGD-CE with 100 steps and 5 restarts, and Square
   with 5,000 queries (its vector form), worst case over both.
2. Cost: ``analyze_run`` with ``--battery default`` against ``--battery fast`` on the same model and samples (the
   model checks on, no report), per round one of each, alternating which goes first; the median per-round ratio
   of process CPU time (which other processes on shared cores do not inflate), the wall-clock ratio beside it.
   Target: at most 4x. This machine's own noise on such a ratio is printed beside it: fast against fast, the
   same work twice in the same rounds.

Exit status 0 when every target is met, 1 otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from robaudit import examples
from robaudit.labels import WORST_CASE
from robaudit.stages.analyze import analyze_run
from robaudit.stages.harden import harden_run

EXAMPLES = {"digits_cnn.pt2": "digits", "moons_mlp.pt2": "moons"}
GAP_TARGET = 1.0  # points
COST_TARGET = 4.0
# AutoAttack's members defined on two classes and vector inputs (see the module docstring)
TWO_CLASS_REFERENCE = ["apgd:steps=100,n_restarts=5", "square:n_queries=5000"]


def worst_cases(run_dir: Path) -> dict[float, float]:
    """eps -> the run's worst-case accuracy there."""
    acc = pd.read_csv(run_dir / "accuracy.csv")
    rows = acc[(acc["attack"] == WORST_CASE) & acc["eps"].notna()]
    return {round(float(r.eps), 6): float(r.accuracy) for r in rows.itertuples()}


def timed(model, dataset: str, out: Path, *, samples: int | None, **options) -> tuple[float, float]:
    """Process CPU and wall seconds of one ``analyze_run`` (the model checks on, no report)."""
    cpu, wall = time.process_time(), time.perf_counter()
    analyze_run(model, dataset, out=out, samples=samples, report=False, force=True, **options)
    return time.process_time() - cpu, time.perf_counter() - wall


def cost_rounds(model, dataset: str, root: Path, *, samples: int | None, rounds: int) -> dict[str, list]:
    """Per round: default, fast and fast again, the order rotating; CPU and wall seconds of each."""
    kinds = ["default", "fast", "fast again"]
    times: dict[str, list] = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % 3:] + kinds[:r % 3]
        for kind in order:
            battery = "default" if kind == "default" else "fast"
            times[kind].append(timed(model, dataset, root / f"cost-{kind.replace(' ', '-')}", samples=samples,
                                     battery=battery))
    return times


def reference(model, dataset: str, out: Path, *, samples: int | None) -> tuple[str, dict[float, float]]:
    """Full AutoAttack's accuracy per eps (or the two-class reference on moons), and what it was."""
    if dataset == "moons":
        analyze_run(model, dataset, out=out, samples=samples, attacks=TWO_CLASS_REFERENCE, checks=False,
                    report=False, force=True)
        return "APGD-CE(100 steps, 5 restarts) + Square-5000", worst_cases(out)
    analyze_run(model, dataset, out=out, samples=samples, battery="standard", checks=False, report=False,
                force=True)
    return "AutoAttack standard", worst_cases(out)


def bench_model(name: str, model, dataset: str, root: Path, *, samples: int | None, rounds: int) -> dict:
    """One model: its default-battery worst case, the reference, and the cost rounds."""
    times = cost_rounds(model, dataset, root, samples=samples, rounds=rounds)
    default = worst_cases(root / "cost-default")
    what, ref = reference(model, dataset, root / "reference", samples=samples)
    return {"name": name, "default": default, "reference": ref, "what": what, "times": times}


def ratio(times: dict[str, list], a: str, b: str, column: int) -> float:
    """The median per-round ratio a/b of CPU (column 0) or wall (column 1) seconds."""
    return statistics.median(x[column] / y[column] for x, y in zip(times[a], times[b]))


def report(rows: list[dict], out=sys.stdout) -> bool:
    """Print the table and the verdicts; whether every target is met."""
    ok = True
    out.write(f"{'model':<24} {'eps':>5} {'default worst':>14} {'AutoAttack':>11} {'gap (pts)':>10}  reference\n")
    for row in rows:
        for eps in sorted(row["reference"]):
            d, a = row["default"].get(eps), row["reference"][eps]
            gap = 100 * (d - a)
            ok &= gap <= GAP_TARGET
            flag = "" if gap <= GAP_TARGET else "  ABOVE TARGET"
            out.write(f"{row['name']:<24} {eps:>5g} {100 * d:>13.1f}% {100 * a:>10.1f}% {gap:>+10.1f}  "
                      f"{row['what']}{flag}\n")
    out.write(f"\n{'model':<24} {'default/fast CPU':>17} {'wall':>7} {'fast/fast CPU (noise)':>22} "
              f"{'default CPU s':>14} {'fast CPU s':>11}\n")
    for row in rows:
        t = row["times"]
        cpu, wall, noise = ratio(t, "default", "fast", 0), ratio(t, "default", "fast", 1), ratio(t, "fast again", "fast", 0)
        ok &= cpu <= COST_TARGET
        flag = "" if cpu <= COST_TARGET else "  ABOVE TARGET"
        out.write(f"{row['name']:<24} {cpu:>16.2f}x {wall:>6.2f}x {noise:>21.2f}x "
                  f"{statistics.median(x[0] for x in t['default']):>14.2f} "
                  f"{statistics.median(x[0] for x in t['fast']):>11.2f}{flag}\n")
    out.write(f"\ntargets: gap <= {GAP_TARGET:g} point, default/fast CPU <= {COST_TARGET:g}x: "
              f"{'all met' if ok else 'NOT MET'}\n")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 samples, 2 rounds")
    parser.add_argument("--samples", type=int, help="samples per data set (default: the whole test split)")
    parser.add_argument("--rounds", type=int, help="cost rounds per model (default 3, --quick 2)")
    args = parser.parse_args(argv)
    samples = args.samples or (120 if args.quick else None)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for file, dataset in EXAMPLES.items():
            root = Path(tmp) / dataset
            model = examples.path(file)
            rows.append(bench_model(file, model, dataset, root, samples=samples, rounds=rounds))
            hardened = harden_run(root / "cost-default")  # its defaults, on the default-battery run
            rows.append(bench_model(f"{file} hardened", hardened.model_path, dataset, root / "hardened", samples=samples,
                                    rounds=rounds))
    sys.stdout.write(f"{samples or 'all'} samples per data set, {rounds} cost rounds, 1 thread\n\n")
    ok = report(rows)
    sys.stdout.write(f"\n{time.perf_counter() - started:.0f} s in all\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
