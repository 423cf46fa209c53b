"""Backing store I/O and the served device.

A :class:`BackingStore` is a regular file or a block device: positional
reads and writes (``os.pread``/``os.pwrite`` release the GIL, so threads give
real I/O depth), flush with ``fsync``, capacity, exclusive open for block
devices. A :class:`Device` is a backing store served under a name, with the
filter stack in front of it and a gate that take and attach use to drain
in-flight writes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from typing import TYPE_CHECKING

from blksnap import shortway
from blksnap.engine.filters import READ, REDIRECT, SKIP, WRITE, Bio, FilterStack, Op
from blksnap.engine.gate import Gate, WouldWait, no_wait
from blksnap.engine.params import Params
from blksnap.engine.regions import LOCAL as LOCAL_REGIONS
from blksnap.engine.regions import Regions
from blksnap.errors import BlksnapError, InvalidArgument, NoDevice, NoSpace, from_oserror
from blksnap.fileio import (
    LONG_IO,
    fallocate,
    fd_size,
    may_block,
    pread_cache_first,
    pwrite_full,
    storage_identity,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from blksnap.engine.filters import Filter
    from blksnap.engine.image import Image

log = logging.getLogger(__name__)

_ZERO_PIECE = 1 << 20


def open_backing(path: str, *, writable: bool = True) -> tuple[int, os.stat_result]:
    """Open ``path`` for positional I/O; block devices exclusively (``EBUSY`` if in use)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    elif not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{path} is {_kind(st.st_mode)}: {_WANTED}")
    elif (fstype := _pseudo_fs(st.st_dev)) is not None:
        raise InvalidArgument(
            f"{path} is on {fstype}, a pseudo file system whose files are made up as "
            f"they are read: {_WANTED} on a real file system"
        )
    try:
        # O_NONBLOCK: should the path turn into a FIFO after the stat, the
        # open must not hang (it changes nothing for files and disks).
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgument(f"{path} is {_kind(st.st_mode)}: {_WANTED}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


_WANTED = "a device or diff storage is a regular file or a block device"
_PSEUDO_FS = frozenset(
    {
        *("proc", "sysfs", "debugfs", "tracefs", "securityfs", "configfs", "cgroup"),
        *("cgroup2", "pstore", "bpf", "efivarfs", "fusectl", "binfmt_misc", "mqueue"),
        *("rpc_pipefs", "nsfs"),
    }
)


def _fs_type(dev: int) -> str | None:
    """The type of the file system whose ``st_dev`` is ``dev`` (None: unknown)."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return None


def _pseudo_fs(dev: int) -> str | None:
    """The type of the file system of ``st_dev`` if it is a pseudo one (proc, sysfs ...)."""
    fstype = _fs_type(dev)
    return fstype if fstype in _PSEUDO_FS else None


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return what
    return f"of file type {stat.S_IFMT(mode):#o}"


# Deallocation goes to libc: fallocate(2) (os.posix_fallocate cannot punch
# holes) and the block device ioctls. ctypes calls release the GIL.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKSSZGET = 0x1268
BLKZEROOUT = 0x127F
#: ``Bio.private`` key of a WRITE_ZEROES whose range may be deallocated.
UNMAP = "unmap"
#: The answers of a file system or device that cannot do an operation at all.
_UNSUPPORTED = frozenset((errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY))
_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


def blkzeroout(fd: int, offset: int, length: int) -> None:
    """BLKZEROOUT: the device zeroes the range (logical-block aligned)."""
    rng = (ctypes.c_uint64 * 2)(offset, length)
    while _ioctl(fd, BLKZEROOUT, ctypes.byref(rng)) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


#: File systems whose page cache makes a small write into a large folio cost
#: in proportion to the folio: ext4 walks every buffer head of the folio on
#: each write (``ext4_block_write_begin``, then again at commit). Measured on
#: this kernel (6.18): a 4 KiB ``pwrite`` costs ~3-5 us of CPU into a folio
#: made by a 4 KiB or 64 KiB write, 12-33 us into one made by a 1 MiB write or
#: by readahead; xfs (iomap, a bitmap per folio) costs 2-3 us either way.
#: Folios are made by the first write or read of a range, at its size, and
#: live until evicted. So on these file systems the backing store makes them
#: small: writes go down in pieces of at most :data:`WRITE_PIECE` bytes (a
#: 1 MiB write then costs ~1.5x the kernel CPU: the price of 4 KiB writes at
#: a fifth), reads go without readahead (``POSIX_FADV_RANDOM``: the file
#: system above the device reads ahead already; a 1 MiB read is one request
#: either way), and a device added drops the clean cache of its file, whose
#: folios its creator made (a ``dd`` or ``cp`` of an image: large ones).
SMALL_FOLIO_FS = frozenset({"ext4"})
#: The largest single ``pwrite`` into a backing file on :data:`SMALL_FOLIO_FS`.
WRITE_PIECE = 128 * 1024


def keep_folios_small(fd: int, st: os.stat_result, *, settle: bool) -> bool:
    """For a regular file on one of :data:`SMALL_FOLIO_FS`: no readahead on
    ``fd`` and, with ``settle``, the file's clean page cache dropped; True
    if so (its writer should then write in pieces of :data:`WRITE_PIECE`)."""
    if not stat.S_ISREG(st.st_mode) or _fs_type(st.st_dev) not in SMALL_FOLIO_FS:
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    if settle:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


class BackingStore:
    """Where a device's data lives: a regular file or a block device.

    ``settle_cache``: drop the clean page cache of a backing file on one of
    :data:`SMALL_FOLIO_FS` (a device added; not a worker taking over, whose
    cache is its own).
    """

    # Set (on the instance) once the file system or device has said it cannot
    # do that at all: from then on zeros are written instead.
    _no_punch = False
    _no_zero_range = False
    _no_zeroout = False
    _no_seek_data = False
    #: Cached data is read with ``RWF_NOWAIT`` first (False: not supported).
    _nowait = True
    #: Logical block size of a block device, read at its first BLKZEROOUT.
    _sector = 0

    def __init__(self, path: str, *, settle_cache: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.fd, st = open_backing(self.path)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        self.identity = storage_identity(st)
        #: Writes larger than this go down in pieces of it (0: whole).
        self.write_piece = 0
        try:
            self.size = fd_size(self.fd)
            # A device is whole 512-byte sectors, at least one (a loop device
            # or FUSE file of any other size cannot be used as a disk).
            if self.size == 0:
                raise InvalidArgument(
                    f"{self.path} has size 0: nothing to serve (an empty "
                    + ("block device" if self.is_blockdev else "file, or a pseudo-file as in /proc")
                    + "); a device needs at least one 512-byte sector"
                )
            if self.size % 512:
                raise InvalidArgument(
                    f"{self.path} has size {self.size}, not a multiple of 512 bytes (the "
                    f"sector size); grow or truncate it to a multiple of 512, e.g. "
                    f"{-(-self.size // 512) * 512}"
                )
            if keep_folios_small(self.fd, st, settle=settle_cache):
                self.write_piece = WRITE_PIECE
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    #: Serve no more than this many bytes of it (0: all): storage a device
    #: moved to (``migrate``) that is larger than the device was.
    limit = 0

    def refresh_size(self) -> int:
        """Read the capacity again (a file or device resized under us)."""
        size = fd_size(self.fd)
        self.size = min(size, self.limit) if self.limit else size
        return self.size

    def pread(self, offset: int, length: int) -> bytes | bytearray:
        """Read: cached data without waiting, :data:`may_block` before the
        disk (:func:`~blksnap.fileio.pread_cache_first`)."""
        try:
            data, self._nowait = pread_cache_first(self.fd, offset, length, self._nowait)
        except OSError as exc:
            raise from_oserror(exc, f"read {self.path}") from None
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            length = len(data)
            if length < LONG_IO:  # (most writes: one call; no piece, WRITE_PIECE >= LONG_IO)
                done = os.pwrite(self.fd, data, offset)
                if done != length:
                    pwrite_full(self.fd, offset + done, memoryview(data)[done:])
                return
            may_block()
            piece = self.write_piece
            if piece and length > piece:
                view = memoryview(data)
                for at in range(0, len(view), piece):
                    pwrite_full(self.fd, offset + at, view[at : at + piece])
            else:
                pwrite_full(self.fd, offset, data)
        except OSError as exc:
            raise from_oserror(exc, f"write {self.path}") from None

    def prefetch(self, offset: int, length: int) -> None:
        """Start reading ``offset``..``offset+length`` into the page cache
        (a sequential reader of a store whose readahead is off)."""
        length = min(length, self.size - offset)
        if length > 0:
            try:
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # (advice only)

    def write_zeroes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, _ZERO_PIECE))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self.pwrite(offset, zero[:n] if n < len(zero) else zero)
            offset += n

    # -- deallocation ---------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Deallocate ``offset``..``offset+length``; it reads back as zeros
        (what a device's DISCARD promises): a hole punched in a regular
        file, BLKZEROOUT on a block device, zeros written where neither can
        be done."""
        may_block()
        if self.is_blockdev:
            self._zeroout(offset, length)
        elif not self._try_fallocate(
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "_no_punch", "punch hole"
        ):
            self.write_zeroes(offset, length)

    def zero(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make ``offset``..``offset+length`` read back as zeros, the quick
        way: with ``unmap`` the space may be released (a hole, as
        :meth:`discard`), without it the range stays allocated
        (``FALLOC_FL_ZERO_RANGE``; BLKZEROOUT on a block device). Zeros are
        written where the file system or device cannot do either."""
        may_block()
        if self.is_blockdev:
            self._zeroout(offset, length)
        elif unmap:
            self.discard(offset, length)
        elif not self._try_fallocate(
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
            offset,
            length,
            "_no_zero_range",
            "zero range",
        ):
            self.write_zeroes(offset, length)

    def _try_fallocate(self, mode: int, offset: int, length: int, flag: str, what: str) -> bool:
        """fallocate ``mode``; False (logged once) if the file system cannot."""
        if getattr(self, flag):
            return False
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise from_oserror(exc, f"{what} {self.path}") from None
            setattr(self, flag, True)
            log.info("%s: %s not supported (%s): writing zeros instead", self.path, what, exc)
            return False
        return True

    def _zeroout(self, offset: int, length: int) -> None:
        """BLKZEROOUT on the logical blocks the range covers whole; zeros
        written for the pieces at either end (and for all of it if the
        device cannot)."""
        end = offset + length
        if not self._no_zeroout:
            try:
                if not self._sector:
                    buf = fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4)
                    self._sector = struct.unpack("i", buf)[0] or 512
                sector = self._sector
                a = -(-offset // sector) * sector
                b = end // sector * sector
                if b > a:
                    blkzeroout(self.fd, a, b - a)
                    if a > offset:
                        self.write_zeroes(offset, a - offset)
                    if end > b:
                        self.write_zeroes(b, end - b)
                    return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED and exc.errno != errno.EINVAL:
                    raise from_oserror(exc, f"zero out {self.path}") from None
                self._no_zeroout = True
                log.info("%s: BLKZEROOUT not supported (%s): writing zeros instead", self.path, exc)
        self.write_zeroes(offset, length)

    def extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        """Allocation of ``offset``..``offset+length``: runs ``(offset,
        length, is_hole)`` in order. A hole reads back as zeros; a data run
        may hold anything. The runs cover the range, or (with ``limit``) a
        prefix of it in at most ``limit`` runs. A block device, or a file
        system that cannot tell (no ``SEEK_DATA``), is all data."""
        if length <= 0:
            return []
        if self.is_blockdev or self._no_seek_data:
            return [(offset, length, False)]
        fd = self.fd
        end = offset + length
        out: list[tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end and not (limit and len(out) >= limit):
                try:
                    data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # no data after pos: a hole to the end of the file
                if data > pos:
                    out.append((pos, data - pos, True))
                    pos = data
                    if pos >= end or (limit and len(out) >= limit):
                        break
                hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
                if hole > pos:  # (== pos: punched meanwhile; look again)
                    out.append((pos, hole - pos, False))
                    pos = hole
        except OSError as exc:
            if exc.errno in _UNSUPPORTED or exc.errno == errno.EINVAL:
                self._no_seek_data = True
                return [(offset, length, False)]
            raise from_oserror(exc, f"seek {self.path}") from None
        return out

    def flush(self) -> None:
        may_block()
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise from_oserror(exc, f"flush {self.path}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Device:
    """A backing store served under ``name``, behind its filter stack.

    ``read``/``write``/``flush``/``discard``/``write_zeroes`` take byte offsets;
    I/O outside the device is refused (``EINVAL``; a write past the end
    ``ENOSPC``) before anything is written.
    """

    def __init__(
        self,
        name: str,
        path: str,
        params: Params,
        regions: Regions = LOCAL_REGIONS,
        *,
        settle_cache: bool = False,
    ) -> None:
        self.name = name
        self.params = params
        #: Where its filters keep state that may outlive the process (the CBT).
        self.regions = regions
        self.backing = BackingStore(path, settle_cache=settle_cache)
        self.filters = FilterStack()
        #: Its requests served in C by blksnapd's FUSE session
        #: (:mod:`blksnap.shortway`; None: not built or turned off). The gate
        #: closes it at every drain and opens it again after, and so the
        #: ways of the images of its snapshot, which read its backing store.
        self.short_way = shortway.Way() if shortway.LIB is not None else None
        #: The images of its snapshot taken (their ways follow its gate).
        self.images: list[Image] = []
        #: Drained by snapshot take and by filter attach/detach.
        self.queue = Gate(self._close_ways if self.short_way else None, self.open_short_way)
        #: Requests the backing store or a filter failed, by op name
        #: ("read", "write", ...), and the last failure (errno, op, offset,
        #: length, time, message). Requests refused for the caller's own
        #: fault (out of range, in :meth:`_check`) are not counted.
        self.error_counts: dict[str, int] = {}
        self.last_error: dict[str, object] | None = None
        self._error_lock = threading.Lock()
        #: Called (in the failing request's thread) after each failure is
        #: counted: ``on_error(device, failure)``; the engine queues an event.
        self.on_error: Callable[[Device, dict[str, object]], None] | None = None
        #: Called with the gate drained when the backing store has changed
        #: (:meth:`switch_backing`), before any request reaches the new one;
        #: an exception puts the old one back.
        self.on_backing_switch: Callable[[Device, BackingStore], None] | None = None
        #: Called with the gate drained when a filter took itself off the
        #: stack (:meth:`retire_filter`: a hydration done); an exception
        #: puts it back.
        self.on_filter_retired: Callable[[Device, Filter], None] | None = None
        #: Set by :meth:`close` before its filters are detached.
        self.closing = False
        #: The last status of filters that detached themselves (a migration
        #: done): name -> :meth:`Filter.status`.
        self.retired: dict[str, dict[str, object]] = {}
        #: Where the tracker keeps the CBT's checkpoint (None: nowhere; the
        #: engine sets it: :mod:`blksnap.engine.cbt_checkpoint`).
        self.checkpoint_path: str | None = None
        #: The served device whose data carries the state dir, if any (the
        #: engine sets it): no write intent then, its flushes would go
        #: through a device blksnapd serves.
        self.state_carrier: Callable[[], str | None] | None = None
        self.open_short_way()

    @property
    def path(self) -> str:
        return self.backing.path

    @property
    def size(self) -> int:
        return self.backing.size

    def __repr__(self) -> str:
        return f"<Device {self.name} {self.path} {self.size}B>"

    # -- bounds ---------------------------------------------------------------

    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"{self.name}: negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            cls = NoSpace if write else InvalidArgument
            raise cls(
                f"{self.name}: I/O at {offset}+{length} is past the end of the device "
                f"({self.size} bytes)"
            )

    # -- public I/O -------------------------------------------------------------

    # Reads and writes take a short way when the filters allow it: no
    # filter, or one that passes the request on with nothing more than its
    # own bookkeeping (a tracker with no snapshot taken marks the CBT). The
    # steps are submit's, without a Bio, a filter walk or a call per layer:
    # a 4 KiB request spends a few microseconds of Python here, and every
    # one of them shows in its rate (BENCHMARKS.md, "Block layer").

    def read(self, offset: int, length: int) -> bytes | bytearray:
        if offset < 0 or length < 0 or offset + length > self.backing.size:
            self._check(offset, length, write=False)
        if length == 0:
            return b""
        gate = self.queue
        gate.enter()
        try:
            filters = self.filters._filters  # (swapped only with the gate drained)
            if not filters or (len(filters) == 1 and filters[0].passes_reads):
                return self.backing.pread(offset, length)
            bio = Bio(READ, offset, length, None, self)
            self._submit(bio)
            assert bio.result is not None
            return bio.result
        except WouldWait:
            raise
        except BlksnapError as exc:
            self._failed(READ, offset, length, exc)
            raise
        finally:
            gate.leave()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        if offset < 0 or offset + length > self.backing.size:
            self._check(offset, length, write=True)
        if not length:
            return
        if no_wait.active:  # (refusals are submit's)
            self.submit(Bio(WRITE, offset, length, data, self))
            return
        gate = self.queue
        gate.enter()
        try:
            filters = self.filters._filters
            if not filters or (len(filters) == 1 and filters[0].pass_write(offset, length)):
                self.backing.pwrite(offset, data)
            else:
                self._submit(Bio(WRITE, offset, length, data, self))
        except WouldWait:
            raise
        except BlksnapError as exc:
            self._failed(WRITE, offset, length, exc)
            raise
        finally:
            gate.leave()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zeros, the quick way; with ``unmap`` the backing store may
        release the space (the kernel's REQ_NOUNMAP clear: ``bio.private[UNMAP]``)."""
        self._check(offset, length, write=True)
        if length:
            bio = Bio(Op.WRITE_ZEROES, offset, length, device=self)
            if unmap:
                bio.private[UNMAP] = True
            self.submit(bio)

    def discard(self, offset: int, length: int) -> None:
        """Discard reads back as zeros here: the backing store deallocates
        (a hole in a file, BLKZEROOUT on a block device) or writes zeros."""
        self._check(offset, length, write=True)
        if length:
            self.submit(Bio(Op.DISCARD, offset, length, device=self))

    def flush(self) -> None:
        self.submit(Bio(Op.FLUSH, 0, 0, device=self))

    def allocation(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        """Allocation at ``offset``..``offset+length``: runs ``(offset,
        length, is_hole)`` of the backing store (:meth:`BackingStore.extents`),
        a hole reading as zeros; all data if a filter may serve reads from
        elsewhere (a redirect, a hydration: :attr:`Filter.reads_backing`)."""
        self._check(offset, length, write=False)
        if not all(flt.reads_backing for flt in self.filters):
            return [(offset, length, False)]
        return self.backing.extents(offset, length, limit)

    def write_may_wait(self, offset: int, length: int) -> bool:
        """Could a write of ``offset``..``offset+length`` submitted now wait
        on more than the backing store's page cache? False only when every
        attached filter says it would not (:meth:`Filter.write_may_wait`),
        or none is attached. Asked outside the gate, the answer may go
        stale: submit inside ``with no_wait:`` (:mod:`blksnap.engine.gate`)
        to have a write that would wait refused untouched."""
        return any(flt.write_may_wait(offset, length) for flt in self.filters)

    # -- the block layer -------------------------------------------------------------

    def submit(self, bio: Bio) -> None:
        """Send ``bio`` through the filter stack to the backing store.

        Requests hold the device's gate until they are complete, so a drain
        (take, attach, close) waits for them to reach the backing store, and
        none can touch the backing store once the device is closed.
        """
        gate = None if bio.filtered else self.queue
        if gate is not None:
            gate.enter()
        try:
            self._submit(bio)
        except WouldWait:
            raise  # not a failure: nothing was done, the caller retries elsewhere
        except BlksnapError as exc:
            self._failed(bio.op, bio.offset, bio.length, exc)
            raise
        finally:
            if gate is not None:
                gate.leave()

    def _failed(self, op: Op, offset: int, length: int, exc: BlksnapError) -> None:
        """The backing store or a filter failed a request (range errors are
        refused before it is submitted): count it, keep the last, tell the
        engine."""
        name = op.name.lower()
        failure: dict[str, object] = {
            "errno": exc.errno,
            "error": exc.errname,
            "op": name,
            "offset": offset,
            "length": length,
            "time": time.time(),
            "message": exc.message,
        }
        with self._error_lock:
            self.error_counts[name] = self.error_counts.get(name, 0) + 1
            self.last_error = failure
        callback = self.on_error
        if callback is not None:
            try:
                callback(self, failure)
            except Exception:  # reporting must never hide the I/O error
                log.exception("%s: error callback failed", self.name)

    def _submit(self, bio: Bio) -> None:
        dev: Device = self
        while True:
            if not bio.filtered and dev.filters:
                result = dev.filters.process(bio)
                if result is SKIP:
                    return
                if result is REDIRECT:
                    if bio.device is None or bio.device is dev:
                        raise InvalidArgument("filter redirected a request to no other device")
                    dev = bio.device
                    continue
            dev._backing_io(bio)
            return

    def submit_filtered(self, bio: Bio) -> None:
        """I/O issued by a filter: straight to the backing store, no filter sees it."""
        bio.filtered = True
        bio.device = self
        self._backing_io(bio)

    def submit_physical(self, bio: Bio) -> None:
        """Diff storage I/O of a snapshot on this device (mapped storage):
        through the filters that model the device itself, to the backing
        store; not through the gate (it is issued by a request of some
        device, maybe this one, holding its gate) nor the tracker."""
        bio.physical = True
        self.submit_below(None, bio)

    def submit_below(self, flt: Filter | None, bio: Bio) -> None:
        """A request of filter ``flt`` (the one it is serving, or its own),
        through the filters below it (higher altitudes), then to the
        backing store. Called from ``flt.submit`` (the gate is held) or
        with the gate drained."""
        result = self.filters.process_below(flt, bio)
        if result is SKIP:
            return
        if result is REDIRECT:
            if bio.device is None or bio.device is self:
                raise InvalidArgument("filter redirected a request to no other device")
            bio.device._submit(bio)
            return
        self._backing_io(bio)

    def _backing_io(self, bio: Bio) -> None:
        store = self.backing
        op = bio.op
        if op is WRITE:
            assert bio.data is not None
            store.pwrite(bio.offset, bio.data)
        elif op is READ:
            bio.result = store.pread(bio.offset, bio.length)
        elif op is Op.FLUSH:
            store.flush()
        elif op is Op.DISCARD:
            store.discard(bio.offset, bio.length)
        elif op is Op.WRITE_ZEROES:
            store.zero(bio.offset, bio.length, unmap=bool(bio.private.get(UNMAP)))
        else:  # pragma: no cover - Op is closed
            raise InvalidArgument(f"unknown op {op}")

    # -- the compiled short way ---------------------------------------------------

    def open_short_way(self) -> None:
        """Open :attr:`short_way` with what the filters allow now: with no
        filter, reads and writes; with one, what it says
        (:meth:`Filter.short_way`: the tracker's reads, and its writes with
        their CBT mark while no snapshot is taken); with more, nothing. Then
        its images' ways (:meth:`Image.open_short_way`). Only with the ways
        closed and drained (the gate calls it when its last drain ends). A
        failure leaves them closed: the long way serves."""
        way = self.short_way
        if way is None or self.closing:
            return
        try:
            filters = self.filters._filters
            if not filters:
                grant = shortway.Grant(shortway.READS | shortway.WRITES)
            elif len(filters) == 1:
                grant = filters[0].short_way()
            else:
                grant = shortway.NOTHING
            if grant.mode:
                backing = self.backing
                way.open(grant, backing.fd, backing.size, backing.write_piece)
            for image in self.images:
                image.open_short_way()
        except Exception:
            log.exception("%s: the short way stays closed", self.name)

    def _close_ways(self) -> None:
        """Close its way and its images' ways; wait for their requests."""
        assert self.short_way is not None
        self.short_way.close()
        for image in self.images:
            image.close_short_way()

    # -- filters ------------------------------------------------------------------

    def attach_filter(self, flt_cls: type[Filter], opts: dict[str, str]) -> Filter:
        """Attach with the device drained, as the kernel freezes the queue."""
        self.filters.check_attach(flt_cls)
        made = flt_cls.prepare(self, opts)  # (its I/O before the drain)
        self.queue.freeze()
        try:
            flt = flt_cls(self, opts)
            if made is not None:
                flt.prepared(made)
            self.filters.add(flt)
        except BaseException:
            if made is not None:
                flt_cls.unprepare(self, made)
            raise
        finally:
            self.queue.unfreeze()
        log.info("filter %s attached to %s", flt_cls.name, self.name)
        return flt

    def detach_filter(self, flt_cls: type[Filter]) -> None:
        flt = self.filters.check_detach(flt_cls)
        self.queue.freeze()
        try:
            flt.detach()
            self.filters.remove(flt)
        finally:
            self.queue.unfreeze()
        log.info("filter %s detached from %s", flt_cls.name, self.name)

    def switch_backing(
        self, flt: Filter, store: BackingStore, before: Callable[[], None] | None = None
    ) -> None:
        """Serve the device from ``store`` from now on, and detach ``flt``
        (the filter that filled it: ``migrate``). With the gate drained: no
        request is in flight, and none reaches the old store after. In
        order: ``before()`` (the filter's last sync), the swap,
        :attr:`on_backing_switch` (the daemon records the new store); a
        failure in any puts the old store and the filter back and is raised.
        The old store is closed. The filters above keep their state: from
        their side nothing changed (the tracker keeps its generation)."""
        if store.size < self.size:
            raise InvalidArgument(
                f"{self.name}: {store.path} holds {store.size} bytes, the device {self.size}"
            )
        self.queue.freeze()
        try:
            old = self.backing
            if before is not None:
                before()
            if store.size > old.size:
                store.limit = old.size
                store.size = old.size
            self.backing = store
            self.filters.remove(flt)
            try:
                if self.on_backing_switch is not None:
                    self.on_backing_switch(self, old)
            except BaseException:
                self.backing = old
                self.filters.add(flt)
                raise
        finally:
            self.queue.unfreeze()
        old.close()
        log.info("%s: now served from %s (was %s); filter %s detached", self.name,
                 store.path, old.path, flt.name)  # fmt: skip

    def retire_filter(self, flt: Filter, after: Callable[[], None] | None = None) -> None:
        """``flt`` takes itself off the stack, its work done (a hydration):
        with the gate drained, it is removed, :attr:`on_filter_retired`
        records it (a failure puts it back and is raised), then ``after()``."""
        self.queue.freeze()
        try:
            self.filters.remove(flt)
            try:
                if self.on_filter_retired is not None:
                    self.on_filter_retired(self, flt)
            except BaseException:
                self.filters.add(flt)
                raise
            if after is not None:
                after()
        finally:
            self.queue.unfreeze()
        log.info("%s: filter %s done and detached", self.name, flt.name)

    def close(self) -> None:
        """Drain requests in flight, refuse new ones (ENODEV), release."""
        name = self.name
        self.closing = True
        self.queue.close(lambda: NoDevice(f"device {name} has been removed"))
        for flt in list(self.filters):
            try:
                flt.detach()
            except BlksnapError:
                pass
            self.filters.remove(flt)
        self.backing.close()
