"""A hostile or tampered run directory: robaudit writes only through fresh exclusive names, deletes only what it
recorded, follows no symlink out of a run, checks every value it reads, neutralises spreadsheet formulas and
terminal escapes, says a full disk in one line, lets one robaudit write a destination at a time, and any
mutation of a run is either read or refused in one line.

Each test snapshots a folder of the user's files outside the run (names, contents, symlink targets) and checks
that not a byte of it changed.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from click.testing import CliRunner

from robaudit import gate, rundir, safeio, verdict, writelock
from robaudit.cli import main
from robaudit.stages.compare import compare_runs
from robaudit.errors import RobauditError
from robaudit.rundir import read_run
from robaudit.stages.report import render_report
from tests.helpers import single_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PT2 = ROOT / "examples" / "digits_cnn.pt2"
MOONS_PT2 = ROOT / "examples" / "moons_mlp.pt2"
DIGITS = ["--dataset", "digits", "--attack", "fgsm", "--attack", "pgd:steps=2", "--attack", "gaussian", "--eps",
          "0.1,0.2", "--samples", "32", "--batch-size", "16"]
MOONS = ["--dataset", "moons", "--attack", "fgsm", "--eps", "0.1", "--samples", "40", "--no-checks", "--no-report"]
HARDEN = ["--epochs", "1", "--steps", "1", "--no-report", "--device", "cpu"]
SECRET = "AKIA-very-secret-key"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def one_line(result, *needles: str, code: int = 2) -> str:
    """A failure in one line on stderr, with no traceback, that names every needle."""
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output and "unexpected" not in err, err
    for needle in needles:
        assert needle.lower() in err.lower(), err
    return err


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder``, never following a symlink: a file's bytes, a link's target, a directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes())
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One real analysis (report, checks, samples.csv, bn.csv), copied by every test that changes it."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    result = invoke("analyze", DIGITS_PT2, *DIGITS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-moons") / "run"
    result = invoke("analyze", MOONS_PT2, *MOONS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def user(tmp_path):
    """The user's own files, outside any run: credentials, a thesis, a folder, a symlink; and their snapshot."""
    home = tmp_path / "user"
    (home / "docs").mkdir(parents=True)
    (home / "credentials.json").write_text(json.dumps({"robaudit_version": "0.1.0", "aws_key": SECRET}))
    (home / "thesis.tex").write_text("\\section{Results}")
    (home / "docs" / "notes.md").write_text("mine")
    (home / "latest").symlink_to(home / "thesis.tex")
    ns = SimpleNamespace(home=home, before=snapshot(home))
    yield ns
    assert snapshot(home) == ns.before, "a file of the user's changed"


def copy_run(src: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / "reports" / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def no_leftovers(folder: Path) -> list[str]:
    """Hidden names robaudit may have left beside or inside a destination (staging, locks)."""
    return [str(p.relative_to(folder)) for p in folder.rglob(".*")]


# -- 1. temporary names are created exclusively, never followed ------------------------------------------
def test_a_checkpoint_temp_symlink_is_never_followed(moons_run, tmp_path, user):
    run = copy_run(moons_run, tmp_path)
    for name in (".harden-checkpoint.pt.tmp", ".hardened.tmp", f".hardened.old-{os.getpid()}", ".model.pt2.tmp",
                 ".lsa.csv.tmp", ".manifest.json.tmp"):
        (run / name).symlink_to(user.home / "thesis.tex")
    result = invoke("harden", "--run", run, *HARDEN)
    assert result.exit_code == 0, result.output
    assert (run / "hardened" / "manifest.json").is_file()


def _fix_random(monkeypatch):
    monkeypatch.setattr(safeio.secrets, "token_hex", lambda n=6: "a" * (2 * n))


def _writers(tmp_path: Path):
    import torch

    from robaudit.models import save_checkpoint
    from robaudit.stages.html import write_atomic
    from robaudit.training.checkpoint import atomic_torch_save

    module = torch.nn.Linear(2, 2)
    return {
        "write_json": (tmp_path / "mvl.json", lambda p: rundir.write_json(p, {"a": 1})),
        "write_csv": (tmp_path / "lsa.csv", lambda p: rundir.write_csv(p, pd.DataFrame({"a": [1]}))),
        "atomic_torch_save": (tmp_path / "harden-checkpoint.pt", lambda p: atomic_torch_save({"a": 1}, p)),
        "save_checkpoint": (tmp_path / "model.pt", lambda p: save_checkpoint(p, module, arch="torch.nn:Linear")),
        "report": (tmp_path / "report.html", lambda p: write_atomic(p, "<html>")),
        "staging_file": (tmp_path / "run", lambda p: rundir.staging_file(p)),
    }


@pytest.mark.parametrize("writer", ["write_json", "write_csv", "atomic_torch_save", "save_checkpoint", "report",
                                    "staging_file"])
def test_every_temp_name_is_new_and_never_followed(writer, tmp_path, monkeypatch, user):
    """With the random part known in advance, the writer's temporary name already taken by a symlink: it fails
    in one line (the name is created with O_EXCL|O_NOFOLLOW) instead of writing through the link."""
    dest, write = _writers(tmp_path)[writer]
    _fix_random(monkeypatch)
    planted = dest.with_name(f".{dest.name}.{os.getpid()}.{'a' * 12}.tmp")
    planted.symlink_to(user.home / "thesis.tex")
    with pytest.raises(RobauditError) as err:
        write(dest)
    assert "\n" not in str(err.value)
    assert planted.is_symlink() and not (dest.exists() and dest.is_file() and dest.stat().st_size)


def test_replacing_a_run_never_reuses_a_fixed_old_name(moons_run, tmp_path):
    run = copy_run(moons_run, tmp_path)
    theirs = run.with_name(f".{run.name}.old-{os.getpid()}")
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    assert invoke("analyze", MOONS_PT2, *MOONS, "--out", run, "--force").exit_code == 0
    assert (theirs / "keep.txt").read_text() == "mine"


# -- 2. --force deletes only what robaudit recorded -----------------------------------------------------
@pytest.mark.parametrize("planted", [".notes.tmp", ".config.old-backup", "hardened/hardened/thesis.tex",
                                     "hardened/plot.svg", ".lsa.csv.1234.abcdef012345.tmp", "link", "hardened-link",
                                     "lsa.csv (edited)", "report.html (theirs)"])
def test_force_deletes_only_what_robaudit_recorded(planted, moons_run, tmp_path, user):
    run = copy_run(moons_run, tmp_path)
    if planted == "link":
        (run / "lsa.csv").unlink()
        (run / "lsa.csv").symlink_to(user.home / "thesis.tex")
        name = "lsa.csv"
    elif planted == "hardened-link":
        (run / "hardened").symlink_to(user.home / "docs")
        name = "hardened"
    elif planted == "lsa.csv (edited)":
        with open(run / "lsa.csv", "a") as fh:
            fh.write("my,own,row\n")
        name = "lsa.csv"
    elif planted == "report.html (theirs)":
        (run / "report.html").write_text("<html>my own page</html>")
        name = "report.html"
    else:
        (run / planted).parent.mkdir(parents=True, exist_ok=True)
        (run / planted).write_text("mine")
        if planted.startswith("hardened/"):
            shutil.copy(run / "lsa.csv", run / "hardened" / "lsa.csv")
        name = planted.replace("/thesis.tex", "")  # a folder robaudit never writes is named as a whole
    before = snapshot(run)
    one_line(invoke("analyze", MOONS_PT2, *MOONS, "--out", run, "--force"), "did not write", name)
    assert snapshot(run) == before


def test_an_older_run_without_a_file_list_is_replaced_only_with_its_exact_names(moons_run, tmp_path):
    run = copy_run(moons_run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["files"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "harden-checkpoint.pt").write_bytes(b"x")
    assert rundir.foreign_entries(run) == []
    (run / ".lsa.csv.tmp").write_text("x")
    assert rundir.foreign_entries(run) == [".lsa.csv.tmp"]


def test_a_harden_result_is_recorded_and_replaced_whole(moons_run, tmp_path):
    run = copy_run(moons_run, tmp_path)
    assert invoke("harden", "--run", run, *HARDEN).exit_code == 0
    assert rundir.foreign_entries(run) == []
    recorded = json.loads((run / "hardened" / "manifest.json").read_text())["files"]
    assert {"model.pt2", "history.csv", "harden.json", "lsa.csv"} <= set(recorded)
    assert invoke("analyze", MOONS_PT2, *MOONS, "--out", run, "--force").exit_code == 0
    assert not (run / "hardened").exists() and no_leftovers(tmp_path / "reports") == []


def test_stale_staging_is_removed_only_in_its_exact_form(tmp_path, user):
    dest = tmp_path / "run"
    dead, alive = 99999999, os.getpid()
    (tmp_path / f".run.{dead}.{'b' * 12}.tmp").mkdir()
    (tmp_path / f".run.{dead}.{'c' * 12}.tmp").write_text("x")
    keep = [f".run.{alive}.{'d' * 12}.tmp", ".run.notes.tmp", f".run.{dead}.notes.tmp", f".other.{dead}.{'e' * 12}.tmp"]
    for name in keep:
        (tmp_path / name).write_text("x")
    (tmp_path / f".run.{dead}.{'f' * 12}.tmp").symlink_to(user.home / "docs")
    rundir.remove_stale_staging(dest)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == \
        sorted(keep + [f".run.{dead}.{'f' * 12}.tmp"])


# -- 3. reading never follows a symlink out of a run ---------------------------------------------------
@pytest.mark.parametrize("name", ["manifest.json", "mvl.json", "checks.json", "lsa.csv", "accuracy.csv",
                                  "samples.csv", "classes.csv", "bn.csv"])
def test_no_command_reads_through_a_symlink_out_of_the_run(name, digits_run, tmp_path, user):
    run = copy_run(digits_run, tmp_path)
    (run / "report.html").unlink()
    secret = user.home / ("credentials.json" if name.endswith(".json") else "leak.csv")
    if name.endswith(".csv"):
        shutil.copy(run / name, secret)
        with open(secret, "a") as fh:
            fh.write(f"{SECRET}\n")
        user.before = snapshot(user.home)
    (run / name).unlink()
    (run / name).symlink_to(secret)
    readers = [["report", "--run", run]]  # the report reads every file; check and compare read the analysis
    readers += [["check", run], ["compare", run, run, "--json"]] if name not in ("samples.csv", "bn.csv", "classes.csv") \
        else []
    for args in readers:
        one_line(invoke(*args), "symbolic link", name)
    assert not (run / "report.html").exists()


def test_a_hardened_folder_linked_out_of_the_run_is_refused(digits_run, tmp_path, user):
    run = copy_run(digits_run, tmp_path)
    for f in ("lsa.csv", "accuracy.csv", "mvl.json"):
        shutil.copy(run / f, user.home / "docs" / f)
    (user.home / "docs" / "manifest.json").write_text(json.dumps({"robaudit_version": "0", "command": SECRET}))
    user.before = snapshot(user.home)
    (run / "hardened").symlink_to(user.home / "docs")
    before = (run / "report.html").read_bytes()
    one_line(invoke("report", "--run", run), "symbolic link out of the run")
    one_line(invoke("check", run, "--hardened"), "symbolic link out of the run")
    assert (run / "report.html").read_bytes() == before


def test_a_report_symlink_is_never_written_through(digits_run, tmp_path, user):
    run = copy_run(digits_run, tmp_path)
    (run / "report.html").unlink()
    (run / "report.html").symlink_to(user.home / "thesis.tex")
    one_line(invoke("report", "--run", run), "symbolic link")


def test_latest_run_never_picks_a_symlinked_run(digits_run, tmp_path, user):
    real = copy_run(digits_run, tmp_path, "real")
    other = copy_run(digits_run, tmp_path / "elsewhere")
    os.utime(real / "manifest.json", (1, 1))
    (tmp_path / "reports" / "newest").symlink_to(other)
    assert rundir.latest_run(tmp_path / "reports") == real


# -- 4. every value read from a run is checked once, in the reader --------------------------------------
def _set_cell(run: Path, name: str, column: str, row: int, value: str) -> None:
    df = pd.read_csv(run / name, dtype=str, keep_default_na=False)
    df.loc[row, column] = value
    df.to_csv(run / name, index=False)


def _set_json(run: Path, name: str, keys: tuple, value) -> None:
    doc = json.loads((run / name).read_text())
    node = doc
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    (run / name).write_text(json.dumps(doc))


TAMPERED = {
    "accuracy inf": (lambda r: _set_cell(r, "accuracy.csv", "accuracy", 0, "inf"),
                     ["check", "{run}", "--json"], ("accuracy.csv", "accuracy in row 1", "[0, 1]")),
    "accuracy inf meets no bar": (lambda r: _set_cell(r, "accuracy.csv", "accuracy", 0, "inf"),
                                  ["check", "{run}", "--fail-under", "clean=0.9"], ("accuracy.csv", "accuracy")),
    "accuracy nan": (lambda r: _set_cell(r, "accuracy.csv", "accuracy", 2, "nan"),
                     ["check", "{run}"], ("accuracy.csv", "accuracy", "row 3")),
    "eps negative": (lambda r: _set_cell(r, "accuracy.csv", "eps", 1, "-0.1"), ["check", "{run}"],
                     ("accuracy.csv", "eps in row 2")),
    "re_mean string": (lambda r: _set_cell(r, "lsa.csv", "re_mean", 3, "abc"), ["report", "--run", "{run}"],
                       ("lsa.csv", "re_mean in row 4")),
    "order abc": (lambda r: _set_cell(r, "lsa.csv", "order", 0, "abc"), ["compare", "{run}", "{run}", "--json"],
                  ("lsa.csv", "order in row 1")),
    "kind unknown": (lambda r: _set_cell(r, "lsa.csv", "kind", 0, "evil"), ["report", "--run", "{run}"],
                     ("lsa.csv", "kind")),
    "metric layer_type": (lambda r: _set_json(r, "mvl.json", ("metric",), "layer_type"),
                          ["check", "{run}", "--max-re", "0.5"], ("mvl.json", "metric")),
    "mvl layers ints": (lambda r: _set_json(r, "mvl.json", ("layers",), [1, 2]), ["compare", "{run}", "{run}"],
                        ("mvl.json", "layers[0]")),
    "manifest dataset string": (lambda r: _set_json(r, "manifest.json", ("dataset",), "abc"),
                                ["report", "--run", "{run}"], ("manifest.json", "dataset")),
    "manifest deep": (lambda r: (r / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
                      ["report", "--run", "{run}"], ("manifest.json", "nests deeper")),
    "manifest list": (lambda r: (r / "manifest.json").write_text("[1, 2]"), ["check", "{run}"],
                      ("manifest.json", "JSON object")),
    "manifest batch_size 0": (lambda r: _set_json(r, "manifest.json", ("batch_size",), 0),
                              ["harden", "--run", "{run}", *HARDEN], ("manifest.json", "batch_size")),
    "manifest std 0": (lambda r: _set_json(r, "manifest.json", ("normalization",), {"mean": [0.5], "std": [0]}),
                       ["harden", "--run", "{run}", *HARDEN], ("manifest.json", "normalization.std[0]")),
    "manifest eps 1e4": (lambda r: _set_json(r, "manifest.json", ("eps",), [0.1, 1e4]),
                         ["harden", "--run", "{run}", *HARDEN], ("manifest.json", "eps[1]")),
    "manifest seed string": (lambda r: _set_json(r, "manifest.json", ("seed",), "0"),
                             ["harden", "--run", "{run}", *HARDEN], ("manifest.json", "seed")),
    "manifest attack": (lambda r: _set_json(r, "manifest.json", ("attacks",), ["fgsm", "rm -rf"]),
                        ["harden", "--run", "{run}", *HARDEN], ("manifest.json", "attacks[1]")),
    "checks fgsm string": (lambda r: _set_json(r, "checks.json", ("outputs", "min"), "x"), ["check", "{run}"],
                           ("checks.json", "outputs.min")),
    "samples label": (lambda r: _set_cell(r, "samples.csv", "label", 0, "-3"), ["report", "--run", "{run}"],
                      ("samples.csv", "label in row 1")),
    "accuracy interval": (lambda r: _set_cell(r, "accuracy.csv", "ci_low", 0, "1.5"), ["check", "{run}"],
                          ("accuracy.csv", "ci_low in row 1")),
    "classes accuracy": (lambda r: _set_cell(r, "classes.csv", "accuracy", 0, "2"), ["report", "--run", "{run}"],
                         ("classes.csv", "accuracy in row 1")),
    "samples index": (lambda r: _set_cell(r, "samples.csv", "index", 0, "x"), ["compare", "{run}", "{run}"],
                      ("samples.csv", "index in row 1")),
    "bn distance": (lambda r: _set_cell(r, "bn.csv", "adv_vs_clean", 0, "-inf"), ["report", "--run", "{run}"],
                    ("bn.csv", "adv_vs_clean")),
    "not utf-8": (lambda r: (r / "lsa.csv").write_bytes(b"layer,attack\n\xff\xfe,x\n"), ["check", "{run}"],
                  ("lsa.csv",)),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_value_is_one_line_naming_the_file_and_field(case, digits_run, tmp_path, user):
    run = copy_run(digits_run, tmp_path)
    tamper, args, needles = TAMPERED[case]
    tamper(run)
    err = one_line(invoke(*[str(a).replace("{run}", str(run)) for a in args]), *needles)
    assert not any(option in err for option in ("--batch-size", "--std", "--seed", "--eps"))
    assert not (run / "hardened").exists()


# -- 5. no spreadsheet formula and no terminal escape from a run or a model -------------------------------
def test_csv_cells_never_start_a_formula_and_read_back_unchanged(tmp_path):
    evil = ['=HYPERLINK("http://x","y")', "@SUM(A1)", "+1", "-2+3", "\tx", "\rx", "'=quoted", "None", "a-b"]
    frame = pd.DataFrame({"layer": evil, "attack": ["pgd"] * len(evil), "eps": [0.1] * len(evil),
                          "re_mean": [0.5] * len(evil), "order": range(len(evil)), "kind": ["adversarial"] * len(evil),
                          "score": [-0.5, float("-inf"), -1.0, 0.0, 1.0, -2.0, 3.0, float("nan"), -0.25]})
    frame.columns = [*frame.columns[:-1], "=cmd"]
    rundir.write_csv(tmp_path / "lsa.csv", frame)
    raw = pd.read_csv(tmp_path / "lsa.csv", dtype=str, keep_default_na=False)
    for cell in list(raw["layer"]) + list(raw.columns):
        assert cell[:1] not in tuple("=+-@\t\r"), cell
    assert list(raw["'=cmd"][:2]) == ["-0.5", "-inf"]  # numbers stay numbers
    back = rundir.read_table(tmp_path, "lsa.csv")
    assert list(back["layer"]) == evil and "=cmd" in back.columns
    assert back["=cmd"].iloc[0] == -0.5 and back["=cmd"].iloc[1] == float("-inf")


def test_no_control_character_reaches_the_terminal(digits_run, tmp_path):
    run = copy_run(digits_run, tmp_path)
    _set_json(run, "manifest.json", ("model", "path"), "m\x1b]8;;http://evil\x07\x1b[2J\r\nfake: line\x9b.pt2")
    result = invoke("check", run)
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\x07\r\x9b") and "m]8;;http://evil" in result.output
    assert "fake: line" in result.output.splitlines()[0]
    bad = invoke("report", "--run", tmp_path / "missing\x1b[31m\nrun")
    one_line(bad, "robaudit analyze")
    assert "\x1b" not in bad.stderr


def test_the_mvl_table_strips_escapes_from_layer_names(capsys):
    from robaudit import cli

    layers = pd.DataFrame({"layer": ["=evil\x1b[31m\nnext"], "layer_type": ["\x1b]0;title\x07Conv"], "score": [0.5]})
    mvl = SimpleNamespace(layers=layers, names=list(layers["layer"]), metric="re_mean", attack="pgd", eps=0.1,
                          excluded=[])
    acc = pd.DataFrame({"attack": ["clean"], "eps": [float("nan")], "accuracy": [1.0]})
    run = SimpleNamespace(result=SimpleNamespace(accuracy=acc, n_samples=1, seconds=0.1, clean_accuracy=1.0), mvl=mvl,
                          manifest={"model": {"path": "m"}, "dataset": {"name": "d"}}, path=Path("nowhere"))
    cli.echo_summary(run)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "=evil[31m next" in out


def test_the_before_after_tables_strip_escapes_from_layer_names(tmp_path):
    from robaudit import tables

    from tests._rundir import make_run

    run = make_run(tmp_path / "run", hardened=True)  # the before/after runs whose intervals the table reads

    comp = pd.DataFrame([
        {"kind": "accuracy", "attack": "clean", "eps": None, "norm": None, "layer": None, "before": 0.9,
         "after": 0.8, "delta": -0.1},
        {"kind": "re", "attack": "pgd", "eps": 0.1, "norm": None, "layer": "evil\x1b]0;title\x07\nnext",
         "before": 0.5, "after": 0.25, "delta": -0.25}])
    after = pd.DataFrame({"attack": ["clean"], "eps": [float("nan")], "kind": ["clean"], "accuracy": [0.8]})
    settings = {"method": "atlr", "mvl_layers": ["evil\x1b[2J"], "eps": 0.1, "epochs": 1, "seconds_training": 1.0,
                "mvl_ranking": {"metric": "re_mean"}}
    done = SimpleNamespace(settings=settings, comparison=comp, analysis=SimpleNamespace(accuracy=after),
                           result=SimpleNamespace(validation="v", bn_at_test="none", notes=["shown", "\x1b[31mnew"]),
                           run_dir=run, model_path=Path("m.pt2"), hardened_dir=run / "hardened")
    lines = [tables.terminal_line(line) for line in tables.harden_summary(done, warned=["shown"])]
    out = "\n".join(lines)
    assert not any(c in out for c in "\x1b\x07") and "evil]0;title next" in out
    assert "note: [31mnew" in out and "note: shown" not in out  # a note shown as a warning is not repeated
    import re

    assert re.search(r"^  clean +\S+% \(\S+-\S+%\) +\S+% \(\S+-\S+%\) +-10\.0  no test$", out, re.M), out


# -- 6. a full disk is one line, and nothing is left behind ---------------------------------------------
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    out = tmp_path / "reports" / "run"
    err = one_line(invoke("analyze", MOONS_PT2, *MOONS, "--out", out), "no space left", "lsa.csv", str(out.parent))
    assert ".tmp" not in err
    assert not out.exists() and list((tmp_path / "reports").iterdir()) == []


# -- 7. one robaudit at a time per destination ----------------------------------------------------------
def _hold(dest: Path, pid: int = 4242) -> int:
    """Hold ``dest``'s lock as another robaudit process would (an flock on its own open file)."""
    path = writelock.lock_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid}\n".encode())
    return fd


def test_a_second_analysis_to_the_same_out_fails_at_once(moons_run, tmp_path):
    out = tmp_path / "reports" / "run"
    fd = _hold(out)
    try:
        one_line(invoke("analyze", MOONS_PT2, *MOONS, "--out", out), "another robaudit is writing", "pid 4242")
        assert not out.exists()
    finally:
        os.close(fd)  # the other process ends: its flock is gone, its (stale) lock file is taken over
    assert invoke("analyze", MOONS_PT2, *MOONS, "--out", out).exit_code == 0
    assert no_leftovers(tmp_path / "reports") == []


def test_harden_and_report_hold_their_destination(moons_run, tmp_path):
    run = copy_run(moons_run, tmp_path)
    fd = _hold(run)
    try:
        one_line(invoke("harden", "--run", run, *HARDEN), "another robaudit is writing", str(run))
        one_line(invoke("report", "--run", run), "another robaudit is writing")
        one_line(invoke("analyze", MOONS_PT2, *MOONS, "--out", run, "--force"), "another robaudit is writing")
    finally:
        os.close(fd)
    page = tmp_path / "page.html"
    fd = _hold(page)
    try:
        one_line(invoke("report", "--run", run, "--out", page), "another robaudit is writing", "pid 4242")
        with pytest.raises(RobauditError, match="another robaudit is writing"):
            render_report(run, page)
    finally:
        os.close(fd)
    assert not page.exists() and not (run / "hardened").exists()


def test_a_planted_lock_symlink_is_refused(tmp_path, user):
    out = tmp_path / "run"
    writelock.lock_path(out).symlink_to(user.home / "thesis.tex")
    one_line(invoke("analyze", MOONS_PT2, *MOONS, "--out", out), "symbolic link")


# -- 8. fuzz: any mutation of a run is read, or refused in one line --------------------------------------
def _mutate(run: Path, rng: random.Random, secret: Path) -> str:
    files = sorted(p for p in run.iterdir() if p.is_file())
    target = rng.choice(files)
    kind = rng.choice(["flip", "truncate", "swap", "delete", "symlink", "dir", "cell", "json", "garbage"])
    data = target.read_bytes()
    if kind == "flip" and data:
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
        target.write_bytes(data)
    elif kind == "truncate":
        target.write_bytes(data[:rng.randrange(len(data) + 1)])
    elif kind == "swap":
        other = rng.choice(files)
        a, b = target.read_bytes(), other.read_bytes()
        target.write_bytes(b)
        other.write_bytes(a)
    elif kind == "delete":
        target.unlink()
    elif kind == "symlink":
        target.unlink()
        target.symlink_to(secret)
    elif kind == "dir":
        target.unlink()
        target.mkdir()
    elif kind == "cell" and target.suffix == ".csv":
        lines = data.decode("utf-8", "replace").splitlines()
        if len(lines) > 1:
            i = rng.randrange(1, len(lines))
            cells = lines[i].split(",")
            cells[rng.randrange(len(cells))] = rng.choice(["inf", "-inf", "nan", "-1", "abc", "1e309", "", "2",
                                                           "=cmd()", "\x1b[2J", "True", "0.5"])
            lines[i] = ",".join(cells)
            target.write_text("\n".join(lines) + "\n")
    elif kind == "json" and target.suffix == ".json":
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc:
            key = rng.choice(sorted(doc))
            doc[key] = rng.choice([None, "x", -1, 0, 1e308, [], {}, [[[]]], {"a": {"b": 1}}, True, [1, "a"]])
            target.write_text(json.dumps(doc))
    else:
        target.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    return f"{kind} {target.name}"


def test_fuzzed_runs_are_read_or_refused_in_one_line(digits_run, tmp_path, user):
    """200 seeded mutations of a real run (bit flips, truncations, swapped, deleted files, files replaced by a
    symlink out of the run or by a folder, odd cells and JSON values): every reader either works or refuses in
    one line; nothing else escapes, and no report embeds the user's secret."""
    bars = gate.parse_bars("clean=0.5,worst-case=0.1,sanity", max_re=2.0)
    secret = user.home / "credentials.json"
    outcomes = {"read": 0, "refused": 0}
    for case in range(200):
        rng = random.Random(case)
        run = tmp_path / f"case{case}"
        shutil.copytree(digits_run, run, symlinks=True)
        what = _mutate(run, rng, secret)
        try:
            got = read_run(run)
            checks = verdict.checks_of(got)
            verdict.summarize(got, checks)
            if case % 2:
                compare_runs(run, digits_run).to_dict()
            if case % 40 == 0:
                assert SECRET not in render_report(run).read_text()
            gate.evaluate(bars, got, checks)
            outcomes["read"] += 1
        except RobauditError as e:
            message = str(e)
            assert message and "\n" not in message and "\r" not in message, (case, what, message)
            outcomes["refused"] += 1
        except Exception as e:  # anything else is a crash a user would see as "unexpected"
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
        shutil.rmtree(run)
    assert outcomes["read"] > 20 and outcomes["refused"] > 20, outcomes
