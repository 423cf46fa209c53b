"""How the backing store meets the page cache: what it reads without
waiting, when it says it may block (:data:`blksnap.engine.gate.may_block`),
and the small folios it keeps on ext4."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blksnap.engine import device as device_mod
from blksnap.engine.device import WRITE_PIECE, BackingStore, _fs_type
from blksnap.fileio import LONG_IO, may_block

MiB = 1 << 20


@contextmanager
def counting_may_block() -> Iterator[list[int]]:
    """Counts this thread's ``may_block()`` calls while inside."""
    calls = [0]

    def hook() -> None:
        calls[0] += 1

    may_block.hook = hook
    try:
        yield calls
    finally:
        may_block.hook = None


def _file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def _uncache(path: Path) -> None:
    """Drop the file's clean pages, and make sure they are gone: a page the
    kernel still holds in another CPU's LRU batch survives one DONTNEED (the
    full suite hit it under load), so ask again until ``mincore`` finds none
    of the file's pages in the page cache (it reads nothing itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not _cached_pages(fd):
                return
            time.sleep(0.01)
        raise AssertionError(f"{path}: its pages stay in the page cache")
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)  # fmt: skip
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def _cached_pages(fd: int) -> int:
    """How many of the file's pages are in the page cache: ``mincore`` of
    a mapping of it (no page of which is touched, so nothing is read)."""
    size = os.fstat(fd).st_size
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec)
    finally:
        _libc.munmap(addr, size)


ON_EXT4 = _fs_type(os.stat("/tmp").st_dev) == "ext4"
needs_ext4 = pytest.mark.skipif(not ON_EXT4, reason="/tmp is not on ext4")


@needs_ext4  # (elsewhere readahead would cache more than was read)
def test_cached_reads_do_not_block_uncached_ones_say_so(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    data = _file(path, 4 * MiB)
    store = BackingStore(str(path))
    try:
        _uncache(path)
        with counting_may_block() as calls:
            assert store.pread(0, 4096) == data[:4096]  # from the disk
            assert calls[0] == 1
            assert store.pread(0, 4096) == data[:4096]  # cached now
            assert calls[0] == 1
            # Partly cached: the first page is, the rest is not.
            assert store.pread(0, 64 * 1024) == data[: 64 * 1024]
            assert calls[0] == 2
            assert store.pread(4096, 8192) == data[4096:12288]  # all cached by now
            assert calls[0] == 2
            # A large read says so whatever the cache holds.
            assert store.pread(0, LONG_IO) == data[:LONG_IO]
            assert calls[0] == 3
            store.flush()
            assert calls[0] == 4
    finally:
        store.close()


def test_may_block_is_per_thread_and_off_without_a_hook(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    data = _file(path, MiB)
    store = BackingStore(str(path))
    try:
        other: list[int] = []
        with counting_may_block() as calls:
            t = threading.Thread(target=lambda: other.append(len(store.pread(0, MiB))))
            t.start()
            t.join()
        assert other == [MiB] and calls[0] == 0  # the other thread had no hook
        assert store.pread(0, MiB) == data  # no hook here now: nothing called
    finally:
        store.close()


@needs_ext4
def test_on_ext4_large_writes_go_down_in_pieces(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "dev.img"
    _file(path, 4 * MiB)
    store = BackingStore(str(path), settle_cache=True)
    sizes: list[int] = []
    real = device_mod.pwrite_full

    def spy(fd: int, offset: int, data) -> None:
        sizes.append(len(data))
        real(fd, offset, data)

    monkeypatch.setattr(device_mod, "pwrite_full", spy)
    try:
        assert store.write_piece == WRITE_PIECE
        new = os.urandom(MiB + 4096)
        store.pwrite(512, new)
        assert sizes == [WRITE_PIECE] * (MiB // WRITE_PIECE) + [4096]
        assert store.pread(512, len(new)) == new
        sizes.clear()
        store.pwrite(0, new[:WRITE_PIECE])
        assert sizes == [WRITE_PIECE]
    finally:
        store.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_elsewhere_writes_go_down_whole(monkeypatch) -> None:
    path = Path("/dev/shm") / f"blksnap-test-{os.getpid()}.img"
    _file(path, 2 * MiB)
    store = BackingStore(str(path))
    sizes: list[int] = []
    real = device_mod.pwrite_full
    monkeypatch.setattr(
        device_mod, "pwrite_full", lambda fd, o, d: (sizes.append(len(d)), real(fd, o, d))
    )
    try:
        assert store.write_piece == 0
        store.pwrite(0, bytes(MiB))
        assert sizes == [MiB]
    finally:
        store.close()
        path.unlink()
