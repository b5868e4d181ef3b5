"""Build synthetic run directories following the run-directory contract (what analyze / harden write).

Every number is derived deterministically from the arguments, so tests can read the CSVs back and
compare them with the rendered report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

EVIL_LAYER = "<script>alert(1)</script>"
MATH_LAYER = "blocks.$x^2$ & 'q\""

# Accuracy drop per unit eps and RE scale per attack: PGD strongest, then FGSM, then Square.
STRENGTH = {"pgd": 1.0, "fgsm": 0.75, "square": 0.55, "cw": 1.0, "gaussian": 0.05, "uniform": 0.04}


def layer_names(n_layers: int, *, evil: bool = False) -> list[tuple[str, str]]:
    """(name, type) in forward order: conv/act pairs, a module called twice (``act#2``), logits last."""
    names: list[tuple[str, str]] = []
    i = 0
    while len(names) < n_layers - 1:
        names.append((f"features.{i}", "Conv2d" if i % 2 == 0 else "ReLU"))
        i += 1
    if len(names) >= 4:
        names[2] = ("act", "ReLU")
        names[3] = ("act#2", "ReLU")
    if evil:
        names[0] = (MATH_LAYER, "Conv2d")
        names[1] = (EVIL_LAYER, "<b>Evil</b>")
    names.append(("fc", "Linear"))
    return names[:n_layers]


def make_run(
    root: Path,
    *,
    n_layers: int = 8,
    attacks: tuple[str, ...] = ("fgsm", "pgd", "square"),
    noise: tuple[str, ...] = ("gaussian",),
    eps: tuple[float, ...] = (0.05, 0.1, 0.2),
    minimal: tuple[str, ...] = ("cw",),
    n_samples: int = 360,
    clean: float = 0.9638888,
    evil: bool = False,
    checks: bool = True,
    hardened: bool = False,
    mvl_k: int = 3,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layers = layer_names(n_layers, evil=evil)
    rng = np.random.default_rng(0)
    base = rng.uniform(0.05, 0.3, size=n_layers) * np.linspace(0.6, 1.6, n_layers)

    def lsa_frame(shrink: float = 1.0) -> pd.DataFrame:
        rows = []
        configs = [(a, e, "adversarial") for a in attacks for e in eps]
        configs += [(a, e, "noise") for a in noise for e in eps]
        configs += [(a, float("nan"), "adversarial") for a in minimal]
        for attack, e, kind in configs:
            scale = STRENGTH.get(attack, 0.5) * (1.0 if np.isnan(e) else e / 0.1)
            for order, (name, ltype) in enumerate(layers):
                re = float(base[order] * scale * (shrink if kind == "adversarial" else 1.0))
                rows.append({"layer": name, "layer_type": ltype, "attack": attack, "eps": e,
                             "re_mean": round(re, 6), "re_std": round(re / 4, 6), "re_pooled": round(re * 1.05, 6),
                             "n_samples": n_samples, "order": order, "kind": kind, "norm": "Linf"})
        return pd.DataFrame(rows)

    def accuracy_frame(gain: float = 0.0) -> pd.DataFrame:
        rows = [{"attack": "clean", "eps": float("nan"), "accuracy": clean, "n_samples": n_samples,
                 "kind": "clean", "norm": ""}]
        for e in eps:
            per = {a: max(0.0, clean - STRENGTH.get(a, 0.5) * e * 4.0 + gain) for a in attacks}
            for a in attacks:
                rows.append({"attack": a, "eps": e, "accuracy": round(per[a], 6), "n_samples": n_samples,
                             "kind": "adversarial", "norm": "Linf"})
            for a in noise:
                rows.append({"attack": a, "eps": e, "accuracy": round(clean - 0.01 * e, 6), "n_samples": n_samples,
                             "kind": "noise", "norm": "Linf"})
            rows.append({"attack": "worst-case", "eps": e, "accuracy": round(max(0.0, min(per.values()) - 0.01), 6),
                         "n_samples": n_samples, "kind": "adversarial", "norm": "Linf"})
        for a in minimal:  # a minimal-perturbation attack fools (almost) every sample: its size is the measure
            rows.append({"attack": a, "eps": float("nan"), "accuracy": 0.0, "n_samples": n_samples,
                         "kind": "adversarial", "norm": "L2", "success_rate": 1.0,
                         "pert_median": round(0.41 * (1 + gain), 6), "pert_p90": round(0.83 * (1 + gain), 6),
                         "pert_median_all": round(0.38 * (1 + gain), 6)})  # misclassified samples count as 0
        return pd.DataFrame(rows)

    def mvl_dict(lsa: pd.DataFrame) -> dict:
        sel = lsa[(lsa["attack"] == "pgd") & np.isclose(lsa["eps"], 0.1)].sort_values("re_mean", ascending=False)
        top = sel.head(mvl_k)
        return {"criterion": "top-k", "k": mvl_k, "z": None, "attack": "pgd", "eps": 0.1, "metric": "re_mean",
                "layers": [{"layer": r.layer, "score": float(r.re_mean), "layer_type": r.layer_type}
                           for r in top.itertuples(index=False)]}

    def manifest(command: str) -> dict:
        return {
            "robaudit_version": "0.1.0", "torch_version": "2.13.0", "python_version": "3.12.0",
            "command": command, "argv": command.split(),
            "model": {"path": "examples/digits_cnn.pt2", "sha256": "ab" * 32, "format": "export"},
            "dataset": {"name": "digits", "split": "test", "samples": n_samples, "shuffle": False, "data_dir": None,
                        "num_classes": 10},
            "n_samples": n_samples, "seed": 0, "device": "cpu",
            "attacks": [f"{a}:eps={e}" for a in attacks for e in eps], "eps": list(eps), "batch_size": 128,
            "started": "2025-01-01T10:00:00", "finished": "2025-01-01T10:01:00", "num_layers": n_layers,
        }

    lsa = lsa_frame()
    lsa.to_csv(root / "lsa.csv", index=False)
    acc = accuracy_frame()
    acc.to_csv(root / "accuracy.csv", index=False)
    mvl = mvl_dict(lsa)
    (root / "mvl.json").write_text(json.dumps(mvl, indent=2))
    cmd = "robaudit analyze examples/digits_cnn.pt2 --dataset digits --samples 360 --seed 0"
    (root / "manifest.json").write_text(json.dumps(manifest(cmd), indent=2))
    if checks:
        (root / "checks.json").write_text(json.dumps(model_checks()))

    if hardened:
        hdir = root / "hardened"
        hdir.mkdir(exist_ok=True)
        h_lsa = lsa_frame(shrink=0.5)
        h_lsa.to_csv(hdir / "lsa.csv", index=False)
        h_acc = accuracy_frame(gain=0.3)
        h_acc.loc[h_acc["attack"] == "clean", "accuracy"] = round(clean - 0.02, 6)
        h_acc["accuracy"] = h_acc["accuracy"].clip(upper=clean - 0.02)
        h_acc.to_csv(hdir / "accuracy.csv", index=False)
        (hdir / "mvl.json").write_text(json.dumps(mvl_dict(h_lsa)))
        hcmd = f"robaudit harden --run {root} --mvl-top {mvl_k} --epochs 3"
        (hdir / "manifest.json").write_text(json.dumps(manifest(hcmd)))
        epochs = 3
        pd.DataFrame({
            "epoch": range(1, epochs + 1), "loss": [1.2, 0.8, 0.6], "ce": [1.0, 0.7, 0.5], "reg": [0.2, 0.1, 0.1],
            "clean_acc": [0.90, 0.93, 0.94], "robust_acc": [0.30, 0.42, 0.47], "seconds": [3.1, 3.0, 3.0],
            "lr": [0.01, 0.01, 0.001],
        }).to_csv(hdir / "history.csv", index=False)
        rows = []
        for b in acc.itertuples(index=False):
            a = h_acc[(h_acc["attack"] == b.attack) & ((h_acc["eps"] == b.eps) | (h_acc["eps"].isna() & np.isnan(b.eps)))]
            if len(a) and b.kind != "noise":
                after = float(a["accuracy"].iloc[0])
                rows.append({"kind": "accuracy", "attack": b.attack, "eps": b.eps, "layer": "", "before": b.accuracy,
                             "after": after, "delta": round(after - b.accuracy, 6)})
        for item in mvl["layers"]:
            before = item["score"]
            after = round(before * 0.5, 6)
            rows.append({"kind": "re", "attack": "pgd", "eps": 0.1, "layer": item["layer"], "before": before,
                         "after": after, "delta": round(after - before, 6)})
        pd.DataFrame(rows).to_csv(hdir / "comparison.csv", index=False)
        (hdir / "harden.json").write_text(json.dumps({
            "method": "atlr", "base_attack": "pgd", "eps": 0.1, "gamma": [1.0] * mvl_k,
            "mvl_layers": [item["layer"] for item in mvl["layers"]], "epochs": epochs, "dual_bn": False,
            "command": hcmd,
        }))
    return root


def model_checks(**overrides) -> dict:
    """A checks.json dict of a well-behaved model (every model check passes)."""
    d = {
        "n_samples": 128, "seed": 0, "device": "cpu", "clean_accuracy": 0.96,
        "determinism": {"max_rel_diff": 0.0},
        "outputs": {"finite": True, "min": -8.1, "max": 12.3, "max_row_sum_error": 14.2},
        "gradients": {"error": None, "finite": True, "zero_fraction": 0.0},
        "attacks": {"norm": "Linf", "large_eps": 0.5, "pgd_large_steps": 20, "pgd_large": 0.0, "eps_max": 0.2,
                    "fgsm": 0.31, "pgd10": 0.12, "pgd50": 0.11},
        "seconds": 0.4,
    }
    d.update(overrides)
    return d


def write_samples(root: Path, labels: list[int], outcomes: dict[str, list[int]], *, index: list[int] | None = None,
                  clean: list[int] | None = None) -> Path:
    """A ``samples.csv`` in ``root`` of hand-chosen per-sample outcomes: ``labels`` per sample, ``outcomes``
    column -> 0/1 per sample (``pgd@0.1:correct``, ``worst-case@0.1:robust``), ``clean`` the ``clean_correct``
    column (all 1 by default). ``clean_pred`` is the label where the sample is clean-correct."""
    n = len(labels)
    clean = [1] * n if clean is None else clean
    frame = pd.DataFrame({"index": list(range(n)) if index is None else index, "label": labels,
                          "clean_pred": [y if ok else (y + 1) % 10 for y, ok in zip(labels, clean)],
                          "clean_correct": clean, **outcomes})
    frame.to_csv(Path(root) / "samples.csv", index=False)
    return Path(root) / "samples.csv"
