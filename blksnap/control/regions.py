"""Memory regions and descriptors a worker's supervisor holds
(:class:`SupervisedRegions`).

A region is a ``memfd`` the worker makes, maps and hands to its supervisor
(``store KEY`` with the fd, over their socket pair) before it uses it; a held
descriptor (diff storage) is handed over the same way. The supervisor holds
the fds across workers and gives every new worker all it holds; the new
worker maps them again and finds them as the dead one left them. ``drop
KEY`` lets one go.
"""

from __future__ import annotations

import logging
import mmap
import os

from blksnap.control.supervisor import Inherited
from blksnap.engine.regions import Regions, memfd_region

log = logging.getLogger("blksnapd")


class SupervisedRegions(Regions):
    outlives = True

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
                return mmap.mmap(fd, max(size, 1)), True
            log.info("region %s: %d bytes held, %d wanted: made anew", key,
                     os.fstat(fd).st_size, size)  # fmt: skip
            self.drop(key)
        fd, region = memfd_region(f"blksnap-{key}", size)
        self.inherited.tell(f"store {key}", fd)
        self.fds[key] = fd
        return region, False

    def find(self, key: str) -> mmap.mmap | None:
        fd = self.fds.get(key)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            return mmap.mmap(fd, size) if size else None
        except (OSError, ValueError) as exc:
            log.warning("region %s held but not mappable: %s", key, exc)
            return None

    def hold(self, key: str, fd: int) -> None:
        self.drop(key)
        mine = os.dup(fd)
        os.set_inheritable(mine, False)
        self.inherited.tell(f"store {key}", mine)
        self.fds[key] = mine

    def held_fd(self, key: str) -> int | None:
        return self.fds.get(key)

    def held_keys(self) -> list[str]:
        return sorted(self.fds)

    def drop(self, key: str) -> None:
        fd = self.fds.pop(key, None)
        if fd is not None:
            self.inherited.tell(f"drop {key}")
            os.close(fd)
