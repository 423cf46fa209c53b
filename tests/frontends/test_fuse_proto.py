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
