"""Memory regions a worker's supervisor holds (:class:`SupervisedRegions`).

A region is a ``memfd`` the worker makes, maps and hands to its supervisor
(``store KEY`` with the fd, over their socket pair) before it uses it. The
supervisor holds the fd across workers and gives every new worker all it
holds; the new worker maps them again and finds them as the dead one left
them. ``drop KEY`` lets one go.
"""

from __future__ import annotations

import logging
import mmap
import os

from blksnap.control.supervisor import Inherited
from blksnap.engine.regions import Regions

log = logging.getLogger("blksnapd")


class SupervisedRegions(Regions):
    def __init__(self, inherited: Inherited) -> None:
        self.inherited = inherited
        #: key -> fd of this process (from the supervisor, or made here).
        self.fds: dict[str, int] = dict(inherited.stored)
        for fd in self.fds.values():
            os.set_inheritable(fd, False)

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        fd = self.fds.get(key)
        if fd is not None:
            if os.fstat(fd).st_size == size:
                return mmap.mmap(fd, size), True
            log.info("region %s: %d bytes held, %d wanted: made anew", key,
                     os.fstat(fd).st_size, size)  # fmt: skip
            self.drop(key)
        fd = os.memfd_create(f"blksnap-{key}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.inherited.tell(f"store {key}", fd)
        self.fds[key] = fd
        return region, False

    def drop(self, key: str) -> None:
        fd = self.fds.pop(key, None)
        if fd is not None:
            self.inherited.tell(f"drop {key}")
            os.close(fd)

    def held(self) -> list[str]:
        return sorted(self.fds)
