"""Image folders (``imagefolder:DIR``): one subfolder of PNG/JPEG images per class, decoded with Pillow.

Nothing is read through a symbolic link, only regular files are opened, and an image larger than
:func:`max_image_pixels` is refused from its header before a pixel is decoded.
"""
from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.utils.data

from .. import limits
from ..errors import RobauditError
from ..safeio import open_regular, read_json

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


def list_imagefolder(root: Path, *, image_size: int | None, class_map: Path | None):
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



def load_imagefolder(root: Path, *, image_size: int | None, class_map: Path | None):
    """An image folder decoded whole: ``(uint8 N×C×H×W, labels, classes, source)``."""
    files, mode, num_classes, source = list_imagefolder(root, image_size=image_size, class_map=class_map)
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



def stream_imagefolder(root: Path, *, image_size: int | None, class_map: Path | None,
                       select: Callable[[int], slice | np.ndarray]):
    """An image folder decoded batch by batch: ``(ImageFiles, labels, classes, source)``, its files those that
    ``select(N)`` keeps."""
    files, mode, num_classes, source = list_imagefolder(root, image_size=image_size, class_map=class_map)
    files = files.select(select(len(files)))
    shape = _chw(_decode(files[0][0], mode, image_size)).shape
    return ImageFiles(files, mode=mode, image_size=image_size, shape=shape), files.labels.copy(), num_classes, source
