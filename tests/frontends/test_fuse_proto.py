"""The FUSE wire protocol without a mount: every message a block-device file
server decodes or encodes, against the layouts of the kernel's fuse.h."""

from __future__ import annotations

import errno
import struct

import pytest

from blksnap.frontends import fuse_proto as p

UNIQUE = 0x1234


def request(opcode: int, body: bytes = b"", nodeid: int = 1, unique: int = UNIQUE,
            extlen: int = 0, length: int | None = None) -> bytes:  # fmt: skip
    total = 40 + len(body) if length is None else length
    return struct.pack("<IIQQIIIHH", total, opcode, unique, nodeid, 5, 6, 7, extlen, 0) + body


def out_header(raw: bytes) -> tuple[int, int, int]:
    return struct.unpack_from("<IiQ", raw)


def test_struct_sizes_match_fuse_h():
    assert p.IN_HEADER.size == 40
    assert p.OUT_HEADER.size == 16
    assert p._ATTR.size == 88
    assert p._ENTRY_OUT.size + p._ATTR.size == 128
    assert p._ATTR_OUT.size + p._ATTR.size == 104
    assert p._SETATTR_IN.size == 88
    assert p._RW_IN.size == 40
    assert p._RELEASE_IN.size == p._FLUSH_IN.size == 24
    assert p._FALLOCATE_IN.size == 32
    assert p._INIT_IN.size == p._INIT_OUT.size == 64
    assert p._STATFS_OUT.size == 80
    assert p._OPEN_OUT.size == 16


def test_header_fields():
    req = p.decode(request(p.Opcode.STATFS, nodeid=9))
    assert (req.opcode, req.unique, req.nodeid) == (17, UNIQUE, 9)
    assert (req.uid, req.gid, req.pid) == (5, 6, 7)
    assert req.args is None and req.data is None and not req.resent


def test_init_64_and_16_byte_forms():
    flags = p.ASYNC_READ | p.INIT_EXT | (1 << 3)
    req = p.decode(request(p.Opcode.INIT, struct.pack("<IIIII44x", 7, 45, 131072, flags, 0b101)))
    assert req.args == p.InitIn(7, 45, 131072, flags | 0b101 << 32)
    old = p.decode(request(p.Opcode.INIT, struct.pack("<IIII", 7, 26, 4096, p.INIT_EXT)))
    assert old.args == p.InitIn(7, 26, 4096, p.INIT_EXT)
    # flags2 is ignored without INIT_EXT
    req = p.decode(request(p.Opcode.INIT, struct.pack("<IIIII44x", 7, 45, 0, 1, 0xFF)))
    assert req.args.flags == 1


def test_negotiate_only_what_is_offered_and_wanted():
    offered = (1 << 31) - 1 | 1 << 39  # everything, HAS_RESEND in flags2 too
    out = p.negotiate(p.InitIn(7, 45, 65536, offered), pages_limit=256)
    assert out.flags == p.WANTED_FLAGS
    assert (out.major, out.minor, out.max_readahead) == (7, 45, 65536)
    assert (out.max_pages, out.max_write) == (256, 1 << 20)
    assert out.max_background >= 64 and 0 < out.congestion_threshold <= out.max_background
    # capped by the sysctl; max_write follows
    out = p.negotiate(p.InitIn(7, 45, 0, offered), pages_limit=64)
    assert (out.max_pages, out.max_write) == (64, 256 * 1024)
    # a kernel that offers little gets little
    out = p.negotiate(p.InitIn(7, 45, 0, p.ASYNC_READ), pages_limit=256)
    assert out.flags == p.ASYNC_READ and out.max_pages == 0 and out.max_write == 128 * 1024
    # a newer major: answer ours only; an older one: refuse
    assert p.negotiate(p.InitIn(8, 0, 0, offered)).max_write == 0
    with pytest.raises(p.ProtocolError) as e:
        p.negotiate(p.InitIn(6, 0, 0, 0))
    assert e.value.errno == errno.EPROTO


def test_init_out_roundtrip():
    out = p.InitOut(7, 45, 4096, p.WANTED_FLAGS | 1 << 33, 64, 48, 1 << 20, 256)
    raw = out.pack()
    assert len(raw) == 64
    assert p.InitOut.unpack(raw) == out
    assert struct.unpack_from("<I", raw, 32)[0] == 2  # flags2, after map_alignment


def test_lookup_forget_batch_forget():
    assert p.decode(request(p.Opcode.LOOKUP, b"disk\0")).args == p.LookupIn(b"disk")
    with pytest.raises(p.ProtocolError) as e:
        p.decode(request(p.Opcode.LOOKUP, b"disk"))
    assert e.value.unique == UNIQUE
    assert p.decode(request(p.Opcode.FORGET, struct.pack("<Q", 3))).args == p.ForgetIn(3)
    body = struct.pack("<I4x", 2) + struct.pack("<QQQQ", 2, 1, 3, 5)
    assert p.decode(request(p.Opcode.BATCH_FORGET, body)).args.forgets == ((2, 1), (3, 5))
    with pytest.raises(p.ProtocolError):
        p.decode(request(p.Opcode.BATCH_FORGET, struct.pack("<I4x", 3) + bytes(16)))
    assert p.Opcode.FORGET in p.NO_REPLY and p.Opcode.BATCH_FORGET in p.NO_REPLY


def test_getattr_setattr():
    assert p.decode(request(p.Opcode.GETATTR, struct.pack("<IIQ", 1, 0, 77))).args == p.GetattrIn(
        1, 77
    )
    body = struct.pack("<IIQQQQQQIIII4xII4x", p.FATTR_SIZE | 1, 0, 9, 4096, 0, 1, 2, 3,
                       0, 0, 0, 0o644, 10, 20)  # fmt: skip
    assert p.decode(request(p.Opcode.SETATTR, body)).args == p.SetattrIn(
        p.FATTR_SIZE | 1, 9, 4096, 0o644, 10, 20
    )


def test_open_release_flush_fsync_access_fallocate_interrupt():
    d = p.decode
    assert d(request(p.Opcode.OPEN, struct.pack("<II", 2, 0))).args == p.OpenIn(2, 0)
    assert d(request(p.Opcode.OPENDIR, struct.pack("<II", 0, 0))).args == p.OpenIn(0, 0)
    rel = struct.pack("<QIIQ", 5, 2, 1, 99)
    assert d(request(p.Opcode.RELEASE, rel)).args == p.ReleaseIn(5, 2, 1, 99)
    assert d(request(p.Opcode.RELEASEDIR, rel)).args.fh == 5
    assert d(request(p.Opcode.FLUSH, struct.pack("<Q8xQ", 5, 42))).args == p.FlushIn(5, 42)
    assert d(request(p.Opcode.FSYNC, struct.pack("<QI4x", 5, 1))).args == p.FsyncIn(5, 1)
    assert d(request(p.Opcode.ACCESS, struct.pack("<I4x", 4))).args == p.AccessIn(4)
    fa = struct.pack("<QQQI4x", 5, 8192, 4096, p.FALLOC_FL_PUNCH_HOLE | p.FALLOC_FL_KEEP_SIZE)
    assert d(request(p.Opcode.FALLOCATE, fa)).args == p.FallocateIn(5, 8192, 4096, 3)
    assert d(request(p.Opcode.INTERRUPT, struct.pack("<Q", 77))).args == p.InterruptIn(77)
    assert d(request(p.Opcode.DESTROY)).args is None


def test_read_readdir_write():
    rd = struct.pack("<QQIIQI4x", 5, 1 << 40, 4096, 0, 0, 0o2)
    assert p.decode(request(p.Opcode.READ, rd)).args == p.ReadIn(5, 1 << 40, 4096, 0, 0, 2)
    assert p.decode(request(p.Opcode.READDIR, rd)).args.size == 4096
    payload = bytes(range(256)) * 16
    wr = struct.pack("<QQIIQI4x", 5, 4096, len(payload), 1, 0, 0) + payload
    req = p.decode(request(p.Opcode.WRITE, wr))
    assert req.args == p.WriteIn(5, 4096, len(payload), 1, 0, 0)
    assert bytes(req.data) == payload


def test_resend_bit_kept():
    req = p.decode(request(p.Opcode.GETATTR, bytes(16), unique=p.RESEND_BIT | 5))
    assert req.resent and req.unique == p.RESEND_BIT | 5
    assert out_header(p.error(req.unique, errno.EIO))[2] == p.RESEND_BIT | 5


def test_unknown_opcode_decodes_without_args():
    for op in (5, 39, 44, 52, 4096, 0xFFFFFFFF):
        req = p.decode(request(op, b"whatever"))
        assert req.opcode == op and req.args is None


def test_short_requests():
    with pytest.raises(p.ProtocolError) as e:
        p.decode(b"\0" * 39)
    assert e.value.unique is None
    # the header claims more than was read
    with pytest.raises(p.ProtocolError) as e:
        p.decode(request(p.Opcode.GETATTR, bytes(16), length=200))
    assert e.value.unique == UNIQUE
    # a length below the header's own size
    with pytest.raises(p.ProtocolError):
        p.decode(request(p.Opcode.STATFS, length=20))
    # arguments shorter than their structure
    for op in (p.Opcode.READ, p.Opcode.WRITE, p.Opcode.GETATTR, p.Opcode.SETATTR,
               p.Opcode.OPEN, p.Opcode.FLUSH, p.Opcode.FALLOCATE, p.Opcode.INIT,
               p.Opcode.BATCH_FORGET, p.Opcode.INTERRUPT):  # fmt: skip
        with pytest.raises(p.ProtocolError) as e:
            p.decode(request(op, bytes(7)))
        assert e.value.unique == UNIQUE and e.value.errno == errno.EINVAL
    # extensions longer than the request
    with pytest.raises(p.ProtocolError):
        p.decode(request(p.Opcode.STATFS, extlen=2))


def test_oversized_requests():
    # a WRITE whose size runs past the request
    wr = struct.pack("<QQIIQI4x", 5, 0, 8192, 0, 0, 0) + bytes(4096)
    with pytest.raises(p.ProtocolError) as e:
        p.decode(request(p.Opcode.WRITE, wr))
    assert e.value.unique == UNIQUE
    # bytes beyond the header's length (and extensions) are not part of the request
    rd = struct.pack("<QQIIQI4x", 5, 0, 4096, 0, 0, 0)
    req = p.decode(request(p.Opcode.READ, rd + bytes(24), extlen=3) + b"trailing junk")
    assert req.args.size == 4096
    wr = struct.pack("<QQIIQI4x", 5, 0, 4, 0, 0, 0) + b"abcdEXTRA"
    assert bytes(p.decode(request(p.Opcode.WRITE, wr)).data) == b"abcd"


def test_replies():
    assert out_header(p.reply(UNIQUE)) == (16, 0, UNIQUE)
    assert out_header(p.reply(UNIQUE, b"x" * 8)) == (24, 0, UNIQUE)
    assert out_header(p.error(UNIQUE, errno.ENOSYS)) == (16, -errno.ENOSYS, UNIQUE)
    assert out_header(p.header(UNIQUE, 4096)) == (4112, 0, UNIQUE)
    assert p.notify_resend() == struct.pack("<IiQ", 16, 7, 0)
    assert struct.unpack("<I4x", p.write_out(4096)) == (4096,)
    assert struct.unpack("<QIi", p.open_out(9, p.FOPEN_DIRECT_IO)) == (9, 1, 0)


def test_attr_entry_attr_out_statfs():
    attr = p.Attr(ino=2, size=1 << 30, mode=0o100600, time=1000, time_ns=5)
    raw = attr.pack()
    f = struct.unpack("<QQQQQQIIIIIIIIII", raw)
    assert f[:6] == (2, 1 << 30, (1 << 30) // 512, 1000, 1000, 1000)
    assert f[6:] == (5, 5, 5, 0o100600, 1, 0, 0, 0, 4096, 0)
    ent = p.entry_out(2, attr, 1.5, 2.0)
    assert struct.unpack_from("<QQQQII", ent) == (2, 0, 1, 2, 500_000_000, 0)
    assert ent[40:] == raw
    ao = p.attr_out(attr, 0.25)
    assert struct.unpack_from("<QI", ao) == (0, 250_000_000) and ao[16:] == raw
    st = struct.unpack("<QQQQQIII4x24x", p.statfs_out(10, 2, 1, 3, 0))
    assert st == (10, 2, 1, 3, 0, 4096, 255, 4096)


def test_dirents_padded_and_parsed():
    raw = p.dirent(2, 1, b"disk", p.DT_REG) + p.dirent(3, 2, b"images", p.DT_DIR)
    assert len(raw) % 8 == 0 and len(p.dirent(2, 1, b"12345678", 8)) == 32
    assert p.parse_dirents(raw) == [(2, 1, b"disk", 8), (3, 2, b"images", 4)]


# --- against fuse.h: numbers, every handled request, every reply, notifications --

#: ``enum fuse_opcode`` of include/uapi/linux/fuse.h, for the opcodes served.
FUSE_H_OPCODES = {
    "LOOKUP": 1, "FORGET": 2, "GETATTR": 3, "SETATTR": 4, "OPEN": 14, "READ": 15,
    "WRITE": 16, "STATFS": 17, "RELEASE": 18, "FSYNC": 20, "FLUSH": 25, "INIT": 26,
    "OPENDIR": 27, "READDIR": 28, "RELEASEDIR": 29, "ACCESS": 34, "INTERRUPT": 36,
    "DESTROY": 38, "BATCH_FORGET": 42, "FALLOCATE": 43,
}  # fmt: skip


def test_numbers_match_fuse_h() -> None:
    assert {op.name: int(op) for op in p.Opcode} == FUSE_H_OPCODES
    # enum fuse_notify_code
    assert (p.NOTIFY_INVAL_INODE, p.NOTIFY_INVAL_ENTRY, p.NOTIFY_RESEND) == (2, 3, 7)
    assert p.MIN_READ_BUFFER == 8192  # FUSE_MIN_READ_BUFFER
    # INIT flags, FATTR_*, FOPEN_*, and the unique's resend bit
    assert (p.ASYNC_READ, p.BIG_WRITES, p.ASYNC_DIO) == (1, 1 << 5, 1 << 15)
    assert (p.PARALLEL_DIROPS, p.MAX_PAGES, p.INIT_EXT) == (1 << 18, 1 << 22, 1 << 30)
    assert p.FATTR_SIZE == 1 << 3
    assert (p.FOPEN_DIRECT_IO, p.FOPEN_PARALLEL_DIRECT_WRITES) == (1, 1 << 6)
    assert p.RESEND_BIT == 1 << 63
    # linux/falloc.h and the d_type of dirent.h
    assert (p.FALLOC_FL_KEEP_SIZE, p.FALLOC_FL_PUNCH_HOLE, p.FALLOC_FL_ZERO_RANGE) == (1, 2, 0x10)
    assert (p.DT_DIR, p.DT_REG) == (4, 8)
    # The read buffer holds a WRITE of max_write: in-header + fuse_write_in.
    assert p.IN_HEADER.size + p._RW_IN.size == p.WRITE_HEADROOM


def _every_request() -> dict[int, tuple[bytes, object]]:
    """Each served opcode: its arguments as this kernel sends them (the
    7.45 sizes) and what they decode to."""
    rw = struct.pack("<QQIIQI4x", 7, 1 << 33, 65536, 2, 0xABC, 0o100002)
    flags = p.ASYNC_READ | p.MAX_PAGES | p.INIT_EXT
    setattr_in = struct.pack("<IIQQQQQQIIII4xII4x", p.FATTR_SIZE, 0, 7, 1 << 30, 0, 11, 12,
                             13, 1, 2, 3, 0o100644, 1000, 1001)  # fmt: skip
    Op = p.Opcode
    return {
        Op.LOOKUP: (b"disk\0", p.LookupIn(b"disk")),
        Op.FORGET: (struct.pack("<Q", 3), p.ForgetIn(3)),
        Op.GETATTR: (struct.pack("<IIQ", 1, 0, 7), p.GetattrIn(1, 7)),
        Op.SETATTR: (setattr_in, p.SetattrIn(p.FATTR_SIZE, 7, 1 << 30, 0o100644, 1000, 1001)),
        Op.OPEN: (struct.pack("<II", 0o40002, 0), p.OpenIn(0o40002, 0)),
        Op.READ: (rw, p.ReadIn(7, 1 << 33, 65536, 2, 0xABC, 0o100002)),
        Op.WRITE: (rw + bytes(65536), p.WriteIn(7, 1 << 33, 65536, 2, 0xABC, 0o100002)),
        Op.STATFS: (b"", None),
        Op.RELEASE: (struct.pack("<QIIQ", 7, 2, 1, 0xABC), p.ReleaseIn(7, 2, 1, 0xABC)),
        Op.FSYNC: (struct.pack("<QI4x", 7, 1), p.FsyncIn(7, 1)),
        Op.FLUSH: (struct.pack("<QIIQ", 7, 0, 0, 0xABC), p.FlushIn(7, 0xABC)),
        Op.INIT: (
            struct.pack("<IIIII44x", 7, 45, 1 << 17, flags, 1 << 7),
            p.InitIn(7, 45, 1 << 17, flags | 1 << 39),
        ),
        Op.OPENDIR: (struct.pack("<II", 0o200000, 0), p.OpenIn(0o200000, 0)),
        Op.READDIR: (rw, p.ReadIn(7, 1 << 33, 65536, 2, 0xABC, 0o100002)),
        Op.RELEASEDIR: (struct.pack("<QIIQ", 7, 0, 0, 0), p.ReleaseIn(7, 0, 0, 0)),
        Op.ACCESS: (struct.pack("<I4x", 6), p.AccessIn(6)),
        Op.INTERRUPT: (struct.pack("<Q", 0x41), p.InterruptIn(0x41)),
        Op.DESTROY: (b"", None),
        Op.BATCH_FORGET: (struct.pack("<I4xQQ", 1, 9, 2), p.BatchForgetIn(((9, 2),))),
        Op.FALLOCATE: (
            struct.pack("<QQQI4x", 7, 4096, 8192, 0x11),
            p.FallocateIn(7, 4096, 8192, 0x11),
        ),
    }


def test_every_served_request_decodes() -> None:
    table = _every_request()
    assert set(table) == set(p.Opcode)  # a new opcode needs a row here
    for op, (body, want) in table.items():
        req = p.decode(request(op, body, nodeid=7))
        assert (req.opcode, req.unique, req.nodeid) == (op, UNIQUE, 7), op.name
        assert req.args == want, op.name
        if op == p.Opcode.WRITE:
            assert req.data is not None and len(req.data) == 65536
        else:
            assert req.data is None, op.name


#: Opcodes whose arguments are one fixed structure (and its size in fuse.h).
FIXED_SIZES = {
    p.Opcode.FORGET: 8, p.Opcode.GETATTR: 16, p.Opcode.SETATTR: 88, p.Opcode.OPEN: 8,
    p.Opcode.READ: 40, p.Opcode.WRITE: 40, p.Opcode.RELEASE: 24, p.Opcode.FSYNC: 16,
    p.Opcode.FLUSH: 24, p.Opcode.OPENDIR: 8, p.Opcode.READDIR: 40, p.Opcode.RELEASEDIR: 24,
    p.Opcode.ACCESS: 8, p.Opcode.INTERRUPT: 8, p.Opcode.BATCH_FORGET: 8,
    p.Opcode.FALLOCATE: 32, p.Opcode.INIT: 16,  # fuse_init_in before 7.36
}  # fmt: skip


@pytest.mark.parametrize("op", sorted(FIXED_SIZES), ids=lambda op: p.Opcode(op).name)
def test_arguments_one_byte_short_refused(op: int) -> None:
    size = FIXED_SIZES[op]
    body = struct.pack("<I4x", 0) + bytes(size - 8) if op == p.Opcode.BATCH_FORGET else bytes(size)
    req = p.decode(request(op, body))  # the exact size decodes
    assert req.opcode == op
    with pytest.raises(p.ProtocolError) as e:
        p.decode(request(op, body[:-1]))
    assert (e.value.unique, e.value.errno) == (UNIQUE, errno.EINVAL)
    assert p.Opcode(op).name in str(e.value)


def test_lookup_never_reads_past_the_declared_length() -> None:
    # The name's NUL lies just beyond the length the header declares: the
    # bytes after the request are not part of it.
    raw = request(p.Opcode.LOOKUP, b"disk", length=44) + b"\0"
    with pytest.raises(p.ProtocolError) as e:
        p.decode(raw)
    assert e.value.unique == UNIQUE
    # Same for a WRITE whose data would only fit with the bytes after it.
    wr = struct.pack("<QQIIQI4x", 5, 0, 8, 0, 0, 0) + b"abcd"
    with pytest.raises(p.ProtocolError):
        p.decode(request(p.Opcode.WRITE, wr) + b"efgh")
    # A header length longer than what was read, by one byte.
    with pytest.raises(p.ProtocolError) as e:
        p.decode(request(p.Opcode.FSYNC, bytes(16), length=57))
    assert e.value.unique == UNIQUE


def test_request_longer_than_declared_decodes_the_declared_part() -> None:
    for op, (body, want) in _every_request().items():
        req = p.decode(request(op, body, nodeid=7) + b"\xff" * 100)
        assert req.args == want, op.name
        if op == p.Opcode.WRITE:
            assert req.data is not None and bytes(req.data) == bytes(65536)


@pytest.mark.parametrize("max_write", [4096, 128 * 1024, 1 << 20])
def test_largest_write_fits_the_read_buffer(max_write: int) -> None:
    """A WRITE of max_write bytes is max_write + WRITE_HEADROOM long (what the
    kernel checks the read buffer against); anything cut off by a read
    buffer too small (the header declares more than was read) is refused
    with the unique, so the server can still answer EINVAL."""
    payload = bytes(range(256)) * (max_write // 256)
    raw = request(p.Opcode.WRITE, struct.pack("<QQIIQI4x", 5, 0, max_write, 0, 0, 0) + payload)
    assert len(raw) == max_write + p.WRITE_HEADROOM
    req = p.decode(raw)
    assert req.args.size == max_write and bytes(req.data) == payload
    # One page more than max_write, read into a buffer of max_write + headroom.
    big = struct.pack("<QQIIQI4x", 5, 0, max_write + 4096, 0, 0, 0) + bytes(max_write + 4096)
    over = request(p.Opcode.WRITE, big)
    with pytest.raises(p.ProtocolError) as e:
        p.decode(over[: max_write + p.WRITE_HEADROOM])
    assert (e.value.unique, e.value.errno) == (UNIQUE, errno.EINVAL)
    # Read whole, it decodes: the size limit is the buffer's, not the decoder's.
    assert p.decode(over).args.size == max_write + 4096


def test_reply_encoders_lengths_and_layouts() -> None:
    """Every reply the session builds: an out-header whose length is the
    whole reply, then the fuse.h structure of that opcode."""
    attr = p.Attr(ino=5, size=12345, mode=0o100600)
    replies = {
        "entry_out": (p.entry_out(5, attr, 60.0, 0.5), 128),
        "attr_out": (p.attr_out(attr, 60.0), 104),
        "open_out": (p.open_out(5, p.FOPEN_DIRECT_IO), 16),
        "write_out": (p.write_out(4096), 8),
        "statfs_out": (p.statfs_out(1, 2, 3, 4, 5), 80),
        "init_out": (p.negotiate(p.InitIn(7, 45, 0, p.WANTED_FLAGS), pages_limit=256).pack(), 64),
        "dirent": (p.dirent(5, 1, b"x", p.DT_REG), 32),
    }
    for name, (payload, size) in replies.items():
        assert len(payload) == size, name
        raw = p.reply(UNIQUE, payload)
        assert out_header(raw) == (16 + size, 0, UNIQUE), name
        assert raw[16:] == payload
    ent = struct.unpack_from("<QQQQII", p.entry_out(5, attr, 60.0, 0.5))
    assert ent == (5, 0, 60, 0, 0, 500_000_000)  # generation 0: ids never reused
    # header() announces a payload written separately (a READ's data)
    assert out_header(p.header(UNIQUE, 1 << 20)) == (16 + (1 << 20), 0, UNIQUE)
    for err in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOSPC):
        assert p.error(UNIQUE, err) == struct.pack("<IiQ", 16, -err, UNIQUE)


def test_notify_inval_entry_layout() -> None:
    raw = p.notify_inval_entry(0x1122334455, b"disk0")
    # fuse_out_header: unique 0 marks a notification, error carries its code
    length, code, unique = out_header(raw)
    assert (length, code, unique) == (len(raw), p.NOTIFY_INVAL_ENTRY, 0)
    # fuse_notify_inval_entry_out {u64 parent; u32 namelen; u32 flags}, the
    # name and its NUL: the kernel wants exactly sizeof(outarg) + namelen + 1.
    parent, namelen, flags = struct.unpack_from("<QII", raw, 16)
    assert (parent, namelen, flags) == (0x1122334455, 5, 0)  # 0: not FUSE_EXPIRE_ONLY
    assert raw[32:] == b"disk0\0" and len(raw) == 16 + 16 + namelen + 1
    long = p.notify_inval_entry(1, b"n" * 255)
    assert out_header(long)[0] == len(long) == 16 + 16 + 256


def test_notify_inval_inode_layout() -> None:
    raw = p.notify_inval_inode(42)
    assert out_header(raw) == (16 + 24, p.NOTIFY_INVAL_INODE, 0)
    # fuse_notify_inval_inode_out {u64 ino; s64 off; s64 len}: a negative
    # offset invalidates the attributes only, no cached data.
    assert struct.unpack("<Qqq", raw[16:]) == (42, -1, 0)


def test_notify_resend_layout() -> None:
    raw = p.notify_resend()
    # A bare out-header: no payload, unique 0, the code in error.
    assert len(raw) == 16 and out_header(raw) == (16, p.NOTIFY_RESEND, 0)
