"""Reproduce the LSA paper's AT-LR claim on moons (MLP) and digits (CNN with BatchNorm), with honest baselines.

    python examples/reproduce_lsa.py              # 3 seeds, both data sets: 5-12 minutes on 2 CPU cores
    python examples/reproduce_lsa.py --quick      # 1 seed, 3 epochs: a smoke run of about a minute
    python examples/reproduce_lsa.py --ablation   # digits: gamma, per-sample RE, layer sets, dual BN

For every data set and seed: train a model normally, run the Layer Sustainability Analysis on it
(``robaudit.analyze``: PGD at the training eps, ReLU outputs, ranked by mean RE) and take the two most
vulnerable layers (the output layer is never a ReLU here) as the MVL set. Then, from those same weights,
fine-tune with each method for the same number of epochs (``--init scratch``: train each from the same
initial weights instead):

- ``standard``       ordinary training (the cost and accuracy reference);
- ``at``             PGD-10 adversarial training (Madry et al.), the base AT every claim is measured against;
- ``atlr``           AT-LR: the same AT plus ``gamma * RE_l(x, x_adv)`` (pooled) on the two MVL layers;
- ``atlr-lvl``       control: the same penalty on the two *least* vulnerable layers (these small models
                     have three ReLU layers, so the two sets share one layer);
- ``atlr-mvl1`` / ``atlr-lvl1``  the disjoint control: the single most / least vulnerable layer;
- ``atlr[gamma=3]``  AT-LR with a stronger penalty;
- ``layerwise``      efficient layerwise adversarial training on the MVL layers.

Every model is evaluated with PGD-20 (alpha = 2.5 eps / 20, random start) over an eps grid reaching
three times the training eps. The table gives mean ± std over seeds, plus the paired difference against
``at`` (same seed, same starting weights) with the number of seeds on which the method wins. Runs that
collapse to a constant output are reported and left out of the means. Outputs (``--out``, default
``reports/reproduce/``): ``results.csv`` (one row per data set, seed, method, eps), ``summary.csv``,
``differences.csv``, ``table.md`` and ``accuracy_vs_eps.png``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from robaudit import analyze
from robaudit import attacks as atk
from robaudit.data import load_dataset
from robaudit.training.fit import harden

try:
    from robaudit.examples.models import DigitsCNN, MoonsMLP
except ImportError:  # pragma: no cover - a source tree that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import DigitsCNN, MoonsMLP

log = logging.getLogger("reproduce_lsa")

TRAIN_EPS = 0.1
EVAL_EPS = (0.05, 0.1, 0.15, 0.2, 0.3)
METHODS = ("standard", "at", "atlr", "atlr-lvl", "atlr-mvl1", "atlr-lvl1", "atlr[gamma=3]", "layerwise")
ABLATION = ("at", "atlr", "atlr[gamma=3]", "atlr[re=per-sample]", "atlr-mvl1", "atlr-lvl1",
            "atlr[layers=all]", "atlr[dual_bn=1]")
ALIASES = {"atlr-lvl": "bottom", "atlr-mvl1": "top1", "atlr-lvl1": "bottom1"}
SETUPS = {
    # name: (model factory, pretraining epochs, fine-tuning epochs, learning rate, batch size)
    "moons": (lambda: MoonsMLP(), 60, 20, 1e-3, 64),
    "digits": (lambda: DigitsCNN(), 15, 10, 1e-3, 64),
}


def pgd_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 20,
                 seed: int = 0, batch_size: int = 512) -> float:
    """Accuracy under PGD-``steps`` (Linf, random start) at ``eps``; the model is attacked in eval mode."""
    model.eval()
    spec = atk.AttackSpec("pgd", (("steps", steps),), eps)
    fn = atk.build(spec, model, num_classes=int(y.max()) + 1, seed=seed)
    torch.manual_seed(seed)
    correct = 0
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        xa = fn(xb, yb)
        with torch.no_grad():
            correct += int((model(xa).argmax(1) == yb).sum())
    return correct / len(x)


def clean_accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def rank_layers(model, test, *, seed: int, samples: int) -> pd.DataFrame:
    """LSA of ``model``: ReLU outputs ranked by mean RE under PGD at the training eps (most vulnerable first)."""
    res = analyze(model, (test.x[:samples], test.y[:samples]), attacks=["pgd"], eps=[TRAIN_EPS],
                  layer_types=["ReLU"], device="cpu", seed=seed, batch_size=256)
    mvl = res.mvl(k=int((~res.lsa["is_output"]).sum()), attack="pgd", eps=TRAIN_EPS)
    return mvl.layers


def parse_method(text: str) -> tuple[str, dict]:
    """``atlr``, an alias (``atlr-lvl``: the ``top`` least vulnerable layers; ``atlr-mvl1`` / ``atlr-lvl1``: the
    single most / least vulnerable one) or a variant such as ``atlr[gamma=3]``, ``atlr[layers=bottom1,re=per-sample]``.

    Options: ``gamma``, ``re`` (pooled / per-sample), ``layers`` (topK, bottomK or all), ``dual_bn``.
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


def pick_layers(order: list[str], spec: str | None, top: int) -> list[str]:
    """``top``/``bottom`` (``top`` layers), ``topK``/``bottomK``, or ``all`` from a most-vulnerable-first ranking."""
    spec = spec or "top"
    if spec == "all":
        return list(order)
    for prefix, ranked in (("bottom", order[::-1]), ("top", order)):
        if spec.startswith(prefix):
            k = int(spec[len(prefix):] or top)
            return ranked[:k]
    raise SystemExit(f"unknown layer choice {spec!r}: use topK, bottomK or all")


def run_one(name: str, seed: int, *, epochs: int | None, pre_epochs: int | None, gamma: float, re_mode: str,
            top: int, eval_eps, methods, init: str) -> list[dict]:
    """Pretrain, rank layers by LSA, then train every method from the same starting point; evaluate each."""
    factory, pre_ep, ft_ep, lr, bs = SETUPS[name]
    pre_ep = pre_epochs or pre_ep
    ft_ep = epochs or (ft_ep if init == "pretrained" else pre_ep)
    train, test = load_dataset(name, split="train"), load_dataset(name, split="test")
    torch.manual_seed(seed)
    base = factory()
    init_state = copy.deepcopy(base.state_dict())
    t0 = time.perf_counter()
    harden(base, train, eps=TRAIN_EPS, method="standard", epochs=pre_ep, lr=lr, batch_size=bs, seed=seed,
           schedule="none", check_collapse=False)
    ranking = rank_layers(base, test, seed=seed, samples=len(test.y))
    order = list(ranking["layer"])
    ranking_text = ", ".join(f"{r.layer} {r.score:.3f}" for r in ranking.itertuples())
    log.info("%s seed %d: pretrained in %.1f s, clean %.3f; RE ranking %s", name, seed, time.perf_counter() - t0,
             clean_accuracy(base, test.x, test.y),
             ", ".join(f"{r.layer}={r.score:.3f}" for r in ranking.itertuples()))
    rows = []
    for label in methods:
        kind, opts = parse_method(label)
        layers = pick_layers(order, opts.get("layers"), top)
        model = copy.deepcopy(base)
        if init == "scratch":
            model.load_state_dict(init_state)
        t1 = time.perf_counter()
        res = harden(model, train, eps=TRAIN_EPS, method=kind, mvl_layers=layers,
                     gamma=float(opts.get("gamma", gamma)), re_mode=opts.get("re", re_mode),
                     dual_bn=bool(int(opts.get("dual_bn", 0))), epochs=ft_ep, lr=lr, batch_size=bs, seed=seed,
                     check_collapse=False)
        train_s = float(res.history["seconds"].sum())
        clean = clean_accuracy(model, test.x, test.y)
        with torch.no_grad():
            collapsed = bool(model.eval()(test.x).argmax(1).unique().numel() == 1)
        if collapsed:
            log.warning("%s seed %d %s collapsed to a constant output: left out of the means", name, seed, label)
        log.info("%s seed %d %-9s layers %s: clean %.3f (%.1f s)", name, seed, label, layers, clean,
                 time.perf_counter() - t1)
        used = " ".join(layers) if kind in ("atlr", "layerwise") else ""
        rows.append({"dataset": name, "seed": seed, "method": label, "eps": 0.0, "accuracy": clean,
                     "layers": used, "train_seconds": train_s, "collapsed": collapsed, "ranking": ranking_text})
        for e in eval_eps:
            rows.append({"dataset": name, "seed": seed, "method": label, "eps": e,
                         "accuracy": pgd_accuracy(model, test.x, test.y, e, seed=seed),
                         "layers": used, "train_seconds": train_s, "collapsed": collapsed, "ranking": ranking_text})
    return rows


def summarize(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean ± std per data set, method and eps; and paired differences against ``at``.

    Runs that collapsed to a constant output are left out (their "robust accuracy" is the class share).
    """
    if "collapsed" in results:
        results = results[~results["collapsed"].astype(bool)]
    agg = (results.groupby(["dataset", "method", "eps"], sort=False)["accuracy"]
           .agg(["mean", "std", "count"]).reset_index())
    at = results[results["method"] == "at"].set_index(["dataset", "seed", "eps"])["accuracy"]
    diffs = []
    for method in results["method"].unique():
        if method == "at":
            continue
        m = results[results["method"] == method].set_index(["dataset", "seed", "eps"])["accuracy"]
        d = (m - at).dropna().rename("diff").reset_index()
        g = d.groupby(["dataset", "eps"], sort=False)["diff"]
        out = g.agg(["mean", "std", "count"]).reset_index()
        out["wins"] = g.apply(lambda s: int((s > 0).sum())).values
        out.insert(1, "method", f"{method} - at")
        diffs.append(out)
    return agg, pd.concat(diffs, ignore_index=True) if diffs else pd.DataFrame()


def _pm(mean, std) -> str:
    std = 0.0 if pd.isna(std) else std
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown(agg: pd.DataFrame, diffs: pd.DataFrame, settings: str, results: pd.DataFrame | None = None) -> str:
    lines = ["# AT-LR reproduction", "", settings, ""]
    for ds in agg["dataset"].unique():
        a = agg[agg["dataset"] == ds]
        if results is not None and "ranking" in results:
            ranks = results[(results["dataset"] == ds) & (results["eps"] == 0)].drop_duplicates("seed")
            lines += [f"{ds} layers by mean RE under PGD at eps {TRAIN_EPS:g} (most vulnerable first): "
                      + "; ".join(f"seed {r.seed}: {r.ranking}" for r in ranks.itertuples()), ""]
        eps = sorted(a["eps"].unique())
        lines += [f"## {ds}: accuracy % (mean ± std over seeds; eps 0 = clean, PGD-20 otherwise)", "",
                  "| method | " + " | ".join("clean" if e == 0 else f"eps {e:g}" for e in eps) + " |",
                  "|---|" + "---|" * len(eps)]
        for method in a["method"].unique():
            r = a[a["method"] == method].set_index("eps")
            full_n = int(a["count"].max())
            lines.append(f"| {method} | " + " | ".join(
                _pm(r.loc[e, "mean"], r.loc[e, "std"]) + (f" (n={int(r.loc[e, 'count'])})"
                                                          if r.loc[e, "count"] < full_n else "")
                for e in eps) + " |")
        d = diffs[diffs["dataset"] == ds] if len(diffs) else diffs
        if len(d):
            lines += ["", f"Paired differences (points; same seed and starting weights; wins = seeds where the "
                          f"method beats at):", "",
                      "| difference | " + " | ".join("clean" if e == 0 else f"eps {e:g}" for e in eps) + " |",
                      "|---|" + "---|" * len(eps)]
            for method in d["method"].unique():
                r = d[d["method"] == method].set_index("eps")
                cells = []
                for e in eps:
                    if e in r.index:
                        sd = 0.0 if pd.isna(r.loc[e, "std"]) else r.loc[e, "std"]
                        cells.append(f"{100 * r.loc[e, 'mean']:+.1f} ± {100 * sd:.1f} "
                                     f"({int(r.loc[e, 'wins'])}/{int(r.loc[e, 'count'])})")
                    else:
                        cells.append("")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(agg: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(agg["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        a = agg[agg["dataset"] == ds]
        for method in a["method"].unique():
            r = a[a["method"] == method].sort_values("eps")
            ax.errorbar(r["eps"], 100 * r["mean"], yerr=100 * r["std"].fillna(0), marker="o", capsize=3,
                        label=method, linestyle="--" if "lvl" in method else "-")
        ax.axvline(TRAIN_EPS, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{ds} (train eps {TRAIN_EPS:g}, PGD-20)")
        ax.set_xlabel("eps (Linf)")
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed and fewer epochs (a smoke run)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--datasets", default="moons,digits")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default per data set)")
    p.add_argument("--pre-epochs", type=int, help="pretraining epochs (default per data set)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--re-mode", default="pooled", choices=["pooled", "per-sample"])
    p.add_argument("--top", type=int, default=2, help="number of MVL (and least vulnerable) layers")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"],
                   help="fine-tune the pretrained model (what `robaudit harden` does; default) or train every method "
                        "from the pretrained model's initial weights (scratch; AT-LR can collapse on moons then)")
    p.add_argument("--ablation", action="store_true",
                   help="digits only: AT-LR with other gammas, per-sample RE and other layer sets, against AT")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (small models run best on one)")
    p.add_argument("--jobs", type=int, default=2, help="processes running (data set, seed) pairs side by side")
    p.add_argument("--out", type=Path, default=Path("reports/reproduce"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("robaudit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    epochs = args.epochs or (3 if args.quick else None)
    pre_epochs = args.pre_epochs or (5 if args.quick else None)
    if args.ablation:
        args.methods = ";".join(ABLATION)
        args.datasets = "digits" if args.datasets == "moons,digits" else args.datasets
        if args.out == Path("reports/reproduce"):
            args.out = args.out / "ablation"
    methods = split_methods(args.methods)
    if "at" not in methods:
        methods.insert(0, "at")
    started = time.perf_counter()
    tasks = [(name, seed) for name in [d.strip() for d in args.datasets.split(",") if d.strip()]
             for seed in range(seeds)]
    kw = dict(epochs=epochs, pre_epochs=pre_epochs, gamma=args.gamma, re_mode=args.re_mode, top=args.top,
              eval_eps=EVAL_EPS, methods=methods, init=args.init)
    rows = []
    if args.jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # digits tasks are the long ones: start them first
        tasks.sort(key=lambda t: t[0] != "digits")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(args.threads,)) as pool:
            futures = [pool.submit(run_one, name, seed, **kw) for name, seed in tasks]
            for f in futures:
                rows += f.result()
    else:
        for name, seed in tasks:
            rows += run_one(name, seed, **kw)
    results = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(methods)}
    results = results.sort_values(["dataset", "seed", "method", "eps"], key=lambda c: c.map(order) if c.name == "method"
                                  else c, kind="stable").reset_index(drop=True)
    agg, diffs = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out / "results.csv", index=False)
    agg.to_csv(args.out / "summary.csv", index=False)
    diffs.to_csv(args.out / "differences.csv", index=False)
    ft = {k: (epochs or (v[2] if args.init == "pretrained" else (pre_epochs or v[1]))) for k, v in SETUPS.items()}
    settings = (f"{seeds} seed(s); " + ("every method trained from the same initial weights as the standard model "
                                          "whose LSA gave the MVL" if args.init == "scratch" else
                                          "every method fine-tunes the standard model whose LSA gave the MVL")
                + f"; Adam, epochs {ft}, PGD-10 training at eps {TRAIN_EPS:g}, gamma {args.gamma:g}, "
                  f"RE {args.re_mode}, "
                f"MVL = top-{args.top} ReLU layers by mean RE (output left out); evaluation PGD-20 on the test split; "
                f"{time.perf_counter() - started:.0f} s in all.")
    text = markdown(agg, diffs, settings, results)
    gone = results[results["collapsed"] & (results["eps"] == 0)] if "collapsed" in results else results.iloc[:0]
    if len(gone):
        text += ("\nCollapsed to a constant output (left out of the means above): "
                 + ", ".join(f"{r.dataset} seed {r.seed} {r.method}" for r in gone.itertuples()) + "\n")
    (args.out / "table.md").write_text(text)
    plot(agg, args.out / "accuracy_vs_eps.png")
    sys.stdout.write(text + "\n")
    sys.stdout.write(f"written to {args.out}/\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
