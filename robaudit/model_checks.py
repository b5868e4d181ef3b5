"""The model checks: probes that run on the model itself, planned to cost a bounded share of the battery.

:func:`run_model_checks` probes a model on a small batch: outputs that are already probabilities, zero or
non-finite input gradients, a forward pass that is not deterministic (the checks AutoAttack runs), and FGSM,
PGD-10 and PGD-50 at the battery's own largest Linf eps (never a larger one), reusing the battery's own FGSM and
PGD-10 outcomes where it ran them. :func:`plan_model_checks` sizes the sample count so that the checks cost at
most :data:`CHECK_SHARE` of the battery, but never fewer than the :data:`MIN_PAIRED_SAMPLES` on which a
comparison can be conclusive. The probes return raw numbers and their per-sample pairs as a JSON-serializable
dict, written to the run directory as ``checks.json``; :func:`robaudit.sanity.evaluate` decides what they mean.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .significance import ALPHA, MIN_PAIRED_SAMPLES

if TYPE_CHECKING:  # torch is imported lazily: planning needs no torch
    from torch import Tensor, nn

__all__ = ["AttackFn", "CALL_OVERHEAD", "CHECK_SHARE", "FORWARD_COST", "ModelCheckPlan", "attack_cost", "battery_cost",
           "largest_linf_eps", "plan_model_checks", "run_model_checks"]

# The model checks cost at most this share of the battery (in forward+backward passes per sample).
CHECK_SHARE = 0.10
# A forward pass alone counts as this share of a forward+backward pass (backward is about 2 forwards).
FORWARD_COST = 1.0 / 3.0
# The fixed cost of one pass over a batch, in samples: a pass over b samples costs b + CALL_OVERHEAD.
# Small models on CPU pay about this much per call (the digits CNN: 0.8 ms fixed, 0.056 ms per sample).
CALL_OVERHEAD = 16


# attack_fn(model, x, y, *, kind, eps, steps) -> adversarial x; kind is "fgsm" or "pgd" (Linf).
AttackFn = Callable[..., "Tensor"]


# Per-sample cost of one attack configuration in forward+backward passes: a lower bound (attacks that
# stop early, or on fooled samples, cost at least this), so the checks never outgrow their share.
def attack_cost(spec, *, num_classes: int) -> float:
    """A lower bound on what ``spec`` costs per sample, in forward+backward passes."""
    p = spec.param_dict
    name = spec.name
    if spec.kind == "noise":
        return 0.0
    if name == "fgsm":
        return 1.0
    if name in ("pgd", "pgdl2", "cw"):
        return float(p["steps"])
    if name in ("apgd", "apgdt"):  # one restart (or target) on every sample, after APGD's own clean forward
        return float(p["steps"]) + FORWARD_COST
    if name == "deepfool":  # at least one Jacobian of every logit
        return float(num_classes)
    if name == "autoattack":  # at least APGD-CE's 100 iterations
        return 100.0
    if name == "square":  # at least one query
        return FORWARD_COST
    return 1.0


def battery_cost(specs, *, num_classes: int) -> float:
    """Per-sample cost of the battery: the clean rows of the hooked pass, and per configuration its attack
    plus its perturbed rows of that pass."""
    return FORWARD_COST + sum(attack_cost(s, num_classes=num_classes) + FORWARD_COST for s in specs)


def _reusable(spec, eps_max: float | None) -> str | None:
    """``"pgd10"`` or ``"fgsm"`` when the battery's configuration is that probe at ``eps_max``."""
    if eps_max is None or spec.norm != "Linf" or spec.eps is None or not math.isclose(spec.eps, eps_max):
        return None
    p = spec.param_dict
    if spec.name == "fgsm":
        return "fgsm"
    if (spec.name == "pgd" and p["steps"] == 10 and p["random_start"]
            and (p["alpha"] is None or math.isclose(p["alpha"], 2.5 * eps_max / 10))):
        return "pgd10"
    return None


def largest_linf_eps(specs) -> float | None:
    """The battery's largest Linf eps over its adversarial, eps-bounded configurations."""
    values = [float(s.eps) for s in specs
              if s.kind == "adversarial" and s.bounded and s.norm == "Linf" and s.eps is not None]
    return max(values) if values else None


@dataclass(frozen=True)
class ModelCheckPlan:
    """How many samples the model checks use, which probes run, and the costs that decided it
    (per sample, in forward+backward passes)."""

    n_samples: int
    attacks: bool
    eps_max: float | None
    reuse: dict  # probe name -> index of the battery configuration it reuses
    battery_cost: float
    check_cost: float
    budget: float  # in sample-passes: share x the battery's passes x (batch + CALL_OVERHEAD) summed over batches
    share: float
    min_samples: int = MIN_PAIRED_SAMPLES  # the fewest samples the attack probes' comparisons can be conclusive on
    over_budget: bool = False  # raised to min_samples beyond the share of the battery

    @property
    def note(self) -> str:
        """What the plan decided beyond the share, in a sentence ("" when nothing)."""
        if self.over_budget:
            return (f"raised to the {self.min_samples} samples a paired comparison needs to be conclusive at "
                    f"p < {ALPHA:g}, which costs more than {100 * self.share:.0f} % of the battery")
        if self.eps_max is not None and not self.attacks:
            return (f"no attack probes: the data set has fewer than the {self.min_samples} samples a paired "
                    f"comparison needs to be conclusive at p < {ALPHA:g}")
        return ""

    def to_dict(self) -> dict:
        return {"n_samples": self.n_samples, "attacks": self.attacks, "eps_max": self.eps_max,
                "reused": sorted(self.reuse), "battery_cost_per_sample": round(self.battery_cost, 4),
                "check_cost_per_sample": round(self.check_cost, 4), "budget": round(self.budget, 4),
                "share": self.share, "min_samples": self.min_samples, "over_budget": self.over_budget,
                "note": self.note}


def plan_model_checks(specs, *, n_battery: int, num_classes: int, batch_size: int = 128, max_samples: int = 128,
                share: float = CHECK_SHARE) -> ModelCheckPlan:
    """Size the model checks so that they cost at most ``share`` of the battery on ``n_battery`` samples, but never
    fewer than :data:`MIN_PAIRED_SAMPLES` for the attack probes, whose comparisons could not be conclusive on fewer
    (the plan says so when that costs more than the share).

    Costs are counted in forward+backward passes per sample (a forward alone is :data:`FORWARD_COST`),
    from the battery's configurations, each pass over a batch of b samples costing b + :data:`CALL_OVERHEAD`
    (the checks run as one batch), so the plan is the same on every machine and for every seed.
    Probes the battery already ran (FGSM, PGD-10 at its largest Linf eps) are reused, not rerun.
    """
    specs = list(specs)
    eps_max = largest_linf_eps(specs)
    reuse: dict[str, int] = {}
    for i, s in enumerate(specs):
        key = _reusable(s, eps_max)
        if key and key not in reuse:
            reuse[key] = i
    batches = [min(batch_size, n_battery - start) for start in range(0, n_battery, max(1, batch_size))]
    budget = share * battery_cost(specs, num_classes=num_classes) * sum(b + CALL_OVERHEAD for b in batches)
    base = 2 * FORWARD_COST + 1.0  # determinism (two forwards, the first also gives clean accuracy), gradient
    cap = min(int(max_samples), int(n_battery))
    affordable = lambda cost: min(cap, int(budget // cost) - CALL_OVERHEAD)  # noqa: E731
    if eps_max is not None and cap >= MIN_PAIRED_SAMPLES:  # the attack probes, on at least as many as they need
        cost = base + (50 + FORWARD_COST) + sum(steps + FORWARD_COST for key, steps in (("fgsm", 1), ("pgd10", 10))
                                                if key not in reuse)
        n = affordable(cost)
        return ModelCheckPlan(n_samples=max(n, MIN_PAIRED_SAMPLES), attacks=True, eps_max=eps_max, reuse=reuse,
                         battery_cost=battery_cost(specs, num_classes=num_classes), check_cost=cost, budget=budget,
                         share=share, over_budget=n < MIN_PAIRED_SAMPLES)
    return ModelCheckPlan(n_samples=max(0, affordable(base)), attacks=False, eps_max=eps_max, reuse={},
                     battery_cost=battery_cost(specs, num_classes=num_classes), check_cost=base, budget=budget,
                     share=share)


def _battery_attack(model: "nn.Module", x: "Tensor", y: "Tensor", *, kind: str, eps: float, steps: int) -> "Tensor":
    """The probe's FGSM or PGD-``steps`` at Linf ``eps``, built as the battery builds its own (``attacks.build``)."""
    from dataclasses import replace

    from . import attacks

    spec = replace(attacks.parse("fgsm" if kind == "fgsm" else f"pgd:steps={int(steps)}"), eps=float(eps))
    return attacks.build(spec, model, num_classes=int(y.max()) + 1)(x, y)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def run_model_checks(
    model: "nn.Module",
    x: "Tensor",
    y: "Tensor",
    *,
    device,
    seed: int,
    eps_max: float | None = None,
    attack_fn: AttackFn | None = None,
    max_samples: int = 128,
    reuse: dict | None = None,
    attacks: bool = True,
) -> dict:
    """Probe ``model`` on at most ``max_samples`` of ``(x, y)`` and return the raw numbers (JSON-serializable).

    ``eps_max`` is the largest Linf eps of the battery (PGD-10, PGD-50 and FGSM run there; None skips them).
    ``reuse`` maps ``"fgsm"``/``"pgd10"`` to the battery's per-sample outcomes (True: still classified
    correctly) on the same leading samples: those probes are read from it, not rerun. ``attacks=False``
    leaves the attack probes out (a battery too cheap to pay for them).
    ``attack_fn(model, x, y, *, kind, eps, steps)`` returns adversarial inputs for ``kind`` ``"fgsm"`` or
    ``"pgd"`` (Linf); by default torchattacks runs, which needs inputs in [0, 1]. The model runs in eval
    mode and is returned to its previous mode.
    """
    import torch

    start = time.perf_counter()
    device = torch.device(device)
    x = x[:max_samples].to(device)
    y = y[:max_samples].to(device).long()
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    result: dict = {"n_samples": int(len(x)), "seed": int(seed), "device": str(device)}
    try:
        outputs, finite_out = _output_probes(model, x, y)
        result.update(outputs)
        result["gradients"] = _gradient_probe(model, x, y, finite_out=finite_out)
        if attacks and len(x) >= MIN_PAIRED_SAMPLES:
            result["attacks"] = _attack_probes(model, x, y, eps_max=eps_max, attack_fn=attack_fn, reuse=reuse or {})
        elif attacks:
            result["attacks"] = {"skipped": f"{len(x)} samples are fewer than the {MIN_PAIRED_SAMPLES} on which a "
                                            f"paired comparison can be conclusive at p < {ALPHA:g}"}
        else:
            result["attacks"] = {"skipped": "the plan left the attack probes out (no Linf eps, or fewer than "
                                            f"{MIN_PAIRED_SAMPLES} samples)"}
    finally:
        model.train(was_training)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _output_probes(model, x, y) -> tuple[dict, bool]:
    """Two forward passes of one batch: how far they differ, the range of the outputs and how far their rows
    sum from 1, and the clean accuracy; with whether every output is finite."""
    import torch

    result: dict = {}
    with torch.no_grad():
        out1 = model(x).float()
        out2 = model(x).float()
    finite_out = bool(torch.isfinite(out1).all())
    scale = max(1.0, float(out1[torch.isfinite(out1)].abs().max())) if out1.numel() and finite_out else 1.0
    diff = float((out1 - out2).abs().max()) if out1.numel() else 0.0
    result["determinism"] = {"max_rel_diff": _finite_or_none(diff / scale)}
    outputs = {"finite": finite_out, "min": None, "max": None, "max_row_sum_error": None}
    if finite_out and out1.numel():
        outputs["min"], outputs["max"] = float(out1.min()), float(out1.max())
        if out1.dim() == 2 and out1.shape[1] >= 2:
            outputs["max_row_sum_error"] = float((out1.sum(dim=1) - 1.0).abs().max())
    result["outputs"] = outputs
    result["clean_accuracy"] = float((out1.argmax(dim=1) == y).float().mean()) if out1.dim() == 2 else None
    return result, finite_out


def _gradient_probe(model, x, y, *, finite_out: bool) -> dict:
    """The input gradient of the cross-entropy: the share of samples where it is all zero, whether it is finite,
    and why there is none at all."""
    import torch
    import torch.nn.functional as F

    xg = x.clone().requires_grad_(True)
    gradients: dict = {"error": None}
    try:
        logits = model(xg)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        grad = torch.autograd.grad(loss, xg, allow_unused=True)[0] if loss.requires_grad else None
    except RuntimeError as exc:  # a graph cut by .detach(), numpy, integer casts ...
        grad, gradients["error"] = None, str(exc).splitlines()[0][:200]
    if grad is None:
        grad = torch.zeros_like(x)
        gradients["error"] = gradients["error"] or "the output does not depend differentiably on the input"
    flat = grad.reshape(len(x), -1)
    gradients["finite"] = bool(torch.isfinite(flat).all()) and finite_out
    gradients["zero_fraction"] = float((flat.abs().sum(dim=1) == 0).float().mean())
    return gradients


def _attack_probes(model, x, y, *, eps_max, attack_fn, reuse) -> dict:
    import torch

    if attack_fn is None:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            return {"skipped": f"inputs span [{lo:.3g}, {hi:.3g}], not [0, 1]; pass attack_fn to probe them"}
        attack_fn = _battery_attack

    seed = torch.initial_seed()

    def robust(kind: str, eps: float, steps: int) -> "Tensor":
        torch.manual_seed(seed)  # every probe from the same random start: PGD-10 and PGD-50 compare like for like
        x_adv = attack_fn(model, x, y, kind=kind, eps=eps, steps=steps)
        with torch.no_grad():
            return (model(x_adv).argmax(dim=1) == y).cpu()

    def reused(key: str) -> "Tensor":
        ok = torch.as_tensor(reuse[key])[:len(x)]
        if len(ok) != len(x):
            raise ValueError(f"the battery's {key} outcomes cover {len(ok)} samples, not the {len(x)} checked")
        return ok.bool().cpu()

    probes: dict = {"norm": "Linf", "eps_max": eps_max, "fgsm": None, "pgd10": None, "pgd50": None,
                    "fgsm_source": None, "pgd10_source": None}
    if not eps_max:
        return probes
    outcomes = {}  # probe -> per sample: still classified correctly
    try:
        for key, kind, steps in (("fgsm", "fgsm", 1), ("pgd10", "pgd", 10)):
            if key in reuse:
                outcomes[key], probes[key + "_source"] = reused(key), "battery"
            else:
                outcomes[key], probes[key + "_source"] = robust(kind, eps_max, steps), "checks"
        outcomes["pgd50"] = robust("pgd", eps_max, 50)
    except RuntimeError as exc:  # no gradient to follow at all: the gradient check reports why
        return {"skipped": "the attack probes failed: " + str(exc).splitlines()[0][:200]}
    for key, ok in outcomes.items():
        probes[key] = float(ok.double().mean())
    # the per-sample pairs the comparisons test: robust_only[a][b] = samples robust to a but fooled by b
    probes["robust_only"] = {a: {b: int((oa & ~ob).sum()) for b, ob in outcomes.items() if b != a}
                             for a, oa in outcomes.items()}
    return probes
