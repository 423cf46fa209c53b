"""Backing store I/O and the served device.

A :class:`BackingStore` is a regular file or a block device: positional
reads and writes (``os.pread``/``os.pwrite`` release the GIL, so threads give
real I/O depth), flush with ``fsync``, capacity, exclusive open for block
devices. A :class:`Device` is a backing store served under a name, with the
filter stack in front of it and a gate that take and attach use to drain
in-flight writes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from typing import TYPE_CHECKING

from .errors import BlksnapError, InvalidArgument, NoDevice, NoSpace, from_oserror
from .filters import Bio, FilterResult, FilterStack, Op
from .gate import Gate
from .params import Params

if TYPE_CHECKING:
    from .filters import Filter

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
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
        raise InvalidArgument(f"{path} is neither a regular file nor a block device")
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    return fd, st


def fd_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


def pread_full(fd: int, offset: int, length: int) -> bytes:
    """Read exactly ``length`` bytes (zeros past end of file)."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


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


class BackingStore:
    """Where a device's data lives: a regular file or a block device."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.fd, st = open_backing(self.path)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        self.identity = storage_identity(st)
        self.size = fd_size(self.fd)

    def refresh_size(self) -> int:
        """Read the capacity again (a file or device resized under us)."""
        self.size = fd_size(self.fd)
        return self.size

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return pread_full(self.fd, offset, length)
        except OSError as exc:
            raise from_oserror(exc, f"read {self.path}") from None

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            pwrite_full(self.fd, offset, data)
        except OSError as exc:
            raise from_oserror(exc, f"write {self.path}") from None

    def write_zeroes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, _ZERO_PIECE))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self.pwrite(offset, zero[:n] if n < len(zero) else zero)
            offset += n

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise from_oserror(exc, f"flush {self.path}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def identity_of(path: str) -> tuple[int, int] | None:
    """The identity a :class:`BackingStore` would have for ``path`` (None if absent)."""
    try:
        return storage_identity(os.stat(path))
    except OSError:
        return None


class Device:
    """A backing store served under ``name``, behind its filter stack.

    ``read``/``write``/``flush``/``discard``/``write_zeroes`` take byte offsets;
    I/O outside the device is refused (``EINVAL``; a write past the end
    ``ENOSPC``) before anything is written.
    """

    def __init__(self, name: str, path: str, params: Params) -> None:
        self.name = name
        self.params = params
        self.backing = BackingStore(path)
        self.filters = FilterStack()
        #: Drained by snapshot take and by filter attach/detach.
        self.queue = Gate()

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

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, write=False)
        if length == 0:
            return b""
        bio = Bio(Op.READ, offset, length, device=self)
        self.submit(bio)
        assert bio.result is not None
        return bio.result

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        self._check(offset, length, write=True)
        if length:
            self.submit(Bio(Op.WRITE, offset, length, data=data, device=self))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length, write=True)
        if length:
            self.submit(Bio(Op.WRITE_ZEROES, offset, length, device=self))

    def discard(self, offset: int, length: int) -> None:
        """Discard reads back as zeros here: the backing store writes zeros."""
        self._check(offset, length, write=True)
        if length:
            self.submit(Bio(Op.DISCARD, offset, length, device=self))

    def flush(self) -> None:
        self.submit(Bio(Op.FLUSH, 0, 0, device=self))

    # -- the block layer -------------------------------------------------------------

    def submit(self, bio: Bio) -> None:
        """Send ``bio`` through the filter stack to the backing store.

        Requests hold the device's gate until they are complete, so a drain
        (take, attach, close) waits for them to reach the backing store, and
        none can touch the backing store once the device is closed.
        """
        if bio.filtered:
            self._submit(bio)
            return
        gate = self.queue
        gate.enter()
        try:
            self._submit(bio)
        finally:
            gate.leave()

    def _submit(self, bio: Bio) -> None:
        dev: Device = self
        while True:
            if not bio.filtered and dev.filters:
                result = dev.filters.process(bio)
                if result is FilterResult.SKIP:
                    return
                if result is FilterResult.REDIRECT:
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

    def _backing_io(self, bio: Bio) -> None:
        store = self.backing
        op = bio.op
        if op is Op.READ:
            bio.result = store.pread(bio.offset, bio.length)
        elif op is Op.WRITE:
            assert bio.data is not None
            store.pwrite(bio.offset, bio.data)
        elif op is Op.FLUSH:
            store.flush()
        elif op in (Op.WRITE_ZEROES, Op.DISCARD):
            store.write_zeroes(bio.offset, bio.length)
        else:  # pragma: no cover - Op is closed
            raise InvalidArgument(f"unknown op {op}")

    # -- filters ------------------------------------------------------------------

    def attach_filter(self, flt_cls: type[Filter], opts: dict[str, str]) -> Filter:
        """Attach with the device drained, as the kernel freezes the queue."""
        self.filters.check_attach(flt_cls)
        self.queue.freeze()
        try:
            flt = flt_cls(self, opts)
            self.filters.add(flt)
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

    def close(self) -> None:
        """Drain requests in flight, refuse new ones (ENODEV), release."""
        name = self.name
        self.queue.close(lambda: NoDevice(f"device {name} has been removed"))
        for flt in list(self.filters):
            try:
                flt.detach()
            except BlksnapError:
                pass
            self.filters.remove(flt)
        self.backing.close()
