"""User arrays: an ``.npz`` with x and y, or ``x.npy`` beside ``y.npy``, checked before they are trusted.

Nothing in an .npz is taken on its word: the zip's central directory, each member's local header and its .npy
header must agree before a byte is inflated, every inflation is capped at the size they agree on (a decompression
bomb is refused from its headers), and only the rows used are kept. Stored members are memory-mapped.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from .. import limits
from ..errors import RobauditError
from ..safeio import open_regular
from .imagefolder import IMAGE_DEFAULT_EPS

NPZ_DEFAULT_EPS = (0.05, 0.1, 0.2)
IMAGE_SIDE_MIN = 16  # N×C×H×W arrays with H and W at least this get the image sweep
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


def npz_default_eps(shape: tuple[int, ...]) -> tuple[float, ...]:
    """The eps sweep of an array of ``shape``: N×C×H×W images with H, W >= :data:`IMAGE_SIDE_MIN` get the image
    sweep (2/255, 4/255, 8/255, as image folders do), whose budgets keep a picture's content; vectors and small
    images keep :data:`NPZ_DEFAULT_EPS`."""
    if len(shape) == 4 and min(shape[2:]) >= IMAGE_SIDE_MIN:
        return IMAGE_DEFAULT_EPS
    return NPZ_DEFAULT_EPS


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
    fd = open_regular(path, what="data file") if not path.is_symlink() else None
    if fd is None:  # a link the user named: followed, but still a regular file only
        fd = open_regular(Path(os.path.realpath(path)), what="data file")
    return os.fdopen(fd, "rb")


def read_npz(path: Path, fix: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
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


def load_npz(path: Path, select: Callable[[int], slice | np.ndarray]):
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
