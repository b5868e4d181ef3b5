"""Layer Sustainability Analysis: per-layer relative error under an attack battery, streamed by batch.

For a layer ``l`` with output ``phi_l``: ``RE_l(x, x') = ||phi_l(x') - phi_l(x)||_2 / ||phi_l(x)||_2``.
``re_mean``/``re_std`` aggregate it per sample; ``re_pooled = sqrt(sum ||delta||^2) / sqrt(sum ||phi||^2)``.
All are sums over samples, so no activation outlives its batch.
"""
from __future__ import annotations

import contextlib
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
from . import dist
from .data import as_dataset, batches
from .errors import NonFiniteError, RobauditError
from . import batteries
from .battery import Battery, PerturbationSizes, Setup, Totals, write_rows  # noqa: F401 (PerturbationSizes: API)
from .bnaudit import BatchNormMoments, BatchNormStreams
from .metrics import INPUT_LAYER, RelativeError, layer_gains, per_sample_sq_norms, relative_error  # noqa: F401
from .device import resolve_device
from .exported import as_graph, fixed_batch
from .intervals import with_intervals
from .models import LoadedModel, with_normalization
from .normcheck import NormalizationCheck
from .rundir import rows_at
from .probe import PROBE_MODES, Layer, LayerProbe, select_modules
from .samples import SampleLog

log = logging.getLogger(__name__)

LSA_COLUMNS = ["layer", "layer_type", "attack", "eps", "re_mean", "re_std", "re_pooled", "n_samples",
               "order", "kind", "norm", "is_output", "re_gain"]
# What the MVL list may rank by: the cumulative RE (per-sample mean or pooled), or each layer's own gain.
MVL_METRICS = ("re_mean", "re_pooled", "re_gain")
# the intervals come last: a reader of the columns by position before them reads what it always read
ACCURACY_COLUMNS = ["attack", "eps", "accuracy", "n_samples", "kind", "norm", "seconds", "success_rate",
                    "pert_median", "pert_p90", "pert_median_all", "ci_low", "ci_high"]


def pooled_relative_error(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """``||Phi' - Phi||_F / ||Phi||_F`` over the whole batch tensor (the reference code's measure)."""
    return relative_error(clean, perturbed, "pooled")


# -- results ---------------------------------------------------------------------------------
@dataclass
class MVL:
    """The Most Vulnerable Layers list: which criterion and ranking picked them, most vulnerable first.

    ``layers``: ``layer``, ``score``, ``layer_type`` and ``depth``, the layer's position among the probed layers in
    forward order (1 nearest the input): whether the most vulnerable layers are simply the deepest shows there.
    """

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
                {"layer": r.layer, "score": float(r.score), "layer_type": r.layer_type,
                 **({"depth": int(r.depth)} if "depth" in self.layers else {})}
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
    # BatchNorm input moments of the clean and each adversarial configuration's pass (bnaudit)
    bn_moments: BatchNormMoments | None = None
    # accuracy.csv's rows (attack, eps, norm) and, per pair of them, the samples right under one and wrong under the
    # other: what the sanity checks test two attacks on (checks.json's battery_pairs)
    pairs: dict | None = None
    # layers left out because their output holds no per-sample activation (layer -> why), as the probe warned
    unprobed: dict[str, str] = field(default_factory=dict)
    # layers whose output holds each sample's rows folded into the batch, batch-major (layer -> rows per sample)
    folded: dict[str, int] = field(default_factory=dict)

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


def re_column(metric: str) -> str:
    """The RE column behind a ranking metric: the metric itself, or ``re_mean`` for ``re_gain`` (a ratio of REs,
    not an RE: a bar on RE or a before/after RE comparison reads the RE)."""
    return "re_mean" if metric == "re_gain" else metric


def ranking_rows(lsa: pd.DataFrame, accuracy: pd.DataFrame, *, attack: str | None = None, eps: float | None = None,
                 metric: str = "re_mean",
                 include_output: bool = False) -> tuple[pd.DataFrame, list[str], str, float | None]:
    """The layers the MVL list chooses from: ``(rows, excluded, attack, eps)``, one row per layer under the ranking
    configuration (by default the strongest attack at its largest eps) whose ``metric`` is defined.

    Pass-through modules (Flatten, Identity, Dropout in eval) and, unless ``include_output``, the output layer are
    left out and listed in ``excluded``. The controls of ``harden --layers-from`` draw from the same rows.
    """
    if metric not in MVL_METRICS:
        raise RobauditError(f"unknown MVL metric {metric!r}: use {', '.join(MVL_METRICS)}")
    if metric not in lsa.columns:
        raise RobauditError(f"this analysis has no {metric} column (lsa.csv from an older robaudit): analyze again, "
                            "or rank by re_mean")
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
        rows = rows_at(rows, attack, eps)
        if rows.empty:
            raise RobauditError(f"{attack} was not run at eps {eps:g}")
    drop = rows["layer_type"].isin(PASSTHROUGH_TYPES)
    if not include_output:
        drop |= rows["is_output"].astype(bool)
    excluded = list(rows.loc[drop, "layer"])
    rows = rows[~drop]
    return rows[rows[metric].notna()], excluded, attack, eps


def layer_depths(lsa: pd.DataFrame) -> dict[str, int]:
    """Each probed layer's depth: its position among all the probed layers of ``lsa`` in forward order, from 1."""
    orders = lsa.drop_duplicates("layer").sort_values("order", kind="stable")["layer"]
    return {name: i for i, name in enumerate(orders, 1)}


def select_mvl(lsa: pd.DataFrame, accuracy: pd.DataFrame, *, k: int | None = None, z: float | None = None,
               attack: str | None = None, eps: float | None = None, metric: str = "re_mean",
               include_output: bool = False) -> MVL:
    """Rank layers by ``metric`` under one attack configuration; keep the top ``k`` or the z-outliers.

    ``metric``: ``re_mean`` or ``re_pooled`` (the cumulative RE) or ``re_gain`` (each layer's own share). The
    candidates are :func:`ranking_rows`'; the layers it leaves out are listed in ``excluded``.
    """
    if k is not None and z is not None:
        raise RobauditError("choose one MVL criterion: --mvl-top K or --mvl-z Z")
    if k is not None and k < 1:
        raise RobauditError("--mvl-top must be at least 1")
    rows, excluded, attack, eps = ranking_rows(lsa, accuracy, attack=attack, eps=eps, metric=metric,
                                               include_output=include_output)
    ranked = rows.sort_values([metric, "order"], ascending=[False, True])
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
    table["depth"] = table["layer"].map(layer_depths(lsa)).astype(int)
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
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
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

    ``keep_outcomes``: per configuration, which of the first that many samples stay correct
    (``LSAResult.outcomes``), for the sanity checks to reuse. A streaming data set is read by a ``DataLoader``
    (``workers`` processes). ``samples_path`` streams one row per sample (:mod:`robaudit.samples`).

    ``model`` is the user's classifier (inputs in [0, 1], or normalized by ``mean``/``std``);
    ``data`` a :class:`robaudit.data.Dataset` or an ``(x, y)`` pair. Per batch: every configuration's
    perturbed batch, then one hooked forward of the clean batch stacked with (up to 8 of) them.
    ``probe`` (``modules``, ``ops`` or ``all``) says which layers are candidates: to probe an eager
    model's functional ops it runs the model's own ``torch.export`` graph, so names match its ``.pt2``.

    Under ``torchrun`` every process calls this with the same arguments and takes every N-th batch; all of
    them get the same result, and only rank 0 writes ``samples_path``. Random draws are seeded per batch and
    configuration, so the numbers do not depend on the number of processes.
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    dist.init(dev)
    dev = dist.local_device(dev)
    error, payload = None, None
    with contextlib.ExitStack() as stack:
        try:  # a failure on any process reaches every process at the exchange below, instead of a hang
            data = as_dataset(data, "analysis")
            setup, probe_ = _prepare(model, data, attacks=attacks, eps=eps, layers=layers, layer_types=layer_types,
                                     mean=mean, std=std, batch_size=batch_size, device=dev, seed=seed,
                                     type_map=type_map, probe=probe, stack=stack)
            battery = _run_battery(setup, probe_, data, stack, batch_size=batch_size, device=dev, workers=workers,
                                   keep_outcomes=keep_outcomes, samples_path=samples_path, progress=progress)
            payload = {**battery.payload(probe_.layers), "wants_rows": samples_path is not None,
                       "unprobed": dict(probe_.unprobed), "folded": dict(probe_.folded)}
        except Exception as e:
            error = e
        payloads = dist.exchange(payload, error)
        totals = battery.totals(payloads)
        if dist.world_size() > 1 and payloads[0]["wants_rows"]:  # the rows come to rank 0, which writes them in order
            gathered = dist.gather_to_main(battery.rows)
            if gathered is not None:
                with _sample_log(samples_path, setup) as log:
                    write_rows(log, gathered)
    return _result(setup, totals, payloads, n_total=len(data.y), seconds=time.perf_counter() - started)


def _run_battery(setup: Setup, probe_: LayerProbe, data, stack: contextlib.ExitStack, *, batch_size: int,
                 device: torch.device, workers: int, keep_outcomes: int, samples_path, progress: bool) -> Battery:
    """Step the battery over this process's share of the batches; rows stream to ``samples_path`` in one process."""
    one = dist.world_size() == 1
    log = stack.enter_context(_sample_log(samples_path, setup)) if one and samples_path is not None else None
    battery = Battery(setup, probe_, keep_outcomes=keep_outcomes, log=log, keep_rows=not one,
                      bar=_progress_bar(stack, progress, len(data.y), batch_size, len(setup.specs)))
    for start, x, y in batches(data, batch_size=batch_size, device=device, workers=workers,
                               part=(dist.rank(), dist.world_size())):
        battery.step(start // batch_size, start, x, y)
    battery.flush()
    return battery


def _prepare(model, data, *, attacks, eps, layers, layer_types, mean, std, batch_size, device, seed, type_map,
             probe, stack: contextlib.ExitStack) -> tuple[Setup, LayerProbe]:
    """The battery's model, attacks and probe (entered on ``stack``); the first batch checks that model and data
    fit (:meth:`Battery.step`)."""
    if isinstance(model, LoadedModel):
        type_map = type_map or model.type_map
        model = model.module
    x_all = data.head(2)[0]  # an example batch: the rest comes batch by batch
    num_classes = data.num_classes
    if batch_size < 1:
        raise RobauditError("--batch-size must be at least 1")
    specs = atk.expand(list(attacks) if attacks else batteries.battery(batteries.BatteryName.DEFAULT, eps), eps)
    if probe not in PROBE_MODES:
        raise RobauditError(f"unknown probe mode {probe!r}: use {', '.join(PROBE_MODES)}")
    model = model.to(device).eval()
    eager = model
    if probe != "modules":
        model, type_map = graph_for_ops(model, x_all[:2].to(device), type_map)
        if model is not eager:  # the internal export: a new module
            model = model.to(device).eval()
    full = _normalized(model, mean, std, ndim=x_all.dim(), device=device)
    # the attacks run on the user's own module (the graph copy is only for the hooked passes): its
    # generated code costs more than eager execution, which the attacks would pay at every step
    attacked = full if eager is model else _normalized(eager, mean, std, ndim=x_all.dim(), device=device)
    modules = select_modules(model, layer_types=layer_types, patterns=layers, type_map=type_map, probe=probe)
    seed_everything(seed)
    builders = [atk.build(s, attacked, num_classes=num_classes, seed=seed) for s in specs]
    # a fixed-batch archive runs in chunks, whose outputs the probe joins: read them after the pass
    streaming = fixed_batch(model) is None
    setup = Setup(model=model, eager=eager, full=full, attacked=attacked, specs=specs, builders=builders,
                  device=device, seed=seed, streaming=streaming, num_classes=num_classes,
                  bn=BatchNormStreams(model, type_map, len(specs), device),
                  first_batch=NormalizationCheck.of(mean=mean, std=std, data_mean=data.mean, data_std=data.std,
                                                    num_classes=num_classes))
    return setup, stack.enter_context(LayerProbe(model, modules, type_map=type_map, detach=True))


def _normalized(module: nn.Module, mean, std, *, ndim: int, device: torch.device) -> nn.Module:
    """``module`` behind the normalization, if any: a new wrapper is moved to ``device`` and put in eval mode
    (``module`` already is; moving and switching every submodule again costs a pass over all of them)."""
    wrapped = with_normalization(module, mean, std, ndim=ndim)
    return wrapped if wrapped is module else wrapped.to(device).eval()


def _sample_log(path, setup: Setup) -> SampleLog:
    return SampleLog(path, [(s.label, s.eps) for s in setup.specs], setup.worst_keys)


def _progress_bar(stack: contextlib.ExitStack, progress: bool, n_total: int, batch_size: int, n_configs: int):
    """A tqdm bar over this process's share of the samples (rank 0 only), closed with ``stack``."""
    if not progress or not dist.is_main():
        return None
    from tqdm.auto import tqdm

    rank, world = dist.rank(), dist.world_size()
    mine = sum(min(batch_size, n_total - s) for s in range(0, n_total, batch_size)[rank::world])
    return stack.enter_context(tqdm(total=mine * n_configs, desc="analyze", unit="ex", leave=False))


def _result(setup: Setup, totals: Totals, payloads: list[dict], *, n_total: int, seconds: float) -> LSAResult:
    """The ``lsa.csv`` and ``accuracy.csv`` tables of the battery's totals, and the layers no process could probe."""
    specs = setup.specs
    gains: dict[tuple[str, int], float] = {}  # per configuration: each layer over the one before it in forward order
    for i in range(len(specs)):
        chain = [layer.name for layer in totals.layers if (layer.name, i) in totals.re]
        input_re = totals.re.get((INPUT_LAYER, i), {}).get("re_mean", math.nan)
        gains.update(zip(((name, i) for name in chain),
                         layer_gains([totals.re[(name, i)]["re_mean"] for name in chain], input_re)))
    rows = []
    for layer in totals.layers:
        for i, spec in enumerate(specs):
            st = totals.re.get((layer.name, i))
            if st is None:
                continue
            rows.append({
                "layer": layer.name, "layer_type": layer.layer_type, "attack": spec.label, "eps": spec.eps,
                **{k: v for k, v in st.items() if k != "n_undefined"},
                "order": layer.order, "kind": spec.kind, "norm": spec.norm,
                "is_output": layer.name in totals.output_layers, "re_gain": gains[(layer.name, i)],
            })
    lsa = pd.DataFrame(rows, columns=LSA_COLUMNS)
    clean = totals.correct[0]
    acc_rows = [{"attack": "clean", "eps": None, "accuracy": clean / n_total, "n_samples": n_total,
                 "kind": "clean", "norm": None, "seconds": None}]
    for i, spec in enumerate(specs):
        acc_rows.append({"attack": spec.label, "eps": spec.eps, "accuracy": totals.correct[1 + i] / n_total,
                         "n_samples": n_total, "kind": spec.kind, "norm": spec.norm, "seconds": totals.seconds[i],
                         **totals.sizes[i]})
    for (norm, e), c in zip(setup.worst_keys, totals.worst):  # fooled by at least one attack: no single size
        rate = (clean - c) / clean if clean else math.nan
        acc_rows.append({"attack": "worst-case", "eps": e, "accuracy": c / n_total, "n_samples": n_total,
                         "kind": "adversarial", "norm": norm, "seconds": None, "success_rate": rate})
    accuracy = with_intervals(pd.DataFrame(acc_rows, columns=ACCURACY_COLUMNS))  # every accuracy with its 95 % CI
    lsa_finite = lsa[["re_mean", "re_pooled"]].replace([np.inf, -np.inf], np.nan)
    if len(lsa) and lsa_finite.isna().all().all():
        raise NonFiniteError("every layer's relative error is undefined: the model's activations are all zero")
    pairs = {"rows": [["clean", None, None]] + [[s.label, s.eps, s.norm] for s in specs]
             + [["worst-case", e, norm] for norm, e in setup.worst_keys], "robust_only": totals.pairs}
    return LSAResult(lsa=lsa, accuracy=accuracy, layers=totals.layers, attacks=specs, n_samples=n_total,
                     seconds=seconds, outcomes=totals.outcomes, bn_moments=totals.bn, pairs=pairs,
                     unprobed={k: v for p in payloads for k, v in p["unprobed"].items()},
                     folded={k: v for p in payloads for k, v in p["folded"].items()})
