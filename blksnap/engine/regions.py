"""Named memory regions the engine keeps state in (the CBT maps).

The engine asks :class:`Regions` for a region by key and size, and says when
it is done with one. :class:`LocalRegions` gives anonymous memory that ends
with the process. blksnapd's worker gives memory its supervisor holds
(``memfd``; :mod:`blksnap.control.regions`), so a region outlives a crash of
the worker and the next worker finds it as it was left: the CBT of a device
comes back with the same generation and every mark made before the crash.

A region is plain shared memory: a store is visible to the next process as
soon as it is made, with no write to disk on the way.
"""

from __future__ import annotations

import mmap


class Regions:
    """Where the engine's regions come from."""

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        """The region ``key`` of ``size`` bytes, and whether it existed
        (a region of another size does not: it is replaced, zeroed)."""
        raise NotImplementedError

    def drop(self, key: str) -> None:
        """The region ``key`` is no longer needed (nothing if unknown)."""
        raise NotImplementedError


class LocalRegions(Regions):
    """Anonymous memory of this process: never found again."""

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        return mmap.mmap(-1, max(size, 1)), False

    def drop(self, key: str) -> None:
        pass


#: The engine's regions unless it is given others.
LOCAL = LocalRegions()
