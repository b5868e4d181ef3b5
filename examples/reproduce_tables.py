"""The tables of ``reproduce_lsa.py``: per-seed rows -> summary.csv (means, stds, paired differences against
``atlr-deepest`` and ``at``), table.md and accuracy_vs_eps.png. Kept apart so a finished run's tables can be rebuilt
without training anything (``--tables-from``)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

# -- summaries ---------------------------------------------------------------------------------
KEYS = ["model", "regime", "method", "eps"]
STRING_COLUMNS = ("draw", "layers", "depths", "same_as")
TIE = 1e-9  # a paired difference this small is a tie (accuracies are multiples of 1/n, n <= the test split)


def read_rows(path: Path) -> pd.DataFrame:
    """The per-seed rows as written to ``per_seed.csv`` (every table is made from these, so a run and a rebuild of
    its tables agree to the last digit)."""
    results = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS})
    for c in STRING_COLUMNS:
        results[c] = results[c].fillna("")
    return results


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
    out["wins"] = g.apply(lambda s: int((s > TIE).sum())).values
    out["losses"] = g.apply(lambda s: int((s < -TIE).sum())).values
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


def _points(value: float, sign: str = "") -> str:
    """A fraction in points to one decimal, never "-0.0"."""
    return f"{round(100 * value, 1) + 0.0:{sign}.1f}"


def _pm(mean, std) -> str:
    return f"{_points(mean)} ± {_points(0.0 if pd.isna(std) else std)}"


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
    return (f"{_points(r[f'mean_vs_{tag}'], '+')} ± {_points(sd)} "
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


def plot(summary: pd.DataFrame, path: Path, *, train_eps: float) -> None:
    """Robust accuracy against eps, one panel per regime and model; the controls dashed."""
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
        ax.set_title(f"{model}, {regime} (train eps {train_eps:g})", fontsize=10)
        ax.set_xlabel("eps (Linf)")
        ax.set_ylabel("robust accuracy % (PGD-20 & Square)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def write_outputs(results: pd.DataFrame, out: Path, settings: str, *, train_eps: float) -> str:
    """per_seed.csv, then summary.csv, table.md and accuracy_vs_eps.png from the rows as written; the table's text."""
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "per_seed.csv", index=False, float_format="%.6g")
    results = read_rows(out / "per_seed.csv")
    summary = summarize(results)
    text = markdown(summary, results, settings)
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    (out / "table.md").write_text(text)
    plot(summary, out / "accuracy_vs_eps.png", train_eps=train_eps)
    return text
