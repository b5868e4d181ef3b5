"""The HTML audit report: content, escaping, self-containment, a real browser, a wheel install."""
from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robaudit.errors import RobauditError
from robaudit.stages.html import fmt_eps, fmt_pct, fmt_re
from robaudit.stages.report import render_report

from markupsafe import escape

from tests._rundir import EVIL_LAYER, MATH_LAYER, make_run, model_checks

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """8 layers, one named with markup and every layer in the MVL list; the model outputs probabilities."""
    run = make_run(tmp_path_factory.mktemp("small") / "run", evil=True, mvl_k=8)
    (run / "checks.json").write_text(json.dumps(model_checks(
        outputs={"finite": True, "min": 0.0, "max": 0.97, "max_row_sum_error": 2e-7})))
    out = render_report(run)
    return run, out, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """50 layers x 12 configurations (3 attacks + 1 noise at 3 eps), hardened."""
    run = make_run(tmp_path_factory.mktemp("big") / "run", n_layers=50, minimal=(), hardened=True, mvl_k=5)
    out = render_report(run)
    return run, out, out.read_text(encoding="utf-8")


def section(text: str, name: str) -> str:
    match = re.search(rf'<section id="{name}">(.*?)</section>', text, re.S)
    assert match, f"section {name} missing"
    return match.group(1)


def visible(fragment: str) -> str:
    """The text of an HTML fragment, tags removed and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_default_output_and_no_temp_files(small):
    run, out, _ = small
    assert out == run / "report.html"
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)


def test_verdict_numbers_match_the_csvs(small):
    run, _, text = small
    verdict = visible(section(text, "verdict"))
    acc = pd.read_csv(run / "accuracy.csv")
    clean = acc.loc[acc["attack"] == "clean", "accuracy"].iloc[0]
    assert f"Clean accuracy {fmt_pct(clean)} (360 samples)" in verdict
    mvl = json.loads((run / "mvl.json").read_text())
    pgd = acc[(acc["attack"] == "pgd") & np.isclose(acc["eps"], mvl["eps"])]["accuracy"].iloc[0]
    worst = acc[(acc["attack"] == "worst-case") & np.isclose(acc["eps"], mvl["eps"])]["accuracy"].iloc[0]
    assert f"Under PGD at eps {fmt_eps(mvl['eps'])}, accuracy falls to {fmt_pct(pgd)}; worst case over the attacks run {fmt_pct(worst)}" in verdict
    for r in acc[acc["attack"] == "worst-case"].itertuples():
        assert fmt_pct(r.accuracy) in verdict
    for r in acc[acc["kind"] == "adversarial"].dropna(subset=["eps"]).itertuples():  # the attack x eps table
        assert fmt_pct(r.accuracy) in verdict
    for item in mvl["layers"]:
        assert f"{item['layer']} (RE {fmt_re(item['score'])})" in verdict
    assert "1 sanity check warns" in verdict and "Outputs are logits, not probabilities" in verdict


def test_a_run_without_mvl_depths_shows_no_depth_column(small):
    """mvl.json written before depths were recorded: the MVL table has no Depth column, nothing breaks."""
    run, _, text = small
    assert all("depth" not in item for item in json.loads((run / "mvl.json").read_text())["layers"])
    assert "position among the probed layers" not in text and ">Depth</th>" not in text


def test_every_mvl_layer_appears_in_the_layer_map(small):
    run, _, text = small
    layers = section(text, "layers")
    mvl = json.loads((run / "mvl.json").read_text())
    assert len(mvl["layers"]) == 8
    heatmap = re.search(r"<svg.*?</svg>", layers, re.S).group(0)
    for item in mvl["layers"]:
        assert f'<td class="layer">{escape(item["layer"])}</td>' in layers  # MVL table and layer table
        assert html.escape(item["layer"], quote=False) in heatmap  # tick label (SVG text)


def test_plots_are_embedded(small, hardened):
    _, _, text = small
    layers = section(text, "layers")
    assert layers.count("<svg") == 2  # heatmap + RE profile
    assert "data:image/png;base64," in layers  # the heatmap's cells
    assert section(text, "accuracy").count("<svg") == 1
    assert "<svg" not in section(text, "hardening")
    _, _, big = hardened
    assert section(big, "hardening").count("<svg") == 2  # training history + MVL RE before/after
    assert section(big, "accuracy").count("<svg") == 1


def test_markup_in_names_is_escaped(small):
    _, _, text = small
    assert EVIL_LAYER not in text
    assert "<b>Evil</b>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert MATH_LAYER not in text and str(escape(MATH_LAYER)) in text  # "$" is not mathtext either
    assert len(re.findall(r"<script\b", text)) == 1  # robaudit's own sorting script only
    assert not re.search(r"\son[a-z]+\s*=", text)  # no inline event handlers anywhere


def test_no_external_resources(small, hardened):
    for _, _, text in (small, hardened):
        refs = re.findall(r"""\b(?:src|href|xlink:href|action|srcset|poster)\s*=\s*["']?([^"'\s>]*)""", text, re.I)
        assert refs, "expected in-page links"
        assert all(r.startswith("#") or r.startswith("data:") for r in refs), refs
        assert "http://" not in text and "https://" not in text
        assert "@import" not in text
        assert all(u.startswith("#") for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", text))
        assert not re.search(r"<(?:link|iframe|object|embed|base|audio|video|source)\b", text, re.I)


def test_content_security_policy_pins_the_inline_code(small):
    _, _, text = small
    head = text[: text.index("</head>")]
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', head)
    assert csp and head.index("Content-Security-Policy") < head.index("<style>")
    policy = html.unescape(csp.group(1))
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy

    def sha(s):
        return "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"

    styles = re.findall(r"<style>(.*?)</style>", text, re.S)
    scripts = re.findall(r"<script>(.*?)</script>", text, re.S)
    assert len(styles) == len(scripts) == 1
    assert f"style-src {sha(styles[0])}" in policy and f"script-src {sha(scripts[0])}" in policy
    assert not re.search(r"\sstyle\s*=", text), "style attributes would be blocked by the CSP"
    assert "@media print" in styles[0]


def test_svg_ids_are_unique(hardened):
    _, _, text = hardened
    ids = re.findall(r'\sid="([^"]+)"', text)
    assert len(ids) == len(set(ids))
    for ref in re.findall(r'(?:url\(#|href="#)([^)"]+)', text):
        assert ref in ids, ref


def test_tables_are_sortable(small):
    _, _, text = small
    assert text.count('class="sortable"') >= 4
    assert 'data-sort="' in text


def test_hardened_sections_only_with_hardening_files(small, hardened):
    _, _, plain = small
    assert "Not run" in section(plain, "hardening")
    assert "(hardened)" not in plain and "Hardened model" not in plain

    run, _, text = hardened
    hard = section(text, "hardening")
    assert "Not run" not in hard and "AT-LR" in hard
    verdict = visible(section(text, "verdict"))
    cmp = pd.read_csv(run / "hardened" / "comparison.csv")
    for r in cmp[(cmp["kind"] == "accuracy") & (cmp["attack"] == "worst-case")].itertuples():
        assert f"at eps {fmt_eps(r.eps)} it rose from {fmt_pct(r.before)} to {fmt_pct(r.after)} ({100 * r.delta:+.1f} points)" in verdict
    clean = cmp[cmp["attack"] == "clean"].iloc[0]
    assert f"{fmt_pct(clean['after'])} (was {fmt_pct(clean['before'])}" in verdict
    for r in cmp[cmp["kind"] == "re"].itertuples():  # MVL RE before/after
        assert f"{fmt_re(r.before)}</td>" in hard and f"{fmt_re(r.after)}</td>" in hard
    assert "Rerun the hardening" in section(text, "reproduce")


def test_history_with_harden_column_names():
    """harden writes val_clean_acc / val_robust_acc, ce_adv and an epoch-0 row without loss terms."""
    import matplotlib

    from robaudit.stages.plots import MPL_RC, plot_history

    history = pd.DataFrame({"epoch": [0, 1, 2], "lr": [np.nan, 0.01, 0.01], "loss": [np.nan, 1.0, 0.8],
                            "ce_adv": [np.nan, 0.9, 0.7], "reg": [np.nan, 0.1, 0.1], "re:<b>x</b>": [np.nan, 0.3, 0.2],
                            "val_clean_acc": [0.99, 0.97, 0.98], "val_robust_acc": [0.1, 0.4, 0.5]})
    with matplotlib.rc_context(MPL_RC):
        plot = plot_history(history)
    assert "<svg" in plot.svg and "robust (validation)" in plot.svg and "cross-entropy (adversarial)" in plot.svg


def test_reproducibility_section(small):
    run, _, text = small
    repro = visible(section(text, "reproduce"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["command"] in repro
    assert manifest["model"]["sha256"] in repro and manifest["torch_version"] in repro
    digest = hashlib.sha256((run / "lsa.csv").read_bytes()).hexdigest()
    assert digest in repro


def test_fifty_layer_report_is_small(hardened):
    run, out, _ = hardened
    lsa = pd.read_csv(run / "lsa.csv")
    assert lsa["layer"].nunique() == 50 and len(lsa[["attack", "eps"]].drop_duplicates()) == 12
    assert out.stat().st_size < 2_000_000


def test_custom_output_path(tmp_path):
    run = make_run(tmp_path / "run", n_layers=5, attacks=("pgd",), noise=(), eps=(0.1,), minimal=(), checks=False,
                   mvl_k=2)
    out = render_report(run, tmp_path / "nested" / "audit.html")
    assert out == tmp_path / "nested" / "audit.html" and out.is_file()
    text = out.read_text()
    assert "skipped for lack of data" in visible(section(text, "verdict"))  # no checks.json
    assert not (run / "report.html").exists()


def test_missing_or_incomplete_run_directory(tmp_path):
    with pytest.raises(RobauditError, match="not a robaudit run directory.*robaudit analyze"):
        render_report(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RobauditError, match="not a robaudit run directory.*robaudit analyze"):
        render_report(empty)
    (empty / "lsa.csv").write_text("layer,attack\nfc,pgd\n")
    with pytest.raises(RobauditError, match="lacks the columns"):
        render_report(empty)
    assert list(empty.glob("*.html")) == []


# ------------------------------------------------------------------------------ a real browser


def chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_renders_in_headless_chromium(small, tmp_path):
    from matplotlib.image import imread

    _, out, _ = small
    png = tmp_path / "shot.png"
    proc = chromium(out.as_uri(), tmp_path, f"--screenshot={png}", "--window-size=1280,2000")
    assert png.is_file(), proc.stderr[-2000:]
    pixels = imread(png)[..., :3]
    assert pixels.std() > 0.05
    assert (pixels.min(axis=2) < 0.9).mean() > 0.02  # not (almost) all white
    assert "Content Security Policy" not in proc.stderr, proc.stderr[-2000:]

    # The script ran under the CSP: it turned every sortable header into a button.
    dom = chromium(out.as_uri(), tmp_path, "--dump-dom").stdout
    assert '<button type="button" class="sort">' in dom
    assert "Content Security Policy" not in dom

    # The log check is live: a page that breaks the same kind of policy is reported.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'\">"
                   "<p style=\"color:red\">x</p><script>document.title='x'</script>")
    assert "Content Security Policy" in chromium(bad.as_uri(), tmp_path, "--dump-dom").stderr


MEASURE_TABLES = """<script>
(function () {
  var out = [];
  document.querySelectorAll("table").forEach(function (table, i) {
    var box = table.parentElement, main = document.querySelector("main");
    var cap = table.caption ? table.caption.textContent.trim().slice(0, 50) : "";
    var id = (table.closest("section") || {}).id || "";
    if (box.scrollWidth > box.clientWidth + 1 || table.getBoundingClientRect().right > main.getBoundingClientRect().right + 1) {
      out.push(id + " table " + i + " (" + cap + "): " + table.scrollWidth + " px in a box of " + box.clientWidth + " px");
    }
  });
  document.body.setAttribute("data-overflow", out.length ? out.join(" | ") : "none");
  document.body.setAttribute("data-width", String(document.documentElement.clientWidth));
})();
</script>"""


def overflowing_tables(page: Path, tmp_path: Path, width: int = 1280) -> str:
    """The tables of ``page`` wider than their box at a ``width`` px window, as Chromium lays them out ("none")."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)  # lets the measuring script run
    probe = tmp_path / f"measure-{page.stem}.html"
    probe.write_text(text.replace("</body>", MEASURE_TABLES + "</body>"), encoding="utf-8")
    dom = chromium(probe.as_uri(), tmp_path, f"--window-size={width},2000", "--dump-dom").stdout
    assert f'data-width="{width}"' in dom, dom[-2000:]
    return re.search(r'data-overflow="([^"]*)"', dom).group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_no_table_is_cut_off_at_1280_px(small, hardened, tmp_path):
    """At a 1280 px window every table fits its box (none hides columns behind a scroll bar): the RE table of 50
    layers x 12 configurations, the sanity table's Numbers column, the manifest and the files' SHA-256 digests."""
    for run, out, _ in (small, hardened):
        assert overflowing_tables(out, tmp_path) == "none"


# ---------------------------------------------------------------------------------- a wheel


def test_wheel_install_renders_the_same_report(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("robaudit", "templates", "examples"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("robaudit\n")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(dist.glob("robaudit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for resource in ("report.html.j2", "report.css", "sort.js", "__init__.py"):
        assert f"robaudit/templates/{resource}" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                    "--disable-pip-version-check", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)

    run = make_run(tmp_path / "run", n_layers=6, hardened=True)
    expected = render_report(run, tmp_path / "editable.html").read_bytes()
    code = ("import sys, robaudit.stages.report as r; from robaudit.stages.report import render_report; "
            "print(r.__file__); render_report(sys.argv[1], sys.argv[2])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "wheel.html")], env=env,
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).is_relative_to(site)  # the installed copy rendered it
    assert (tmp_path / "wheel.html").read_bytes() == expected


def test_minimal_perturbation_attacks_by_size_not_accuracy(tmp_path):
    run = make_run(tmp_path / "run", n_layers=5, attacks=("pgd",), noise=(), eps=(0.1,), minimal=("cw",),
                   hardened=True)
    text = render_report(run).read_text(encoding="utf-8")
    acc_section = section(text, "accuracy")
    tables = re.findall(r"<table.*?</table>", acc_section, re.S)
    accuracy_table = next(t for t in tables if "Accuracy under every attack" in t)
    perturbation_table = next(t for t in tables if "Minimal-perturbation attacks" in t)
    assert ">CW<" not in accuracy_table  # its accuracy (0 %) is no robust accuracy
    cw = pd.read_csv(run / "accuracy.csv").set_index("attack").loc["cw"]
    h_cw = pd.read_csv(run / "hardened" / "accuracy.csv").set_index("attack").loc["cw"]
    row = visible(re.search(r"<tr><td>CW</td>.*?</tr>", perturbation_table, re.S).group(0))
    for value in (fmt_re(cw["pert_median"]), fmt_re(cw["pert_p90"]), fmt_pct(cw["success_rate"]),
                  fmt_re(cw["pert_median_all"]), fmt_re(h_cw["pert_median_all"])):
        assert value in row
    verdict = visible(section(text, "verdict"))
    assert f"median L2 perturbation of {fmt_re(cw['pert_median'])}" in verdict
    assert f"half of all samples are misclassified at an L2 perturbation of {fmt_re(cw['pert_median_all'])}" in verdict
    assert "CW 0.0 %" not in visible(text) and "CW →" not in verdict


def test_accuracy_plot_single_eps_markers_and_distinct_styles():
    import matplotlib

    from robaudit.stages.plots import MPL_RC, Palette, accuracy_figure

    def frame(shift: float) -> pd.DataFrame:
        rows = [("clean", np.nan, 0.95, "clean", "")]
        rows += [("pgd", 0.1, 0.5 + shift, "adversarial", "Linf"), ("pgd", 0.2, 0.1 + shift, "adversarial", "Linf"),
                 ("square(n_queries=200)", 0.2, 0.3 + shift, "adversarial", "Linf"),
                 ("gaussian", 0.1, 0.9, "noise", "Linf"), ("gaussian", 0.2, 0.85, "noise", "Linf"),
                 ("worst-case", 0.1, 0.5 + shift, "adversarial", "Linf"),
                 ("worst-case", 0.2, 0.1 + shift, "adversarial", "Linf")]
        return pd.DataFrame(rows, columns=["attack", "eps", "accuracy", "kind", "norm"])

    before, after = frame(0.0), frame(0.2)
    with matplotlib.rc_context(MPL_RC):
        fig = accuracy_figure(before, after, Palette([before, after]))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    square = lines["Square(n_queries=200) (eps 0.2 only)"]
    assert list(square.get_xdata()) == [0.2] and square.get_linestyle() == "None"
    assert list(square.get_ydata()) == [30.0]
    h_square = lines["Square(n_queries=200) (hardened) (eps 0.2 only)"]
    assert list(h_square.get_xdata()) == [0.2] and h_square.get_linestyle() == "None"
    pgd = lines["PGD"]
    assert list(pgd.get_xdata()) == [0.0, 0.1, 0.2] and list(pgd.get_ydata()) == pytest.approx([95, 50, 10])
    styles = {name: (lines[name].get_linestyle(), lines[name].get_marker())
              for name in ("PGD", "Gaussian noise", "PGD (hardened)")}
    assert len(set(styles.values())) == 3, styles  # adversarial, noise and hardened curves differ
    assert styles["PGD"][0] == "-" and styles["Gaussian noise"][0] == ":" and styles["PGD (hardened)"][0] == "--"
    assert "Gaussian noise (hardened)" not in lines


def _cards(text: str) -> dict[str, str]:
    """Card label -> its class attribute."""
    return {visible(label): cls for cls, label in
            re.findall(r'<div class="card ?([a-z]*)"><div class="label">(.*?)</div>', section(text, "verdict"))}


def test_cards_never_green_while_a_check_about_them_warns(tmp_path):
    run = make_run(tmp_path / "run", n_layers=5, hardened=True)
    (run / "hardened" / "checks.json").write_text(json.dumps(model_checks()))
    assert _cards(render_report(run).read_text())["After hardening"] == "pass"
    # the hardened model: PGD-50 leaves one sample more robust than PGD-10: inconclusive, no warning
    (run / "hardened" / "checks.json").write_text(json.dumps(model_checks(
        attacks={**model_checks()["attacks"], "pgd10": 2 / 128, "pgd50": 3 / 128})))
    text = render_report(run).read_text()
    assert _cards(text)["After hardening"] == "pass"
    assert "inconclusive on 128 samples" in visible(section(text, "sanity"))
    # 9 samples robust to PGD-50 but fooled by PGD-10, none the reverse (p = 0.002): possible masking
    (run / "hardened" / "checks.json").write_text(json.dumps(model_checks(
        attacks={**model_checks()["attacks"], "pgd10": 2 / 128, "pgd50": 11 / 128,
                 "robust_only": {"pgd50": {"pgd10": 9}, "pgd10": {"pgd50": 0}}})))
    text = render_report(run).read_text()
    assert _cards(text)["After hardening"] == "warn"
    sanity_text = visible(section(text, "sanity"))
    assert "PGD-50 leaves no more samples robust than PGD-10" in sanity_text  # threshold shown
    assert "exact McNemar p = 0.002" in sanity_text and "Hardening introduced a warning" in sanity_text
    # each model's verdict on a card of its own: never the two models' checks added up
    cards = _cards(text)
    assert "Sanity checks" not in cards
    assert cards["Sanity checks, hardened model"] == "warn"
    from robaudit import verdict as verdict_mod
    from robaudit.rundir import read_run

    for label, where in (("audited model", run), ("hardened model", run / "hardened")):
        checks = verdict_mod.checks_of(read_run(where), num_classes=10)
        counts = {s: sum(c.status == s for c in checks) for s in ("pass", "skip")}
        card = re.search(rf'<div class="label">Sanity checks, {label}</div>(.*?)</div>\s*</div>',
                         section(text, "verdict"), re.S).group(1)
        assert f"{counts['pass']} pass, {counts['skip']} skipped of {len(checks)} checks" in visible(card)


def test_chance_level_model_is_flagged(tmp_path):
    run = make_run(tmp_path / "run", n_layers=5, clean=0.094)
    text = render_report(run).read_text()
    cards = _cards(text)
    assert cards["Clean accuracy"] == "warn" and cards["Sanity checks"] == "warn"
    verdict = visible(section(text, "verdict"))
    assert "Clean accuracy well above chance" in verdict and "every robustness number is noise" in verdict
    sanity_text = visible(section(text, "sanity"))
    assert "chance is 10.0 % (10 classes)" in sanity_text and "clean accuracy above 20.0 %" in sanity_text


def test_history_plot_whole_epochs_and_legends_beside_the_data(monkeypatch):
    import matplotlib
    from matplotlib.figure import Figure

    from robaudit.stages import plots as R

    captured = []
    real = R.figure_svg

    def keep(fig, *args, **kwargs):
        captured.append(fig)
        return real(fig, *args, **kwargs)

    history = pd.DataFrame({"epoch": [0, 1], "loss": [np.nan, 0.95], "ce_adv": [np.nan, 0.9], "reg": [np.nan, 0.05],
                            "val_clean_acc": [0.99, 0.97], "val_robust_acc": [0.1, 0.4]})
    re_rows = pd.DataFrame({"label": ["a", "b"], "before": [1.0, 2.0], "after": [0.5, 1.0]})
    monkeypatch.setattr(R, "figure_svg", keep)
    with matplotlib.rc_context(R.MPL_RC):
        R.plot_history(history)
        R.plot_re_before_after(re_rows)
    history_fig, re_fig = captured
    assert isinstance(history_fig, Figure)
    for ax in history_fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks) and ax.get_xlim() == (-0.5, 1.5)
    for ax in history_fig.axes + re_fig.axes:  # each legend anchored outside the axes, to the right
        legend = ax.get_legend()
        assert legend is not None and legend.get_bbox_to_anchor().x0 >= ax.bbox.x1 - 1


def test_every_table_scrolls_inside_its_own_box(hardened):
    _, _, text = hardened
    body = text[text.index("<body>"):]
    assert body.count("<table") == body.count('<div class="table-wrap">\n<table')
    css = (REPO / "templates" / "report.css").read_text()
    assert re.search(r"\.table-wrap \{[^}]*overflow-x: auto", css)


def test_sanity_section_shows_the_model_checks_sample_count(tmp_path):
    run = make_run(tmp_path / "run", n_layers=3, minimal=())
    plan = {"n_samples": 20, "attacks": True, "eps_max": 0.1, "reused": ["pgd10"], "battery_cost_per_sample": 10.67,
            "check_cost_per_sample": 53.3, "budget": 1092.3, "share": 0.1}
    (run / "checks.json").write_text(json.dumps(model_checks(n_samples=20, plan=plan, seconds=0.5,
                                                             battery_seconds=6.0)))
    text = visible(section(render_report(run).read_text(encoding="utf-8"), "sanity"))
    assert "used 20 samples" in text and "at most 10 % of the battery" in text
    assert "reused the battery's own PGD-10 outcomes" in text and "0.5 s against the battery's 6 s" in text


def test_sanity_section_says_when_the_checks_were_raised_beyond_their_share(tmp_path):
    from robaudit.attacks import expand, parse
    from robaudit.model_checks import plan_model_checks

    run = make_run(tmp_path / "run", n_layers=3, minimal=())
    plan = plan_model_checks(expand([parse("pgd")], [0.1]), n_battery=64, num_classes=10).to_dict()
    assert plan["over_budget"] and plan["n_samples"] == 7
    (run / "checks.json").write_text(json.dumps(model_checks(n_samples=7, plan=plan)))
    text = visible(section(render_report(run).read_text(encoding="utf-8"), "sanity"))
    assert ("used 7 samples, sized to cost at most 10 % of the battery" in text
            and "raised to the 7 samples a paired comparison needs to be conclusive at p < 0.01, which costs more "
                "than 10 % of the battery" in text)


def test_the_layer_table_shows_each_layers_gain_under_the_ranking_attack(tmp_path):
    run = make_run(tmp_path / "run", n_layers=3, minimal=())
    lsa = pd.read_csv(run / "lsa.csv")
    lsa["re_gain"] = 1.5 + lsa["order"]  # 1.5, 2.5, 3.5 per layer
    lsa.to_csv(run / "lsa.csv", index=False)
    layers = section(render_report(run).read_text(encoding="utf-8"), "layers")
    assert "Gain re_gain (PGD ε=0.1)" in visible(layers) and "own gain under the ranking attack" in visible(layers)
    for value in ("1.5", "2.5", "3.5"):
        assert f">{fmt_re(float(value))}<" in layers
