"""Loop devices and file-system freezing, the host side of the block layer.

Loop devices are attached with ``losetup`` (direct I/O on, a 4096-byte
logical sector unless asked otherwise) and found again through sysfs.
Mounted file systems on a block device are found in /proc/self/mountinfo by
device number and frozen with FIFREEZE / thawed with FITHAW, as the kernel's
``bdev_freeze`` does for blksnap's take.

Everything here blocks: the daemon calls it from worker threads, never from
the event loop that serves FUSE (losetup opens the FUSE file, FIFREEZE
writes through it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import subprocess
from collections.abc import Iterator

from blksnap.errors import BlksnapError, error
from blksnap.hostinfo import mounts_of

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
BLKFLSBUF = 0x1261


def _run(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        raise error(errno.ENOENT, f"{args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise error(errno.ETIMEDOUT, f"{' '.join(args)} did not finish in 60 s") from None
    if out.returncode != 0:
        text = (out.stderr or out.stdout).strip()
        err = errno.EBUSY if "busy" in text.lower() else errno.EIO
        raise error(err, f"{' '.join(args)}: {text}")
    return out.stdout.strip()


def attach(
    path: str, *, direct_io: bool = True, sector_size: int = 4096, read_only: bool = False
) -> str:
    """Attach ``path`` to a free loop device; its /dev path."""
    args = ["losetup", "--find", "--show", f"--sector-size={sector_size}"]
    if direct_io:
        args.append("--direct-io=on")
    if read_only:
        args.append("--read-only")
    args.append(path)
    try:
        loop = _run(args)
    except BlksnapError:
        if not direct_io:
            raise
        # Some backing files refuse O_DIRECT: fall back, and say so.
        log.warning("loop device with direct I/O refused for %s: trying without", path)
        args.remove("--direct-io=on")
        loop = _run(args)
    log.info("loop device %s attached to %s", loop, path)
    return loop


@contextlib.contextmanager
def attached(path: str, **kw: object) -> Iterator[str]:
    """A loop device over ``path`` (:func:`attach`'s options) for the
    ``with`` block; detached on the way out, also on failure."""
    dev = attach(path, **kw)  # type: ignore[arg-type]
    try:
        yield dev
    finally:
        try:
            detach(dev)
        except BlksnapError as exc:
            log.warning("detach %s: %s", dev, exc)


def detach(loop: str) -> None:
    """Detach ``loop``; if it is still open (mounted) the kernel detaches it
    when the last user closes it (autoclear)."""
    _run(["losetup", "--detach", loop])
    log.info("loop device %s detached", loop)


def flush_blockdev(blockdev: str) -> None:
    """fsync the block device and drop its buffer cache (BLKFLSBUF)."""
    fd = os.open(blockdev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


def freeze(mountpoint: str) -> int:
    """FIFREEZE: flush the file system and hold new writes. Returns an fd
    to pass to :func:`thaw`."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        os.close(fd)
        raise error(exc.errno or errno.EIO, f"freeze {mountpoint}: {exc.strerror}") from None
    log.info("froze %s", mountpoint)
    return fd


def thaw(fd: int, mountpoint: str = "") -> None:
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        log.info("thawed %s", mountpoint)
    except OSError as exc:
        log.error("thaw %s failed: %s", mountpoint, exc)
    finally:
        os.close(fd)


@contextlib.contextmanager
def frozen(blockdevs: list[str]) -> Iterator[list[str]]:
    """Freeze every file system mounted from ``blockdevs`` and flush the
    block devices; thaw them all on the way out, also on failure."""
    held: list[tuple[int, str]] = []
    seen: set[str] = set()
    try:
        for dev in blockdevs:
            for m in mounts_of(dev):
                if m.mountpoint in seen:
                    continue
                seen.add(m.mountpoint)
                held.append((freeze(m.mountpoint), m.mountpoint))
        for dev in blockdevs:
            try:
                flush_blockdev(dev)
            except OSError as exc:
                log.warning("flush of %s failed: %s", dev, exc)
        yield [mp for _, mp in held]
    finally:
        for fd, mp in reversed(held):
            thaw(fd, mp)
