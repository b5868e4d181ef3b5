"""MNIST and Fashion-MNIST: their IDX files (plain or .gz) found in the data directory, downloaded when missing
and allowed, and parsed with every header field checked against the file's size before a byte of data is read.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import RobauditError
from .download import download_file

if TYPE_CHECKING:
    from . import DataSpec

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_SOURCES = {  # name -> (sub-folders torchvision and others use, mirrors, md5 of each .gz file)
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


def load_idx(spec: DataSpec, split: str, data_dir: Path, download: bool):
    """MNIST-style data set from IDX files in data_dir, data_dir/<name>/ or data_dir/<name>/raw/."""
    subdirs, mirrors, md5s = IDX_SOURCES[spec.key]
    title = spec.title
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
            download_file(title, [m + found.name for m in mirrors], found, md5s[base], "the IDX files")
        paths.append(found)
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[0] != labels.shape[0]:
        raise RobauditError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds {labels.shape[0]} "
                            "labels: use matching files of one split")
    return images[:, None], labels, 255.0, str(paths[0].parent)
