"""Zip archives written byte by byte, so that a test can make two zip readers disagree.

Python's ``zipfile`` writer cannot put a NUL in a name, declare a size other than the data's, or give
a local header a name the central directory does not have; hostile archives do all of these.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass


@dataclass
class Entry:
    name: bytes
    data: bytes = b""
    method: int = 0  # 0 stored, 8 deflated
    flags: int = 0
    size: int | None = None  # the declared uncompressed size (default: the data's)
    crc: int | None = None
    comp: bytes | None = None  # the bytes stored (default: the data, deflated when method is 8)
    local_name: bytes | None = None  # a different name in the local header


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def build_zip(entries: list[Entry], *, prefix: bytes = b"") -> bytes:
    """The archive's bytes: local headers and data, central directory, end record (no zip64)."""
    out = bytearray(prefix)
    central = bytearray()
    for e in entries:
        comp = e.comp if e.comp is not None else (deflate(e.data) if e.method == 8 else e.data)
        size = len(e.data) if e.size is None else e.size
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        local_name = e.name if e.local_name is None else e.local_name
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, e.flags, e.method, 0, 0x21, crc, len(comp), size,
                           len(local_name), 0) + local_name + comp
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, e.flags, e.method, 0, 0x21, crc,
                               len(comp), size, len(e.name), 0, 0, 0, 0, 0, offset) + e.name
    cd_offset = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), cd_offset, 0)
    return bytes(out)


def read_members(data: bytes) -> list[tuple[bytes, bytes]]:
    """(name, data) of a plain archive written by ``zipfile``, in order (for rebuilding it)."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename.encode(), z.read(info)) for info in z.infolist()]
