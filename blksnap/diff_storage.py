"""Difference storage: where the original contents of overwritten chunks go.

Storage is a list of *sources*, each a file descriptor and the byte ranges of
it that may be used:

* a **directory**: an anonymous file is made there (``O_TMPFILE``, or a name
  unlinked at once where the file system lacks it), so it is gone when the
  snapshot releases it, even after a crash; it grows up to its size;
* a **regular file**: used from offset 0 up to the given size (or the given
  sector ranges); the file grows as chunks land;
* a **block device** (opened exclusively): the whole device up to the given
  size, or the given sector ranges.

Space is handed out one chunk slot at a time. A location packs the source
index and the byte offset in one int (16 + 48 bits) so the chunk map can keep
it in an int64. When free space falls under the low-water mark a
``low_free_space`` event is queued (once, re-armed when storage is appended);
when no slot is left :class:`NoSpace` is raised and the diff area turns the
snapshot corrupted.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .device import fd_size, open_backing, pread_full, pwrite_full, storage_identity
from .errors import InvalidArgument, NoSpace, from_oserror
from .params import Params

log = logging.getLogger(__name__)

LOCATION_SHIFT = 48
LOCATION_MASK = (1 << LOCATION_SHIFT) - 1
MAX_SOURCES = 1 << 14


@dataclass
class StorageSource:
    path: str
    fd: int
    kind: str  # "anonymous" | "file" | "blockdev"
    ranges: list[tuple[int, int]]
    identity: tuple[int, int]
    #: Next free (range index, offset within that range).
    cursor: tuple[int, int] = (0, 0)
    slots_total: int = 0
    slots_used: int = 0
    extras: dict[str, object] = field(default_factory=dict)


def _make_anonymous(directory: str) -> tuple[int, str]:
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), directory
    except OSError as exc:
        if exc.errno not in (95, 22, 21):  # EOPNOTSUPP, EINVAL, EISDIR: no O_TMPFILE here
            raise from_oserror(exc, f"diff storage in {directory}") from None
    fd, name = tempfile.mkstemp(prefix=".blksnap-diff-", dir=directory)
    os.unlink(name)
    log.info("no O_TMPFILE in %s: using an unlinked temporary file", directory)
    return fd, directory


class DiffStorage:
    """Chunk slots over one or more sources, with a low-water event."""

    def __init__(
        self,
        params: Params,
        on_low_space: Callable[[dict[str, int]], None] | None = None,
        slot_size: int | None = None,
    ) -> None:
        self.params = params
        self.slot_size = slot_size or params.chunk_size
        self.sources: list[StorageSource] = []
        self._lock = threading.Lock()
        self._on_low_space = on_low_space
        self._low_space_sent = False
        self._released = False
        # Running totals and the first source with room: allocation is O(1)
        # however many sources ``appendstorage`` has added.
        self._slots_total = 0
        self._slots_used = 0
        self._next_source = 0

    # -- sources ------------------------------------------------------------------

    @staticmethod
    def identity(path: str) -> tuple[int, int] | None:
        """What makes two paths the same storage (None for a directory)."""
        st = os.stat(path)
        return None if stat.S_ISDIR(st.st_mode) else storage_identity(st)

    def add(
        self,
        path: str,
        *,
        size: int | None = None,
        ranges: Sequence[tuple[int, int]] | None = None,
    ) -> StorageSource:
        """Add a source. ``ranges`` are byte (offset, length) pairs;
        ``size`` bounds a directory, a file or a whole device."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise from_oserror(exc, f"diff storage {path}") from None
        if len(self.sources) >= MAX_SOURCES:
            raise InvalidArgument("too many diff storage sources")
        if size is not None and size <= 0:
            raise InvalidArgument(f"diff storage size must be positive, not {size}")
        if stat.S_ISDIR(st.st_mode):
            if ranges:
                raise InvalidArgument("sector ranges make no sense for a directory")
            if size is None:
                raise InvalidArgument(f"a size (limit) is needed for storage in directory {path}")
            fd, shown = _make_anonymous(path)
            kind, use = "anonymous", [(0, size)]
            ident = storage_identity(os.fstat(fd))
        else:
            fd, st = open_backing(path)
            shown = os.path.abspath(path)
            kind = "blockdev" if stat.S_ISBLK(st.st_mode) else "file"
            ident = storage_identity(st)
            try:
                use = self._ranges_for(fd, kind, path, size, ranges)
            except BaseException:
                os.close(fd)
                raise
        src = StorageSource(shown, fd, kind, use, ident)
        src.slots_total = sum(length // self.slot_size for _, length in use)
        if src.slots_total == 0:
            os.close(fd)
            raise InvalidArgument(
                f"diff storage {path} has room for no chunk of {self.slot_size} bytes"
            )
        with self._lock:
            if self._released:
                os.close(fd)
                raise InvalidArgument("diff storage already released")
            self.sources.append(src)
            self._slots_total += src.slots_total
            if self._free_locked() >= self._threshold_locked():
                self._low_space_sent = False
        log.info("diff storage: added %s %s, %d chunk slots", kind, shown, src.slots_total)
        return src

    @staticmethod
    def _ranges_for(
        fd: int,
        kind: str,
        path: str,
        size: int | None,
        ranges: Sequence[tuple[int, int]] | None,
    ) -> list[tuple[int, int]]:
        current = fd_size(fd)
        if ranges:
            out = []
            for off, length in ranges:
                if off < 0 or length <= 0:
                    raise InvalidArgument(f"bad range {off}+{length} on {path}")
                if kind == "blockdev" and off + length > current:
                    raise InvalidArgument(f"range {off}+{length} is past the end of {path}")
                out.append((off, length))
            out.sort()
            for (a, alen), (b, _) in itertools.pairwise(out):
                if a + alen > b:
                    raise InvalidArgument(f"overlapping ranges on {path}")
            return out
        if kind == "blockdev":
            return [(0, min(current, size) if size else current)]
        # A regular file: the requested size, else what it already holds.
        length = size if size is not None else current
        if length <= 0:
            raise InvalidArgument(f"{path} is empty: give a size for it to grow to")
        return [(0, length)]

    # -- space --------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._slots_total * self.slot_size

    @property
    def used(self) -> int:
        return self._slots_used * self.slot_size

    @property
    def free(self) -> int:
        with self._lock:
            return self._free_locked()

    def _free_locked(self) -> int:
        return (self._slots_total - self._slots_used) * self.slot_size

    def _threshold_locked(self) -> int:
        cap = self._slots_total * self.slot_size
        return min(self.params.low_free_space_bytes, int(cap * self.params.low_free_space_fraction))

    def alloc(self) -> int:
        """One chunk slot; its packed location. ``NoSpace`` when storage is full."""
        return self.alloc_many(1)[0]

    def alloc_many(self, count: int) -> list[int]:
        """``count`` chunk slots, adjacent where the storage allows; all or
        none (``NoSpace`` when fewer are left, after the low-space event)."""
        out: list[int] = []
        with self._lock:
            if self._released:
                raise NoSpace("diff storage released")
            if self._free_locked() >= count * self.slot_size:
                index = self._next_source
                while len(out) < count:
                    src = self.sources[index]
                    if src.slots_used == src.slots_total:
                        index += 1
                        continue
                    rindex, pos = src.cursor
                    roff, rlen = src.ranges[rindex]
                    if pos + self.slot_size > rlen:
                        src.cursor = (rindex + 1, 0)
                        continue
                    src.cursor = (rindex, pos + self.slot_size)
                    src.slots_used += 1
                    out.append((index << LOCATION_SHIFT) | (roff + pos))
                self._next_source = index
                self._slots_used += len(out)
            event = self._low_space_event_locked(count * self.slot_size - len(out) * self.slot_size)
        if event is not None and self._on_low_space is not None:
            self._on_low_space(event)
        if not out:
            raise NoSpace(
                f"diff storage full: {count * self.slot_size} bytes needed, "
                f"{self.free} of {self.capacity} free in {len(self.sources)} source(s)"
            )
        return out

    def _low_space_event_locked(self, unmet: int) -> dict[str, int] | None:
        free = self._free_locked()
        threshold = self._threshold_locked()
        if (free >= threshold and not unmet) or self._low_space_sent:
            return None
        self._low_space_sent = True
        return {
            "free": free,
            "capacity": self.capacity,
            "requested": max(threshold * 2, unmet, self.slot_size),
        }

    # -- I/O ------------------------------------------------------------------

    def _where(self, location: int) -> tuple[StorageSource, int]:
        return self.sources[location >> LOCATION_SHIFT], location & LOCATION_MASK

    def write(self, location: int, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        src, base = self._where(location)
        try:
            pwrite_full(src.fd, base + offset, data)
        except OSError as exc:
            raise from_oserror(exc, f"diff storage {src.path}") from None

    def read(self, location: int, length: int, offset: int = 0) -> bytes:
        src, base = self._where(location)
        try:
            return pread_full(src.fd, base + offset, length)
        except OSError as exc:
            raise from_oserror(exc, f"diff storage {src.path}") from None

    def release(self) -> None:
        """Close every source; anonymous files vanish with their descriptor."""
        with self._lock:
            if self._released:
                return
            self._released = True
            sources = list(self.sources)
        for src in sources:
            try:
                os.close(src.fd)
            except OSError:
                pass
        log.info("diff storage released (%d source(s))", len(sources))

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "path": s.path,
                "kind": s.kind,
                "capacity": s.slots_total * self.slot_size,
                "used": s.slots_used * self.slot_size,
            }
            for s in self.sources
        ]
