"""The adversarial examples of the most fragile samples, as the images the report shows (``fragile.json``).

For image data the report shows each of the samples fooled by the most configurations as its clean image, its
adversarial image and the perturbation amplified to the full range. The report never runs the model: at the end
of the analysis these few samples are attacked again, each with one configuration that fooled it (the smallest
budget), on the whole batch it lay in and seeded as the battery seeds that batch
(:func:`robaudit.attacks.batch_seed`), so the perturbed sample is the battery's own at no cost to the battery.
The three images are PNGs, stored base64 in one small JSON document of the run, within :data:`PNG_BUDGET`.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import attacks as atk
from .models import LoadedModel
from .samples import config_key, most_fragile

FRAGILE_FILE = "fragile.json"
FRAGILE_SHOWN = 10  # the samples the report's table lists, and the images stored for them
SECTION_MAX_BYTES = 300_000  # the report's section of these images, markup included
PNG_BUDGET = 200_000  # bytes of PNG stored: base64 (4/3) and the markup stay under SECTION_MAX_BYTES
SIDE_START = 256  # images larger than this (px) are scaled down before they are weighed
SIDE_MIN = 16  # images are never scaled below this to fit the budget: samples are left out instead
PANELS = ("clean", "adversarial", "perturbation")


def is_image_shape(shape: Sequence[int]) -> bool:
    """Whether samples of ``shape`` are images the report can show: C×H×W with one (gray) or three (RGB)
    channels."""
    return len(shape) == 3 and shape[0] in (1, 3)


@dataclass
class FragileExample:
    """One fragile sample attacked again: its position, label, predictions and both inputs (C×H×W in [0, 1])."""

    index: int
    label: int
    clean_pred: int
    adv_pred: int
    config: str
    clean: np.ndarray
    adversarial: np.ndarray


def _preference(spec: atk.AttackSpec, i: int) -> tuple:
    """Which fooling configuration a sample is shown under: adversarial before noise, bounded before minimal,
    the smallest eps, then battery order."""
    eps = spec.eps if spec.eps is not None else math.inf
    return (spec.kind != "adversarial", not spec.bounded, eps, i)


def pick(samples: pd.DataFrame, specs: Sequence[atk.AttackSpec], k: int = FRAGILE_SHOWN) -> list[tuple[int, int]]:
    """``(sample index, configuration index)`` of the ``k`` most fragile samples (as the report ranks them),
    each with the configuration it is shown under (:func:`_preference`)."""
    columns = {i: f"{config_key(s.label, s.eps)}:correct" for i, s in enumerate(specs)}
    out = []
    for row in most_fragile(samples, k).to_dict("records"):
        fooled = [i for i, col in columns.items() if col in row and row[col] == 0]
        if fooled:
            out.append((int(row["index"]), min(fooled, key=lambda i: _preference(specs[i], i))))
    return out


def attack_again(full: nn.Module, data, picks: Sequence[tuple[int, int]], specs: Sequence[atk.AttackSpec], *,
                 batch_size: int, seed: int, device: torch.device) -> list[FragileExample]:
    """The adversarial inputs of ``picks``: each (batch, configuration) pair once, on the whole batch, its draws
    seeded from (seed, batch, configuration) as in the battery; ``full`` is the model behind its normalization,
    on ``device``, as the attacks see it."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, i in picks:
        groups.setdefault((index // batch_size, i), []).append(index)
    found: dict[int, FragileExample] = {}
    for (b, i), indices in sorted(groups.items()):
        start = b * batch_size
        rows = torch.arange(start, min(start + batch_size, len(data.y)))
        x, y = data.rows(rows, device), data.y[rows].to(device)
        attack = atk.build(specs[i], full, num_classes=data.num_classes, seed=seed)
        atk.reseed(attack, atk.batch_seed(seed, b, i))
        try:
            adv = attack(x, y).detach()
        finally:
            full.eval()  # an attack may switch the mode it queries
        mine = torch.tensor([j - start for j in indices], device=device)
        with torch.no_grad():
            clean_pred, adv_pred = full(x[mine]).argmax(1).tolist(), full(adv[mine]).argmax(1).tolist()
        for k, j in enumerate(indices):
            found[j] = FragileExample(j, int(y[mine[k]]), clean_pred[k], adv_pred[k], config_key(
                specs[i].label, specs[i].eps), x[mine[k]].cpu().numpy(), adv[mine[k]].cpu().numpy())
    return [found[index] for index, _ in picks]


def _png(image: np.ndarray, size: tuple[int, int]) -> bytes:
    """A C×H×W image in [0, 1] as PNG bytes (gray or RGB), scaled to ``size`` (H, W) by area averaging."""
    from PIL import Image

    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    if size != pixels.shape[1:]:
        picture = picture.resize((size[1], size[0]), Image.Resampling.BOX)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def perturbation_image(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, float]:
    """The perturbation amplified to the full range (0.5 where unchanged) and the amplification factor."""
    delta = adversarial.astype(np.float64) - clean.astype(np.float64)
    peak = float(np.abs(delta).max())
    if peak == 0:
        return np.full_like(delta, 0.5), 1.0
    return 0.5 + delta / (2 * peak), 1 / (2 * peak)


def _encoded(examples: Sequence[FragileExample], size: tuple[int, int]) -> list[dict]:
    """Each example's record: its numbers and its three images as base64 PNGs of ``size``."""
    out = []
    for e in examples:
        pert, gain = perturbation_image(e.clean, e.adversarial)
        pngs = [_png(img, size) for img in (e.clean, e.adversarial, pert)]
        out.append({"index": e.index, "label": e.label, "clean_pred": e.clean_pred, "adv_pred": e.adv_pred,
                    "config": e.config, "amplification": round(gain, 3), "bytes": sum(map(len, pngs)),
                    **{name: base64.b64encode(png).decode("ascii") for name, png in zip(PANELS, pngs)}})
    return out


def fragile_document(examples: Sequence[FragileExample], *, budget: int = PNG_BUDGET) -> dict:
    """``fragile.json``: the examples' images within ``budget`` bytes of PNG, halving their size (never below
    :data:`SIDE_MIN`) and then leaving out the last samples when they do not fit; both are recorded."""
    h, w = examples[0].clean.shape[1:]
    scale = 1
    while max(h, w) // scale > SIDE_START:
        scale *= 2
    while True:
        size = (max(1, h // scale), max(1, w // scale))
        records = _encoded(examples, size)
        if sum(r["bytes"] for r in records) <= budget or max(size) // 2 < SIDE_MIN:
            break
        scale *= 2
    kept, total = [], 0
    for r in records:
        total += r.pop("bytes")
        if total > budget:
            break
        kept.append(r)
    return {"image_size": [h, w], "stored_size": list(size), "budget_bytes": budget,
            "left_out": len(records) - len(kept), "samples": kept}


def fragile_images(loaded: LoadedModel, data, specs: Sequence[atk.AttackSpec], samples: pd.DataFrame | None, *,
                   batch_size: int, seed: int) -> dict | None:
    """``fragile.json`` of an analysis of ``loaded`` (in its context: device and normalization; ``samples``: the
    analysis' ``samples.csv``), or None: not image data, or no sample was fooled."""
    if samples is None or not is_image_shape(tuple(data.input_shape)):
        return None
    picks = pick(samples, specs)
    if not picks:
        return None
    full = loaded.normalized(ndim=len(data.input_shape) + 1)
    return fragile_document(attack_again(full, data, picks, specs, batch_size=batch_size, seed=seed,
                                         device=loaded.device or torch.device("cpu")))
