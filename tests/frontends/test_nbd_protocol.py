"""The NBD front-end without blksnapd: its pure protocol pieces, and the
server itself on an in-process engine (no FUSE, no root)."""

from __future__ import annotations

import errno
import itertools
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio

import blksnap
from blksnap.errors import InvalidArgument
from blksnap.frontends import nbd
from blksnap.frontends.nbd import (
    CTX_ALLOCATION,
    CTX_DIRTY,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    Address,
    NbdServer,
    OptionError,
    match_contexts,
    parse_address,
    parse_info_request,
    parse_meta_request,
    runs_to_extents,
)
from blksnap.settings import SETTINGS
from tests.integration.nbd_client import OptionFailed, RawNbd

MiB = 1 << 20

# -- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("unix:/run/x.sock", Address("unix", path="/run/x.sock")),
        ("10809", Address("tcp", host="127.0.0.1", port=10809)),
        (":0", Address("tcp", host="127.0.0.1", port=0)),
        ("localhost:10809", Address("tcp", host="localhost", port=10809)),
        ("192.0.2.7:1", Address("tcp", host="192.0.2.7", port=1)),
        ("[::1]:10809", Address("tcp", host="::1", port=10809)),
    ],
)
def test_parse_address(spec, expected):
    assert parse_address(spec) == expected


def test_parse_address_relative_unix_path_is_made_absolute():
    assert parse_address("unix:x.sock").path == os.path.abspath("x.sock")


@pytest.mark.parametrize(
    "spec",
    ["0.0.0.0:10809", "[::]:10809", "*:1", "0.0.0.0:0", "[0:0::0]:5"],
)
def test_wildcard_needs_allow_any(spec):
    with pytest.raises(InvalidArgument, match="--nbd-any"):
        parse_address(spec)
    assert parse_address(spec, allow_any=True).kind == "tcp"


@pytest.mark.parametrize(
    "spec", ["unix:", "/run/x.sock", "host:port", "host:70000", "::1:10809", "[::1]10809", ""]
)
def test_bad_addresses(spec):
    with pytest.raises(InvalidArgument):
        parse_address(spec)


def test_address_text():
    assert str(Address("tcp", host="::1", port=5)) == "[::1]:5"
    assert str(Address("unix", path="/a")) == "unix:/a"


# -- option data -------------------------------------------------------------------------


def info(name: bytes, reqs: list[int], extra: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(reqs))
        + b"".join(struct.pack(">H", r) for r in reqs)
        + extra
    )


def test_parse_info_request():
    assert parse_info_request(info(b"sid/disk0", [3, 1, 3])) == ("sid/disk0", [3, 1])
    assert parse_info_request(info(b"", [])) == ("", [])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0\0\0",  # shorter than 6
        struct.pack(">I", 10) + b"abc" + b"\0\0",  # name past the end
        info(b"d", [1], b"\0"),  # trailing byte
        info(b"d", [1])[:-1],  # request cut short
        info(b"a\0b", []),  # NUL in the name
        info(b"\xc3\x28", []),  # not UTF-8
    ],
)
def test_parse_info_request_invalid(data):
    with pytest.raises(OptionError) as exc:
        parse_info_request(data)
    assert exc.value.reply == REP_ERR_INVALID


def test_overlong_name_is_too_big():
    with pytest.raises(OptionError) as exc:
        parse_info_request(info(b"n" * 4097, []))
    assert exc.value.reply == REP_ERR_TOO_BIG


def meta(name: bytes, queries: list[bytes], extra: bytes = b"") -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries) + extra


def test_parse_meta_request():
    assert parse_meta_request(meta(b"d", [b"base:allocation", b"qemu:"])) == (
        "d",
        ["base:allocation", "qemu:"],
    )
    assert parse_meta_request(meta(b"", [])) == ("", [])


@pytest.mark.parametrize(
    "data",
    [
        b"\0\0\0\0",
        meta(b"d", [b"base:allocation"])[:-1],  # query cut short
        meta(b"d", [b"x:y"], b"junk"),  # trailing bytes
        struct.pack(">I", 1) + b"d" + struct.pack(">I", 3),  # 3 queries, none sent
        struct.pack(">I", 99) + b"d" + struct.pack(">I", 0),  # name past the end
    ],
)
def test_parse_meta_request_invalid(data):
    with pytest.raises(OptionError) as exc:
        parse_meta_request(data)
    assert exc.value.reply == REP_ERR_INVALID


def test_match_contexts():
    both = [CTX_ALLOCATION, CTX_DIRTY]
    assert match_contexts([], both, listing=True) == both
    assert match_contexts([], both, listing=False) == []
    assert match_contexts(["base:"], both, listing=True) == [CTX_ALLOCATION]
    assert match_contexts(["qemu:"], both, listing=True) == [CTX_DIRTY]
    assert match_contexts(["qemu:dirty-bitmap:"], both, listing=True) == [CTX_DIRTY]
    assert match_contexts(["base:", "qemu:"], both, listing=False) == []
    assert match_contexts(["qemu:dirty-bitmap:other"], both, listing=False) == []
    assert match_contexts(["x-y:z", CTX_DIRTY, CTX_DIRTY], both, listing=False) == [CTX_DIRTY]
    assert match_contexts([CTX_DIRTY], [CTX_ALLOCATION], listing=False) == []
    for bad in ("nocolon", ":leaf"):
        with pytest.raises(OptionError):
            match_contexts([bad], both, listing=True)


# -- extents ----------------------------------------------------------------------------


def test_runs_to_extents_merges_and_clips():
    mask = np.array([True, True, False, False, True], dtype=bool)
    # blocks of 16 bytes starting at block 10: bytes 160..240
    assert runs_to_extents(mask, 10, 4, 165, 235, 1) == [(27, 1), (32, 0), (11, 1)]
    assert runs_to_extents(mask, 10, 4, 160, 240, 1) == [(32, 1), (32, 0), (16, 1)]
    assert runs_to_extents(mask, 10, 4, 160, 240, 1, limit=1) == [(32, 1)]
    assert runs_to_extents(mask[:1], 10, 4, 161, 162, 1) == [(1, 1)]
    assert runs_to_extents(np.zeros(3, dtype=bool), 0, 4, 0, 48, 1) == [(48, 0)]


def test_runs_to_extents_large_map():
    rng = np.random.default_rng(1)
    mask = rng.random(100_000) < 0.5
    ext = runs_to_extents(mask, 0, 16, 0, 100_000 << 16, 1)
    assert sum(n for n, _ in ext) == 100_000 << 16
    rebuilt = np.concatenate([np.full(n >> 16, f == 1) for n, f in ext])
    assert (rebuilt == mask).all()
    assert all(a[1] != b[1] for a, b in itertools.pairwise(ext))


def test_errno_mapping():
    assert nbd.nbd_errno(errno.ENOSPC) == nbd.NBD_ENOSPC
    assert nbd.nbd_errno(errno.EDQUOT) == nbd.NBD_ENOSPC
    assert nbd.nbd_errno(errno.ENOENT) == nbd.NBD_ESHUTDOWN
    assert nbd.nbd_errno(errno.EINVAL) == nbd.NBD_EINVAL
    assert nbd.nbd_errno(errno.EBUSY) == nbd.NBD_EIO
    assert nbd.nbd_errno(None) == nbd.NBD_EIO


def test_reply_framing():
    chunk = nbd.error_chunk(7, nbd.NBD_EINVAL, "bad")
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", chunk[:20])
    assert (magic, flags, rtype, cookie, length) == (0x668E33EF, 1, 0x8001, 7, 9)
    assert chunk[20:] == struct.pack(">IH", 22, 3) + b"bad"
    bs = nbd.block_status_chunk(9, 2, [(4096, 1), (512, 0)], done=False)
    assert struct.unpack(">IHHQI", bs[:20]) == (0x668E33EF, 0, 5, 9, 20)
    assert bs[20:] == struct.pack(">IIIII", 2, 4096, 1, 512, 0)
    rep = nbd.option_reply(7, nbd.REP_ACK)
    assert rep == struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0)


# -- the server, in process ------------------------------------------------------------------


class Served:
    """An NbdServer on a trio loop of its own thread, over a real engine."""

    def __init__(self, engine: blksnap.Engine, sock: str, writable_images: bool = False) -> None:
        self.server = NbdServer(engine, Address("unix", path=sock), writable_images=writable_images)
        self.sock = sock
        self.token: trio.lowlevel.TrioToken | None = None
        self.stop: trio.Event
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.ready.wait(10), self.error

    def _run(self) -> None:
        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            self.stop = trio.Event()
            async with trio.open_nursery() as n:
                await n.start(self.server.serve)
                self.ready.set()
                await self.stop.wait()
                await self.server.close()  # as the daemon does at shutdown

        try:
            trio.run(main)
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def close(self) -> None:
        if self.token is not None and self.thread.is_alive():
            self.token.run_sync_soon(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


@pytest.fixture
def served(engine, make_file, storage_dir, tmp_path: Path) -> Iterator[tuple[Served, str, bytes]]:
    content = os.urandom(4 * MiB)
    engine.add_device(make_file(4 * MiB, "d.img", content), name="d")
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    engine.snapshot_take(sid)
    s = Served(engine, str(tmp_path / "nbd.sock"))
    try:
        yield s, sid, content
    finally:
        s.close()


def test_in_process_read_write_and_shutdown(served, engine):
    s, sid, content = served
    assert oct(os.stat(s.sock).st_mode & 0o777) == "0o600"
    with RawNbd(s.sock) as c:
        assert sorted(c.greet() and c.list_exports()) == sorted(["d", f"{sid}/d"])
        c.structured_reply()
        c.go("d")
        assert c.write(MiB, b"\x11" * 5000).error == "OK"
        assert (
            c.read(MiB - 10, 5020)
            == content[MiB - 10 : MiB] + b"\x11" * 5000 + content[MiB + 5000 : MiB + 5010]
        )
        assert s.server.device_users("d") == 1
        c.disconnect()
        assert c.closed_by_server()
    with RawNbd(s.sock) as c:  # the image kept the data of take time
        c.open(f"{sid}/d")
        assert c.read(MiB, 5000) == content[MiB : MiB + 5000]
        engine.snapshot_destroy(sid)
        r = c.call("READ", 0, 512)
        assert r.error == "ESHUTDOWN", r
    # Shutdown: requests the server has taken are answered, then the
    # connection closes. The 32 requests go out in one send, so the reader
    # takes them in one receive: once the first reply is back, all are in.
    c = RawNbd(s.sock)
    c.open("d")
    batch: list[bytes] = []
    c.send = batch.append  # type: ignore[method-assign]
    cookies = [c.request("READ", i * 65536, 65536) for i in range(32)]
    del c.send
    c.send(b"".join(batch))
    first = c.reply(65536)
    s.close()
    got = sorted([first.cookie] + [c.reply(65536).cookie for _ in cookies[1:]])
    assert got == sorted(cookies)
    assert c.closed_by_server()
    c.close()
    assert not os.path.exists(s.sock)


def test_in_process_withdrawn_device_and_missing_export(served):
    s, _sid, _content = served
    with s.server.withdrawn("d"), RawNbd(s.sock) as c:
        c.greet()
        with pytest.raises(OptionFailed) as exc:
            c.go("d")
        assert exc.value.kind == "UNKNOWN"
        assert c.list_exports() == [f"{_sid}/d"]
    with RawNbd(s.sock) as c:
        c.open("d")
        c.disconnect()


def test_slow_reads_go_to_the_worker_pool(served, monkeypatch):
    """Quick reads are served by the connection's reader thread; once most
    recent ones are slow (a disk), the shared workers serve them, several at
    once, and the replies are still whole and right."""
    s, sid, content = served
    readers: list[str] = []
    real_read = nbd.ImageExport.read
    slow = threading.Event()

    def read(self, offset, length):
        readers.append(threading.current_thread().name)
        if slow.is_set():
            threading.Event().wait(SETTINGS.nbd_slow_io * 3)
        return real_read(self, offset, length)

    monkeypatch.setattr(nbd.ImageExport, "read", read)
    with RawNbd(s.sock) as c:
        c.open(f"{sid}/d")
        for i in range(4):
            assert c.read(i * 4096, 4096) == content[i * 4096 : (i + 1) * 4096]
        assert all(name.startswith("blksnap-nbd-conn-") for name in readers)
        slow.set()
        for i in range(3 * SETTINGS.nbd_slow_score):
            assert c.read(i * 4096, 4096) == content[i * 4096 : (i + 1) * 4096]
        assert any(not name.startswith("blksnap-nbd-conn-") for name in readers[-4:])
        slow.clear()
        del readers[:]
        cookies = {c.request("READ", i * 65536, 65536): i for i in range(32)}
        for _ in cookies:
            r = c.reply(65536)
            i = cookies[r.cookie]
            assert r.data == content[i * 65536 : (i + 1) * 65536]
        for i in range(3 * SETTINGS.nbd_slow_score):
            assert c.read(i * 4096, 4096) == content[i * 4096 : (i + 1) * 4096]
        assert readers[-1].startswith("blksnap-nbd-conn-")  # quick again: back to the reader
        c.disconnect()


# -- TRIM, WRITE_ZEROES and base:allocation ---------------------------------------------


def test_trim_and_write_zeroes_deallocate_and_allocation_reports_holes(
    engine, make_file, storage_dir, tmp_path
):
    """On a device export TRIM punches holes in the backing file, and so
    does WRITE_ZEROES unless NO_HOLE; base:allocation reports the backing
    file's holes (HOLE|ZERO = 3) on the device and, on the image, holes for
    chunks still on the device that were holes at take and data for chunks
    copied to diff storage."""
    size = 8 * MiB
    content = os.urandom(4 * MiB)  # data in the first half, a hole after
    path = make_file(size, "a.img", content)
    engine.add_device(path, name="a")
    s = Served(engine, str(tmp_path / "nbd.sock"))
    hole = nbd.STATE_HOLE | nbd.STATE_ZERO
    try:
        with RawNbd(s.sock) as c:
            c.open("a", meta=[CTX_ALLOCATION])
            assert c.flags & nbd.FLAG_SEND_TRIM and c.flags & nbd.FLAG_SEND_WRITE_ZEROES
            assert c.block_status(0, size) == {1: [(4 * MiB, 0), (4 * MiB, hole)]}
            assert c.block_status(0, size, flags=nbd.CMD_FLAG_REQ_ONE) == {1: [(4 * MiB, 0)]}
            # (give or take the file system's extent blocks: 64 KiB)
            slack = 64 * 1024 // 512
            blocks = os.stat(path).st_blocks
            assert c.call("TRIM", 1 * MiB, 1 * MiB).error == "OK"
            assert os.stat(path).st_blocks <= blocks - MiB // 512 + slack
            blocks = os.stat(path).st_blocks
            r = c.call("WRITE_ZEROES", 2 * MiB, 1 * MiB, flags=nbd.CMD_FLAG_NO_HOLE)
            assert r.error == "OK"
            # NO_HOLE: stays allocated
            assert blocks <= os.stat(path).st_blocks <= blocks + slack
            assert c.call("WRITE_ZEROES", 3 * MiB, 1 * MiB).error == "OK"
            assert os.stat(path).st_blocks <= blocks - MiB // 512 + slack
            assert c.read(MiB, 3 * MiB) == bytes(3 * MiB)
            assert c.read(0, MiB) == content[:MiB]
            ext = c.block_status(0, size)[1]
            assert ext[0] == (MiB, 0) and ext[1] == (MiB, hole) and ext[-1][1] == hole
            assert sum(n for n, _ in ext) == size
            assert c.block_status(MiB + 5, 100) == {1: [(100, hole)]}
            c.disconnect()
        sid = engine.snapshot_create(["a"], storage=storage_dir, limit=16 * MiB)
        engine.snapshot_take(sid)
        cs = engine.image(sid, "a").diff_area.chunk_size
        dev = engine.device("a")
        dev.write(6 * MiB, b"x" * cs)  # a hole chunk copied: data in the image
        with RawNbd(s.sock) as c:
            c.open(f"{sid}/a", meta=[CTX_ALLOCATION])
            assert c.block_status(5 * MiB, 2 * MiB) == {1: [(MiB, hole), (cs, 0), (MiB - cs, hole)]}
            assert c.block_status(MiB, MiB) == {1: [(MiB, hole)]}
            c.disconnect()
        engine.snapshot_destroy(sid)
    finally:
        s.close()


class _Pattern(blksnap.Filter):
    """Serves every read itself (0xAB bytes): the backing store's holes are
    not what a client reads."""

    name = "pattern"
    altitude = 150

    def submit(self, bio):
        if bio.op == blksnap.Op.READ:
            bio.result = b"\xab" * bio.length
            return blksnap.FilterResult.SKIP
        return blksnap.FilterResult.PASS


def test_allocation_is_all_data_under_a_filter_that_serves_reads(engine, make_file, tmp_path):
    engine.add_device(make_file(4 * MiB, "p.img"), name="p")  # all hole
    engine.register_filter(_Pattern)
    engine.attach("p", "pattern")
    s = Served(engine, str(tmp_path / "nbd.sock"))
    try:
        with RawNbd(s.sock) as c:
            c.open("p", meta=[CTX_ALLOCATION])
            assert c.read(0, 4096) == b"\xab" * 4096
            assert c.block_status(0, 4 * MiB) == {1: [(4 * MiB, 0)]}
            c.disconnect()
        engine.detach("p", "pattern")
        with RawNbd(s.sock) as c:
            c.open("p", meta=[CTX_ALLOCATION])
            assert c.block_status(0, 4 * MiB) == {1: [(4 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO)]}
            c.disconnect()
    finally:
        s.close()
