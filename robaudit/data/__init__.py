"""Data sets for auditing: embedded (moons, digits), standard on-disk formats (MNIST / Fashion-MNIST IDX,
CIFAR-10/100 python pickle batches, downloaded when allowed) and user ``.npz`` files.

Every loader gives pixels in [0, 1] (normalization belongs to the model), labels as int64, in a fixed
order, so the same call always gives the same samples. CIFAR pickles are read with a restricted unpickler
that can build numpy arrays and nothing else, so reading them never runs code from the file. Every on-disk
format can also be streamed (``load_dataset(..., stream=True)``): samples stay in their stored form (uint8
pixels, memory-mapped or read from the file batch by batch where the format allows) until a batch is on the
device.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import tokenize
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch
import torch.utils.data

from . import limits
from .errors import RobauditError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("moons", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100")
_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100", "cifar_100": "cifar100",
}
SPLITS = ("test", "train")
DOWNLOAD_TIMEOUT_S = 30

# moons: a fixed pool of make_moons points (noise 0.2, random_state 0, already shuffled by scikit-learn);
# the first 1500 are the train split, the last 500 the test split; both features are min/max scaled into
# [0, 1] with the pool's extremes so train and test share one scaling and clamping to [0, 1] is valid.
MOONS_POOL, MOONS_TRAIN, MOONS_NOISE, MOONS_SEED = 2000, 1500, 0.2, 0
# digits: scikit-learn's 1797 8x8 images; a stratified test split of 360 images (random_state 0),
# each split kept in the order of load_digits.
DIGITS_TEST, DIGITS_SEED = 360, 0


@dataclass
class Dataset:
    """One split of a data set, in input space [0, 1], ready for a model and its attacks."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    default_eps: tuple[float, ...]
    source: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C×H×W or D)."""
        return tuple(self.x.shape[1:])

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples and their labels (as :meth:`StreamingDataset.head` gives them)."""
        return self.x[:n], self.y[:n]


@dataclass(frozen=True)
class _Spec:
    """What is known about a data set before reading it, and the function that reads one split."""

    title: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    default_eps: tuple[float, ...]
    # (spec name, split, data_dir or None, download) -> (x array, y array, divisor so x/divisor is in [0,1], source)
    load: Callable[[str, str, Path | None, bool], tuple[np.ndarray, np.ndarray, float, str]]
    needs_files: bool
    # the same for a streamed split, where x may be an array-like that reads rows on demand (FileRows)
    stream: Callable[[str, str, Path | None, bool], tuple[object, np.ndarray, float, str]] | None = None


# ----------------------------------------------------------------------------------------------
# embedded data sets (scikit-learn, no download)


def _load_moons(name: str, split: str, data_dir: Path | None, download: bool):
    """Two interleaved half-moons, N×2, deterministic pool and split, scaled into [0, 1]."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=MOONS_POOL, noise=MOONS_NOISE, random_state=MOONS_SEED)
    lo, hi = x.min(axis=0), x.max(axis=0)
    x = (x - lo) / (hi - lo)
    part = slice(0, MOONS_TRAIN) if split == "train" else slice(MOONS_TRAIN, MOONS_POOL)
    return x[part].astype(np.float32), y[part], 1.0, "scikit-learn"


def _load_digits(name: str, split: str, data_dir: Path | None, download: bool):
    """scikit-learn's 8×8 digit images (values 0..16) as N×1×8×8 with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(d.target)), test_size=DIGITS_TEST, random_state=DIGITS_SEED, stratify=d.target
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    return d.images[idx].reshape(-1, 1, 8, 8).astype(np.float32), d.target[idx], 16.0, "scikit-learn"


# ----------------------------------------------------------------------------------------------
# downloads


def _fetch(url: str, out: BinaryIO) -> None:
    """Copy ``url`` into the open file ``out`` (the only function here that touches the network)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        shutil.copyfileobj(response, out, length=1 << 20)


def _md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks (integrity check against the published checksums)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(title: str, urls: list[str], dest: Path, md5: str, what: str = "the files") -> None:
    """Download ``dest`` from the first mirror that works; keep it only if its md5 matches.

    The file is written under a temporary name beside ``dest`` and renamed only after the checksum
    matched, so an interrupted or wrong download never leaves a file that looks complete.
    """
    problems = []
    for url in urls:
        log.info("downloading %s to %s", url, dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        except OSError as exc:
            raise RobauditError(f"cannot download {title} to {dest.parent} ({exc.strerror or exc}): choose a "
                                "writable data directory or put the files there yourself (see README)") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out)
            got = _md5(tmp)
            if got != md5:
                problems.append(f"{url} has md5 {got}, expected {md5}")
                continue
            os.replace(tmp, dest)
            return
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts are OSErrors
            reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
            problems.append(f"{url}: {reason}")
        finally:
            tmp.unlink(missing_ok=True)
    raise RobauditError(f"cannot download {title} to {dest.parent} ({'; '.join(problems)}): "
                        f"put {what} there yourself (see README) or check the network")


# ----------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_SOURCES = {  # name -> (sub-folders torchvision and others use, mirrors, md5 of each .gz file)
    "mnist": (
        ("mnist", "MNIST"),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        {"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
    ),
    "fashion-mnist": (
        ("fashion-mnist", "FashionMNIST", "fashion_mnist"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"},
    ),
}


IDX_CHUNK = 1 << 20  # bytes read at a time from a .gz IDX file


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (plain or .gz) of unsigned bytes with ``ndim`` dimensions, checking its header.

    Layout: two zero bytes, type code 0x08 (uint8), the number of dimensions, then each dimension
    as a big-endian uint32, then the data. Anything else is reported as a damaged file. The header is
    checked against the file's size before any data is read. A plain file comes back as a read-only
    uint8 memory map at the header offset, so only the samples used are read; a ``.gz`` file is
    decompressed once, chunk by chunk, into a uint8 array (never more bytes than the header promises).
    """
    bad = f"{path} is not a valid IDX file"
    fix = "delete it and download it again"
    gz = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise RobauditError(f"{bad} (bad magic number {head[:4].hex() or 'empty file'}): {fix}")
            if head[2] != 0x08 or head[3] != ndim:
                raise RobauditError(f"{bad} (type code 0x{head[2]:02x} with {head[3]} dimensions, "
                                    f"expected 0x08 with {ndim}): {fix}")
            raw_dims = fh.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise RobauditError(f"{bad} (header truncated): {fix}")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            size = math.prod(dims)  # exact: a hostile header cannot overflow it
            header = 4 + 4 * ndim
            if gz:
                data, held = _read_upto(fh, size)
            else:
                held = os.fstat(fh.fileno()).st_size - header
    except (OSError, EOFError, zlib.error) as exc:
        raise RobauditError(f"{bad} (cannot read or decompress it: {exc}): {fix}") from None
    if held != size:
        raise RobauditError(f"{bad} (dimensions {dims} need {size} data bytes, the file has "
                            f"{'more' if gz and held > size else held}; truncated or damaged): {fix}")
    if gz:
        return np.frombuffer(data, dtype=np.uint8).reshape(dims)
    if size == 0:  # nothing to map
        return np.zeros(dims, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=dims)


def _read_upto(fh, size: int) -> tuple[bytearray, int]:
    """Read ``size`` bytes from ``fh`` in chunks (so a header that promises more than the file holds allocates
    no more than the file holds); returns them and how many bytes there were, ``size + 1`` meaning "more"."""
    data = bytearray()
    while len(data) < size:
        chunk = fh.read(min(IDX_CHUNK, size - len(data)))
        if not chunk:
            return data, len(data)
        data += chunk
    return data, size + (1 if fh.read(1) else 0)


def _find_idx(folders: list[Path], base: str) -> Path | None:
    """The first of ``base`` or ``base.gz`` found in ``folders``."""
    for folder in folders:
        for candidate in (folder / base, folder / f"{base}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx(name: str, split: str, data_dir: Path | None, download: bool):
    """MNIST-style data set from IDX files in data_dir, data_dir/<name>/ or data_dir/<name>/raw/."""
    subdirs, mirrors, md5s = _IDX_SOURCES[name]
    title = _SPECS[name].title
    folders = [data_dir] + [data_dir / s / r for s in subdirs for r in ("", "raw")]
    folders = [Path(os.path.normpath(f)) for f in folders]
    paths = []
    for base in _IDX_FILES[split]:
        found = _find_idx(folders, base)
        if found is None:
            if not download:
                raise RobauditError(
                    f"{title} {split} file {base}[.gz] not found in {data_dir}, {data_dir / subdirs[0]} "
                    f"or {data_dir / subdirs[0] / 'raw'}: put the IDX files there or allow downloading")
            found = data_dir / subdirs[0] / f"{base}.gz"
            _download(title, [m + found.name for m in mirrors], found, md5s[base], "the IDX files")
        paths.append(found)
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[0] != labels.shape[0]:
        raise RobauditError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds {labels.shape[0]} "
                            "labels: use matching files of one split")
    return images[:, None], labels, 255.0, str(paths[0].parent)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)

_CIFAR_SOURCES = {  # name -> (folder, train files, test files, label key, archive, url, md5 of archive)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels",
                "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels",
                 "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
}


_CIFAR_FIX = "delete it and download it again"


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1 text."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(obj).__name__}, {encoding!r})")
    return codecs.encode(obj, "latin-1", errors)


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy version keeps it
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # what protocol-5 pickles of arrays call: bytes -> array
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


def _refusal(path: Path, module: str, name: str) -> RobauditError:
    """The one-line refusal of a global that a CIFAR batch never names."""
    return RobauditError(
        f"refusing to read {path}: its pickle asks for {module}.{name}, which a CIFAR batch never "
        "needs (no code from the file was run): delete it and use the original CIFAR files")


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers only; any other global is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise _refusal(self.path, module, name) from None


def _unpickle_batch(path: Path, reader: Callable[[BinaryIO], object]) -> object:
    """``reader(file).load()`` of a CIFAR batch, every failure one line: a refusal as it is, damage as 'cannot
    read' (a damaged pickle can fail in many ways; none of them runs code)."""
    try:
        with open(path, "rb") as fh:
            return reader(fh).load()
    except RobauditError:
        raise
    except Exception as exc:
        raise RobauditError(f"cannot read CIFAR batch {path} ({type(exc).__name__}: {exc}): {_CIFAR_FIX}") from None


def _batch_fields(batch, path: Path, label_key: str) -> tuple[object, object]:
    """The ``data`` and ``label_key`` entries of an unpickled batch (its keys bytes or str), which must be a dict."""
    if not isinstance(batch, dict):
        raise RobauditError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict): {_CIFAR_FIX}")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    return batch.get("data"), batch.get(label_key)


def _check_data(dtype, shape: tuple, path: Path) -> None:
    """Refuse a data array that is not N×3072 uint8, the layout of every CIFAR batch."""
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != 3072:
        raise RobauditError(f"{path} has no uint8 'data' array of shape N×3072: {_CIFAR_FIX}")


def _batch_labels(labels, rows: int, path: Path, label_key: str) -> np.ndarray:
    """A batch's labels as int64, one per image, or a one-line refusal."""
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = np.zeros(0)
    if labels.shape != (rows,):
        raise RobauditError(f"{path} has no {label_key!r} list of {rows} labels: {_CIFAR_FIX}")
    return labels


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch safely: a dict with ``data`` (N×3072 uint8) and ``label_key`` (N ints)."""
    data, labels = _batch_fields(_unpickle_batch(path, lambda fh: _ArrayUnpickler(fh, path)), path, label_key)
    dtype, shape = (data.dtype, data.shape) if isinstance(data, np.ndarray) else (None, ())
    _check_data(dtype, shape, path)
    return data.reshape(-1, 3, 32, 32), _batch_labels(labels, data.shape[0], path, label_key)


# Locating the pixels of a batch in its file. A scan walks the pickle with the pure-Python unpickler, the same
# globals allowed, but pushes a _Span (offset, length) for every long string instead of reading it, and builds
# _ArrayRef records instead of arrays: labels and shapes are read, pixels are not.
_TEXT_SKIP = 1 << 16  # text at least this long is skipped unread; bytes of the long-string opcodes always are
# (a batch's other bytes, keys, labels and file names, are short strings with opcodes of their own)


class _Span:
    """Where a string the scan skipped lies in the file; ``text`` when it is UTF-8 text, not raw bytes."""

    __slots__ = ("offset", "length", "text")

    def __init__(self, offset: int, length: int, text: bool) -> None:
        self.offset, self.length, self.text = offset, length, text


class _ArrayRef:
    """A numpy array as its pickle describes it (shape, dtype, C order, raw data or its _Span), never built."""

    __slots__ = ("shape", "dtype", "c_order", "raw")

    def __init__(self, shape=None, dtype=None, c_order=True, raw=None) -> None:
        self.shape, self.dtype, self.c_order, self.raw = shape, dtype, c_order, raw

    def __setstate__(self, state) -> None:
        """What ``ndarray.__setstate__`` takes, ``([version,] shape, dtype, is_fortran, raw)``, recorded."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError(f"an array's state is a {type(state).__name__}, not numpy's tuple")
        self.shape, self.dtype, fortran, self.raw = state[-4:]
        self.c_order = not fortran


def _scan_reconstruct(subtype, shape, dtype) -> _ArrayRef:
    """numpy's ``_reconstruct`` for the scan: the empty array that BUILD then fills, as a record."""
    if subtype is not np.ndarray:
        raise TypeError(f"_reconstruct of {subtype!r}, not numpy.ndarray")
    return _ArrayRef()


def _scan_frombuffer(buf, dtype, shape, order) -> _ArrayRef:
    """numpy's protocol-5 ``_frombuffer(buf, dtype, shape, order)`` for the scan, as a record."""
    return _ArrayRef(shape, dtype, order == "C", buf)


_NOT_RAW = object()  # bytes the pickle stores as text: they cannot be read from the file by offset


def _scan_encode(obj, encoding="utf-8", errors="strict"):
    """``_latin1_encode`` for the scan: skipped text (a protocol-2 pickle's bytes) is marked, not decoded."""
    if isinstance(obj, _Span) and obj.text:
        _latin1_encode("", encoding, errors)  # refuses other encodings as the in-memory read does
        return _NOT_RAW
    return _latin1_encode(obj, encoding, errors)


_SCAN_STANDINS = {_RECONSTRUCT: _scan_reconstruct, _FROMBUFFER: _scan_frombuffer, _latin1_encode: _scan_encode}
_SCAN_GLOBALS = {key: _SCAN_STANDINS.get(value, value) for key, value in _SAFE_GLOBALS.items()}


def _span_opcode(fmt: str, text: bool = False):
    """The scan's handler of a string opcode whose length is packed as ``fmt``."""
    size = struct.calcsize(fmt)
    return lambda self: self.push_span(struct.unpack(fmt, self.read(size))[0], text)


class _ArrayScanner(pickle._Unpickler):
    """The pure-Python unpickler with :data:`_SAFE_GLOBALS` as recording stand-ins: long strings are skipped
    (their place in the file recorded, checked against its size) and frames are read through, so the file's
    position is always the pickle's."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch.update({pickle.BINSTRING[0]: _span_opcode("<i"), pickle.BINBYTES[0]: _span_opcode("<I"),
                     pickle.BINBYTES8[0]: _span_opcode("<Q"), pickle.BYTEARRAY8[0]: _span_opcode("<Q"),
                     pickle.BINUNICODE[0]: _span_opcode("<I", True), pickle.BINUNICODE8[0]: _span_opcode("<Q", True),
                     pickle.FRAME[0]: lambda self: self.read(8)})  # a frame's opcodes follow it in the file

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.file, self.path, self.size = file, path, os.fstat(file.fileno()).st_size

    def find_class(self, module, name):
        try:
            return _SCAN_GLOBALS[(module, name)]
        except KeyError:
            raise _refusal(self.path, module, name) from None

    def push_span(self, length: int, text: bool) -> None:
        """Push the _Span of the ``length`` bytes that follow and seek past them (short text is read)."""
        offset = self.file.tell()
        if length < 0 or offset + length > self.size:
            raise RobauditError(f"cannot read CIFAR batch {self.path}: a string of {length} bytes at "
                                f"offset {offset} does not fit in the file's {self.size} (truncated or damaged): "
                                f"{_CIFAR_FIX}")
        if text and length < _TEXT_SKIP:
            self.append(str(self.read(length), "utf-8", "surrogatepass"))
            return
        self.file.seek(length, os.SEEK_CUR)
        self.append(_Span(offset, length, text))


def _data_layout(ref, path: Path) -> tuple[int, int] | None:
    """``(offset, images)`` of a scanned batch's pixels, checked to be N×3072 uint8 filling their stored bytes;
    None when they are not stored as raw bytes in C order (such a batch is read in memory instead)."""
    if not (isinstance(ref, _ArrayRef) and isinstance(ref.raw, _Span) and not ref.raw.text and ref.c_order
            and isinstance(ref.dtype, np.dtype) and isinstance(ref.shape, tuple)
            and all(type(d) is int and d >= 0 for d in ref.shape)):
        return None
    need = math.prod(ref.shape) * ref.dtype.itemsize
    if need != ref.raw.length:
        raise RobauditError(f"cannot read CIFAR batch {path}: its data array of shape {ref.shape} needs {need} "
                            f"bytes but the file stores {ref.raw.length}: {_CIFAR_FIX}")
    _check_data(ref.dtype, ref.shape, path)
    return ref.raw.offset, ref.shape[0]


def _scan_cifar_batch(path: Path, label_key: str) -> tuple[int, int, np.ndarray] | None:
    """``(offset of the pixels, images, labels)`` of a CIFAR batch file, found without reading its pixels or running
    code from it; None when its pixels are not stored as raw bytes (a protocol-2 pickle written by Python 3)."""
    data, labels = _batch_fields(_unpickle_batch(path, lambda fh: _ArrayScanner(fh, path)), path, label_key)
    layout = _data_layout(data, path)
    if layout is None or isinstance(labels, _ArrayRef):  # labels as an array: rare, and read in memory
        return None
    return (*layout, _batch_labels(labels, layout[1], path, label_key))


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, refusing absolute paths, '..' and anything but files and folders."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                escapes = m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in PurePosixPath(m.name).parts
                if escapes or not (m.isfile() or m.isdir()):
                    raise RobauditError(f"refusing to extract {archive}: member {m.name!r} is a link, an absolute path "
                                        "or leaves the folder; delete the archive and download the original")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise RobauditError(f"cannot extract {archive} ({exc}): delete it and download it again") from None


def _cifar_files(name: str, split: str, data_dir: Path | None, download: bool) -> tuple[list[Path], str]:
    """The batch files of a CIFAR split in data_dir/<folder>/ (or data_dir/<name>/<folder>/), extracting or
    downloading the archive, and the key of their labels."""
    folder, train, test, label_key, archive, url, md5 = _CIFAR_SOURCES[name]
    title = _SPECS[name].title
    files = train if split == "train" else test
    roots = [data_dir, data_dir / name]
    batch_dir = next((r / folder for r in roots if all((r / folder / f).is_file() for f in files)), None)
    if batch_dir is None:
        tgz = next((r / archive for r in roots if (r / archive).is_file()), None)
        if tgz is None:
            if not download:
                names = files[0] if len(files) == 1 else "{" + ",".join(files) + "}"
                raise RobauditError(f"{title} {split} files not found: expected {data_dir / folder / names} or "
                                    f"{data_dir / archive}: put them there or allow downloading")
            tgz = data_dir / archive
            _download(title, [url], tgz, md5, f"{archive} or its extracted {folder}/")
        log.info("extracting %s", tgz)
        safe_extract(tgz, tgz.parent)
        batch_dir = tgz.parent / folder
        missing = [f for f in files if not (batch_dir / f).is_file()]
        if missing:
            raise RobauditError(f"{tgz} does not contain {folder}/{missing[0]}: use the original {archive}")
    return [batch_dir / f for f in files], label_key


def _load_cifar(name: str, split: str, data_dir: Path | None, download: bool):
    """A CIFAR split read into memory as its uint8 pixels."""
    return _held_cifar(*_cifar_files(name, split, data_dir, download))


def _held_cifar(paths: list[Path], label_key: str):
    """The batches' uint8 pixels read into memory, their labels, the scale and the folder."""
    return (*_read_cifar_batches(paths, label_key), 255.0, str(paths[0].parent))


def _stream_cifar(name: str, split: str, data_dir: Path | None, download: bool):
    """A CIFAR split left in its batch files: labels read, the pixels a :class:`FileRows` over the files' data
    bytes, read batch by batch. Batches whose pixels are not stored as raw bytes are read into memory instead."""
    paths, label_key = _cifar_files(name, split, data_dir, download)
    found = [_scan_cifar_batch(path, label_key) for path in paths]
    if any(f is None for f in found):
        log.info("%s stores its pixels as text (a protocol-2 pickle written by Python 3), not as raw bytes that can "
                 "be read in place: reading the %s split into memory", paths[found.index(None)], split)
        return _held_cifar(paths, label_key)
    pixels = FileRows([(path, offset, images) for path, (offset, images, _) in zip(paths, found)], (3, 32, 32))
    return pixels, np.concatenate([labels for *_, labels in found]), 255.0, str(paths[0].parent)


def _read_cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The batches of one split as one uint8 N×3×32×32 array and its labels, never as floats: a single batch as
    it was read; several copied one by one into one array sized for batches as large as the first (so the
    split is held once, plus the batch being read)."""
    if len(paths) == 1:
        return read_cifar_batch(paths[0], label_key)
    x, labels, filled = None, [], 0
    for path in paths:
        data, y = read_cifar_batch(path, label_key)
        if x is None:
            x = np.empty((len(data) * len(paths), *data.shape[1:]), dtype=np.uint8)
        if filled + len(data) > len(x):  # batches of unequal size: grow
            x = np.concatenate([x[:filled], np.empty((len(data), *x.shape[1:]), np.uint8)])
        x[filled:filled + len(data)] = data
        filled += len(data)
        labels.append(y)
        del data
    return x[:filled], np.concatenate(labels)


# ----------------------------------------------------------------------------------------------
# registry, npz files and the public entry points

_SPECS: dict[str, _Spec] = {
    "moons": _Spec("moons", 2, (2,), None, None, (0.05, 0.1, 0.2), _load_moons, False),
    "digits": _Spec("digits", 10, (1, 8, 8), None, None, (0.05, 0.1, 0.2), _load_digits, False),
    "mnist": _Spec("MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), (0.1, 0.2, 0.3), _load_idx, True),
    "fashion-mnist": _Spec("Fashion-MNIST", 10, (1, 28, 28), (0.2860,), (0.3530,), (0.1, 0.2, 0.3), _load_idx, True),
    "cifar10": _Spec("CIFAR-10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                     (2 / 255, 4 / 255, 8 / 255), _load_cifar, True, _stream_cifar),
    "cifar100": _Spec("CIFAR-100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                      (2 / 255, 4 / 255, 8 / 255), _load_cifar, True, _stream_cifar),
}
NPZ_DEFAULT_EPS = (0.05, 0.1, 0.2)


def _canonical(name) -> str | None:
    """The registry key for a data set name (case-insensitive, aliases accepted), or None."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in _SPECS else None


def default_data_dir() -> Path:
    """Where MNIST/CIFAR files live when no data_dir is given: $ROBAUDIT_DATA or ~/.cache/robaudit/data."""
    return Path(os.environ.get("ROBAUDIT_DATA") or Path.home() / ".cache" / "robaudit" / "data").expanduser()


def dataset_info(name) -> dict:
    """What a known data set looks like (classes, input shape, normalization, eps sweep) without reading it."""
    key = _canonical(name)
    if key is None:
        raise _unknown(name)
    s = _SPECS[key]
    return {"name": key, "title": s.title, "num_classes": s.num_classes, "input_shape": s.input_shape,
            "mean": s.mean, "std": s.std, "default_eps": s.default_eps, "needs_data_dir": s.needs_files}


def _unknown(name) -> RobauditError:
    return RobauditError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}, "
                         "a path to an .npz file with arrays x and y, or imagefolder:DIR")


# .npz files are zip archives of .npy members. Nothing in one is trusted: the zip's central directory, each
# member's local header and its .npy header must agree before a byte is inflated, every inflation is capped at
# the size they agree on, and only the rows used are kept (a deflated member is inflated as a stream).
NPZ_MEMBER_MAX = 16 << 30  # bytes a member may declare uncompressed
NPZ_RATIO_MAX = 1000  # a deflated member inflating more than this ...
NPZ_RATIO_FLOOR = 64 << 20  # ... to more than this many bytes is refused as a decompression bomb
_NPY_HEADER_MAX = 10_000  # numpy's own limit on an .npy header's text
_INFLATE_CHUNK = 1 << 20  # compressed bytes read at a time
_ROWS_CHUNK = 4 << 20  # bytes of rows inflated at a time
# what numpy raises on a damaged .npy header (it parses the text with ast.literal_eval, and tokenize for
# headers written by Python 2)
_NPY_HEADER_ERRORS = (ValueError, SyntaxError, TypeError, RecursionError, MemoryError, tokenize.TokenError)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
               NotImplementedError, OverflowError)  # what zipfile raises on a damaged archive


@dataclass(frozen=True)
class _Member:
    """One .npy member of an .npz as its zip entries and its .npy header declare it, checked to agree."""

    name: str
    method: int  # zipfile.ZIP_STORED or ZIP_DEFLATED
    offset: int  # where its (compressed) bytes start in the file
    packed: int  # compressed size
    size: int  # uncompressed size: the .npy header and the array's bytes
    crc: int
    header: int = 0  # bytes of the .npy header
    shape: tuple[int, ...] = ()
    fortran: bool = False
    dtype: np.dtype = np.dtype(np.uint8)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class _MemberStream:
    """The uncompressed bytes of one member, read in order and never more than it declares (stored bytes are
    read as they are, deflated ones inflated chunk by chunk); :meth:`close` checks the end and the CRC when
    the whole member was read."""

    def __init__(self, fh: BinaryIO, member: _Member, where: str) -> None:
        self.fh, self.member, self.where = fh, member, where
        self.left_packed, self.done, self.crc = member.packed, 0, 0
        self.inflate = zlib.decompressobj(-zlib.MAX_WBITS) if member.method == zipfile.ZIP_DEFLATED else None
        fh.seek(member.offset)

    def _input(self, want: int) -> bytes:
        """The next input: what the inflater left unconsumed, or the next compressed (at most ``want`` stored)
        bytes of the file."""
        if self.inflate is not None and self.inflate.unconsumed_tail:
            return self.inflate.unconsumed_tail
        limit = _INFLATE_CHUNK if self.inflate is not None else want
        data = self.fh.read(min(limit, self.left_packed)) if self.left_packed else b""
        self.left_packed -= len(data)
        return data

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer only past the declared size; a one-line error when the member ends early)."""
        n = min(n, self.member.size - self.done)  # the hard cap: never more than declared
        parts, got = [], 0
        while got < n:
            data = self._input(n - got)
            if self.inflate is None:
                out = data
            else:
                try:
                    out = self.inflate.decompress(data, n - got)
                except zlib.error as exc:
                    raise RobauditError(f"{self.where} cannot be inflated ({exc}): the file is damaged; "
                                        "save it again with np.savez") from None
            if out:
                parts.append(out)
                got += len(out)
            elif not data or (self.inflate is not None and self.inflate.eof):
                raise RobauditError(f"{self.where} ends after {self.done + got} of the {self.member.size} bytes "
                                    "it declares: the file is truncated or damaged; save it again with np.savez")
        blob = b"".join(parts) if len(parts) != 1 else parts[0]
        self.crc = zlib.crc32(blob, self.crc)
        self.done += len(blob)
        return blob

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` (bytes) with the next ``len(view)`` bytes, a chunk at a time."""
        for start in range(0, len(view), _ROWS_CHUNK):
            chunk = self.read(min(_ROWS_CHUNK, len(view) - start))
            if len(chunk) < min(_ROWS_CHUNK, len(view) - start):
                raise RobauditError(f"{self.where} is shorter than its .npy header says: the file is damaged; "
                                    "save it again with np.savez")
            view[start:start + len(chunk)] = chunk

    def close(self) -> None:
        """After the whole member: nothing more to inflate, and its CRC-32 is the declared one."""
        if self.inflate is not None:
            try:
                extra = self.inflate.decompress(self._input(_INFLATE_CHUNK), 1)
            except zlib.error:
                extra = b""
            if extra:
                raise RobauditError(f"{self.where} holds more than the {self.member.size} bytes it declares: "
                                    "the file is damaged or built to exhaust memory; save it again with np.savez")
        if self.done == self.member.size and self.crc != self.member.crc:
            raise RobauditError(f"{self.where} fails its CRC check: the file is damaged; save it again with np.savez")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GB"


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """A member's name as the archive stores it (zipfile decodes UTF-8 names when flag 0x800 says so, cp437
    otherwise, and keeps what follows a NUL in ``orig_filename``)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "surrogateescape")


def _npz_entries(fh: BinaryIO, path: Path, fix: str) -> dict[str, _Member]:
    """The archive's members by numpy's key (``x`` for ``x.npy``), each checked against its local header, inside
    the file and apart from the others; names numpy and zipfile would read differently are refused."""
    try:
        with zipfile.ZipFile(fh) as zf:
            infos, start_dir = zf.infolist(), zf.start_dir
    except _ZIP_ERRORS as exc:
        raise RobauditError(f"cannot read {path} as an .npz file ({type(exc).__name__}: {exc}): {fix}") from None
    members, spans = {}, []
    size = os.fstat(fh.fileno()).st_size
    for info in infos:
        name = info.orig_filename
        if info.header_offset < 0:
            raise RobauditError(f"cannot read {path} as an .npz file (member {name!r} starts before the archive: "
                                f"truncated or damaged): {fix}")
        bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise RobauditError(f"{path} has a member whose name {name!r} holds the control character {bad!r}: "
                                f"zipfile and numpy read such names differently; {fix}")
        key = name[:-4] if name.endswith(".npy") else name
        if key in members:
            raise RobauditError(f"{path} holds {key!r} twice ({members[key].name!r} and {name!r}): which one numpy "
                                f"reads depends on the reader; {fix}")
        where = f"member {name!r} of {path}"
        if info.flag_bits & 0x1:
            raise RobauditError(f"{where} is encrypted: {fix}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise RobauditError(f"{where} uses zip compression method {info.compress_type}, not stored or deflated "
                                f"as numpy writes: {fix}")
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise RobauditError(f"{where} has no local header where the zip directory says: the file is damaged; {fix}")
        flags, method, crc, packed, unpacked, name_len, extra_len = struct.unpack("<6xHH4xLLLHH", local)
        if method != info.compress_type or fh.read(name_len) != _raw_name(info):
            raise RobauditError(f"{where}: its local header names another member or method than the zip directory: "
                                f"the file is damaged or crafted; {fix}")
        if not flags & 0x8 and (crc, packed, unpacked) != (info.CRC, info.compress_size, info.file_size) and \
                0xFFFFFFFF not in (packed, unpacked):
            raise RobauditError(f"{where}: its local header declares other sizes than the zip directory: the file "
                                f"is damaged or crafted; {fix}")
        offset = info.header_offset + 30 + name_len + extra_len
        end = offset + info.compress_size
        if end > min(start_dir, size) or (info.compress_type == zipfile.ZIP_STORED
                                          and info.compress_size != info.file_size):
            raise RobauditError(f"{where} declares {info.compress_size} bytes that do not fit in the file: it is "
                                f"truncated or damaged; {fix}")
        spans.append((info.header_offset, end, name))
        members[key] = _Member(name, info.compress_type, offset, info.compress_size, info.file_size, info.CRC)
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise RobauditError(f"{path}: members {first!r} and {second!r} share bytes (a zip built to inflate more "
                                f"than it holds): {fix}")
    return members


def _npy_member(fh: BinaryIO, member: _Member, path: Path, fix: str) -> _Member:
    """``member`` with its .npy header read (a few kB inflated) and checked: no pickles, and its shape and dtype
    need exactly the bytes the zip declares, at most NPZ_MEMBER_MAX; a deflated member inflating more than
    NPZ_RATIO_MAX times is refused before anything else is inflated."""
    where = f"member {member.name!r} of {path}"
    if member.size > NPZ_MEMBER_MAX:
        raise RobauditError(f"{where} declares {_gib(member.size)} uncompressed, more than the {_gib(NPZ_MEMBER_MAX)} "
                            "robaudit reads from one array: split the data set into several files")
    if member.method == zipfile.ZIP_DEFLATED and member.size > NPZ_RATIO_FLOOR and \
            member.size > NPZ_RATIO_MAX * max(member.packed, 1):
        raise RobauditError(f"{where} inflates {member.size // max(member.packed, 1)} times ({member.packed} bytes to "
                            f"{_gib(member.size)}), a decompression bomb rather than data: save the real data with "
                            "np.savez (uncompressed, memory-mapped)")
    stream = _MemberStream(fh, member, where)
    fmt = np.lib.format
    readers = {(1, 0): (fmt.read_array_header_1_0, 2), (2, 0): (fmt.read_array_header_2_0, 4)}
    try:
        version = fmt.read_magic(io.BytesIO(stream.read(fmt.MAGIC_LEN)))
        reader, length_bytes = readers.get(version, (None, 0))
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        length = stream.read(length_bytes)
        header_len = int.from_bytes(length, "little")
        if header_len > _NPY_HEADER_MAX:
            raise ValueError(f"a header of {header_len} bytes")
        shape, fortran, dtype = reader(io.BytesIO(length + stream.read(header_len)), max_header_size=_NPY_HEADER_MAX)
    except _NPY_HEADER_ERRORS as exc:
        raise RobauditError(f"cannot read {where} as an .npy array ({str(exc).splitlines()[0][:120]}): {fix}") from None
    if dtype.hasobject:
        raise RobauditError(f"cannot read {where}: it holds Python objects, which only a pickle can load (refused, "
                            f"nothing was run); {fix}")
    if any(d < 0 for d in shape):
        raise RobauditError(f"{where} has the impossible shape {shape}: {fix}")
    header = stream.done
    need = header + math.prod(shape) * dtype.itemsize
    if need != member.size:
        raise RobauditError(f"{where}: its .npy header (shape {shape}, {dtype}) needs {need} bytes but the zip "
                            f"declares {member.size}: the file is damaged or crafted; {fix}")
    return dataclasses.replace(member, header=header, shape=tuple(shape), fortran=bool(fortran), dtype=dtype)


def _memory_available() -> int | None:
    """Bytes this process may still allocate, as far as Linux says (MemAvailable, and RLIMIT_AS); None elsewhere."""
    known = []
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    known.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            known.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(known) if known else None


def _inflate_rows(fh: BinaryIO, member: _Member, index: np.ndarray | None, path: Path) -> np.ndarray:
    """The rows ``index`` of a member (all when None), in that order: inflated as a stream, only up to the last
    row needed, and only those rows kept (a Fortran-ordered array, whose rows are not contiguous, whole)."""
    where = f"member {member.name!r} of {path}"
    n = member.shape[0] if member.shape else 1
    whole = index is None or member.fortran or len(member.shape) < 1
    keep = member.size - member.header if whole else len(index) * member.row_bytes
    room = _memory_available()
    if room is not None and keep > room:
        raise RobauditError(f"{where} needs {_gib(keep)} of memory once inflated but {_gib(room)} are available: "
                            "use --samples N, or save it with np.savez (uncompressed) so it is memory-mapped")
    stream = _MemberStream(fh, member, where)
    stream.read(member.header)
    order = "F" if member.fortran else "C"
    if whole:
        flat = np.empty(member.size - member.header, dtype=np.uint8)
        stream.readinto(memoryview(flat))
        stream.close()
        arr = flat.view(member.dtype).reshape(member.shape, order=order)
        return arr if index is None else arr[index]
    out = np.empty((len(index), member.row_bytes), dtype=np.uint8)
    if len(index) and member.row_bytes:
        order_of = np.argsort(index, kind="stable")
        wanted = index[order_of]
        last = int(wanted[-1]) + 1
        per = max(1, _ROWS_CHUNK // member.row_bytes)
        for first in range(0, last, per):
            rows = min(per, last - first)
            block = np.frombuffer(stream.read(rows * member.row_bytes), dtype=np.uint8).reshape(rows, -1)
            lo, hi = np.searchsorted(wanted, [first, first + rows])
            out[order_of[lo:hi]] = block[wanted[lo:hi] - first]
        if last == n:
            stream.close()
    return out.view(member.dtype).reshape(len(index), *member.shape[1:])


def _npz_arrays(path: Path, fix: str) -> tuple[dict[str, _Member], Callable]:
    """The x and y members of an .npz, their headers checked, and ``read(member, index)``: a read-only memory
    map of a stored member (``index`` ignored), or the rows ``index`` of a deflated one (all when None)."""
    with _open_data(path) as fh:
        entries = _npz_entries(fh, path, fix)
        if "x" not in entries or "y" not in entries:
            raise RobauditError(f"{path} has arrays {sorted(entries)}, not x and y: {fix}")
        members = {key: _npy_member(fh, entries[key], path, fix) for key in ("x", "y")}

    def read(member: _Member, index: np.ndarray | None = None) -> np.ndarray:
        if member.method == zipfile.ZIP_STORED:
            if math.prod(member.shape) == 0:
                return np.empty(member.shape, member.dtype)
            return np.memmap(path, dtype=member.dtype, mode="r", shape=member.shape,
                             order="F" if member.fortran else "C", offset=member.offset + member.header)
        with _open_data(path) as fh:
            return _inflate_rows(fh, member, index, path)

    return members, read


def _open_data(path: Path) -> BinaryIO:
    """``path`` opened for reading, refused in one line unless it is a regular file (a FIFO never blocks)."""
    from .safeio import open_regular

    fd = open_regular(path, what="data file") if not path.is_symlink() else None
    if fd is None:  # a link the user named: followed, but still a regular file only
        fd = open_regular(Path(os.path.realpath(path)), what="data file")
    return os.fdopen(fd, "rb")


def _read_npz(path: Path, fix: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x and y of an .npz: memory-mapped where stored uncompressed (np.savez); a compressed member
    (np.savez_compressed) cannot be mapped: its rows ``rows`` (all when None) are inflated into memory, in their
    stored dtype."""
    members, read = _npz_arrays(path, fix)
    return read(members["x"], rows), read(members["y"])


def _read_npy_pair(path: Path, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """``x.npy`` and the ``y.npy`` beside it, memory-mapped (``np.load(mmap_mode="r")``, no pickles)."""
    labels = path.with_name("y.npy")
    if not labels.is_file():
        raise RobauditError(f"no labels file {labels} beside {path}: {fix}")
    try:
        return (np.load(path, mmap_mode="r", allow_pickle=False, max_header_size=_NPY_HEADER_MAX),
                np.load(labels, mmap_mode="r", allow_pickle=False, max_header_size=_NPY_HEADER_MAX))
    except (OSError, EOFError, *_NPY_HEADER_ERRORS) as exc:  # damaged headers, object arrays
        raise RobauditError(f"cannot read {path} and {labels} as .npy files without pickles "
                            f"({str(exc).splitlines()[0][:160]}): {fix}") from None


def _blocks(x: np.ndarray, keep: slice | np.ndarray, chunk: int = 4096):
    """The rows ``keep`` of x in blocks (in any order), so that checks over a memory map never hold a full-size
    temporary."""
    if isinstance(keep, slice) and keep.indices(x.shape[0])[2] == 1:
        start, stop, _ = keep.indices(x.shape[0])
        for first in range(start, stop, chunk):
            yield x[first:min(first + chunk, stop)]
        return
    index = np.arange(x.shape[0])[keep]
    for first in range(0, len(index), chunk):
        yield x[np.sort(index[first:first + chunk])]


def _load_npz(path: Path, select: Callable[[int], slice | np.ndarray]):
    """Read and validate a user .npz (or x.npy + y.npy) file: x float in [0,1] (N×D or N×C×H×W), y integers ≥ 0 of
    shape N. Returns ``(x, y, keep, classes)``: the samples used are ``x[keep]``, ``y[keep]``, ``keep`` chosen by
    ``select(N)``.

    Arrays stay memory-mapped where the format allows; a deflated x is inflated as a stream and only the rows
    kept are held (then ``keep`` selects all). Only the rows used are checked for values outside [0, 1].
    """
    fix = "save it with np.savez(path, x=float32 array in [0,1] of shape N×D or N×C×H×W, y=int array of shape N)"
    if path.suffix.lower() == ".npy":
        fix = "save x.npy (float32 in [0,1], N×D or N×C×H×W) and y.npy (int, N) side by side with np.save"
        x, y = _read_npy_pair(path, fix)
        shapes = x.dtype, x.shape, y.dtype, y.shape
        members = read = None
    else:  # the headers are checked before anything is mapped or inflated
        members, read = _npz_arrays(path, fix)
        shapes = members["x"].dtype, members["x"].shape, members["y"].dtype, members["y"].shape
    x_dtype, x_shape, y_dtype, y_shape = shapes
    if not np.issubdtype(x_dtype, np.floating):
        raise RobauditError(f"{path}: x has dtype {x_dtype}, not float (uint8 images: divide by 255): {fix}")
    if len(x_shape) not in (2, 4) or x_shape[0] == 0:
        raise RobauditError(f"{path}: x has shape {x_shape}, expected N×D or N×C×H×W with N > 0: {fix}")
    if not (np.issubdtype(y_dtype, np.integer) and len(y_shape) == 1 and y_shape[0] == x_shape[0]):
        raise RobauditError(f"{path}: y has dtype {y_dtype} and shape {y_shape}, expected integers of shape "
                            f"({x_shape[0]},) to match x: {fix}")
    y = np.asarray(y if members is None else read(members["y"]))
    if y.min() < 0:
        raise RobauditError(f"{path}: y has negative labels: {fix}")
    classes = limits.label_count(int(y.max()) + 1, str(path))
    keep = select(len(y))
    if members is not None and members["x"].method == zipfile.ZIP_STORED:
        x = read(members["x"])
    elif members is not None:  # deflated: inflate the rows used, nothing else
        index = np.arange(len(y))[keep]
        x, y, keep = read(members["x"], index), y[index], slice(None)
    if not all(np.isfinite(block).all() for block in _blocks(x, keep)):
        raise RobauditError(f"{path}: x contains NaN or infinite values: {fix}")
    lo = min((float(block.min()) for block in _blocks(x, keep) if block.size), default=0.0)
    hi = max((float(block.max()) for block in _blocks(x, keep) if block.size), default=0.0)
    if lo < 0 or hi > 1:
        raise RobauditError(f"{path}: x has values in [{lo:g}, {hi:g}], outside [0, 1]: {fix}")
    return x, y, keep, classes


# ----------------------------------------------------------------------------------------------
# image folders: one subfolder per class, PNG/JPEG decoded with Pillow

IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_DEFAULT_EPS = (2 / 255, 4 / 255, 8 / 255)
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own warning threshold; larger images are refused, not decoded
PIXELS_ENV = "ROBAUDIT_MAX_IMAGE_PIXELS"  # raises (or lowers) it


def max_image_pixels() -> int:
    """The most pixels an image may have: :data:`MAX_IMAGE_PIXELS`, or ``$ROBAUDIT_MAX_IMAGE_PIXELS``."""
    raw = os.environ.get(PIXELS_ENV, "").strip()
    return limits.whole(raw, f"${PIXELS_ENV}", high=1 << 40) if raw else MAX_IMAGE_PIXELS


def _image_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises on a damaged or hostile PNG/JPEG (UnidentifiedImageError is an OSError)."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


@contextlib.contextmanager
def _image(path: str | Path):
    """An image file opened with Pillow (PNG and JPEG only): a regular file, never through a symlink, and no
    larger than :func:`max_image_pixels` (checked from its header, before a pixel is decoded). Pillow's errors,
    here or in the block, are one line naming the file."""
    from PIL import Image, UnidentifiedImageError

    from .safeio import open_regular

    fh = os.fdopen(open_regular(path, what="image"), "rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            img = Image.open(fh, formats=["PNG", "JPEG"])
        with img:
            w, h = img.size
            limit = max_image_pixels()
            if w * h > limit:
                raise RobauditError(f"image {path} has {w}x{h} = {w * h} pixels, more than the {limit} robaudit "
                                    f"decodes (a decompression bomb?): shrink it, or raise the limit with "
                                    f"{PIXELS_ENV}={w * h}")
            yield img
    except Image.DecompressionBombError:  # above twice Pillow's own limit: refused by Pillow as it opened it
        raise RobauditError(f"image {path} has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, more than Pillow "
                            "decodes (a decompression bomb?): shrink it") from None
    except _image_errors() as exc:
        reason = "not a PNG or JPEG file" if isinstance(exc, UnidentifiedImageError) else \
            f"{type(exc).__name__}: {str(exc)[:160]}"
        raise RobauditError(f"cannot decode image {path} ({reason}): replace or remove it (PNG and JPEG "
                            "only)") from None
    finally:
        fh.close()


def _read_class_map(path: Path, folders: list[str]) -> dict[str, int]:
    """A class map: a JSON object ``{"folder": label}`` or a JSON list of folder names in label order (a regular
    file of at most 16 MB, nesting checked before parsing)."""
    from .safeio import read_json

    fix = 'write {"folder name": label, ...} or ["folder of label 0", "folder of label 1", ...]'
    raw = read_json(path, what="class map", fix=fix)
    if isinstance(raw, list) and all(isinstance(n, str) for n in raw):
        if len(set(raw)) != len(raw):
            raise RobauditError(f"class map {path} names a folder twice: {fix}")
        mapping = {n: i for i, n in enumerate(raw)}
    elif isinstance(raw, dict) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                       for v in raw.values()):
        mapping = dict(raw)
    else:
        raise RobauditError(f"class map {path} is neither a list of folder names nor an object of labels >= 0: {fix}")
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise RobauditError(f"class folder {missing[0]!r} is not in class map {path}: add it, or remove the folder")
    labels = {f: mapping[f] for f in folders}
    limits.label_count(max(labels.values(), default=0) + 1, f"class map {path}")
    return labels


def _decode(path: str | Path, mode: str, image_size: int | None):
    """One image as an H×W(×C) uint8 array: resized (shorter side to ``image_size``) and center-cropped."""
    from PIL import Image

    with _image(path) as img:
        img = img.convert(mode)
        if image_size is not None:
            w, h = img.size
            scale = image_size / min(w, h)
            size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR)
            left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
        return np.asarray(img, dtype=np.uint8)


def _scan(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` in sorted order of name (one line when it cannot be listed)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        raise RobauditError(f"cannot list {folder} ({exc.strerror or exc}): check the folder and its "
                            "permissions") from None


def _no_link(entry: os.DirEntry, what: str) -> None:
    """Refuse a symbolic link in an image folder: robaudit reads nothing through one."""
    if entry.is_symlink():
        raise RobauditError(f"{what} {entry.path} is a symbolic link: robaudit follows no link in an image folder; "
                            "put the real folder or file there (e.g. cp -rL) or remove the link")


def class_folders(root: Path) -> list[str]:
    """The class folders of an image folder, in sorted order (the labels unless a class map gives them); a link
    to a folder is refused, never followed."""
    if not root.is_dir():
        raise RobauditError(f"no such folder: {root}: give imagefolder:DIR with one subfolder of images per class")
    folders = []
    for entry in _scan(root):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and entry.is_dir():
            _no_link(entry, "class folder")
        if entry.is_dir(follow_symlinks=False):
            folders.append(entry.name)
    if not folders:
        raise RobauditError(f"{root} has no class subfolders: put each class's images in a folder of its own")
    return folders


def _class_images(folder: Path) -> list[str]:
    """The names of the images in one class folder, sorted: regular files only (a link or a special file with an
    image's name is refused; other files and subfolders are skipped)."""
    names = []
    for entry in _scan(folder):
        if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
            continue
        _no_link(entry, "image")
        if entry.is_dir(follow_symlinks=False):
            continue
        if not entry.is_file(follow_symlinks=False):
            raise RobauditError(f"{entry.path} is not a regular file (a FIFO, socket or device): remove it from the "
                                "image folder")
        names.append(entry.name)
    return names


def _list_imagefolder(root: Path, *, image_size: int | None, class_map: Path | None):
    """An image folder's files and labels: ``root/<class>/<image>.png|.jpg``, classes in sorted order unless
    a class map says otherwise. Returns ``(files, mode, num_classes, source)``, files a :class:`FileList`;
    every image is RGB unless all are grayscale."""
    image_size = limits.image_size(image_size)
    folders = class_folders(root)
    labels_of = _read_class_map(class_map, folders) if class_map is not None else {f: i for i, f in enumerate(folders)}
    files = FileList.of(root, [(f"{f}/{name}", labels_of[f]) for f in folders for name in _class_images(root / f)])
    if not len(files):
        raise RobauditError(f"no .png/.jpg/.jpeg images in the class folders of {root}")
    gray = True
    for path, _ in files:  # headers only: are all images grayscale? (and none too large)
        with _image(path) as img:
            gray &= img.mode in ("1", "L", "I", "I;16")
    mode = "L" if gray else "RGB"
    return files, mode, max(labels_of.values()) + 1, str(root.resolve())


@dataclass
class FileList:
    """An image folder's files and labels in two arrays (names relative to ``root`` as bytes, labels as int64),
    not a list of Python strings: a tenth of the memory, and DataLoader workers forked from the process read
    them without copying the pages (a Python object's reference count is written on every read)."""

    root: str
    names: np.ndarray  # dtype S: os.fsencode of "<class>/<file>"
    labels: np.ndarray

    @classmethod
    def of(cls, root: Path, entries: list[tuple[str, int]]) -> "FileList":
        return cls(str(root), np.array([os.fsencode(n) for n, _ in entries], dtype=bytes),
                   np.array([label for _, label in entries], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return os.path.join(self.root, os.fsdecode(self.names[i])), int(self.labels[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, keep: slice | np.ndarray) -> "FileList":
        """The files at ``keep`` (a slice or positions), in that order."""
        return FileList(self.root, self.names[keep], self.labels[keep])


def _chw(arr: np.ndarray) -> np.ndarray:
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded one at a time: ``(uint8 C×H×W tensor, label)``, for a ``DataLoader``."""

    def __init__(self, files: FileList, *, mode: str, image_size: int | None,
                 shape: tuple[int, ...]) -> None:
        self.files, self.mode, self.image_size, self.shape = files, mode, image_size, tuple(shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        arr = _chw(_decode(path, self.mode, self.image_size))
        if arr.shape != self.shape:
            raise RobauditError(f"{path} is {arr.shape[2]}x{arr.shape[1]} pixels but the first image is "
                                f"{self.shape[2]}x{self.shape[1]}: pass --image-size N to resize and crop them all")
        return torch.from_numpy(np.array(arr, order="C")), label  # a writable copy of the decoded pixels


class ArrayRows(torch.utils.data.Dataset):
    """Rows of an array (memory-mapped or held in memory): ``(sample, label)`` one at a time, or a whole batch in
    one read (``__getitems__``). uint8 rows stay uint8 (the batch is divided by its set's ``scale`` once it is
    on the device); others become float32."""

    def __init__(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        self.x, self.y, self.index = x, y, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = int(self.index[i])
        return torch.from_numpy(np.array(self.x[j], dtype=self.dtype, order="C")), int(self.y[j])

    @property
    def dtype(self):
        return np.uint8 if self.x.dtype == np.uint8 else np.float32

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one read, already collated (``batches`` passes it through): one allocation per
        batch instead of one per sample, so that a long stream does not fragment the heap."""
        rows = self.index[np.asarray(positions, dtype=np.int64)]
        x = np.array(self.x[rows], dtype=self.dtype, order="C")  # a memory map reads just these rows
        return torch.from_numpy(x), torch.from_numpy(np.array(self.y[rows], dtype=np.int64))


class FileRows:
    """uint8 rows stored raw in files, as one read-only array of shape ``(rows, *row_shape)`` for
    :class:`ArrayRows`: ``parts`` lists ``(path, offset of its first row, rows)``. Indexing reads only the rows
    asked for with positioned reads (``os.preadv``; a run of consecutive rows in one read), so no pixels are held
    between batches, as a memory map's touched pages would be. Each process opens the files on its first read;
    open descriptors are never pickled to DataLoader workers."""

    dtype = np.dtype(np.uint8)

    def __init__(self, parts: list[tuple[str | Path, int, int]], row_shape: tuple[int, ...]) -> None:
        self.parts = [(str(path), int(offset), int(rows)) for path, offset, rows in parts]
        self.row_shape, self.row_bytes = tuple(row_shape), math.prod(row_shape)
        self.starts = np.cumsum([0] + [rows for *_, rows in self.parts])
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def __getitem__(self, rows):
        """Row ``rows`` (an int), or the rows of a 1-D integer array in its order, read from the files."""
        if np.ndim(rows) == 0:
            return self[np.array([int(rows)])][0]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1} of {len(self)}")
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        for start, stop, part, first in self._runs(rows):
            self._read_into(part, self.parts[part][1] + first * self.row_bytes, memoryview(out[start:stop]).cast("B"))
        return out.reshape(len(rows), *self.row_shape)

    def _runs(self, rows: np.ndarray):
        """``(start, stop, part, first)`` per run of consecutive rows of one file, in the order asked: positions
        ``start:stop`` are rows ``first, first + 1, ...`` of file ``part``."""
        if not len(rows):
            return
        part = np.searchsorted(self.starts, rows, side="right") - 1  # the last file starting at or before the row
        cuts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(part) != 0)) + 1
        bounds = [0, *cuts.tolist(), len(rows)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            yield start, stop, int(part[start]), int(rows[start] - self.starts[part[start]])

    def _read_into(self, part: int, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset`` of file ``part``: one positioned read straight into the batch
        (``os.preadv``; ``os.pread`` and a copy where the system lacks it), more only if the system gives less. No
        batch-sized temporary: in a long stream, such short-lived blocks fragment the heap."""
        path, fd, done = self.parts[part][0], self._fd(part), 0
        while done < len(view):
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(fd, [view[done:]], offset + done)
                else:
                    chunk = os.pread(fd, len(view) - done, offset + done)
                    got = len(chunk)
                    view[done:done + got] = chunk
            except OSError as exc:
                raise RobauditError(f"cannot read {path} ({exc}): check the file and load the data set again") from None
            if not got:
                raise RobauditError(f"{path} ends before byte {offset + len(view)}: it was truncated or replaced after "
                                    "the data set was loaded; load it again")
            done += got

    def _fd(self, part: int) -> int:
        """This process's descriptor of file ``part``, opened on first use; a forked worker closes its copies of
        the parent's and opens its own."""
        if self._pid != os.getpid():
            for fd in self._fds.values():
                os.close(fd)
            self._fds, self._pid = {}, os.getpid()
        if part not in self._fds:
            path = self.parts[part][0]
            try:
                self._fds[part] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as exc:
                raise RobauditError(f"cannot open {path} ({exc}): it was moved or deleted after the data set was "
                                    "loaded; put it back or load the data set again") from None
        return self._fds[part]

    def __getstate__(self) -> dict:
        """The files and their layout, without this process's descriptors (a worker opens its own)."""
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


@dataclass
class StreamingDataset:
    """A split read batch by batch: ``items`` yields ``(sample, label)``, the sample uint8 (or float32 when the
    file holds floats); labels are known up front.

    Divide by ``scale`` on the device to get inputs in [0, 1]. :meth:`head` materializes the first samples.
    """

    name: str
    split: str
    items: torch.utils.data.Dataset
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    default_eps: tuple[float, ...]
    source: str
    input_shape: tuple[int, ...]
    scale: float = 255.0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples as float32 in [0, 1] and their labels."""
        n = min(int(n), len(self))
        x = torch.stack([self.items[i][0] for i in range(n)]).float()
        x = x / self.scale if self.scale != 1.0 else x
        return x, self.y[:n]


def rows(data: Dataset | StreamingDataset, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Samples ``index`` (positions, a 1-D int64 tensor) as a float32 batch in [0, 1] on ``device``: a gather
    of an in-memory set, or one read of a streaming one divided by its scale on the device, with the same
    values as the in-memory floats."""
    if not isinstance(data, StreamingDataset):
        return data.x[index.to(data.x.device)].to(device, non_blocking=True)
    positions = index.tolist()
    items = data.items
    got = items.__getitems__(positions) if hasattr(items, "__getitems__") else [items[i] for i in positions]
    return _in_unit_range(_stacked(got)[0], data.scale, device)


def _in_unit_range(xb: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """A batch as stored (uint8, or float) as float32 in [0, 1] on ``device``: divided by ``scale`` there, with
    the values of the in-memory floats; a float batch may be a view of the stored rows, so it is never written."""
    x = xb.to(device, non_blocking=True)
    if not x.is_floating_point():  # a fresh float copy: divided in place
        return x.float().div_(scale) if scale != 1.0 else x.float()
    return x / scale if scale != 1.0 else x


def subset(data: Dataset | StreamingDataset, index: torch.Tensor, split: str) -> Dataset | StreamingDataset:
    """The samples ``index`` of ``data`` as a set of their own named ``split`` (a streaming set stays one)."""
    if isinstance(data, StreamingDataset):
        return dataclasses.replace(data, items=torch.utils.data.Subset(data.items, index.tolist()),
                                   y=data.y[index], split=split)
    return dataclasses.replace(data, x=data.x[index], y=data.y[index], split=split)


def as_dataset(data, what: str = "input") -> Dataset | StreamingDataset:
    """``data`` as a :class:`Dataset` (or the :class:`StreamingDataset` it is): the one entry point of the
    analysis and training APIs, which also accept anything with ``x``/``y`` or an ``(x, y)`` pair of tensors."""
    if not isinstance(data, (Dataset, StreamingDataset)):
        if isinstance(data, (tuple, list)) and len(data) == 2:
            x, y, extra = data[0], data[1], None
        elif hasattr(data, "x") and hasattr(data, "y"):
            x, y, extra = data.x, data.y, data
        else:
            raise RobauditError(f"the {what} data must be a robaudit Dataset or an (x, y) pair of tensors")
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise RobauditError(f"the {what} data must hold tensors, not {type(x).__name__} and {type(y).__name__}")
        n_classes = getattr(extra, "num_classes", None) or (int(y.max()) + 1 if len(y) else 0)
        data = Dataset(name=str(getattr(extra, "name", "data")), split=str(getattr(extra, "split", what)), x=x, y=y,
                       num_classes=int(n_classes), mean=getattr(extra, "mean", None), std=getattr(extra, "std", None),
                       default_eps=tuple(getattr(extra, "default_eps", ()) or ()),
                       source=str(getattr(extra, "source", "tensors")))
    if len(data.y) == 0 or (isinstance(data, Dataset) and len(data.x) == 0):
        raise RobauditError(f"the {what} data set is empty: check --samples and the data files")
    return data


def batches(data: Dataset | StreamingDataset, *, batch_size: int, device: torch.device, workers: int = 0,
            part: tuple[int, int] = (0, 1)):
    """``(start, x, y)`` on ``device`` per batch, in order: slices of an in-memory set, or a DataLoader's uint8
    batches of a streaming one, divided by its scale on the device (the same float32 values as on the host).

    ``part=(rank, world)`` yields only the global batches ``b`` with ``b % world == rank`` (one process's share
    under torchrun); a streaming set then decodes only those.
    """
    rank, world = part
    n = len(data.y)
    starts = list(range(0, n, batch_size))[rank::world]
    if not isinstance(data, StreamingDataset):
        for start in starts:
            yield (start, data.x[start:start + batch_size].to(device, non_blocking=True),
                   data.y[start:start + batch_size].to(device, non_blocking=True))
        return
    index = [range(s, min(s + batch_size, n)) for s in starts]
    for start, xb in zip(starts, read_batches(data, index, device=device, workers=workers)):
        yield start, xb, data.y[start:start + batch_size].to(device, non_blocking=True)


def read_batches(data: Dataset | StreamingDataset, index: Sequence[Sequence[int]], *, device: torch.device,
                 workers: int = 0):
    """The samples at each list of positions in ``index``, in order, as float32 batches in [0, 1] on ``device``:
    gathers of an in-memory set, or a streaming set's batches read by a DataLoader (``workers`` processes decode
    ahead, pinned for a GPU; uint8 until the device) with the values :func:`rows` gives."""
    if not isinstance(data, StreamingDataset):
        for positions in index:
            yield rows(data, torch.as_tensor(positions, dtype=torch.int64), device)
        return
    if not index:
        return
    loader = torch.utils.data.DataLoader(data.items, batch_sampler=[list(p) for p in index], num_workers=workers,
                                         pin_memory=device.type == "cuda", collate_fn=_stacked,
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    for xb, _ in loader:
        yield _in_unit_range(xb, data.scale, device)


def _stacked(got) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as ``(x, y)``: as a set that reads whole batches gave it (``ArrayRows.__getitems__``), or its
    samples stacked."""
    return got if isinstance(got, tuple) else torch.utils.data.default_collate(got)


def _load_imagefolder(root: Path, *, image_size: int | None, class_map: Path | None):
    """An image folder decoded whole: ``(uint8 N×C×H×W, labels, classes, source)``."""
    files, mode, num_classes, source = _list_imagefolder(root, image_size=image_size, class_map=class_map)
    first = _decode(files[0][0], mode, image_size)
    x = np.empty((len(files), *first.shape), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        arr = first if i == 0 else _decode(path, mode, image_size)
        if arr.shape != first.shape:
            raise RobauditError(f"{path} is {arr.shape[1]}x{arr.shape[0]} pixels but {files[0][0]} is "
                                f"{first.shape[1]}x{first.shape[0]}: pass --image-size N to resize and crop them all")
        x[i] = arr
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return x, files.labels.copy(), num_classes, source


def _select(n: int, samples: int | None, shuffle: bool, seed: int, what: str) -> np.ndarray | slice:
    """Indices of the samples to keep: a seeded permutation when shuffling, then the first ``samples``."""
    if samples is not None and samples > n:
        warnings.warn(f"asked for {samples} samples but {what} has only {n}: using all {n}", stacklevel=3)
        samples = None
    if not shuffle:
        return slice(0, samples)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[:samples] if samples is not None else perm


def _read_known(key: str, split: str, *, data_dir: str | os.PathLike | None, download: bool, stream: bool):
    """One split of a registered data set as ``(x, y, scale, source)``, its labels checked; streamed, a CIFAR
    split's ``x`` is a :class:`FileRows` left in the batch files."""
    spec = _SPECS[key]
    folder = None
    if spec.needs_files:
        folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    x, y, scale, source = (spec.stream if stream and spec.stream else spec.load)(key, split, folder, download)
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise RobauditError(f"{spec.title} labels in {source} lie outside 0..{spec.num_classes - 1}: "
                            "the files are damaged or of another data set; replace them")
    return x, y, scale, source


def load_dataset(name: str, *, split: str = "test", samples: int | None = None, shuffle: bool = False,
                 seed: int = 0, data_dir: str | os.PathLike | None = None, download: bool = True,
                 image_size: int | None = None, class_map: str | os.PathLike | None = None,
                 stream: bool = False) -> Dataset | StreamingDataset:
    """Load one split of a known data set, an .npz file or an image folder as float32 tensors in [0, 1].

    ``samples`` keeps the first N (in file order, or in a permutation seeded by ``seed`` when
    ``shuffle``); MNIST/CIFAR files come from ``data_dir`` (default :func:`default_data_dir`) and are
    downloaded there, checksum-verified, when missing and ``download`` is true. ``imagefolder:DIR``
    reads DIR/<class>/<image> (PNG/JPEG; the folder is the split): ``image_size`` resizes each
    image's shorter side and center-crops it square, ``class_map`` (JSON) sets the labels.

    With ``stream``, every on-disk format comes back as a :class:`StreamingDataset` read batch by batch, with
    the same samples, order and values: image folders are decoded per batch; uncompressed IDX files, ``.npy``
    files and the members of an uncompressed ``.npz`` are memory-mapped; CIFAR batches stay in their files (the
    labels are read, then each batch's pixels with positioned reads of the pickle's data bytes, nothing held in
    between; a batch whose pickle stores the pixels as text, as protocol 2 written by Python 3 does, is read
    into memory instead); ``.gz`` IDX files are held as the uint8 arrays they store (a quarter of float32),
    never converted whole to float. A compressed ``.npz`` member cannot be memory-mapped: it is decompressed
    once into memory in its stored dtype (its float ``x`` costs what the file's array costs uncompressed, e.g.
    4 bytes a value for float32) and its rows become float32 one batch at a time. The embedded moons and digits
    are small and stay in memory.
    """
    if split not in SPLITS:
        raise RobauditError(f"unknown split {split!r}: use 'test' or 'train'")
    if samples is not None and (isinstance(samples, bool) or int(samples) != samples or samples <= 0):
        raise RobauditError(f"samples must be a positive whole number, not {samples!r}: leave it out to use all")
    key = _canonical(name)
    if (image_size is not None or class_map is not None) and not str(name).startswith(IMAGEFOLDER_PREFIX):
        raise RobauditError("--image-size and --class-map apply to --dataset imagefolder:DIR only")
    keep = None  # which samples: chosen below, or by the .npz reader (which inflates only those)
    if str(name).startswith(IMAGEFOLDER_PREFIX) and stream:
        root = Path(str(name)[len(IMAGEFOLDER_PREFIX):]).expanduser()
        files, mode, num_classes, source = _list_imagefolder(
            root, image_size=image_size, class_map=Path(class_map).expanduser() if class_map is not None else None)
        keep = _select(len(files), None if samples is None else int(samples), shuffle, seed,
                       f"imagefolder {root.name}")
        files = files.select(keep)
        shape = _chw(_decode(files[0][0], mode, image_size)).shape
        return StreamingDataset(
            name=f"imagefolder-{root.resolve().name}", split=split,
            items=ImageFiles(files, mode=mode, image_size=image_size, shape=shape),
            y=torch.from_numpy(files.labels.copy()), num_classes=num_classes, mean=None,
            std=None, default_eps=IMAGE_DEFAULT_EPS, source=source, input_shape=tuple(shape))
    if str(name).startswith(IMAGEFOLDER_PREFIX):
        root = Path(str(name)[len(IMAGEFOLDER_PREFIX):]).expanduser()
        x, y, num_classes, source = _load_imagefolder(
            root, image_size=image_size, class_map=Path(class_map).expanduser() if class_map is not None else None)
        scale, title, mean, std, eps = 255.0, f"imagefolder-{root.resolve().name}", None, None, IMAGE_DEFAULT_EPS
    elif key is not None:
        spec = _SPECS[key]
        x, y, scale, source = _read_known(key, split, data_dir=data_dir, download=download, stream=stream)
        num_classes, mean, std, eps, title = spec.num_classes, spec.mean, spec.std, spec.default_eps, key
    else:
        path = Path(os.fspath(name)).expanduser()
        if not path.is_file():
            if path.suffix.lower() in (".npz", ".npy"):
                raise RobauditError(f"no such file: {path}: check the path to the {path.suffix.lower()} file")
            raise _unknown(name)
        title = path.stem
        x, y, keep, num_classes = _load_npz(
            path, lambda n: _select(n, None if samples is None else int(samples), shuffle, seed, f"{title} {split}"))
        scale, source, mean, std, eps = 1.0, str(path.resolve()), None, None, NPZ_DEFAULT_EPS
    if keep is None:
        keep = _select(len(y), None if samples is None else int(samples), shuffle, seed, f"{title} {split}")
    if stream and (key is None or _SPECS[key].needs_files):  # on disk: a user file, IDX or CIFAR
        index = np.arange(len(y))[keep]
        if type(x) is np.ndarray and len(index) < len(y):  # held in memory (no map, no FileRows): keep the samples used
            x, y, index = x[index], y[index], np.arange(len(index))
        return StreamingDataset(
            name=title, split=split, items=ArrayRows(x, y, index), y=torch.from_numpy(np.array(y[index], np.int64)),
            num_classes=num_classes, mean=mean, std=std, default_eps=tuple(float(e) for e in eps), source=source,
            input_shape=tuple(x.shape[1:]), scale=scale)
    xs = torch.from_numpy(np.array(x[keep], dtype=np.float32, order="C"))  # a copy: x may be a read-only memory map
    if scale != 1.0:
        xs = xs / scale
    ys = torch.from_numpy(np.array(y[keep], dtype=np.int64, order="C"))
    return Dataset(name=title, split=split, x=xs, y=ys, num_classes=num_classes, mean=mean, std=std,
                   default_eps=tuple(float(e) for e in eps), source=source)
