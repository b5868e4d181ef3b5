"""What ``--dataset`` names, parsed once into a :class:`DataSource`: a built-in data set, a file of arrays or an
image folder, with its options. Loading, the run's default folder and reloading a run's data all read this one
value, so they agree on the data set's name.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import RobauditError

DATASETS: tuple[str, ...] = ("moons", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100")
ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100", "cifar_100": "cifar100",
}
SPLITS = ("test", "train")
IMAGEFOLDER_PREFIX = "imagefolder:"


class DataKind(enum.Enum):
    """What kind of data a ``--dataset`` value names."""

    BUILTIN = "builtin"  # a registered data set: moons, digits, MNIST, Fashion-MNIST, CIFAR-10/100
    ARRAYS = "arrays"  # a user file: an .npz with x and y, or x.npy beside y.npy
    IMAGEFOLDER = "imagefolder"  # imagefolder:DIR, one subfolder of images per class


def canonical(name) -> str | None:
    """The registry key for a data set name (case-insensitive, aliases accepted), or None."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    return key if key in DATASETS else None


def unknown_dataset(name) -> RobauditError:
    """The one-line refusal of a ``--dataset`` value that names nothing robaudit reads."""
    return RobauditError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}, "
                         "a path to an .npz file with arrays x and y, or imagefolder:DIR")


@dataclass(frozen=True)
class DataSource:
    """A parsed ``--dataset`` value: its kind, the registry key of a built-in set or the path of a file or
    folder, and an image folder's options (``image_size``, ``class_map``)."""

    kind: DataKind
    key: str | None = None
    path: Path | None = None
    image_size: int | None = None
    class_map: Path | None = None

    @classmethod
    def parse(cls, name: str | os.PathLike, *, image_size: int | None = None,
              class_map: str | os.PathLike | None = None) -> DataSource:
        """The source ``name`` names: a built-in set (any alias, any case), ``imagefolder:DIR`` or a file path;
        the image options apply to an image folder only."""
        key = canonical(name)
        folder = str(name).startswith(IMAGEFOLDER_PREFIX)
        if (image_size is not None or class_map is not None) and not folder:
            raise RobauditError("--image-size and --class-map apply to --dataset imagefolder:DIR only")
        if folder:
            return cls(DataKind.IMAGEFOLDER, path=Path(str(name)[len(IMAGEFOLDER_PREFIX):]).expanduser(),
                       image_size=image_size, class_map=Path(class_map).expanduser() if class_map is not None else None)
        if key is not None:
            return cls(DataKind.BUILTIN, key=key)
        return cls(DataKind.ARRAYS, path=Path(os.fspath(name)).expanduser())

    @classmethod
    def of(cls, name: str | os.PathLike | DataSource, *, image_size: int | None = None,
           class_map: str | os.PathLike | None = None) -> DataSource:
        """``name`` parsed, or the source it is (given options replace its own, as they would in a parse)."""
        if not isinstance(name, DataSource):
            return cls.parse(name, image_size=image_size, class_map=class_map)
        if image_size is None and class_map is None:
            return name
        return cls.parse(name.argument, image_size=image_size, class_map=class_map)

    @classmethod
    def of_record(cls, record: Mapping) -> DataSource:
        """The source a run analyzed, from its manifest's ``dataset`` record: the built-in set, the image folder
        (with its image size and class map) or the file, by the absolute paths the analysis resolved."""
        name = record.get("name")
        if name in DATASETS:
            argument = str(name)
        else:
            source = str(record.get("source") or name)
            argument = f"{IMAGEFOLDER_PREFIX}{source}" if is_image_folder_record(record) else source
        return cls.parse(argument, image_size=record.get("image_size"), class_map=record.get("class_map"))

    @property
    def name(self) -> str:
        """The data set's name as runs and their folders carry it: the registry key, the file's stem, or
        ``imagefolder-<folder>``."""
        if self.kind is DataKind.BUILTIN:
            return str(self.key)
        if self.kind is DataKind.IMAGEFOLDER:
            return f"imagefolder-{self.path.resolve().name}"
        return self.path.stem

    @property
    def argument(self) -> str:
        """The ``--dataset`` value that names this source again."""
        if self.kind is DataKind.BUILTIN:
            return str(self.key)
        if self.kind is DataKind.IMAGEFOLDER:
            return f"{IMAGEFOLDER_PREFIX}{self.path}"
        return str(self.path)


def is_image_folder_record(record: Mapping) -> bool:
    """Whether a manifest's ``dataset`` record is an image folder's: only those take an image size or a class map,
    and only they are named ``imagefolder-<folder>`` after their source (a file is named by its stem)."""
    source = Path(str(record.get("source") or ""))
    return ("image_size" in record or "class_map" in record
            or record.get("name") == f"imagefolder-{source.name}")
