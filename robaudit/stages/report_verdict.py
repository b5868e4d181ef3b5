"""The report's verdict: its opening sentences and number cards, the attack x eps accuracy matrix, and the
sanity section's groups.

Every card is marked by the sanity checks that concern its number: a card is never green while one of them
warns. Minimal-perturbation attacks (CW, DeepFool) speak by success rate and perturbation size, never accuracy.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup

from .. import sanity, verdict
from ..batteries import describe
from ..intervals import format_interval
from ..labels import CLEAN, WORST_CASE, WORST_CASE_MEANING, attack_name
from ..rundir import Run, rows_at
from .html import Cell, Column, Row, Table, fmt_eps, fmt_num, fmt_pct, fmt_points, fmt_re, fmt_size, is_missing, sort_key

__all__ = ["METHOD_NAMES", "minimal_rows", "sanity_group", "value_of", "verdict_section"]

METHOD_NAMES = {"atlr": "AT-LR", "at-lr": "AT-LR", "at": "adversarial training", "pgd-at": "adversarial training",
                "layerwise": "layer-wise perturbation training", "lat": "layer-wise perturbation training"}


def _at_eps(df: pd.DataFrame, attack: str, eps: float, norm: str | None = None) -> float | None:
    rows = rows_at(df, attack, eps, norm)
    return None if rows.empty else float(rows["accuracy"].iloc[0])


def _ci_text(df: pd.DataFrame, attack: str, eps: float | None = None, norm: str | None = None) -> str:
    """``; 95 % CI 41.2-48.9 %`` for a card's line, from the row's interval; empty without one."""
    rows = rows_at(df, attack, eps, norm)
    if rows.empty or "ci_low" not in rows.columns:
        return ""
    ci = format_interval(rows["ci_low"].iloc[0], rows["ci_high"].iloc[0], unit=" %")
    return f"; 95 % CI {ci}" if ci else ""


def _clean_acc(df: pd.DataFrame | None) -> tuple[float | None, Any]:
    if df is None:
        return None, None
    rows = df[df["attack"] == CLEAN]
    if rows.empty:
        return None, None
    n = rows["n_samples"].iloc[0] if "n_samples" in rows.columns else None
    return float(rows["accuracy"].iloc[0]), n


def minimal_rows(df: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of minimal-perturbation attacks (CW, DeepFool): adversarial, no eps."""
    if df is None:
        return pd.DataFrame(columns=["attack"])
    return df[df["eps"].isna() & (df["kind"] == "adversarial") & ~df["attack"].isin([CLEAN, WORST_CASE])]


def value_of(r, name: str) -> Any:
    """A field of a frame row (``itertuples``) that an older run may lack; None then."""
    return getattr(r, name, None)


def _checks_note(model_checks: dict | None) -> str:
    """How many samples the model checks used and what they cost next to the battery."""
    if not model_checks or model_checks.get("n_samples") is None:
        return ""
    n = int(model_checks["n_samples"])
    text = f"The model checks used {n} sample{'s' if n != 1 else ''}"
    plan = model_checks.get("plan") or {}
    if plan.get("share") is not None:
        text += (f", sized to cost at most {100 * plan['share']:.0f} % of the battery "
                 f"({plan.get('check_cost_per_sample', 0):.3g} vs {plan.get('battery_cost_per_sample', 0):.3g} "
                 "forward+backward passes per sample)")
    if plan.get("note"):  # e.g. raised to the samples a conclusive comparison needs, beyond the share
        text += f" ({plan['note']})"
    if plan.get("reused"):
        text += "; reused the battery's own " + " and ".join(
            {"fgsm": "FGSM", "pgd10": "PGD-10"}.get(k, k) for k in plan["reused"]) + " outcomes"
    if model_checks.get("seconds") is not None and model_checks.get("battery_seconds"):
        text += f"; they took {model_checks['seconds']:.3g} s against the battery's {model_checks['battery_seconds']:.3g} s"
    if model_checks.get("skipped"):
        text += f" ({model_checks['skipped']})"
    elif (model_checks.get("attacks") or {}).get("skipped"):
        text += f"; no attack probes ran ({model_checks['attacks']['skipped']})"
    return text + "."


def sanity_group(title: str, checks: list[sanity.Check], model_checks: dict | None = None, *,
                  introduced: list[str] = ()) -> dict:
    """One model's part of the sanity section: its checks as a table, what hardening introduced, what they cost."""
    warns = [c for c in checks if c.status == "warn"]
    new = ("Hardening introduced " + ("a warning" if len(introduced) == 1 else f"{len(introduced)} warnings")
           + " that the audited model did not have (" + "; ".join(introduced) + "): the classic sign of a defence "
           "that only masks gradients. Do not read the hardened accuracies as robustness until a stronger or "
           "gradient-free attack confirms them.") if introduced else ""
    rows = [Row([Cell(Markup('<span class="badge {0}">{0}</span>').format(c.status), c.status),
                 Cell(c.name), Cell(c.detail, cls="wrap"), Cell(getattr(c, "threshold", ""), cls="wrap")])
            for c in checks]
    return {"title": title, "introduced": new, "note": _checks_note(model_checks),
            "warn": f"{len(warns)} of {len(checks)} checks warn." if warns else "",
            "table": Table([Column("Status"), Column("Check"), Column("Numbers"), Column("Threshold")], rows)}


def _sanity_sentence(who: str, checks: list[sanity.Check]) -> Markup:
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "skip")}
    skipped = f" ({counts['skip']} skipped for lack of data)" if counts["skip"] else ""
    if not counts["warn"]:
        return Markup("{}: all {} sanity checks that ran pass{}.").format(who, counts["pass"], skipped)
    names = "; ".join(c.name for c in checks if c.status == "warn")
    verb = "warns" if counts["warn"] == 1 else "warn"
    why = []
    if any(c.status == "warn" and c.name == sanity.CHANCE for c in checks):
        why.append("The model is at or near chance: every robustness number is noise.")
    if any(c.status == "warn" and c.name != sanity.CHANCE and getattr(c, "masking", True) for c in checks):
        why.append("The model may be masking gradients.")
    why += sorted({f"{c.meaning[:1].upper()}{c.meaning[1:]}." for c in checks
                   if c.status == "warn" and not getattr(c, "masking", True) and getattr(c, "meaning", "")})
    return Markup("{}: <strong>{} sanity check{} {}</strong>: {}. {} See section 5.{}").format(
        who, counts["warn"], "" if counts["warn"] == 1 else "s", verb, names, " ".join(why), Markup(skipped))


def verdict_section(run: Run, hardened: Run | None, acc_cmp: pd.DataFrame, settings: dict | None,
             checks: list[sanity.Check], checks_after: list[sanity.Check] | None) -> dict:
    """The report's opening: plain sentences and number cards, each card warned by the checks it concerns."""
    man = run.manifest
    sentences: list[Markup] = []
    cards: list[dict] = []
    acc = run.accuracy
    clean, n = _clean_acc(acc)
    n = n if n is not None else man.get("n_samples")
    if clean is not None:
        sentences.append(Markup("Clean accuracy <strong>{}</strong> ({} samples).").format(fmt_pct(clean), fmt_num(n)))
        cards.append({"label": "Clean accuracy", "value": fmt_pct(clean), "sub": f"{fmt_num(n)} samples{_ci_text(acc, CLEAN)}",
                      "cls": "",
                      "concerns": [c for c in checks if c.name == sanity.CHANCE]})
    mvl = run.mvl or {}
    _verdict_worst_case(acc, mvl, checks, sentences, cards, battery=man.get("battery"))
    _verdict_minimal(acc, sentences)
    _verdict_mvl(mvl, sentences, cards)
    if hardened is not None or not acc_cmp.empty:
        _verdict_hardening(acc_cmp, mvl, settings, checks_after, sentences, cards)
    _verdict_sanity(checks, checks_after, sentences, cards)
    return {"sentences": sentences, "cards": cards, "table": _verdict_table(acc, hardened.accuracy if hardened else None)}


def _verdict_worst_case(acc: pd.DataFrame | None, mvl: dict, checks, sentences: list, cards: list, *,
                        battery: str | None) -> None:
    """Worst case over the battery at the ranking eps (else the largest), and at the other eps; what the worst
    case is, and which battery (``battery``, as the manifest records it) produced it."""
    worst = acc[(acc["attack"] == WORST_CASE) & acc["eps"].notna()].sort_values("eps") if acc is not None else None
    if acc is not None and worst is not None:
        head_eps = None
        if mvl.get("eps") is not None and _at_eps(acc, WORST_CASE, float(mvl["eps"])) is not None:
            head_eps = float(mvl["eps"])
        elif not worst.empty:
            head_eps = float(worst["eps"].iloc[-1])
        if head_eps is not None:
            head_norm = worst.loc[np.isclose(worst["eps"], head_eps), "norm"].iloc[0]
            w = _at_eps(acc, WORST_CASE, head_eps, head_norm)
            a = _at_eps(acc, str(mvl["attack"]), head_eps, head_norm) if mvl.get("attack") else None
            if a is not None:
                sentences.append(Markup("Under {} at eps {}, accuracy falls to <strong>{}</strong>; worst case over "
                                        "the attacks run <strong>{}</strong>.").format(
                    attack_name(mvl["attack"]), fmt_eps(head_eps), fmt_pct(a), fmt_pct(w)))
            else:
                sentences.append(Markup("At eps {}, worst-case accuracy over the attacks run is <strong>{}</strong>.")
                                 .format(fmt_eps(head_eps), fmt_pct(w)))
            sentences.append(Markup("The worst case is {}. Battery: {}.").format(WORST_CASE_MEANING, describe(battery)))
            cards.append({"label": "Worst-case accuracy", "value": fmt_pct(w),
                          "sub": f"eps {fmt_eps(head_eps)} {head_norm}, an upper bound"
                                 f"{_ci_text(acc, WORST_CASE, head_eps, head_norm)}", "cls": "", "concerns": checks})
            others = [(e, nm, v) for e, nm, v in worst[["eps", "norm", "accuracy"]].itertuples(index=False)
                      if not (np.isclose(e, head_eps) and nm == head_norm)]
            if others:
                sentences.append(Markup("Worst case at the other eps: {}.").format(
                    ", ".join(f"{fmt_pct(v)} at eps {fmt_eps(e)}" + (f" {nm}" if nm != head_norm else "")
                              for e, nm, v in others)))


def _verdict_minimal(acc: pd.DataFrame | None, sentences: list) -> None:
    """Minimal-perturbation attacks (CW, DeepFool) speak by success rate and perturbation size, not accuracy."""
    for r in minimal_rows(acc).itertuples(index=False):
        if is_missing(value_of(r, "pert_median")):
            continue
        over_all = value_of(r, "pert_median_all")
        if is_missing(over_all):
            lead = Markup("")
        elif float(over_all) == float("inf"):  # the median sample was never fooled
            lead = Markup("fewer than half of all samples are misclassified at any {} perturbation it found "
                          "(median over all samples <strong>∞</strong>); ").format(r.norm)
        else:
            lead = Markup("half of all samples are misclassified at an {} perturbation of <strong>{}</strong>; "
                          ).format(r.norm, fmt_size(over_all))
        sentences.append(Markup("{} (minimal perturbation): {}it fools {} of the correctly classified samples, with a "
                                "median {} perturbation of {} over the fooled ones (90th percentile {}).").format(
            attack_name(r.attack), lead, fmt_pct(value_of(r, "success_rate")), r.norm, fmt_re(r.pert_median),
            fmt_re(value_of(r, "pert_p90"))))


def _verdict_mvl(mvl: dict, sentences: list, cards: list) -> None:
    """The MVL list in a sentence, and its first layer as a card."""
    layers = mvl.get("layers") or []
    if layers:
        listed = ", ".join(f"{item.get('layer')} (RE {fmt_re(item.get('score'))})" for item in layers)
        where = f"{attack_name(mvl.get('attack', '?'))}" + (f" at eps {fmt_eps(mvl['eps'])}" if mvl.get("eps") is not None else "")
        sentences.append(Markup("The most vulnerable layers under {} are {}.").format(where, listed))
        cards.append({"label": "Most vulnerable layer", "value": str(layers[0].get("layer")),
                      "sub": f"RE {fmt_re(layers[0].get('score'))}; {len(layers)} MVL layers", "cls": ""})


def _verdict_hardening(acc_cmp: pd.DataFrame, mvl: dict, settings: dict | None, checks_after, sentences: list,
                       cards: list) -> None:
    """Worst-case and clean accuracy before and after hardening, from comparison.csv."""
    method = (settings or {}).get("method")
    method = METHOD_NAMES.get(str(method).lower(), method) if method else "hardening"
    parts = []
    for r in acc_cmp[acc_cmp["attack"] == WORST_CASE].dropna(subset=["delta"]).sort_values("eps").itertuples(index=False):
        verb = "rose" if r.delta >= 0 else "fell"
        parts.append(f"at eps {fmt_eps(r.eps)} it {verb} from {fmt_pct(r.before)} to {fmt_pct(r.after)} "
                     f"({fmt_points(r.delta)})")
    clean_rows = acc_cmp[acc_cmp["attack"] == CLEAN].dropna(subset=["delta"])
    if parts:
        sentences.append(Markup("After {}, worst-case accuracy changed: <strong>{}</strong>.").format(method, "; ".join(parts)))
    if not clean_rows.empty:
        r = clean_rows.iloc[0]
        sentences.append(Markup("Clean accuracy after {}: {} (was {}, {}).").format(
            method, fmt_pct(r["after"]), fmt_pct(r["before"]), fmt_points(r["delta"])))
    head = acc_cmp[acc_cmp["attack"] == WORST_CASE].dropna(subset=["delta"])
    if mvl.get("eps") is not None and not head.empty:
        match = head[np.isclose(head["eps"].astype(float), float(mvl["eps"]))]
        head = match if not match.empty else head
    if not head.empty:
        r = head.iloc[-1]
        cards.append({"label": "After hardening", "value": fmt_pct(r["after"]),
                      "sub": f"worst case, eps {fmt_eps(r['eps'])}: {fmt_points(r['delta'])}",
                      "cls": "pass" if r["delta"] > 0 else "", "concerns": checks_after or []})
    if not parts and clean_rows.empty:
        sentences.append(Markup("The model was hardened ({}), but no before/after accuracy was recorded.").format(method))


def _verdict_sanity(checks, checks_after, sentences: list, cards: list) -> None:
    """The sanity verdict of both models, what hardening introduced, and the warn marks on every card."""
    sentences.append(_sanity_sentence("Audited model", checks))
    if checks_after is not None:
        sentences.append(_sanity_sentence("Hardened model", checks_after))
        introduced = verdict.introduced_warnings(checks, checks_after)
        if introduced:
            sentences.append(Markup("<strong>Hardening introduced {}</strong> ({}): the classic sign of a defence "
                                    "that only masks gradients.").format(
                "a sanity warning" if len(introduced) == 1 else f"{len(introduced)} sanity warnings",
                "; ".join(introduced)))
    if checks_after is None:
        cards.append(_sanity_card("Sanity checks", checks))
    else:  # one card per model: their counts are never added up
        cards += [_sanity_card("Sanity checks, audited model", checks),
                  _sanity_card("Sanity checks, hardened model", checks_after)]
    for card in cards:  # a card is never green while a check that concerns its number warns
        concerns = card.pop("concerns", [])
        if any(c.status == "warn" for c in concerns):
            card["cls"] = "warn"
            card["sub"] += f"; {sum(c.status == 'warn' for c in concerns)} check(s) warn"


def _sanity_card(label: str, checks: list[sanity.Check]) -> dict:
    """One model's sanity verdict as a card: how many of its checks warn, pass and were skipped."""
    count = {s: sum(c.status == s for c in checks) for s in ("warn", "pass", "skip")}
    return {"label": label, "value": f"{count['warn']} warn" if count["warn"] else "all pass",
            "sub": f"{count['pass']} pass, {count['skip']} skipped of {len(checks)} checks",
            "cls": "warn" if count["warn"] else "pass"}


def _verdict_table(acc: pd.DataFrame | None, after: pd.DataFrame | None) -> Table | None:
    """Attack x eps accuracy matrix ("before -> after" for hardened runs)."""
    if acc is None:
        return None
    adv = acc[(acc["kind"] != "noise") & acc["eps"].notna()]
    if adv.empty:
        return None
    eps_cols = sorted({(n, float(e)) for e, n in adv[["eps", "norm"]].itertuples(index=False)})
    show_norm = len({n for n, _ in eps_cols}) > 1
    columns = [Column("Attack")] + [Column(f"eps {fmt_eps(e)}" + (f" {n}" if show_norm else ""), True) for n, e in eps_cols]
    attacks = sorted(adv["attack"].unique(), key=lambda a: (a == WORST_CASE, a))
    rows = []
    for attack in attacks:
        cells = [Cell(attack_name(attack))]
        for norm, eps in eps_cols:
            v = _at_eps(acc, attack, eps, norm)
            text = fmt_pct(v) if v is not None else ""
            if after is not None and v is not None:
                w = _at_eps(after, attack, eps, norm)
                if w is not None:
                    text += f" → {fmt_pct(w)}"
            cells.append(Cell(text, sort_key(v) if v is not None else None, "num"))
        rows.append(Row(cells, cls="strong" if attack == WORST_CASE else ""))
    caption = "Accuracy under attack" + (" (before → after hardening)" if after is not None else "")
    return Table(columns, rows, caption=caption + ".", sortable=False)
