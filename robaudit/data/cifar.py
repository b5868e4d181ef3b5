"""CIFAR-10 and CIFAR-100: their python pickle batches, read without running code from the file.

Everything a security reviewer needs is here: the restricted unpickler (it builds numpy arrays and plain
containers and refuses every other global) and the scanner that finds a batch's pixels in its file without
building them (the same globals, as recording stand-ins), plus where the batches are found or downloaded.
"""
from __future__ import annotations

import codecs
import logging
import math
import os
import pickle
import struct
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

import numpy as np

from ..errors import RobauditError
from .download import download_file, safe_extract
from .streaming import FileRows

if TYPE_CHECKING:
    from . import DataSpec

log = logging.getLogger(__name__)

CIFAR_SOURCES = {  # name -> (folder, train files, test files, label key, archive, url, md5 of archive)
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



def _cifar_files(spec: DataSpec, split: str, data_dir: Path, download: bool) -> tuple[list[Path], str]:
    """The batch files of a CIFAR split in data_dir/<folder>/ (or data_dir/<name>/<folder>/), extracting or
    downloading the archive, and the key of their labels."""
    name = spec.key
    folder, train, test, label_key, archive, url, md5 = CIFAR_SOURCES[name]
    title = spec.title
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
            download_file(title, [url], tgz, md5, f"{archive} or its extracted {folder}/")
        log.info("extracting %s", tgz)
        safe_extract(tgz, tgz.parent)
        batch_dir = tgz.parent / folder
        missing = [f for f in files if not (batch_dir / f).is_file()]
        if missing:
            raise RobauditError(f"{tgz} does not contain {folder}/{missing[0]}: use the original {archive}")
    return [batch_dir / f for f in files], label_key


def load_cifar(spec: DataSpec, split: str, data_dir: Path, download: bool):
    """A CIFAR split read into memory as its uint8 pixels."""
    return _held_cifar(*_cifar_files(spec, split, data_dir, download))


def _held_cifar(paths: list[Path], label_key: str):
    """The batches' uint8 pixels read into memory, their labels, the scale and the folder."""
    return (*_read_cifar_batches(paths, label_key), 255.0, str(paths[0].parent))


def stream_cifar(spec: DataSpec, split: str, data_dir: Path, download: bool):
    """A CIFAR split left in its batch files: labels read, the pixels a :class:`FileRows` over the files' data
    bytes, read batch by batch. Batches whose pixels are not stored as raw bytes are read into memory instead."""
    paths, label_key = _cifar_files(spec, split, data_dir, download)
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
