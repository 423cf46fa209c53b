"""Where the bytes of a path really live, through the host's block stack.

The same data can reach blksnapd under many names: a file and a loop device
over it, two loop devices over one file, a disk and one of its partitions, a
device-mapper or md device over its slaves, a symlink to any of these, and a
loop device over blksnapd's own ``<mount>/dev/N``. Comparing ``st_dev`` /
``st_ino`` of the names sees none of that. :func:`resolve` walks down the
stack in sysfs (loop backing file and offset, partition start, slaves) to the
*bottom* storage — a regular file or a whole disk — and says which byte range
of it the name covers. Two names that share a byte of one bottom store are the
same data: :func:`overlap` finds that.

A name that leads into blksnapd's own mount is not followed into the FUSE
file: the ``alias`` callback names the served device instead, so the caller
can say "this is device N" (and, for diff storage, map a file system's
extents onto device N's backing store).

Everything here reads sysfs and stats paths: no I/O on the data.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from blksnap.errors import InvalidArgument, from_oserror

#: ``LOOP_GET_STATUS64``: backing file's device and inode, offset, size limit.
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
#: Deeper stacks than this are refused (and cycles cannot loop forever).
MAX_DEPTH = 16
#: Where sysfs is (tests point it at a tree of their own).
SYSFS = "/sys"

#: Given a path, the name of the blksnapd device it is the served file of,
#: or None. It raises for paths of blksnapd's that are no device (images).
Alias = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Extent:
    """Bytes ``start``..``start+length`` of the bottom store ``base`` (a
    :func:`blksnap.device.storage_identity`); ``length`` None: to its end.
    ``served`` names the blksnapd device when the walk reached its FUSE file
    (then ``start`` is an offset on that device, and ``base`` is unused)."""

    base: tuple[int, int]
    start: int
    length: int | None
    bottom: str
    served: str | None = None

    def intersects(self, other: Extent) -> bool:
        if self.base != other.base or self.served != other.served:
            return False
        a_end = None if self.length is None else self.start + self.length
        b_end = None if other.length is None else other.start + other.length
        return (b_end is None or self.start < b_end) and (a_end is None or other.start < a_end)

    def shifted(self, offset: int, length: int | None) -> Extent:
        """The part ``offset``..``offset+length`` of this extent."""
        if self.length is not None:
            room = max(0, self.length - offset)
            length = room if length is None else min(length, room)
        return Extent(self.base, self.start + offset, length, self.bottom, self.served)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _sysfs_dir(devnum: int) -> str | None:
    path = f"{SYSFS}/dev/block/{os.major(devnum)}:{os.minor(devnum)}"
    return os.path.realpath(path) if os.path.exists(path) else None


def _devnum_of(sysdir: str) -> int | None:
    text = _read(os.path.join(sysdir, "dev"))
    if not text or ":" not in text:
        return None
    major, minor = text.split(":", 1)
    return os.makedev(int(major), int(minor))


def _loop_status(name: str) -> tuple[int, int, int, int] | None:
    """(backing st_dev, st_ino, offset, size limit) of loop device ``name``."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    except OSError:
        return None  # not bound to a file
    finally:
        os.close(fd)
    dev, ino, _rdev, offset, sizelimit = _LOOP_INFO64.unpack(raw)[:5]
    return dev, ino, offset, sizelimit


def resolve(path: str, alias: Alias | None = None) -> list[Extent]:
    """The bottom extents of ``path`` (a regular file or a block device;
    symlinks followed). ``FileNotFoundError``-style problems raise the
    matching :class:`BlksnapError`."""
    real = os.path.realpath(path)
    if alias is not None:
        name = alias(real)
        if name is not None:
            return [Extent((0, 0), 0, None, real, served=name)]
    try:
        st = os.stat(real)
    except OSError as exc:
        raise from_oserror(exc, path) from None
    if stat.S_ISBLK(st.st_mode):
        return resolve_devnum(st.st_rdev, alias)
    if stat.S_ISREG(st.st_mode):
        return [Extent((st.st_dev, st.st_ino), 0, None, real)]
    raise InvalidArgument(f"{path} is neither a regular file nor a block device")


def resolve_devnum(devnum: int, alias: Alias | None = None, depth: int = 0) -> list[Extent]:
    """The bottom extents of block device ``devnum``; [] when it is not a
    block device of this host (the anonymous device of tmpfs, FUSE, ...)."""
    if depth > MAX_DEPTH:
        raise InvalidArgument("block device stack too deep (or a cycle)")
    sysdir = _sysfs_dir(devnum)
    if sysdir is None:
        return []
    name = os.path.basename(sysdir)
    whole = Extent((0, devnum), 0, None, f"/dev/{name}")
    # A partition: a range of its disk.
    if os.path.exists(os.path.join(sysdir, "partition")):
        start = int(_read(os.path.join(sysdir, "start")) or 0) << 9
        size = int(_read(os.path.join(sysdir, "size")) or 0) << 9
        parent = _devnum_of(os.path.dirname(sysdir))
        if parent is None:
            return [whole]
        return [e.shifted(start, size) for e in resolve_devnum(parent, alias, depth + 1)]
    # A loop device: a range of its backing file.
    backing = _read(os.path.join(sysdir, "loop", "backing_file"))
    if backing is not None:
        shown = backing.removesuffix(" (deleted)")
        status = _loop_status(name)
        if status is None:
            return [whole]
        dev, ino, offset, sizelimit = status
        length = sizelimit or None
        if alias is not None:
            served = alias(shown)
            if served is not None:
                return [Extent((0, 0), offset, length, shown, served=served)]
        inner = [Extent((dev, ino), 0, None, shown)]
        try:
            st = os.stat(shown)
            if stat.S_ISBLK(st.st_mode):
                inner = resolve_devnum(st.st_rdev, alias, depth + 1)
        except OSError:
            pass
        return [e.shifted(offset, length) for e in inner]
    # Device-mapper, md and the like: conservatively all of every slave.
    try:
        slaves = sorted(os.listdir(os.path.join(sysdir, "slaves")))
    except OSError:
        slaves = []
    if slaves:
        out: list[Extent] = []
        for slave in slaves:
            num = _devnum_of(os.path.join(sysdir, "slaves", slave))
            if num is not None:
                out += [
                    Extent(e.base, 0, None, e.bottom, e.served)
                    for e in resolve_devnum(num, alias, depth + 1)
                ]
        return out or [whole]
    return [whole]


def is_linear(extents: list[Extent]) -> bool:
    """One extent, so byte offsets map one to one onto the bottom store."""
    return len(extents) == 1


def overlap(a: list[Extent], b: list[Extent]) -> Extent | None:
    """An extent of ``a`` that shares bytes with one of ``b``, or None."""
    for x in a:
        for y in b:
            if x.intersects(y):
                return x
    return None


def describe(e: Extent) -> str:
    where = f"device {e.served}" if e.served else e.bottom
    if e.start == 0 and e.length is None:
        return where
    end = "end" if e.length is None else str(e.start + e.length)
    return f"{where} bytes {e.start}..{end}"


# -- a file's blocks on its file system's device -------------------------------------

#: ``FS_IOC_FIEMAP`` and its flags (linux/fiemap.h).
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
#: Extents whose blocks are not simply "these bytes of the device, for this
#: file alone": unknown or delayed placement, encoded, encrypted, unaligned,
#: inline or tail-packed data, and blocks shared with another file (reflink).
FIEMAP_UNSAFE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000
_FIEMAP_BATCH = 256

#: File systems that keep a file's blocks where FIEMAP says for as long as the
#: file is open and nobody writes, truncates or defragments it. Copy-on-write
#: file systems (btrfs, bcachefs, zfs) move blocks on their own and are not here.
STABLE_EXTENT_FS = frozenset({"ext2", "ext3", "ext4", "xfs"})


def fiemap(fd: int, length: int) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of every extent of the file behind ``fd``
    in 0..``length``, after syncing it; ``InvalidArgument`` when a byte is
    not allocated or an extent is not safe to write below the file system."""
    out: list[tuple[int, int, int]] = []
    start = 0
    while start < length:
        head = _FIEMAP_HEAD.pack(start, length - start, FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0)
        buf = bytearray(head + bytes(_FIEMAP_EXTENT.size * _FIEMAP_BATCH))
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot map the file's blocks (FIEMAP): {exc.strerror}"
            ) from None
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            logical, physical, elen, _r1, _r2, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
            )
            if flags & FIEMAP_UNSAFE:
                raise InvalidArgument(
                    f"extent at {logical} has flags {flags:#x} (delayed, encoded, inline "
                    "or shared blocks): it cannot be written below the file system"
                )
            out.append((logical, physical, elen))
            start = logical + elen
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            break
    pos = 0
    for logical, _, elen in out:
        if logical > pos:
            break
        pos = max(pos, logical + elen)
    if pos < length:
        raise InvalidArgument(f"byte {pos} of the file is not allocated (a hole)")
    return out


def mount_fstype(st_dev: int) -> str | None:
    """The type of the file system mounted from device ``st_dev``."""
    want = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 3 and fields[2] == want:
                    return right.split()[0]
    except OSError:
        return None
    return None


#: ``FS_IOC_GETFLAGS`` / ``FS_IOC_SETFLAGS`` and the immutable attribute
#: (``chattr +i``): no write, truncate, unlink, or block move (e4defrag's
#: EXT4_IOC_MOVE_EXT, xfs_fsr's swapext) while it is set.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


def set_immutable(fd: int, on: bool) -> bool:
    """Set or clear the immutable attribute of the file behind ``fd``;
    False where the file system does not have it."""
    try:
        (flags,) = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    except OSError:
        return False
    return True
