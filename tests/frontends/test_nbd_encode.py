"""The pure encode and check functions of the NBD protocol module: no
sockets, no engine."""

from __future__ import annotations

import struct

import pytest

from blksnap.frontends.nbd import protocol as p
from blksnap.frontends.nbd.protocol import CommandError, Request

MiB = 1 << 20


def test_transmission_flags():
    rw = p.transmission_flags(readonly=False, structured=False)
    assert rw & p.FLAG_HAS_FLAGS and rw & p.FLAG_SEND_FLUSH and rw & p.FLAG_CAN_MULTI_CONN
    assert rw & p.FLAG_SEND_FUA and rw & p.FLAG_SEND_TRIM and rw & p.FLAG_SEND_WRITE_ZEROES
    assert not rw & (p.FLAG_READ_ONLY | p.FLAG_SEND_DF)
    ro = p.transmission_flags(readonly=True, structured=True)
    assert ro & p.FLAG_READ_ONLY and ro & p.FLAG_SEND_DF
    assert not ro & (p.FLAG_SEND_FUA | p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES)


def test_greeting_and_export_name_reply():
    assert p.greeting() == struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3)
    assert p.export_name_reply(4096, 0x1234, no_zeroes=True) == struct.pack(">QH", 4096, 0x1234)
    full = p.export_name_reply(4096, 1, no_zeroes=False)
    assert len(full) == 10 + 124 and full[10:] == bytes(124)


def _option_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while raw:
        magic, option, reply, length = p.OPTION_REPLY.unpack_from(raw)
        assert magic == p.OPTION_REPLY_MAGIC
        out.append((option, reply, raw[20 : 20 + length]))
        raw = raw[20 + length :]
    return out


def test_info_replies():
    msgs = p.info_replies(
        p.OPT_GO,
        [p.INFO_BLOCK_SIZE, p.INFO_NAME, p.INFO_DESCRIPTION, 99],
        size=8 * MiB,
        flags=0x21,
        name="sid/d",
        description="x" * 5000,
        max_payload=32 * MiB,
    )
    got = _option_replies(b"".join(msgs))
    assert [(o, r) for o, r, _ in got] == [(p.OPT_GO, p.REP_INFO)] * 4
    assert got[0][2] == struct.pack(">HQH", p.INFO_EXPORT, 8 * MiB, 0x21)
    assert got[1][2] == struct.pack(">H", p.INFO_NAME) + b"sid/d"
    assert got[2][2] == struct.pack(">H", p.INFO_DESCRIPTION) + b"x" * p.MAX_STRING
    assert got[3][2] == struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)
    only_export = p.info_replies(
        p.OPT_INFO, [], size=1, flags=1, name="d", description="", max_payload=1
    )
    assert len(only_export) == 1


def test_list_meta_and_error_replies():
    assert _option_replies(p.server_reply("d0")) == [
        (p.OPT_LIST, p.REP_SERVER, struct.pack(">I", 2) + b"d0")
    ]
    assert _option_replies(p.meta_context_reply(p.OPT_SET_META_CONTEXT, 2, p.CTX_DIRTY)) == [
        (p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, struct.pack(">I", 2) + p.CTX_DIRTY.encode())
    ]
    ((_o, reply, text),) = _option_replies(p.option_error(p.OPT_GO, p.REP_ERR_UNKNOWN, "é" * 3000))
    assert reply == p.REP_ERR_UNKNOWN and len(text) == p.MAX_STRING


def test_simple_error_and_data_replies():
    assert p.simple_reply(7) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 7)
    assert p.error_reply(7, p.NBD_EIO, "bad", structured=False) == (
        struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.NBD_EIO, 7),
    )
    assert p.error_reply(7, p.NBD_EIO, "bad", structured=True) == (p.error_chunk(7, 5, "bad"),)
    assert p.data_reply(3, 0, b"abc", structured=False) == (p.simple_reply(3), b"abc")
    head, data = p.data_reply(3, 4096, b"abc", structured=True)
    assert data == b"abc"
    assert p.OFFSET_DATA_HEADER.unpack(head) == (
        p.STRUCTURED_REPLY_MAGIC,
        p.REPLY_FLAG_DONE,
        p.REPLY_TYPE_OFFSET_DATA,
        3,
        11,
        4096,
    )
    (done,) = p.data_reply(3, 0, b"", structured=True)
    assert p.CHUNK_HEADER.unpack(done) == (
        p.STRUCTURED_REPLY_MAGIC,
        p.REPLY_FLAG_DONE,
        p.REPLY_TYPE_NONE,
        3,
        0,
    )


def test_run_extents():
    runs = [(0, 10, True), (10, 5, False), (15, 1, True)]
    assert p.run_extents(runs, p.STATE_DIRTY) == [(10, 1), (5, 0), (1, 1)]
    assert p.run_extents([], 3) == []


RW = p.transmission_flags(readonly=False, structured=True)
RO = p.transmission_flags(readonly=True, structured=False)


def check(cmd, offset=0, length=4096, flags=0, *, tflags=RW, readonly=False, meta=True):
    p.check_request(
        Request(flags, cmd, 1, offset, length),
        flags=tflags,
        structured=bool(tflags & p.FLAG_SEND_DF),
        has_meta=meta,
        name="d",
        size=MiB,
        readonly=readonly,
        max_payload=64 * 1024,
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "err"),
    [
        ((99,), {}, p.NBD_EINVAL),  # unknown command
        ((p.CMD_WRITE, 0, 1, p.CMD_FLAG_NO_HOLE), {}, p.NBD_EINVAL),  # flag of another command
        ((p.CMD_READ, 0, 1, p.CMD_FLAG_DF), {"tflags": RO}, p.NBD_EINVAL),  # DF not advertised
        ((p.CMD_WRITE, 0, 1, p.CMD_FLAG_FUA), {"tflags": RO}, p.NBD_EINVAL),  # nor FUA
        ((p.CMD_WRITE,), {"readonly": True}, p.NBD_EPERM),
        ((p.CMD_TRIM,), {"readonly": True}, p.NBD_EPERM),
        ((p.CMD_READ, 0, 64 * 1024 + 1), {}, p.NBD_EOVERFLOW),  # structured
        ((p.CMD_READ, 0, 64 * 1024 + 1), {"tflags": RO}, p.NBD_EINVAL),  # simple replies
        ((p.CMD_READ, MiB, 1), {}, p.NBD_EINVAL),
        ((p.CMD_WRITE, MiB - 1, 2), {}, p.NBD_ENOSPC),
        ((p.CMD_WRITE_ZEROES, MiB + 1, 0), {}, p.NBD_ENOSPC),
        ((p.CMD_BLOCK_STATUS, 0, 1), {"meta": False}, p.NBD_EINVAL),
        ((p.CMD_BLOCK_STATUS, 0, 0), {}, p.NBD_EINVAL),
    ],
)
def test_check_request_refuses(args, kwargs, err):
    with pytest.raises(CommandError) as exc:
        check(*args, **kwargs)
    assert exc.value.nbd_errno == err


def test_check_request_accepts():
    check(p.CMD_READ, 0, 64 * 1024, p.CMD_FLAG_DF)
    check(p.CMD_WRITE, MiB - 1, 1, p.CMD_FLAG_FUA)
    check(p.CMD_WRITE_ZEROES, 0, MiB, p.CMD_FLAG_NO_HOLE)
    check(p.CMD_FLUSH, 5 * MiB, 5 * MiB, readonly=True)  # a flush has no range
    check(p.CMD_BLOCK_STATUS, 0, MiB, p.CMD_FLAG_REQ_ONE)
    check(p.CMD_READ, MiB, 0)  # empty, at the end
    with pytest.raises(CommandError, match="'d' is read-only"):
        check(p.CMD_WRITE, readonly=True)
