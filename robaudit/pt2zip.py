"""A zip archive's members exactly as torch's reader (miniz, through ``PyTorchFileReader``) resolves them.

Python's ``zipfile`` and miniz disagree on hostile archives: ``zipfile`` keeps the last of two members
with the same name, cuts a name at a NUL byte and shifts every offset by data prepended to the archive;
miniz finds a name by a case-insensitive binary search (either duplicate may win) and matches NUL-cut
names by their full length. :class:`ZipIndex` parses the end records, the central directory and every
local header itself (``struct``), refuses any archive on which two readers could disagree, and reads a
member with a hard cap on what it inflates, so that a lying size cannot make it allocate more.
"""
from __future__ import annotations

import os
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from typing import BinaryIO

EOCD = struct.Struct("<IHHHHIIH")  # end of central directory record
ZIP64_LOCATOR = struct.Struct("<IIQI")
ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
LOCAL = struct.Struct("<IHHHHHIIIHH")
SIG_EOCD, SIG_LOCATOR, SIG_ZIP64 = 0x06054B50, 0x07064B50, 0x06064B50
SIG_CENTRAL, SIG_LOCAL = 0x02014B50, 0x04034B50
STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_STRONG_ENCRYPTION, FLAG_UTF8, FLAG_MASKED = 0x1, 0x8, 0x40, 0x800, 0x2000
MAX_CENTRAL_DIRECTORY = 64 << 20  # about 500,000 entries: far beyond any model
MAX_ENTRIES = 200_000
_CHUNK = 1 << 20


class ZipProblem(Exception):
    """Why an archive is refused: ``member`` (or ``"the archive"``) and ``what``; ``hostile`` when two readers
    could disagree or a size could exhaust memory, otherwise the file is merely damaged."""

    def __init__(self, member: str, what: str, *, hostile: bool = True) -> None:
        super().__init__(f"{member} {what}")
        self.member, self.what, self.hostile = member, what, hostile


@dataclass(frozen=True)
class Member:
    """One central-directory entry, checked against its local header."""

    name: str  # the whole name, root included
    rel: str  # the name below the archive's root folder (what torch asks for)
    method: int
    crc: int
    comp_size: int
    size: int  # uncompressed, as both the central directory and the local header declare it
    data_offset: int


def _damaged(what: str, member: str = "the archive") -> ZipProblem:
    return ZipProblem(member, what, hostile=False)


def _extra_fields(extra: bytes, member: str) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise ZipProblem(member, "has a malformed extra field in its zip header")
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag in fields or pos + 4 + size > len(extra):
            raise ZipProblem(member, "has a malformed or repeated extra field in its zip header")
        fields[tag] = extra[pos + 4:pos + 4 + size]
        pos += 4 + size
    return fields


def _zip64_values(fields: dict[int, bytes], wanted: list[int], member: str) -> list[int]:
    """The 64-bit values (in zip64 order) standing in for the saturated 32-bit fields ``wanted`` marks."""
    values = list(wanted)
    data = fields.get(0x0001, b"")
    pos = 0
    for i, value in enumerate(wanted):
        if value == 0xFFFFFFFF:
            if pos + 8 > len(data):
                raise ZipProblem(member, "has a saturated size or offset without its zip64 field")
            values[i] = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
    return values


def check_name(raw: bytes, *, utf8_flag: bool) -> str:
    """A member name both readers spell the same way: no NUL or control byte, no backslash, no absolute or
    relative path parts (``/x``, ``a//b``, ``.``, ``..``), no folder entry; non-ASCII only when flagged UTF-8."""
    shown = raw[:80].decode("utf-8", "backslashreplace")
    if b"\x00" in raw or any(b < 0x20 or b == 0x7F for b in raw):
        raise ZipProblem(ascii(raw[:80]), "has a NUL or control byte in its name")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ZipProblem(ascii(raw[:80]), "has a name that is not UTF-8") from None
    if not raw.isascii() and not utf8_flag:
        raise ZipProblem(ascii(name[:80]), "has a non-ASCII name not marked as UTF-8 (readers decode it differently)")
    if any(unicodedata.category(c)[0] in "CZ" and c != " " for c in name):
        raise ZipProblem(ascii(name[:80]), "has an invisible or control character in its name")
    if "\\" in name or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise ZipProblem(shown, "is not a plain relative path (backslash, leading '/', empty, '.' or '..' part)")
    return name


class ZipIndex:
    """The checked directory of a zip file open for reading (``fh`` stays the caller's to close)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        fh.seek(0, os.SEEK_END)
        self.file_size = fh.tell()
        cd_offset, cd_size, count = self._end_records()
        self.members: list[Member] = self._central_directory(cd_offset, cd_size, count)
        self._check_layout(cd_offset)
        self.root = self.members[0].name.split("/", 1)[0] if self.members else ""
        # miniz compares names case-insensitively (ASCII only): the key under which it would find each member
        self._by_key: dict[bytes, Member] = {}
        for m in self.members:
            key = m.name.encode("utf-8").lower()
            if key in self._by_key:
                same = self._by_key[key].name == m.name
                raise ZipProblem(m.name[:80], "appears twice in the archive" if same else
                                 f"and {self._by_key[key].name[:80]} differ only in case (torch may read either)")
            self._by_key[key] = m

    # -- directory -------------------------------------------------------------------------
    def _read_at(self, offset: int, size: int) -> bytes:
        self.fh.seek(offset)
        data = self.fh.read(size)
        if len(data) != size:
            raise _damaged("is truncated")
        return data

    def _end_records(self) -> tuple[int, int, int]:
        size = self.file_size
        if size < EOCD.size:
            raise _damaged("is not a zip file (too short)")
        tail_start = max(0, size - EOCD.size - 0xFFFF)
        tail = self._read_at(tail_start, size - tail_start)
        at = tail.rfind(b"PK\x05\x06")  # both readers take the last end record
        if at < 0 or at + EOCD.size > len(tail):
            raise _damaged("is not a zip file (no end of central directory)")
        sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len = EOCD.unpack_from(tail, at)
        eocd_pos = tail_start + at
        if eocd_pos + EOCD.size + comment_len != size:
            raise ZipProblem("the archive", "has bytes after its zip end record, or a comment that does not end it")
        if disk not in (0, 0xFFFF) or cd_disk not in (0, 0xFFFF) or n_disk != n_total:
            raise ZipProblem("the archive", "spans several disks")
        saturated = 0xFFFF in (n_total,) or 0xFFFFFFFF in (cd_size, cd_offset)
        end = eocd_pos
        if eocd_pos >= ZIP64_LOCATOR.size and self._read_at(eocd_pos - ZIP64_LOCATOR.size, 4) == b"PK\x06\x07":
            _, z_disk, z64_pos, disks = ZIP64_LOCATOR.unpack(self._read_at(eocd_pos - ZIP64_LOCATOR.size,
                                                                           ZIP64_LOCATOR.size))
            # Python's zipfile expects the zip64 record right before the locator; miniz follows the locator
            if z_disk != 0 or disks != 1 or z64_pos != eocd_pos - ZIP64_LOCATOR.size - ZIP64_EOCD.size:
                raise ZipProblem("the archive", "has a zip64 locator that readers follow to different places")
            (z_sig, rec_size, _, _, z_disk_no, z_cd_disk, z_n_disk, z_n_total, z_cd_size,
             z_cd_offset) = ZIP64_EOCD.unpack(self._read_at(z64_pos, ZIP64_EOCD.size))
            if z_sig != SIG_ZIP64 or rec_size != ZIP64_EOCD.size - 12 or z_disk_no or z_cd_disk or z_n_disk != z_n_total:
                raise ZipProblem("the archive", "has a malformed zip64 end record")
            for small, big, full in ((n_total, z_n_total, 0xFFFF), (cd_size, z_cd_size, 0xFFFFFFFF),
                                     (cd_offset, z_cd_offset, 0xFFFFFFFF)):
                if small != full and small != big:
                    raise ZipProblem("the archive", "has zip64 and zip end records that disagree")
            n_total, cd_size, cd_offset, end = z_n_total, z_cd_size, z_cd_offset, z64_pos
        elif saturated:
            raise ZipProblem("the archive", "has saturated zip end fields without a zip64 record")
        # no data before the archive and none between the directory and its end record: Python's zipfile would
        # shift every offset by such a gap, miniz would not
        if cd_offset + cd_size != end:
            raise ZipProblem("the archive", "has a central directory that does not end where its end record begins")
        if cd_size > MAX_CENTRAL_DIRECTORY or n_total > MAX_ENTRIES:
            raise ZipProblem("the archive", f"has {n_total} members in a {cd_size}-byte directory, more than a model needs")
        return cd_offset, cd_size, n_total

    def _central_directory(self, cd_offset: int, cd_size: int, count: int) -> list[Member]:
        cd = self._read_at(cd_offset, cd_size)
        members: list[Member] = []
        pos = 0
        for _ in range(count):
            if pos + CENTRAL.size > len(cd):
                raise ZipProblem("the archive", "has fewer central directory entries than its end record counts")
            (sig, _, _, flags, method, _, _, crc, comp, size, n_len, e_len, c_len, disk, _, _,
             offset) = CENTRAL.unpack_from(cd, pos)
            if sig != SIG_CENTRAL:
                raise ZipProblem("the archive", "has a malformed central directory entry")
            raw = cd[pos + CENTRAL.size:pos + CENTRAL.size + n_len]
            extra = cd[pos + CENTRAL.size + n_len:pos + CENTRAL.size + n_len + e_len]
            pos += CENTRAL.size + n_len + e_len + c_len
            if pos > len(cd):
                raise ZipProblem("the archive", "has a central directory entry that runs past the directory")
            name = check_name(raw, utf8_flag=bool(flags & FLAG_UTF8))
            size, comp, offset = _zip64_values(_extra_fields(extra, name), [size, comp, offset], name)
            if disk not in (0, 0xFFFF):
                raise ZipProblem(name, "lies on another disk")
            if flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION | FLAG_MASKED):
                raise ZipProblem(name, "is encrypted")
            if method not in (STORED, DEFLATED):
                raise ZipProblem(name, f"uses compression method {method} (only stored and deflate are read)")
            if method == STORED and comp != size:
                raise ZipProblem(name, "is stored with different compressed and uncompressed sizes")
            data_offset = self._check_local(name, raw, flags, method, crc, comp, size, offset)
            members.append(Member(name, name.split("/", 1)[1] if "/" in name else name, method, crc, comp, size,
                                  data_offset))
        if pos != len(cd):
            raise ZipProblem("the archive", "has more central directory entries than its end record counts")
        return members

    def _check_local(self, name: str, raw: bytes, flags: int, method: int, crc: int, comp: int, size: int,
                     offset: int) -> int:
        if offset + LOCAL.size > self.file_size:
            raise ZipProblem(name, "has a local header outside the file")
        (sig, _, l_flags, l_method, _, _, l_crc, l_comp, l_size, n_len,
         e_len) = LOCAL.unpack(self._read_at(offset, LOCAL.size))
        if sig != SIG_LOCAL:
            raise ZipProblem(name, "has no local header where the central directory points")
        l_raw = self._read_at(offset + LOCAL.size, n_len)
        if l_raw != raw:
            raise ZipProblem(name, f"is named {ascii(l_raw[:60])} in its local header (readers disagree on its name)")
        if l_method != method or l_flags != flags:
            raise ZipProblem(name, "has a local header whose compression method or flags differ from the directory's")
        l_extra = _extra_fields(self._read_at(offset + LOCAL.size + n_len, e_len), name)
        l_size, l_comp = _zip64_values(l_extra, [l_size, l_comp], name) if 0xFFFFFFFF in (l_size, l_comp) \
            else (l_size, l_comp)
        described = (l_crc, l_comp, l_size) == (0, 0, 0) and flags & FLAG_DESCRIPTOR
        if not described and (l_crc, l_comp, l_size) != (crc, comp, size):
            raise ZipProblem(name, "declares other sizes or checksum in its local header than in the directory")
        return offset + LOCAL.size + n_len + e_len

    def _check_layout(self, cd_offset: int) -> None:
        """Members' headers and data lie before the directory and overlap nowhere."""
        spans = sorted((m.data_offset - LOCAL.size - len(m.name.encode()), m.data_offset + m.comp_size, m.name)
                       for m in self.members)
        end = 0
        for start, stop, name in spans:
            if start < end:
                raise ZipProblem(name, "overlaps another member's bytes")
            end = stop
        if end > cd_offset:
            raise ZipProblem(spans[-1][2], "runs into the central directory")

    # -- lookup and reading ----------------------------------------------------------------
    def find(self, rel: str) -> Member | None:
        """The member torch reads for ``rel`` (below the root), found as miniz finds it."""
        return self._by_key.get(f"{self.root}/{rel}".encode("utf-8").lower())

    def read(self, member: Member, *, cap: int) -> bytes:
        """The member's bytes, never inflating more than ``min(cap, declared size)``; checksum verified."""
        if member.size > cap:
            raise ZipProblem(member.rel, f"declares {member.size} bytes, more than the {cap} allowed for it")
        self.fh.seek(member.data_offset)
        if member.method == STORED:
            data = self.fh.read(member.size)
            if len(data) != member.size:
                raise _damaged("is truncated", member.rel)
        else:
            data = self._inflate(member)
        if zlib.crc32(data) != member.crc:
            raise _damaged("is damaged (checksum mismatch)", member.rel)
        return data

    def _inflate(self, member: Member) -> bytes:
        inflater = zlib.decompressobj(-15)
        out = bytearray()
        left = member.comp_size
        pending = b""
        try:
            while not inflater.eof:
                if not pending:
                    if not left:
                        break
                    pending = self.fh.read(min(_CHUNK, left))
                    if not pending:
                        raise _damaged("is truncated", member.rel)
                    left -= len(pending)
                out += inflater.decompress(pending, member.size - len(out) + 1)
                pending = inflater.unconsumed_tail
                if len(out) > member.size:
                    raise ZipProblem(member.rel, f"inflates to more than the {member.size} bytes it declares")
        except zlib.error:
            raise _damaged("is damaged (bad deflate data)", member.rel) from None
        if not inflater.eof or len(out) != member.size:
            raise _damaged("is damaged (its deflate data ends early)", member.rel)
        return bytes(out)
