"""Tests for robaudit.data: small files in the real formats (IDX, CIFAR pickles, tar.gz, npz), no network."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robaudit import data
from robaudit.data import download
from robaudit.data import DATASETS, Dataset, dataset_info, load_dataset
from robaudit.errors import RobauditError

# ------------------------------------------------------------------------------------------------
# writers for the real on-disk formats


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0,0,0x08,ndim, big-endian uint32 dims, data."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def mnist_arrays(n=5):
    images = ((np.arange(n * 28 * 28) * 7) % 256).astype(np.uint8).reshape(n, 28, 28)
    labels = np.arange(n, dtype=np.uint8) % 10
    return images, labels


def write_idx(folder, prefix="t10k", n=5, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = mnist_arrays(n)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        raw = idx_bytes(arr)
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return images, labels


def cifar_arrays(n, seed, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, classes, n)]


def write_cifar10(root, n=4, protocol=2):
    """The six CIFAR-10 batch files of ``n`` images each (or of the six sizes in ``n``), pickled by this python
    (protocol 2 stores the pixels as latin-1 text) or, with ``protocol="py2"``, as the published files are."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    sizes = n if isinstance(n, (list, tuple)) else [n] * 6
    for i, (fname, size) in enumerate(zip([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"], sizes)):
        x, y = cifar_arrays(size, seed=i)
        batches[fname] = (x, y)
        (folder / fname).write_bytes(cifar_pickle(x, y, b"labels", protocol))
    return batches


def write_cifar100(root, sizes=(6, 6), protocol=2):
    """CIFAR-100's ``train`` and ``test`` files of ``sizes`` images, labelled by ``fine_labels``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for seed, (fname, size) in enumerate(zip(("train", "test"), sizes)):
        x, y = cifar_arrays(size, seed=seed, classes=100)
        (folder / fname).write_bytes(cifar_pickle(x, y, b"fine_labels", protocol))


def cifar_pickle(x: np.ndarray, labels: list[int], label_key: bytes, protocol) -> bytes:
    """A CIFAR batch: as the published files (``"py2"``) or pickled by this python with ``protocol``."""
    if protocol == "py2":
        return py2_cifar_pickle(x, labels, label_key)
    batch = {b"batch_label": b"x", b"data": x, label_key: labels}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v // 5 for v in labels]
    return pickle.dumps(batch, protocol=protocol)


def targz_of(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def _py2_str(s: bytes) -> bytes:
    """SHORT_BINSTRING or BINSTRING opcode: a python-2 ``str``, as in the original CIFAR files."""
    return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<i", len(s)) + s


def py2_cifar_pickle(x: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A CIFAR batch pickled the way python 2 + old numpy wrote the published files (hand-assembled opcodes)."""
    n = x.shape[0]
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
             + b"(K\x01K" + bytes([n]) + b"M" + struct.pack("<H", 3072) + b"\x86"
             + b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + _py2_str(x.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(label_key) + label_list + b"u."


class Evil:
    """A pickle payload whose loading would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------
# embedded data sets


@pytest.mark.parametrize("name,shape,classes,n_test,n_train", [
    ("moons", (2,), 2, 500, 1500),
    ("digits", (1, 8, 8), 10, 360, 1437),
])
def test_embedded_shapes_ranges_determinism(name, shape, classes, n_test, n_train):
    test = load_dataset(name)
    train = load_dataset(name, split="train")
    again = load_dataset(name.upper())
    assert isinstance(test, Dataset) and test.name == name and test.split == "test"
    assert (len(test), len(train)) == (n_test, n_train)
    assert test.input_shape == shape and test.x.dtype == torch.float32 and test.y.dtype == torch.int64
    assert test.num_classes == classes and set(test.y.tolist()) == set(range(classes))
    for d in (test, train):
        assert d.x.min() >= 0 and d.x.max() <= 1
    assert train.x.min() == 0 or train.x.max() == 1 or name == "digits"
    assert torch.equal(test.x, again.x) and torch.equal(test.y, again.y)
    assert test.mean is None and test.std is None and test.source == "scikit-learn"
    assert test.default_eps == (0.05, 0.1, 0.2)
    # the splits are disjoint
    flat = lambda d: {tuple(r) for r in d.x.reshape(len(d), -1).tolist()}  # noqa: E731
    if name == "moons":
        assert not flat(test) & flat(train)


def test_samples_and_shuffle():
    first = load_dataset("digits", samples=50)
    full = load_dataset("digits")
    assert torch.equal(first.x, full.x[:50])
    a = load_dataset("digits", samples=50, shuffle=True, seed=3)
    b = load_dataset("digits", samples=50, shuffle=True, seed=3)
    c = load_dataset("digits", samples=50, shuffle=True, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, first.x) and not torch.equal(a.x, c.x)
    perm = torch.randperm(360, generator=torch.Generator().manual_seed(3))[:50]
    assert torch.equal(a.x, full.x[perm]) and torch.equal(a.y, full.y[perm])


def test_samples_too_many_warns_and_nonpositive_refused():
    with pytest.warns(UserWarning, match="only 500"):
        d = load_dataset("moons", samples=10_000)
    assert len(d) == 500
    for bad in (0, -3):
        with pytest.raises(RobauditError, match="positive"):
            load_dataset("moons", samples=bad)


def test_unknown_name_and_split():
    with pytest.raises(RobauditError, match=r"unknown data set 'imagenet'.*mnist.*\.npz"):
        load_dataset("imagenet")
    with pytest.raises(RobauditError, match="no such file"):
        load_dataset("/nonexistent/file.npz")
    with pytest.raises(RobauditError, match="split"):
        load_dataset("moons", split="val")
    assert DATASETS == ("moons", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100")


def test_dataset_info_and_aliases():
    info = dataset_info("Fashion_MNIST")
    assert info["name"] == "fashion-mnist" and info["mean"] == (0.2860,) and info["input_shape"] == (1, 28, 28)
    assert dataset_info("cifar10")["default_eps"] == (2 / 255, 4 / 255, 8 / 255)
    with pytest.raises(RobauditError):
        dataset_info("nope")


# ------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", ["", "mnist", "MNIST/raw"])
def test_mnist_idx(tmp_path, gz, sub):
    images, labels = write_idx(tmp_path / sub if sub else tmp_path, gz=gz)
    d = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert d.x.shape == (5, 1, 28, 28) and d.y.tolist() == labels.tolist()
    assert torch.equal(d.x, torch.tensor(images, dtype=torch.float32)[:, None] / 255)
    assert d.mean == (0.1307,) and d.std == (0.3081,) and d.default_eps == (0.1, 0.2, 0.3) and d.num_classes == 10


def test_fashion_alias_and_train_split(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", prefix="train", n=3)
    d = load_dataset("fashionmnist", split="train", data_dir=tmp_path, download=False)
    assert d.name == "fashion-mnist" and len(d) == 3 and d.mean == (0.2860,) and d.std == (0.3530,)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_idx(tmp_path / "mnist")
    monkeypatch.setenv("ROBAUDIT_DATA", str(tmp_path))
    assert len(load_dataset("mnist", download=False)) == 5


def test_idx_corrupt(tmp_path):
    images, labels = mnist_arrays()
    good_labels = gzip.compress(idx_bytes(labels))
    cases = {
        "bad magic": b"\x08\x03" + idx_bytes(images)[2:],
        "truncated": idx_bytes(images)[:-100],
        "wrong type": bytes([0, 0, 0x0D, 3]) + idx_bytes(images)[4:],
        "empty": b"",
    }
    for what, raw in cases.items():
        (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw)
        (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(good_labels)
        with pytest.raises(RobauditError, match="not a valid IDX file") as err:
            load_dataset("mnist", data_dir=tmp_path, download=False)
        assert "\n" not in str(err.value), what
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images))[:-30])  # cut gzip
    with pytest.raises(RobauditError, match="decompress"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_idx_count_mismatch(tmp_path):
    images, _ = mnist_arrays(5)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(RobauditError, match="5 images but .* 4 labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_missing_files_without_download(tmp_path, name):
    with pytest.raises(RobauditError, match="not found") as err:
        load_dataset(name, data_dir=tmp_path / "nothing", download=False)
    assert str(tmp_path / "nothing") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "nothing").exists()


# ------------------------------------------------------------------------------------------------
# downloads (network replaced by a fake)


def test_download_checksum(tmp_path, monkeypatch):
    payload = b"some bytes"
    monkeypatch.setattr(download, "fetch", lambda url, out: out.write(payload))
    dest = tmp_path / "dl" / "file.gz"
    with pytest.raises(RobauditError, match="md5"):
        download.download_file("MNIST", ["http://mirror/file.gz"], dest, "0" * 32)
    assert list((tmp_path / "dl").iterdir()) == []  # neither the file nor a temp file is left
    download.download_file("MNIST", ["http://mirror/file.gz"], dest, hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload and list((tmp_path / "dl").iterdir()) == [dest]


def test_download_falls_back_to_next_mirror(tmp_path, monkeypatch):
    calls = []

    def fetch(url, out):
        calls.append(url)
        if "first" in url:
            raise OSError("connection refused")
        out.write(b"ok")

    monkeypatch.setattr(download, "fetch", fetch)
    dest = tmp_path / "f"
    download.download_file("X", ["http://first/f", "http://second/f"], dest, hashlib.md5(b"ok").hexdigest())
    assert calls == ["http://first/f", "http://second/f"] and dest.read_bytes() == b"ok"


def test_download_network_failure_message(tmp_path, monkeypatch):
    def fetch(url, out):
        out.write(b"partial")
        raise OSError("no route to host")

    monkeypatch.setattr(download, "fetch", fetch)
    with pytest.raises(RobauditError, match=r"cannot download MNIST to .*no route to host.*check the network") as err:
        load_dataset("mnist", data_dir=tmp_path / "empty")
    assert "\n" not in str(err.value)
    assert not any(p.is_file() for p in (tmp_path / "empty").rglob("*"))


def test_download_end_to_end_mnist(tmp_path, monkeypatch):
    images, labels = mnist_arrays(5)
    files = {"t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images)),
             "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels))}
    fetched = []

    def fetch(url, out):
        fetched.append(url)
        out.write(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(download, "fetch", fetch)
    monkeypatch.setitem(data.IDX_SOURCES, "mnist", (
        data.IDX_SOURCES["mnist"][0], data.IDX_SOURCES["mnist"][1],
        {k[:-3]: hashlib.md5(v).hexdigest() for k, v in files.items()}))
    d = load_dataset("mnist", data_dir=tmp_path)
    assert torch.equal(d.x, torch.tensor(images, dtype=torch.float32)[:, None] / 255)
    assert (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert fetched[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    load_dataset("mnist", data_dir=tmp_path)  # now found on disk: no second download
    assert len(fetched) == 2


def test_download_end_to_end_cifar(tmp_path, monkeypatch):
    src = tmp_path / "src"
    batches = write_cifar10(src)
    archive = tmp_path / "a.tar.gz"
    targz_of(src / "cifar-10-batches-py", archive)
    blob = archive.read_bytes()
    monkeypatch.setattr(download, "fetch", lambda url, out: out.write(blob))
    src_spec = data.CIFAR_SOURCES["cifar10"]
    monkeypatch.setitem(data.CIFAR_SOURCES, "cifar10", src_spec[:-1] + (hashlib.md5(blob).hexdigest(),))
    d = load_dataset("cifar10", data_dir=tmp_path / "dd")
    assert d.y.tolist() == batches["test_batch"][1]
    assert (tmp_path / "dd" / "cifar-10-python.tar.gz").is_file()


def test_published_checksums():
    assert data.IDX_SOURCES["mnist"][2]["train-images-idx3-ubyte"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert data.IDX_SOURCES["fashion-mnist"][2]["t10k-labels-idx1-ubyte"] == "bb300cfdad3c16e7a12a480ee83cd310"
    assert data.CIFAR_SOURCES["cifar10"][-1] == "c58f30108f718f92721af3b95e74349a"
    assert data.CIFAR_SOURCES["cifar100"][-1] == "eb9058c3a382ffc7106e4002c42a8d85"


# ------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_batches(tmp_path):
    batches = write_cifar10(tmp_path)
    test = load_dataset("cifar10", data_dir=tmp_path, download=False)
    x, y = batches["test_batch"]
    assert test.x.shape == (4, 3, 32, 32) and test.y.tolist() == y
    assert torch.equal(test.x, torch.tensor(x, dtype=torch.float32).reshape(4, 3, 32, 32) / 255)
    assert test.mean == (0.4914, 0.4822, 0.4465) and test.std == (0.2470, 0.2435, 0.2616)
    train = load_dataset("cifar10", split="train", data_dir=tmp_path, download=False)
    assert len(train) == 20
    assert train.y.tolist() == sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])


def test_cifar10_targz(tmp_path):
    src = tmp_path / "src"
    batches = write_cifar10(src)
    dd = tmp_path / "dd"
    dd.mkdir()
    targz_of(src / "cifar-10-batches-py", dd / "cifar-10-python.tar.gz")
    d = load_dataset("cifar10", data_dir=dd, download=False)
    assert d.y.tolist() == batches["test_batch"][1]
    assert (dd / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x, y = cifar_arrays(6, seed=1, classes=100)
    for fname in ("train", "test"):
        with open(folder / fname, "wb") as fh:
            pickle.dump({b"data": x, b"fine_labels": y, b"coarse_labels": [0] * 6}, fh, protocol=2)
    d = load_dataset("cifar100", data_dir=tmp_path, download=False)
    assert d.num_classes == 100 and d.y.tolist() == y and d.x.shape == (6, 3, 32, 32)
    assert d.mean == (0.5071, 0.4865, 0.4409)


def test_cifar_python2_pickle(tmp_path):
    """The published files reference numpy.core.multiarray and hold python-2 strings."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x, y = cifar_arrays(3, seed=5)
    blob = py2_cifar_pickle(x, y)
    assert pickle.loads(blob, encoding="bytes")[b"labels"] == y  # the hand-made pickle is well formed
    (folder / "test_batch").write_bytes(blob)
    d = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert d.y.tolist() == y
    assert torch.equal(d.x, torch.tensor(x, dtype=torch.float32).reshape(3, 3, 32, 32) / 255)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_refused(tmp_path, payload):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = Evil(marker) if payload == "system" else _EvalPayload(marker)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"data": evil, b"labels": [0]}, fh, protocol=2)
    with pytest.raises(RobauditError, match="refusing to read .*test_batch") as err:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert "\n" not in str(err.value)
    assert not marker.exists()


class _EvalPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


def test_cifar_damaged_batch(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(RobauditError, match="cannot read CIFAR batch"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    with open(path, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(RobauditError, match="N×3072"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_tar_path_traversal_refused(tmp_path):
    dd = tmp_path / "dd"
    dd.mkdir()
    with tarfile.open(dd / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(RobauditError, match="refusing to extract"):
        load_dataset("cifar10", data_dir=dd, download=False)
    assert not (tmp_path / "escaped").exists()


# streamed CIFAR: the pixels are read from the batch files, a batch at a time


def _cifar(root, name: str, protocol):
    """A CIFAR-10 (five train files of unequal sizes) or CIFAR-100 folder; returns load_dataset's keywords."""
    if name == "cifar10":
        write_cifar10(root, n=[3, 5, 1, 4, 2, 6], protocol=protocol)
    else:
        write_cifar100(root, sizes=(9, 7), protocol=protocol)
    return {"data_dir": root, "download": False}


@pytest.mark.parametrize("protocol", ["py2", 4, 5])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_streamed_cifar_reads_the_pixels_from_the_files(tmp_path, name, protocol):
    """The published layout (python 2's BINSTRING) and numpy's protocols 4 and 5 (BINBYTES, BYTEARRAY8):
    the same samples, order and values as in memory, every split, every selection."""
    kw = _cifar(tmp_path, name, protocol)
    for split in ("test", "train"):
        for select in ({}, {"samples": 5}, {"samples": 4, "shuffle": True, "seed": 3}, {"shuffle": True}):
            eager = load_dataset(name, split=split, **select, **kw)
            lazy = load_dataset(name, split=split, stream=True, **select, **kw)
            assert isinstance(lazy.items.x, data.FileRows), "read in place, not held"
            assert lazy.input_shape == (3, 32, 32) and torch.equal(lazy.y, eager.y)
            xb, yb = lazy.items.__getitems__(list(range(len(lazy))))
            assert xb.dtype == torch.uint8 and yb.dtype == torch.int64 and torch.equal(yb, eager.y)
            assert torch.equal(xb.float() / 255, eager.x) and torch.equal(lazy.head(len(lazy))[0], eager.x)
            x0, y0 = lazy.items[len(lazy) - 1]
            assert x0.dtype == torch.uint8 and x0.shape == (3, 32, 32) and y0 == int(eager.y[-1])
            index = torch.tensor([len(lazy) - 1, 0, 1, 2] if len(lazy) > 3 else [0])
            assert torch.equal(data.rows(lazy, index, torch.device("cpu")), eager.x[index])


def test_streamed_cifar_batches_cross_files_in_worker_processes(tmp_path):
    """DataLoader workers open the files themselves (no descriptor is pickled) and read contiguous runs
    across the five train files; a set's descriptors close with it."""
    import gc

    kw = _cifar(tmp_path, "cifar10", "py2")
    eager = load_dataset("cifar10", split="train", **kw)
    lazy = load_dataset("cifar10", split="train", stream=True, **kw)
    rows = lazy.items.x
    assert torch.equal(lazy.head(4)[0], eager.x[:4]) and rows._fds  # the parent has opened files
    copy = pickle.loads(pickle.dumps(rows))
    assert copy._fds == {} and np.array_equal(copy[np.arange(15)], rows[np.arange(15)])
    got = list(data.batches(lazy, batch_size=4, device=torch.device("cpu"), workers=2))
    assert [s for s, _, _ in got] == [0, 4, 8, 12]
    assert torch.equal(torch.cat([x for _, x, _ in got]), eager.x)
    assert torch.equal(torch.cat([y for *_, y in got]), eager.y)
    fds = list(rows._fds.values()) + list(copy._fds.values())
    del lazy, rows, copy
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_streamed_cifar_pickled_by_python3_in_protocol_2_is_read_in_memory(tmp_path, caplog):
    """Protocol 2 from python 3 stores bytes as latin-1 text (UTF-8 in the file): they cannot be read in place,
    so the split is read as before, with the same values."""
    import logging

    kw = _cifar(tmp_path, "cifar10", 2)
    with caplog.at_level(logging.INFO, logger="robaudit.data"):
        lazy = load_dataset("cifar10", split="train", samples=7, shuffle=True, stream=True, **kw)
    eager = load_dataset("cifar10", split="train", samples=7, shuffle=True, **kw)
    assert type(lazy.items.x) is np.ndarray and len(lazy.items.x) == 7 and "as text" in caplog.text
    assert torch.equal(lazy.head(7)[0], eager.x) and torch.equal(lazy.y, eager.y)


def _lie(tmp_path, blob: bytes):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(blob)
    return {"data_dir": tmp_path, "download": False, "stream": True}


@pytest.mark.parametrize("case,match", [
    ("truncated", "a string of 9216 bytes at offset .* does not fit in the file's 500"),
    ("binstring past the end", "a string of 2147483647 bytes"),
    ("binbytes8 past the end", "a string of 4611686018427387904 bytes"),
    ("negative binstring", "a string of -2 bytes"),
    ("shape larger than the bytes", "shape \\(4, 3072\\) needs 12288 bytes but the file stores 9216"),
    ("not uint8", "no uint8 'data' array of shape N×3072"),
    ("labels of another length", "no 'labels' list of 3 labels"),
])
def test_streamed_cifar_damaged_or_lying_batch_is_one_line(tmp_path, case, match):
    """Headers are checked against the file before anything is read or allocated."""
    import tracemalloc

    x, y = cifar_arrays(3, seed=0)
    blob = py2_cifar_pickle(x, y)
    raw = b"T" + struct.pack("<i", 9216)
    edits = {"truncated": lambda b: b[:500],
             "binstring past the end": lambda b: b.replace(raw, b"T" + struct.pack("<i", 2**31 - 1)),
             "binbytes8 past the end": lambda b: pickle.dumps({b"data": x, b"labels": y}, protocol=3).replace(
                 b"B" + struct.pack("<I", 9216), b"\x8e" + struct.pack("<Q", 2**62)),
             "negative binstring": lambda b: b.replace(raw, b"T" + struct.pack("<i", -2)),
             "shape larger than the bytes": lambda b: b.replace(b"(K\x01K\x03M", b"(K\x01K\x04M"),
             "not uint8": lambda b: pickle.dumps({b"data": x.view(np.int8), b"labels": y}, protocol=4),
             "labels of another length": lambda b: py2_cifar_pickle(x, y[:2])}
    kw = _lie(tmp_path, edits[case](blob))
    tracemalloc.start()
    try:
        with pytest.raises(RobauditError, match=match) as err:
            load_dataset("cifar10", **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value) and str(err.value).endswith("delete it and download it again")
    assert peak < 2**20  # nothing near what a header claims


# ------------------------------------------------------------------------------------------------
# npz


@pytest.mark.parametrize("shape", [(7, 3), (7, 1, 4, 4)])
def test_npz(tmp_path, shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 4])
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    d = load_dataset(str(path))
    assert d.name == "mine" and d.num_classes == 5 and d.input_shape == shape[1:]
    assert torch.equal(d.x, torch.from_numpy(x)) and d.y.tolist() == y.tolist()
    assert d.mean is None and d.source == str(path.resolve())
    d3 = load_dataset(path, samples=3)
    assert torch.equal(d3.x, torch.from_numpy(x[:3]))


@pytest.mark.parametrize("save", ["savez", "savez_compressed", "npy"])
def test_arrays_of_images_get_the_image_eps_sweep(tmp_path, save):
    """3×32×32 images in an array get 2/255, 4/255, 8/255 as image folders do; vectors and 8×8 images keep
    0.05-0.2, in memory and streamed."""
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2])
    expected = {(6, 3, 32, 32): (2 / 255, 4 / 255, 8 / 255), (6, 3, 32, 15): (0.05, 0.1, 0.2),
                (6, 1, 8, 8): (0.05, 0.1, 0.2), (6, 1024): (0.05, 0.1, 0.2)}
    for i, (shape, eps) in enumerate(expected.items()):
        x = rng.random(shape).astype(np.float32)
        folder = tmp_path / str(i)
        folder.mkdir()
        if save == "npy":
            np.save(folder / "x.npy", x)
            np.save(folder / "y.npy", y)
            path = folder / "x.npy"
        else:
            path = folder / "set.npz"
            getattr(np, save)(path, x=x, y=y)
        for stream in (False, True):
            d = load_dataset(path, stream=stream)
            assert d.default_eps == pytest.approx(eps), (shape, stream)
            assert d.input_shape == shape[1:]


@pytest.mark.parametrize("x,y,match", [
    (np.full((3, 2), 1.5, np.float32), np.zeros(3, np.int64), "outside"),
    (np.full((3, 2), -0.1, np.float32), np.zeros(3, np.int64), "outside"),
    (np.zeros((3, 2), np.float32), np.zeros((3, 1), np.int64), "y has"),
    (np.zeros((3, 2), np.float32), np.zeros(2, np.int64), "y has"),
    (np.zeros((3, 2), np.float32), np.zeros(3, np.float32), "y has"),
    (np.array([[0.1, np.nan]] * 3, np.float32), np.zeros(3, np.int64), "NaN"),
    (np.zeros((3, 2), np.uint8), np.zeros(3, np.int64), "not float"),
    (np.zeros((3, 2, 2), np.float32), np.zeros(3, np.int64), "shape"),
])
def test_npz_invalid(tmp_path, x, y, match):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(RobauditError, match=match) as err:
        load_dataset(str(path))
    assert "\n" not in str(err.value)


def test_npz_refuses_pickles_and_missing_keys(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([Evil(tmp_path / "pwned")], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(RobauditError, match="cannot read"):
        load_dataset(str(path))
    assert not (tmp_path / "pwned").exists()
    path = tmp_path / "keys.npz"
    np.savez(path, images=np.zeros((2, 2), np.float32))
    with pytest.raises(RobauditError, match="not x and y"):
        load_dataset(str(path))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(RobauditError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))


def test_no_warnings_on_normal_load():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("moons", samples=10)


# ----------------------------------------------------------------------------- image folders


def write_images(root, sizes=None, *, mode="RGB", fmt="PNG"):
    """root/<class>/<i>.png: two classes, known pixel values; returns the arrays written, by (class, file)."""
    from PIL import Image

    sizes = sizes or {"cat": [(4, 3), (4, 3)], "dog": [(4, 3)]}
    written = {}
    rng = np.random.default_rng(0)
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(shapes):
            arr = rng.integers(0, 256, size=(h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
            name = f"{i}.{'png' if fmt == 'PNG' else 'jpg'}"
            Image.fromarray(arr, mode).save(root / cls / name, format=fmt)
            written[(cls, name)] = arr
    return written


def test_imagefolder_reads_classes_in_sorted_order_exactly(tmp_path):
    written = write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    d = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert d.x.shape == (3, 3, 3, 4) and d.x.dtype == torch.float32 and d.num_classes == 2
    assert d.y.tolist() == [0, 0, 1]
    expected = np.stack([written[k] for k in (("cat", "0.png"), ("cat", "1.png"), ("dog", "0.png"))])
    assert torch.equal(d.x, torch.from_numpy(expected.transpose(0, 3, 1, 2).astype(np.float32)) / 255)
    assert d.mean is None and d.default_eps == (2 / 255, 4 / 255, 8 / 255)


def test_imagefolder_grayscale_jpeg_and_class_map(tmp_path):
    write_images(tmp_path / "g", mode="L", fmt="JPEG")
    (tmp_path / "map.json").write_text(json.dumps({"cat": 3, "dog": 1}))
    d = load_dataset(f"imagefolder:{tmp_path / 'g'}", class_map=tmp_path / "map.json")
    assert d.x.shape == (3, 1, 3, 4) and d.y.tolist() == [3, 3, 1] and d.num_classes == 4
    (tmp_path / "list.json").write_text(json.dumps(["dog", "cat"]))
    assert load_dataset(f"imagefolder:{tmp_path / 'g'}", class_map=tmp_path / "list.json").y.tolist() == [1, 1, 0]
    (tmp_path / "short.json").write_text(json.dumps(["dog"]))
    with pytest.raises(RobauditError, match="'cat' is not in class map"):
        load_dataset(f"imagefolder:{tmp_path / 'g'}", class_map=tmp_path / "short.json")


def test_imagefolder_resize_and_center_crop(tmp_path):
    from PIL import Image

    # an 8x4 image whose columns 2..5 are white: shorter side 4 -> 2 is a 4x2 image, center crop keeps 1..2
    (tmp_path / "f" / "a").mkdir(parents=True)
    arr = np.zeros((4, 8), dtype=np.uint8)
    arr[:, 2:6] = 255
    Image.fromarray(arr, "L").save(tmp_path / "f" / "a" / "x.png")
    Image.fromarray(np.full((6, 6), 128, np.uint8), "L").save(tmp_path / "f" / "a" / "y.png")
    with pytest.raises(RobauditError, match="--image-size"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}")  # two sizes: one line saying what to do
    d = load_dataset(f"imagefolder:{tmp_path / 'f'}", image_size=2)
    assert d.x.shape == (2, 1, 2, 2)
    expected = np.asarray(Image.fromarray(arr, "L").resize((4, 2), Image.Resampling.BILINEAR))[:, 1:3]
    assert torch.equal(d.x[0, 0], torch.from_numpy(expected.astype(np.float32)) / 255)
    assert torch.allclose(d.x[1], torch.full((1, 2, 2), 128 / 255))


def test_imagefolder_refuses_bad_input_in_one_line(tmp_path):
    with pytest.raises(RobauditError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(RobauditError, match="no .png/.jpg/.jpeg images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "a" / "x.png").write_bytes(b"GIF89a not a png")
    with pytest.raises(RobauditError, match="cannot decode image"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(RobauditError, match="imagefolder:DIR only"):
        load_dataset("digits", image_size=8)


def test_cli_analyzes_an_image_folder(tmp_path):
    from click.testing import CliRunner

    from robaudit.cli import main

    write_images(tmp_path / "imgs", {"a": [(6, 5)] * 3, "b": [(5, 6)] * 3}, mode="L")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.save(model, tmp_path / "m.pt")  # a pickled module of this test's own: --trust-model
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["analyze", str(tmp_path / "m.pt"), "--trust-model", "--dataset",
                                    f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "4", "--attack", "pgd:steps=2",
                                    "--eps", "0.1", "--no-report", "--no-checks", "--out", str(out)])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["dataset"]["image_size"] == 4 and man["dataset"]["input_shape"] == [1, 4, 4]
    assert man["n_samples"] == 6


def test_api_run_of_an_image_folder_records_a_command_that_reruns_it(tmp_path):
    from robaudit.stages.analyze import analyze_run

    write_images(tmp_path / "imgs", {"a": [(5, 5)] * 2, "b": [(6, 5)] * 2}, mode="L")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.save(model, tmp_path / "m.pt")  # a pickled module of this test's own: trust_model
    run = analyze_run(tmp_path / "m.pt", f"imagefolder:{tmp_path / 'imgs'}", out=tmp_path / "run", image_size=4,
                      attacks=["fgsm"], eps=[0.1], checks=False, report=False, trust_model=True)
    assert "--image-size 4" in run.manifest["command"]


def test_npz_members_are_memory_mapped_when_stored(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x, y = rng.random((9, 1, 3, 3)).astype(np.float32), np.arange(9) % 3
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    mapped, _ = data.read_npz(tmp_path / "plain.npz", "fix")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, x)
    packed, _ = data.read_npz(tmp_path / "packed.npz", "fix")
    assert not isinstance(packed, np.memmap) and np.array_equal(packed, x)
    for name in ("plain.npz", "packed.npz"):
        d = load_dataset(str(tmp_path / name), samples=4, shuffle=True, seed=2)
        keep = torch.randperm(9, generator=torch.Generator().manual_seed(2))[:4].numpy()
        assert torch.equal(d.x, torch.from_numpy(x[keep])) and d.y.tolist() == y[keep].tolist()
        d.x += 1  # a private copy, not the file
    assert np.array_equal(np.load(tmp_path / "plain.npz")["x"], x)


def test_npy_pair_is_memory_mapped(tmp_path):
    x, y = np.linspace(0, 1, 12, dtype=np.float32).reshape(6, 2), np.array([0, 1, 0, 1, 2, 2])
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(RobauditError, match="no labels file"):
        load_dataset(str(tmp_path / "x.npy"))
    np.save(tmp_path / "y.npy", y)
    d = load_dataset(str(tmp_path / "x.npy"))
    assert torch.equal(d.x, torch.from_numpy(x)) and d.y.tolist() == y.tolist() and d.num_classes == 3
    np.save(tmp_path / "y.npy", np.array([object()] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(RobauditError, match="without pickles"):
        load_dataset(str(tmp_path / "x.npy"))
    with pytest.raises(RobauditError, match="no such file"):
        load_dataset(str(tmp_path / "missing.npy"))


def test_streamed_image_folder_gives_the_same_analysis_as_in_memory(tmp_path):
    from robaudit.lsa import analyze

    write_images(tmp_path / "imgs", {"a": [(5, 4)] * 5, "b": [(5, 4)] * 4})
    root = f"imagefolder:{tmp_path / 'imgs'}"
    eager = load_dataset(root, samples=7, shuffle=True, seed=3)
    lazy = load_dataset(root, samples=7, shuffle=True, seed=3, stream=True)
    assert len(lazy) == 7 and lazy.input_shape == eager.input_shape == (3, 4, 5)
    assert torch.equal(lazy.y, eager.y) and torch.equal(lazy.head(7)[0], eager.x)
    assert lazy.items[0][0].dtype == torch.uint8  # uint8 until the batch is on the device
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(60, 6), nn.ReLU(), nn.Linear(6, 2))
    kw = dict(attacks=["pgd:steps=2", "gaussian"], eps=[0.1], batch_size=3, device="cpu", seed=4)
    a, b = analyze(model, eager, **kw), analyze(model, lazy, **kw)
    pd.testing.assert_frame_equal(a.lsa, b.lsa)
    pd.testing.assert_frame_equal(a.accuracy.drop(columns="seconds"), b.accuracy.drop(columns="seconds"))


def test_streamed_npz_gives_the_same_analysis_as_in_memory(tmp_path):
    from robaudit.lsa import analyze

    rng = np.random.default_rng(2)
    x, y = rng.random((11, 6)).astype(np.float32), np.arange(11) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    eager = load_dataset(str(tmp_path / "d.npz"), samples=8, shuffle=True, seed=1)
    lazy = load_dataset(str(tmp_path / "d.npz"), samples=8, shuffle=True, seed=1, stream=True)
    assert isinstance(lazy, data.StreamingDataset) and isinstance(lazy.items.x, np.memmap)
    assert torch.equal(lazy.head(8)[0], eager.x) and torch.equal(lazy.y, eager.y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    kw = dict(attacks=["pgd:steps=2", "uniform"], eps=[0.1], batch_size=3, device="cpu", seed=2)
    a, b = analyze(model, eager, **kw), analyze(model, lazy, **kw)
    pd.testing.assert_frame_equal(a.lsa, b.lsa)
    pd.testing.assert_frame_equal(a.accuracy.drop(columns="seconds"), b.accuracy.drop(columns="seconds"))


def _write_format(fmt: str, root):
    """A small split in one real on-disk format; returns (load_dataset name, kwargs, split)."""
    if fmt in ("mnist", "mnist.gz"):
        write_idx(root, prefix="train", n=13, gz=fmt.endswith(".gz"))
        return "mnist", {"data_dir": root, "download": False}, "train"
    if fmt in ("cifar10", "cifar10-py2"):  # five train batches: the split is assembled from several files
        write_cifar10(root, n=3, protocol="py2" if fmt == "cifar10-py2" else 2)
        return "cifar10", {"data_dir": root, "download": False}, "train"
    if fmt == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        x, y = cifar_arrays(13, seed=4, classes=100)
        with open(folder / "test", "wb") as fh:
            pickle.dump({b"data": x, b"fine_labels": y, b"coarse_labels": [0] * 13}, fh, protocol=4)
        return "cifar100", {"data_dir": root, "download": False}, "test"
    rng = np.random.default_rng(5)
    np.savez_compressed(root / "c.npz", x=rng.random((13, 3, 4, 4)).astype(np.float32),
                        y=(np.arange(13) % 3).astype(np.uint8))
    return str(root / "c.npz"), {}, "test"


@pytest.mark.parametrize("fmt", ["mnist", "mnist.gz", "cifar10", "cifar10-py2", "cifar100", "npz-compressed"])
def test_every_on_disk_format_streams_with_the_same_analysis(tmp_path, fmt):
    from robaudit.lsa import analyze

    tmp_path.mkdir(exist_ok=True)
    name, kw, split = _write_format(fmt, tmp_path)
    eager = load_dataset(name, split=split, samples=11, shuffle=True, seed=7, **kw)
    lazy = load_dataset(name, split=split, samples=11, shuffle=True, seed=7, stream=True, **kw)
    assert isinstance(eager, Dataset) and isinstance(lazy, data.StreamingDataset)
    assert len(lazy) == 11 and lazy.input_shape == eager.input_shape and lazy.num_classes == eager.num_classes
    assert torch.equal(lazy.y, eager.y) and torch.equal(lazy.head(11)[0], eager.x)
    stored = lazy.items.x
    if fmt == "npz-compressed":  # a compressed member cannot be mapped: held as stored, rows become float32
        assert stored.dtype == np.float32 and lazy.items[0][0].dtype == torch.float32
    else:  # pixels stay uint8 until the batch is on the device; a plain IDX file is memory-mapped
        assert stored.dtype == np.uint8 and lazy.items[0][0].dtype == torch.uint8
        assert isinstance(stored, np.memmap) == (fmt == "mnist")
        # read in place from batches storing raw bytes; protocol 2 from python 3 stores text: held in memory
        assert isinstance(stored, data.FileRows) == (fmt in ("cifar10-py2", "cifar100"))
    if type(stored) is np.ndarray:  # held in memory: only the samples used are kept
        assert len(stored) == 11
    torch.manual_seed(0)
    channels = eager.input_shape[0]
    model = nn.Sequential(nn.Conv2d(channels, 2, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(8, eager.num_classes))
    run = dict(attacks=["pgd:steps=2", "gaussian"], eps=[0.1], batch_size=4, device="cpu", seed=3)
    a, b = analyze(model, eager, **run), analyze(model, lazy, **run)
    pd.testing.assert_frame_equal(a.lsa, b.lsa)
    pd.testing.assert_frame_equal(a.accuracy.drop(columns="seconds"), b.accuracy.drop(columns="seconds"))


def test_image_folder_file_names_are_held_in_arrays(tmp_path):
    """Streamed image folders keep their file names as one bytes array (non-ASCII names included) and decode
    the same samples, in the same order, as the folder loaded whole, with and without a shuffled subset."""
    from PIL import Image

    from pathlib import Path

    from robaudit.data import FileList

    written = write_images(tmp_path / "imgs", {"chat": [(4, 3)] * 3, "épagneul": [(4, 3)] * 2})
    Image.fromarray(written[("chat", "0.png")]).save(tmp_path / "imgs" / "chat" / "ü-1.png")
    for kw in ({}, {"samples": 4, "shuffle": True, "seed": 3}):
        whole = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", **kw)
        streamed = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", stream=True, **kw)
        files = streamed.items.files
        assert isinstance(files, FileList) and files.names.dtype.kind == "S"
        torch.testing.assert_close(streamed.head(len(streamed))[0], whole.x)
        assert torch.equal(streamed.y, whole.y)
    assert len(files) == 4 and all(Path(files[i][0]).is_file() for i in range(len(files)))
    full = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", stream=True).items.files
    assert [Path(full[i][0]).relative_to(tmp_path / "imgs").as_posix() for i in range(len(full))] == [
        "chat/0.png", "chat/1.png", "chat/2.png", "chat/ü-1.png", "épagneul/0.png", "épagneul/1.png"]
