"""Named memory regions and held descriptors the engine keeps state in (the
CBT maps, the snapshots: chunk maps, diff storage allocation, descriptions
and the diff storage files themselves).

The engine asks :class:`Regions` for a region by key and size, and says when
it is done with one. :class:`LocalRegions` gives memory that ends with the
process. blksnapd's worker gives memory its supervisor holds (``memfd``;
:mod:`blksnap.control.regions`), so a region outlives a crash of the worker
and the next worker finds it as it was left: the CBT of a device comes back
with the same generation and every mark made before the crash, a snapshot
with every chunk it had stored.

A region is plain shared memory: a store is visible to the next process as
soon as it is made, with no write to disk on the way. Its pages are made
when first touched (a ``memfd`` is sparse), so a region sized for a whole
device costs what is written into it.

Besides memory, regions that outlive the process also hold file descriptors
(:meth:`Regions.hold`): the diff storage of a snapshot (an anonymous file
would vanish with its last descriptor).
"""

from __future__ import annotations

import mmap
import os
import struct

_BLOB = struct.Struct("<Q")


class Regions:
    """Where the engine's regions come from."""

    #: Does what is kept here outlive this process?
    outlives = False

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        """The region ``key`` of ``size`` bytes, and whether it existed
        (a region of another size does not: it is replaced, zeroed)."""
        raise NotImplementedError

    def find(self, key: str) -> mmap.mmap | None:
        """The region ``key`` as it is held, whatever its size; None if none."""
        return None

    def hold(self, key: str, fd: int) -> None:
        """Keep (a duplicate of) descriptor ``fd`` under ``key``."""

    def held_fd(self, key: str) -> int | None:
        """The descriptor kept under ``key`` (owned here: duplicate it to
        keep it), or None."""
        return None

    def held_keys(self) -> list[str]:
        """Every key held (regions and descriptors)."""
        return []

    def drop(self, key: str) -> None:
        """The region or descriptor ``key`` is no longer needed (nothing if
        unknown)."""
        raise NotImplementedError

    # -- small documents ------------------------------------------------------

    def put_blob(self, key: str, data: bytes) -> None:
        """Keep ``data`` under ``key`` (a region of its own), if it outlives
        the process; nothing otherwise."""
        if not self.outlives:
            return
        region, _ = self.open(key, _BLOB.size + len(data))
        region[_BLOB.size :] = data
        _BLOB.pack_into(region, 0, len(data))

    def get_blob(self, key: str) -> bytes | None:
        region = self.find(key)
        if region is None or len(region) < _BLOB.size:
            return None
        (n,) = _BLOB.unpack_from(region)
        if n > len(region) - _BLOB.size:
            return None
        return bytes(region[_BLOB.size : _BLOB.size + n])


def memfd_region(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A sparse ``memfd`` of ``size`` bytes and a shared mapping of it.
    (Unlike an anonymous shared mapping, a memfd is not charged to the
    commit limit for its whole size: only touched pages count.)"""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, max(size, 1))
    except BaseException:
        os.close(fd)
        raise


class LocalRegions(Regions):
    """Memory of this process: never found again."""

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        fd, region = memfd_region(f"blksnap-{key}", size)
        os.close(fd)  # the mapping keeps the memory
        return region, False

    def drop(self, key: str) -> None:
        pass


#: The engine's regions unless it is given others.
LOCAL = LocalRegions()
