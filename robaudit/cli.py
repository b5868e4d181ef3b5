"""The ``robaudit`` command: a thin click layer over the Python API.

Every user-facing failure becomes one line on stderr and a non-zero exit; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import click

from . import dist, limits, tables
from .cmdline import invoked_command
from .errors import RobauditError
from .gate import EXIT_MISSED, GateOn
from .batteries import BatteryName
from .sources.spec import THREAT_MODELS, SourceOptions
from .training.config import BaseAttack, HardenConfig, Method, Optimizer, ReMode, Schedule
from .lsa import MVL_METRICS
from .training.layers import LayerRule
from .training.loop import HardenInterrupted

EXIT_USER = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
SEED_MAX = limits.SEED_MAX  # numpy's and torch's generators both take it


def _finished(error: BaseException) -> bool:
    """Whether ``error`` ends a command that ran to its end: a normal exit, or a missed bar's."""
    return isinstance(error, click.exceptions.Exit) and error.exit_code in (0, EXIT_MISSED)


class _Group(click.Group):
    """A click group that turns exceptions into one-line messages unless ``--debug`` is on.

    Under ``torchrun`` each process that fails says so in one line, tagged with its rank. An error that
    reached rank 0 through :func:`robaudit.dist.exchange` is said once, by rank 0, naming the process it
    came from; the other processes exit with the same status, silently. The process group is left at the
    end (:func:`robaudit.dist.lifetime`).
    """

    def invoke(self, ctx: click.Context):
        try:
            with dist.lifetime(finished=_finished):
                return self._invoke(ctx)
        except dist.GroupBroken as e:  # another process failed first: its own message says why
            if _debug(ctx):
                raise
            _echo(f"error{dist.process_tag()}: {e}", err=True)
            ctx.exit(EXIT_INTERNAL)

    def _invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # output piped into e.g. `head`: nothing left to say
            sys.stderr.close()
            ctx.exit(EXIT_INTERNAL)
        except (KeyboardInterrupt, HardenInterrupted) as e:
            if _debug(ctx):
                raise
            _echo(f"interrupted{dist.process_tag()}: {e}" if isinstance(e, HardenInterrupted)
                  else "interrupted: nothing half-written was left behind", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except RobauditError as e:
            if _debug(ctx):
                raise
            if not dist.reported_by_main(e):
                _echo(f"error{dist.process_tag()}: {e}", err=True)
            ctx.exit(getattr(e, "exit_code", EXIT_USER))
        except Exception as e:  # a bug, not the user's fault: still one line, with the way to learn more
            if _debug(ctx):
                raise
            if not dist.reported_by_main(e):
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _echo(f"error{dist.process_tag()}: unexpected {type(e).__name__}: {first[:300]} (rerun with --debug "
                      "for the traceback)", err=True)
            ctx.exit(EXIT_INTERNAL)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) if root is not None else False


def _echo(text="", *, err: bool = False) -> None:
    """``click.echo`` of a line made printable (:func:`robaudit.tables.terminal_line`)."""
    click.echo(tables.terminal_line(text), err=err)


def _echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        _echo(line)


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    from .attacks import parse_number

    try:
        return [parse_number(p) for p in text.split(",") if p.strip()]
    except RobauditError as e:
        raise RobauditError(f"{option}: {e}") from e


def _mean_std(mean: str | None, std: str | None) -> tuple[list[float] | None, list[float] | None]:
    """--mean and --std as numbers within :func:`robaudit.limits.mean_std`'s range (finite; std positive)."""
    values = _floats(mean, "--mean"), _floats(std, "--std")
    limits.mean_std(*values)
    return values


def _image_size(ctx, param, value) -> int | None:
    """--image-size as a whole number of pixels within limits (checked while the options are read)."""
    return limits.image_size(value)


def _threads(ctx, param, value) -> int | None:
    """--threads as a whole number within limits (checked while the options are read)."""
    return None if value is None else limits.threads(value)


def threads_option(f):
    """--threads N: torch's CPU threads for the whole command, set once where it starts (analyze, harden)."""
    return click.option("--threads", metavar="N", callback=_threads,
                        help="CPU threads torch uses (default: one per core). On a machine busy with other jobs, "
                             "1 or 2 can be several times faster.")(f)


def _use_threads(threads: int | None) -> None:
    if threads is not None:
        from .threads import use_threads

        use_threads(threads)


def _split_list(values) -> list[str] | None:
    out = [p.strip() for v in values or () for p in v.split(",") if p.strip()]
    return out or None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.version_option(package_name="robaudit", prog_name="robaudit")
def main(debug: bool, verbose: int) -> None:
    """Audit a PyTorch classifier's robustness layer by layer.

    \b
      robaudit analyze MODEL --dataset digits   # LSA -> Most Vulnerable Layers
      robaudit harden --mvl-top 5               # AT-LR on those layers, re-analyzed
      robaudit report                           # one self-contained HTML file
    """
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        warnings.simplefilter("ignore", FutureWarning)
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    if not dist.is_main():  # rank 0 alone speaks for a torchrun group
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)


def _apply(f, options: list):
    """``f`` decorated with ``options`` in the order they are listed (the first shows first in --help)."""
    for opt in reversed(options):
        f = opt(f)
    return f


def model_options(f):
    """Options that say how to load a model file (shared by analyze and harden)."""
    return _apply(f, [
        click.option("--arch", help="Architecture for a state dict: 'package.module:Class' or 'file.py:Class'."),
        click.option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"width\": 32}'."),
        click.option("--trust-model", is_flag=True,
                     help="Run code from the model file: unpickle a module, load a .pt2 without inspecting it, "
                          "import a .py architecture a checkpoint names, run a hub model's own code. Only for "
                          "files whose source you trust."),
        click.option("--weights", "source_weights", type=click.Path(dir_okay=False, path_type=Path),
                     help="Library models (timm:, torchvision:, hf:): the weights, .safetensors or a state dict."),
        click.option("--pretrained", "source_pretrained", is_flag=False, flag_value="DEFAULT", metavar="[NAME]",
                     help="Library models: the library's own published weights (downloaded); torchvision takes a "
                          "weights name such as IMAGENET1K_V1."),
        click.option("--num-classes", "source_classes", type=click.IntRange(1, limits.CLASSES_MAX),
                     help="Library models: the classifier's class count (default: the data set's)."),
        click.option("--model-dir", "source_model_dir", type=click.Path(file_okay=False, path_type=Path),
                     default=Path("models"), show_default=True,
                     help="robustbench: where its checkpoints are; hf:ORG/NAME: downloaded to MODEL_DIR/hf/ORG/NAME."),
        click.option("--threat-model", "source_threat", type=click.Choice(list(THREAT_MODELS)), default="Linf",
                     show_default=True, help="robustbench: the leaderboard the model is from."),
        click.option("--force-convert", "source_force", is_flag=True,
                     help="model.onnx: keep a conversion whose logits differ from onnxruntime's."),
    ])


def _source_options(extra: dict, *, download: bool, trust_model: bool, of_run: bool = False) -> SourceOptions:
    """The library-model options of ``extra`` (the command's keyword arguments), checked once; ``of_run``: the
    command works on a run, which rebuilds its model as its analysis recorded it."""
    options = SourceOptions(weights=extra.pop("source_weights"), pretrained=extra.pop("source_pretrained"),
                            num_classes=extra.pop("source_classes"), model_dir=extra.pop("source_model_dir"),
                            threat_model=extra.pop("source_threat"), force_convert=extra.pop("source_force"),
                            download=download, trust_model=trust_model)
    if of_run and (options.weights or options.pretrained or options.num_classes):
        raise RobauditError("--weights, --pretrained and --num-classes apply to harden MODEL; a run rebuilds its "
                            "model as its analysis recorded it")
    return options


def data_options(f):
    """Options that say which data to use (shared by analyze and harden)."""
    return _apply(f, [
        click.option("--dataset", "-d", required=False,
                     help="moons, digits, mnist, fashion-mnist, cifar10, cifar100, a path to an .npz or x.npy file, "
                          "or imagefolder:DIR (one subfolder of PNG/JPEG images per class)."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Where MNIST/CIFAR files are (downloaded there when the network allows)."),
        click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True),
        click.option("--samples", "-n", type=int, help="Use the first N samples (in file order unless --shuffle)."),
        click.option("--shuffle", is_flag=True, help="Take a seeded random subset instead of the first N."),
        click.option("--no-download", is_flag=True, help="Never download: fail if the data files are missing."),
        click.option("--image-size", metavar="N", callback=_image_size,
                     help="imagefolder: resize each image's shorter side to N pixels, then center-crop N x N."),
        click.option("--class-map", type=click.Path(dir_okay=False, path_type=Path),
                     help='imagefolder: JSON {"folder": label, ...} or a list of folder names in label order.'),
        click.option("--workers", type=click.IntRange(0, limits.WORKERS_MAX), default=0, show_default=True,
                     help="DataLoader processes that read on-disk data ahead while the model runs (image folders "
                          "are decoded there); 0: in this process."),
    ])


def battery_option(f):
    """--battery: which attacks an analysis runs when no --attack names them (shared by analyze and harden MODEL)."""
    return click.option(
        "--battery", type=click.Choice([b.value for b in BatteryName]), default=None,
        help="fast: FGSM, PGD-10, CW, Square-200 and noise (the original battery); default: those plus APGD-CE "
             "and APGD-T (within a point of AutoAttack on the shipped examples); standard: AutoAttack's standard "
             "version, as RobustBench runs it. [default: default]")(f)


def gate_options(f):
    """Bars a run must meet (exit 3 when missed) and machine-readable output (shared by analyze, harden, check)."""
    return _apply(f, [
        click.option("--fail-under", metavar="BARS",
                     help="Exit 3 when an accuracy falls below its bar, e.g. 'worst-case=0.4,clean=0.9,pgd@8/255=0.35'; "
                          "'sanity' fails the run when any sanity check warns."),
        click.option("--gate-on", type=click.Choice([g.value for g in GateOn]), default=GateOn.ESTIMATE.value,
                     show_default=True,
                     help="What an accuracy bar of --fail-under judges: the estimate, or the lower end of its 95% "
                          "Wilson interval (fails a bar met only by the luck of the sample)."),
        click.option("--max-re", type=float, metavar="R",
                     help="Exit 3 when any layer's RE under the ranking attack exceeds R."),
        click.option("--strict", is_flag=True, help="Exit 3 when any sanity check warns (same as --fail-under sanity)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON object (accuracies, worst case, MVL, sanity verdict, bars) and nothing else."),
    ])


def _bars(fail_under, max_re, strict, gate_on):
    from .gate import parse_bars

    return parse_bars(fail_under, max_re=max_re, strict=strict, gate_on=GateOn.parse(gate_on))


def _say(as_json: bool):
    """Informational lines go to stderr when stdout carries the JSON object; under torchrun, from rank 0 only."""
    if not dist.is_main():
        return lambda text: None
    return (lambda text: _echo(text, err=True)) if as_json else _echo


def _verdict_and_gate(ctx, run_dir: Path, bars, as_json: bool, *, before: Path | None = None,
                      extra: dict | None = None) -> None:
    """Print the sanity verdict (or the JSON object), hold the bars against the run, exit 3 if one is missed."""
    from .gate import judge

    _show_judgement(ctx, judge(bars, run_dir, before=before), as_json, extra=extra)


def _show_judgement(ctx, judgement, as_json: bool, *, extra: dict | None = None) -> None:
    """Print a judged run's sanity verdict and bars (or the JSON object); exit 3 if a bar is missed."""
    import json

    if as_json:
        click.echo(json.dumps(judgement.to_dict(extra), indent=2, allow_nan=False))
    else:
        _echo_lines(tables.judgement_lines(judgement))
    if not judgement.passed:
        ctx.exit(EXIT_MISSED)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@data_options
@click.option("--attack", "-a", "attacks", multiple=True, metavar="SPEC",
              help="Attack spec, repeatable: e.g. 'pgd:eps=8/255,steps=10'; replaces the battery (--battery).")
@battery_option
@click.option("--eps", metavar="LIST", help="Eps sweep for every attack without its own eps, e.g. 2/255,4/255,8/255.")
@click.option("--layers", "layer_globs", multiple=True, metavar="GLOB", help="Probe only layers matching these names.")
@click.option("--layer-types", metavar="LIST", help="Probe only these module classes or ops, e.g. ReLU,Conv2d "
                                                    "(relu matches ReLU modules and relu ops).")
@click.option("--probe", type=click.Choice(["modules", "ops", "all"]), default="all", show_default=True,
              help="Layers to probe: leaf modules, functional ops (activations, residual additions), or both.")
@click.option("--mean", metavar="LIST", help="Per-channel input mean: the model is wrapped in a normalization layer.")
@click.option("--std", metavar="LIST", help="Per-channel input std (with --mean).")
@click.option("--no-normalize", is_flag=True, help="Do not apply the data set's default mean/std (the model normalizes).")
@click.option("--mvl-top", type=int, help="MVL: the K most vulnerable layers (default 5).")
@click.option("--mvl-z", type=float, help="MVL: layers whose RE exceeds mean + Z*std across layers.")
@click.option("--mvl-attack", help="Rank layers under this attack label (default: the strongest in the battery).")
@click.option("--mvl-metric", type=click.Choice(list(MVL_METRICS)), default="re_mean", show_default=True,
              help="Rank by the cumulative RE (re_mean, re_pooled) or by each layer's own gain (re_gain).")
@click.option("--include-output", is_flag=True, help="Let the output (logits) layer enter the MVL list.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Run directory (default reports/<model>-<dataset>/).")
@click.option("--force", is_flag=True, help="Replace an earlier run in --out (robaudit never replaces other folders).")
@click.option("--no-report", is_flag=True, help="Do not render report.html.")
@click.option("--no-checks", is_flag=True, help="Skip the gradient-masking sanity probes.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@threads_option
@gate_options
@click.pass_context
def analyze(ctx, model, arch, arch_kwargs, trust_model, dataset, data_dir, split, samples, shuffle, no_download,
            attacks, battery, image_size, class_map, workers, eps, layer_globs, layer_types, probe, mean, std, no_normalize, mvl_top, mvl_z, mvl_attack,
            mvl_metric, include_output, batch_size, device, seed, out, force, no_report, no_checks, progress,
            threads, fail_under, gate_on, max_re, strict, as_json, **source):
    """Layer Sustainability Analysis of MODEL: per-layer RE under an attack battery -> MVL list.

    MODEL is a model file (.pt2, checkpoint, state dict with --arch), a library model (timm:NAME,
    torchvision:NAME, robustbench:NAME, hf:ORG/NAME or a transformers folder) or an ONNX file."""
    from .attacks import parse_eps_list
    from .models import parse_arch_kwargs
    from .stages.analyze import analyze_run

    if not dataset:
        raise RobauditError("--dataset is required: e.g. --dataset digits (see robaudit analyze --help)")
    if samples is not None and samples < 1:
        raise RobauditError("--samples must be at least 1")
    if mvl_top is not None and mvl_z is not None:
        raise RobauditError("choose one MVL criterion: --mvl-top K or --mvl-z Z")
    bars = _bars(fail_under, max_re, strict, gate_on)
    mean, std = _mean_std(mean, std)
    _use_threads(threads)
    run = analyze_run(
        model, dataset, out=out, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), trust_model=trust_model,
        data_dir=data_dir, split=split, samples=samples, shuffle=shuffle, download=not no_download,
        image_size=image_size, class_map=class_map, workers=workers, attacks=list(attacks) or None,
        battery=BatteryName.of(battery) if battery else None, eps=parse_eps_list(eps), layers=list(layer_globs) or None, layer_types=_split_list([layer_types] if layer_types else []),
        probe=probe, mean=mean, std=std, normalize=not no_normalize,
        mvl_top=mvl_top, mvl_z=mvl_z, mvl_attack=mvl_attack, mvl_metric=mvl_metric, include_output=include_output,
        batch_size=batch_size, device=device, seed=seed, checks=not no_checks, report=not no_report,
        progress=sys.stderr.isatty() if progress is None else progress, command=invoked_command(), force=force,
        source_options=_source_options(source, download=not no_download, trust_model=trust_model),
    )
    if run is None:  # a torchrun process other than rank 0: its share is in rank 0's run
        return
    if not as_json:
        echo_summary(run)
    _verdict_and_gate(ctx, Path(run.path), bars, as_json)


def echo_summary(run) -> None:
    """Print an analysis' accuracy table, its MVL list and where the outputs are."""
    _echo_lines(tables.analysis_summary(run))


@main.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), help="Run directory (default: the latest under reports/).")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="HTML file to write (default RUN/report.html).")
def report(run_dir, out):
    """Render a run directory into one self-contained HTML file."""
    from .stages.report import render_report
    from .rundir import latest_run

    path = render_report(run_dir or latest_run(), out)
    _echo(f"report: {path}")


@main.command()
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="HTML file to write (default compare-<A>-vs-<B>.html in the current directory).")
@click.option("--json", "as_json", is_flag=True, help="Print the deltas as one JSON object instead of writing HTML.")
def compare(run_a, run_b, out, as_json):
    """Put two runs side by side: accuracy, RE per layer, MVL lists and manifest differences, with deltas.

    \b
      robaudit compare reports/model-v1-cifar10 reports/model-v2-cifar10
      robaudit compare reports/m-digits reports/m-digits/hardened --json
    """
    import json

    from .stages.compare import compare_runs, render_compare

    cmp = compare_runs(run_a, run_b)
    if as_json:
        click.echo(json.dumps(cmp.to_dict(), indent=2, allow_nan=False, default=str))
        return
    path = render_compare(cmp, out or Path(f"compare-{Path(run_a).name}-vs-{Path(run_b).name}.html"))
    _echo_lines(tables.comparison_lines(cmp))
    _echo(f"comparison: {path}")


@main.command("attacks")
def list_attacks():
    """List the attacks and noise baselines the spec language knows."""
    for line in tables.attack_kinds():
        click.echo(line)


# --- harden ---
@main.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path),
              help="Analyzed run directory to harden (default: the latest under reports/); under torchrun write "
                   "--run-dir (torchrun takes --run for its own --run-path).")
@model_options
@data_options
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="With MODEL: run directory for the analysis that comes first (default reports/<model>-<dataset>/).")
@battery_option
@click.option("--method", type=click.Choice([m.value for m in Method]), default="atlr",
              show_default=True, help="atlr: AT-LR; at: plain PGD adversarial training (the baseline); layerwise: "
                                      "perturb the MVL activations (about the cost of ordinary training); standard.")
@click.option("--mvl-top", type=int, help="Harden the K most vulnerable layers (default: the run's MVL list).")
@click.option("--layers-from", type=click.Choice([r.value for r in LayerRule]), default="mvl", show_default=True,
              help="Which layers to regularize: the MVL list, or a control of as many layers that ignores the "
                   "ranking: the deepest, or drawn at random with --seed.")
@click.option("--gamma", default="1", show_default=True, metavar="G[,G...]",
              help="AT-LR weight of each layer's RE: one value, or one per MVL layer.")
@click.option("--re-mode", type=click.Choice([m.value for m in ReMode]), default="pooled", show_default=True,
              help="RE pooled over the batch (the reference code) or averaged per sample.")
@click.option("--base-attack", type=click.Choice([m.value for m in BaseAttack]), default="pgd", show_default=True)
@click.option("--eps", "train_eps", metavar="EPS",
              help="Training eps (input space, Linf; default: the middle of the analysis eps sweep).")
@click.option("--steps", type=int, default=10, show_default=True, help="PGD steps while training.")
@click.option("--alpha", metavar="STEP", help="PGD step size (default 2.5*eps/steps).")
@click.option("--layer-eps", metavar="R", help="layerwise: relative size of the activation perturbation (default eps).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, help="Learning rate (default 1e-3 for adam, 1e-2 for sgd).")
@click.option("--optimizer", type=click.Choice([m.value for m in Optimizer]), default="adam", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice([m.value for m in Schedule]), default="cosine", show_default=True)
@click.option("--clean-weight", type=float, default=0.0, show_default=True,
              help="Mix clean CE into the loss: (1-w)*CE(adv) + w*CE(clean).")
@click.option("--dual-bn", is_flag=True,
              help="Separate BatchNorm statistics for clean passes (MixBN); the adversarial ones are used at test.")
@click.option("--include-output", is_flag=True, help="Let the output (logits) layer be regularized.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of the train split held out for validation after every epoch.")
@click.option("--train-data", metavar="FILE.npz|imagefolder:DIR",
              help="Training samples when the run's data set has no train split (a file or an image folder); a "
                   "folder is decoded with the run's --image-size and --class-map and needs the run's class folders.")
@click.option("--resume", is_flag=True, help="Continue an interrupted harden from its last complete epoch.")
@click.option("--force", is_flag=True, help="Replace an earlier hardened/ result or checkpoint.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), help="Seed (default: the analysis seed).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda ...")
@click.option("--no-report", is_flag=True, help="Do not render report.html.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@threads_option
@gate_options
@click.pass_context
def harden(ctx, model, run_dir, arch, arch_kwargs, trust_model, dataset, data_dir, split, samples, shuffle, out,
           battery, method, mvl_top, layers_from, gamma, re_mode, base_attack, train_eps, steps, alpha, layer_eps, epochs, batch_size, lr,
           optimizer, weight_decay, schedule, clean_weight, dual_bn, include_output, val_fraction, train_data,
           resume, force, seed, device, no_report, progress, threads, fail_under, gate_on, max_re, strict, as_json, image_size,
           class_map, workers, **data_extra):
    """Fine-tune the model so its Most Vulnerable Layers become sustainable; re-analyze; compare.

    \b
      robaudit harden --mvl-top 5                     # the latest run under reports/
      robaudit harden --run reports/m-digits --method at
      robaudit harden model.pt2 --dataset digits      # analyze first, then harden
    """
    from .attacks import parse_number
    from .models import parse_arch_kwargs
    from .stages.harden import harden_run, run_to_harden

    if model is not None and run_dir is not None:
        raise RobauditError("give either MODEL (analyzed first) or --run DIR, not both")
    bars = _bars(fail_under, max_re, strict, gate_on)
    show_progress = sys.stderr.isatty() if progress is None else progress
    download = not data_extra.get("no_download", False)
    source_options = _source_options(data_extra, download=download, trust_model=trust_model, of_run=model is None)
    # every setting is checked here, before an analysis that may take minutes
    cfg = HardenConfig(
        method=method, eps=parse_number(train_eps) if train_eps is not None else None, gamma=gamma,
        re_mode=re_mode, base_attack=base_attack, steps=steps, alpha=parse_number(alpha) if alpha else None,
        layer_eps=parse_number(layer_eps) if layer_eps else None, epochs=epochs, batch_size=batch_size, lr=lr,
        optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, clean_weight=clean_weight,
        dual_bn=dual_bn, val_fraction=val_fraction, seed=seed, device=device, workers=workers,
        progress=show_progress)
    if mvl_top is not None and mvl_top < 1:
        raise RobauditError("--mvl-top must be at least 1")
    if model is None and (image_size is not None or class_map is not None):
        raise RobauditError("--image-size and --class-map apply to harden MODEL --dataset imagefolder:DIR; a run "
                            "decodes its images as its analysis did")
    if model is not None and not dataset:
        raise RobauditError("--dataset is required with MODEL: e.g. robaudit harden model.pt2 --dataset digits")
    _use_threads(threads)
    if model is None and battery is not None:
        raise RobauditError("--battery applies to harden MODEL (the analysis that comes first); a run's hardened "
                            "model is analyzed with the run's own battery")
    run_dir, notes = run_to_harden(
        model, run_dir, dataset=dataset, out=out, resume=resume, device=device, analysis=dict(
            arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs) if model is not None else None,
            trust_model=trust_model, source_options=source_options,
            data_dir=data_dir, split=split, samples=samples, shuffle=shuffle,
            mvl_top=mvl_top, include_output=include_output, seed=seed or 0, progress=show_progress, force=force,
            image_size=image_size, class_map=class_map, workers=workers, download=download,
            battery=BatteryName.of(battery) if battery else None))
    for note in notes:
        _say(as_json)(note)
    with _warnings_recorded() as warned:
        done = harden_run(run_dir, cfg, mvl_top=mvl_top, include_output=include_output,
                          layers_from=LayerRule.of(layers_from), train_data=train_data, resume=resume, force=force,
                          command=invoked_command(), download=download, arch=arch, trust_model=trust_model,
                          estimate=_say(as_json))
    if dist.is_main():  # the other processes of a torchrun job wrote and print nothing; the gate's exit is rank 0's
        _show_harden(ctx, done, warned, bars, as_json=as_json, report=not no_report)


@contextlib.contextmanager
def _warnings_recorded() -> Iterator[list[str]]:
    """The messages of the warnings shown (as always) within the block: a note already shown as a warning is
    not repeated among a hardening's notes."""
    warned: list[str] = []
    show = warnings.showwarning

    def _record(message, *args, **kwargs):
        warned.append(str(message))
        show(message, *args, **kwargs)

    warnings.showwarning = _record
    try:
        yield warned
    finally:
        warnings.showwarning = show


def _show_harden(ctx, done, warned, bars, *, as_json: bool, report: bool) -> None:
    """Print the outcome, render the report and hold the hardened run to the bars."""
    import importlib.util

    if not as_json:
        _echo_lines(tables.harden_summary(done, warned=warned))
    if report and importlib.util.find_spec("robaudit.stages.report") is not None:
        from .stages.report import render_report

        report_path = render_report(done.run_dir)
        _say(as_json)(f"report: {report_path}")
    _verdict_and_gate(ctx, Path(done.hardened_dir), bars, as_json, before=Path(done.run_dir),
                      extra={"original_run_dir": str(done.run_dir), "hardened_model": str(done.model_path)})


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--hardened", is_flag=True, help="Check the hardened model of RUN (RUN/hardened/).")
@gate_options
@click.pass_context
def check(ctx, run_dir, hardened, fail_under, gate_on, max_re, strict, as_json):
    """Hold an existing run to bars without recomputing anything; exit 3 when one is missed.

    \b
      robaudit check reports/m-cifar10 --fail-under worst-case=0.40,clean=0.90 --max-re 0.8
      robaudit check --strict --json            # the latest run; fail on any sanity warning
    """
    from .gate import judge
    from .rundir import latest_run

    bars = _bars(fail_under, max_re, strict, gate_on)
    run_dir = Path(run_dir) if run_dir else latest_run("reports")
    target = run_dir / "hardened" if hardened else run_dir
    if hardened and not target.is_dir():
        raise RobauditError(f"{run_dir} has no hardened/ result: run `robaudit harden --run {run_dir}` first")
    judgement = judge(bars, target, before=run_dir if hardened else None)  # a bar the run cannot meet fails here,
    if not as_json:  # before anything is printed
        _echo_lines(tables.accuracy_summary(judgement.run, target))
    _show_judgement(ctx, judgement, as_json)
