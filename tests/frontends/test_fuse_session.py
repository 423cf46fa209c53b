"""Our own FUSE session against the real kernel: a mount served by reader
threads on cloned /dev/fuse fds, one file backed by a real file; a loop
device, ext4 and fio over it. Every mount, loop device and thread is undone
in ``finally``, whatever fails."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blksnap.control import loop
from blksnap.fileio import may_block
from blksnap.frontends import fuse_proto as p
from blksnap.frontends.fuse_session import FileBacking, FuseSession, NullBacking, Tree
from tests.conftest import needs_fuse

MiB = 1 << 20
SIZE = 256 * MiB

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "fsck.ext4", "fio")),
    reason="needs losetup, mkfs.ext4, fsck.ext4 and fio",
)


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


class RecordingBacking(FileBacking):
    """A file backing that remembers the largest write it was given."""

    largest_write = 0

    def write(self, offset: int, data: memoryview) -> None:
        self.largest_write = max(self.largest_write, len(data))
        super().write(offset, data)


@contextlib.contextmanager
def served(tmp_path: Path, threads: int = 2) -> Iterator[tuple[FuseSession, Path, FileBacking]]:
    img = tmp_path / "backing.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    backing = RecordingBacking(str(img))
    tree = Tree()
    tree.add_file("disk", backing)
    tree.add_file("sub/zero", NullBacking(MiB))
    session = FuseSession(tree, str(mnt), threads=threads)
    try:
        session.mount()
        yield session, mnt, backing
    finally:
        session.close()
        backing.close()
        assert not session.threads and not session.fds
        assert not mounted(mnt)


def loop_device(path: Path) -> contextlib.AbstractContextManager[str]:
    """A loop device as blksnapd attaches its own: direct I/O, 4 KiB sectors."""
    return loop.attached(str(path), direct_io=True, sector_size=4096)


@contextlib.contextmanager
def ext4_mounted(dev: str, where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "ext4", dev, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def fio(dev: str, rw: str, bs: str, size: str) -> None:
    # fio's random map (the default) writes no block twice: two writes of one
    # block in flight at once could land in either order and fail the verify.
    cmd = ["fio", "--name=v", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
           "--iodepth=32", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
           "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
           "--randrepeat=0"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify:" not in r.stderr and " err= 0" in r.stdout, r.stdout


# --- without a mount ---------------------------------------------------------


def raw_request(opcode: int, body: bytes, unique: int, nodeid: int = 1) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def test_node_ids_are_deterministic():
    def build() -> Tree:
        t = Tree()
        t.add_file("dev/a", NullBacking(4096))
        t.add_file("images/1/a", NullBacking(4096))
        t.add_dir("images/2")
        return t

    one, two = build(), build()
    ids = {nid: n.name for nid, n in one.nodes.items()}
    assert ids == {nid: n.name for nid, n in two.nodes.items()}
    assert ids == {1: b"", 2: b"dev", 3: b"a", 4: b"images", 5: b"1", 6: b"a", 7: b"2"}
    with pytest.raises(FileExistsError):
        one.add_dir("images/2")


def test_resent_request_answered_with_its_unique():
    tree = Tree()
    node = tree.add_file("disk", NullBacking(MiB))
    s = FuseSession(tree, "/nonexistent")
    unique = p.RESEND_BIT | 0x42
    out = b"".join(s.handle(memoryview(raw_request(p.Opcode.GETATTR, bytes(16), unique, 2))))
    assert struct.unpack_from("<IiQ", out) == (16 + 104, 0, unique)
    wr = struct.pack("<QQIIQI4x", node.nodeid, 0, 4, 0, 0, 0) + b"abcd"
    out = b"".join(s.handle(memoryview(raw_request(p.Opcode.WRITE, wr, unique))))
    assert struct.unpack_from("<IiQI", out) == (24, 0, unique, 4)
    # INTERRUPT: ENOSYS with its own unique; FORGET: no reply; unknown: ENOSYS
    out = b"".join(s.handle(memoryview(raw_request(p.Opcode.INTERRUPT, struct.pack("<Q", 7), 9))))
    assert struct.unpack_from("<IiQ", out) == (16, -errno.ENOSYS, 9)
    assert s.handle(memoryview(raw_request(p.Opcode.FORGET, struct.pack("<Q", 1), 10))) is None
    out = b"".join(s.handle(memoryview(raw_request(47, bytes(64), 11))))
    assert struct.unpack_from("<IiQ", out) == (16, -errno.ENOSYS, 11)


def test_fast_and_general_paths_agree():
    tree = Tree()
    tree.add_file("disk", NullBacking(MiB))
    s = FuseSession(tree, "/nonexistent")
    wr = struct.pack("<QQIIQI4x", 2, 4096, 8, 0, 0, 0) + b"abcdefgh"
    fast = s.handle(memoryview(raw_request(p.Opcode.WRITE, wr, 3)))
    # with an extension after the arguments: the general decoder
    ext = raw_request(p.Opcode.WRITE, wr + bytes(8), 3)
    ext = ext[:36] + struct.pack("<H", 1) + ext[38:]
    assert s.handle(memoryview(ext)) == fast
    rd = struct.pack("<QQIIQI4x", 2, MiB - 100, 4096, 0, 0, 0)
    rout = b"".join(s.handle(memoryview(raw_request(p.Opcode.READ, rd, 4))))
    assert struct.unpack_from("<IiQ", rout) == (16 + 100, 0, 4) and rout[16:] == bytes(100)
    past = struct.pack("<QQIIQI4x", 2, MiB, 8, 0, 0, 0) + b"abcdefgh"
    out = b"".join(s.handle(memoryview(raw_request(p.Opcode.WRITE, past, 5))))
    assert struct.unpack_from("<IiQ", out) == (16, -errno.ENOSPC, 5)
    bad = struct.pack("<QQIIQI4x", 2, 0, 4096, 0, 0, 0) + b"short"
    with pytest.raises(p.ProtocolError):
        s.handle(memoryview(raw_request(p.Opcode.WRITE, bad, 6)))
    rext = raw_request(p.Opcode.READ, rd + bytes(8), 7)
    rext = rext[:36] + struct.pack("<H", 1) + rext[38:]
    assert b"".join(s.handle(memoryview(rext)))[16:] == rout[16:]  # decoded generally
    assert s.errors == 1  # the ENOSPC


# --- with a mount --------------------------------------------------------------


@needs_fuse
def test_stat_ls_read_write(tmp_path):
    with served(tmp_path) as (session, mnt, backing):
        assert session.init is not None and session.init.max_write == MiB
        assert session.init.flags == p.WANTED_FLAGS  # this kernel offers them all
        assert len(session.threads) == len(session.fds) == 2
        assert sorted(os.listdir(mnt)) == ["disk", "sub"]
        assert os.listdir(mnt / "sub") == ["zero"]
        st = os.stat(mnt / "disk")
        assert st.st_size == SIZE and st.st_ino == 2
        assert os.stat(mnt / "sub").st_mode & 0o40000
        assert os.statvfs(mnt).f_blocks > 0
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "nope")

        data = os.urandom(3 * MiB + 512)
        fd = os.open(mnt / "disk", os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 12345) == len(data)
            assert os.pread(fd, len(data), 12345) == data
            os.fsync(fd)
        finally:
            os.close(fd)
        assert os.pread(backing.fd, len(data), 12345) == data

        buf = mmap.mmap(-1, 2 * MiB)  # page-aligned, as O_DIRECT wants
        buf.write(os.urandom(2 * MiB))
        fd = os.open(mnt / "disk", os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwritev(fd, [buf], 64 * MiB) == 2 * MiB
            assert backing.largest_write == MiB  # MAX_PAGES: whole 1 MiB requests
            back = mmap.mmap(-1, 2 * MiB)
            assert os.preadv(fd, [back], 64 * MiB) == 2 * MiB
            assert back[:] == buf[:]
            assert os.pread(fd, 4096, SIZE) == b""  # at the end
            with pytest.raises(OSError) as e:  # past the end of a block device file
                os.pwrite(fd, buf[:4096], SIZE)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.pread(backing.fd, 2 * MiB, 64 * MiB) == buf[:]
        assert (mnt / "sub" / "zero").read_bytes() == bytes(MiB)
        with pytest.raises(OSError) as e:
            os.mkdir(mnt / "newdir")
        assert e.value.errno == errno.ENOSYS


@needs_fuse
def test_punch_hole_reaches_backing(tmp_path):
    with served(tmp_path) as (_, mnt, backing):
        fd = os.open(mnt / "disk", os.O_RDWR)
        try:
            os.pwrite(fd, b"\xff" * (4 * MiB), 0)
            os.fsync(fd)
            blocks = os.fstat(backing.fd).st_blocks
            r = subprocess.run(["fallocate", "--punch-hole", "--offset", str(MiB),
                                "--length", str(2 * MiB), str(mnt / "disk")],
                               capture_output=True, text=True)  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert os.fstat(backing.fd).st_blocks <= blocks - 2 * MiB // 512
            assert os.pread(fd, 2 * MiB, MiB) == bytes(2 * MiB)
            assert os.pread(fd, 4096, 0) == b"\xff" * 4096
            assert os.fstat(fd).st_size == SIZE
        finally:
            os.close(fd)


@needs_fuse
def test_many_directory_entries(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = Tree()
    names = sorted(f"file-with-a-longish-name-{i:04d}" for i in range(500))
    for name in names:
        tree.add_file(f"d/{name}", NullBacking(4096))
    with FuseSession(tree, str(mnt), threads=3) as s:
        assert sorted(os.listdir(mnt / "d")) == names
        assert os.path.getsize(mnt / "d" / names[-1]) == 4096
        threads = list(s.threads)
    assert not mounted(mnt) and not any(t.is_alive() for t in threads)


@needs_fuse
@needs_tools
def test_loop_ext4_fsck(tmp_path):
    with served(tmp_path) as (session, mnt, _), loop_device(mnt / "disk") as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
        files = {f"f{i}": os.urandom(100_000 + i * 4096) for i in range(20)}
        with ext4_mounted(dev, tmp_path / "ext4") as fs:
            for name, data in files.items():
                (fs / name).write_bytes(data)
            subprocess.run(["sync", "-f", str(fs)], check=True)  # this fs only
        with ext4_mounted(dev, tmp_path / "ext4b") as fs:
            for name, data in files.items():
                assert (fs / name).read_bytes() == data
        r = subprocess.run(["fsck.ext4", "-f", "-n", dev], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert session.errors == 0


@needs_fuse
@needs_tools
def test_fio_verify(tmp_path):
    with served(tmp_path, threads=2) as (session, mnt, _), loop_device(mnt / "disk") as dev:
        fio(dev, "randwrite", "4k", "64M")
        fio(dev, "write", "1M", "128M")
        assert session.errors == 0


@needs_fuse
def test_lazy_unmount_while_busy(tmp_path):
    with served(tmp_path) as (session, mnt, _):
        fd = os.open(mnt / "disk", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                session.unmount()
            assert e.value.errno == errno.EBUSY
            session.unmount(lazy=True)
            assert not mounted(mnt)
            assert os.pread(fd, 4096, 0) == bytes(4096)  # still served
        finally:
            os.close(fd)
        # the last user gone, the connection ends and the threads with it
        for t in session.threads:
            t.join(10)
        assert not any(t.is_alive() for t in session.threads)
    assert threading.active_count() >= 1


def test_tree_changes_never_reuse_ids() -> None:
    tree = Tree()
    a = tree.add_file("d/a", NullBacking(4096))
    tree.add_file("d/b", NullBacking(4096))
    assert tree.lookup("d/a") is a
    assert tree.remove("d") is not None
    assert tree.lookup("d/a") is None and a.nodeid not in tree.nodes
    assert list(tree.nodes) == [p.ROOT_ID]
    again = tree.add_file("d/a", NullBacking(4096))
    assert again.nodeid > a.nodeid + 1
    assert tree.remove("nothing/there") is None


@needs_fuse
def test_tree_changes_while_mounted(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = Tree()
    tree.add_dir("dev")
    session = FuseSession(tree, str(mnt), threads=2, timeout=0.0)
    try:
        session.mount()
        assert os.listdir(mnt / "dev") == []
        tree.add_file("dev/x", NullBacking(MiB))
        assert os.listdir(mnt / "dev") == ["x"] and os.path.getsize(mnt / "dev/x") == MiB
        fd = os.open(mnt / "dev/x", os.O_RDONLY)
        try:
            tree.remove("dev/x")
            assert not os.path.exists(mnt / "dev/x")  # no stale entry
            with pytest.raises(OSError) as exc:
                os.pread(fd, 4096, 0)  # the node is gone: so is its file
            assert exc.value.errno == errno.ENOENT
        finally:
            os.close(fd)
        tree.add_file("dev/x", NullBacking(2 * MiB))
        assert os.path.getsize(mnt / "dev/x") == 2 * MiB
    finally:
        session.close()
        assert not mounted(mnt)


def test_tree_record_gives_a_new_tree_the_same_ids() -> None:
    old = Tree()
    old.add_file("dev/a", NullBacking(4096))
    old.add_file("dev/b", NullBacking(4096))
    old.add_file("images/1/a", NullBacking(4096))
    old.remove("dev/a")
    rec = old.record()
    assert rec["nodes"] == {"dev": 2, "dev/b": 4, "images": 5, "images/1": 6, "images/1/a": 7}
    assert rec["next_id"] == 8
    # A process taking over builds its tree in another order: the ids follow
    # the paths, new paths get ids never given out before, and a removed
    # path's old id (3) is not given again.
    new = Tree(rec["nodes"], rec["next_id"])
    new.add_dir("images")
    new.add_file("images/1/a", NullBacking(4096))
    new.add_file("dev/b", NullBacking(4096))
    new.add_file("dev/a", NullBacking(4096))
    got = {n.path: n.nodeid for n in new.nodes.values() if n.path}
    assert got == {"images": 5, "images/1": 6, "images/1/a": 7, "dev": 2, "dev/b": 4, "dev/a": 8}
    assert new.record()["next_id"] == 9
    # Recorded once: removed and added again, a path gets a new id.
    new.remove("dev/b")
    assert new.add_file("dev/b", NullBacking(4096)).nodeid == 9


@needs_fuse
def test_invalidation_lets_names_be_cached_long(tmp_path: Path) -> None:
    """Names and attributes cached for an hour: a removed name still goes at
    once, and a name added again is the new file, because every change is
    invalidated in the kernel's entry cache."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = Tree()
    dev = tree.add_dir("dev")
    session = FuseSession(tree, str(mnt), threads=2, timeout=3600.0)
    try:
        session.mount()
        tree.add_file("dev/x", NullBacking(MiB))
        first = os.stat(mnt / "dev/x")
        assert first.st_size == MiB
        assert os.stat(mnt / "dev/x").st_ino == first.st_ino  # cached, same node
        tree.remove("dev/x")
        assert session.invalidate_entry(dev.nodeid, b"x") is True  # it was cached
        assert not os.path.exists(mnt / "dev/x")
        tree.add_file("dev/x", NullBacking(2 * MiB))
        session.invalidate_entry(dev.nodeid, b"x")  # a negative entry, or none
        again = os.stat(mnt / "dev/x")
        assert again.st_size == 2 * MiB and again.st_ino != first.st_ino
        # Nothing cached under that name: the kernel says so, no error.
        assert session.invalidate_entry(dev.nodeid, b"never-there") is False
    finally:
        session.close()
        assert not mounted(mnt)
    assert session.invalidate_entry(dev.nodeid, b"x") is False  # not mounted


@needs_fuse
def test_without_invalidation_a_long_cache_is_stale(tmp_path: Path) -> None:
    """The control for the test above: the same change without the
    notification leaves the removed name served from the kernel's cache."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = Tree()
    tree.add_dir("dev")
    session = FuseSession(tree, str(mnt), threads=2, timeout=3600.0)
    try:
        session.mount()
        tree.add_file("dev/x", NullBacking(MiB))
        assert os.stat(mnt / "dev/x").st_size == MiB
        tree.remove("dev/x")
        assert os.stat(mnt / "dev/x").st_size == MiB  # stale: cached for an hour
    finally:
        session.close()
        assert not mounted(mnt)


class _WaitingBacking(NullBacking):
    """Reads wait until ``release`` is set; with ``announce`` they call
    ``may_block()`` first, as the engine does before it waits."""

    def __init__(self, announce: bool) -> None:
        super().__init__(MiB)
        self.announce = announce
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self, offset: int, length: int) -> bytes:
        if self.announce:
            may_block()
        self.entered.set()
        self.release.wait(30)
        return super().read(offset, length)


@needs_fuse
@pytest.mark.parametrize("announce", [True, False], ids=["announced", "unannounced"])
def test_a_waiting_request_does_not_stall_the_others(tmp_path: Path, announce: bool) -> None:
    """One reader thread serves at a time; one whose request waits hands
    its turn on when the engine says it may block, and a spare takes it
    anyway once the wait has gone on for a few ms unannounced."""
    img = tmp_path / "backing.img"
    data = os.urandom(MiB)
    img.write_bytes(data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    backing = FileBacking(str(img))
    slow = _WaitingBacking(announce)
    tree = Tree()
    tree.add_file("disk", backing)
    tree.add_file("slow", slow)
    session = FuseSession(tree, str(mnt), threads=3)
    waiter = None
    try:
        session.mount()
        got: list[bytes] = []
        waiter = threading.Thread(target=lambda: got.append((mnt / "slow").read_bytes()[:1]))
        waiter.start()
        assert slow.entered.wait(10), "the slow read never reached its backing"
        done: list[bytes] = []
        reader = threading.Thread(
            target=lambda: done.extend(os.pread(fd, 4096, o) for o in range(0, MiB, 4096)),
            daemon=True,
        )
        fd = os.open(mnt / "disk", os.O_RDONLY)
        try:
            reader.start()
            reader.join(20)
            assert not reader.is_alive(), "requests stalled behind a waiting one"
        finally:
            slow.release.set()
            reader.join(20)
            os.close(fd)
        assert b"".join(done) == data
        assert slow.release.is_set() and not reader.is_alive()
        waiter.join(20)
        assert got == [b"\0"]
    finally:
        slow.release.set()
        if waiter is not None:
            waiter.join(20)
        session.close()
        backing.close()
        assert not mounted(mnt)
