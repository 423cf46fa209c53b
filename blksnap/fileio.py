"""Low-level file I/O shared by every layer: whole positional reads and
writes, reads of what the page cache holds, capacity of a file or block
device, the identity of a storage, a directory's fsync (what makes a rename
durable), and :data:`may_block`, the hook a thread calls before it waits."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Callable

BLKGETSIZE64 = 0x80081272

# fallocate(2) with any mode (os.posix_fallocate cannot punch holes); ctypes
# calls release the GIL.
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


class _MayBlock(threading.local):
    """``may_block()`` -- the engine calls it in a request's thread just
    before that thread may wait for long: the disk (a read not in the page
    cache, a flush, a large transfer), a chunk to copy or another thread's
    copy, a drained gate. A front-end that serves requests on a few threads
    and lets only some of them run at once (blksnapd's FUSE session: one,
    since Python runs one thread at a time) sets ``hook`` in each of them, to
    hand its turn to another thread meanwhile. No hook: nothing happens (the
    hook must be cheap, and may be called more than once per request)."""

    hook: Callable[[], None] | None = None

    def __call__(self) -> None:
        hook = self.hook
        if hook is not None:
            hook()


may_block = _MayBlock()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any ``mode`` (``OSError`` on failure)."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def fd_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


def pread_upto(fd: int, offset: int, length: int) -> bytes:
    """Read ``length`` bytes, fewer only at end of file (a short data file
    is then seen as short, not as zeroes)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


#: Reads and writes from this size on call :data:`may_block` first: they
#: keep the thread in the kernel long enough for another to serve meanwhile.
LONG_IO = 128 * 1024


def pread_cached(fd: int, offset: int, length: int) -> tuple[bytearray, int]:
    """Read what the page cache holds of ``offset``..``offset+length``
    without waiting for the disk (``RWF_NOWAIT``): a buffer of ``length``
    bytes and how many of them, from the start, were read (0 when the first
    page is not cached). ``OSError`` (``EOPNOTSUPP``) where the file cannot."""
    buf = bytearray(length)
    try:
        return buf, os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return buf, 0


def pread_cache_first(
    fd: int, offset: int, length: int, nowait: bool
) -> tuple[bytes | bytearray, bool]:
    """Read exactly ``length`` bytes (zeros past the end of a file): a
    small read takes what the page cache holds without waiting (when
    ``nowait``: the file supports ``RWF_NOWAIT`` as far as is known), and
    :data:`may_block` is called before the disk is read or a long read
    starts. The data, and whether ``RWF_NOWAIT`` is still to be tried on
    this file (False once it said it cannot)."""
    if length < LONG_IO and nowait:
        try:
            buf, got = pread_cached(fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY):
                raise
            buf, got, nowait = bytearray(), 0, False
        if got == length:
            return buf, nowait
        may_block()  # not all of it cached
        rest = pread_full(fd, offset + got, length - got)
        return (bytes(buf[:got]) + rest if got else rest), nowait
    may_block()
    return pread_full(fd, offset, length), nowait


def pread_full(fd: int, offset: int, length: int) -> bytes:
    """Read exactly ``length`` bytes (zeros past end of file)."""
    data = pread_upto(fd, offset, length)
    return data if len(data) == length else data + bytes(length - len(data))


def pwrite_full(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    done = os.pwrite(fd, view, offset)
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def storage_identity(st: os.stat_result) -> tuple[int, int]:
    """What identifies the same storage under any path: ``(0, st_rdev)`` of a
    block device, ``(st_dev, st_ino)`` of anything else. Devices, diff
    storage sources and storage paths given by users are all compared by it."""
    if stat.S_ISBLK(st.st_mode):
        return (0, st.st_rdev)
    return (st.st_dev, st.st_ino)


def fsync_dir(path: str) -> None:
    """fsync a directory: a file created or renamed in it is then durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
