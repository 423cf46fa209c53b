"""The FUSE wire protocol, as much of it as a server of block-device files needs.

Pure encode and decode (``struct``), no I/O: :mod:`blksnap.frontends.fuse_session`
reads requests from ``/dev/fuse`` and writes the replies built here. The layout
follows the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.45 on this
kernel); every structure is little-endian and naturally aligned there, so the
formats below carry no implicit padding.

A request is a :data:`IN_HEADER` (40 bytes) and the opcode's arguments; a reply
is an :data:`OUT_HEADER` (16 bytes: length, ``-errno``, the request's unique)
and the opcode's answer, written in one ``write``. Requests that take no reply
(FORGET, BATCH_FORGET) are marked in :data:`NO_REPLY`.

Decoding never trusts a length: a request shorter than its header says, a
header length beyond the bytes read, arguments shorter than their structure
or a WRITE whose size runs past the request raise :class:`ProtocolError`
(with the unique when the header was readable, so the server can still answer
``EINVAL``). An opcode this module does not know decodes to a request whose
``args`` is ``None``: the server answers ``ENOSYS``, and the kernel stops
sending that opcode for most of them.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum
from typing import Any, NamedTuple

KERNEL_VERSION = 7
#: The minor version this module speaks. Anything the kernel offers beyond it
#: is left out by :func:`negotiate`; structures are read by their 7.45 sizes
#: but accept the shorter ones older kernels send where the kernel allows it.
KERNEL_MINOR_VERSION = 45
ROOT_ID = 1
#: Bit 63 of a unique: the kernel resends a request the previous server read but
#: never answered (after ``FUSE_NOTIFY_RESEND``). Answer with the unique as it is.
RESEND_BIT = 1 << 63
#: Bit 0 of the unique of an INTERRUPT (the interrupted request's unique | 1).
INT_REQ_BIT = 1
NOTIFY_RESEND = 7
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
#: What the kernel wants room for beyond ``max_write`` in the read buffer: the
#: in-header and ``fuse_write_in``. A buffer smaller than that (or 8 KiB) makes
#: ``read`` fail with EINVAL.
WRITE_HEADROOM = 40 + 40
MIN_READ_BUFFER = 8192


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43


_KNOWN = frozenset(int(op) for op in Opcode)
NO_REPLY = frozenset({int(Opcode.FORGET), int(Opcode.BATCH_FORGET)})

# INIT flags (the first 32 bits in ``flags``, the next in ``flags2``).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30

#: What this server asks for, each only if the kernel offers it:
WANTED_FLAGS = (
    # Reads may arrive in parallel and out of order: the backing objects are
    # thread-safe (pread), and a loop device issues many reads at once.
    ASYNC_READ
    # Writes larger than one page: without it every write is 4 KiB.
    | BIG_WRITES
    # Direct I/O requests of one file are sent concurrently instead of one by
    # one; measured: doubles 4 KiB IOPS of a loop device at queue depth 32.
    | ASYNC_DIO
    # max_pages is honoured: 1 MiB requests arrive whole, not as 8 x 128 KiB.
    | MAX_PAGES
    # LOOKUP and READDIR in one directory may run in parallel: the node tree is
    # read-only while served, so nothing needs the kernel's directory lock.
    | PARALLEL_DIROPS
    # ``flags2`` is read and written (all zero here: nothing in it is wanted,
    # but a kernel offering INIT_EXT expects the 64-bit form).
    | INIT_EXT
)

FATTR_SIZE = 1 << 3
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
DT_DIR = 4
DT_REG = 8


class ProtocolError(Exception):
    """A request that cannot be decoded. ``unique`` is None when even the
    header was unreadable (nothing can be answered)."""

    def __init__(self, message: str, unique: int | None = None, err: int = errno.EINVAL):
        super().__init__(message)
        self.unique = unique
        self.errno = err


# --- request arguments -----------------------------------------------------


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32 when INIT_EXT is set


class GetattrIn(NamedTuple):
    getattr_flags: int
    fh: int


class SetattrIn(NamedTuple):
    valid: int
    fh: int
    size: int
    mode: int
    uid: int
    gid: int


class OpenIn(NamedTuple):
    flags: int
    open_flags: int


class ReleaseIn(NamedTuple):
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


class FlushIn(NamedTuple):
    fh: int
    lock_owner: int


class ReadIn(NamedTuple):
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


class WriteIn(NamedTuple):
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int


class FsyncIn(NamedTuple):
    fh: int
    fsync_flags: int


class AccessIn(NamedTuple):
    mask: int


class FallocateIn(NamedTuple):
    fh: int
    offset: int
    length: int
    mode: int


class InterruptIn(NamedTuple):
    unique: int


class ForgetIn(NamedTuple):
    nlookup: int


class BatchForgetIn(NamedTuple):
    forgets: tuple[tuple[int, int], ...]  # (nodeid, nlookup)


class LookupIn(NamedTuple):
    name: bytes


class Request(NamedTuple):
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    args: Any  # one of the *In tuples; None for an unknown opcode or no arguments
    data: memoryview | None  # WRITE: the payload (a view into the read buffer)

    @property
    def resent(self) -> bool:
        return bool(self.unique & RESEND_BIT)


_INIT_IN_OLD = struct.Struct("<IIII")
_INIT_IN = struct.Struct("<IIIII44x")
_GETATTR_IN = struct.Struct("<IIQ")
_SETATTR_IN = struct.Struct("<IIQQQQQQIIII4xII4x")
_OPEN_IN = struct.Struct("<II")
_RELEASE_IN = struct.Struct("<QIIQ")
_FLUSH_IN = struct.Struct("<Q8xQ")
_RW_IN = struct.Struct("<QQIIQI4x")  # fuse_read_in and fuse_write_in
_FSYNC_IN = struct.Struct("<QI4x")
_ACCESS_IN = struct.Struct("<I4x")
_FALLOCATE_IN = struct.Struct("<QQQI4x")
_U64 = struct.Struct("<Q")
_BATCH_FORGET_IN = struct.Struct("<I4x")
_FORGET_ONE = struct.Struct("<QQ")

_SIMPLE: dict[int, tuple[struct.Struct, Any]] = {
    Opcode.GETATTR: (_GETATTR_IN, None),
    Opcode.OPEN: (_OPEN_IN, OpenIn),
    Opcode.OPENDIR: (_OPEN_IN, OpenIn),
    Opcode.RELEASE: (_RELEASE_IN, ReleaseIn),
    Opcode.RELEASEDIR: (_RELEASE_IN, ReleaseIn),
    Opcode.FSYNC: (_FSYNC_IN, FsyncIn),
    Opcode.ACCESS: (_ACCESS_IN, AccessIn),
    Opcode.FALLOCATE: (_FALLOCATE_IN, FallocateIn),
    Opcode.INTERRUPT: (_U64, InterruptIn),
    Opcode.FORGET: (_U64, ForgetIn),
}


def decode(buf: bytes | bytearray | memoryview) -> Request:
    """One request, exactly as one ``read`` of ``/dev/fuse`` returned it."""
    view = memoryview(buf)
    if len(view) < IN_HEADER.size:
        raise ProtocolError(f"request of {len(view)} bytes, shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(view)
    if length < IN_HEADER.size or length > len(view):
        raise ProtocolError(f"header says {length} bytes, {len(view)} read", unique)
    end = length - 8 * extlen  # extensions (security context, groups) are ignored
    if end < IN_HEADER.size:
        raise ProtocolError(f"extensions of {8 * extlen} bytes overrun the request", unique)
    body = view[IN_HEADER.size : end]
    data = None
    try:
        if opcode in (Opcode.READ, Opcode.READDIR):
            args: Any = ReadIn(*_RW_IN.unpack_from(body))
        elif opcode == Opcode.WRITE:
            args = WriteIn(*_RW_IN.unpack_from(body))
            if _RW_IN.size + args.size > len(body):
                raise ProtocolError(f"WRITE of {args.size} bytes in a request of {length}", unique)
            data = body[_RW_IN.size : _RW_IN.size + args.size]
        elif opcode == Opcode.LOOKUP:
            nul = bytes(body).find(b"\0")
            if nul < 0:
                raise ProtocolError("LOOKUP name without its NUL", unique)
            args = LookupIn(bytes(body[:nul]))
        elif opcode in _SIMPLE:
            st, kind = _SIMPLE[opcode]
            fields = st.unpack_from(body)
            args = GetattrIn(fields[0], fields[2]) if kind is None else kind(*fields)
        elif opcode == Opcode.SETATTR:
            f = _SETATTR_IN.unpack_from(body)
            args = SetattrIn(f[0], f[2], f[3], f[11], f[12], f[13])
        elif opcode == Opcode.FLUSH:
            args = FlushIn(*_FLUSH_IN.unpack_from(body))
        elif opcode == Opcode.INIT:
            args = _decode_init(body)
        elif opcode == Opcode.BATCH_FORGET:
            (count,) = _BATCH_FORGET_IN.unpack_from(body)
            need = _BATCH_FORGET_IN.size + count * _FORGET_ONE.size
            if need > len(body):
                raise ProtocolError(f"BATCH_FORGET of {count} in {len(body)} bytes", unique)
            args = BatchForgetIn(tuple(_FORGET_ONE.iter_unpack(body[_BATCH_FORGET_IN.size : need])))
        else:  # STATFS, DESTROY (no arguments) and unknown opcodes
            args = None
    except struct.error as e:
        name = Opcode(opcode).name if opcode in _KNOWN else str(opcode)
        raise ProtocolError(f"{name} arguments of {len(body)} bytes: {e}", unique) from None
    return Request(opcode, unique, nodeid, uid, gid, pid, args, data)


def _decode_init(body: memoryview) -> InitIn:
    if len(body) >= _INIT_IN.size:
        major, minor, readahead, flags, flags2 = _INIT_IN.unpack_from(body)
        if flags & INIT_EXT:
            flags |= flags2 << 32
    else:
        major, minor, readahead, flags = _INIT_IN_OLD.unpack_from(body)
    return InitIn(major, minor, readahead, flags)


# --- replies ---------------------------------------------------------------


def header(unique: int, payload_len: int = 0, error: int = 0) -> bytes:
    """An out-header for a payload of ``payload_len`` bytes (``error`` > 0 is an errno)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, -error, unique)


def reply(unique: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def error(unique: int, err: int) -> bytes:
    """A reply carrying only ``-err`` (an errno, positive here)."""
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def notify_resend() -> bytes:
    """``FUSE_NOTIFY_RESEND``: the kernel sends again every request it had
    handed to a server that never answered (bit 63 set in their unique)."""
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0)


_INVAL_ENTRY = struct.Struct("<QII")  # parent namelen flags
_INVAL_INODE = struct.Struct("<Qqq")  # ino off len


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    """``FUSE_NOTIFY_INVAL_ENTRY``: the kernel forgets the name ``name`` in
    directory ``parent`` (a dentry it cached), so the next walk asks again."""
    body = _INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body


def notify_inval_inode(nodeid: int) -> bytes:
    """``FUSE_NOTIFY_INVAL_INODE`` of the attributes (and no data: offset -1)."""
    body = _INVAL_INODE.pack(nodeid, -1, 0)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body


class Attr(NamedTuple):
    """``fuse_attr``; times in whole seconds plus nanoseconds."""

    ino: int
    size: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    blksize: int = 4096
    time: int = 0
    time_ns: int = 0

    def pack(self) -> bytes:
        t, ns = self.time, self.time_ns
        blocks = (self.size + 511) // 512
        return _ATTR.pack(self.ino, self.size, blocks, t, t, t, ns, ns, ns, self.mode,
                          self.nlink, self.uid, self.gid, 0, self.blksize, 0)  # fmt: skip


_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # 88 bytes
_ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid + nsec x2
_ATTR_OUT = struct.Struct("<QI4x")  # attr_valid attr_valid_nsec dummy
_OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
_WRITE_OUT = struct.Struct("<I4x")
_STATFS_OUT = struct.Struct("<QQQQQIII4x24x")  # fuse_kstatfs, 80 bytes
_INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")  # 64 bytes
_DIRENT = struct.Struct("<QQII")


def _split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def entry_out(nodeid: int, attr: Attr, entry_valid: float, attr_valid: float) -> bytes:
    es, ens = _split_seconds(entry_valid)
    as_, ans = _split_seconds(attr_valid)
    return _ENTRY_OUT.pack(nodeid, 0, es, as_, ens, ans) + attr.pack()


def attr_out(attr: Attr, attr_valid: float) -> bytes:
    s, ns = _split_seconds(attr_valid)
    return _ATTR_OUT.pack(s, ns) + attr.pack()


def open_out(fh: int, open_flags: int = 0) -> bytes:
    return _OPEN_OUT.pack(fh, open_flags, 0)


def write_out(size: int) -> bytes:
    return _WRITE_OUT.pack(size)


def statfs_out(blocks: int, bfree: int, bavail: int, files: int, ffree: int,
               bsize: int = 4096, namelen: int = 255, frsize: int = 4096) -> bytes:  # fmt: skip
    return _STATFS_OUT.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize)


def dirent(ino: int, next_offset: int, name: bytes, dtype: int) -> bytes:
    """One ``fuse_dirent``, padded to 8 bytes; ``next_offset`` is the offset a
    READDIR continuing after this entry will carry."""
    raw = _DIRENT.pack(ino, next_offset, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)


def parse_dirents(buf: bytes) -> list[tuple[int, int, bytes, int]]:
    """The entries of a READDIR reply (for tests): (ino, off, name, type)."""
    out, pos = [], 0
    while pos < len(buf):
        ino, off, namelen, dtype = _DIRENT.unpack_from(buf, pos)
        name = buf[pos + _DIRENT.size : pos + _DIRENT.size + namelen]
        out.append((ino, off, bytes(name), dtype))
        pos += (_DIRENT.size + namelen + 7) & ~7
    return out


class InitOut(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # 64 bits; the upper half goes to flags2
    max_background: int
    congestion_threshold: int
    max_write: int
    max_pages: int
    time_gran: int = 1

    def pack(self) -> bytes:
        lo, hi = self.flags & 0xFFFFFFFF, self.flags >> 32
        return _INIT_OUT.pack(self.major, self.minor, self.max_readahead, lo,
                              self.max_background, self.congestion_threshold, self.max_write,
                              self.time_gran, self.max_pages, 0, hi, 0, 0)  # fmt: skip

    @classmethod
    def unpack(cls, buf: bytes) -> InitOut:
        f = _INIT_OUT.unpack(buf)
        return cls(f[0], f[1], f[2], f[3] | f[10] << 32, f[4], f[5], f[6], f[8], f[7])


PAGE_SIZE = 4096


def max_pages_limit(path: str = "/proc/sys/fs/fuse/max_pages_limit") -> int:
    """The kernel's cap on ``max_pages`` (256 when the sysctl is absent)."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 256


def negotiate(init: InitIn, max_write: int = 1 << 20, max_background: int = 64,
              max_pages: int = 256, pages_limit: int | None = None) -> InitOut:  # fmt: skip
    """The INIT reply: what we want of what the kernel offers.

    A kernel of a later major version is answered with our major alone (it
    sends INIT again, speaking ours); one older than 7 is refused with
    :class:`ProtocolError` (``EPROTO``). ``max_pages`` is capped by the
    kernel's limit and ``max_write`` by ``max_pages`` pages. ``max_background``
    (how many asynchronous requests the kernel keeps in flight, 12 when left
    0) is 64: measured, 12 costs 18 to 27 % of 4 KiB IOPS.
    """
    if init.major < KERNEL_VERSION:
        raise ProtocolError(f"kernel FUSE protocol {init.major}.{init.minor}", err=errno.EPROTO)
    if init.major > KERNEL_VERSION:
        return InitOut(KERNEL_VERSION, KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0)
    if pages_limit is None:
        pages_limit = max_pages_limit()
    flags = init.flags & WANTED_FLAGS
    pages = max(1, min(max_pages, pages_limit)) if flags & MAX_PAGES else 32
    max_write = max(PAGE_SIZE, min(max_write, pages * PAGE_SIZE))
    return InitOut(
        major=KERNEL_VERSION,
        minor=min(init.minor, KERNEL_MINOR_VERSION),
        max_readahead=init.max_readahead,
        flags=flags,
        max_background=max_background,
        congestion_threshold=max(1, max_background * 3 // 4),
        max_write=max_write,
        max_pages=pages if flags & MAX_PAGES else 0,
    )
