"""The report's images of the most fragile samples: ``fragile.json`` read back as every run file is (a regular
file of bounded size, its PNGs' base64 and signatures checked), shown as ``data:`` URIs within the section's
budget; samples that do not fit are left out and the page says so."""
from __future__ import annotations

import math
from pathlib import Path

from ..fragile import FRAGILE_FILE, FRAGILE_SHOWN, PANELS, SECTION_MAX_BYTES
from ..rundir import read_document

DISPLAY_SIDE = 96  # small images are shown enlarged, whole pixels at a time, to about this many px a side
MARKUP_BYTES = 1_000  # the markup of one sample's figure, beyond its images
SECTION_MARKUP_BYTES = 4_000  # the section's text around the figures


def _display(stored: list[int]) -> tuple[int, int]:
    """The shown width and height: the stored size enlarged by a whole factor up to :data:`DISPLAY_SIDE`."""
    h, w = stored
    factor = max(1, math.floor(DISPLAY_SIDE / max(h, w)))
    return w * factor, h * factor


def fragile_examples(run_dir: Path, *, budget: int = SECTION_MAX_BYTES) -> dict | None:
    """The fragile samples' figures for the report, or None when the run stored no images (vector data, an
    older run, no sample fooled). A ``fragile.json`` that is not what robaudit writes is refused in one line."""
    doc = read_document(run_dir, FRAGILE_FILE)
    if doc is None or not doc["samples"]:
        return None
    width, height = _display(doc["stored_size"])
    used, shown = SECTION_MARKUP_BYTES, []
    candidates = doc["samples"][:FRAGILE_SHOWN]
    for sample in candidates:
        uris = {name: f"data:image/png;base64,{sample[name]}" for name in PANELS}
        cost = sum(map(len, uris.values())) + MARKUP_BYTES
        if used + cost > budget:
            break
        used += cost
        shown.append({**{k: sample[k] for k in ("index", "label", "clean_pred", "adv_pred", "config")},
                      "amplification": f"{sample['amplification']:.3g}", **uris})
    left_out = (doc.get("left_out") or 0) + len(candidates) - len(shown)
    return {"samples": shown, "width": width, "height": height, "note": _note(doc, left_out, budget)}


def _note(doc: dict, left_out: int, budget: int) -> str | None:
    """What the page says about images scaled down or samples left out to stay within the budget."""
    parts = []
    if list(doc["stored_size"]) != list(doc["image_size"]):
        parts.append("images scaled down from {}×{} to {}×{} pixels".format(*doc["image_size"], *doc["stored_size"]))
    if left_out:
        parts.append(f"{left_out} of the most fragile samples not shown")
    if not parts:
        return None
    return " and ".join(parts).capitalize() + f" to keep this section under {budget // 1000} kB."
