"""The ``analyze`` stage end to end: load model and data, run LSA, write the run directory.

This is what ``robaudit analyze`` calls; researchers can call :func:`analyze_run` directly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import pandas as pd
import torch

from .. import __version__
from .. import attacks as atk
from .. import dist
from ..batteries import CUSTOM, BatteryName, battery as battery_specs, check_standard
from ..cmdline import command_line
from ..labels import format_eps
from ..data import DataSource, load_dataset
from ..errors import RobauditError
from ..device import resolve_device
from ..fragile import FRAGILE_FILE, fragile_images, is_image_shape
from ..lsa import MVL, LSAResult, analyze
from ..models import LoadedModel
from ..sources import ModelSource, SourceOptions, load_any, source_flags
from ..rundir import usable_output_dir, staging_file, write_run
from ..writelock import write_lock

if TYPE_CHECKING:
    from ..model_checks import ModelCheckPlan

log = logging.getLogger(__name__)


@dataclass
class AnalysisRun:
    """The outcome of :func:`analyze_run`: the result, its MVL list and where it was written."""

    result: LSAResult
    mvl: MVL
    path: Path
    manifest: dict
    checks: dict | None


def default_out(model: str | Path | None, source: DataSource, root: str | Path = "reports") -> Path:
    """Where a run of ``model`` (a file or a library model's spec) on ``source`` goes without --out:
    ``reports/<model>-<data set>`` (``timm-resnet18-cifar10``), named after the data set as the run records it,
    so that a later command finds the run from the same options."""
    library = ModelSource.parse(model) if model is not None else None
    stem = library.stem if library is not None else Path(model).stem if model is not None else "model"
    return Path(root) / f"{stem}-{source.name}"


def now() -> str:
    """The current UTC time as the manifests record it (ISO 8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def plan_run_checks(attacks, eps, data, *, batch_size: int):
    """How many leading samples the model checks of this run afford, and which battery outcomes they reuse."""
    from ..model_checks import plan_model_checks

    return plan_model_checks(atk.expand(list(attacks) if attacks else battery_specs(BatteryName.DEFAULT, eps), eps),
                             n_battery=len(data.y), num_classes=data.num_classes, batch_size=batch_size)


def analyze_for_run(loaded: LoadedModel, data, *, attacks, eps, layers=None, layer_types=None,
                    probe: str = "all", batch_size: int = 128, seed: int = 0, progress: bool = False,
                    checks: bool = True, workers: int = 0,
                    samples_path: Path | None = None) -> tuple[LSAResult, ModelCheckPlan | None]:
    """The layer analysis of a run directory, keeping the outcomes that the model checks (``checks``) reuse,
    and the plan that sizes those checks; ``samples_path`` streams ``samples.csv`` there. ``loaded`` carries
    its context (:meth:`LoadedModel.in_context`: device and normalization).

    Under ``torchrun`` every process runs its share. The checks themselves (:func:`model_checks`) run on
    rank 0 alone, after the stage's last collective (the BatchNorm audit), once the others have left: no
    process then waits on rank 0's solo work inside a collective, which has a timeout."""
    plan = plan_run_checks(attacks, eps, data, batch_size=batch_size) if checks else None
    result = analyze(loaded, data, attacks=attacks, eps=eps, layers=layers, layer_types=layer_types, probe=probe,
                     mean=loaded.mean, std=loaded.std, batch_size=batch_size, device=loaded.device, seed=seed,
                     progress=progress, keep_outcomes=plan.n_samples if plan else 0, workers=workers,
                     samples_path=samples_path)
    return result, plan


def batchnorm_audit(loaded: LoadedModel, data, result: LSAResult, mvl: MVL, *, seed: int, batch_size: int,
                    distributed: bool = False):
    """bn.csv: clean vs adversarial BatchNorm statistics under the ranking attack; None without BatchNorm.

    An adversarial ranking configuration's statistics were taken in the analysis' own passes (no attack runs
    again); otherwise the configuration runs again with the analysis' draws (``distributed``: every process of
    torchrun calls this and takes its share of the batches)."""
    from .. import bnaudit

    spec = bnaudit.ranking_spec(result.attacks, mvl.attack, mvl.eps)
    if spec is None or not bnaudit.batchnorm_layers(loaded.module, loaded.type_map):
        return None
    config = result.attacks.index(spec)
    if result.bn_moments is not None and spec.kind == "adversarial":  # measured in the analysis' own passes
        return result.bn_moments.table(config, loaded.module)
    full = loaded.normalized(ndim=len(data.input_shape) + 1)
    return bnaudit.audit_batchnorm(full, loaded.module, data, attack=spec, num_classes=data.num_classes,
                                   type_map=loaded.type_map, batch_size=batch_size, device=loaded.device,
                                   seed=seed, config=config, distributed=distributed)


def analyze_run(model: str | Path | LoadedModel, dataset: str, *, out: str | Path | None = None,
                arch: str | None = None, arch_kwargs: dict | None = None, trust_model: bool = False,
                data_dir: str | Path | None = None, split: str = "test", samples: int | None = None,
                shuffle: bool = False, download: bool = True, image_size: int | None = None,
                class_map: str | Path | None = None, workers: int = 0, attacks: Sequence[str] | None = None,
                battery: BatteryName | str | None = None, eps: Sequence[float] | None = None,
                layers: Sequence[str] | None = None, layer_types: Sequence[str] | None = None, probe: str = "all",
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, normalize: bool = True,
                mvl_top: int | None = None, mvl_z: float | None = None, mvl_attack: str | None = None,
                mvl_metric: str = "re_mean", include_output: bool = False, batch_size: int = 128, device: str = "auto",
                seed: int = 0, checks: bool = True, report: bool = True, progress: bool = False, force: bool = False,
                command: str | None = None, leave_group: bool = True, source_options: SourceOptions | None = None
                ) -> AnalysisRun | None:
    """Analyze a model (a file, or a library spec built with ``source_options``) and write its run directory.

    An existing ``out`` must be an earlier robaudit run, replaced only with ``force``. Under ``torchrun`` every
    process analyzes its share, then rank 0 alone runs the checks, writes the run and returns it (the others
    ``None``; with ``leave_group=False``, as ``harden MODEL`` goes on with the group, the analysis without checks).
    An error on any process stops all. ``battery`` (default: DEFAULT) names the attacks unless ``attacks`` does."""
    started, dev = now(), resolve_device(device)
    dist.init(dev)
    with contextlib.ExitStack() as held:  # rank 0 holds the output's lock from its check to the final rename
        with dist.together():  # a failure here on any process (a missing file, say) stops every process
            loaded, data, out, mean, std, eps, specs, battery = _setup(
                model, dataset, out=out, arch=arch, arch_kwargs=arch_kwargs, trust_model=trust_model,
                data_dir=data_dir, split=split, samples=samples, shuffle=shuffle, download=download,
                image_size=image_size, class_map=class_map, attacks=attacks, battery=battery, eps=eps, mean=mean,
                std=std, normalize=normalize, mvl_top=mvl_top, mvl_z=mvl_z, seed=seed, force=force, held=held,
                source_options=source_options)
        samples_csv = staging_file(out) if dist.is_main() else None  # removed if anything below fails
        try:
            loaded = loaded.in_context(device=dist.local_device(dev), mean=mean, std=std)  # once, for every step
            result, plan = analyze_for_run(
                loaded, data, attacks=specs, eps=eps, layers=layers, layer_types=layer_types, probe=probe,
                batch_size=batch_size, seed=seed, progress=progress, checks=checks, workers=workers,
                samples_path=samples_csv)
            # every process: the MVL list names the attack that the BatchNorm audit, shared by all, runs again
            mvl = result.mvl(mvl_top, z=mvl_z, attack=mvl_attack, metric=mvl_metric, include_output=include_output)
            bn = batchnorm_audit(loaded, data, result, mvl, seed=seed, batch_size=batch_size, distributed=True)
            if leave_group:  # the last collective is done: the processes meet and leave the group
                dist.shutdown()
            if not dist.is_main():  # the rest is rank 0's alone: the others are done
                return None if leave_group else AnalysisRun(result, mvl, out, {}, None)
            check_results, images = _solo_work(loaded, data, result, plan, samples_csv, seed=seed,
                                               batch_size=batch_size)
            manifest = _manifest(
                loaded, data, result, command=command or _api_command(
                    loaded, dataset, attacks, eps, seed, out, image_size=image_size, class_map=class_map,
                    samples=samples, shuffle=shuffle, battery=battery),
                trust_model=trust_model, mean=mean, std=std, split=split, samples=samples, shuffle=shuffle,
                data_dir=data_dir, seed=seed, dev=dev, batch_size=batch_size, specs=specs, eps=eps, layers=layers,
                layer_types=layer_types, probe=probe, started=started, image_size=image_size, class_map=class_map,
                battery=battery.value if battery else CUSTOM,
                mvl={"top": mvl.k if mvl_z is None else mvl_top,  # select_mvl's default when none was given
                     "z": mvl_z, "attack": mvl_attack, "metric": mvl_metric, "include_output": include_output})
            return _write(out, result, mvl, check_results, bn, samples_csv, force=force, report=report,
                          manifest=manifest, images=images)
        finally:
            if samples_csv is not None:
                samples_csv.unlink(missing_ok=True)  # moved into the run, unless something failed


def _setup(model, dataset: str, *, out, arch, arch_kwargs, trust_model, data_dir, split, samples, shuffle, download,
           image_size, class_map, attacks, battery, eps, mean, std, normalize, mvl_top, mvl_z, seed, force,
           held: contextlib.ExitStack, source_options: SourceOptions | None = None):
    """Check the options and the output (and take its lock into ``held``), load the model and the data:
    everything before the analysis; the battery is None when ``attacks`` names the attacks."""
    if out is not None and dist.is_main():
        _claim_output(out, force=force, held=held)  # before minutes of analysis, not after
    _check_mvl_options(mvl_top, mvl_z)
    specs = [atk.parse(a) for a in attacks] if attacks else None
    if specs and battery is not None:
        raise RobauditError("give either --battery or --attack: --attack names every attack to run")
    battery = None if specs else BatteryName.of(battery or BatteryName.DEFAULT)
    model_source = None if isinstance(model, LoadedModel) else ModelSource.parse(model)
    if model_source is None and not isinstance(model, LoadedModel):
        loaded = load_any(model, num_classes=0, arch=arch, arch_kwargs=arch_kwargs, trust_model=trust_model,
                          options=source_options)  # a file: checked before the data set is read
    source = DataSource.parse(dataset, image_size=image_size, class_map=class_map)
    data = load_dataset(source, split=split, samples=samples, shuffle=shuffle, seed=seed, data_dir=data_dir,
                        download=download, stream=True)  # every on-disk format streams; moons and digits are small
    if isinstance(model, LoadedModel):
        loaded = model
    elif model_source is not None:  # a library model is built for the data set's classes
        with dist.main_first():  # a download or a hub cache fill happens once, in rank 0
            loaded = load_any(model, num_classes=data.num_classes, arch=arch, arch_kwargs=arch_kwargs,
                              trust_model=trust_model, options=source_options, example=data.head(8)[0],
                              dataset=data.name)
    out = Path(out) if out else default_out(loaded.source["spec"] if loaded.source else loaded.path, source)
    if dist.is_main():  # the other processes never look at the output
        _claim_output(out, force=force, held=held)
    mean, std = _normalization(data, normalize=normalize, mean=mean, std=std, loaded=loaded)
    _check_channels(mean, data, loaded)
    norm = loaded.input_norm
    if norm is not None and (mean, std) != (norm.mean, norm.std):  # the manifest names the origin it used
        loaded = dataclasses.replace(loaded, input_norm=None)
    eps = list(eps) if eps else list(data.default_eps)
    if battery is BatteryName.STANDARD:
        check_standard(data.num_classes, data.input_shape)
    specs = specs or battery_specs(battery, eps)
    return loaded, data, out, mean, std, eps, specs, battery


def _claim_output(out, *, force: bool, held: contextlib.ExitStack) -> None:
    """Check the output, lock it against a second robaudit writing there, and check it again under the lock."""
    usable_output_dir(out, force=force)
    held.enter_context(write_lock(out))
    usable_output_dir(out, force=force)


def _check_mvl_options(mvl_top: int | None, mvl_z: float | None) -> None:
    """Refuse an MVL criterion that cannot select, before the analysis."""
    if mvl_top is not None and mvl_top < 1:
        raise RobauditError("--mvl-top must be at least 1")
    if mvl_z is not None and not math.isfinite(mvl_z):
        raise RobauditError(f"--mvl-z must be a finite number of standard deviations, got {mvl_z}")


def _normalization(data, *, normalize: bool, mean, std, loaded: LoadedModel | None = None) -> tuple:
    """The input normalization: the given one; with ``normalize`` and none given, the one the model's library
    says (timm's config, torchvision's transforms; none for RobustBench), else the data set's; or none."""
    if normalize and mean is None and std is None:
        norm = loaded.input_norm if loaded is not None else None
        if norm is not None:
            log.info("input normalization from %s: mean %s, std %s (--mean/--std or --no-normalize override it)",
                     norm.origin, norm.mean, norm.std)
            return norm.mean, norm.std
        return data.mean, data.std
    return (mean, std) if normalize else (None, None)


def _write(out: Path, result: LSAResult, mvl: MVL, check_results, bn, samples_csv: Path, *, force: bool,
           report: bool, manifest: dict, images: dict | None = None) -> AnalysisRun:
    """Write the run directory (with ``images``, the most fragile samples' ``fragile.json``), with its report
    rendered before the run is renamed into place."""
    finish = None
    if report:
        from .report import render_report

        def finish(staging: Path) -> None:
            render_report(staging, name=out)
    streamed = _written(samples_csv)
    write_run(out, result, mvl, manifest, check_results, force=force, finish=finish,
              tables=run_tables(result, bn, samples_csv if streamed else None),
              files={"samples.csv": samples_csv} if streamed else None,
              documents={FRAGILE_FILE: images} if images is not None else None)
    return AnalysisRun(result, mvl, out, manifest, check_results)


def run_tables(result: LSAResult, bn, samples_csv: Path | None) -> dict:
    """The optional tables of a run besides lsa.csv and accuracy.csv: ``bn.csv`` (a model with BatchNorm) and
    ``classes.csv`` (accuracy per class, from the ``samples.csv`` the analysis streamed)."""
    from ..classes import class_table

    tables = {"bn.csv": bn} if bn is not None else {}
    classes = class_table(samples_csv, result.accuracy) if samples_csv is not None else None
    if classes is not None:
        tables["classes.csv"] = classes
    return tables


def _check_channels(mean, data, loaded: LoadedModel) -> None:
    """A normalization has one value per input channel (or one for all): broadcasting 3 values over a 1-channel
    image would feed the model a 3-channel one without a word."""
    channels = int(data.input_shape[0]) if data.input_shape else 1
    if mean is None or len(mean) in (1, channels):
        return
    norm = loaded.input_norm
    where = (f"{norm.origin} gives" if norm is not None and tuple(mean) == norm.mean
             else "--mean/--std (or the data set's usual normalization) give")
    raise RobauditError(f"{where} {len(mean)} normalization values and the data has {channels} channel(s): pass "
                        f"--mean/--std with {channels} value(s), or --no-normalize")


def _written(path: Path) -> bool:
    """Whether the analysis wrote into its staging file (a regular file, not empty)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return info.st_size > 0 and not path.is_symlink() and path.is_file()


def _manifest(loaded: LoadedModel, data, result: LSAResult, *, command: str, trust_model: bool, mean, std, split,
              samples, shuffle, data_dir, seed: int, dev, batch_size: int, specs, eps, layers, layer_types, probe,
              started: str, mvl: dict, image_size: int | None = None, class_map=None, battery: str = CUSTOM) -> dict:
    """``manifest.json`` of an analysis: how to reproduce it and what it ran on."""
    return {
        "robaudit_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "command": command,
        "argv": list(sys.argv),
        "model": {
            "path": str(loaded.path.resolve()) if loaded.path else None,
            "sha256": loaded.sha256,
            "format": loaded.format,
            "arch": loaded.arch,
            "arch_kwargs": loaded.arch_kwargs,
            "trust_model": bool(trust_model),
            "class": type(loaded.module).__name__,
            **({"source": loaded.source} if loaded.source is not None else {}),
        },
        "normalization": {"mean": list(mean) if mean is not None else None,
                          "std": list(std) if std is not None else None,
                          **({"origin": loaded.input_norm.origin} if loaded.input_norm is not None else {})},
        "dataset": {"name": data.name, "split": split, "samples": samples, "shuffle": shuffle,
                    "data_dir": str(data_dir) if data_dir else None, "source": data.source,
                    "num_classes": data.num_classes, "input_shape": list(data.input_shape),
                    **({"image_size": image_size} if image_size is not None else {}),
                    **({"class_map": str(Path(class_map).resolve())} if class_map is not None else {})},
        "n_samples": result.n_samples,
        "seed": seed,
        "device": str(dev),
        "batch_size": batch_size,
        "battery": battery,
        "attacks": [s.spec_string() for s in specs],
        "configurations": [s.spec_string() for s in result.attacks],
        "eps": eps,
        "layers": {"patterns": list(layers) if layers else None, "types": list(layer_types) if layer_types else None,
                   "probe": probe},
        "num_layers": len(result.layers),
        "unprobed_layers": dict(result.unprobed),  # left out: their output holds no per-sample activation
        "folded_layers": dict(result.folded),  # read per sample from rows folded into the batch: rows per sample
        "mvl": mvl,
        "clean_accuracy": result.clean_accuracy,
        "seconds": round(result.seconds, 3),
        "started": started,
        "finished": now(),
    }


def load_run_data(manifest: Mapping, *, stream: bool = True, download: bool = True):
    """The samples a run analyzed, loaded again by the call its manifest records (same split, samples and order;
    an image folder with its image size and class map); ``stream`` reads every on-disk format batch by batch,
    as the analysis did, with the same values."""
    record = manifest.get("dataset") or {}
    return load_dataset(DataSource.of_record(record), split=record.get("split") or "test",
                        samples=record.get("samples"), shuffle=bool(record.get("shuffle")),
                        seed=int(manifest.get("seed", 0)), data_dir=record.get("data_dir"), download=download,
                        stream=stream)


def model_checks(loaded: LoadedModel, data, result: LSAResult, plan: ModelCheckPlan | None, *,
                 seed: int) -> dict | None:
    """The model checks AutoAttack runs before attacking, plus gradient-masking probes (model_checks module),
    on as many leading samples as ``plan`` affords, reusing the battery's outcomes there; None without a plan."""
    from ..model_checks import run_model_checks

    if plan is None:
        return None
    dev = loaded.device
    info = {"plan": plan.to_dict(), "battery_seconds": round(result.seconds, 3), "battery_pairs": result.pairs}
    if plan.n_samples < 1:
        return {"n_samples": 0, "seed": int(seed), "device": str(dev), **info,
                "skipped": f"the battery is too cheap to pay for model checks within {100 * plan.share:.0f} % of its cost"}
    full = loaded.normalized(ndim=len(data.input_shape) + 1)
    x, y = data.head(plan.n_samples) if hasattr(data, "head") else (data.x, data.y)
    reuse = {key: result.outcomes[i] for key, i in plan.reuse.items()}
    out = run_model_checks(full, x, y, device=dev, seed=seed, eps_max=plan.eps_max,
                           max_samples=plan.n_samples, reuse=reuse, attacks=plan.attacks)
    return {**out, **info}


def _solo_work(loaded: LoadedModel, data, result: LSAResult, plan: ModelCheckPlan | None, samples_csv: Path | None,
               *, seed: int, batch_size: int) -> tuple[dict | None, dict | None]:
    """Rank 0's work after the last collective: the model checks, and the images of the most fragile samples
    (attacked again with the battery's draws: :mod:`robaudit.fragile`), None for data that are not images."""
    checks = model_checks(loaded, data, result, plan, seed=seed)
    samples = None
    if samples_csv is not None and _written(samples_csv) and is_image_shape(tuple(data.input_shape)):
        samples = pd.read_csv(samples_csv, usecols=lambda c: c in ("index", "label", "clean_correct")
                              or c.endswith(":correct"))  # the analysis' own file, just written
    return checks, fragile_images(loaded, data, result.attacks, samples, batch_size=batch_size, seed=seed)


def _api_command(loaded: LoadedModel, dataset: str, attacks, eps, seed: int, out: Path, *,
                 image_size: int | None = None, class_map=None, samples: int | None = None,
                 shuffle: bool = False, battery: BatteryName | None = None) -> str:
    """The ``robaudit analyze`` command line equivalent to an :func:`analyze_run` call."""
    model = loaded.source["spec"] if loaded.source else str(loaded.path) if loaded.path else "MODEL"
    return command_line("analyze", model, **source_flags(loaded.source), dataset=dataset,
                        image_size=image_size, class_map=class_map, samples=samples, shuffle=shuffle,
                        attack=list(attacks or []),
                        battery=battery.value if battery not in (None, BatteryName.DEFAULT) else None,
                        eps=",".join(format_eps(e) for e in eps) if eps else None, seed=seed, out=out)
