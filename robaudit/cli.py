"""The ``robaudit`` command: a thin click layer over the Python API.

Every user-facing failure becomes one line on stderr and a non-zero exit; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path

import click

from . import limits
from .errors import RobauditError
from .training.config import BaseAttack, HardenConfig, Method, Optimizer, ReMode, Schedule
from .lsa import MVL_METRICS
from .training.layers import LayerRule

EXIT_USER = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
SEED_MAX = limits.SEED_MAX  # numpy's and torch's generators both take it


def _worker() -> bool:
    """A process of ``torchrun`` other than rank 0: it prints nothing (rank 0 reports for the group)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


class _Group(click.Group):
    """A click group that turns exceptions into one-line messages unless ``--debug`` is on.

    Under ``torchrun`` each process that fails says so in one line, tagged with its rank. An error that
    reached rank 0 through :func:`robaudit.dist.exchange` is said once, by rank 0, naming the process it
    came from; the other processes exit with the same status, silently. The process group is left at the
    end: after a meeting on success, at once after a failure (so that the others fail instead of waiting).
    """

    def invoke(self, ctx: click.Context):
        failed = True
        try:
            result = self._invoke(ctx)
            failed = False
            return result
        except click.exceptions.Exit as e:
            from .gate import EXIT_MISSED

            failed = e.exit_code not in (0, EXIT_MISSED)  # a missed bar is a finished command
            raise
        finally:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                _leave_group(ctx, failed=failed)

    def _invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # output piped into e.g. `head`: nothing left to say
            sys.stderr.close()
            ctx.exit(EXIT_INTERNAL)
        except KeyboardInterrupt:
            if _debug(ctx):
                raise
            click.echo("interrupted: nothing half-written was left behind", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except RobauditError as e:
            if _debug(ctx):
                raise
            if not _said_by_rank0(e):
                _echo(f"error{_process_tag()}: {e}", err=True)
            ctx.exit(getattr(e, "exit_code", EXIT_USER))
        except Exception as e:  # a bug, not the user's fault: still one line, with the way to learn more
            if _debug(ctx):
                raise
            if not _said_by_rank0(e):
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _echo(f"error{_process_tag()}: unexpected {type(e).__name__}: {first[:300]} (rerun with --debug "
                           "for the traceback)", err=True)
            ctx.exit(EXIT_INTERNAL)


def _leave_group(ctx: click.Context, *, failed: bool) -> None:
    """Leave torchrun's process group; a meeting that fails because another process failed first is said in
    one line (that process says why) and ends this one with a non-zero status."""
    from . import dist

    try:
        dist.shutdown(failed=failed)
    except Exception as e:  # the group broke while meeting at the end: another process failed
        if _debug(ctx) or failed:
            raise
        click.echo(f"error{_process_tag()}: another process of the job failed before the end "
                   f"({type(e).__name__}); its own message says why", err=True)
        ctx.exit(EXIT_INTERNAL)


def _said_by_rank0(error: BaseException) -> bool:
    """Whether rank 0 reports ``error`` for this process (it went through :func:`robaudit.dist.exchange`)."""
    from . import dist

    return _worker() and (isinstance(error, dist.PeerError) or dist.was_shared(error))


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) if root is not None else False


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text) -> str:
    """``text`` without control characters (C0, DEL, C1: no escape sequence from a file or a model reaches the
    terminal); tabs and line breaks become spaces, so a value stays on its line."""
    return _CONTROL.sub("", re.sub(r"[\t\n\r]", " ", str(text)))


def _echo(text="", *, err: bool = False) -> None:
    """``click.echo`` of a line made :func:`_printable`, its leading blank lines kept."""
    text = str(text)
    body = text.lstrip("\n")
    click.echo("\n" * (len(text) - len(body)) + _printable(body), err=err)


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
    if _worker():  # rank 0 alone speaks for a torchrun group
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)


def model_options(f):
    """Options that say how to load a model file (shared by analyze and harden)."""
    for opt in reversed([
        click.option("--arch", help="Architecture for a state dict: 'package.module:Class' or 'file.py:Class'."),
        click.option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"width\": 32}'."),
        click.option("--trust-model", is_flag=True,
                     help="Run code from the model file: unpickle a module, load a .pt2 without inspecting it, "
                          "import a .py architecture a checkpoint names. Only for files whose source you trust."),
    ]):
        f = opt(f)
    return f


def data_options(f):
    """Options that say which data to use (shared by analyze and harden)."""
    for opt in reversed([
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
    ]):
        f = opt(f)
    return f


def gate_options(f):
    """Bars a run must meet (exit 3 when missed) and machine-readable output (shared by analyze, harden, check)."""
    for opt in reversed([
        click.option("--fail-under", metavar="BARS",
                     help="Exit 3 when an accuracy falls below its bar, e.g. 'worst-case=0.4,clean=0.9,pgd@8/255=0.35'; "
                          "'sanity' fails the run when any sanity check warns."),
        click.option("--max-re", type=float, metavar="R",
                     help="Exit 3 when any layer's RE under the ranking attack exceeds R."),
        click.option("--strict", is_flag=True, help="Exit 3 when any sanity check warns (same as --fail-under sanity)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON object (accuracies, worst case, MVL, sanity verdict, bars) and nothing else."),
    ]):
        f = opt(f)
    return f


def _bars(fail_under, max_re, strict):
    from .gate import parse_bars

    return parse_bars(fail_under, max_re=max_re, strict=strict)


def _say(as_json: bool):
    """Informational lines go to stderr when stdout carries the JSON object; under torchrun, from rank 0 only."""
    from . import dist

    if not dist.is_main():
        return lambda text: None
    return (lambda text: _echo(text, err=True)) if as_json else _echo


def _verdict_and_gate(ctx, run_dir: Path, bars, as_json: bool, *, before: Path | None = None,
                      extra: dict | None = None) -> None:
    """Print the sanity verdict (or the JSON object), hold the bars against the run, exit 3 if one is missed."""
    import json

    from . import gate, verdict
    from .rundir import read_run

    run = read_run(run_dir)
    checks = verdict.checks_of(run)
    outcomes = gate.evaluate(bars, run, checks)
    introduced = verdict.introduced_warnings(verdict.checks_of(read_run(before)), checks) if before else None
    missed = [o for o in outcomes if not o.met]
    if as_json:
        obj = verdict.summarize(run, checks)
        if introduced is not None:
            obj["introduced_warnings"] = introduced
        obj.update(extra or {})
        obj["bars"] = [o.to_dict() for o in outcomes]
        obj["passed"] = not missed
        click.echo(json.dumps(obj, indent=2, allow_nan=False))
    else:
        report = run_dir / "report.html"
        _echo("")
        for line in verdict.sanity_lines(checks, report=str(report) if report.exists() else None,
                                         run_dir=str(run_dir.parent if before else run_dir)):
            _echo(line)
        for name in introduced or []:
            _echo(f"  hardening introduced a warning the original model did not have: {name} -- the classic "
                       "sign of a defence that only masks gradients")
        for o in outcomes:
            _echo(f"{'bar met' if o.met else 'MISSED'}: {o.bar.name} ({o.text})")
    if missed:
        ctx.exit(gate.EXIT_MISSED)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@data_options
@click.option("--attack", "-a", "attacks", multiple=True, metavar="SPEC",
              help="Attack spec, repeatable: e.g. 'pgd:eps=8/255,steps=10'. Default: "
                   "fgsm, pgd, cw, square and gaussian/uniform/salt-and-pepper noise.")
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
@gate_options
@click.pass_context
def analyze(ctx, model, arch, arch_kwargs, trust_model, dataset, data_dir, split, samples, shuffle, no_download,
            attacks, image_size, class_map, workers, eps, layer_globs, layer_types, probe, mean, std, no_normalize, mvl_top, mvl_z, mvl_attack,
            mvl_metric, include_output, batch_size, device, seed, out, force, no_report, no_checks, progress,
            fail_under, max_re, strict, as_json):
    """Layer Sustainability Analysis of MODEL: per-layer RE under an attack battery -> MVL list."""
    from .attacks import parse_eps_list
    from .models import parse_arch_kwargs
    from .stages.analyze import analyze_run

    if not dataset:
        raise RobauditError("--dataset is required: e.g. --dataset digits (see robaudit analyze --help)")
    if samples is not None and samples < 1:
        raise RobauditError("--samples must be at least 1")
    if mvl_top is not None and mvl_z is not None:
        raise RobauditError("choose one MVL criterion: --mvl-top K or --mvl-z Z")
    bars = _bars(fail_under, max_re, strict)
    mean, std = _mean_std(mean, std)
    run = analyze_run(
        model, dataset, out=out, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), trust_model=trust_model,
        data_dir=data_dir, split=split, samples=samples, shuffle=shuffle, download=not no_download,
        image_size=image_size, class_map=class_map, workers=workers, attacks=list(attacks) or None,
        eps=parse_eps_list(eps), layers=list(layer_globs) or None, layer_types=_split_list([layer_types] if layer_types else []),
        probe=probe, mean=mean, std=std, normalize=not no_normalize,
        mvl_top=mvl_top, mvl_z=mvl_z, mvl_attack=mvl_attack, mvl_metric=mvl_metric, include_output=include_output,
        batch_size=batch_size, device=device, seed=seed, checks=not no_checks, report=not no_report,
        progress=sys.stderr.isatty() if progress is None else progress,
        command=shlex.join(["robaudit", *sys.argv[1:]]) if Path(sys.argv[0]).name.startswith("robaudit")
        else None, force=force,
    )
    if run is None:  # a torchrun process other than rank 0: its share is in rank 0's run
        return
    if not as_json:
        echo_summary(run)
    _verdict_and_gate(ctx, Path(run.path), bars, as_json)


def echo_summary(run) -> None:
    """Print the accuracy table, the MVL list and where the outputs are."""
    from .sanity import format_eps
    res, mvl = run.result, run.mvl
    acc = res.accuracy
    _echo(f"{run.manifest['model']['path']} on {run.manifest['dataset']['name']} "
               f"({res.n_samples} samples, {res.seconds:.1f} s)")
    _echo(f"clean accuracy: {100 * res.clean_accuracy:.1f}%")
    for eps_val, rows in acc[acc["attack"] != "clean"].groupby(acc["eps"].fillna(-1.0), sort=True):
        if eps_val < 0:  # minimal-perturbation attacks: the size they needed, not an accuracy
            items = ", ".join(f"{r.attack} fools {100 * r.success_rate:.1f}%" + (
                "" if r.pert_median != r.pert_median else f" at median {r.norm} {r.pert_median:.3g}")
                for r in rows.itertuples())
            _echo(f"  minimal perturbation: {items}")
            continue
        items = ", ".join(f"{r.attack} {100 * r.accuracy:.1f}%" for r in rows.itertuples())
        _echo(f"  eps {format_eps(eps_val)}: {items}")
    eps_txt = f" at eps {format_eps(mvl.eps)}" if mvl.eps is not None else ""
    _echo(f"\nMost Vulnerable Layers (ranked by {mvl.metric} under {mvl.attack}{eps_txt}):")
    width = max([len(n) for n in mvl.names] + [5])
    _echo(f"  {'rank':>4}  {'layer':<{width}}  {'type':<14} {mvl.metric:>9}")
    for i, r in enumerate(mvl.layers.itertuples(), 1):
        _echo(f"  {i:>4}  {_printable(r.layer):<{width}}  {_printable(r.layer_type):<14} {r.score:>9.4f}")
    if mvl.excluded:
        _echo(f"  (not ranked: {', '.join(mvl.excluded)} -- output and pass-through layers; "
                   "--include-output ranks the output layer)")
    _echo(f"\nrun directory: {run.path}")
    report = Path(run.path) / "report.html"
    if report.exists():
        _echo(f"report: {report}")


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
    _echo(f"comparison: {path}")


@main.command("attacks")
def list_attacks():
    """List the attacks and noise baselines the spec language knows."""
    from .attacks import KINDS

    for k in KINDS.values():
        norms = k.norms or (k.norm,)
        params = ", ".join(f"{p}={v}" for p, v in k.defaults.items())
        eps = "eps, " if k.bounded else ""
        choice = f"norm={k.norm} (or {', '.join(f'norm={n}' for n in norms if n != k.norm)}), " if len(norms) > 1 else ""
        click.echo(f"{k.name:<11} {k.kind:<11} {'/'.join(norms):<7}  {k.description}")
        if eps or params or choice:
            click.echo(f"{'':<11} params: {eps}{choice}{params}".rstrip(", "))
    click.echo("\ne.g. robaudit analyze MODEL -d digits --attack pgd:eps=8/255,steps=20 --attack square:norm=L2,eps=0.5")


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
@gate_options
@click.pass_context
def harden(ctx, model, run_dir, arch, arch_kwargs, trust_model, dataset, data_dir, split, samples, shuffle, out,
           method, mvl_top, layers_from, gamma, re_mode, base_attack, train_eps, steps, alpha, layer_eps, epochs, batch_size, lr,
           optimizer, weight_decay, schedule, clean_weight, dual_bn, include_output, val_fraction, train_data,
           resume, force, seed, device, no_report, progress, fail_under, max_re, strict, as_json, image_size,
           class_map, workers, **data_extra):
    """Fine-tune the model so its Most Vulnerable Layers become sustainable; re-analyze; compare.

    \b
      robaudit harden --mvl-top 5                     # the latest run under reports/
      robaudit harden --run reports/m-digits --method at
      robaudit harden model.pt2 --dataset digits      # analyze first, then harden
    """
    from . import dist
    from .attacks import parse_number
    from .lsa import resolve_device
    from .rundir import latest_run

    if model is not None and run_dir is not None:
        raise RobauditError("give either MODEL (analyzed first) or --run DIR, not both")
    bars = _bars(fail_under, max_re, strict)
    show_progress = sys.stderr.isatty() if progress is None else progress
    command = shlex.join(["robaudit", *sys.argv[1:]]) if Path(sys.argv[0]).name.startswith("robaudit") else None
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
    dist.init(resolve_device(device))  # under torchrun: join the process group (the group leaves it)
    say = _say(as_json)
    if model is not None:
        if not dataset:
            raise RobauditError("--dataset is required with MODEL: e.g. robaudit harden model.pt2 --dataset digits")
        run_dir = _analyze_before_harden(
            model, dataset, out=out, resume=resume, say=say, arch=arch, arch_kwargs=arch_kwargs,
            trust_model=trust_model, data_dir=data_dir, split=split, samples=samples, shuffle=shuffle,
            mvl_top=mvl_top, include_output=include_output, device=device, seed=seed or 0,
            progress=show_progress, force=force, image_size=image_size, class_map=class_map, workers=workers,
            **({"download": not data_extra["no_download"]} if "no_download" in data_extra else {}))
    elif run_dir is None:
        run_dir = latest_run("reports")
        say(f"hardening the latest run under reports/: {run_dir}")
    if resume:
        _say_resume(run_dir, say)
    done, warned = _harden_run(ctx, run_dir, cfg, mvl_top=mvl_top, include_output=include_output,
                               layers_from=LayerRule.of(layers_from),
                               train_data=train_data, resume=resume, force=force, command=command,
                               download=not data_extra.get("no_download", False), arch=arch,
                               trust_model=trust_model)
    if dist.is_main():  # the other processes of a torchrun job wrote and print nothing; the gate's exit is rank 0's
        _show_harden(ctx, done, warned, bars, as_json=as_json, report=not no_report)


def _say_resume(run_dir: Path, say) -> None:
    """Say from which epoch an interrupted harden continues."""
    from .training.checkpoint import CHECKPOINT_NAME, load_checkpoint

    ck = Path(run_dir) / CHECKPOINT_NAME
    if ck.is_file():
        epoch = int(load_checkpoint(ck)["epoch"])
        say(f"resuming from the checkpoint of epoch {epoch} ({ck}): training continues at epoch {epoch + 1}")


def _harden_run(ctx, run_dir: Path, cfg: HardenConfig, **options):
    """:func:`harden_run`, its warnings recorded (not repeated among the notes), Ctrl-C a one-line exit."""
    from .stages.harden import harden_run
    from .training.loop import HardenInterrupted

    warned: list[str] = []
    show = warnings.showwarning

    def _record(message, *args, **kwargs):  # a note already shown as a warning is not repeated at the end
        warned.append(str(message))
        show(message, *args, **kwargs)

    try:
        warnings.showwarning = _record
        return harden_run(run_dir, cfg, **options), warned
    except HardenInterrupted as e:
        if _debug(ctx):
            raise
        _echo(f"interrupted{_process_tag()}: {e}", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    finally:
        warnings.showwarning = show


def _show_harden(ctx, done, warned, bars, *, as_json: bool, report: bool) -> None:
    """Print the outcome, render the report and hold the hardened run to the bars."""
    import importlib.util

    if not as_json:
        _echo_harden(done, warned=warned)
    if report and importlib.util.find_spec("robaudit.stages.report") is not None:
        from .stages.report import render_report

        report_path = render_report(done.run_dir)
        _say(as_json)(f"report: {report_path}")
    _verdict_and_gate(ctx, Path(done.hardened_dir), bars, as_json, before=Path(done.run_dir),
                      extra={"original_run_dir": str(done.run_dir), "hardened_model": str(done.model_path)})


def _process_tag() -> str:
    """`` (process R)`` in a process of a torchrun job other than rank 0; empty otherwise."""
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    return f" (process {rank})" if rank != "0" else ""


def _analyze_before_harden(model, dataset, *, out, resume: bool, say, arch_kwargs, **analysis) -> Path:
    """``harden MODEL``: analyze first (the run directory to harden), unless resuming an interrupted harden."""
    from . import dist
    from .training.checkpoint import CHECKPOINT_NAME
    from .models import parse_arch_kwargs
    from .data import DataSource
    from .stages.analyze import analyze_run, default_out

    planned = Path(out) if out else default_out(model, DataSource.parse(dataset))  # named as analyze names it
    if resume and (planned / CHECKPOINT_NAME).is_file():
        say(f"resuming the interrupted harden in {planned}")
        return planned  # the analysis is there already; analyzing again would replace the checkpoint
    done = analyze_run(model, dataset, out=out, arch_kwargs=parse_arch_kwargs(arch_kwargs), report=False,
                       leave_group=False, **analysis)  # training goes on in the same process group
    dist.barrier()  # under torchrun rank 0 wrote the run: the others read it from here on
    say(f"analyzed {model} -> {done.path}")
    return done.path


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--hardened", is_flag=True, help="Check the hardened model of RUN (RUN/hardened/).")
@gate_options
@click.pass_context
def check(ctx, run_dir, hardened, fail_under, max_re, strict, as_json):
    """Hold an existing run to bars without recomputing anything; exit 3 when one is missed.

    \b
      robaudit check reports/m-cifar10 --fail-under worst-case=0.40,clean=0.90 --max-re 0.8
      robaudit check --strict --json            # the latest run; fail on any sanity warning
    """
    from .rundir import latest_run

    bars = _bars(fail_under, max_re, strict)
    run_dir = Path(run_dir) if run_dir else latest_run("reports")
    target = run_dir / "hardened" if hardened else run_dir
    if hardened and not target.is_dir():
        raise RobauditError(f"{run_dir} has no hardened/ result: run `robaudit harden --run {run_dir}` first")
    if not as_json:
        _echo_accuracy(target)
    _verdict_and_gate(ctx, target, bars, as_json, before=run_dir if hardened else None)


def _echo_accuracy(run_dir: Path) -> None:
    """The run's clean and worst-case accuracies, one line each, before the verdict."""
    from . import verdict
    from .rundir import read_run
    from .sanity import format_eps

    summary = verdict.summarize(read_run(run_dir))
    _echo(f"{summary['model']} on {summary['dataset']} ({summary['n_samples']} samples): {run_dir}")
    if summary["clean_accuracy"] is not None:
        _echo(f"clean accuracy: {100 * summary['clean_accuracy']:.1f}%")
    for w in summary["worst_case"]:
        _echo(f"  worst case at eps {format_eps(w['eps'])}: {100 * w['accuracy']:.1f}%")


def _echo_harden(done, *, warned=()) -> None:
    """Print the settings, the before/after comparison and where the outputs are."""
    from .sanity import format_eps
    s, res = done.settings, done.result
    _echo(f"{s['method']} on {', '.join(s['mvl_layers']) or 'no layer'} (eps {format_eps(s['eps'])}, {s['epochs']} epochs, "
               f"{s['seconds_training']:.1f} s); validation: {res.validation}")
    _echo(f"BatchNorm at test: {res.bn_at_test}")
    if s.get("layers_rule"):
        _echo(f"layers regularized: {s['layers_rule']}")
    for note in res.notes:
        if note not in warned:
            _echo(f"note: {note}")
    comp = done.comparison
    acc = comp[comp["kind"] == "accuracy"]
    acc = acc[acc["eps"].notna() | (acc["attack"] == "clean")]  # minimal-perturbation attacks: no robust accuracy
    labels = [r.attack if r.eps is None or r.eps != r.eps else f"{r.attack} eps {format_eps(r.eps)}" for r in acc.itertuples()]
    width = max([len(x) for x in labels] + [8])
    _echo(f"\n  {'accuracy':<{width}}  {'before':>7}  {'after':>7}  {'delta':>6}")
    for label, r in zip(labels, acc.itertuples()):
        _echo(f"  {label:<{width}}  {100 * r.before:6.1f}%  {100 * r.after:6.1f}%  {100 * r.delta:+6.1f}")
    after = done.analysis.accuracy
    minimal = after[after["eps"].isna() & (after["kind"] == "adversarial")]
    if len(minimal):
        from .rundir import read_run

        before = read_run(done.run_dir).accuracy.set_index("attack")  # read as every run is: checked
        for r in minimal.itertuples():
            if r.attack in before.index and "pert_median" in before.columns:
                _echo(f"  {r.attack}: median {r.norm} perturbation to fool a sample "
                           f"{before.loc[r.attack, 'pert_median']:.3g} -> {r.pert_median:.3g}")
    re_rows = comp[comp["kind"] == "re"]
    if len(re_rows):
        r0 = re_rows.iloc[0]
        eps_txt = f" eps {format_eps(r0['eps'])}" if r0["eps"] == r0["eps"] and r0["eps"] is not None else ""
        lw = max([len(str(x)) for x in re_rows["layer"]] + [5])
        metric = done.settings['mvl_ranking']['metric']
        _echo(f"\nRE ({'re_mean' if metric == 're_gain' else metric}) of the regularized layers under "
                   f"{r0['attack']}{eps_txt}:")
        _echo(f"  {'layer':<{lw}}  {'before':>8}  {'after':>8}")
        for r in re_rows.itertuples():
            _echo(f"  {_printable(r.layer):<{lw}}  {r.before:8.4f}  {r.after:8.4f}")
    _echo(f"\nhardened model: {done.model_path}")
    _echo(f"outputs: {done.hardened_dir}/ (history.csv, comparison.csv, harden.json, lsa.csv, accuracy.csv, "
               "mvl.json)")
