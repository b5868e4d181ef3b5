"""Layer Sustainability Analysis: per-layer relative error under an attack battery, streamed by batch.

For a layer ``l`` with output ``phi_l``: ``RE_l(x, x') = ||phi_l(x') - phi_l(x)||_2 / ||phi_l(x)||_2``.
``re_mean``/``re_std`` aggregate it per sample; ``re_pooled = sqrt(sum ||delta||^2) / sqrt(sum ||phi||^2)``.
All are sums over samples, so no activation outlives its batch.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import attacks as atk
from .data import StreamingDataset, as_dataset, batches
from .errors import NonFiniteError, RobauditError
from .metrics import RelativeError, per_sample_sq_norms, relative_error  # noqa: F401 (defined there)
from .models import LoadedModel, as_graph, check_compatible, with_normalization
from .probe import PROBE_MODES, Layer, LayerProbe, select_modules
from .samples import SampleLog, perturbation_norms

log = logging.getLogger(__name__)

LSA_COLUMNS = ["layer", "layer_type", "attack", "eps", "re_mean", "re_std", "re_pooled", "n_samples",
               "order", "kind", "norm", "is_output"]
ACCURACY_COLUMNS = ["attack", "eps", "accuracy", "n_samples", "kind", "norm", "seconds", "success_rate",
                    "pert_median", "pert_p90"]


# -- the streaming statistic ---------------------------------------------------------------
class PerturbationSizes:
    """Success rate and perturbation size of one attack configuration, streamed by batch.

    A sample is *fooled* when the model classifies it correctly and its perturbed input wrongly;
    ``success_rate`` is fooled / correctly classified. ``pert_median`` and ``pert_p90`` are the median
    and 90th percentile (linear interpolation) of ``||x' - x||`` in the attack's own norm over the
    fooled samples: for minimal-perturbation attacks (CW, DeepFool) the size they needed. One float
    per fooled sample is kept.
    """

    def __init__(self, norm: str) -> None:
        self.norm = norm
        self.n_correct = 0
        self.sizes: list[np.ndarray] = []

    def update(self, x: torch.Tensor, x_adv: torch.Tensor, ok_clean: torch.Tensor,
               ok_adv: torch.Tensor) -> torch.Tensor:
        """Add one batch; return every sample's perturbation norm (what ``samples.csv`` records)."""
        norms = perturbation_norms(x, x_adv, self.norm)
        fooled = ok_clean & ~ok_adv
        self.n_correct += int(ok_clean.sum())
        if fooled.any():
            self.sizes.append(norms[fooled].cpu().numpy())
        return norms

    def compute(self) -> dict[str, float]:
        sizes = np.concatenate(self.sizes) if self.sizes else np.zeros(0)
        rate = len(sizes) / self.n_correct if self.n_correct else math.nan
        if not len(sizes):
            return {"success_rate": rate, "pert_median": math.nan, "pert_p90": math.nan}
        return {"success_rate": rate, "pert_median": float(np.median(sizes)),
                "pert_p90": float(np.percentile(sizes, 90))}


def pooled_relative_error(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """``||Phi' - Phi||_F / ||Phi||_F`` over the whole batch tensor (the reference code's measure)."""
    return relative_error(clean, perturbed, "pooled")


# -- results ---------------------------------------------------------------------------------
@dataclass
class MVL:
    """The Most Vulnerable Layers list: which criterion and ranking picked them, most vulnerable first."""

    criterion: str
    attack: str
    eps: float | None
    metric: str
    layers: pd.DataFrame
    k: int | None = None
    z: float | None = None
    excluded: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.layers["layer"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "k": self.k,
            "z": self.z,
            "attack": self.attack,
            "eps": self.eps,
            "metric": self.metric,
            "excluded": list(self.excluded),
            "layers": [
                {"layer": r.layer, "score": float(r.score), "layer_type": r.layer_type}
                for r in self.layers.itertuples()
            ],
        }


@dataclass
class LSAResult:
    """What :func:`analyze` measured: per-layer RE and accuracy per attack configuration."""

    lsa: pd.DataFrame
    accuracy: pd.DataFrame
    layers: list[Layer]
    attacks: list[atk.AttackSpec]
    n_samples: int
    seconds: float = 0.0
    # configuration index -> per-sample "still classified correctly" of the first keep_outcomes samples
    outcomes: dict[int, torch.Tensor] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.lsa.copy()

    @property
    def clean_accuracy(self) -> float:
        return float(self.accuracy.loc[self.accuracy["attack"] == "clean", "accuracy"].iloc[0])

    def strongest(self) -> tuple[str, float | None]:
        """The adversarial configuration to rank by: lowest accuracy at its attack's largest eps."""
        return strongest_attack(self.accuracy)

    def mvl(self, k: int | None = None, *, z: float | None = None, attack: str | None = None,
            eps: float | None = None, metric: str = "re_mean", include_output: bool = False) -> MVL:
        return select_mvl(self.lsa, self.accuracy, k=k, z=z, attack=attack, eps=eps, metric=metric,
                          include_output=include_output)


# Modules that only reshape or pass their input through: their RE repeats the previous layer's.
PASSTHROUGH_TYPES = frozenset({"Flatten", "Unflatten", "Identity", "Dropout", "Dropout1d", "Dropout2d",
                               "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"})

# Tie-break between equally strong attacks: prefer the stronger family (white-box, iterative).
_FAMILY_PRIORITY = {"autoattack": 0, "pgd": 1, "pgdl2": 1, "cw": 2, "deepfool": 3, "square": 4, "fgsm": 5}


def strongest_attack(accuracy: pd.DataFrame) -> tuple[str, float | None]:
    """The adversarial configuration with the lowest accuracy at its largest eps (then lowest mean).

    Only attacks with an eps budget compete: the accuracy left by a minimal-perturbation attack (CW,
    DeepFool) measures no robustness at any budget, so they rank layers only in a battery without others.
    """
    adv = accuracy[(accuracy["kind"] == "adversarial") & (accuracy["attack"] != "worst-case")]
    if adv.empty:
        raise RobauditError("the battery has no adversarial attack to rank layers by: add one, e.g. --attack pgd")
    if adv["eps"].notna().any():
        adv = adv[adv["eps"].notna()]
    best = None
    for name, rows in adv.groupby("attack", sort=False):
        rows = rows.sort_values("eps", na_position="first")
        row = rows.iloc[-1]
        family = name.split("(", 1)[0]
        key = (float(row["accuracy"]), float(rows["accuracy"].mean()), _FAMILY_PRIORITY.get(family, 9))
        if best is None or key < best[0]:
            eps = None if pd.isna(row["eps"]) else float(row["eps"])
            best = (key, name, eps)
    return best[1], best[2]


def select_mvl(lsa: pd.DataFrame, accuracy: pd.DataFrame, *, k: int | None = None, z: float | None = None,
               attack: str | None = None, eps: float | None = None, metric: str = "re_mean",
               include_output: bool = False) -> MVL:
    """Rank layers by ``metric`` under one attack configuration; keep the top ``k`` or the z-outliers.

    Pass-through modules (Flatten, Identity, Dropout in eval) and, unless ``include_output``, the
    output layer are left out and listed in ``excluded``.
    """
    if metric not in ("re_mean", "re_pooled"):
        raise RobauditError(f"unknown MVL metric {metric!r}: use re_mean or re_pooled")
    if k is not None and z is not None:
        raise RobauditError("choose one MVL criterion: --mvl-top K or --mvl-z Z")
    if k is not None and k < 1:
        raise RobauditError("--mvl-top must be at least 1")
    if attack is None:
        attack, default_eps = strongest_attack(accuracy)
        eps = default_eps if eps is None else eps
    rows = lsa[lsa["attack"] == attack]
    if rows.empty:
        raise RobauditError(f"no attack named {attack!r} in this analysis: choose from "
                            f"{', '.join(dict.fromkeys(lsa['attack']))}")
    if eps is None and rows["eps"].notna().any():
        eps = float(rows["eps"].max())
    if eps is not None:
        rows = rows[np.isclose(rows["eps"].astype(float), eps)]
        if rows.empty:
            raise RobauditError(f"{attack} was not run at eps {eps:g}")
    drop = rows["layer_type"].isin(PASSTHROUGH_TYPES)
    if not include_output:
        drop |= rows["is_output"].astype(bool)
    excluded = list(rows.loc[drop, "layer"])
    rows = rows[~drop]
    ranked = rows.sort_values([metric, "order"], ascending=[False, True])
    ranked = ranked[ranked[metric].notna()]
    if z is not None:
        mu, sd = ranked[metric].mean(), ranked[metric].std(ddof=0)
        ranked = ranked[ranked[metric] > mu + z * sd]
        criterion = "z"
    else:
        if k is None:  # the default: five, or every rankable layer of a smaller model
            k = max(1, min(5, len(ranked)))
        if k > len(ranked):
            raise RobauditError(f"--mvl-top {k} is more than the {len(ranked)} layers analyzed: use at most {len(ranked)}")
        ranked = ranked.head(k)
        criterion = "top-k"
    table = ranked[["layer", metric, "layer_type"]].rename(columns={metric: "score"}).reset_index(drop=True)
    return MVL(criterion, attack, eps, metric, table, k=k if criterion == "top-k" else None, z=z, excluded=excluded)


# -- the analysis ----------------------------------------------------------------------------
def graph_for_ops(model: nn.Module, example: torch.Tensor, type_map: Mapping[str, str] | None = None):
    """``(module, type_map)`` whose functional ops are probeable: the model itself when it is an
    unflattened program, else its internal export; an eager model that cannot be exported keeps
    module-level probing, with a warning."""
    from torch.export.unflatten import UnflattenedModule

    if isinstance(model, UnflattenedModule):
        return model, type_map
    try:
        with torch.no_grad():
            model(example[:2])
    except Exception:  # the compatibility check that follows says why, in one line
        return model, type_map
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return as_graph(model, example)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        warnings.warn(f"the model cannot be exported ({type(e).__name__}: {first}), so its functional ops are "
                      "not probed; only its modules are (--probe modules silences this)", stacklevel=3)
        return model, type_map


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RobauditError(f"unknown device {device!r}: use auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RobauditError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def analyze(
    model: nn.Module | LoadedModel,
    data,
    *,
    attacks: Sequence[str | atk.AttackSpec] | None = None,
    eps: Sequence[float] | None = None,
    layers: Sequence[str] | None = None,
    layer_types: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 128,
    device: str | torch.device = "auto",
    seed: int = 0,
    type_map: Mapping[str, str] | None = None,
    probe: str = "all",
    progress: bool = False,
    keep_outcomes: int = 0,
    workers: int = 0,
    samples_path: str | os.PathLike | None = None,
) -> LSAResult:
    """Run the attack battery on ``data`` and measure every probed layer's relative error.

    ``keep_outcomes`` keeps, per configuration, which of the first that many samples stay correctly
    classified (``LSAResult.outcomes``), so that the sanity checks reuse them instead of attacking again.
    A streaming data set is read through a ``DataLoader`` (``workers`` processes), its uint8 batches
    turned into floats only once on the device. ``samples_path`` streams one row per sample there
    (``samples.csv``: see :mod:`robaudit.samples`).

    ``model`` is the user's classifier (inputs in [0, 1], or normalized by ``mean``/``std``);
    ``data`` a :class:`robaudit.data.Dataset` or an ``(x, y)`` pair. Per batch: one hooked clean
    forward, reused by every attack; per attack, the adversarial batch and one hooked forward.
    ``probe`` (``modules``, ``ops`` or ``all``) says which layers are candidates: to probe an eager
    model's functional ops it runs the model's own ``torch.export`` graph, so names match its ``.pt2``.
    """
    started = time.perf_counter()
    if isinstance(model, LoadedModel):
        type_map = type_map or model.type_map
        model = model.module
    data = as_dataset(data, "analysis")
    x_all = data.head(2)[0] if isinstance(data, StreamingDataset) else data.x  # a stream's rest comes by batch
    y_all, num_classes = data.y, data.num_classes
    if batch_size < 1:
        raise RobauditError("--batch-size must be at least 1")
    dev = resolve_device(device)
    specs = atk.expand(list(attacks) if attacks else atk.default_battery(eps), eps)
    if probe not in PROBE_MODES:
        raise RobauditError(f"unknown probe mode {probe!r}: use {', '.join(PROBE_MODES)}")
    model = model.to(dev).eval()
    eager = model
    if probe != "modules":
        model, type_map = graph_for_ops(model, x_all[:2].to(dev), type_map)
    full = with_normalization(model, mean, std, ndim=x_all.dim()).to(dev).eval()
    # the attacks run on the user's own module (the graph copy is only for the hooked passes): its
    # generated code costs more than eager execution, which the attacks would pay at every step
    attacked = full if eager is model else with_normalization(eager, mean, std, ndim=x_all.dim()).to(dev).eval()
    check_compatible(full, x_all[:2].to(dev), num_classes)
    modules = select_modules(model, layer_types=layer_types, patterns=layers, type_map=type_map, probe=probe)

    seed_everything(seed)
    builders = [atk.build(s, attacked, num_classes=num_classes, seed=seed) for s in specs]
    stats: dict[tuple[str, int], RelativeError] = {}
    correct = {"clean": 0, **{i: 0 for i in range(len(specs))}}
    seconds = [0.0] * len(specs)  # time spent generating each configuration's perturbed inputs
    sizes = [PerturbationSizes(s.norm) for s in specs]
    worst_keys = sorted({(s.norm, s.eps) for s in specs if s.kind == "adversarial" and s.bounded},
                        key=lambda t: (t[0], t[1]))
    worst_correct = {k: 0 for k in worst_keys}
    output_layers: set[str] = set()
    n_total = len(y_all)
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(specs))} if keep_outcomes > 0 else {}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total * len(specs), desc="analyze", unit="ex", leave=False)
    # a fixed-batch archive runs in chunks, whose outputs the probe joins: read them after the pass
    streaming = model.__dict__.get("_robaudit_fixed_batch") is None
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(SampleLog(samples_path, [(s.label, s.eps) for s in specs], worst_keys)) \
            if samples_path is not None else None
        probe = stack.enter_context(LayerProbe(model, modules, type_map=type_map, detach=True))
        for start, x, y in batches(data, batch_size=batch_size, device=dev, workers=workers):
            with torch.no_grad():
                logits, outs = probe.run(full, x)
            clean = dict(outs)
            if not torch.isfinite(logits).all():
                raise NonFiniteError(f"the model returns non-finite outputs on clean samples {start}..{start + len(x) - 1}")
            for name, t in clean.items():
                if t.shape == logits.shape and torch.equal(t, logits.detach()):
                    output_layers.add(name)
            clean_sq = {name: per_sample_sq_norms(t) for name, t in clean.items()}

            def observe(i: int, layer: Layer, t: torch.Tensor, clean=clean, clean_sq=clean_sq) -> torch.Tensor:
                if layer.name not in clean:
                    raise RobauditError(f"layer {layer.name} ran on the perturbed input but not on the clean one: "
                                        "the model's control flow depends on its input; restrict --layers")
                stats.setdefault((layer.name, i), RelativeError()).update(clean[layer.name], t,
                                                                          clean_sq=clean_sq[layer.name])
                return t
            ok_clean = logits.argmax(1) == y
            correct["clean"] += int(ok_clean.sum())
            robust = {k: ok_clean.clone() for k in worst_keys}
            oks, perts = [], []
            for i, (spec, attack_fn) in enumerate(zip(specs, builders)):
                tic = time.perf_counter()
                with probe.paused():  # no hook overhead inside the attack's own forward passes
                    try:
                        x_adv = attack_fn(x, y).detach()
                    finally:
                        model.eval()
                        eager.eval()
                seconds[i] += time.perf_counter() - tic
                if not torch.isfinite(x_adv).all():
                    raise NonFiniteError(f"{spec.label} produced non-finite inputs: the model's gradients may be "
                                         "non-finite; check the weights")
                with torch.no_grad():
                    if streaming:  # each layer's statistics update as it runs: no copy of its output is kept
                        probe.transform, probe.record = functools.partial(observe, i), False
                        try:
                            adv_logits, adv_outs = probe.run(full, x_adv)
                        finally:
                            probe.transform, probe.record = None, True
                    else:
                        adv_logits, adv_outs = probe.run(full, x_adv)
                ok = adv_logits.argmax(1) == y
                correct[i] += int(ok.sum())
                if kept and start < keep_outcomes:
                    kept[i].append(ok[:keep_outcomes - start].cpu())
                norms = sizes[i].update(x, x_adv, ok_clean, ok)
                if log is not None:
                    oks.append(ok)
                    perts.append(norms)
                if spec.kind == "adversarial" and spec.bounded:
                    robust[(spec.norm, spec.eps)] &= ok
                for name, t in adv_outs.items():
                    if name not in clean:
                        raise RobauditError(f"layer {name} ran on the perturbed input but not on the clean one: "
                                            "the model's control flow depends on its input; restrict --layers")
                    stats.setdefault((name, i), RelativeError()).update(clean[name], t, clean_sq=clean_sq[name])
                if bar is not None:
                    bar.update(len(x))
            for k in worst_keys:
                worst_correct[k] += int(robust[k].sum())
            if log is not None:
                log.write(torch.arange(start, start + len(y)), y, logits.argmax(1), oks, perts,
                          [robust[k] for k in worst_keys])
            del clean, clean_sq, outs
    if bar is not None:
        bar.close()

    layer_list = probe.layers
    rows = []
    for layer in layer_list:
        for i, spec in enumerate(specs):
            st = stats.get((layer.name, i))
            if st is None:
                continue
            rows.append({
                "layer": layer.name, "layer_type": layer.layer_type, "attack": spec.label, "eps": spec.eps,
                **{k: v for k, v in st.compute().items() if k != "n_undefined"},
                "order": layer.order, "kind": spec.kind, "norm": spec.norm,
                "is_output": layer.name in output_layers,
            })
    lsa = pd.DataFrame(rows, columns=LSA_COLUMNS)
    acc_rows = [{"attack": "clean", "eps": None, "accuracy": correct["clean"] / n_total, "n_samples": n_total,
                 "kind": "clean", "norm": None, "seconds": None}]
    for i, spec in enumerate(specs):
        acc_rows.append({"attack": spec.label, "eps": spec.eps, "accuracy": correct[i] / n_total,
                         "n_samples": n_total, "kind": spec.kind, "norm": spec.norm, "seconds": seconds[i],
                         **sizes[i].compute()})
    for (norm, e), c in worst_correct.items():  # fooled by at least one attack; no single perturbation to size
        rate = (correct["clean"] - c) / correct["clean"] if correct["clean"] else math.nan
        acc_rows.append({"attack": "worst-case", "eps": e, "accuracy": c / n_total, "n_samples": n_total,
                         "kind": "adversarial", "norm": norm, "seconds": None, "success_rate": rate})
    accuracy = pd.DataFrame(acc_rows, columns=ACCURACY_COLUMNS)
    lsa_finite = lsa[["re_mean", "re_pooled"]].replace([np.inf, -np.inf], np.nan)
    if len(lsa) and lsa_finite.isna().all().all():
        raise NonFiniteError("every layer's relative error is undefined: the model's activations are all zero")
    return LSAResult(lsa=lsa, accuracy=accuracy, layers=layer_list, attacks=specs, n_samples=n_total,
                     seconds=time.perf_counter() - started, outcomes={i: torch.cat(v) for i, v in kept.items() if v})
