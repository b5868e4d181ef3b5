"""The ``harden`` stage: harden an analyzed run's model and write ``RUN/hardened/``."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .. import attacks as atk
from .. import dist
from ..cmdline import command_line
from ..labels import format_eps
from ..data import DATASETS, IMAGEFOLDER_PREFIX, class_folders, is_image_folder_record, load_dataset
from ..errors import RobauditError
from ..device import resolve_device
from ..exported import export_dynamic_batch
from ..lsa import ranking_rows, re_column, select_mvl
from ..sources import WEIGHTS_FILE, ModelSource, reload_recorded, save_weights, state_digest
from ..models import (LoadedModel, check_stored_arch, export_model, load_model, save_checkpoint,
                      save_exported_weights, sha256_file, with_normalization)
from ..rundir import rows_at, atomic_dir, fill_run, foreign_entries, read_run, write_csv, write_json
from ..writelock import write_lock
from ..training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from ..training.config import HardenConfig
from ..training.fit import HardenResult, global_batch_size, harden
from ..training.layers import LayerRule, batchnorm_modules, control_layers
from ..training.loop import HardenInterrupted, TimeEstimate
from .analyze import (analyze_for_run, batchnorm_audit, load_run_data, model_checks, now,
                      run_tables)

HARDENED_DIR = "hardened"

@dataclass
class HardenRun:
    """The outcome of :func:`harden_run`: where everything went and the before/after comparison."""

    run_dir: Path
    hardened_dir: Path
    model_path: Path
    result: HardenResult
    analysis: Any  # LSAResult of the hardened model
    comparison: pd.DataFrame
    settings: dict


def default_train_eps(eps_list: Sequence[float] | None) -> float | None:
    """The lower median of the analysis eps sweep: larger eps remain to test generalization."""
    vals = sorted(float(e) for e in eps_list or [] if e is not None)
    return vals[(len(vals) - 1) // 2] if vals else None


def comparison_frame(before_acc: pd.DataFrame, after_acc: pd.DataFrame, before_lsa: pd.DataFrame,
                     after_lsa: pd.DataFrame, *, layers: Sequence[str], attack: str | None, eps: float | None,
                     metric: str = "re_mean") -> pd.DataFrame:
    """``kind, attack, eps, norm, layer, before, after, delta``: accuracy per attack/eps/norm, RE per MVL layer."""

    def key(e):
        return None if e is None or (isinstance(e, float) and math.isnan(e)) else round(float(e), 10)

    def norm_of(r) -> str | None:
        n = getattr(r, "norm", None)  # "" (read back) or None/NaN (in memory) for the clean row
        return None if n is None or n == "" or (isinstance(n, float) and math.isnan(n)) else str(n)

    after = {(r.attack, key(r.eps), norm_of(r)): float(r.accuracy) for r in after_acc.itertuples()}
    rows = []
    for r in before_acc.itertuples():
        a = after.get((r.attack, key(r.eps), norm_of(r)), math.nan)
        rows.append({"kind": "accuracy", "attack": r.attack, "eps": key(r.eps), "norm": norm_of(r), "layer": None,
                     "before": float(r.accuracy), "after": a, "delta": a - float(r.accuracy)})

    def re_of(frame: pd.DataFrame, layer: str) -> float:
        sel = rows_at(frame[frame["layer"] == layer], attack, eps)
        return float(sel[metric].iloc[0]) if len(sel) else math.nan

    for layer in layers:
        b, a = re_of(before_lsa, layer), re_of(after_lsa, layer)
        rows.append({"kind": "re", "attack": attack, "eps": key(eps), "norm": None, "layer": layer, "before": b,
                     "after": a, "delta": a - b})
    return pd.DataFrame(rows, columns=["kind", "attack", "eps", "norm", "layer", "before", "after", "delta"])


def _select_layers(run, mvl_top: int | None, include_output: bool, rule: LayerRule = LayerRule.MVL,
                   seed: int = 0) -> tuple[list[str], dict]:
    """The layers to harden: the MVL layers, re-ranked from the run's LSA under the run's MVL attack/eps/metric,
    or (``rule`` a control) as many of the same candidate layers chosen by depth or at random with ``seed``."""

    mvl = run.mvl or {}
    attack, eps, metric = mvl.get("attack"), mvl.get("eps"), mvl.get("metric") or "re_mean"
    if mvl_top is None:
        flags = run.lsa["is_output"].astype(str).str.lower().isin(("true", "1")) if "is_output" in run.lsa else None
        outputs = set(run.lsa.loc[flags, "layer"]) if flags is not None else set()
        names = [l["layer"] for l in mvl.get("layers", []) if include_output or l["layer"] not in outputs]
        if not names:
            raise RobauditError(f"the MVL list in {run.path} is empty: pass --mvl-top K")
        ranking = {"attack": attack, "eps": eps, "metric": metric, "criterion": "the run's MVL list"}
    else:
        if int(mvl_top) != mvl_top or mvl_top < 1:
            raise RobauditError(f"--mvl-top must be a positive whole number, not {mvl_top}")
        sel = select_mvl(run.lsa, run.accuracy, k=int(mvl_top), attack=attack, eps=eps, metric=metric,
                         include_output=include_output)
        names, ranking = sel.names, {"attack": sel.attack, "eps": sel.eps, "metric": sel.metric,
                                     "criterion": f"top-{mvl_top}"}
    if rule is not LayerRule.MVL:  # a control: as many layers as the MVL list, chosen without its ranking
        rows = ranking_rows(run.lsa, run.accuracy, attack=ranking["attack"], eps=ranking["eps"],
                            metric=ranking["metric"], include_output=include_output)[0]
        names = control_layers(rows, rule, k=len(names), seed=seed)
    return names, {**ranking, "layers_from": rule.value, "layers_rule": rule.describe(names)}


def _holding_the_run(fn):
    """Run ``fn(run_dir, ...)`` holding the run's lock (rank 0, which writes into it): no second robaudit may
    write there, or replace the run, until it is done."""
    @functools.wraps(fn)
    def locked(run_dir, *args, **kwargs):
        with write_lock(run_dir, option="--run") if dist.is_main() else contextlib.nullcontext():
            return fn(run_dir, *args, **kwargs)
    return locked


@_holding_the_run
def harden_run(run_dir: str | os.PathLike, config: HardenConfig | None = None, *, mvl_top: int | None = None,
               include_output: bool = False, layers_from: str | LayerRule = LayerRule.MVL,
               train_data: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
               command: str | None = None, download: bool = True, arch: str | None = None,
               trust_model: bool = False, estimate: Callable[[str], None] | None = None,
               **settings: Any) -> HardenRun:
    """Harden the model of an analyzed run directory and write ``RUN/hardened/``.

    Reads the run (model, data set, normalization, attacks, MVL ranking), trains on the data set's
    *train* split with a held-out validation part, saves the hardened model (same format family:
    ``.pt2`` for exported and pickled models, a robaudit checkpoint for checkpoints and state dicts),
    re-analyzes it with the same battery and writes, atomically, ``hardened/`` holding the model, its
    ``lsa.csv``/``accuracy.csv``/``mvl.json``/``manifest.json``, ``history.csv``, ``comparison.csv`` and
    ``harden.json``. A checkpoint ``RUN/harden-checkpoint.pt`` is kept after every epoch until the end.
    ``train_data`` (an .npz file or ``imagefolder:DIR``, decoded with the run's image size and class map) gives
    the training samples of a run whose data set has no train split. The re-analysis reloads the run's samples
    as its manifest records them, streamed batch by batch as the analysis read them.
    ``config`` (or keywords) as for :func:`harden`; its ``seed`` defaults to the analysis seed.
    ``layers_from`` (``mvl``, ``deepest`` or ``random``) says which layers AT-LR regularizes: the MVL list, or a
    control of as many layers from the same candidates, the deepest or drawn with that seed.
    ``estimate`` gets one line after the first epoch: how long the whole hardening will take (:class:`TimeEstimate`).
    """

    rule = LayerRule.of(layers_from)
    cfg = HardenConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    started = now()
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    man = run.manifest
    dest, ck_path = run_dir / HARDENED_DIR, run_dir / CHECKPOINT_NAME
    _check_run_dir(run, dest, ck_path, resume=resume, force=force)
    _check_attacks(run)
    cfg = _run_config(cfg, man)
    layers, ranking = _select_layers(run, mvl_top, include_output, rule, cfg.seed)
    loaded, model_path = _load_run_model(run, arch=arch, trust_model=trust_model)
    # every process refuses a batch too small for them here, at once, not after rank 0 alone read the data first
    global_batch_size(cfg.batch_size, loaded.fixed_batch, [])
    norm = man.get("normalization") or {}
    with dist.main_first():  # a download happens once, in rank 0, while the others wait
        train_set, train_desc = _train_set(man.get("dataset") or {}, train_data, download=download)
        test = load_run_data(man, download=download)  # streamed, as the analysis read it
    loaded = loaded.in_context(device=dist.local_device(resolve_device(cfg.device)), mean=norm.get("mean"),
                               std=norm.get("std"))  # once: training and the re-analysis run in this context
    dev = loaded.device
    _check_trainable(cfg, loaded, train_set)

    fp_extra = {"model_sha256": (man.get("model") or {}).get("sha256"), "train": train_desc}
    result = harden(loaded, train_set, None, cfg, mvl_layers=layers, checkpoint_dir=run_dir, resume=resume,
                    type_map=loaded.type_map, fingerprint_extra=fp_extra, callbacks=_estimate(estimate, man))
    try:
        done = _finish(run, cfg, result, loaded, train_set, test, dev, started=started, command=command,
                       model_path=model_path, train_desc=train_desc, mvl_top=mvl_top, ranking=ranking,
                       include_output=include_output)
    except KeyboardInterrupt:
        raise HardenInterrupted(f"interrupted after training, while analyzing the hardened model; the final "
                                f"checkpoint is in {ck_path}: rerun with --resume to finish") from None
    if dist.is_main() and _is_regular(ck_path):
        with contextlib.suppress(FileNotFoundError):
            ck_path.unlink()
    return done


def _estimate(say: Callable[[str], None] | None, manifest: Mapping) -> list[TimeEstimate]:
    """The time-estimate callback (on rank 0), which counts the re-analysis as long as the run's analysis took."""
    if say is None or not dist.is_main():
        return []
    seconds = manifest.get("seconds")
    return [TimeEstimate(say, after=float(seconds) if isinstance(seconds, (int, float)) else None)]


def _run_config(cfg: HardenConfig, manifest: Mapping) -> HardenConfig:
    """``cfg`` with what it leaves open taken from the run: the training eps (:func:`default_train_eps` of the
    analysis sweep) and the seed (the analysis seed)."""
    if cfg.eps is None:
        eps = default_train_eps(manifest.get("eps") or [])
        if eps is None:
            raise RobauditError("the run has no eps sweep to take the training eps from: pass --eps")
        cfg = dataclasses.replace(cfg, eps=eps)
    if cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=int(manifest.get("seed", 0)))
    return cfg


def run_to_harden(model: str | os.PathLike | None, run_dir: str | os.PathLike | None, *, dataset: str | None,
                  out: str | os.PathLike | None = None, resume: bool = False, device: str = "auto",
                  analysis: Mapping[str, Any] | None = None) -> tuple[Path, list[str]]:
    """The run directory ``robaudit harden`` works on, and lines that say how it was found.

    Under ``torchrun`` every process joins the group here, for the whole command. ``model`` (with ``dataset``)
    is analyzed first (:func:`~robaudit.stages.analyze.analyze_run` with ``analysis``), unless ``resume``
    finds the checkpoint of an interrupted harden in its run directory; otherwise ``run_dir``, or the latest
    run under ``reports/``. With ``resume``, a line says from which epoch training continues.
    """
    from ..rundir import latest_run

    dist.init(resolve_device(device))
    notes: list[str] = []
    if model is not None:
        run_dir = _analyze_first(os.fspath(model), dataset, out=out, resume=resume, device=device, notes=notes,
                                 **(analysis or {}))
    elif run_dir is None:
        run_dir = latest_run("reports")
        notes.append(f"hardening the latest run under reports/: {run_dir}")
    ck = Path(run_dir) / CHECKPOINT_NAME
    if resume and ck.is_file():
        epoch = int(load_checkpoint(ck)["epoch"])
        notes.append(f"resuming from the checkpoint of epoch {epoch} ({ck}): training continues at epoch {epoch + 1}")
    return Path(run_dir), notes


def _analyze_first(model: str, dataset: str, *, out, resume: bool, notes: list[str], **analysis) -> Path:
    """``harden MODEL``: its analysis written first, unless an interrupted harden of that run is resumed."""
    from ..data import DataSource
    from .analyze import analyze_run, default_out

    planned = Path(out) if out else default_out(model, DataSource.parse(dataset))  # named as analyze names it
    if resume and (planned / CHECKPOINT_NAME).is_file():
        notes.append(f"resuming the interrupted harden in {planned}")
        return planned  # the analysis is there already; analyzing again would replace the checkpoint
    done = analyze_run(model, dataset, out=out, report=False, leave_group=False,
                       **analysis)  # training goes on in the same process group
    dist.barrier()  # under torchrun rank 0 wrote the run: the others read it from here on
    notes.append(f"analyzed {model} -> {done.path}")
    return done.path


def _is_regular(path: Path) -> bool:
    """A regular file, never a symlink (``lstat``)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _finish(run, cfg: HardenConfig, result: HardenResult, loaded: LoadedModel, train_set, test, dev, *,
            started: str, command: str | None, model_path: Path, train_desc: str, mvl_top, ranking: Mapping,
            include_output: bool) -> HardenRun:
    """Save the hardened model, reload and re-analyze it, and (rank 0) write ``hardened/`` atomically.

    Under torchrun every process saves, reloads and re-analyzes the model (the analysis may be a collective),
    the others in a private temporary directory that is removed afterwards; only rank 0 writes the run.
    """
    run_dir, dest = run.path, run.path / HARDENED_DIR
    module = result.module.cpu().eval()
    fname, fmt = (("model.pt2", "export") if loaded.format in ("export", "pickle")
                  else (WEIGHTS_FILE, loaded.format) if loaded.source is not None else ("model.pt", "checkpoint"))
    final_model = (dest / fname).resolve()
    main = dist.is_main()
    with (atomic_dir(dest) if main else tempfile.TemporaryDirectory(prefix="robaudit-harden-")) as tmp:
        tmp = Path(tmp)
        hardened = _save_model(tmp / fname, loaded, module, train_set)
        analysis, h_mvl, checks, bn = _reanalyze(run, hardened, test, ranking, dev, workers=cfg.workers,
                                                 samples_path=tmp / "samples.csv" if main else None)
        comparison = comparison_frame(run.accuracy, analysis.accuracy, run.lsa, analysis.lsa,
                                      layers=result.mvl_layers, attack=ranking["attack"], eps=ranking["eps"],
                                      metric=re_column(ranking["metric"]))
        out_settings = result.settings
        if main:
            cmd = command or _api_command(run_dir, cfg.method.value, mvl_top, cfg.eps, cfg.epochs, cfg.seed,
                                          layers_from=ranking.get("layers_from"))
            h_manifest, out_settings = _records(
                run, cfg, result, loaded, hardened, analysis, command=cmd, started=started, dev=dev, fmt=fmt,
                model_file=tmp / fname, final_model=final_model, model_path=model_path, train_desc=train_desc,
                mvl_top=mvl_top, ranking=ranking, include_output=include_output)
            _write_hardened(tmp, analysis, h_mvl, h_manifest, checks, result.history, comparison, out_settings, bn)
    return HardenRun(run_dir=run_dir, hardened_dir=dest, model_path=final_model, result=result, analysis=analysis,
                     comparison=comparison, settings=out_settings)


def _records(run, cfg: HardenConfig, result: HardenResult, loaded: LoadedModel, hardened: LoadedModel, analysis, *,
             command: str, started: str, dev, fmt: str, model_file: Path, final_model: Path, model_path: Path,
             train_desc: str, mvl_top, ranking: Mapping, include_output: bool) -> tuple[dict, dict]:
    """The hardened run's ``manifest.json`` (the original's, updated) and ``harden.json``."""

    man, run_dir = run.manifest, run.path
    h_manifest = copy.deepcopy(man)
    h_manifest.update({
        "command": command, "argv": list(sys.argv),
        "model": {"path": str(final_model), "sha256": sha256_file(model_file), "format": fmt,
                  "arch": loaded.arch if fmt == "checkpoint" else None,
                  "arch_kwargs": loaded.arch_kwargs if fmt == "checkpoint" else {},
                  "trust_model": False, "class": type(hardened.module).__name__,
                  **({"source": {**hardened.source, "weights": str(final_model)}} if hardened.source else {})},
        "n_samples": analysis.n_samples, "clean_accuracy": analysis.clean_accuracy,
        "seconds": round(analysis.seconds, 3), "started": started, "finished": now(),
        "hardened_from": {"run": str(run_dir.resolve()), "model": _shown(model_path),
                          "sha256": (man.get("model") or {}).get("sha256"), "method": cfg.method.value,
                          "layers_from": ranking.get("layers_from", "mvl")},
    })
    out_settings = dict(result.settings)
    out_settings.update({
        "command": command, "run": str(run_dir.resolve()), "mvl_top": mvl_top, "mvl_ranking": ranking,
        "layers_from": ranking.get("layers_from", "mvl"), "layers_rule": ranking.get("layers_rule"),
        "include_output": include_output, "train": train_desc, "device": str(dev),
        "resumed_from_epoch": result.resumed_from_epoch, "notes": result.notes,
        "input_model": {"path": _shown(model_path), "format": loaded.format,
                        "sha256": (man.get("model") or {}).get("sha256")},
        "output_model": {"path": str(final_model), "format": fmt},
        "seconds_training": round(result.seconds, 3), "started": started, "finished": now(),
    })
    return h_manifest, out_settings


def _shown(model_path: Path) -> str:
    """A model file's absolute path; a library spec (``timm:resnet18``) as it is."""
    return str(model_path) if ModelSource.parse(str(model_path)) is not None else str(model_path.resolve())


def _check_run_dir(run, dest: Path, ck_path: Path, *, resume: bool, force: bool) -> None:
    """Refuse, before any work, a run without analysis, an unfinished or earlier harden, or foreign files."""

    if run.lsa.empty:
        raise RobauditError(f"{run.path} holds no layer analysis (lsa.csv is empty): rerun `robaudit analyze`")
    if os.path.lexists(ck_path) and not _is_regular(ck_path):
        raise RobauditError(f"{ck_path} is not a file robaudit wrote (a symbolic link or not a regular file): move "
                            "it out first")
    if ck_path.exists() and not resume and not force:
        raise RobauditError(f"an interrupted harden left {ck_path}: pass --resume to continue it, or --force to "
                            "start over")
    if os.path.lexists(dest) and not force and not resume:
        raise RobauditError(f"{dest} already exists from an earlier harden: pass --force to replace it")
    foreign = [f for f in foreign_entries(run.path) if f == HARDENED_DIR or f.startswith(f"{HARDENED_DIR}/")]
    if foreign:
        raise RobauditError(f"{dest} holds files robaudit did not write ({', '.join(foreign[:3])}): move them out first")
    if resume and not ck_path.exists():
        raise RobauditError(f"no checkpoint to resume in {run.path} ({CHECKPOINT_NAME}): run without --resume")


def _check_attacks(run) -> None:
    """The run's attack specs, which the re-analysis runs again, parsed now: a bad one is the manifest's fault,
    said before training, not blamed on an option the user never passed."""
    where = run.path / "manifest.json"
    for i, spec in enumerate(run.manifest.get("attacks") or []):
        try:
            atk.parse(spec)
        except RobauditError as e:
            raise RobauditError(f"{where}: attacks[{i}] {spec[:60]!r} is not an attack robaudit runs ({e}): rerun "
                                "robaudit analyze") from None


def _load_run_model(run, *, arch: str | None, trust_model: bool) -> tuple[LoadedModel, Path]:
    """The run's model file, unchanged since the analysis (sha256), loaded as the manifest says."""

    mm = run.manifest.get("model") or {}
    if mm.get("source") is not None:
        return _load_run_source(run, mm, trust_model=trust_model)
    model_path = Path(mm.get("path") or "")
    if not mm.get("path") or not model_path.is_file():
        raise RobauditError(f"the run's model file {mm.get('path')} is gone: restore it, or analyze again")
    if mm.get("sha256") and sha256_file(model_path) != mm["sha256"]:
        raise RobauditError(f"{model_path} changed since the analysis (sha256 differs): analyze it again first")
    # the manifest is a file like any other: its architecture is checked as a checkpoint's would be, and
    # only this command's --trust-model (never the manifest's record of an earlier one) lets code run
    if arch is None and mm.get("arch"):
        arch = check_stored_arch(mm["arch"], run.path / "manifest.json", trust_model=trust_model)
    loaded = load_model(model_path, arch=arch, arch_kwargs=mm.get("arch_kwargs") or None, trust_model=trust_model)
    return loaded, model_path


def _load_run_source(run, mm: Mapping, *, trust_model: bool) -> tuple[LoadedModel, Path]:
    """The run's library model built again as its manifest records it; its weights (the file's sha256, or the
    built state's for weights the library fetched) unchanged since the analysis."""
    record = mm["source"]
    if not isinstance(record, Mapping):
        raise RobauditError(f"{run.path / 'manifest.json'}: model.source is not a JSON object: analyze again")
    path = Path(mm["path"]) if mm.get("path") else None
    if path is not None and not path.is_file():
        raise RobauditError(f"the run's weights file {path} is gone: restore it, or analyze again")
    if path is not None and mm.get("sha256") and sha256_file(path) != mm["sha256"]:
        raise RobauditError(f"{path} changed since the analysis (sha256 differs): analyze it again first")
    num_classes = int((run.manifest.get("dataset") or {}).get("num_classes") or 0)
    loaded = reload_recorded(record, num_classes=num_classes, trust_model=trust_model)
    if path is None and mm.get("sha256") and state_digest(loaded.module) != mm["sha256"]:
        raise RobauditError(f"{record.get('spec')}'s weights differ from the analysis' (the library's download "
                            "changed): analyze it again first")
    return loaded, path or Path(str(record.get("spec")))


def _train_set(record: Mapping, train_data, *, download: bool):
    """The training data and its description: ``train_data`` (an .npz file or ``imagefolder:DIR``), or the train
    split of the run's built-in data set (``record``: the manifest's); streamed when it is on disk (training reads
    it batch by batch), in memory for moons and digits."""
    if train_data is not None and str(train_data).startswith(IMAGEFOLDER_PREFIX):
        return _train_folder(record, str(train_data), download=download), str(train_data)
    if train_data is not None:
        return load_dataset(str(train_data), split="train", data_dir=record.get("data_dir"), download=download,
                            stream=True), str(train_data)
    if record.get("name") in DATASETS:
        return load_dataset(record["name"], split="train", data_dir=record.get("data_dir"), download=download,
                            stream=True), f"{record['name']} train split"
    what = "an image folder" if is_image_folder_record(record) else "a file"
    raise RobauditError(f"the run's data set {record.get('name')!r} is {what} with no train split: pass --train-data "
                        "FILE.npz or --train-data imagefolder:DIR with training samples")


def _train_folder(record: Mapping, train_data: str, *, download: bool):
    """A train image folder decoded as the run's images were (its image size and class map), so that train and
    test images have one size and one label per class; without a class map its class folders must be the run's."""
    train = load_dataset(train_data, split="train", image_size=record.get("image_size"),
                         class_map=record.get("class_map"), download=download, stream=True)
    if is_image_folder_record(record) and record.get("class_map") is None:
        root = Path(train_data[len(IMAGEFOLDER_PREFIX):]).expanduser()
        ours, theirs = set(class_folders(root)), set(class_folders(Path(str(record.get("source")))))
        if ours != theirs:
            differ = "; ".join(filter(None, [_names("only in the train folder", ours - theirs),
                                             _names("only in the run's", theirs - ours)]))
            raise RobauditError(f"the class folders of {root} are not those of the run's folder {record.get('source')} "
                                f"({differ}): give the train folder the same class folders, which set the labels")
    return train


def _names(what: str, names: set[str], *, shown: int = 3) -> str:
    """``what: a, b, c and 4 more``, the first ``shown`` names in sorted order; empty without names."""
    if not names:
        return ""
    first = sorted(names)[:shown]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{what}: {', '.join(first)}{more}"


def _check_trainable(cfg: HardenConfig, loaded: LoadedModel, train_set) -> None:
    """Fail before training on what would fail after it: dual BN without BN, a pickle that cannot be saved."""
    if cfg.dual_bn and loaded.format != "export" and not batchnorm_modules(loaded.module):
        raise RobauditError("--dual-bn needs a model with BatchNorm layers; this one has none: drop --dual-bn")
    if loaded.format == "pickle":  # it must be exportable to be saved without pickles
        try:
            first = train_set.head(2)[0]
            ex = with_normalization(copy.deepcopy(loaded.module), None, None, ndim=first.dim())
            export_dynamic_batch(ex, first)
        except Exception as e:
            raise RobauditError(f"the pickled model cannot be saved as a torch.export archive ({type(e).__name__}); "
                                "harden a checkpoint with an architecture instead") from e


def _save_model(path: Path, loaded: LoadedModel, module: nn.Module, train_set) -> LoadedModel:
    """Save the hardened module in the input's format family and load it back as any user would."""

    if loaded.source is not None:  # a library model: its weights, built again from the same record
        save_weights(path, module)
        return reload_recorded(loaded.source, num_classes=train_set.num_classes, trust_model=False, weights=path)
    if loaded.format == "export":
        save_exported_weights(path, loaded, module)
    elif loaded.format == "pickle":
        export_model(path, module, train_set.head(2)[0])
    else:
        save_checkpoint(path, module, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs)
    return load_model(path)


def _reanalyze(run, hardened: LoadedModel, test, ranking: Mapping, dev, *, samples_path: Path | None = None,
               workers: int = 0):
    """The hardened model analyzed (and checked) as the run was, with its samples.csv and (with BatchNorm) its
    BatchNorm audit; its MVL ranked under the same criterion."""

    man = run.manifest
    norm, layer_spec, eps_list = man.get("normalization") or {}, man.get("layers") or {}, man.get("eps") or []
    hardened = hardened.in_context(device=dev, mean=norm.get("mean"), std=norm.get("std"))
    analysis, plan = analyze_for_run(
        hardened, test, attacks=man.get("attacks") or None, eps=eps_list or None, layers=layer_spec.get("patterns"),
        layer_types=layer_spec.get("types"), probe=layer_spec.get("probe") or "all",
        batch_size=int(man.get("batch_size", 128)), seed=int(man.get("seed", 0)),
        checks=run.checks is not None, samples_path=samples_path, workers=workers)
    k, z = (run.mvl or {}).get("k"), (run.mvl or {}).get("z")
    try:
        h_mvl = select_mvl(analysis.lsa, analysis.accuracy, k=None if z is not None else k, z=z,
                           attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"],
                           include_output=bool((man.get("mvl") or {}).get("include_output")))
    except RobauditError:
        h_mvl = analysis.mvl(attack=ranking["attack"], eps=ranking["eps"], metric=ranking["metric"])
    bn = batchnorm_audit(hardened, test, analysis, h_mvl, seed=int(man.get("seed", 0)),
                         batch_size=int(man.get("batch_size", 128)), distributed=True)
    dist.shutdown()  # under torchrun the last collective is done: the processes meet and leave the group
    checks = model_checks(hardened, test, analysis, plan, seed=int(man.get("seed", 0))) if dist.is_main() else None
    return analysis, h_mvl, checks, bn


def _write_hardened(tmp: Path, analysis, h_mvl, manifest: dict, checks, history: pd.DataFrame,
                    comparison: pd.DataFrame, settings: dict, bn: pd.DataFrame | None = None) -> None:
    """The run files of the hardened model plus ``history.csv``, ``comparison.csv`` and ``harden.json``."""

    write_csv(tmp / "history.csv", history)
    write_csv(tmp / "comparison.csv", comparison)
    write_json(tmp / "harden.json", settings)
    samples = tmp / "samples.csv"
    fill_run(tmp, analysis, h_mvl, manifest, checks,  # sealed last
             tables=run_tables(analysis, bn, samples if samples.is_file() else None))


def _api_command(run_dir: Path, method: str, mvl_top, eps: float, epochs: int, seed: int,
                 layers_from: str | None = None) -> str:

    return command_line("harden", run=run_dir, method=method, mvl_top=mvl_top, eps=format_eps(eps), epochs=epochs,
                       seed=seed, layers_from=None if layers_from in (None, "mvl") else layers_from)
