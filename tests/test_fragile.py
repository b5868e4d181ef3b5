"""The most fragile samples as images: the analysis attacks them again with the battery's draws and stores their
PNGs in fragile.json; the report shows them inline within 300 kB, and refuses a planted fragile.json in one line."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from robaudit import attacks as atk
from robaudit.errors import RobauditError
from robaudit.fragile import (FRAGILE_FILE, FragileExample, fragile_document, is_image_shape, perturbation_image,
                              pick)
from robaudit.stages.report import render_report
from robaudit.stages.report_fragile import fragile_examples

from tests.test_cli import DIGITS_PT2, MOONS_PT2, assert_one_line_failure, invoke

ATTACKS = ["--attack", "fgsm", "--attack", "pgd:steps=3", "--attack", "gaussian", "--eps", "0.1,0.2"]
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fragile") / "run"
    result = invoke("analyze", DIGITS_PT2, "--dataset", "digits", *ATTACKS, "--samples", "100", "--batch-size", "32",
                    "--no-checks", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def fragile_section(page: str) -> str:
    start = page.index("<h3>Most fragile samples</h3>")
    return page[start:page.index("</section>", start)]


def test_digits_report_shows_each_fragile_sample_as_three_inline_pngs(digits_run):
    page = (digits_run / "report.html").read_text(encoding="utf-8")
    section = fragile_section(page)
    doc = json.loads((digits_run / FRAGILE_FILE).read_text())
    n = len(doc["samples"])
    assert n == 10 and doc["left_out"] == 0 and doc["stored_size"] == doc["image_size"] == [8, 8]
    images = IMG.findall(section)
    assert len(images) == 3 * n and not IMG.findall(page.replace(section, ""))
    for data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (8, 8)
    assert len(section.encode("utf-8")) < 300_000
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    assert "img-src data:;" in csp and "default-src 'none'" in csp
    table = [int(i) for i in re.findall(r'<tr><td class="num"[^>]*>(\d+)</td>', section)]
    assert [s["index"] for s in doc["samples"]] == table  # the samples the table lists, in its order
    assert [int(i) for i in re.findall(r"<figcaption>Sample (\d+),", section)] == table


def test_the_adversarial_images_are_the_batterys_own(digits_run):
    """Attacked again on their batch with the battery's draws, every sample is fooled again, under a configuration
    that fooled it in the battery, with the smallest eps among those; and the PNGs hold the inputs."""
    doc = json.loads((digits_run / FRAGILE_FILE).read_text())
    samples = pd.read_csv(digits_run / "samples.csv").set_index("index")
    for s in doc["samples"]:
        row = samples.loc[s["index"]]
        assert s["adv_pred"] != s["label"] == row["label"] == s["clean_pred"]
        assert row[f"{s['config']}:correct"] == 0
        smaller = [c for c in samples.columns if c.endswith(":correct") and c.startswith(("fgsm@", "pgd"))
                   and float(c.split("@")[1].split(":")[0]) < float(s["config"].split("@")[1])]
        assert all(row[c] == 1 for c in smaller), s
        clean = np.asarray(Image.open(io.BytesIO(base64.b64decode(s["clean"]))), dtype=float) / 255
        adv = np.asarray(Image.open(io.BytesIO(base64.b64decode(s["adversarial"]))), dtype=float) / 255
        eps = float(s["config"].split("@")[1])
        assert np.abs(adv - clean).max() <= eps + 1 / 255 and np.abs(adv - clean).max() > 0
        assert s["amplification"] == pytest.approx(1 / (2 * eps), rel=0.02)


def test_fragile_json_is_a_listed_run_file(digits_run):
    files = json.loads((digits_run / "manifest.json").read_text())["files"]
    assert files[FRAGILE_FILE] == (digits_run / FRAGILE_FILE).stat().st_size


def _tamper(run, tmp_path, edit):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    doc = json.loads((copy / FRAGILE_FILE).read_text())
    text = edit(doc)
    (copy / FRAGILE_FILE).write_text(text if isinstance(text, str) else json.dumps(doc))
    return copy


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["samples"][0].update(clean=base64.b64encode(b"<svg onload=alert(1)>").decode()), "not a PNG"),
    (lambda d: d["samples"][1].update(adversarial='"><script>alert(1)</script>'), "not base64"),
    (lambda d: d["samples"][2].update(perturbation=base64.b64encode(
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + (100000).to_bytes(4, "big") * 2 + b"\0" * 9).decode()), "100000x100000"),
    (lambda d: d["samples"][0].pop("label"), "label is missing"),
    (lambda d: d.update(stored_size=[8]), "height and a width"),
    (lambda d: json.dumps(d) + " " * (1 << 20), "larger than 1 MB"),
])
def test_a_planted_fragile_json_is_refused_in_one_line(digits_run, tmp_path, edit, needle):
    run = _tamper(digits_run, tmp_path, edit)
    assert_one_line_failure(invoke("report", "--run", run), FRAGILE_FILE, needle)
    assert not (run / "report.html").exists()


def test_a_fragile_json_link_is_refused(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (tmp_path / "elsewhere.json").write_bytes((run / FRAGILE_FILE).read_bytes())
    (run / FRAGILE_FILE).unlink()
    (run / FRAGILE_FILE).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(RobauditError, match="symbolic link"):
        render_report(run, tmp_path / "page.html")


def noise_examples(n: int, shape=(3, 224, 224)) -> list[FragileExample]:
    rng = np.random.default_rng(0)
    return [FragileExample(i, 1, 1, 2, "pgd@0.0314", rng.random(shape).astype(np.float32),
                           rng.random(shape).astype(np.float32)) for i in range(n)]


def test_large_images_are_scaled_down_or_left_out_and_the_page_says_so(tmp_path):
    doc = fragile_document(noise_examples(10))
    stored = sum(len(base64.b64decode(s[k])) for s in doc["samples"] for k in ("clean", "adversarial", "perturbation"))
    assert stored <= doc["budget_bytes"] and doc["stored_size"][0] < 224
    assert doc["stored_size"][0] >= 16 and len(doc["samples"]) + doc["left_out"] == 10
    (tmp_path / FRAGILE_FILE).write_text(json.dumps(doc))
    shown = fragile_examples(tmp_path)
    assert "scaled down from 224×224" in shown["note"] and "under 300 kB" in shown["note"]
    # a stored document larger than the page's budget (within the file's cap): the page shows fewer samples
    big = fragile_document(noise_examples(10, (3, 64, 64)), budget=900_000)
    assert big["left_out"] == 0 and big["stored_size"] == [64, 64]
    (tmp_path / FRAGILE_FILE).write_text(json.dumps(big))
    shown = fragile_examples(tmp_path)
    size = sum(len(s[k]) for s in shown["samples"] for k in ("clean", "adversarial", "perturbation"))
    assert 0 < len(shown["samples"]) < 10 and size < 300_000
    assert f"{10 - len(shown['samples'])} of the most fragile samples not shown" in shown["note"]


def test_moons_has_no_images(tmp_path):
    out = tmp_path / "run"
    result = invoke("analyze", MOONS_PT2, "--dataset", "moons", "--attack", "fgsm", "--eps", "0.2", "--samples",
                    "60", "--no-checks", "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / FRAGILE_FILE).exists()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Most fragile samples" in page and "<img" not in page


def test_pick_prefers_the_smallest_budget_of_an_adversarial_attack():
    specs = atk.expand([atk.parse("fgsm"), atk.parse("cw"), atk.parse("gaussian")], [0.1, 0.2])
    cols = {f"{s.label}@{s.eps:g}:correct" if s.eps is not None else f"{s.label}:correct": 1 for s in specs}
    rows = [dict(index=0, label=1, clean_pred=1, clean_correct=1, **cols),
            dict(index=1, label=1, clean_pred=1, clean_correct=1, **cols)]
    rows[0].update({"fgsm@0.2:correct": 0, "cw:correct": 0, "gaussian@0.1:correct": 0})
    rows[1].update({"cw:correct": 0, "gaussian@0.1:correct": 0})
    picked = pick(pd.DataFrame(rows), specs)
    assert [(i, specs[c].label, specs[c].eps) for i, c in picked] == [(0, "fgsm", 0.2), (1, "cw", None)]


def test_perturbation_is_amplified_to_the_full_range():
    clean = np.full((1, 2, 2), 0.5)
    adv = clean + np.array([[[0.05, -0.05], [0.0, 0.025]]])
    image, gain = perturbation_image(clean, adv)
    assert gain == pytest.approx(10) and image.min() == pytest.approx(0) and image.max() == pytest.approx(1)
    assert image[0, 1, 0] == 0.5 and perturbation_image(clean, clean)[0].max() == 0.5
    assert is_image_shape((1, 8, 8)) and is_image_shape((3, 32, 32)) and not is_image_shape((2,))
