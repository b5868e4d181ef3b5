"""The page kit of robaudit's self-contained HTML pages (the report and the comparison).

Numbers and eps formatted for reading, a sortable-table model for the templates' macros, matplotlib figures
as inline SVG fit for a strict Content-Security-Policy, the jinja2 environment (autoescape forced on: every
value from a model or a user is escaped), the packaged stylesheet and script, and writing a page: only over
robaudit's own, through a temporary file renamed into place.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterable

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure  # never pyplot: no global figure state, no GUI backend

from .. import safeio
from ..errors import RobauditError
from ..labels import eps_in_text, format_eps
from ..rundir import is_own_report, remove_stale_staging

__all__ = ["Cell", "Column", "Row", "Table", "check_page_out", "clean_svg", "content_security_policy", "environment",
           "figure_svg", "flatten", "fmt_eps", "fmt_num", "fmt_pct", "fmt_points", "fmt_re", "fmt_size",
           "interval_cell", "is_missing", "kv_table",
           "num_cell", "plain", "read_resource", "sort_key", "version", "write_atomic"]


# ----------------------------------------------------------------------------------- formatting


def is_missing(v: Any) -> bool:
    """None, NaN or NA (a missing CSV cell); False for anything that is not a scalar."""
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def fmt_pct(v: Any) -> str:
    """A fraction as a percentage with one decimal: ``0.964 -> "96.4 %"``."""
    return "n/a" if is_missing(v) else f"{100.0 * float(v):.1f} %"


def fmt_points(v: Any) -> str:
    """An accuracy change in percentage points: ``0.3 -> "+30.0 points"``."""
    return "n/a" if is_missing(v) else f"{100.0 * float(v):+.1f} points"


def fmt_eps(v: Any) -> str:
    """An eps as the user wrote it (``8/255`` stays a fraction)."""
    return "" if is_missing(v) else format_eps(v)


def fmt_re(v: Any) -> str:
    """An RE (or a perturbation norm) with three significant digits; empty when missing."""
    return "" if is_missing(v) else f"{float(v):.3g}"


def fmt_size(v: Any) -> str:
    """A perturbation size: three significant digits, ``∞`` for a sample no perturbation fooled; empty when missing."""
    return "∞" if not is_missing(v) and float(v) == float("inf") else fmt_re(v)


def fmt_num(v: Any) -> str:
    """A count as a whole number, anything else with four significant digits; empty when missing."""
    if is_missing(v):
        return ""
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    return f"{float(v):.4g}"


def sort_key(v: Any) -> str | None:
    """The value a sortable column orders a number by (``data-sort``); None when missing."""
    return None if is_missing(v) else repr(float(v))


# ---------------------------------------------------------------------------------- table model


@dataclass
class Cell:
    """One table cell: its text (escaped by the template), its sort key and CSS class."""

    text: Any
    sort: str | None = None
    cls: str = ""


@dataclass
class Column:
    """A column header; a numeric one aligns right."""

    label: str
    numeric: bool = False


@dataclass
class Row:
    """A table row and its CSS class (``strong``, ``mvl``)."""

    cells: list[Cell]
    cls: str = ""


@dataclass
class Table:
    """A table for the templates' table macro: columns, rows, a caption, whether its headers sort it."""

    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    caption: str = ""
    sortable: bool = True


def num_cell(v: Any, fmt=fmt_num) -> Cell:
    """A numeric cell: ``fmt(v)`` shown, sorted by the number itself."""
    return Cell(fmt(v), sort_key(v), "num")


def interval_cell(low: Any, high: Any) -> Cell:
    """A 95 % interval's cell, ``41.2-48.9 %``, sorted by its lower end; empty when missing."""
    from ..intervals import format_interval

    return Cell(format_interval(low, high, unit=" %"), sort_key(low), "num")


def kv_table(items: Iterable[tuple[str, Any]], caption: str = "") -> Table:
    """A two-column Field / Value table of ``items`` (a manifest, the hardening settings); eps values read as
    everywhere else in the report (``8/255``, not ``0.03137``)."""
    rows = [Row([Cell(k), Cell(_kv_text(k, v), cls="wrap")]) for k, v in items]
    return Table([Column("Field"), Column("Value")], rows, caption=caption, sortable=False)


def _kv_text(key: str, v: Any) -> str:
    """A field's value as text: a field named ``*eps`` (``eps``, ``layer_eps``, ``mvl_ranking.eps``) through :func:`fmt_eps`, attack specs' ``eps=``
    through :func:`~robaudit.labels.eps_in_text`."""
    numbers = v if isinstance(v, (list, tuple)) else [v]
    if key.split(".")[-1].endswith("eps") and numbers and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in numbers):
        return ", ".join(fmt_eps(x) for x in numbers)
    return eps_in_text(plain(v))


def plain(v: Any) -> str:
    """A JSON value as one line of text: lists joined by commas, objects as sorted JSON."""
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ", ".join(plain(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted key, value) pairs, in order."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


# -------------------------------------------------------------------------------------- figures


def figure_svg(fig: Figure, prefix: str, label: str, dpi: int = 100) -> Markup:
    """``fig`` as inline SVG markup without date or creator metadata, its ids prefixed with ``prefix``,
    labelled ``label`` for screen readers (see :func:`clean_svg`)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", dpi=dpi, metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    return Markup(clean_svg(buf.getvalue(), prefix, label))


# matplotlib quotes an attribute with ' when its value holds a " (see backend_svg._quote_escape_attrib).
_STYLE_RE = re.compile(r"""\sstyle=(["'])(.*?)\1""")
_ID_RE = re.compile(r"""\sid=(["'])(.*?)\1""")
_REF_RE = re.compile(r'url\(#([^)"]+)\)|href="#([^"]+)"')


def clean_svg(svg: str, prefix: str, label: str) -> str:
    """Make matplotlib's SVG fit for inline use under a strict CSP.

    Drops the XML prolog, metadata, comments and the <style> element; turns every ``style``
    attribute into presentation attributes (CSP blocks style attributes, not presentation
    attributes); keeps only referenced ids, prefixed so that several plots share one document.
    """
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r"<style[^>]*>.*?</style>", "", svg, flags=re.S)
    svg = re.sub(r"<defs>\s*</defs>", "", svg)
    referenced = {a or b for a, b in _REF_RE.findall(svg)}

    def tag(m: re.Match) -> str:
        t = m.group(0)
        if t.startswith("</"):
            return t

        def style(sm: re.Match) -> str:
            props: dict[str, str] = {}
            for decl in html.unescape(sm.group(2)).split(";"):
                name, sep, value = decl.partition(":")
                if sep and name.strip():
                    props[name.strip()] = value.strip()
            return "".join(f' {k}="{html.escape(v, quote=True)}"' for k, v in props.items())

        t = _STYLE_RE.sub(style, t)
        t = _ID_RE.sub(lambda im: f' id="{prefix}-{im.group(2)}"' if im.group(2) in referenced else "", t)
        return _REF_RE.sub(lambda rm: f"url(#{prefix}-{rm.group(1)})" if rm.group(1)
                           else f'href="#{prefix}-{rm.group(2)}"', t)

    svg = re.sub(r"<[^>]+>", tag, svg)
    root_end = svg.index(">")
    root = svg[:root_end]
    root = re.sub(r'\sxmlns(:\w+)?="[^"]*"', "", root)
    root += (f' class="plot" role="img" aria-label="{html.escape(label, quote=True)}"'
             ' stroke-linejoin="round" stroke-linecap="butt"')
    svg = root + svg[root_end:]
    return re.sub(r"\n\s+", "\n", svg).strip()


# ---------------------------------------------------------------------------------------- pages


def read_resource(name: str) -> str:
    """A packaged template, stylesheet or script (``robaudit/templates``) as text."""
    try:
        return resources.files("robaudit.templates").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise RobauditError(f"robaudit's report template {name} is missing: reinstall robaudit") from exc


def environment() -> jinja2.Environment:
    """The jinja2 environment of the pages: packaged templates, autoescape on, undefined names an error."""
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(read_resource),
        autoescape=True,  # forced: select_autoescape would not cover a .j2 name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(css: str, script: str) -> str:
    """Nothing may load; only the inline stylesheet and script with exactly these contents may apply."""
    return (f"default-src 'none'; img-src data:; style-src {_csp_hash(css)}; script-src {_csp_hash(script)}; "
            "base-uri 'none'; form-action 'none'")


def version() -> str:
    """The installed robaudit version the pages name as their generator."""
    try:
        return metadata.version("robaudit")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_page_out(out: Path, what: str = "report") -> None:
    """Refuse, in one line, to replace anything at ``out`` but a robaudit page: a symlink, a directory, a FIFO or a
    user's file stays as it is."""
    if out.is_symlink():
        raise RobauditError(f"{out} is a symbolic link: give --out a path of its own (robaudit replaces only its own "
                            f"{what}s)")
    if os.path.lexists(out) and not (out.is_file() and is_own_report(out)):
        raise RobauditError(f"{out} exists and is not a robaudit {what}: choose another --out (robaudit replaces "
                            f"only its own {what}s)")


def write_atomic(out: Path, text: str) -> None:
    """Write a page through an exclusive temporary file beside ``out`` (a random name, never followed), renamed
    into place; a full disk or an unwritable folder is one line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobauditError(f"cannot write {out} ({exc.strerror}): pass --out with a writable path") from exc
    remove_stale_staging(out)  # what a killed render left beside the page (its exact name, its process gone)
    with safeio.atomic_file(out, binary=False) as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
