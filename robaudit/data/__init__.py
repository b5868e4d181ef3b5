"""Data sets for auditing: embedded (moons, digits), standard on-disk formats (MNIST / Fashion-MNIST IDX,
CIFAR-10/100 python pickle batches, downloaded when allowed), user ``.npz`` / ``.npy`` files and image folders.

Every loader gives pixels in [0, 1] (normalization belongs to the model), labels as int64, in a fixed
order, so the same call always gives the same samples. CIFAR pickles are read with a restricted unpickler
that can build numpy arrays and nothing else, so reading them never runs code from the file. Every on-disk
format can also be streamed (``load_dataset(..., stream=True)``): samples stay in their stored form (uint8
pixels, memory-mapped or read from the file batch by batch where the format allows) until a batch is on the
device.

This module holds the split types, the registry of built-in sets and :func:`load_dataset`; each format lives in
a module of its own (:mod:`.idx`, :mod:`.cifar`, :mod:`.npz`, :mod:`.imagefolder`), what ``--dataset`` names in
:mod:`.source`, downloads in :mod:`.download` and the row sources of streamed sets in :mod:`.streaming`.
"""
from __future__ import annotations

import abc
import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from ..errors import RobauditError
from .cifar import CIFAR_SOURCES, load_cifar, read_cifar_batch, stream_cifar
from .download import DOWNLOAD_TIMEOUT_S, safe_extract
from .idx import IDX_CHUNK, IDX_SOURCES, load_idx, read_idx
from .imagefolder import (IMAGE_DEFAULT_EPS, IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, PIXELS_ENV, FileList, ImageFiles,
                          class_folders, load_imagefolder, max_image_pixels, stream_imagefolder)
from .npz import NPZ_DEFAULT_EPS, NPZ_MEMBER_MAX, npz_default_eps, NPZ_RATIO_FLOOR, NPZ_RATIO_MAX, load_npz, read_npz
from .source import (DATASETS, IMAGEFOLDER_PREFIX, SPLITS, DataKind, DataSource, canonical, is_image_folder_record,
                     unknown_dataset)
from .streaming import ArrayRows, FileRows, in_unit_range, loader_batches, stacked

__all__ = [  # the names robaudit.data has always offered, and the parsed --dataset value
    "DATASETS", "SPLITS", "IMAGEFOLDER_PREFIX", "DataKind", "DataSource", "canonical", "is_image_folder_record",
    "unknown_dataset", "DataSplit", "Dataset", "StreamingDataset", "DataSpec", "load_dataset", "dataset_info",
    "default_data_dir", "as_dataset", "rows", "subset", "batches", "read_batches", "ArrayRows", "FileRows",
    "FileList", "ImageFiles", "class_folders", "max_image_pixels", "read_idx", "read_cifar_batch", "safe_extract",
    "read_npz", "IDX_SOURCES", "CIFAR_SOURCES", "IDX_CHUNK", "DOWNLOAD_TIMEOUT_S", "NPZ_DEFAULT_EPS", "NPZ_MEMBER_MAX",
    "npz_default_eps", "NPZ_RATIO_MAX", "NPZ_RATIO_FLOOR", "IMAGE_SUFFIXES", "IMAGE_DEFAULT_EPS", "MAX_IMAGE_PIXELS", "PIXELS_ENV",
    "MOONS_POOL", "MOONS_TRAIN", "MOONS_NOISE", "MOONS_SEED", "DIGITS_TEST", "DIGITS_SEED",
]

# moons: a fixed pool of make_moons points (noise 0.2, random_state 0, already shuffled by scikit-learn);
# the first 1500 are the train split, the last 500 the test split; both features are min/max scaled into
# [0, 1] with the pool's extremes so train and test share one scaling and clamping to [0, 1] is valid.
MOONS_POOL, MOONS_TRAIN, MOONS_NOISE, MOONS_SEED = 2000, 1500, 0.2, 0
# digits: scikit-learn's 1797 8x8 images; a stratified test split of 360 images (random_state 0),
# each split kept in the order of load_digits.
DIGITS_TEST, DIGITS_SEED = 360, 0


@dataclass(kw_only=True)
class DataSplit(abc.ABC):
    """One split of a data set, held in memory (:class:`Dataset`) or read batch by batch
    (:class:`StreamingDataset`): the fields both carry and the reads both answer, each in its own way."""

    name: str
    split: str
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    default_eps: tuple[float, ...]
    source: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def is_empty(self) -> bool:
        """Whether there is no sample to analyze or train on."""
        return len(self.y) == 0

    @abc.abstractmethod
    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples as float32 in [0, 1] and their labels."""

    @abc.abstractmethod
    def rows(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Samples ``index`` (positions, a 1-D int64 tensor) as a float32 batch in [0, 1] on ``device``."""

    @abc.abstractmethod
    def subset(self, index: torch.Tensor, split: str) -> DataSplit:
        """The samples ``index`` as a set of their own named ``split``, of this set's kind."""

    @abc.abstractmethod
    def on_device(self, device: torch.device) -> DataSplit:
        """The set a training loop reads its batches from on ``device``."""

    @abc.abstractmethod
    def read_batches(self, index: Sequence[Sequence[int]], *, device: torch.device,
                     workers: int = 0) -> Iterator[torch.Tensor]:
        """The samples at each list of positions in ``index``, in order, as float32 batches in [0, 1] on ``device``
        with the values :meth:`rows` gives."""

    @abc.abstractmethod
    def _x_batches(self, starts: list[int], batch_size: int, device: torch.device,
                   workers: int) -> Iterator[torch.Tensor]:
        """The samples of the batches starting at ``starts`` on ``device``, in order."""

    def batches(self, *, batch_size: int, device: torch.device, workers: int = 0, part: tuple[int, int] = (0, 1)):
        """``(start, x, y)`` on ``device`` per batch, in order (float32 x in [0, 1]).

        ``part=(rank, world)`` yields only the global batches ``b`` with ``b % world == rank`` (one process's share
        under torchrun); a streaming set then decodes only those.
        """
        rank, world = part
        starts = list(range(0, len(self.y), batch_size))[rank::world]
        for start, xb in zip(starts, self._x_batches(starts, batch_size, device, workers)):
            yield start, xb, self.y[start:start + batch_size].to(device, non_blocking=True)


@dataclass(kw_only=True)
class Dataset(DataSplit):
    """One split of a data set, in input space [0, 1], ready for a model and its attacks."""

    x: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (C×H×W or D)."""
        return tuple(self.x.shape[1:])

    def is_empty(self) -> bool:
        return len(self.y) == 0 or len(self.x) == 0

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples and their labels (as :meth:`StreamingDataset.head` gives them)."""
        return self.x[:n], self.y[:n]

    def rows(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A gather of the samples ``index``, moved to ``device``."""
        return self.x[index.to(self.x.device)].to(device, non_blocking=True)

    def subset(self, index: torch.Tensor, split: str) -> Dataset:
        return dataclasses.replace(self, x=self.x[index], y=self.y[index], split=split)

    def on_device(self, device: torch.device) -> Dataset:
        """The split with its samples moved to ``device`` whole (labels stay where they are)."""
        return dataclasses.replace(self, x=self.x.to(device))

    def read_batches(self, index: Sequence[Sequence[int]], *, device: torch.device, workers: int = 0):
        """Gathers of the samples at each list of positions in ``index`` (``workers`` is for streamed sets)."""
        for positions in index:
            yield self.rows(torch.as_tensor(positions, dtype=torch.int64), device)

    def _x_batches(self, starts, batch_size, device, workers):
        for start in starts:
            yield self.x[start:start + batch_size].to(device, non_blocking=True)


@dataclass(kw_only=True)
class StreamingDataset(DataSplit):
    """A split read batch by batch: ``items`` yields ``(sample, label)``, the sample uint8 (or float32 when the
    file holds floats); labels are known up front.

    Divide by ``scale`` on the device to get inputs in [0, 1]. :meth:`head` materializes the first samples.
    """

    items: torch.utils.data.Dataset
    input_shape: tuple[int, ...]
    scale: float = 255.0

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples as float32 in [0, 1] and their labels."""
        n = min(int(n), len(self))
        x = torch.stack([self.items[i][0] for i in range(n)]).float()
        x = x / self.scale if self.scale != 1.0 else x
        return x, self.y[:n]

    def rows(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """One read of the samples ``index``, divided by the scale on the device, with the same values as the
        in-memory floats."""
        positions = index.tolist()
        items = self.items
        got = items.__getitems__(positions) if hasattr(items, "__getitems__") else [items[i] for i in positions]
        return in_unit_range(stacked(got)[0], self.scale, device)

    def subset(self, index: torch.Tensor, split: str) -> StreamingDataset:
        return dataclasses.replace(self, items=torch.utils.data.Subset(self.items, index.tolist()),
                                   y=self.y[index], split=split)

    def on_device(self, device: torch.device) -> StreamingDataset:
        """The split itself: its batches are read and moved one at a time."""
        return self

    def read_batches(self, index: Sequence[Sequence[int]], *, device: torch.device, workers: int = 0):
        """Batches read by a DataLoader (``workers`` processes decode ahead, pinned for a GPU; uint8 until the
        device)."""
        return loader_batches(self.items, index, scale=self.scale, device=device, workers=workers)

    def _x_batches(self, starts, batch_size, device, workers):
        n = len(self.y)
        return self.read_batches([range(s, min(s + batch_size, n)) for s in starts], device=device, workers=workers)


def rows(data: DataSplit, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Samples ``index`` (positions, a 1-D int64 tensor) as a float32 batch in [0, 1] on ``device``: a gather
    of an in-memory set, or one read of a streaming one divided by its scale on the device, with the same
    values as the in-memory floats."""
    return data.rows(index, device)


def subset(data: DataSplit, index: torch.Tensor, split: str) -> DataSplit:
    """The samples ``index`` of ``data`` as a set of their own named ``split`` (a streaming set stays one)."""
    return data.subset(index, split)


def batches(data: DataSplit, *, batch_size: int, device: torch.device, workers: int = 0,
            part: tuple[int, int] = (0, 1)):
    """``(start, x, y)`` on ``device`` per batch, in order: :meth:`DataSplit.batches`."""
    return data.batches(batch_size=batch_size, device=device, workers=workers, part=part)


def read_batches(data: DataSplit, index: Sequence[Sequence[int]], *, device: torch.device, workers: int = 0):
    """The samples at each list of positions in ``index`` as float32 batches: :meth:`DataSplit.read_batches`."""
    return data.read_batches(index, device=device, workers=workers)


def as_dataset(data, what: str = "input") -> DataSplit:
    """``data`` as a :class:`Dataset` (or the :class:`StreamingDataset` it is): the one entry point of the
    analysis and training APIs, which also accept anything with ``x``/``y`` or an ``(x, y)`` pair of tensors."""
    if not isinstance(data, DataSplit):
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
    if data.is_empty():
        raise RobauditError(f"the {what} data set is empty: check --samples and the data files")
    return data


# ----------------------------------------------------------------------------------------------
# the registry of built-in data sets


@dataclass(frozen=True)
class DataSpec:
    """What is known about a built-in data set before reading it, and the function that reads one split."""

    key: str
    title: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    default_eps: tuple[float, ...]
    # (spec, split, data_dir or None, download) -> (x array, y array, divisor so x/divisor is in [0,1], source)
    load: Callable[[DataSpec, str, Path | None, bool], tuple[np.ndarray, np.ndarray, float, str]]
    needs_files: bool
    # the same for a streamed split, where x may be an array-like that reads rows on demand (FileRows)
    stream: Callable[[DataSpec, str, Path | None, bool], tuple[object, np.ndarray, float, str]] | None = None


def _load_moons(spec: DataSpec, split: str, data_dir: Path | None, download: bool):
    """Two interleaved half-moons, N×2, deterministic pool and split, scaled into [0, 1]."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=MOONS_POOL, noise=MOONS_NOISE, random_state=MOONS_SEED)
    lo, hi = x.min(axis=0), x.max(axis=0)
    x = (x - lo) / (hi - lo)
    part = slice(0, MOONS_TRAIN) if split == "train" else slice(MOONS_TRAIN, MOONS_POOL)
    return x[part].astype(np.float32), y[part], 1.0, "scikit-learn"


def _load_digits(spec: DataSpec, split: str, data_dir: Path | None, download: bool):
    """scikit-learn's 8×8 digit images (values 0..16) as N×1×8×8 with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(d.target)), test_size=DIGITS_TEST, random_state=DIGITS_SEED, stratify=d.target
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    return d.images[idx].reshape(-1, 1, 8, 8).astype(np.float32), d.target[idx], 16.0, "scikit-learn"


_CIFAR_EPS = (2 / 255, 4 / 255, 8 / 255)
_SPECS: dict[str, DataSpec] = {spec.key: spec for spec in (
    DataSpec("moons", "moons", 2, (2,), None, None, (0.05, 0.1, 0.2), _load_moons, False),
    DataSpec("digits", "digits", 10, (1, 8, 8), None, None, (0.05, 0.1, 0.2), _load_digits, False),
    DataSpec("mnist", "MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), (0.1, 0.2, 0.3), load_idx, True),
    DataSpec("fashion-mnist", "Fashion-MNIST", 10, (1, 28, 28), (0.2860,), (0.3530,), (0.1, 0.2, 0.3), load_idx,
             True),
    DataSpec("cifar10", "CIFAR-10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), _CIFAR_EPS,
             load_cifar, True, stream_cifar),
    DataSpec("cifar100", "CIFAR-100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
             _CIFAR_EPS, load_cifar, True, stream_cifar),
)}


def default_data_dir() -> Path:
    """Where MNIST/CIFAR files live when no data_dir is given: $ROBAUDIT_DATA or ~/.cache/robaudit/data."""
    return Path(os.environ.get("ROBAUDIT_DATA") or Path.home() / ".cache" / "robaudit" / "data").expanduser()


def dataset_info(name) -> dict:
    """What a known data set looks like (classes, input shape, normalization, eps sweep) without reading it."""
    key = canonical(name)
    if key is None:
        raise unknown_dataset(name)
    s = _SPECS[key]
    return {"name": key, "title": s.title, "num_classes": s.num_classes, "input_shape": s.input_shape,
            "mean": s.mean, "std": s.std, "default_eps": s.default_eps, "needs_data_dir": s.needs_files}


# ----------------------------------------------------------------------------------------------
# loading one split


@dataclass
class _Read:
    """One split as read, before its samples are chosen: ``x`` an array, a memory map or a :class:`FileRows`
    (``x / scale`` in [0, 1]); ``keep`` the samples already chosen (by the .npz reader), or None."""

    title: str
    x: object
    y: np.ndarray
    scale: float
    source: str
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    eps: tuple[float, ...]
    on_disk: bool  # a user file, IDX or CIFAR: streamed when asked
    keep: slice | np.ndarray | None = None


def _select(n: int, samples: int | None, shuffle: bool, seed: int, what: str) -> np.ndarray | slice:
    """Indices of the samples to keep: a seeded permutation when shuffling, then the first ``samples``."""
    if samples is not None and samples > n:
        warnings.warn(f"asked for {samples} samples but {what} has only {n}: using all {n}", stacklevel=4)
        samples = None
    if not shuffle:
        return slice(0, samples)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[:samples] if samples is not None else perm


def _read_known(spec: DataSpec, split: str, *, data_dir: str | os.PathLike | None, download: bool, stream: bool):
    """One split of a registered data set as ``(x, y, scale, source)``, its labels checked; streamed, a CIFAR
    split's ``x`` is a :class:`FileRows` left in the batch files."""
    folder = None
    if spec.needs_files:
        folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    x, y, scale, source = (spec.stream if stream and spec.stream else spec.load)(spec, split, folder, download)
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise RobauditError(f"{spec.title} labels in {source} lie outside 0..{spec.num_classes - 1}: "
                            "the files are damaged or of another data set; replace them")
    return x, y, scale, source


def _read(source: DataSource, split: str, select: Callable[[int, str], slice | np.ndarray], *,
          data_dir: str | os.PathLike | None, download: bool, stream: bool) -> _Read:
    """The split ``source`` names, read as its format stores it."""
    if source.kind is DataKind.IMAGEFOLDER:
        x, y, num_classes, where = load_imagefolder(source.path, image_size=source.image_size,
                                                    class_map=source.class_map)
        return _Read(source.name, x, y, 255.0, where, num_classes, None, None, IMAGE_DEFAULT_EPS, on_disk=True)
    if source.kind is DataKind.BUILTIN:
        spec = _SPECS[source.key]
        x, y, scale, where = _read_known(spec, split, data_dir=data_dir, download=download, stream=stream)
        return _Read(source.name, x, y, scale, where, spec.num_classes, spec.mean, spec.std, spec.default_eps,
                     on_disk=spec.needs_files)
    path = source.path
    if not path.is_file():
        if path.suffix.lower() in (".npz", ".npy"):
            raise RobauditError(f"no such file: {path}: check the path to the {path.suffix.lower()} file")
        raise unknown_dataset(source.argument)
    x, y, keep, num_classes = load_npz(path, lambda n: select(n, f"{source.name} {split}"))
    return _Read(source.name, x, y, 1.0, str(path.resolve()), num_classes, None, None, npz_default_eps(x.shape),
                 on_disk=True, keep=keep)


def _streamed_folder(source: DataSource, split: str, select: Callable[[int, str], slice | np.ndarray]):
    """An image folder decoded batch by batch, its samples chosen before a pixel is decoded."""
    items, labels, num_classes, where = stream_imagefolder(
        source.path, image_size=source.image_size, class_map=source.class_map,
        select=lambda n: select(n, f"imagefolder {source.path.name}"))
    return StreamingDataset(name=source.name, split=split, items=items, y=torch.from_numpy(labels),
                            num_classes=num_classes, mean=None, std=None, default_eps=IMAGE_DEFAULT_EPS, source=where,
                            input_shape=tuple(items.shape))


def _split_of(read: _Read, split: str, keep: slice | np.ndarray, stream: bool) -> DataSplit:
    """The samples ``keep`` of what was read: streamed from where they are stored, or as float32 in memory."""
    x, y = read.x, read.y
    eps = tuple(float(e) for e in read.eps)
    if stream and read.on_disk:
        index = np.arange(len(y))[keep]
        if type(x) is np.ndarray and len(index) < len(y):  # held in memory (no map, no FileRows): keep the samples used
            x, y, index = x[index], y[index], np.arange(len(index))
        return StreamingDataset(
            name=read.title, split=split, items=ArrayRows(x, y, index), y=torch.from_numpy(np.array(y[index], np.int64)),
            num_classes=read.num_classes, mean=read.mean, std=read.std, default_eps=eps, source=read.source,
            input_shape=tuple(x.shape[1:]), scale=read.scale)
    xs = torch.from_numpy(np.array(x[keep], dtype=np.float32, order="C"))  # a copy: x may be a read-only memory map
    if read.scale != 1.0:
        xs = xs / read.scale
    ys = torch.from_numpy(np.array(y[keep], dtype=np.int64, order="C"))
    return Dataset(name=read.title, split=split, x=xs, y=ys, num_classes=read.num_classes, mean=read.mean,
                   std=read.std, default_eps=eps, source=read.source)


def load_dataset(name: str | os.PathLike | DataSource, *, split: str = "test", samples: int | None = None,
                 shuffle: bool = False, seed: int = 0, data_dir: str | os.PathLike | None = None,
                 download: bool = True, image_size: int | None = None, class_map: str | os.PathLike | None = None,
                 stream: bool = False) -> DataSplit:
    """Load one split of a known data set, an .npz file or an image folder as float32 tensors in [0, 1].

    ``name`` is a ``--dataset`` value or the :class:`DataSource` parsed from one. ``samples`` keeps the first N
    (in file order, or in a permutation seeded by ``seed`` when ``shuffle``); MNIST/CIFAR files come from
    ``data_dir`` (default :func:`default_data_dir`) and are downloaded there, checksum-verified, when missing and
    ``download`` is true. ``imagefolder:DIR`` reads DIR/<class>/<image> (PNG/JPEG; the folder is the split):
    ``image_size`` resizes each image's shorter side and center-crops it square, ``class_map`` (JSON) sets the
    labels.

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
    source = DataSource.of(name, image_size=image_size, class_map=class_map)
    count = None if samples is None else int(samples)

    def select(n: int, what: str) -> slice | np.ndarray:
        return _select(n, count, shuffle, seed, what)

    if source.kind is DataKind.IMAGEFOLDER and stream:
        return _streamed_folder(source, split, select)
    read = _read(source, split, select, data_dir=data_dir, download=download, stream=stream)
    keep = read.keep if read.keep is not None else select(len(read.y), f"{read.title} {split}")
    return _split_of(read, split, keep, stream)
