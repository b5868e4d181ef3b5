"""The attack battery: a small spec language over torchattacks, plus statistical noise baselines.

A spec is ``name`` or ``name:key=value,key=value`` (values may be fractions such as ``8/255``),
e.g. ``pgd:eps=8/255,steps=10,alpha=2/255``. Specs are parsed once into :class:`AttackSpec`;
:func:`expand` applies the eps sweep; :func:`build` makes a callable ``(x, y) -> x_adv``. The named
batteries built from these specs are in :mod:`robaudit.batteries`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import limits
from .errors import RobauditError


@dataclass(frozen=True)
class AttackKind:
    """What an attack name means: its family, norm, whether eps bounds it, and its parameters."""

    name: str
    kind: str  # "adversarial" | "noise"
    norm: str  # "Linf" | "L2"
    bounded: bool  # False for minimal-perturbation attacks (cw, deepfool): no eps
    defaults: Mapping[str, Any]
    description: str
    norms: tuple[str, ...] = ()  # norms the spec may ask for; empty: only ``norm``


KINDS: dict[str, AttackKind] = {
    k.name: k
    for k in [
        AttackKind("fgsm", "adversarial", "Linf", True, {}, "fast gradient sign, one step"),
        AttackKind("pgd", "adversarial", "Linf", True, {"steps": 10, "alpha": None, "random_start": True},
                   "projected gradient descent (Madry et al.); alpha defaults to 2.5*eps/steps"),
        AttackKind("pgdl2", "adversarial", "L2", True, {"steps": 10, "alpha": None, "random_start": True},
                   "PGD in the L2 ball; alpha defaults to 2.5*eps/steps"),
        AttackKind("cw", "adversarial", "L2", False, {"c": 1.0, "kappa": 0.0, "steps": 50, "lr": 0.01},
                   "Carlini-Wagner L2, minimal perturbation (no eps)"),
        AttackKind("deepfool", "adversarial", "L2", False, {"steps": 50, "overshoot": 0.02},
                   "DeepFool, minimal perturbation (no eps); batched over samples"),
        AttackKind("autoattack", "adversarial", "Linf", True, {"version": "standard"},
                   "AutoAttack ensemble (APGD-CE, APGD-T, FAB, Square)", ("Linf", "L2")),
        AttackKind("apgd", "adversarial", "Linf", True, {"loss": "ce", "steps": 100, "n_restarts": 1, "rho": 0.75},
                   "APGD (Croce & Hein 2020), step size adapted per sample, CE or DLR loss; DLR needs 3 classes: "
                   "on 2 it runs as CE (the same sign steps)", ("Linf", "L2")),
        AttackKind("apgdt", "adversarial", "Linf", True, {"steps": 100, "n_restarts": 1, "targets": 9, "rho": 0.75},
                   "APGD-T, targeted DLR loss against the top `targets` other classes in turn; needs 4 classes: "
                   "on 3 it runs as APGD-DLR, on 2 as APGD-CE", ("Linf", "L2")),
        AttackKind("square", "adversarial", "Linf", True, {"n_queries": 1000, "p_init": 0.8},
                   "Square attack, black-box (score-based); on N x D inputs a random search over "
                   "coordinate subsets with the same schedule", ("Linf", "L2")),
        AttackKind("gaussian", "noise", "Linf", True, {},
                   "Gaussian noise with the L2 energy of a full-budget perturbation at eps", ("Linf", "L2")),
        AttackKind("uniform", "noise", "Linf", True, {},
                   "uniform noise with the L2 energy of a full-budget perturbation at eps", ("Linf", "L2")),
        AttackKind("saltpepper", "noise", "Linf", True, {},
                   "salt-and-pepper: a fraction eps^2 of the inputs set to 0 or 1 (same expected energy)", ("Linf", "L2")),
    ]
}
NORMS = {"linf": "Linf", "inf": "Linf", "l2": "L2"}

@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration: a known name, its parameters and (for bounded attacks) an eps."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    eps: float | None = None
    norm: str = "Linf"
    explicit_eps: bool = False

    @property
    def kind(self) -> str:
        return KINDS[self.name].kind

    @property
    def bounded(self) -> bool:
        return KINDS[self.name].bounded

    @property
    def param_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in KINDS[self.name].defaults.items()}
        out.update(dict(self.params))
        return out

    @property
    def label(self) -> str:
        """Name plus the parameters that differ from the defaults, e.g. ``pgd(steps=50)``; eps apart."""
        defaults = KINDS[self.name].defaults
        extra = [(k, v) for k, v in self.params if defaults.get(k, object()) != v]
        if self.norm != KINDS[self.name].norm:
            extra.insert(0, ("norm", self.norm))
        if not extra:
            return self.name
        return f"{self.name}({','.join(f'{k}={_fmt(v)}' for k, v in extra)})"

    def spec_string(self) -> str:
        """The spec in the language it was parsed from (round-trips exactly through :func:`parse`)."""
        items = []
        if self.eps is not None:
            items.append(f"eps={self.eps!r}")
        if self.norm != KINDS[self.name].norm:
            items.append(f"norm={self.norm}")
        items += [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params]
        return self.name + (":" + ",".join(items) if items else "")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def parse_number(text: str) -> float:
    """Parse ``0.1``, ``8/255`` or ``1e-3`` into a float; raise a one-line error otherwise."""
    text = text.strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(Fraction(num.strip()) / Fraction(den.strip()))
        return float(text)
    except (ValueError, ZeroDivisionError) as e:
        raise RobauditError(f"{text!r} is not a number (use e.g. 0.03 or 8/255)") from e


def parse_eps_list(text: str | Sequence[str] | None) -> list[float] | None:
    """Parse ``2/255,4/255,8/255`` into floats; every eps must lie in (0, 1] (:func:`robaudit.limits.eps`)."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    values = [parse_number(p) for p in parts if p.strip()]
    if not values:
        return None
    return [limits.eps(v, "--eps") for v in values]


def _parse_value(key: str, text: str, default: Any, *, what: str, norm: str) -> Any:
    """Parse one parameter value with the type of its default (bool, whole number, word or float), numbers
    within the range :func:`robaudit.limits.attack_param` gives them."""
    t = text.strip()
    if isinstance(default, bool):
        if t.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise RobauditError(f"{what} must be true or false")
        return t.lower() in ("true", "1", "yes")
    if isinstance(default, str):
        return t
    if t.lower() in ("true", "false", "yes", "no"):
        raise RobauditError(f"{what} must be a number")
    return limits.attack_param(key, parse_number(t), what, norm=norm)


CHOICES = {("autoattack", "version"): ("standard", "plus", "rand"), ("apgd", "loss"): ("ce", "dlr")}


def parse(text: str) -> AttackSpec:
    """Parse one spec string such as ``pgd:eps=8/255,steps=20`` into an :class:`AttackSpec`."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {"pgdlinf": "pgd", "aa": "autoattack", "saltandpepper": "saltpepper", "sp": "saltpepper",
               "gauss": "gaussian", "noise": "gaussian"}
    name = aliases.get(name, name)
    if name not in KINDS:
        raise RobauditError(f"unknown attack {name!r}: choose from {', '.join(KINDS)}")
    kind = KINDS[name]
    items = []
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise RobauditError(f"attack parameter {item!r} needs a value, e.g. {name}:{key}=...")
        if key not in ("eps", "norm", *kind.defaults) or (key == "eps" and not kind.bounded):
            if key == "eps":
                raise RobauditError(f"{name} finds a minimal perturbation and takes no eps")
            known = ", ".join(["eps", "norm", *kind.defaults]) if kind.bounded else ", ".join(kind.defaults)
            raise RobauditError(f"unknown parameter {key!r} for {name}: it takes {known}")
        items.append((key, value))
    norm = kind.norm
    for key, value in items:  # the norm first: the range of eps and alpha depends on it
        if key == "norm":
            norm = NORMS.get(value.strip().lower())
            if norm not in (kind.norms or (kind.norm,)):
                raise RobauditError(f"{name} does not support norm={value}")
    eps, params = None, []
    for key, value in items:
        if key == "eps":
            if not value.strip():
                raise RobauditError(f"{name}:eps= needs a positive number, e.g. {name}:eps=8/255")
            eps = limits.eps(parse_number(value), f"{name}:eps", norm=norm)
        elif key != "norm":
            default = kind.defaults[key] if kind.defaults[key] is not None else 0.0
            parsed = _parse_value(key, value, default, what=f"{name}:{key}", norm=norm)
            choices = CHOICES.get((name, key))
            if choices and parsed not in choices:
                raise RobauditError(f"{name}:{key}={value} is not one of {', '.join(choices)}")
            params.append((key, parsed))
    return AttackSpec(name, tuple(params), eps, norm, explicit_eps=eps is not None)


def expand(specs: Sequence[AttackSpec | str], eps: Sequence[float] | None) -> list[AttackSpec]:
    """Apply the eps sweep: every bounded attack without its own eps runs once per sweep value."""
    out: list[AttackSpec] = []
    for spec in specs:
        spec = parse(spec) if isinstance(spec, str) else spec
        if not spec.bounded or spec.explicit_eps:
            out.append(spec)
            continue
        values = eps if spec.norm == "Linf" or KINDS[spec.name].kind == "noise" else None
        if not values:
            if spec.norm == "L2":
                values = [0.5]
            else:
                raise RobauditError(f"{spec.name} needs an eps: give --eps or {spec.name}:eps=...")
        out.extend(replace(spec, eps=float(e)) for e in values)
    seen = set()
    unique = []
    for s in out:
        key = (s.label, s.eps)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


# -- building --------------------------------------------------------------------------------
AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build(spec: AttackSpec, model: nn.Module, *, num_classes: int, seed: int = 0) -> AttackFn:
    """Make ``fn(x, y) -> x_adv`` for one configuration; the model is attacked in eval mode."""
    p = spec.param_dict
    if spec.kind == "noise":
        return _noise(spec)
    import torchattacks  # imported lazily: it is slow to import and the CLI's --help should not pay

    name = spec.name
    if name == "fgsm":
        atk = torchattacks.FGSM(model, eps=spec.eps)
    elif name in ("pgd", "pgdl2"):
        alpha = p["alpha"] if p["alpha"] is not None else 2.5 * spec.eps / p["steps"]
        cls = torchattacks.PGD if name == "pgd" else torchattacks.PGDL2
        atk = cls(model, eps=spec.eps, alpha=alpha, steps=p["steps"], random_start=p["random_start"])
    elif name == "cw":
        atk = torchattacks.CW(model, c=p["c"], kappa=p["kappa"], steps=p["steps"], lr=p["lr"])
    elif name == "deepfool":
        atk = batched_deepfool(model, steps=p["steps"], overshoot=p["overshoot"])
    elif name == "autoattack":
        # APGD-T/FAB-T target other classes and APGD-DLR ranks three logits: torchattacks fails below these
        needed = 3 if p["version"] == "rand" else 4
        if num_classes < needed:
            hint = "use pgd, or autoattack:version=rand" if num_classes == 3 else "use pgd"
            raise RobauditError(f"autoattack ({p['version']}) needs at least {needed} classes "
                                f"(this data set has {num_classes}): {hint}")
        atk = _ImagesOnly(torchattacks.AutoAttack(model, norm=spec.norm, eps=spec.eps, version=p["version"],
                                                  n_classes=num_classes, seed=seed), spec.label)
    elif name in ("apgd", "apgdt"):
        atk = AnyShape(lambda m: apgd(spec, m, num_classes=num_classes, seed=seed), model)
    elif name == "square":
        atk = _Square(torchattacks.Square(model, norm=spec.norm, eps=spec.eps, n_queries=p["n_queries"],
                                          p_init=p["p_init"], seed=seed),
                      VectorSquare(model, norm=spec.norm, eps=spec.eps, n_queries=p["n_queries"],
                                   p_init=p["p_init"], seed=seed))
    else:  # pragma: no cover - KINDS and this table are kept in step
        raise RobauditError(f"attack {name} has no builder")
    return atk


def batch_seed(seed: int, batch: int, config: int) -> int:
    """The seed of configuration ``config`` on global batch ``batch``: what a batch draws does not depend on
    which process runs it, nor on the batches before it."""
    return int(np.random.SeedSequence([int(seed), int(batch), int(config)]).generate_state(1)[0])


def reseed(attack: AttackFn, seed: int) -> None:
    """Make the next call of a built attack draw from ``seed`` alone: torch's global generators (PGD's random
    start, the noise baselines) and the attack's own seeds (Square, AutoAttack's members)."""
    torch.manual_seed(seed)
    for part in _seeded_parts(attack):
        part.seed = seed


def _seeded_parts(attack) -> list:
    """The objects inside a built attack that reseed themselves from a ``seed`` attribute at every call."""
    if isinstance(attack, _ImagesOnly):
        return _seeded_parts(attack.atk)
    if isinstance(attack, _Square):
        return [attack.image_attack, attack.vector_attack]
    if isinstance(attack, AnyShape):
        return [attack.image_attack, attack.flat_attack]
    members = getattr(getattr(attack, "_autoattack", None), "attacks", None)
    return list(members) if members is not None else []


def batched_deepfool(model: nn.Module, *, steps: int = 50, overshoot: float = 0.02):
    """torchattacks' DeepFool with its per-sample loop replaced by one batched pass per step.

    Same algorithm, step for step, as ``torchattacks.DeepFool``: every still-correct sample takes the
    step towards its nearest linearized boundary (overshoot per step, clipped to [0, 1]) and stops once
    misclassified; a step costs one forward of the active samples and one backward per class.
    """
    import torchattacks

    class BatchedDeepFool(torchattacks.DeepFool):
        def forward_return_target_labels(self, images, labels):
            adv = images.clone().detach().to(self.device)
            labels = labels.clone().detach().to(self.device).long()
            target_labels = labels.clone()
            active = torch.ones(len(adv), dtype=torch.bool, device=adv.device)
            for _ in range(self.steps):
                idx = active.nonzero().squeeze(1)
                if len(idx) == 0:
                    break
                x = adv[idx].clone().requires_grad_(True)
                fs = self.get_logits(x)
                pre = torch.max(fs, dim=1)[1]
                label = labels[idx]
                done = pre != label
                target_labels[idx[done]] = pre[done]
                active[idx[done]] = False
                keep = ~done
                if not keep.any():
                    break
                # the Jacobian, one backward per class: samples are independent in eval mode
                ws = torch.stack([torch.autograd.grad(fs[:, k].sum(), x, retain_graph=k + 1 < fs.shape[1])[0]
                                  for k in range(fs.shape[1])], dim=1)[keep].flatten(2)
                fs, label, xk = fs.detach()[keep], label[keep], x.detach()[keep]
                rows = torch.arange(len(label), device=fs.device)
                f_prime = fs - fs[rows, label][:, None]
                w_prime = ws - ws[rows, label][:, None]
                value = f_prime.abs() / torch.norm(w_prime, p=2, dim=2)
                value[rows, label] = math.inf  # the true class is no boundary
                hat = torch.min(value, dim=1)[1]
                w_hat = w_prime[rows, hat]
                delta = f_prime[rows, hat].abs()[:, None] * w_hat / torch.norm(w_hat, p=2, dim=1, keepdim=True) ** 2
                step = (xk + (1 + self.overshoot) * delta.view_as(xk)).clamp(0, 1)
                adv[idx[keep]] = step
                target_labels[idx[keep]] = hat
            return adv.detach(), target_labels

    return BatchedDeepFool(model, steps=steps, overshoot=overshoot)


def apgd(spec: AttackSpec, model: nn.Module, *, num_classes: int, seed: int = 0):
    """torchattacks' APGD or APGD-T for ``spec`` (an ``apgd`` or ``apgdt`` spec), substituting where the class count
    leaves a loss undefined: DLR ranks three logits, targeted DLR four. On two classes every margin loss gives
    APGD-CE's sign steps, so CE stands in; on three, APGD-T runs as untargeted APGD-DLR."""
    import torchattacks

    p = spec.param_dict
    common = dict(norm=spec.norm, eps=spec.eps, steps=p["steps"], n_restarts=p["n_restarts"], rho=p["rho"], seed=seed)
    targets = min(int(p.get("targets", 0)), num_classes - 1)
    if spec.name == "apgdt" and num_classes >= 4 and targets >= 1:
        return torchattacks.APGDT(model, n_classes=targets + 1, **common)
    loss = "dlr" if spec.name == "apgdt" or p.get("loss") == "dlr" else "ce"
    return torchattacks.APGD(model, loss=loss if num_classes >= 3 else "ce", **common)


class _Unflatten(nn.Module):
    """A model seen through N x D x 1 x 1 inputs: reshapes them back to the shape it takes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.shape = model, ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.reshape(len(x), *self.shape))


class AnyShape:
    """A torchattacks attack written for N x C x H x W images, on any input shape: other inputs ride as
    N x D x 1 x 1 (exact for attacks that only use per-sample norms and signs, as APGD does)."""

    def __init__(self, make: Callable[[nn.Module], Any], model: nn.Module) -> None:
        self.view = _Unflatten(model)
        self.image_attack, self.flat_attack = make(model), make(self.view)

    def __call__(self, x, y):
        if x.dim() == 4:
            return self.image_attack(x, y)
        self.view.shape = tuple(x.shape[1:])
        return self.flat_attack(x.reshape(len(x), -1, 1, 1), y).reshape(x.shape)


class _ImagesOnly:
    """An attack torchattacks runs on images only: a one-line error for other input shapes."""

    def __init__(self, atk, label: str) -> None:
        self.atk, self.label = atk, label

    def __call__(self, x, y):
        if x.dim() != 4:
            raise RobauditError(f"{self.label} needs image inputs (N x C x H x W), not {tuple(x.shape)}: "
                                "on vectors use pgd, pgdl2 and square")
        return self.atk(x, y)


class _Square:
    """torchattacks' Square for images (N x C x H x W); :class:`VectorSquare` for any other input shape."""

    def __init__(self, image_attack, vector_attack) -> None:
        self.image_attack, self.vector_attack = image_attack, vector_attack

    def __call__(self, x, y):
        return (self.image_attack if x.dim() == 4 else self.vector_attack)(x, y)


def _p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Square's schedule of the share of coordinates changed per query (rescaled to ``n_queries``)."""
    it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


class VectorSquare:
    """Square's random search (Andriushchenko et al. 2020) for inputs without a spatial layout (N x D).

    torchattacks' Square needs N x C x H x W images, and no reshape of a vector into one keeps its
    windows valid. Here a "square" is a random subset of ``p * D`` coordinates, ``p`` following
    Square's schedule; a proposal is kept when it lowers the margin loss (correct logit minus the
    best other). Linf: the subset's coordinates jump to a random vertex of the eps box; L2: they get
    fresh Gaussian directions and the whole perturbation is rescaled to norm eps. Inputs stay in [0, 1].
    Queries: ``n_queries`` per sample at most (one forward pass of the still-unfooled samples each).
    """

    def __init__(self, model: nn.Module, *, norm: str, eps: float, n_queries: int, p_init: float,
                 seed: int = 0) -> None:
        self.model, self.norm, self.eps = model, norm, float(eps)
        self.n_queries, self.p_init, self.seed = int(n_queries), float(p_init), int(seed)

    def _margin(self, x: torch.Tensor, y: torch.Tensor, shape) -> torch.Tensor:
        logits = self.model(x.view(len(x), *shape))
        correct = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).max(1).values
        return correct - others

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return delta.clamp(-self.eps, self.eps)
        norms = delta.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return delta * (self.eps / norms)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)

        def rand(*size):  # drawn on the CPU so that every device gives the same numbers
            return torch.rand(*size, generator=gen).to(x.device, x.dtype)

        def randn(*size):
            return torch.randn(*size, generator=gen).to(x.device, x.dtype)

        shape = x.shape[1:]
        n, d = len(x), x[0].numel()
        flat = x.detach().reshape(n, d)
        y = y.to(x.device).long()
        with torch.no_grad():
            if self.norm == "Linf":
                delta = self.eps * torch.sign(rand(n, d) - 0.5)
            else:
                delta = self._project(randn(n, d))
            best = (flat + delta).clamp(0, 1)
            margin = self._margin(best, y, shape)
            for it in range(self.n_queries):
                todo = (margin > 0).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                k = max(1, min(d, round(_p_selection(self.p_init, it, self.n_queries) * d)))
                chosen = rand(len(todo), d).argsort(dim=1)[:, :k]
                mask = torch.zeros(len(todo), d, dtype=torch.bool, device=x.device).scatter_(1, chosen.to(x.device), True)
                current = best[todo] - flat[todo]
                if self.norm == "Linf":
                    proposal = torch.where(mask, self.eps * torch.sign(rand(len(todo), d) - 0.5), current)
                else:
                    scale = current.norm(dim=1, keepdim=True).clamp_min(self.eps) / math.sqrt(k)
                    proposal = self._project(torch.where(mask, randn(len(todo), d) * scale, current))
                candidate = (flat[todo] + proposal).clamp(0, 1)
                m = self._margin(candidate, y[todo], shape)
                better = m < margin[todo]
                best[todo[better]] = candidate[better]
                margin[todo[better]] = m[better]
        return best.view_as(x)


def _noise(spec: AttackSpec) -> AttackFn:
    """Statistical noise with the L2 energy of a full-budget perturbation (``eps*sqrt(d)`` in Linf)."""

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = x[0].numel()
        target = spec.eps * math.sqrt(d) if spec.norm == "Linf" else spec.eps
        if spec.name == "saltpepper":
            amount = min(1.0, (target**2) / d)  # each hit moves a component by about 1
            hit = torch.rand_like(x) < amount
            value = (torch.rand_like(x) < 0.5).to(x.dtype)
            return torch.where(hit, value, x)
        raw = torch.randn_like(x) if spec.name == "gaussian" else torch.rand_like(x) * 2 - 1
        norms = raw.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        return (x + raw * (target / norms)).clamp(0, 1)

    return fn
