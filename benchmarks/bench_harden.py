"""Seconds per training epoch of the hardening methods, side by side in one run.

    python benchmarks/bench_harden.py                    # digits CNN (BatchNorm), 3 rounds
    python benchmarks/bench_harden.py --dataset moons --rounds 5
    python benchmarks/bench_harden.py --dist 2           # 2 torchrun processes vs 1, one thread each

Targets: ``atlr`` at most 1.25x ``at`` (the extra clean pass and the regularizer), and ``layerwise`` at
most 1.3x ``standard`` (perturbing activations reuses the previous batch's gradient, no extra pass).
The methods run interleaved, one epoch each per round, so that load from other processes affects them
alike; the median over rounds is reported. Only the training loop is timed (``history.seconds``),
not the per-epoch validation.

``--dist N`` instead times one epoch of each adversarial method in one process and under
``torchrun --standalone --nproc-per-node=N`` (gloo, one thread per process), interleaved per round, and
prints the speedup of the medians (training loop only; process start and validation are not counted).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch

from robaudit.data import load_dataset
from robaudit.training.fit import harden

try:
    from robaudit.examples.models import DigitsCNN, MoonsMLP
except ImportError:  # pragma: no cover - a source tree that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from models import DigitsCNN, MoonsMLP

METHODS = ("standard", "layerwise", "at", "atlr")
PAIRS = (("atlr", "at", 1.25), ("layerwise", "standard", 1.3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "moons"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the adversarial methods")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dist", type=int, metavar="N", help="compare N torchrun processes with 1 (one thread each)")
    p.add_argument("--dist-worker", metavar="OUT", help=argparse.SUPPRESS)  # one process of a --dist job
    p.add_argument("--method", default="atlr", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dist_worker:
        return _dist_worker(args)
    if args.dist:
        return _dist_compare(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DigitsCNN() if args.dataset == "digits" else MoonsMLP()
    layers = ["features.2", "features.5"] if args.dataset == "digits" else ["net.3", "net.5"]
    train = load_dataset(args.dataset, split="train")
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu_last: list[float] = []

    class CpuTime:  # a Trainer callback: CPU time of the training loop alone (validation excluded)
        def on_epoch_start(self, trainer, epoch):
            self.c0 = time.process_time()

        def on_train_end(self, trainer, epoch, row):
            cpu_last.append(time.process_time() - self.c0)

    started = time.perf_counter()
    for r in range(args.rounds):
        order = METHODS if r % 2 == 0 else METHODS[::-1]
        for method in order:
            res = harden(copy.deepcopy(model), train, eps=0.1, method=method, mvl_layers=layers, epochs=1,
                         batch_size=args.batch_size, steps=args.steps, seed=r, device=args.device,
                         check_collapse=False, callbacks=[CpuTime()])
            wall[method].append(float(res.history["seconds"].iloc[-1]))
            cpu[method].append(cpu_last[-1])
    out = sys.stdout
    out.write(f"{args.dataset}: {type(model).__name__}, {len(train)} training samples (10% held out), batch "
              f"{args.batch_size}, PGD-{args.steps}, {args.rounds} rounds, {torch.get_num_threads()} thread(s), "
              f"device {args.device}\n\n")
    out.write(f"{'method':<10} {'wall s/epoch':>13} {'(min-max)':>15} {'CPU s/epoch':>12}\n")
    for m in METHODS:
        t = wall[m]
        out.write(f"{m:<10} {statistics.median(t):>13.3f} {f'({min(t):.2f}-{max(t):.2f})':>15} "
                  f"{statistics.median(cpu[m]):>12.3f}\n")
    out.write("\nratios of medians (CPU time is what the process itself used, less sensitive to other load):\n")
    ok = True
    for a, b, target in PAIRS:
        r_wall = statistics.median(wall[a]) / statistics.median(wall[b])
        r_cpu = statistics.median(cpu[a]) / statistics.median(cpu[b])
        verdict = "ok" if r_cpu <= target else "ABOVE TARGET"
        ok &= r_cpu <= target
        out.write(f"{a} / {b}: wall {r_wall:.2f}x, CPU {r_cpu:.2f}x  (target <= {target}x: {verdict})\n")
    out.write(f"\n{time.perf_counter() - started:.0f} s in all\n")
    return 0 if ok else 1


def _setup(dataset: str):
    """The model, its MVL layers and the training split of ``dataset``."""
    torch.manual_seed(0)
    model = DigitsCNN() if dataset == "digits" else MoonsMLP()
    layers = ["features.2", "features.5"] if dataset == "digits" else ["net.3", "net.5"]
    return model, layers, load_dataset(dataset, split="train")


class _LoopCpu:
    """A Trainer callback: CPU seconds of this process in the training loop (validation excluded)."""

    def on_epoch_start(self, trainer, epoch):
        self.c0 = time.process_time()

    def on_train_end(self, trainer, epoch, row):
        self.seconds = time.process_time() - self.c0


def _one_epoch(args, method: str, seed: int) -> tuple[float, float]:
    """Wall and CPU seconds of one training epoch of ``method`` (in this process, or its part of a torchrun job)."""
    model, layers, train = _setup(args.dataset)
    cpu = _LoopCpu()
    res = harden(model, train, eps=0.1, method=method, mvl_layers=layers, epochs=1, batch_size=args.batch_size,
                 steps=args.steps, seed=seed, device=args.device, check_collapse=False, callbacks=[cpu])
    return float(res.history["seconds"].iloc[-1]), cpu.seconds


def _dist_worker(args) -> int:
    """One process of a ``--dist`` torchrun job: rank 0 writes the epoch's seconds to ``--dist-worker``."""
    from robaudit import dist

    torch.set_num_threads(1)
    dist.init(torch.device(args.device))
    seconds, cpu = _one_epoch(args, args.method, 0)
    cpus = dist.all_gather_objects(cpu)
    if dist.is_main():  # the job takes as long as its busiest process
        Path(args.dist_worker).write_text(json.dumps({"seconds": seconds, "cpu": max(cpus)}))
    dist.shutdown()
    return 0


def _dist_compare(args) -> int:
    """One epoch per adversarial method, in 1 process and in ``--dist`` processes, interleaved per round."""
    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one: dict[str, list[tuple[float, float]]] = {"at": [], "atlr": []}
    many: dict[str, list[tuple[float, float]]] = {"at": [], "atlr": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "epoch.json"
        for r in range(args.rounds):
            for method in one:
                one[method].append(_one_epoch(args, method, 0))  # (wall, CPU)
                job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={args.dist}", __file__, "--dist-worker", str(out), "--method",
                                      method, "--dataset", args.dataset, "--batch-size", str(args.batch_size),
                                      "--steps", str(args.steps), "--device", args.device],
                                     env=env, capture_output=True, text=True)
                if job.returncode != 0:
                    sys.stderr.write(job.stderr[-4000:])
                    return 1
                done = json.loads(out.read_text())
                many[method].append((done["seconds"], done["cpu"]))
    n_train = len(_setup(args.dataset)[2])
    sys.stdout.write(f"{args.dataset}: {n_train} training samples (10% held out), batch {args.batch_size} (global), "
                     f"PGD-{args.steps}, {args.rounds} rounds, one thread per process, device {args.device}\n\n")
    sys.stdout.write(f"{'':<8} {'wall s/epoch':>28} {'':>8}   {'CPU s/epoch (busiest process)':>30}\n")
    sys.stdout.write(f"{'method':<8} {'1 process':>12} {f'{args.dist} processes':>15} {'speedup':>8}   "
                     f"{'1 process':>12} {f'{args.dist} processes':>15} {'ratio':>6}\n")
    for m in one:
        (a, ca), (b, cb) = ([statistics.median(v) for v in zip(*runs)] for runs in (one[m], many[m]))
        sys.stdout.write(f"{m:<8} {a:>12.3f} {b:>15.3f} {a / b:>7.2f}x   {ca:>12.3f} {cb:>15.3f} {ca / cb:>5.2f}x\n")
    load = os.getloadavg()[0]
    sys.stdout.write(f"\nload average {load:.1f} on {os.cpu_count()} CPUs: wall times need {args.dist} free cores; "
                     "the CPU ratio is the speedup they would give (waiting for the other process is not CPU time)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
