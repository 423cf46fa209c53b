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
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from blksnap.errors import BlksnapError, error
from blksnap.hostinfo import mounts_of, proc_stat

if TYPE_CHECKING:
    from blksnap.engine.regions import Regions

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
    """Attach ``path`` to a free loop device; its /dev path. Its completions
    are not steered (:func:`unsteer`: the loop devices the product makes
    are over FUSE files)."""
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
    unsteer(loop)
    return loop


def unsteer(loop: str) -> None:
    """End the loop device's requests on the CPU where they finish
    (``rq_affinity`` 0) rather than on the CPU that submitted each.

    Over a FUSE file a request of the loop device finishes in the FUSE
    server's reply (its ``writev`` to /dev/fuse). Under the kernel's default
    (``rq_affinity`` 1) a reply sent from a CPU other than the submitter's
    (here: one not sharing its L2 cache) is steered to the submitter with an
    inter-processor interrupt, a VM exit in a guest. Measured with blksnapd
    on 2 CPUs, 4 KiB random writes: steered, the worker spent 12-14 µs of CPU
    per request against 9-10 µs, the whole machine 26-28 µs against 22-23,
    and ran 5-15 % slower; under the default a device's runs got one or the
    other depending on where the scheduler had put fio and the serving
    thread, which made runs of the same workload differ that much.
    Unsteered, the completion is a soft interrupt on the server's CPU.
    Not set (a warning): the device works, steered."""
    attr = _rq_affinity(loop)
    try:
        with open(attr, "w") as f:
            f.write("0")
    except OSError as exc:
        log.warning("%s: completions stay steered (%s: %s)", loop, attr, exc.strerror)


def steered(loop: str) -> bool:
    """Are the loop device's completions steered to the submitting CPU
    (``rq_affinity`` not 0: one a blksnapd before :func:`unsteer` attached)?
    False if it cannot be read (gone)."""
    try:
        with open(_rq_affinity(loop)) as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def _rq_affinity(loop: str) -> str:
    return f"/sys/block/{os.path.basename(loop)}/queue/rq_affinity"


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


def freeze(mountpoint: str, keeper: Regions | None = None, key: str = "") -> int:
    """FIFREEZE: flush the file system and hold new writes. Returns an fd
    to pass to :func:`thaw`. ``keeper``: regions that outlive this process,
    given the fd under ``key`` *before* the freeze, so that a process dying
    with the file system frozen leaves the next one what to thaw
    (:func:`thaw_left`)."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if keeper is not None:
            keeper.hold(key, fd)
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        if keeper is not None:
            keeper.drop(key)
        os.close(fd)
        raise error(exc.errno or errno.EIO, f"freeze {mountpoint}: {exc.strerror}") from None
    log.info("froze %s", mountpoint)
    return fd


#: Keys of :func:`frozen`'s file systems in a process's regions.
FROZEN_KEY = "frozen/"


def _in_kernel(pids: list[int]) -> bool:
    """Has one of ``pids`` (dying processes) a thread that has not exited?"""
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            fields = proc_stat(pid, int(tid))
            if fields is not None and fields[0] not in ("Z", "X"):
                return True
    return False


def thaw_left(keeper: Regions, dying: list[int], wait: float = 600.0) -> list[str]:
    """Thaw the file systems a process before this one froze and did not
    thaw (it died in :func:`frozen`); what was thawed. Call it while the
    devices under them are served (a thaw writes to them).

    A freeze the dead process began may still be under way in a thread of
    it that waits in the kernel (``dying``: those processes): a thaw then
    fails with ``EINVAL`` (not frozen yet), so it is tried again until the
    freeze is done or that thread has gone (at most ``wait`` seconds)."""
    out = []
    for key in keeper.held_keys():
        if not key.startswith(FROZEN_KEY):
            continue
        fd = keeper.held_fd(key)
        assert fd is not None
        where = os.readlink(f"/proc/self/fd/{fd}")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.ioctl(fd, FITHAW, 0)
                log.warning("thawed %s: frozen by the process before, which died", where)
                out.append(where)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # not frozen (yet?)
                    if _in_kernel(dying) and time.monotonic() < deadline:
                        time.sleep(0.02)
                        continue
                else:
                    log.error("thaw %s (left frozen by the process before): %s", where, exc)
            break
        keeper.drop(key)
    return out


def thaw(fd: int, mountpoint: str = "") -> None:
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        log.info("thawed %s", mountpoint)
    except OSError as exc:
        log.error("thaw %s failed: %s", mountpoint, exc)
    finally:
        os.close(fd)


@contextlib.contextmanager
def frozen(blockdevs: list[str], keeper: Regions | None = None) -> Iterator[list[str]]:
    """Freeze every file system mounted from ``blockdevs`` and flush the
    block devices; thaw them all on the way out, also on failure.
    ``keeper``: see :func:`freeze`."""
    held: list[tuple[int, str]] = []
    seen: set[str] = set()
    try:
        for dev in blockdevs:
            for m in mounts_of(dev):
                if m.mountpoint in seen:
                    continue
                seen.add(m.mountpoint)
                key = f"{FROZEN_KEY}{len(held)}"
                held.append((freeze(m.mountpoint, keeper, key), m.mountpoint))
        for dev in blockdevs:
            try:
                flush_blockdev(dev)
            except OSError as exc:
                log.warning("flush of %s failed: %s", dev, exc)
        yield [mp for _, mp in held]
    finally:
        for i, (fd, mp) in reversed(list(enumerate(held))):
            thaw(fd, mp)
            if keeper is not None:
                keeper.drop(f"{FROZEN_KEY}{i}")
