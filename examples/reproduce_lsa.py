"""Test the LSA paper's AT-LR claim against controls: is "most vulnerable" more than "deepest"?

    python examples/reproduce_lsa.py                    # 3 seeds, 3 models, both regimes, every control
    python examples/reproduce_lsa.py --quick            # 1 seed, 1-2 epochs, a small evaluation: a smoke run
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

Evaluation, on the test split, at 1x, 1.5x and 2x the training eps: PGD-20 (alpha 2.5 eps / 20, random start) and
Square (1,000 queries, black-box, so masked gradients do not fool it) on every sample PGD left correct; a sample is
robust when both attacks leave it correct (the per-sample worst of the two). The tables give mean ± std over seeds
and the paired difference (same seed, same starting weights) against ``atlr-deepest`` and against ``at``, with the
number of seeds won. Runs that collapse to a constant output are reported and left out of the means.

Outputs (``--out``, default ``reports/reproduce/``): ``per_seed.csv`` (one row per model, regime, seed, method,
random draw and eps), ``summary.csv`` (means, stds and paired differences), ``table.md`` and
``accuracy_vs_eps.png``; ``run.json`` holds the settings, the wall time and the machine's load. The same seeds
give the same table.
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
except ImportError:  # pragma: no cover - a source tree that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import DigitsCNN, DigitsDeepCNN, MoonsMLP

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


SETUPS = {
    "moons": Setup("moons", MoonsMLP, 60, 20, 60, 1e-3),
    "digits": Setup("digits", DigitsCNN, 15, 10, 15, 1e-3),
    "digits-deep": Setup("digits", DigitsDeepCNN, 15, 6, 10, 2e-3),
}


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
            re_mode: str, top: int, evaluation: Evaluation, methods) -> list[dict]:
    """Pretrain, rank layers by LSA, then train every method from the same starting point; evaluate each."""
    setup = SETUPS[name]
    pre_ep = pre_epochs or setup.pre_epochs
    ep = (epochs or {}).get(regime) or (setup.finetune_epochs if regime == "pretrained" else setup.scratch_epochs)
    train, test = load_dataset(setup.dataset, split="train"), load_dataset(setup.dataset, split="test")
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


# -- summaries ---------------------------------------------------------------------------------
KEYS = ["model", "regime", "method", "eps"]


def per_seed(results: pd.DataFrame) -> pd.DataFrame:
    """One value per model, regime, seed, method and eps: random draws averaged, collapsed runs left out."""
    kept = results[~results["collapsed"].astype(bool)]
    return (kept.groupby(["model", "regime", "seed", "method", "eps"], sort=False)[["accuracy", "pgd_accuracy"]]
            .mean().reset_index())


def paired(seeds: pd.DataFrame, against: str) -> pd.DataFrame:
    """Per model, regime, method and eps: mean and std of (method - ``against``) over seeds, and the seeds won."""
    ref = seeds[seeds["method"] == against].set_index(["model", "regime", "seed", "eps"])["accuracy"]
    m = seeds.set_index(["model", "regime", "seed", "eps"])
    d = (m["accuracy"] - ref.reindex(m.index)).rename("diff")
    frame = m[["method"]].assign(diff=d.values).dropna().reset_index()
    g = frame.groupby(KEYS, sort=False)["diff"]
    out = g.agg(["mean", "std"]).reset_index()
    out["wins"] = g.apply(lambda s: int((s > 1e-12).sum())).values
    out["losses"] = g.apply(lambda s: int((s < -1e-12).sum())).values
    out["n"] = g.size().values
    tag = against.replace("atlr-", "")
    return out.rename(columns={c: f"{c}_vs_{tag}" for c in ("mean", "std", "wins", "losses", "n")})


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: mean ± std (worst-of-two and PGD-20 alone) over seeds, and the paired differences against
    ``atlr-deepest`` and ``at``."""
    seeds = per_seed(results)
    agg = (seeds.groupby(KEYS, sort=False)
           .agg(mean=("accuracy", "mean"), std=("accuracy", "std"), seeds=("accuracy", "size"),
                pgd_mean=("pgd_accuracy", "mean"), pgd_std=("pgd_accuracy", "std")).reset_index())
    for against in ("atlr-deepest", "at"):
        if (seeds["method"] == against).any():
            agg = agg.merge(paired(seeds, against), on=KEYS, how="left")
    # every method run, with the seeds (random: draws) it collapsed on and those that reused another's training
    runs = results.assign(same=results["same_as"].fillna("") != "", collapsed=results["collapsed"].astype(bool))
    counts = (runs.groupby(KEYS, sort=False).agg(collapsed_runs=("collapsed", "sum"), runs=("collapsed", "size"),
                                                 reused_runs=("same", "sum")).reset_index())
    return counts[KEYS].merge(agg, on=KEYS, how="left").merge(counts, on=KEYS)


def _pm(mean, std) -> str:
    return f"{100 * mean:.1f} ± {100 * (0.0 if pd.isna(std) else std):.1f}"


def _acc_cell(r) -> str:
    """mean ± std, and how many runs collapsed to a constant output (left out of the mean)."""
    if pd.isna(r["mean"]):
        return f"collapsed ({int(r['collapsed_runs'])}/{int(r['runs'])})"
    gone = f" ({int(r['collapsed_runs'])}/{int(r['runs'])} collapsed)" if r["collapsed_runs"] else ""
    return _pm(r["mean"], r["std"]) + gone


def _diff_cell(r, tag: str) -> str:
    if pd.isna(r.get(f"mean_vs_{tag}")):
        return ""
    sd = 0.0 if pd.isna(r[f"std_vs_{tag}"]) else r[f"std_vs_{tag}"]
    return (f"{100 * r[f'mean_vs_{tag}']:+.1f} ± {100 * sd:.1f} "
            f"({int(r[f'wins_vs_{tag}'])}/{int(r[f'n_vs_{tag}'])})")


def _eps_head(eps) -> str:
    return " | ".join("clean" if e == 0 else f"eps {e:g}" for e in eps)


def layer_lines(results: pd.DataFrame, model: str, regime: str) -> list[str]:
    """Which layers each seed's ranking and controls chose (depth among the probed ReLU layers)."""
    r = results[(results["model"] == model) & (results["regime"] == regime) & (results["eps"] == 0)]
    lines = []
    for seed, g in r.groupby("seed", sort=True):
        depths = g.groupby("method", sort=False)["depths"].agg(lambda s: " / ".join("+".join(v.split()) for v in s))
        picks = "; ".join(f"{m} {d}" for m, d in depths.items() if d)
        lines.append(f"- seed {seed}: layer depths {picks}")
    return lines


def markdown(summary: pd.DataFrame, results: pd.DataFrame, settings: str) -> str:
    lines = ["# AT-LR on the MVL list against controls", "", settings, ""]
    for (model, regime), a in summary.groupby(["model", "regime"], sort=False):
        eps = sorted(a["eps"].unique())
        lines += [f"## {model}, {regime}: robust accuracy % (worst of PGD-20 and Square per sample; mean ± std "
                  "over seeds)", "", "| method | " + _eps_head(eps) + " |", "|---|" + "---|" * len(eps)]
        for method, r in a.groupby("method", sort=False):
            r = r.set_index("eps")
            lines.append(f"| {method} | " + " | ".join(_acc_cell(r.loc[e]) for e in eps) + " |")
        for tag, name in (("deepest", "atlr-deepest"), ("at", "at")):
            if f"mean_vs_{tag}" not in a:
                continue
            lines += ["", f"Paired difference against {name} (points, same seed and starting weights; "
                          "(wins/seeds)):", "", "| method | " + _eps_head(eps) + " |", "|---|" + "---|" * len(eps)]
            for method, r in a[a["method"] != name].groupby("method", sort=False):
                r = r.set_index("eps")
                lines.append(f"| {method} - {name} | " + " | ".join(_diff_cell(r.loc[e], tag) for e in eps) + " |")
        lines += ["", "Layers chosen (depth among the probed ReLU layers, 1 nearest the input; random: the draws):",
                  ""] + layer_lines(results, model, regime) + [""]
    gone = results[results["collapsed"].astype(bool) & (results["eps"] == 0)]
    if len(gone):
        lines.append("Collapsed to a constant output (left out of the means above): " + ", ".join(
            f"{r.model} {r.regime} seed {r.seed} {r.method}" + (f" (draw {r.draw})" if str(r.draw) else "")
            for r in gone.itertuples()))
    return "\n".join(lines) + "\n"


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(summary.groupby(["regime", "model"], sort=False).groups)
    regimes = list(dict.fromkeys(r for r, _ in panels))
    models = list(dict.fromkeys(m for _, m in panels))
    fig, axes = plt.subplots(len(regimes), len(models), figsize=(4.6 * len(models), 3.6 * len(regimes)),
                             squeeze=False)
    for (regime, model), a in summary.groupby(["regime", "model"], sort=False):
        ax = axes[regimes.index(regime)][models.index(model)]
        for method, r in a.groupby("method", sort=False):
            r = r[r["eps"] > 0].sort_values("eps")
            ax.errorbar(r["eps"], 100 * r["mean"], yerr=100 * r["std"].fillna(0), marker="o", capsize=3,
                        label=method, linestyle="--" if method in ("atlr-deepest", "atlr-random", "atlr-lvl")
                        else "-")
        ax.set_title(f"{model}, {regime} (train eps {TRAIN_EPS:g})", fontsize=10)
        ax.set_xlabel("eps (Linf)")
        ax.set_ylabel("robust accuracy % (PGD-20 & Square)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 2 pretraining epochs and 1 training epoch, 64 test samples, Square 100 queries")
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
    p.add_argument("--eval-samples", type=int, help="test samples evaluated (default all; 64 with --quick)")
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


def run_tasks(tasks, kw, *, jobs: int, threads: int, done=lambda rows: None) -> list[dict]:
    """Every (model, seed, regime) task, in ``jobs`` processes, seed by seed (a run cut short still holds whole
    seeds); ``done(rows)`` gets the rows finished so far after every task."""
    ordered = sorted(tasks, key=lambda t: (t[1], list(SETUPS).index(t[0]), REGIMES.index(t[2])))
    finished: dict[tuple, list[dict]] = {}
    if jobs <= 1 or len(tasks) <= 1:
        for t in ordered:
            finished[t] = run_one(*t, **kw)
            done([row for u in ordered if u in finished for row in finished[u]])
        return [row for t in tasks for row in finished[t]]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(run_one, *t, **kw): t for t in ordered}
        for f in as_completed(futures):
            finished[futures[f]] = f.result()
            done([row for u in ordered if u in finished for row in finished[u]])
    return [row for t in tasks for row in finished[t]]


def settings_text(command: str, args, seeds: int, evaluation: Evaluation, epochs, pre_epochs, regimes) -> str:
    """The line under the table's title: the command and every setting the numbers depend on."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lengths = ", ".join(
        f"{m} {pre_epochs or SETUPS[m].pre_epochs}/"
        + "/".join(str((epochs or {}).get(r) or (SETUPS[m].finetune_epochs if r == "pretrained"
                                                  else SETUPS[m].scratch_epochs))
                   for r in regimes) for m in models)
    n = "the whole test split" if evaluation.samples is None else f"the first {evaluation.samples} test samples"
    return (f"Command: `{command}`\n\n{seeds} seed(s); k = {args.top} layers for every AT-LR method; gamma "
            f"{args.gamma:g}, RE {args.re_mode}; PGD-10 training at eps {TRAIN_EPS:g}, Adam; epochs (ordinary "
            f"training / {' / '.join(regimes)}): {lengths}. Layers ranked by the LSA of the ordinarily trained model "
            f"(ReLU outputs, PGD at eps {TRAIN_EPS:g}, whole test split). Evaluation on {n}: PGD-20 with a random "
            f"start, then Square ({evaluation.square_queries} queries) on the samples PGD left correct; eps "
            f"{', '.join(f'{e:g}' for e in evaluation.eps)}.")


def write_outputs(results: pd.DataFrame, out: Path, settings: str) -> str:
    """per_seed.csv, summary.csv, table.md and accuracy_vs_eps.png from the per-seed rows; the table's text."""
    summary = summarize(results)
    text = markdown(summary, results, settings)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "per_seed.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    (out / "table.md").write_text(text)
    plot(summary, out / "accuracy_vs_eps.png")
    return text


STRING_COLUMNS = ("draw", "layers", "depths", "same_as")


def rebuild(source: Path, out: Path) -> int:
    """The tables and plot of an earlier run, from its per_seed.csv and run.json (nothing is trained)."""
    rows = source / "per_seed.csv"
    rows = rows if rows.exists() else source / "per_seed.partial.csv"  # a run cut short
    results = pd.read_csv(rows, dtype={c: str for c in STRING_COLUMNS})
    for c in STRING_COLUMNS:
        results[c] = results[c].fillna("")
    run = json.loads((source / "run.json").read_text())
    text = write_outputs(results, out, run["settings"])
    if out.resolve() != source.resolve():
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    sys.stdout.write(text + f"\nrebuilt from {source}/ into {out}/\n")
    return 0


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
    evaluation = Evaluation(tuple(round(m * TRAIN_EPS, 6) for m in EVAL_MULTIPLES),
                            args.square_queries or (100 if args.quick else 1000),
                            args.eval_samples or (64 if args.quick else None))
    methods = split_methods(args.methods)
    for m in methods:
        parse_method(m)
    if "at" not in methods:
        methods.insert(0, "at")
    regimes = REGIMES if args.init == "both" else (args.init,)
    started, load = time.perf_counter(), os.getloadavg()
    tasks = [(name.strip(), seed, regime) for name in args.models.split(",") if name.strip()
             for seed in range(seeds) for regime in regimes]
    kw = dict(epochs=epochs, pre_epochs=pre_epochs, gamma=args.gamma, re_mode=args.re_mode, top=args.top,
              evaluation=evaluation, methods=methods)
    command = " ".join(["python examples/reproduce_lsa.py", *argv])
    settings = settings_text(command, args, seeds, evaluation, epochs, pre_epochs, regimes)
    args.out.mkdir(parents=True, exist_ok=True)

    def progress(rows: list[dict]) -> None:  # what a run cut short leaves: --tables-from rebuilds its tables
        pd.DataFrame(rows).to_csv(args.out / "per_seed.partial.csv", index=False, float_format="%.6g")
        (args.out / "run.json").write_text(json.dumps({"command": command, "settings": settings, "complete": False,
                                                       "seconds": round(time.perf_counter() - started, 1)}) + "\n")

    results = pd.DataFrame(run_tasks(tasks, kw, jobs=args.jobs, threads=args.threads, done=progress))
    seconds = time.perf_counter() - started
    text = write_outputs(results, args.out, settings)
    (args.out / "per_seed.partial.csv").unlink(missing_ok=True)
    run = {"command": command, "settings": settings, "complete": True, "seconds": round(seconds, 1), "cpu_count": os.cpu_count(), "jobs": args.jobs,
           "threads": args.threads, "load_average_at_start": [round(v, 2) for v in load],
           "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__}
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    sys.stdout.write(text + f"\n{seconds:.0f} s in all (load average {load[0]:.1f} at the start, "
                            f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs); written to {args.out}/\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
