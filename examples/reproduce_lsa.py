"""Test the LSA paper's AT-LR claim against controls: is "most vulnerable" more than "deepest"?

    python examples/reproduce_lsa.py                    # 3 seeds, 3 models, both regimes, every control
    python examples/reproduce_lsa.py --quick            # 1 seed, 256 training samples, 1-2 epochs: a smoke run
    python examples/reproduce_lsa.py --ablation         # digits: gamma, per-sample RE, layer sets, dual BN

For every model (``moons``: a three-layer MLP; ``digits``: a CNN with BatchNorm and three ReLU layers;
``digits-deep``: the seven-stage conv-BN-ReLU CNN of ``examples/models.py``) and seed: train it normally,
run the Layer Sustainability Analysis on it (``robaudit.analyze``: PGD at the training eps, ReLU outputs) and
pick k = ``--top`` layers. Then train every method from the same weights with the same k, gamma, eps and epochs,
in two regimes: ``pretrained`` fine-tunes the trained model (what ``robaudit harden`` does) and ``scratch`` trains
from the trained model's initial weights (the paper's regime):

- ``at``             PGD-10 adversarial training (Madry et al.), the base AT every claim is measured against;
- ``atlr``           AT-LR: the same AT plus ``gamma * RE_l(x, x_adv)`` on the k MVL layers ranked by ``re_mean``;
- ``atlr-gain``      AT-LR on the k MVL layers ranked by ``re_gain`` (each layer's own share of the RE);
- ``atlr-deepest``   control: the k deepest probed layers (``robaudit.training.layers.control_layers``);
- ``atlr-random``    control: k layers drawn at random (seeded; 3 draws per seed, averaged per seed);
- ``atlr-lvl``       control: the k *least* vulnerable layers by ``re_mean``;
- also on request (``--methods``): ``standard``, ``atlr-mvl1`` / ``atlr-lvl1`` (the single most / least
  vulnerable layer), ``atlr[gamma=3]``, ``layerwise``.

Two methods whose layer sets are equal are the same training (the regularized layers are passed in forward order,
so the order they were ranked in does not matter): it runs once and both rows carry its numbers (``same_as``).

Evaluation, on the first 200 test samples (``--eval-samples``), at 1x, 1.5x and 2x the training eps: PGD-20 (alpha 2.5 eps / 20, random start) and
Square (1,000 queries, black-box, so masked gradients do not fool it) on every sample PGD left correct; a sample is
robust when both attacks leave it correct (the per-sample worst of the two). The tables give mean ± std over seeds
and the paired difference (same seed, same starting weights) against ``atlr-deepest`` and against ``at``, with the
number of seeds won. Runs that collapse to a constant output are reported and left out of the means.

Outputs (``--out``, default ``reports/reproduce/``): ``per_seed.csv`` (one row per model, regime, seed, method,
random draw and eps), ``summary.csv`` (means, stds and paired differences), ``table.md`` and
``accuracy_vs_eps.png``; ``run.json`` holds the settings, the wall and CPU seconds (of the run and of each task) and
the machine's load average after every task: other jobs on the same cores slow a run down, and a task's CPU seconds
over its wall seconds say by how much. Tasks run in two processes of one thread each (``--jobs``, ``--threads``).
The same seeds give the same table, whatever the number of processes.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from robaudit import analyze
from robaudit import attacks as atk
from robaudit.data import load_dataset
from robaudit.lsa import ranking_rows, select_mvl
from robaudit.training.fit import harden
from robaudit.training.layers import LayerRule, control_layers

try:
    from robaudit.examples.models import DigitsCNN, DigitsDeepCNN, MoonsMLP
    from robaudit.examples.reproduce_tables import read_rows, write_outputs
except ImportError:  # pragma: no cover - a source tree that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import DigitsCNN, DigitsDeepCNN, MoonsMLP
    from reproduce_tables import read_rows, write_outputs

log = logging.getLogger("reproduce_lsa")

TRAIN_EPS = 0.1
EVAL_MULTIPLES = (1.0, 1.5, 2.0)
RANDOM_DRAWS = 3
METHODS = ("at", "atlr", "atlr-gain", "atlr-deepest", "atlr-random", "atlr-lvl")
ABLATION = ("at", "atlr", "atlr[gamma=3]", "atlr[re=per-sample]", "atlr-mvl1", "atlr-lvl1",
            "atlr[layers=all]", "atlr[dual_bn=1]")
ALIASES = {"atlr-lvl": "bottom", "atlr-mvl1": "top1", "atlr-lvl1": "bottom1", "atlr-deepest": "deepest",
           "atlr-random": "random", "atlr-gain": "gain"}
REGIMES = ("pretrained", "scratch")
QUICK_TRAIN_SAMPLES = 256  # --quick, a smoke run: enough batches to exercise every method, not to learn much
QUICK_EVAL_SAMPLES = 32


@dataclass(frozen=True)
class Setup:
    """One model of the experiment: its data set, architecture and training lengths."""

    dataset: str
    factory: type
    pre_epochs: int  # ordinary training of the model the LSA ranks
    finetune_epochs: int  # every method, regime "pretrained"
    scratch_epochs: int  # every method, regime "scratch"
    lr: float
    batch_size: int = 64


# The default lengths keep the whole default run (3 seeds, 3 models, both regimes, every control) near 20 minutes of
# two cores: about 2,300 CPU seconds, half of them the deep model's, a third of all of it the evaluation.
SETUPS = {
    "moons": Setup("moons", MoonsMLP, 30, 20, 30, 1e-3),
    "digits": Setup("digits", DigitsCNN, 10, 6, 10, 1e-3),
    "digits-deep": Setup("digits", DigitsDeepCNN, 10, 4, 8, 2e-3),
}
EVAL_SAMPLES = 200  # the first 200 test samples: one sample is half a point


@dataclass(frozen=True)
class Evaluation:
    """How the trained models are attacked: eps values, Square's queries and how many test samples."""

    eps: tuple[float, ...]
    square_queries: int = 1000
    samples: int | None = None  # None: the whole test split


@dataclass(frozen=True)
class Ranking:
    """What the LSA of the trained model says: the rankable layers by ``re_mean`` and by ``re_gain``, each layer's
    depth, and the candidate rows the controls draw from."""

    by_re: list[str]
    by_gain: list[str]
    depth: dict[str, int]
    candidates: pd.DataFrame

    def text(self) -> str:
        return "; ".join(f"{n} (depth {self.depth[n]})" for n in self.by_re)


# -- the analysis and the layer choices --------------------------------------------------------
def rank_layers(model, test, *, seed: int, samples: int) -> Ranking:
    """LSA of ``model``: ReLU outputs under PGD at the training eps, ranked by mean RE and by gain."""
    res = analyze(model, (test.x[:samples], test.y[:samples]), attacks=["pgd"], eps=[TRAIN_EPS],
                  layer_types=["ReLU"], device="cpu", seed=seed, batch_size=256)
    where = dict(attack="pgd", eps=TRAIN_EPS)
    candidates = ranking_rows(res.lsa, res.accuracy, **where)[0]
    n_gain = len(ranking_rows(res.lsa, res.accuracy, metric="re_gain", **where)[0])
    by_re = select_mvl(res.lsa, res.accuracy, k=len(candidates), **where)
    by_gain = select_mvl(res.lsa, res.accuracy, k=n_gain, metric="re_gain", **where)
    depth = dict(zip(by_re.layers["layer"], by_re.layers["depth"].astype(int)))
    return Ranking(by_re.names, by_gain.names, depth, candidates)


def parse_method(text: str) -> tuple[str, dict]:
    """``atlr``, an alias (``atlr-lvl``, ``atlr-deepest``, ``atlr-random``, ``atlr-gain``, ``atlr-mvl1``,
    ``atlr-lvl1``) or a variant such as ``atlr[gamma=3]``, ``atlr[layers=bottom1,re=per-sample]``.

    Options: ``gamma``, ``re`` (pooled / per-sample), ``layers`` (topK, bottomK, gainK, deepest, random or all),
    ``dual_bn``.
    """
    text = text.strip()
    name, _, rest = text.partition("[")
    opts: dict = {}
    for item in filter(None, (p.strip() for p in rest.rstrip("]").split(","))):
        key, _, value = item.partition("=")
        opts[key.strip()] = value.strip() or "1"
    if name in ALIASES:
        name, opts = "atlr", {"layers": ALIASES[name], **opts}
    if name not in ("standard", "at", "atlr", "layerwise"):
        raise SystemExit(f"unknown method {text!r}")
    return name, opts


def pick_layers(ranking: Ranking, spec: str | None, top: int, seed: int) -> list[list[str]]:
    """The layer sets of one method, one per random draw (one set for every other rule), in forward order.

    ``top``/``topK`` (the MVL list by re_mean), ``gain``/``gainK`` (by re_gain), ``bottom``/``bottomK`` (the least
    vulnerable), ``deepest`` and ``random`` (the product's controls, k = ``top``), ``all``.
    """
    spec = spec or "top"
    forward = lambda names: sorted(names, key=ranking.depth.__getitem__)  # noqa: E731
    if spec == "all":
        return [forward(ranking.by_re)]
    if spec in ("deepest", "random"):
        rule = LayerRule.of(spec)
        draws = [seed] if rule is LayerRule.DEEPEST else [1000 * seed + d for d in range(RANDOM_DRAWS)]
        return [forward(control_layers(ranking.candidates, rule, k=top, seed=s)) for s in draws]
    for prefix, ranked in (("bottom", ranking.by_re[::-1]), ("top", ranking.by_re), ("gain", ranking.by_gain)):
        if spec.startswith(prefix):
            return [forward(ranked[:int(spec[len(prefix):] or top)])]
    raise SystemExit(f"unknown layer choice {spec!r}: use topK, bottomK, gainK, deepest, random or all")


# -- evaluation --------------------------------------------------------------------------------
def correct_under(model, attack: str, x, y, eps: float, *, seed: int, batch_size: int = 512, **params):
    """Per-sample "still correct" under one attack (PGD-20 or Square) at ``eps``; the model in eval mode."""
    model.eval()
    fn = atk.build(atk.AttackSpec(attack, tuple(params.items()), eps), model, num_classes=int(y.max()) + 1,
                   seed=seed)
    atk.reseed(fn, seed)
    out = []
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        xa = fn(xb, yb)
        with torch.no_grad():
            out.append(model(xa).argmax(1) == yb)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def evaluate(model, x, y, evaluation: Evaluation, *, seed: int) -> list[dict]:
    """Clean accuracy, and per eps PGD-20's and the worst-of-PGD-and-Square accuracy (Square runs on the samples
    PGD left correct: a sample PGD fools is not robust whatever Square finds)."""
    model.eval()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    rows = [{"eps": 0.0, "accuracy": float(clean.float().mean()), "pgd_accuracy": float(clean.float().mean())}]
    for e in evaluation.eps:
        pgd = correct_under(model, "pgd", x, y, e, seed=seed, steps=20, random_start=True)
        worst = pgd.clone()
        if pgd.any():
            worst[pgd] = correct_under(model, "square", x[pgd], y[pgd], e, seed=seed,
                                       n_queries=evaluation.square_queries)
        rows.append({"eps": e, "accuracy": float(worst.float().mean()), "pgd_accuracy": float(pgd.float().mean())})
    return rows


# -- one model, seed and regime ----------------------------------------------------------------
def pretrain(setup: Setup, train, *, seed: int, epochs: int):
    """The ordinarily trained model whose LSA picks the layers, and its initial weights."""
    torch.manual_seed(seed)
    base = setup.factory()
    init_state = copy.deepcopy(base.state_dict())
    harden(base, train, eps=TRAIN_EPS, method="standard", epochs=epochs, lr=setup.lr, batch_size=setup.batch_size,
           seed=seed, schedule="none", check_collapse=False)
    return base, init_state


def train_method(model, train, kind: str, opts: dict, layers: list[str], *, setup: Setup, epochs: int, seed: int,
                 gamma: float, re_mode: str) -> float:
    """Train ``model`` in place with one method; the seconds it took."""
    res = harden(model, train, eps=TRAIN_EPS, method=kind, mvl_layers=layers,
                 gamma=float(opts.get("gamma", gamma)), re_mode=opts.get("re", re_mode),
                 dual_bn=bool(int(opts.get("dual_bn", 0))), epochs=epochs, lr=setup.lr, batch_size=setup.batch_size,
                 seed=seed, check_collapse=False)
    return float(res.history["seconds"].sum())


def run_one(name: str, seed: int, regime: str, *, epochs: dict[str, int] | None, pre_epochs: int | None, gamma: float,
            re_mode: str, top: int, evaluation: Evaluation, methods, train_samples: int | None = None) -> list[dict]:
    """Pretrain, rank layers by LSA, then train every method from the same starting point; evaluate each."""
    setup = SETUPS[name]
    pre_ep = pre_epochs or setup.pre_epochs
    ep = (epochs or {}).get(regime) or (setup.finetune_epochs if regime == "pretrained" else setup.scratch_epochs)
    train, test = load_dataset(setup.dataset, split="train"), load_dataset(setup.dataset, split="test")
    if train_samples is not None:  # a smoke run: the first samples of the training split
        train = train.subset(torch.arange(min(train_samples, len(train.y))), "train")
    x, y = test.x[:evaluation.samples], test.y[:evaluation.samples]
    t0 = time.perf_counter()
    base, init_state = pretrain(setup, train, seed=seed, epochs=pre_ep)
    ranking = rank_layers(base, test, seed=seed, samples=len(test.y))
    log.info("%s %s seed %d: pretrained in %.1f s; layers by re_mean %s; by re_gain %s", name, regime, seed,
             time.perf_counter() - t0, ranking.text(), ", ".join(ranking.by_gain))
    done: dict[tuple, tuple[str, float, list[dict], bool]] = {}  # (kind, options, layers) -> what it gave
    rows = []
    for label in methods:
        kind, opts = parse_method(label)
        draws = pick_layers(ranking, opts.get("layers"), top, seed) if kind in ("atlr", "layerwise") else [[]]
        for draw, layers in enumerate(draws):
            key = (kind, tuple(sorted((k, v) for k, v in opts.items() if k != "layers")), tuple(layers))
            if key not in done:
                model = copy.deepcopy(base)
                if regime == "scratch":
                    model.load_state_dict(init_state)
                t1 = time.perf_counter()
                secs = train_method(model, train, kind, opts, layers, setup=setup, epochs=ep, seed=seed,
                                    gamma=gamma, re_mode=re_mode)
                with torch.no_grad():
                    collapsed = bool(model.eval()(test.x).argmax(1).unique().numel() == 1)
                if collapsed:
                    log.warning("%s %s seed %d %s collapsed to a constant output: left out of the means", name,
                                regime, seed, label)
                done[key] = (label, secs, evaluate(model, x, y, evaluation, seed=seed), collapsed)
                log.info("%s %s seed %d %-12s layers %s: clean %.3f (%.1f s)", name, regime, seed, label, layers,
                         done[key][2][0]["accuracy"], time.perf_counter() - t1)
            first, secs, evals, collapsed = done[key]
            for r in evals:
                rows.append({"model": name, "dataset": setup.dataset, "regime": regime, "seed": seed,
                             "method": label, "draw": draw if len(draws) > 1 else "", **r,
                             "layers": " ".join(layers),
                             "depths": " ".join(str(ranking.depth[n]) for n in layers),
                             "same_as": first if first != label else "", "epochs": ep, "train_seconds": secs,
                             "collapsed": collapsed, "ranking_re_mean": ranking.text(),
                             "ranking_re_gain": ", ".join(ranking.by_gain)})
    return rows




# -- the command -------------------------------------------------------------------------------
def split_methods(text: str) -> list[str]:
    """Split a method list on commas or semicolons outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch in ",;" and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [m for m in out if m]


def _worker_init(threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("robaudit").setLevel(logging.WARNING)
    torch.set_num_threads(threads)


def epochs_option(text: str) -> dict[str, int]:
    """``--epochs N`` (both regimes) or ``P/S`` (pretrained / scratch)."""
    parts = text.split("/")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or P/S (positive whole numbers of epochs)")
    return dict(zip(REGIMES, [int(p) for p in parts] * (3 - len(parts))))


def eval_samples(n: int | None, *, quick: bool) -> int | None:
    """How many test samples are evaluated (None: all of them), from ``--eval-samples``."""
    if n is None:
        return QUICK_EVAL_SAMPLES if quick else EVAL_SAMPLES
    return n or None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: 1 seed, {QUICK_TRAIN_SAMPLES} training samples, 2 pretraining epochs and 1 "
                        f"training epoch, {QUICK_EVAL_SAMPLES} test samples, Square 100 queries")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--datasets", "--models", dest="models", default=",".join(SETUPS),
                   help=f"models to run, from {', '.join(SETUPS)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=epochs_option, metavar="N or P/S",
                   help="training epochs of every method: N in both regimes, or P (pretrained) / S (scratch); "
                        "default per model and regime")
    p.add_argument("--pre-epochs", type=int, help="ordinary training epochs of the ranked model (default per model)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--re-mode", default="pooled", choices=["pooled", "per-sample"])
    p.add_argument("--top", type=int, default=2, help="k: the number of layers every AT-LR method regularizes")
    p.add_argument("--init", default="both", choices=["both", *REGIMES],
                   help="pretrained: fine-tune the trained model (what `robaudit harden` does); scratch: train every "
                        "method from the trained model's initial weights (the paper's regime); both (default)")
    p.add_argument("--square-queries", type=int, help="Square's queries (default 1000; 100 with --quick)")
    p.add_argument("--eval-samples", type=int,
                   help=f"the first N test samples are evaluated (default {EVAL_SAMPLES}; {QUICK_EVAL_SAMPLES} with "
                        "--quick; 0: the whole test split)")
    p.add_argument("--train-samples", type=int,
                   help=f"train on the first N samples of the training split (default all; {QUICK_TRAIN_SAMPLES} "
                        "with --quick)")
    p.add_argument("--ablation", action="store_true",
                   help="digits only: AT-LR with other gammas, per-sample RE and other layer sets, against AT")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (small models run best on one)")
    p.add_argument("--jobs", type=int, default=2, help="processes running (model, seed, regime) tasks side by side")
    p.add_argument("--out", type=Path, default=Path("reports/reproduce"))
    p.add_argument("--tables-from", type=Path, metavar="DIR",
                   help="train nothing: rebuild summary.csv, table.md and the plot from DIR's per_seed.csv and "
                        "run.json into --out")
    args = p.parse_args(argv)
    if args.ablation:
        args.methods = ";".join(ABLATION)
        args.models = "digits" if args.models == ",".join(SETUPS) else args.models
        args.init = "pretrained" if args.init == "both" else args.init
        if args.out == Path("reports/reproduce"):
            args.out = args.out / "ablation"
    unknown = [m for m in args.models.split(",") if m.strip() and m.strip() not in SETUPS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}: choose from {', '.join(SETUPS)}")
    return args


def timed_one(name: str, seed: int, regime: str, **kw) -> tuple[list[dict], dict]:
    """:func:`run_one`, and its wall and CPU seconds: on cores shared with other jobs, CPU over wall is the share of
    a core the task got."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = run_one(name, seed, regime, **kw)
    return rows, {"model": name, "seed": seed, "regime": regime, "wall_s": round(time.perf_counter() - wall, 1),
                  "cpu_s": round(time.process_time() - cpu, 1)}


def run_tasks(tasks, kw, *, jobs: int, threads: int, done=lambda rows, times: None) -> list[dict]:
    """Every (model, seed, regime) task, in ``jobs`` processes, seed by seed (a run cut short still holds whole
    seeds), the longest first within a seed (SETUPS lists the models cheapest first; scratch trains longer), so the
    last tasks are short and no process waits long for the other at the end. ``done(rows, times)`` gets the rows
    finished so far and each task's seconds after every task."""
    ordered = sorted(tasks, key=lambda t: (t[1], -list(SETUPS).index(t[0]), -REGIMES.index(t[2])))
    finished: dict[tuple, tuple[list[dict], dict]] = {}

    def report() -> None:
        done([row for u in ordered if u in finished for row in finished[u][0]],
             [finished[u][1] for u in ordered if u in finished])

    if jobs <= 1 or len(tasks) <= 1:
        for t in ordered:
            finished[t] = timed_one(*t, **kw)
            report()
        return [row for t in tasks for row in finished[t][0]]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(timed_one, *t, **kw): t for t in ordered}
        for f in as_completed(futures):
            finished[futures[f]] = f.result()
            report()
    return [row for t in tasks for row in finished[t][0]]


def settings_text(command: str, args, seeds: int, evaluation: Evaluation, epochs, pre_epochs, regimes,
                  train_samples: int | None = None) -> str:
    """The line under the table's title: the command and every setting the numbers depend on."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lengths = ", ".join(
        f"{m} {pre_epochs or SETUPS[m].pre_epochs}/"
        + "/".join(str((epochs or {}).get(r) or (SETUPS[m].finetune_epochs if r == "pretrained"
                                                  else SETUPS[m].scratch_epochs))
                   for r in regimes) for m in models)
    n = "the whole test split" if evaluation.samples is None else f"the first {evaluation.samples} test samples"
    return (f"Command: `{command}`\n\n{seeds} seed(s); k = {args.top} layers for every AT-LR method; gamma "
            f"{args.gamma:g}, RE {args.re_mode}; PGD-10 training at eps {TRAIN_EPS:g}, Adam, on "
            f"{'the whole training split' if train_samples is None else f'its first {train_samples} samples'}; "
            f"epochs (ordinary "
            f"training / {' / '.join(regimes)}): {lengths}. Layers ranked by the LSA of the ordinarily trained model "
            f"(ReLU outputs, PGD at eps {TRAIN_EPS:g}, whole test split). Evaluation on {n}: PGD-20 with a random "
            f"start, then Square ({evaluation.square_queries} queries) on the samples PGD left correct; eps "
            f"{', '.join(f'{e:g}' for e in evaluation.eps)}.")


def rebuild(source: Path, out: Path) -> int:
    """The tables and plot of an earlier run, from its per_seed.csv and run.json (nothing is trained)."""
    rows = source / "per_seed.csv"
    rows = rows if rows.exists() else source / "per_seed.partial.csv"  # a run cut short
    results = read_rows(rows)
    run = json.loads((source / "run.json").read_text())
    text = write_outputs(results, out, run["settings"], train_eps=TRAIN_EPS)
    if out.resolve() != source.resolve():
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    sys.stdout.write(text + f"\nrebuilt from {source}/ into {out}/\n")
    return 0


class RunLog:
    """What run.json says of a run: its command and settings, wall and CPU seconds, each task's seconds, and the
    machine's load average (other jobs share its cores; this run's own processes count in it), after every task."""

    def __init__(self, command: str, settings: str, *, jobs: int, threads: int) -> None:
        self.head = {"command": command, "settings": settings}
        self.machine = {"cpu_count": os.cpu_count(), "jobs": jobs, "threads": threads, "torch": torch.__version__}
        self.started, self.times = time.perf_counter(), os.times()
        self.loads = [[0.0, *self.load()]]
        self.tasks: list[dict] = []

    @staticmethod
    def load() -> list[float]:
        return [round(v, 2) for v in os.getloadavg()]

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def progress(self, tasks: list[dict]) -> None:
        self.tasks = tasks
        self.loads.append([round(self.seconds(), 1), *self.load()])

    def record(self, *, complete: bool) -> dict:
        """run.json's content; once complete, the CPU seconds of this process and its workers (imports included)."""
        seconds, now = self.seconds(), os.times()
        task_cpu, task_wall = (sum(t[k] for t in self.tasks) for k in ("cpu_s", "wall_s"))
        share = task_cpu / task_wall if task_wall else float("nan")
        out = {**self.head, "complete": complete, "seconds": round(seconds, 1), **self.machine,
               "task_cpu_seconds": round(task_cpu, 1), "task_wall_seconds": round(task_wall, 1),
               "task_cpu_share": round(share, 3)}
        if complete:
            cpu = sum(getattr(now, f) - getattr(self.times, f)
                      for f in ("user", "system", "children_user", "children_system"))
            out |= {"cpu_seconds": round(cpu, 1), "cores_used": round(cpu / seconds, 2),
                    "seconds_if_each_worker_had_a_core": round(seconds * share, 1)}
        return out | {"load_average_at_start": self.loads[0][1:], "load_average_at_end": self.load(),
                      "load_average_after_each_task": self.loads[1:], "tasks": self.tasks}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.tables_from is not None:
        return rebuild(args.tables_from, args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("robaudit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    epochs = args.epochs or (epochs_option("1") if args.quick else None)
    pre_epochs = args.pre_epochs or (2 if args.quick else None)
    train_samples = args.train_samples or (QUICK_TRAIN_SAMPLES if args.quick else None)
    evaluation = Evaluation(tuple(round(m * TRAIN_EPS, 6) for m in EVAL_MULTIPLES),
                            args.square_queries or (100 if args.quick else 1000),
                            eval_samples(args.eval_samples, quick=args.quick))
    methods = split_methods(args.methods)
    for m in methods:
        parse_method(m)
    if "at" not in methods:
        methods.insert(0, "at")
    regimes = REGIMES if args.init == "both" else (args.init,)
    tasks = [(name.strip(), seed, regime) for name in args.models.split(",") if name.strip()
             for seed in range(seeds) for regime in regimes]
    kw = dict(epochs=epochs, pre_epochs=pre_epochs, gamma=args.gamma, re_mode=args.re_mode, top=args.top,
              evaluation=evaluation, methods=methods, train_samples=train_samples)
    command = " ".join(["python examples/reproduce_lsa.py", *argv])
    settings = settings_text(command, args, seeds, evaluation, epochs, pre_epochs, regimes, train_samples)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = RunLog(command, settings, jobs=args.jobs, threads=args.threads)

    def progress(rows: list[dict], times: list[dict]) -> None:  # a run cut short: --tables-from rebuilds its tables
        pd.DataFrame(rows).to_csv(args.out / "per_seed.partial.csv", index=False, float_format="%.6g")
        clock.progress(times)
        (args.out / "run.json").write_text(json.dumps(clock.record(complete=False), indent=2) + "\n")

    results = pd.DataFrame(run_tasks(tasks, kw, jobs=args.jobs, threads=args.threads, done=progress))
    run = clock.record(complete=True)
    text = write_outputs(results, args.out, settings, train_eps=TRAIN_EPS)
    (args.out / "per_seed.partial.csv").unlink(missing_ok=True)
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    sys.stdout.write(text + f"\n{run['seconds']:.0f} s in all, {run['cpu_seconds']:.0f} s of CPU on {run['cpu_count']} "
                            f"CPUs (load average {run['load_average_at_start'][0]:.1f} at the start, "
                            f"{run['load_average_at_end'][0]:.1f} at the end); written to {args.out}/\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
