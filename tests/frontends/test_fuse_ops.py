"""Every FUSE operation of our own session, through real syscalls on a mount
(and, where the kernel never sends it to a fuse mount or cannot be made to
send it malformed, on ``handle()`` and the serving loop without one).

The session under test is a :class:`FuseSession` that records every request
it answered (opcode, unique, decoded arguments, the errno of its reply), so
each test checks both what the caller saw and what crossed /dev/fuse.
Mounts, threads and child processes are undone in ``finally``."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blksnap.frontends import fuse_proto as p
from blksnap.frontends import fuse_session
from blksnap.frontends.fuse_session import FuseSession, NullBacking, Tree
from tests.conftest import needs_fuse

MiB = 1 << 20
SIZE = 16 * MiB
FUSE_INT_REQ_BIT = 1  # fuse.h: the unique of an INTERRUPT is its request's | 1
FUSE_NOTIFY_DELETE = 6
FUSE_FSYNC_FDATASYNC = 1
FATTR_MODE, FATTR_UID, FATTR_GID = 1 << 0, 1 << 1, 1 << 2
FATTR_ATIME, FATTR_MTIME = 1 << 4, 1 << 5
FALLOC_FL_COLLAPSE_RANGE = 0x08

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate knows only mode 0)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- backings and a session that records what it answered --------------------


class MemBacking:
    """A file in memory that records what reached it."""

    def __init__(self, size: int = SIZE, fill: int = 0) -> None:
        self.size = size
        self.data = bytearray([fill]) * size
        self.lock = threading.Lock()
        self.flushes = 0
        self.flush_error: int | None = None
        self.writes: list[tuple[int, int]] = []
        self.fallocates: list[tuple[int, int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: memoryview) -> None:
        with self.lock:
            self.data[offset : offset + len(data)] = data
            self.writes.append((offset, len(data)))

    def flush(self) -> None:
        if self.flush_error is not None:
            raise OSError(self.flush_error, os.strerror(self.flush_error))
        with self.lock:
            self.flushes += 1

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        with self.lock:
            self.fallocates.append((mode, offset, length))
            if mode & (p.FALLOC_FL_PUNCH_HOLE | p.FALLOC_FL_ZERO_RANGE):
                end = min(offset + length, self.size)
                self.data[offset:end] = bytes(max(0, end - offset))


class NoFallocate:
    """A backing without ``fallocate``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: memoryview) -> None:
        pass

    def flush(self) -> None:
        pass


class BlockingBacking(NullBacking):
    """Reads wait until :attr:`go` is set; :attr:`entered` counts reads
    that started waiting."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.go = threading.Event()
        self.entered = threading.Semaphore(0)

    def read(self, offset: int, length: int) -> bytes:
        self.entered.release()
        self.go.wait(30)
        return b"\xab" * length


class Seen(dict):
    """One answered request: ``op``, ``unique``, ``nodeid``, ``args``, ``err``
    (the reply's errno, 0 for success, None for no reply)."""


class RecordingSession(FuseSession):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[Seen] = []
        self._seen_lock = threading.Lock()

    def handle(self, raw: memoryview) -> list[bytes] | None:
        _, op, unique, nodeid = struct.unpack_from("<IIQQ", raw)
        try:
            args = p.decode(raw).args
        except p.ProtocolError:
            args = None
        out = super().handle(raw)
        err = None if out is None else -struct.unpack_from("<i", out[0], 4)[0]
        with self._seen_lock:
            self.seen.append(Seen(op=op, unique=unique, nodeid=nodeid, args=args, err=err))
        return out

    def requests(self, op: int | None = None) -> list[Seen]:
        with self._seen_lock:
            return [s for s in self.seen if op is None or s["op"] == op]

    def ops(self) -> list[int]:
        return [s["op"] for s in self.requests()]

    def clear(self) -> None:
        with self._seen_lock:
            self.seen.clear()

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@contextlib.contextmanager
def served(
    tmp_path: Path, files: dict[str, Any], threads: int = 2, timeout: float = 0.0
) -> Iterator[tuple[RecordingSession, Path]]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = Tree()
    for path, backing in files.items():
        if backing is None:
            tree.add_dir(path)
        else:
            tree.add_file(path, backing)
    session = RecordingSession(tree, str(mnt), threads=threads, timeout=timeout)
    try:
        session.mount()
        yield session, mnt
    finally:
        for b in files.values():  # nothing may stay blocked in a reader thread
            if isinstance(b, BlockingBacking):
                b.go.set()
        session.close()
        assert not session.threads and not session.fds
        assert not mounted(mnt)


@contextlib.contextmanager
def opened(path: Path | str, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def raises_errno(err: int, fn: Callable[..., object], *args: object) -> None:
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, (errno.errorcode.get(e.value.errno), errno.errorcode[err])


# --- without a mount ------------------------------------------------------------


def raw_request(opcode: int, body: bytes = b"", unique: int = 0x10, nodeid: int = 1) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def reply_of(session: FuseSession, raw: bytes) -> bytes | None:
    out = session.handle(memoryview(raw))
    return None if out is None else b"".join(out)


def test_destroy_answered_without_a_mount() -> None:
    """DESTROY only comes to fuseblk mounts (on unmount): answered with an
    empty success, like RELEASE, and nothing else changes."""
    tree = Tree()
    tree.add_file("disk", MemBacking(MiB))
    s = FuseSession(tree, "/nonexistent")
    assert reply_of(s, raw_request(p.Opcode.DESTROY, unique=0x77)) == struct.pack(
        "<IiQ", 16, 0, 0x77
    )
    assert s.errors == 0 and tree.lookup("disk") is not None


@pytest.mark.parametrize(
    "opcode",
    [0, 5, 7, 9, 10, 12, 21, 22, 30, 37, 39, 40, 44, 46, 47, 50, 51, 52, 53, 4096, 0xFFFFFFFF],
)
def test_unknown_and_unserved_opcodes_get_enosys(opcode: int) -> None:
    tree = Tree()
    tree.add_file("disk", MemBacking(MiB))
    s = FuseSession(tree, "/nonexistent")
    out = reply_of(s, raw_request(opcode, bytes(64), unique=0x99, nodeid=2))
    assert out == struct.pack("<IiQ", 16, -errno.ENOSYS, 0x99)
    assert s.errors == 0  # ENOSYS is an answer, not a failure


def test_every_served_opcode_reply_is_well_formed() -> None:
    """``handle()`` on one request of each served opcode: the out-header's
    length is the whole reply, the unique is the request's, and the payload
    is the fuse.h structure of that opcode."""
    tree = Tree()
    mem = MemBacking(MiB, fill=0x5A)
    disk = tree.add_file("disk", mem)
    sub = tree.add_dir("sub")
    s = FuseSession(tree, "/nonexistent", timeout=2.5)
    rw = struct.pack("<QQIIQI4x", disk.nodeid, 4096, 512, 0, 0, 0)
    Op = p.Opcode
    cases: list[tuple[int, bytes, int, int, int | None]] = [
        # opcode, body, nodeid, errno, payload size (None: any)
        (Op.LOOKUP, b"disk\0", 1, 0, 128),
        (Op.LOOKUP, b"nope\0", 1, errno.ENOENT, 0),
        (Op.GETATTR, struct.pack("<IIQ", 0, 0, 0), disk.nodeid, 0, 104),
        (Op.GETATTR, struct.pack("<IIQ", 0, 0, 0), 999, errno.ENOENT, 0),
        (Op.SETATTR, struct.pack("<IIQQ64x", p.FATTR_SIZE, 0, 0, MiB), disk.nodeid, 0, 104),
        (
            Op.SETATTR,
            struct.pack("<IIQQ64x", p.FATTR_SIZE, 0, 0, 4096),
            disk.nodeid,
            errno.EINVAL,
            0,
        ),
        (Op.SETATTR, struct.pack("<IIQQ64x", p.FATTR_SIZE, 0, 0, 0), sub.nodeid, errno.EINVAL, 0),
        (Op.OPEN, struct.pack("<II", os.O_RDWR, 0), disk.nodeid, 0, 16),
        (Op.OPEN, struct.pack("<II", os.O_RDONLY, 0), sub.nodeid, errno.EISDIR, 0),
        (Op.OPENDIR, struct.pack("<II", 0, 0), sub.nodeid, 0, 16),
        (Op.OPENDIR, struct.pack("<II", 0, 0), disk.nodeid, errno.ENOTDIR, 0),
        (Op.READ, rw, disk.nodeid, 0, 512),
        (Op.WRITE, rw + b"w" * 512, disk.nodeid, 0, 8),
        (Op.STATFS, b"", 1, 0, 80),
        (Op.RELEASE, struct.pack("<QIIQ", disk.nodeid, 0, 0, 0), disk.nodeid, 0, 0),
        (Op.FSYNC, struct.pack("<QI4x", disk.nodeid, 0), disk.nodeid, 0, 0),
        (Op.FLUSH, struct.pack("<QIIQ", disk.nodeid, 0, 0, 0), disk.nodeid, 0, 0),
        (Op.READDIR, struct.pack("<QQIIQI4x", 1, 0, 4096, 0, 0, 0), 1, 0, None),
        (Op.RELEASEDIR, struct.pack("<QIIQ", 1, 0, 0, 0), 1, 0, 0),
        (Op.ACCESS, struct.pack("<I4x", os.R_OK | os.W_OK), disk.nodeid, 0, 0),
        (Op.INTERRUPT, struct.pack("<Q", 0x40), 0, errno.ENOSYS, 0),
        (Op.DESTROY, b"", 0, 0, 0),
        (Op.FALLOCATE, struct.pack("<QQQI4x", disk.nodeid, 0, 4096, 3), disk.nodeid, 0, 0),
        (
            Op.FALLOCATE,
            struct.pack("<QQQI4x", disk.nodeid, MiB, 4096, 0),
            disk.nodeid,
            errno.ENOSPC,
            0,
        ),
    ]
    for i, (op, body, nodeid, err, size) in enumerate(cases):
        unique = 0x100 + 2 * i
        out = reply_of(s, raw_request(op, body, unique, nodeid))
        assert out is not None, p.Opcode(op).name
        length, neg, uq = struct.unpack_from("<IiQ", out)
        what = f"{p.Opcode(op).name} #{i}"
        assert (length, uq) == (len(out), unique), what
        assert -neg == err, (what, errno.errorcode.get(-neg))
        if size is not None:
            assert len(out) - 16 == size, what
    for op, body in ((Op.FORGET, struct.pack("<Q", 1)),
                     (Op.BATCH_FORGET, struct.pack("<I4xQQ", 1, disk.nodeid, 1))):  # fmt: skip
        assert reply_of(s, raw_request(op, body, 0x500, disk.nodeid)) is None
    # What the replies carried.
    names = [d[2] for d in p.parse_dirents(reply_of(s, raw_request(
        Op.READDIR, struct.pack("<QQIIQI4x", 1, 0, 4096, 0, 0, 0), 0x600, 1))[16:])]  # fmt: skip
    assert names == [b".", b"..", b"disk", b"sub"]
    assert mem.read(4096, 512) == b"w" * 512 and mem.flushes == 1
    assert mem.fallocates == [(3, 0, 4096)]
    ent = reply_of(s, raw_request(Op.LOOKUP, b"disk\0", 0x700, 1))
    nodeid, gen, ev, av, evn, avn = struct.unpack_from("<QQQQII", ent, 16)
    assert (nodeid, gen, ev, av, evn, avn) == (disk.nodeid, 0, 2, 2, 500_000_000, 500_000_000)
    ino, size = struct.unpack_from("<QQ", ent, 16 + 40)
    assert (ino, size) == (disk.nodeid, MiB)
    opened_ = reply_of(s, raw_request(Op.OPEN, struct.pack("<II", 0, 0), 0x800, disk.nodeid))
    fh, flags = struct.unpack_from("<QI", opened_, 16)
    assert fh == disk.nodeid
    assert flags == p.FOPEN_DIRECT_IO | p.FOPEN_PARALLEL_DIRECT_WRITES
    # Counted as failures: the two EINVALs, EISDIR, ENOTDIR and ENOSPC; not
    # ENOENT (a lookup miss) nor ENOSYS.
    assert s.errors == 5


class _FakeOs:
    """What the serving loop sees as ``os``: reads come from ``messages``
    (each cut to the buffer, as a read of /dev/fuse would), then ENODEV
    (the connection ended); every write is kept."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = list(messages)
        self.written: list[bytes] = []

    def readv(self, fd: int, buffers: list[bytearray]) -> int:
        if not self.messages:
            raise OSError(errno.ENODEV, "connection ended")
        msg, buf = self.messages.pop(0), buffers[0]
        n = min(len(msg), len(buf))
        buf[:n] = msg[:n]
        return n

    def writev(self, fd: int, buffers: list[bytes]) -> int:
        data = b"".join(buffers)
        self.written.append(data)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_serving_loop_answers_malformed_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader loop on requests short, long and oversized: a request too
    short to carry a unique is dropped, one the decoder refuses is answered
    EINVAL with its unique, and the loop goes on serving."""
    tree = Tree()
    mem = MemBacking(MiB)
    disk = tree.add_file("disk", mem)
    s = FuseSession(tree, "/nonexistent", max_write=64 * 1024)
    bufsize = s._bufsize
    assert bufsize >= 64 * 1024 + p.WRITE_HEADROOM and bufsize >= p.MIN_READ_BUFFER
    full = b"F" * (64 * 1024)
    wr_full = struct.pack("<QQIIQI4x", disk.nodeid, 0, len(full), 0, 0, 0) + full
    big = bytes(bufsize)  # a WRITE bigger than the read buffer: cut at the buffer
    wr_big = struct.pack("<QQIIQI4x", disk.nodeid, MiB // 2, len(big), 0, 0, 0) + big
    messages = [
        b"\x01" * 39,  # shorter than the in-header: no unique to answer
        raw_request(p.Opcode.GETATTR, bytes(16), 0x21, disk.nodeid)[:48],  # < its length
        raw_request(p.Opcode.FSYNC, bytes(7), 0x22, disk.nodeid),  # args too short
        raw_request(p.Opcode.WRITE, wr_big, 0x23),  # oversized, cut by the buffer
        raw_request(p.Opcode.WRITE, wr_full, 0x24),  # max_write exactly: served
        raw_request(p.Opcode.GETATTR, bytes(16), 0x25, disk.nodeid) + b"junk",  # longer
        raw_request(1234, bytes(8), 0x26),  # unknown
        raw_request(p.Opcode.FORGET, struct.pack("<Q", 1), 0x27, disk.nodeid),  # no reply
        raw_request(p.Opcode.STATFS, b"", 0x28),
    ]
    fake = _FakeOs(messages)
    monkeypatch.setattr(fuse_session, "os", fake)
    s._serve(-1)  # returns at ENODEV
    got = [(*struct.unpack_from("<IiQ", w), len(w)) for w in fake.written]
    assert got == [
        (16, -errno.EINVAL, 0x21, 16),
        (16, -errno.EINVAL, 0x22, 16),
        (16, -errno.EINVAL, 0x23, 16),
        (24, 0, 0x24, 24),
        (120, 0, 0x25, 120),
        (16, -errno.ENOSYS, 0x26, 16),
        (96, 0, 0x28, 96),
    ]
    assert mem.read(0, len(full)) == full  # the largest write arrived whole
    assert mem.writes == [(0, len(full))]  # and the oversized one not at all


# --- with a mount -----------------------------------------------------------------


@needs_fuse
def test_lookup_getattr_stat_lstat_fstat(tmp_path: Path) -> None:
    mem = MemBacking()
    with served(tmp_path, {"disk": mem, "d": None}) as (s, mnt):
        disk = s.tree.lookup("disk")
        assert disk is not None
        for fn in (os.stat, os.lstat):
            st = fn(mnt / "disk")
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert (st.st_size, st.st_ino, st.st_nlink) == (SIZE, disk.nodeid, 1)
            assert st.st_blocks == SIZE // 512 and st.st_mtime == s.tree.time
        st = os.stat(mnt / "d")
        assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2 and st.st_size == 0
        raises_errno(errno.ENOENT, os.stat, mnt / "nope")
        misses = [r for r in s.requests(p.Opcode.LOOKUP) if r["err"] == errno.ENOENT]
        assert [r["args"].name for r in misses] == [b"nope"]
        with opened(mnt / "disk", os.O_RDONLY) as fd:
            s.clear()
            assert os.fstat(fd).st_size == SIZE
            (g,) = s.requests(p.Opcode.GETATTR)  # timeout 0: asked every time
            assert (g["nodeid"], g["err"]) == (disk.nodeid, 0)
        assert s.errors == 0


@needs_fuse
def test_setattr_size_refused_other_attributes_ignored(tmp_path: Path) -> None:
    mem = MemBacking(fill=0x11)
    with served(tmp_path, {"disk": mem}) as (s, mnt):
        path = mnt / "disk"
        raises_errno(errno.EINVAL, os.truncate, path, SIZE - 4096)
        raises_errno(errno.EINVAL, os.truncate, path, SIZE + 4096)
        raises_errno(errno.EINVAL, os.truncate, path, 0)
        os.truncate(path, SIZE)  # the same size: nothing to change
        sizes = [(r["args"].size, r["err"]) for r in s.requests(p.Opcode.SETATTR)]
        assert sizes == [(SIZE - 4096, errno.EINVAL), (SIZE + 4096, errno.EINVAL),
                         (0, errno.EINVAL), (SIZE, 0)]  # fmt: skip
        with opened(path, os.O_RDWR) as fd:
            raises_errno(errno.EINVAL, os.ftruncate, fd, 4096)
        # O_TRUNC is a truncation to 0: the open fails, the data stays.
        raises_errno(errno.EINVAL, os.open, path, os.O_WRONLY | os.O_TRUNC)
        assert mem.data == bytearray([0x11]) * SIZE and not mem.writes
        # chmod, chown and utime are answered with the attributes unchanged:
        # they succeed and change nothing.
        s.clear()
        os.chmod(path, 0o644)
        os.chown(path, 1234, 5678)
        os.utime(path, (1_000_000, 2_000_000))
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)
        assert st.st_mtime == s.tree.time and st.st_size == SIZE
        valid = [r["args"].valid for r in s.requests(p.Opcode.SETATTR)]
        assert len(valid) == 3 and all(r["err"] == 0 for r in s.requests(p.Opcode.SETATTR))
        assert valid[0] & FATTR_MODE and valid[1] & (FATTR_UID | FATTR_GID)
        assert valid[2] & (FATTR_ATIME | FATTR_MTIME) == FATTR_ATIME | FATTR_MTIME
        assert not any(v & p.FATTR_SIZE for v in valid)
        assert s.errors == 5  # the five refused size changes


@needs_fuse
def test_open_is_direct_io_read_write_flush_release(tmp_path: Path) -> None:
    mem = MemBacking()
    with served(tmp_path, {"disk": mem}) as (s, mnt):
        path = mnt / "disk"
        disk = s.tree.lookup("disk")
        assert disk is not None
        # Without O_DIRECT too, no page cache: a buffered write reaches the
        # backing at once, at its own offset and size.
        with opened(path, os.O_RDWR) as fd:
            assert os.pwrite(fd, b"hello", 12345) == 5
            assert mem.writes == [(12345, 5)] and mem.read(12345, 5) == b"hello"
            mem.write(12345, memoryview(b"HELLO"))  # changed under it: seen at once
            assert os.pread(fd, 5, 12345) == b"HELLO"
            (o,) = s.requests(p.Opcode.OPEN)
            assert o["args"].flags & os.O_ACCMODE == os.O_RDWR
        # O_DIRECT, page-aligned, 1 MiB requests whole.
        buf = mmap.mmap(-1, 2 * MiB)
        back = mmap.mmap(-1, 2 * MiB)
        try:
            buf.write(os.urandom(2 * MiB))
            mem.writes.clear()
            with opened(path, os.O_RDWR | os.O_DIRECT) as fd:
                assert os.pwritev(fd, [buf], 4 * MiB) == 2 * MiB
                assert sorted(mem.writes) == [(4 * MiB, MiB), (5 * MiB, MiB)]
                assert os.preadv(fd, [back], 4 * MiB) == 2 * MiB
                assert back[:] == buf[:] == mem.read(4 * MiB, 2 * MiB)
                assert os.pread(fd, 4096, SIZE) == b""  # at the end
                raises_errno(errno.ENOSPC, os.pwrite, fd, buf[:4096], SIZE)
                reads = [r["args"] for r in s.requests(p.Opcode.READ)]
                assert any(r.offset == 4 * MiB and r.size == MiB for r in reads)
                s.clear()
        finally:
            buf.close()
            back.close()
        # close: FLUSH, then RELEASE (sent in the background) of that handle
        assert s.wait_for(lambda: s.requests(p.Opcode.RELEASE))
        flush, release = s.requests(p.Opcode.FLUSH), s.requests(p.Opcode.RELEASE)
        assert len(flush) == len(release) == 1
        assert flush[0]["args"].fh == release[0]["args"].fh == disk.nodeid
        assert s.ops() == [p.Opcode.FLUSH, p.Opcode.RELEASE]
        assert s.errors == 1  # the write past the end


@needs_fuse
def test_fsync_and_fdatasync_reach_the_backing(tmp_path: Path) -> None:
    mem = MemBacking()
    with served(tmp_path, {"disk": mem}) as (s, mnt), opened(mnt / "disk", os.O_RDWR) as fd:
        os.fsync(fd)
        os.fdatasync(fd)
        assert mem.flushes == 2
        assert [r["args"].fsync_flags for r in s.requests(p.Opcode.FSYNC)] == [
            0,
            FUSE_FSYNC_FDATASYNC,
        ]
        # A backing that cannot flush: the caller sees its errno.
        mem.flush_error = errno.EIO
        raises_errno(errno.EIO, os.fsync, fd)
        raises_errno(errno.EIO, os.fdatasync, fd)
        assert mem.flushes == 2 and s.errors == 2


@needs_fuse
def test_opendir_readdir_releasedir(tmp_path: Path) -> None:
    files = {f"d/f{i:03d}-{'x' * (40 + i % 40)}": NullBacking(4096) for i in range(600)}
    with served(tmp_path, {"disk": MemBacking(), **files, "d/sub": None}) as (s, mnt):
        s.clear()
        with os.scandir(mnt / "d") as it:
            entries = {e.name: e.is_dir(follow_symlinks=False) for e in it}
        want = {name.split("/")[1]: False for name in files} | {"sub": True}
        assert entries == want
        # The types came with the entries (DT_REG / DT_DIR): no LOOKUP each.
        assert p.Opcode.LOOKUP not in [r["op"] for r in s.requests() if r["nodeid"] != 1]
        assert s.wait_for(lambda: s.requests(p.Opcode.RELEASEDIR))
        (od,) = s.requests(p.Opcode.OPENDIR)
        readdirs = s.requests(p.Opcode.READDIR)
        # 603 entries of about 100 bytes: more than one buffer of the
        # kernel's, each READDIR going on where the last one stopped, the
        # last one past the end (empty).
        offsets = [r["args"].offset for r in readdirs]
        assert len(readdirs) >= 3 and offsets[0] == 0 and offsets[-1] == 603
        assert offsets == sorted(set(offsets))
        assert len(s.requests(p.Opcode.RELEASEDIR)) == 1
        assert all(r["err"] == 0 for r in [*readdirs, od])
        # A directory cannot be opened as a file, nor a file listed.
        raises_errno(errno.EISDIR, os.open, mnt / "d", os.O_RDWR)
        raises_errno(errno.ENOTDIR, os.listdir, mnt / "disk")


@needs_fuse
def test_statfs(tmp_path: Path) -> None:
    with served(tmp_path, {"disk": MemBacking(), "d/small": NullBacking(100)}) as (s, mnt):
        st = os.statvfs(mnt)
        # blocks: each file's size in 4 KiB blocks; files: every node
        assert (st.f_bsize, st.f_frsize, st.f_namemax) == (4096, 4096, 255)
        assert (st.f_blocks, st.f_bfree, st.f_bavail) == (SIZE // 4096 + 1, 0, 0)
        assert (st.f_files, st.f_ffree) == (4, 0)
        assert [r["err"] for r in s.requests(p.Opcode.STATFS)] == [0]


@needs_fuse
def test_access(tmp_path: Path) -> None:
    with served(tmp_path, {"disk": MemBacking()}) as (s, mnt):
        for mode in (os.F_OK, os.R_OK, os.W_OK, os.R_OK | os.W_OK, os.X_OK):
            assert os.access(mnt / "disk", mode)
        masks = [r["args"].mask for r in s.requests(p.Opcode.ACCESS)]
        # Every mask is asked and granted (the mode bits are not checked:
        # no default_permissions, and this server allows everything).
        assert masks == [0, os.R_OK, os.W_OK, os.R_OK | os.W_OK, os.X_OK]
        assert not os.access(mnt / "nope", os.F_OK)


@needs_fuse
def test_fallocate_punch_zero_allocate_unsupported(tmp_path: Path) -> None:
    mem = MemBacking(fill=0xEE)
    files = {"disk": mem, "plain": NoFallocate(MiB)}
    with served(tmp_path, files) as (s, mnt), opened(mnt / "disk", os.O_RDWR) as fd:
        keep = p.FALLOC_FL_KEEP_SIZE
        fallocate(fd, keep | p.FALLOC_FL_PUNCH_HOLE, MiB, 2 * MiB)
        fallocate(fd, p.FALLOC_FL_ZERO_RANGE, 8 * MiB, 4096)
        fallocate(fd, keep | p.FALLOC_FL_ZERO_RANGE, 9 * MiB + 512, 1000)
        fallocate(fd, 0, 0, SIZE)  # allocate all of it: nothing to change
        fallocate(fd, keep, SIZE - 4096, 2 * MiB)  # past the end, size kept
        assert mem.fallocates == [
            (keep | p.FALLOC_FL_PUNCH_HOLE, MiB, 2 * MiB),
            (p.FALLOC_FL_ZERO_RANGE, 8 * MiB, 4096),
            (keep | p.FALLOC_FL_ZERO_RANGE, 9 * MiB + 512, 1000),
            (0, 0, SIZE),
            (keep, SIZE - 4096, 2 * MiB),
        ]
        assert os.pread(fd, 2 * MiB, MiB) == bytes(2 * MiB)
        assert os.pread(fd, 4, MiB - 4) == b"\xee" * 4 and os.pread(fd, 4, 3 * MiB) == b"\xee" * 4
        assert os.pread(fd, 4096, 8 * MiB) == bytes(4096)
        assert os.pread(fd, 1002, 9 * MiB + 511) == b"\xee" + bytes(1000) + b"\xee"
        assert os.fstat(fd).st_size == SIZE
        # Growing the file: refused by the server, nothing reaches the backing.
        raises_errno(errno.ENOSPC, fallocate, fd, 0, SIZE - 4096, 8192)
        # Modes the kernel does not pass on to FUSE: refused before a request.
        before = len(s.requests(p.Opcode.FALLOCATE))
        raises_errno(errno.EOPNOTSUPP, fallocate, fd, FALLOC_FL_COLLAPSE_RANGE, 0, MiB)
        raises_errno(errno.EOPNOTSUPP, fallocate, fd, p.FALLOC_FL_PUNCH_HOLE, 0, MiB)
        assert len(s.requests(p.Opcode.FALLOCATE)) == before
        assert len(mem.fallocates) == 5
        # A backing without fallocate: EOPNOTSUPP from the server.
        with opened(mnt / "plain", os.O_RDWR) as pfd:
            raises_errno(errno.EOPNOTSUPP, fallocate, pfd, keep | p.FALLOC_FL_PUNCH_HOLE, 0, 4096)
        assert s.requests(p.Opcode.FALLOCATE)[-1]["err"] == errno.EOPNOTSUPP
        assert s.errors == 2


@needs_fuse
def test_namespace_changes_and_the_rest_refused_with_enosys(tmp_path: Path) -> None:
    """Everything else is answered ENOSYS. What the caller sees is the
    kernel's translation: namespace changes keep ENOSYS, link says EPERM,
    xattrs EOPNOTSUPP; and some the kernel then stops asking."""
    with served(tmp_path, {"disk": MemBacking(), "d/f": NullBacking(4096)}) as (s, mnt):
        nodes = set(s.tree.nodes)
        cases: list[tuple[int, int, Callable[[], object]]] = [
            (9, errno.ENOSYS, lambda: os.mkdir(mnt / "newdir")),  # MKDIR
            (11, errno.ENOSYS, lambda: os.rmdir(mnt / "d")),  # RMDIR
            (10, errno.ENOSYS, lambda: os.unlink(mnt / "disk")),  # UNLINK
            (12, errno.ENOSYS, lambda: os.rename(mnt / "disk", mnt / "other")),  # RENAME
            (6, errno.ENOSYS, lambda: os.symlink("disk", mnt / "link")),  # SYMLINK
            (8, errno.ENOSYS, lambda: os.mknod(mnt / "node", stat.S_IFREG | 0o600)),  # MKNOD
            (13, errno.EPERM, lambda: os.link(mnt / "disk", mnt / "hard")),  # LINK
            (35, errno.ENOSYS, lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY)),  # CREATE
            (21, errno.EOPNOTSUPP, lambda: os.setxattr(mnt / "disk", "user.x", b"1")),
            (23, errno.EOPNOTSUPP, lambda: os.listxattr(mnt / "disk")),
            (24, errno.EOPNOTSUPP, lambda: os.removexattr(mnt / "disk", "user.x")),
        ]
        for opcode, err, fn in cases:
            s.clear()
            raises_errno(err, fn)
            got = s.requests(opcode)
            assert [r["err"] for r in got] == [errno.ENOSYS], (opcode, s.ops())
        # Answered ENOSYS, some are not asked again: a file is still created
        # by MKNOD after CREATE was refused once.
        s.clear()
        raises_errno(errno.ENOSYS, os.open, mnt / "new2", os.O_CREAT | os.O_WRONLY)
        assert 35 not in s.ops() and 8 in s.ops()
        # fsync of a directory: FSYNCDIR refused once, then never sent.
        for _ in range(2):
            with opened(mnt, os.O_RDONLY) as dfd:
                os.fsync(dfd)
        assert [r["err"] for r in s.requests(30)] == [errno.ENOSYS]
        # lseek SEEK_DATA/SEEK_HOLE: LSEEK refused, the kernel answers itself.
        with opened(mnt / "disk", os.O_RDONLY) as fd:
            assert os.lseek(fd, 4096, os.SEEK_DATA) == 4096
            assert os.lseek(fd, 0, os.SEEK_HOLE) == SIZE
        assert [r["err"] for r in s.requests(46)] == [errno.ENOSYS]
        assert set(s.tree.nodes) == nodes and sorted(os.listdir(mnt)) == ["d", "disk"]
        assert s.errors == 0  # ENOSYS answers are not failures


def _notify_delete(parent: int, child: int, name: bytes) -> bytes:
    """``FUSE_NOTIFY_DELETE`` (fuse.h: fuse_notify_delete_out {u64 parent;
    u64 child; u32 namelen; u32 padding}, the name, its NUL): the kernel
    drops the entry and the inode's link count, so it forgets the inode."""
    body = struct.pack("<QQII", parent, child, len(name), 0) + name + b"\0"
    return struct.pack("<IiQ", 16 + len(body), FUSE_NOTIFY_DELETE, 0) + body


@needs_fuse
def test_forget_and_batch_forget(tmp_path: Path) -> None:
    """The kernel forgets inodes it drops: one at a time (FORGET) or, when
    several are queued by the time a reader asks, in one BATCH_FORGET.
    Neither is answered; the session goes on serving."""
    block = BlockingBacking(MiB)
    files: dict[str, Any] = {f"d/f{i}": NullBacking(4096) for i in range(12)}
    with served(tmp_path, {"disk": block, **files}, threads=2, timeout=60.0) as (s, mnt):
        ids = {i: s.tree.lookup(f"d/f{i}").nodeid for i in range(12)}  # type: ignore[union-attr]
        parent = s.tree.lookup("d").nodeid  # type: ignore[union-attr]
        for i in range(12):
            os.stat(mnt / "d" / f"f{i}")  # one lookup each, cached
        # One inode dropped while the readers are idle: a FORGET.
        os.write(s.fds[0], _notify_delete(parent, ids[0], b"f0"))
        assert s.wait_for(lambda: s.requests(p.Opcode.FORGET))
        (f,) = s.requests(p.Opcode.FORGET)
        assert (f["nodeid"], f["args"].nlookup, f["err"]) == (ids[0], 1, None)
        # Both readers busy (two reads held in the backing) while eleven are
        # dropped: the first free reader gets them in one BATCH_FORGET.
        fds = [os.open(mnt / "disk", os.O_RDONLY) for _ in range(2)]
        readers = [threading.Thread(target=os.pread, args=(fd, 4096, 0)) for fd in fds]
        try:
            for t in readers:
                t.start()
            assert block.entered.acquire(timeout=10) and block.entered.acquire(timeout=10)
            for i in range(1, 12):
                os.write(s.fds[0], _notify_delete(parent, ids[i], f"f{i}".encode()))
            block.go.set()
            for t in readers:
                t.join(10)
        finally:
            block.go.set()
            for fd in fds:
                os.close(fd)
        forgotten = lambda: [  # noqa: E731
            one for r in s.requests(p.Opcode.BATCH_FORGET) for one in r["args"].forgets
        ]
        assert s.wait_for(lambda: len(forgotten()) == 11), (forgotten(), s.ops())
        assert sorted(forgotten()) == sorted((ids[i], 1) for i in range(1, 12))
        assert len(s.requests(p.Opcode.FORGET)) == 1
        assert all(r["err"] is None for r in s.requests(p.Opcode.BATCH_FORGET))
        # Forgotten ids are known again at the next lookup; serving goes on.
        assert os.stat(mnt / "d" / "f3").st_ino == ids[3]
        assert s.errors == 0


#: A child reading 4 KiB of the file with a SIGUSR1 handler installed;
#: prints "ready" before the read and "read N HEX SIGNALS" after it.
CHILD_READER = r"""
import os, signal, sys
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
data = os.pread(fd, 4096, 0)
print("read", len(data), data[:2].hex(), len(got), flush=True)
"""


def _interrupted_read(s: RecordingSession, block: BlockingBacking, path: Path) -> tuple[str, int]:
    """A child's read held in the backing gets SIGUSR1; the read is let go
    once the session got the INTERRUPT (or after 3 s). The child's last
    line, and how many INTERRUPTs arrived meanwhile."""
    block.go.clear()
    before = len(s.requests(p.Opcode.INTERRUPT))
    child = subprocess.Popen([sys.executable, "-c", CHILD_READER, str(path)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert block.entered.acquire(timeout=10), "the read never reached the backing"
        os.kill(child.pid, signal.SIGUSR1)
        s.wait_for(lambda: len(s.requests(p.Opcode.INTERRUPT)) > before, timeout=3)
        block.go.set()
        line = child.stdout.readline().strip()
        assert child.wait(10) == 0
        return line, len(s.requests(p.Opcode.INTERRUPT)) - before
    finally:
        block.go.set()
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


@needs_fuse
def test_interrupt_received_and_answered(tmp_path: Path) -> None:
    """A signal to a process waiting on a READ makes the kernel send an
    INTERRUPT naming that READ; the session answers it (ENOSYS: it cannot
    cancel a read under way), and the read completes with its data."""
    block = BlockingBacking(MiB)
    with served(tmp_path, {"disk": block}, threads=2) as (s, mnt):
        line, n = _interrupted_read(s, block, mnt / "disk")
        assert line == "read 4096 abab 1"  # all the data, and the handler ran
        assert n == 1
        (intr,) = s.requests(p.Opcode.INTERRUPT)
        reads = [r for r in s.requests(p.Opcode.READ) if r["unique"] == intr["args"].unique]
        assert len(reads) == 1, "the INTERRUPT names the READ held"
        assert intr["unique"] == intr["args"].unique | FUSE_INT_REQ_BIT
        assert intr["err"] == errno.ENOSYS
        assert s.errors == 0


@needs_fuse
def test_interrupt_answer_stops_further_interrupts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After one INTERRUPT answered ENOSYS the kernel sends no more: a second
    interrupted read makes none."""
    block = BlockingBacking(MiB)
    refused: list[tuple[int, int]] = []
    real_writev = os.writev

    def writev(fd: int, buffers: list[bytes]) -> int:
        try:
            return real_writev(fd, buffers)
        except OSError as e:
            refused.append((struct.unpack_from("<Q", buffers[0], 8)[0], e.errno or 0))
            raise

    proxy = _FakeOs([])
    proxy.readv = os.readv  # type: ignore[method-assign]
    proxy.writev = writev  # type: ignore[method-assign]
    monkeypatch.setattr(fuse_session, "os", proxy)
    with served(tmp_path, {"disk": block}, threads=2) as (s, mnt):
        first, n1 = _interrupted_read(s, block, mnt / "disk")
        second, n2 = _interrupted_read(s, block, mnt / "disk")
        assert first == second == "read 4096 abab 1"
        assert n1 == 1
        intr = s.requests(p.Opcode.INTERRUPT)
        assert n2 == 0, f"a second INTERRUPT; replies refused by the kernel: {refused}, {intr}"


@needs_fuse
def test_notifications_accepted_by_the_kernel(tmp_path: Path) -> None:
    """The notification encoders against the real kernel: it accepts each
    (a layout it disagreed with would be refused with EINVAL) and acts on it."""
    mem = MemBacking(MiB)
    block = BlockingBacking(MiB)
    with served(tmp_path, {"disk": mem, "held": block}, threads=3, timeout=60.0) as (s, mnt):
        disk = s.tree.lookup("disk")
        assert disk is not None
        assert os.stat(mnt / "disk").st_size == MiB
        s.clear()
        assert os.stat(mnt / "disk").st_size == MiB and s.ops() == []  # cached
        # INVAL_INODE: the attributes are asked again, and the new size seen.
        mem.size = 2 * MiB
        raw = p.notify_inval_inode(disk.nodeid)
        assert os.write(s.fds[0], raw) == len(raw)
        assert os.stat(mnt / "disk").st_size == 2 * MiB
        assert s.ops() == [p.Opcode.GETATTR]
        # INVAL_ENTRY: the name is looked up again.
        s.clear()
        raw = p.notify_inval_entry(p.ROOT_ID, b"disk")
        assert os.write(s.fds[0], raw) == len(raw)
        os.stat(mnt / "disk")
        assert [r["args"] for r in s.requests(p.Opcode.LOOKUP)] == [p.LookupIn(b"disk")]
        # RESEND: a READ a reader holds is sent again, bit 63 set in its unique.
        with opened(mnt / "held", os.O_RDONLY) as fd:
            out: list[bytes] = []
            t = threading.Thread(target=lambda: out.append(os.pread(fd, 4096, 0)))
            t.start()
            try:
                assert block.entered.acquire(timeout=10)
                s.send_resend()
                assert block.entered.acquire(timeout=10), "the READ was not resent"
            finally:
                block.go.set()
                t.join(10)
            assert out == [b"\xab" * 4096]
        # (recorded as answered: in either order, and the one whose answer
        # the kernel did not need may still be finishing when pread returns)
        s.wait_for(lambda: len(s.requests(p.Opcode.READ)) >= 2)
        uniques = sorted(r["unique"] for r in s.requests(p.Opcode.READ))
        assert len(uniques) == 2 and uniques[1] == uniques[0] | p.RESEND_BIT
