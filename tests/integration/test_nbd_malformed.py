"""blksnapd's NBD server against traffic no real client sends, on a raw
socket: every case is answered as doc/proto.md says, or that connection is
closed; the daemon and its other clients carry on, and it says so in its log."""

from __future__ import annotations

import json
import os
import socket
import struct

import pytest

from tests.integration.nbd_client import (
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_NAME,
    OPT,
    OptionFailed,
    RawNbd,
)

MiB = 1 << 20
SIZE = 8 * MiB
MAX_PAYLOAD = 32 * MiB


@pytest.fixture
def served(nbd_daemon, backing, tmp_path):
    """Device ``d`` (random content) and a taken snapshot of it: (daemon, sid, content)."""
    path = backing("d.img", SIZE)
    content = os.urandom(SIZE)
    with open(path, "r+b") as f:
        f.write(content)
    nbd_daemon.cli("device", "add", path, "--name", "d")
    storage = tmp_path / "diff"
    storage.mkdir()
    sid = nbd_daemon.cli("snapshot", "create", "-d", "d", "-f", str(storage), "-l", "16M")
    sid = sid.stdout.strip()
    nbd_daemon.cli("snapshot", "take", "-i", sid)
    return nbd_daemon, sid, content


def still_serving(daemon, content: bytes) -> None:
    """A fresh client reads correct data; the control socket answers."""
    with RawNbd(daemon.nbd) as c:
        c.open("d")
        assert c.read(12345, 4096) == content[12345 : 12345 + 4096]
        c.disconnect()
        assert c.closed_by_server()
    assert daemon.client.status()["pid"] == daemon.proc.pid
    assert daemon.proc.poll() is None


def test_handshake_violations_close_the_connection(served):
    daemon, _sid, content = served
    # Bad option magic: nothing it sends can be parsed any more.
    with RawNbd(daemon.nbd) as c:
        assert c.greet() & 1  # NBD_FLAG_FIXED_NEWSTYLE
        c.send(struct.pack(">QII", 0x1122334455667788, OPT["LIST"], 0))
        assert c.closed_by_server()
    # Unknown client flags: the server MUST drop the connection.
    with RawNbd(daemon.nbd) as c:
        c.greet(client_flags=0x80)
        assert c.closed_by_server()
    # An option length no server should buffer (4 GiB - 1).
    with RawNbd(daemon.nbd) as c:
        c.greet()
        c.send_option(OPT["GO"], b"", length=0xFFFFFFFF)
        assert c.closed_by_server()
    # NBD_OPT_EXPORT_NAME of a missing export cannot be answered: hang up.
    with RawNbd(daemon.nbd) as c:
        c.greet()
        c.send_option(OPT["EXPORT_NAME"], b"no-such-export")
        assert c.closed_by_server()
    # A client that vanishes in the middle of an option.
    with RawNbd(daemon.nbd) as c:
        c.greet()
        c.send(struct.pack(">QII", 0x49484156454F5054, OPT["GO"], 100) + b"\0\0")
    still_serving(daemon, content)
    log = daemon.log_text()
    assert "bad option magic" in log
    assert "unknown client flags" in log
    assert "4294967295 bytes of data; closed" in log


def test_option_errors_and_negotiation_carries_on(served):
    daemon, sid, content = served
    with RawNbd(daemon.nbd) as c:
        c.greet()
        # Unknown options and STARTTLS (no TLS here): NBD_REP_ERR_UNSUP.
        for option in (99, OPT["STARTTLS"], 0x7FFFFFFF):
            c.send_option(option, b"ignored data")
            with pytest.raises(OptionFailed) as exc:
                c.option_replies(option)
            assert exc.value.kind == "UNSUP"
        # Oversized but skippable data: a known option says TOO_BIG, an
        # unknown one UNSUP; the data is skipped and negotiation goes on.
        c.send_option(OPT["LIST"], b"x" * (1 * MiB))
        with pytest.raises(OptionFailed) as exc:
            c.option_replies(OPT["LIST"])
        assert exc.value.kind == "TOO_BIG"
        c.send_option(42, b"y" * (2 * MiB))
        with pytest.raises(OptionFailed) as exc:
            c.option_replies(42)
        assert exc.value.kind == "UNSUP"
        # Syntactically wrong option data: NBD_REP_ERR_INVALID.
        bad = [
            (OPT["LIST"], b"data"),  # LIST takes none
            (OPT["STRUCTURED_REPLY"], b"x"),
            (OPT["GO"], struct.pack(">I", 100) + b"d" + struct.pack(">H", 0)),  # name past end
            (OPT["GO"], RawNbd.info_data("d") + b"\0"),  # trailing byte
            (OPT["INFO"], b"\0\0"),  # too short
            (OPT["GO"], struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0)),  # not UTF-8
            # meta contexts before structured replies were negotiated
            (OPT["SET_META_CONTEXT"], RawNbd.meta_data("d", ["base:allocation"])),
        ]
        for option, data in bad:
            c.send_option(option, data)
            with pytest.raises(OptionFailed) as exc:
                c.option_replies(option)
            assert exc.value.kind == "INVALID", (option, data)
        # No such export: NBD_REP_ERR_UNKNOWN.
        for name in ("nope", f"{sid}/nope", "00000000-0000-0000-0000-000000000000/d", ""):
            with pytest.raises(OptionFailed) as exc:
                c.info(name)
            assert exc.value.kind == "UNKNOWN", name
        # After all that, the same connection negotiates normally.
        assert sorted(c.list_exports()) == sorted(["d", f"{sid}/d"])
        c.structured_reply()
        c.send_option(OPT["SET_META_CONTEXT"], RawNbd.meta_data("d", ["nocolon"]))
        with pytest.raises(OptionFailed) as exc:
            c.option_replies(OPT["SET_META_CONTEXT"])
        assert exc.value.kind == "INVALID"
        listed = c.meta("d", [], set_=False)
        assert sorted(listed) == ["base:allocation", "qemu:dirty-bitmap:blksnap"]
        assert c.meta("d", ["qemu:"], set_=False) == {"qemu:dirty-bitmap:blksnap": 0}
        assert c.meta("d", ["other:thing", "base:"], set_=False) == {"base:allocation": 0}
        # Selecting: exact names only; wildcards select nothing.
        assert c.meta("d", ["base:", "qemu:"]) == {}
        chosen = c.meta("d", ["base:allocation", "qemu:dirty-bitmap:blksnap", "x-foo:bar"])
        assert sorted(chosen) == ["base:allocation", "qemu:dirty-bitmap:blksnap"]
        assert len(set(chosen.values())) == 2
        infos = c.info("d", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE))
        assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (1, 4096, MAX_PAYLOAD)
        assert infos[INFO_NAME] == b"d"
        assert b"blksnap device d" in infos[INFO_DESCRIPTION]
        c.go("d")
        assert c.size == SIZE
        assert c.read(0, 65536) == content[:65536]
        c.disconnect()
        assert c.closed_by_server()
    with RawNbd(daemon.nbd) as c:  # the old way in, without NO_ZEROES: 124 zero bytes
        c.greet(client_flags=1)
        c.send_option(OPT["EXPORT_NAME"], b"d")
        size, flags = struct.unpack(">QH", c.recv_exact(10))
        assert size == SIZE and flags & 1 and not flags & 2
        assert c.recv_exact(124) == bytes(124)
        assert c.read(SIZE - 4096, 4096) == content[-4096:]
        c.disconnect()
        assert c.closed_by_server()
    with RawNbd(daemon.nbd) as c:  # with NO_ZEROES: no padding at all
        c.greet(client_flags=3)
        c.send_option(OPT["EXPORT_NAME"], f"{sid}/d".encode())
        size, flags = struct.unpack(">QH", c.recv_exact(10))
        assert size == SIZE and flags & 2  # the image: read-only
        assert c.read(0, 4096) == content[:4096]
        c.disconnect()
        assert c.closed_by_server()
    with RawNbd(daemon.nbd) as c:  # a soft disconnect before transmission
        c.greet()
        c.send_option(OPT["ABORT"])
        assert c.option_reply()[1] == 1  # NBD_REP_ACK
        assert c.closed_by_server()
    still_serving(daemon, content)


def test_request_errors_per_spec(served):
    daemon, sid, content = served
    image = f"{sid}/d"
    for structured in (False, True):
        with RawNbd(daemon.nbd) as c:
            c.open(image, structured=structured)
            assert c.flags & 2  # NBD_FLAG_READ_ONLY
            assert not c.flags & (1 << 3)  # no FUA on a read-only export
            # Reads past the end: EINVAL, and no data.
            for off, n in ((SIZE - 100, 101), (SIZE, 1), (SIZE + 4096, 4096), (2**63, 512)):
                r = c.call("READ", off, n)
                assert (r.error, r.data) == ("EINVAL", b""), (off, n, r)
            # Over the maximum payload: EINVAL (simple) / EOVERFLOW (structured).
            r = c.call("READ", 0, MAX_PAYLOAD + 1)
            assert r.error == ("EOVERFLOW" if structured else "EINVAL"), r
            # Writes to a read-only export: EPERM (the payload is consumed).
            assert c.write(0, b"x" * 4096).error == "EPERM"
            assert c.call("TRIM", 0, 4096).error == "EPERM"
            assert c.call("WRITE_ZEROES", 0, 4096).error == "EPERM"
            # Unknown command, unknown or unadvertised flags: EINVAL.
            assert c.call(99, 0, 0).error == "EINVAL"
            assert c.call("CACHE", 0, 4096).error == "EINVAL"
            assert c.call("READ", 0, 4096, flags=0x100).error == "EINVAL"
            assert c.call("READ", 0, 4096, flags=FLAG_FUA).error == "EINVAL"
            # Block status without a selected meta context: EINVAL.
            assert c.call("BLOCK_STATUS", 0, 4096).error == "EINVAL"
            # A zero-length read is fine, and the connection is still in sync.
            assert c.call("READ", 0, 0).error == "OK"
            assert c.read(SIZE - 4096, 4096) == content[-4096:]
            if structured:
                r = c.call("READ", SIZE, 1)
                assert r.chunks[-1][0] == 0x8001 and r.message  # NBD_REPLY_TYPE_ERROR + text
            c.disconnect()
            assert c.closed_by_server()
    with RawNbd(daemon.nbd) as c:
        c.open("d", meta=["base:allocation"])
        assert c.flags & (1 << 3) and not c.flags & 2  # FUA, writable
        # Writes past the end: ENOSPC, nothing written.
        assert c.write(SIZE - 10, b"z" * 20).error == "ENOSPC"
        assert c.call("WRITE_ZEROES", SIZE, 512).error == "ENOSPC"
        assert c.call("TRIM", SIZE - 512, 1024).error == "EINVAL"
        assert c.call("BLOCK_STATUS", SIZE - 512, 1024).error == "EINVAL"
        assert c.call("BLOCK_STATUS", 0, 0).error == "EINVAL"
        assert c.call("WRITE_ZEROES", 0, 512, flags=1 << 4).error == "EINVAL"  # FAST_ZERO
        # A write over the maximum payload: refused, the payload skipped.
        cookie = c.request("WRITE", 0, MAX_PAYLOAD + 1, data=b"\xaa" * (MAX_PAYLOAD + 1))
        r = c.reply()
        assert (r.cookie, r.error) == (cookie, "EINVAL")
        assert c.read(0, 4096) == content[:4096]
        # The commands that work, with FUA and NO_HOLE.
        assert c.write(4096, b"\x01" * 8192, flags=FLAG_FUA).error == "OK"
        assert c.call("WRITE_ZEROES", 16384, 4096, flags=FLAG_NO_HOLE | FLAG_FUA).error == "OK"
        assert c.call("TRIM", 20480, 4096).error == "OK"
        assert c.call("FLUSH").error == "OK"
        assert c.read(4096, 8192) == b"\x01" * 8192
        assert c.read(16384, 8192) == bytes(8192)
        extents = c.block_status(0, 3 * 4096, flags=FLAG_REQ_ONE)
        assert list(extents.values()) == [[(3 * 4096, 0)]]
        c.disconnect()
        assert c.closed_by_server()
    # Bad request magic in transmission: a hard disconnect.
    with RawNbd(daemon.nbd) as c:
        c.open("d")
        c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
        assert c.closed_by_server()
    content = content[:4096] + b"\x01" * 8192 + content[12288:16384] + bytes(8192) + content[24576:]
    still_serving(daemon, content)
    with open(os.path.join(daemon.mount, "dev", "d"), "rb") as f:
        assert f.read(32768) == content[:32768]
    assert "bad request magic" in daemon.log_text()


def test_clients_vanishing_mid_request(served):
    daemon, sid, content = served
    # Half a write payload, then gone.
    with RawNbd(daemon.nbd) as c:
        c.open("d")
        c.send(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 1 * MiB) + b"q" * 1000)
    # Half a request header.
    with RawNbd(daemon.nbd) as c:
        c.open(f"{sid}/d")
        c.send(struct.pack(">IHH", 0x25609513, 0, 0))
    # Many large reads in flight, and nobody left to take the replies.
    for structured in (True, False):
        c = RawNbd(daemon.nbd)
        c.open(f"{sid}/d", structured=structured)
        for i in range(40):
            c.request("READ", (i % 8) * MiB, 1 * MiB)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # a reset, not a clean close
    # A client connected to the same device keeps working meanwhile.
    with RawNbd(daemon.nbd) as c:
        c.open("d")
        for _ in range(3):
            assert c.read(3 * MiB, MiB) == content[3 * MiB : 4 * MiB]
        c.disconnect()
    still_serving(daemon, content)
    status = json.loads(daemon.cli("--json", "daemon", "status").stdout)
    assert status["nbd"] == f"unix:{daemon.nbd}"


def test_clients_that_stop_reading_do_not_stall_the_others(served):
    daemon, sid, content = served
    stalled = []
    try:
        for _ in range(6):  # more of them than the server has worker threads
            c = RawNbd(daemon.nbd)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.open(f"{sid}/d")
            for i in range(64):  # 64 MiB of replies that nobody takes
                c.request("READ", (i % 8) * MiB, MiB)
            stalled.append(c)
        with RawNbd(daemon.nbd, timeout=10) as c:
            c.open("d")
            for i in range(20):
                assert c.read(i * 4096, 65536) == content[i * 4096 : i * 4096 + 65536]
            c.disconnect()
        assert daemon.client.status()["nbd_clients"] >= len(stalled)
        # A stalled client that starts reading again gets every reply, whole.
        c = stalled[0]
        got = sorted(c.reply().cookie for _ in range(64))
        assert got == list(range(got[0], got[0] + 64))
    finally:
        for c in stalled:
            c.close()
    still_serving(daemon, content)
