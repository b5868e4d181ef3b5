"""robaudit deletes only what it wrote: --out checks, --force, interrupts and SIGKILL at any moment."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import MOONS_PT2, assert_one_line_failure, invoke

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "moons", "--attack", "fgsm", "--eps", "0.1", "--samples", "40", "--no-checks", "--no-report"]


def analyze(out, *extra):
    return invoke("analyze", MOONS_PT2, *QUICK, "--out", out, *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


def test_a_folder_of_the_users_files_is_refused(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\section{Results}")
    before = snapshot(folder)
    for extra in ((), ("--force",)):
        result = analyze(folder, *extra)
        assert_one_line_failure(result, "not a robaudit run directory")
        assert snapshot(folder) == before
    assert staging_left(tmp_path) == []


def test_a_run_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    first = snapshot(out)
    assert_one_line_failure(analyze(out, "--seed", "1"), "--force")
    assert snapshot(out) == first
    result = analyze(out, "--seed", "1", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


def test_force_never_deletes_a_file_robaudit_did_not_write(tmp_path):
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    (out / "notes.md").write_text("mine")
    (out / "hardened").mkdir()
    (out / "hardened" / "plot.svg").write_text("<svg/>")
    result = analyze(out, "--force")
    assert_one_line_failure(result, "did not write", "notes.md")
    assert (out / "notes.md").read_text() == "mine" and (out / "hardened" / "plot.svg").exists()


@pytest.mark.parametrize("case", ["file", "below a file", "empty", "proc", "symlink"])
def test_the_output_path_is_checked_before_the_model_is_even_read(case, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "keep").write_text("k")
    out = {"file": afile, "below a file": afile / "sub", "empty": "", "proc": "/proc/robaudit-run",
           "symlink": tmp_path / "link"}[case]
    # the model does not exist: a failure about --out proves the check comes first
    result = invoke("analyze", tmp_path / "missing.pt2", "--dataset", "moons", "--out", out)
    assert_one_line_failure(result, "--out")
    assert afile.read_text() == "x" and (tmp_path / "real" / "keep").exists()


@pytest.mark.parametrize("args, needle", [
    (["--attack", "pgd:alpha=-1"], "alpha"),
    (["--attack", "pgd:steps=0"], "steps"),
    (["--attack", "square:n_queries=0"], "n_queries"),
    (["--attack", "pgd:eps="], "eps"),
    (["--eps", "1e9"], "eps"),
    (["--mvl-z", "nan"], "--mvl-z"),
    (["--mvl-top", "0"], "--mvl-top"),
    (["--seed", "1180591620717411303424"], "seed"),
])
def test_bad_values_are_refused_up_front(args, needle, tmp_path):
    result = invoke("analyze", tmp_path / "missing-model.pt2", "--dataset", "moons", *args, "--out",
                    tmp_path / "out")
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert needle.lower() in err.lower() and "Traceback" not in result.output
    assert "not found" not in err  # refused before the model is looked at
    assert not (tmp_path / "out").exists()


def test_run_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert analyze(tmp_path / "run").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755


def test_the_report_is_in_place_before_the_run_is(tmp_path, monkeypatch):
    """An interrupt while the report renders leaves no run at all, never one without its report."""
    import robaudit.stages.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(robaudit.stages.report, "render_report", interrupted)
    result = invoke("analyze", MOONS_PT2, *[a for a in QUICK if a != "--no-report"], "--out", tmp_path / "run")
    assert result.exit_code == 130
    assert not (tmp_path / "run").exists() and staging_left(tmp_path) == []


def test_report_out_never_overwrites_another_file(tmp_path):
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    mine = tmp_path / "thesis.tex"
    mine.write_text("mine")
    assert_one_line_failure(invoke("report", "--run", out, "--out", mine), "not a robaudit report")
    assert mine.read_text() == "mine"
    assert invoke("report", "--run", out, "--out", tmp_path / "r.html").exit_code == 0
    assert invoke("report", "--run", out, "--out", tmp_path / "r.html").exit_code == 0  # its own report: replaced


# -- SIGKILL at random moments ---------------------------------------------------------------
def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "robaudit", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _assert_safe(parent: Path, out: Path, user_files: dict[str, bytes]) -> None:
    assert {k: v for k, v in snapshot(parent).items() if k in user_files} == user_files, "a user's file changed"
    if out.exists():
        names = {p.name for p in out.iterdir()}
        assert {"lsa.csv", "accuracy.csv", "mvl.json", "manifest.json", "report.html"} <= names, names


def test_sigkill_during_analyze_leaves_no_half_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    user = snapshot(tmp_path)
    out = tmp_path / "run"
    rng = random.Random(7)
    args = ["analyze", MOONS_PT2, "--dataset", "moons", "--attack", "fgsm", "--attack", "pgd:steps=5", "--eps",
            "0.1", "--samples", "100", "--no-checks", "--force", "--out", out]
    for delay in sorted(rng.uniform(0.5, 6.0) for _ in range(3)):
        proc = _spawn(args, tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_safe(tmp_path, out, user)
    # the next run removes what a killed one may have left while staging, and completes
    proc = _spawn(args, tmp_path)
    assert proc.wait(timeout=300) == 0
    _assert_safe(tmp_path, out, user)
    assert staging_left(tmp_path) == []


def test_sigkill_during_harden_then_resume_in_the_model_form(tmp_path):
    """The interrupt message suggests rerunning with --resume; in the ``harden MODEL --out DIR`` form that must
    find the checkpoint, not analyze again (which would replace the run and its checkpoint)."""
    out = tmp_path / "run"
    assert analyze(out).exit_code == 0
    train = ["--epochs", "4", "--steps", "1", "--no-report"]
    proc = _spawn(["harden", "--run", out, *train], tmp_path)
    checkpoint = out / "harden-checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    analyzed = (out / "lsa.csv").read_bytes()
    result = invoke("harden", MOONS_PT2, "--dataset", "moons", "--out", out, *train, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stdout.lower()
    assert (out / "lsa.csv").read_bytes() == analyzed  # not analyzed again
    assert (out / "hardened" / "harden.json").exists() and not checkpoint.exists()
    assert staging_left(out) == []


# -- hostile data files and option values --------------------------------------------------------
# Every case below is one line (a RobauditError, or the CLI's one-line error and a non-zero exit), changes no
# byte outside the test's folder, and a bomb stays far below the memory it asks for.
import contextlib  # noqa: E402
import io  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import tracemalloc  # noqa: E402
import warnings  # noqa: E402
import zipfile  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from robaudit import data, limits  # noqa: E402
from robaudit.attacks import parse, parse_eps_list  # noqa: E402
from robaudit.errors import RobauditError  # noqa: E402
from robaudit.training.config import HardenConfig  # noqa: E402

MB = 1 << 20


def refused(call, *needles: str) -> str:
    """``call()`` raises a one-line RobauditError holding every needle; its message."""
    with pytest.raises(RobauditError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle.lower() in msg.lower(), msg
    return msg


@contextlib.contextmanager
def untouched(folder: Path):
    """Nothing in ``folder`` (the test's own files) changes and nothing appears in the working directory."""
    before, cwd = snapshot(folder), sorted(os.listdir("."))
    yield
    assert snapshot(folder) == before and sorted(os.listdir(".")) == cwd


@contextlib.contextmanager
def peak_below(limit: int):
    """The Python and numpy memory allocated in the block peaks below ``limit`` bytes (tracemalloc)."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit, f"peak {peak / MB:.0f} MB"


def raw_zip(members) -> bytes:
    """A zip of ``(raw name, method, stored bytes, crc, uncompressed size)`` members, written byte by byte (so
    names may hold anything and sizes may lie)."""
    out, central = bytearray(), bytearray()
    for name, method, packed, crc, size in members:
        central += struct.pack("<4sHHHHHHLLLHHHHHLL", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(packed),
                               size, len(name), 0, 0, 0, 0, 0, len(out)) + name
        out += struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(packed), size,
                           len(name), 0) + name + packed
    return bytes(out + central + struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, len(members), len(members),
                                             len(central), len(out), 0))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def member(name: bytes, payload: bytes, deflate: bool = True):
    """A zip member tuple for :func:`raw_zip` holding ``payload``."""
    if not deflate:
        return name, zipfile.ZIP_STORED, payload, zlib.crc32(payload), len(payload)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return name, zipfile.ZIP_DEFLATED, c.compress(payload) + c.flush(), zlib.crc32(payload), len(payload)


def repeated_deflate(head: bytes, chunk: bytes, times: int, *, wbits: int) -> tuple[bytes, int]:
    """A deflate stream of ``head + chunk * times`` built from two compressions (full flushes make every chunk's
    bytes the same), and the CRC-32 of what it inflates to: a large bomb in a fraction of a second."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(chunk, zlib.crc32(head))
    for _ in range(times - 1):
        crc = zlib.crc32(chunk, crc)
    return first + again * times + c.flush(), crc


def npz_bomb(path: Path, rows: int = 73_216) -> Path:
    """An .npz of ~875 kB whose x (rows x 3 x 32 x 32 float32 zeros) inflates to 900 MB: a valid file that
    np.load reads whole."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3, 32, 32)})
    head, chunk = buf.getvalue(), bytes(64 * 3 * 32 * 32 * 4)
    packed, crc = repeated_deflate(head, chunk, rows // 64, wbits=-15)
    x = (b"x.npy", zipfile.ZIP_DEFLATED, packed, crc, len(head) + rows * 3 * 32 * 32 * 4)
    path.write_bytes(raw_zip([x, member(b"y.npy", npy_bytes(np.zeros(rows, np.int64)))]))
    return path


def png_bomb(path: Path, side: int = 13_000) -> Path:
    """A valid grayscale PNG of side x side pixels, all black, in ~164 kB (Pillow only warns about it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">L", len(body)) + kind + body + struct.pack(">L", zlib.crc32(kind + body))

    rows = 100  # side is a multiple of it
    idat, _ = repeated_deflate(b"", bytes(side + 1) * rows, side // rows, wbits=15)
    adler = 1
    for _ in range(side // rows):
        adler = zlib.adler32(bytes(side + 1) * rows, adler)
    idat = idat[:-4] + struct.pack(">L", adler)  # the zlib trailer of all the rows, not of the two compressed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">LLBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def small_npz(path: Path, *, n: int = 6, compressed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y = rng.random((n, 1, 3, 3)).astype(np.float32), np.arange(n) % 3
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y)
    return x, y


def test_npz_decompression_bomb_is_refused_before_inflating(tmp_path):
    bomb = npz_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 900_000  # 875 kB that np.load would inflate to 900 MB
    with untouched(tmp_path), peak_below(200 * MB):
        for samples in (5, None):
            refused(lambda: data.load_dataset(str(bomb), samples=samples, stream=True), "decompression bomb",
                    "np.savez")
    result = invoke("analyze", MOONS_PT2, "--dataset", bomb, "-n", "5", "--out", tmp_path / "run")
    assert_one_line_failure(result, "decompression bomb")
    assert not (tmp_path / "run").exists()


def test_npz_inflates_only_the_rows_used(tmp_path):
    """x's deflated stream is cut after about a third of its rows: the first rows still load (nothing after
    them is inflated), the whole split is one line saying the member ends early."""
    x, y = small_npz(tmp_path / "d.npz", n=300)
    with zipfile.ZipFile(tmp_path / "d.npz") as zf:
        infos = {i.filename: i for i in zf.infolist()}
    x_member = member(b"x.npy", npy_bytes(x))
    cut = x_member[:2] + (x_member[2][:len(x_member[2]) // 3],) + x_member[3:]
    (tmp_path / "cut.npz").write_bytes(raw_zip([cut, member(b"y.npy", npy_bytes(y))]))
    assert "x.npy" in infos
    with untouched(tmp_path):
        d = data.load_dataset(str(tmp_path / "cut.npz"), samples=5)
        assert torch.equal(d.x, torch.from_numpy(x[:5])) and d.y.tolist() == y[:5].tolist()
        refused(lambda: data.load_dataset(str(tmp_path / "cut.npz")), "x.npy", "ends after", "truncated")


@pytest.mark.parametrize("case, needles", [
    ("x twice", ("'x' twice",)),
    ("x and x.npy", ("'x' twice",)),
    ("NUL in a name", ("control character",)),
    ("size disagrees with the header", ("needs", "declares")),
    ("local header names another member", ("local header",)),
    ("more data than declared", ("more than",)),
    ("stored size lies", ("do not fit",)),
    ("object array", ("python objects",)),
    ("bzip2 member", ("compression method 12",)),
])
def test_npz_members_must_agree_before_anything_is_inflated(tmp_path, case, needles):
    x, y = np.full((4, 2), 0.5, np.float32), np.arange(4)
    xs, ys = npy_bytes(x), member(b"y.npy", npy_bytes(y))
    good = member(b"x.npy", xs)
    members = {
        "x twice": [good, good, ys],
        "x and x.npy": [member(b"x", xs), good, ys],
        "NUL in a name": [member(b"x.npy\x00.txt", xs), good, ys],
        "size disagrees with the header": [good[:4] + (good[4] + 8,), ys],
        "local header names another member": [good, ys],
        "more data than declared": [member(b"x.npy", xs + bytes(MB))[:3] + (zlib.crc32(xs), len(xs)), ys],
        "stored size lies": [member(b"x.npy", xs, deflate=False)[:4] + (len(xs) + 1000,), ys],
        "object array": [member(b"x.npy", npy_bytes(np.array([None, 1], dtype=object)) if False else
                                xs.replace(b"'<f4'", b"'|O' ")), ys],
        "bzip2 member": [(b"x.npy", 12) + good[2:], ys],
    }[case]
    blob = raw_zip(members)
    if case == "local header names another member":  # the central directory says x.npy, the local header y.npy
        blob = blob.replace(b"PK\x03\x04", b"PK\x03\x04", 1)
        first = blob.index(b"x.npy")
        blob = blob[:first] + b"z.npy" + blob[first + 5:]
    path = tmp_path / "crafted.npz"
    path.write_bytes(blob)
    with untouched(tmp_path):
        refused(lambda: data.load_dataset(str(path)), *needles)


def test_png_bomb_is_refused_from_its_header(tmp_path):
    png_bomb(tmp_path / "imgs" / "a" / "bomb.png")
    assert (tmp_path / "imgs" / "a" / "bomb.png").stat().st_size < 200_000
    code = ("import json, resource, sys\n"
            "from robaudit import data\n"
            "from robaudit.errors import RobauditError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n"
            "    data.load_dataset('imagefolder:' + sys.argv[1])\n"
            "    msg = None\n"
            "except RobauditError as e:\n"
            "    msg = str(e)\n"
            "print(json.dumps([msg, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before]))\n")
    with untouched(tmp_path):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "imgs")], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=120)
    msg, grown_kb = json.loads(out.stdout.strip().splitlines()[-1])
    assert msg and "\n" not in msg and "bomb.png" in msg and "13000x13000" in msg and "ROBAUDIT_MAX_IMAGE_PIXELS" in msg
    assert grown_kb * 1024 < 200 * MB, f"{grown_kb / 1024:.0f} MB"


def test_the_pixel_limit_can_be_raised(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("L", (20, 10)).save(tmp_path / "imgs" / "a" / "wide.png")
    monkeypatch.setenv(data.PIXELS_ENV, "199")
    refused(lambda: data.load_dataset(f"imagefolder:{tmp_path / 'imgs'}"), "wide.png", "200 pixels",
            f"{data.PIXELS_ENV}=200")
    monkeypatch.setenv(data.PIXELS_ENV, "200")
    assert data.load_dataset(f"imagefolder:{tmp_path / 'imgs'}").x.shape == (1, 1, 10, 20)
    monkeypatch.setenv(data.PIXELS_ENV, "nan")
    refused(lambda: data.load_dataset(f"imagefolder:{tmp_path / 'imgs'}"), data.PIXELS_ENV)


def _alarm(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def boom(*_):
        raise TimeoutError("blocked on a special file")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    return old


@pytest.mark.parametrize("case, needle", [("deep", "nests deeper"), ("fifo", "not a regular file"),
                                          ("device", "not a regular file"), ("huge label", "labels must lie")])
def test_class_map_is_a_small_regular_json_file(tmp_path, case, needle):
    from tests.test_data import write_images

    write_images(tmp_path / "imgs")
    path = {"deep": tmp_path / "deep.json", "fifo": tmp_path / "map.fifo", "device": Path("/dev/zero"),
            "huge label": tmp_path / "big.json"}[case]
    if case == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "huge label":
        path.write_text(json.dumps({"cat": 0, "dog": 10**12}))
    old = _alarm(20)
    try:
        with untouched(tmp_path), peak_below(200 * MB):
            refused(lambda: data.load_dataset(f"imagefolder:{tmp_path / 'imgs'}", class_map=path), needle)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", ["class folder", "image", "image inside the folder"])
def test_image_folder_symlinks_are_refused_naming_the_link(tmp_path, case):
    from tests.test_data import write_images

    write_images(tmp_path / "imgs")
    write_images(tmp_path / "elsewhere", {"secret": [(4, 3)]})
    link = {"class folder": tmp_path / "imgs" / "zebra", "image": tmp_path / "imgs" / "cat" / "9.png",
            "image inside the folder": tmp_path / "imgs" / "dog" / "copy.png"}[case]
    target = {"class folder": tmp_path / "elsewhere" / "secret",
              "image": tmp_path / "elsewhere" / "secret" / "0.png",
              "image inside the folder": tmp_path / "imgs" / "cat" / "0.png"}[case]
    link.symlink_to(target)
    with untouched(tmp_path):
        for stream in (False, True):
            refused(lambda: data.load_dataset(f"imagefolder:{tmp_path / 'imgs'}", stream=stream), str(link),
                    "symbolic link")
        result = invoke("analyze", MOONS_PT2, "--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--out",
                        tmp_path / "run")
    assert_one_line_failure(result, "symbolic link", link.name)


def test_special_files_in_an_image_folder_never_block(tmp_path):
    from tests.test_data import write_images

    write_images(tmp_path / "imgs")
    os.mkfifo(tmp_path / "imgs" / "cat" / "pipe.png")
    old = _alarm(20)
    try:
        with untouched(tmp_path):
            refused(lambda: data.load_dataset(f"imagefolder:{tmp_path / 'imgs'}"), "pipe.png", "not a regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("command, args, needle", [
    ("analyze", ["--attack", "pgd:steps=nan"], "pgd:steps"),
    ("analyze", ["--attack", "pgd:steps=inf"], "pgd:steps"),
    ("analyze", ["--attack", "pgd:steps=1e20"], "pgd:steps"),
    ("analyze", ["--attack", "square:n_queries=1e9"], "square:n_queries"),
    ("analyze", ["--attack", "pgd:alpha=1e20"], "pgd:alpha"),
    ("analyze", ["--attack", "pgdl2:eps=inf"], "pgdl2:eps"),
    ("analyze", ["--image-size", "1e20"], "--image-size"),
    ("analyze", ["--image-size", "0"], "--image-size"),
    ("analyze", ["--mean", "nan", "--std", "0.5"], "--mean"),
    ("analyze", ["--mean", "inf", "--std", "0.5"], "--mean"),
    ("analyze", ["--mean", "0.5", "--std", "nan"], "--std"),
    ("analyze", ["--mean", "0.5", "--std", "0"], "--std"),
    ("analyze", ["--mean", "0.5", "--std", "-1"], "--std"),
    ("analyze", ["--mean", "0.5", "--std", "inf"], "--std"),
    ("harden", ["--eps", "1e20"], "--eps"),
    ("harden", ["--eps", "nan"], "--eps"),
    ("harden", ["--alpha", "1e20"], "--alpha"),
    ("harden", ["--layer-eps", "inf"], "--layer-eps"),
    ("harden", ["--steps", "100000000"], "--steps"),
    ("harden", ["--image-size", "1e20"], "--image-size"),
])
def test_out_of_range_values_are_one_line_naming_the_option_and_range(command, args, needle, tmp_path):
    result = invoke(command, tmp_path / "missing-model.pt2", "--dataset", "moons", *args, "--out", tmp_path / "out")
    assert_one_line_failure(result, needle, "must be")
    assert "not found" not in result.stderr  # refused before the model is looked at
    assert any(word in result.stderr for word in ("at most", "at least", "positive")), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["1", "1.0000001", "0", "-0.1", "nan", "inf", "1e20", "8/255"])
def test_analyze_and_harden_accept_the_same_eps(value):
    def accepts(call) -> bool:
        try:
            call()
            return True
        except RobauditError as e:
            assert "\n" not in str(e)
            return False

    verdicts = {accepts(lambda: parse_eps_list(value)), accepts(lambda: parse(f"pgd:eps={value}")),
                accepts(lambda: HardenConfig(eps=value)), accepts(lambda: HardenConfig(eps=0.1, alpha=value))}
    assert len(verdicts) == 1, value
    assert verdicts == {value in ("1", "8/255")}


# -- fuzzing: every damaged file is a success or one line ----------------------------------------
FUZZ_CASES = 200


def _outcome(load) -> str:
    """``load()`` then two batches of what it gave: "ok", or the RobauditError's line; anything else raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # asking for more samples than a damaged file holds only warns
            d = load()
            for i, (_, xb, yb) in enumerate(data.batches(d, batch_size=3, device=torch.device("cpu"))):
                assert xb.dtype == torch.float32 and len(xb) == len(yb)
                if i == 1:
                    break
        return "ok"
    except RobauditError as e:
        assert "\n" not in str(e), str(e)
        return str(e)


def _flip(rng, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, len(b) * 8))
        b[pos // 8] ^= 1 << (pos % 8)
    return bytes(b)


def _mutate_bytes(rng, blob: bytes) -> bytes:
    if not blob:
        return rng.bytes(8)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return _flip(rng, blob)
    if kind == 1:
        return blob[:int(rng.integers(0, len(blob)))]
    start = int(rng.integers(0, len(blob)))
    return blob[:start] + rng.bytes(int(rng.integers(1, 32))) + blob[start + int(rng.integers(1, 32)):]


def _npz_case(rng) -> bytes:
    """A valid x/y .npz, re-zipped with members swapped, duplicated, renamed, added or resized, then bytes
    flipped, cut or overwritten."""
    x = rng.random((int(rng.integers(1, 7)), 1, 3, 3)).astype(np.float32)
    y = np.arange(len(x)) % 3
    members = [member(b"x.npy", npy_bytes(x), rng.random() < 0.6), member(b"y.npy", npy_bytes(y), rng.random() < 0.6)]
    for _ in range(int(rng.integers(0, 3))):
        kind = int(rng.integers(0, 6))
        i = int(rng.integers(0, len(members)))
        name, method, packed, crc, size = members[i]
        if kind == 0:  # swap the names of two members
            j = int(rng.integers(0, len(members)))
            members[i], members[j] = (members[j][0],) + members[i][1:], (name,) + members[j][1:]
        elif kind == 1:  # duplicate one
            members.insert(int(rng.integers(0, len(members) + 1)), members[i])
        elif kind == 2:  # rename: a control byte, another case, no suffix
            pos = int(rng.integers(0, len(name) + 1))
            members[i] = (rng.choice([name[:pos] + bytes([int(rng.integers(0, 32))]) + name[pos:], name.upper(),
                                      name[:-4], name + b".npy"]),) + members[i][1:]
        elif kind == 3:  # an extra member of junk
            members.append(member(b"junk%d" % i, rng.bytes(int(rng.integers(0, 64)))))
        elif kind == 4:  # declared sizes that lie
            members[i] = (name, method, packed, crc, max(0, size + int(rng.integers(-20, 20))))
        else:  # the .npy header's shape edited
            raw = npy_bytes(x if name.startswith(b"x") else y).replace(b"(", b"(9", 1)
            members[i] = member(name, raw, method == zipfile.ZIP_DEFLATED)
    blob = raw_zip(members)
    return _mutate_bytes(rng, blob) if rng.random() < 0.6 else blob


def test_fuzzed_npz_files_load_or_fail_in_one_line(tmp_path):
    rng = np.random.default_rng(2024)
    outcomes = []
    for case in range(FUZZ_CASES):
        path = tmp_path / f"case{case}.npz"
        path.write_bytes(_npz_case(rng))
        samples, shuffle, stream = rng.choice([None, 2, 5]), bool(rng.random() < 0.3), bool(rng.random() < 0.5)
        outcomes.append(_outcome(lambda: data.load_dataset(str(path), samples=samples, shuffle=shuffle,
                                                           stream=stream, seed=case)))
    assert 10 < outcomes.count("ok") < FUZZ_CASES - 10, outcomes  # both outcomes are exercised


def _image_case(rng, root: Path) -> None:
    """A small image folder (PNG and JPEG, RGB and gray) with files flipped, cut, overwritten, swapped, renamed
    or replaced by something that is not an image."""
    from PIL import Image

    paths = []
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            gray = rng.random() < 0.3
            arr = rng.integers(0, 256, size=(3, 4) if gray else (3, 4, 3), dtype=np.uint8)
            fmt = "PNG" if rng.random() < 0.6 else "JPEG"
            path = root / cls / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}"
            Image.fromarray(arr, "L" if gray else "RGB").save(path, format=fmt)
            paths.append(path)
    for _ in range(int(rng.integers(1, 3))):
        path = paths[int(rng.integers(0, len(paths)))]
        if not path.exists():
            continue
        kind = int(rng.integers(0, 7))
        if kind <= 2:
            path.write_bytes(_mutate_bytes(rng, path.read_bytes()))
        elif kind == 3:  # another image's bytes (maybe another size or format)
            other = paths[int(rng.integers(0, len(paths)))]
            if other.exists():
                path.write_bytes(other.read_bytes())
        elif kind == 4:  # renamed: another image suffix, or none
            path.rename(path.with_suffix(str(rng.choice([".jpg", ".png", ".JPEG", ".txt", ""]))))
        elif kind == 5:  # not an image at all
            path.write_bytes(rng.choice([b"", b"GIF89a", b"PK\x03\x04", rng.bytes(40)]))
        else:  # the PNG header claims another size (its CRC fixed or not)
            blob = bytearray(path.read_bytes())
            if blob[:4] == b"\x89PNG":
                blob[16:24] = struct.pack(">LL", int(rng.integers(1, 70_000)), int(rng.integers(1, 70_000)))
                if rng.random() < 0.5:
                    blob[29:33] = struct.pack(">L", zlib.crc32(bytes(blob[12:29])))
                path.write_bytes(bytes(blob))


def test_fuzzed_image_folders_load_or_fail_in_one_line(tmp_path):
    rng = np.random.default_rng(7)
    outcomes = []
    for case in range(FUZZ_CASES):
        root = tmp_path / f"case{case}"
        _image_case(rng, root)
        size, stream, samples = rng.choice([None, 3]), bool(rng.random() < 0.5), rng.choice([None, 3])
        outcomes.append(_outcome(lambda: data.load_dataset(f"imagefolder:{root}", image_size=size, stream=stream,
                                                           samples=samples, shuffle=bool(rng.random() < 0.3))))
    assert 10 < outcomes.count("ok") < FUZZ_CASES - 10, outcomes
