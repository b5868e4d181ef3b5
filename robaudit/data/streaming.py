"""Row sources read batch by batch: rows of an array or a memory map (:class:`ArrayRows`), raw rows in files read
with positioned reads (:class:`FileRows`), and the DataLoader that turns them into float32 batches in [0, 1] on
the device, uint8 until they are there.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.utils.data

from ..errors import RobauditError

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


def in_unit_range(xb: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """A batch as stored (uint8, or float) as float32 in [0, 1] on ``device``: divided by ``scale`` there, with
    the values of the in-memory floats; a float batch may be a view of the stored rows, so it is never written."""
    x = xb.to(device, non_blocking=True)
    if not x.is_floating_point():  # a fresh float copy: divided in place
        return x.float().div_(scale) if scale != 1.0 else x.float()
    return x / scale if scale != 1.0 else x


def stacked(got) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as ``(x, y)``: as a set that reads whole batches gave it (``ArrayRows.__getitems__``), or its
    samples stacked."""
    return got if isinstance(got, tuple) else torch.utils.data.default_collate(got)



def loader_batches(items: torch.utils.data.Dataset, index: Sequence[Sequence[int]], *, scale: float,
                   device: torch.device, workers: int = 0):
    """The samples of ``items`` at each list of positions in ``index``, in order, as float32 batches in [0, 1] on
    ``device``, read by a DataLoader (``workers`` processes decode ahead, pinned for a GPU; uint8 until the
    device)."""
    if not index:
        return
    loader = torch.utils.data.DataLoader(items, batch_sampler=[list(p) for p in index], num_workers=workers,
                                         pin_memory=device.type == "cuda", collate_fn=stacked,
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    for xb, _ in loader:
        yield in_unit_range(xb, scale, device)
