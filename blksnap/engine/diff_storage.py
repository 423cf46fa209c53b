"""Difference storage: where the original contents of overwritten chunks go.

Storage is a list of *sources*, each a file descriptor and the byte ranges of
it that may be used:

* a **directory**: an anonymous file is made there (``O_TMPFILE``, or a name
  unlinked at once where the file system lacks it), so it is gone when the
  snapshot releases it, even after a crash; it grows up to its size;
* a **regular file**: used from offset 0 up to the given size (or the given
  sector ranges); the file grows as chunks land;
* a **block device** (opened exclusively): the whole device up to the given
  size, or the given sector ranges;
* **mapped** byte ranges of a served device's backing store: the extents of
  a preallocated file on a file system that the device itself carries (the
  engine finds them with FIEMAP). Chunks go to the device below its tracker,
  through ``via`` (:class:`MappedIO`: the engine sends them through the
  filters that stand for the device itself -- a failing, slow or moving disk
  -- to its backing store, and marks them changed in its CBT), never through
  its gate or tracker, so copy-on-write never writes through the device it
  protects (no recursion, no deadlock with a take's freeze); the file stays
  open so its blocks stay its own. The device's image reads those ranges as
  the zeroes they held at take.

Sources that grow (a directory's anonymous file, a regular file) can hold no
more than their file system has free: free space counts ``statvfs`` too, so
``low_free_space`` comes while there is still room to act on it.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from blksnap.blockstack import set_immutable
from blksnap.engine.device import keep_folios_small, open_backing
from blksnap.engine.gate import may_block
from blksnap.engine.params import Params
from blksnap.errors import InvalidArgument, NoSpace, from_oserror
from blksnap.fileio import LONG_IO, fd_size, pread_cache_first, pwrite_full, storage_identity
from blksnap.units import format_size

if TYPE_CHECKING:
    from blksnap.engine.snapshot_state import SnapshotState

log = logging.getLogger(__name__)

LOCATION_SHIFT = 48
LOCATION_MASK = (1 << LOCATION_SHIFT) - 1
MAX_SOURCES = 1 << 14


class MappedIO(Protocol):
    """The way to the device that holds a mapped source."""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write at ``offset`` of the device; False if the device is not
        served (the source's descriptor is written instead)."""
        ...

    def read(self, offset: int, length: int) -> bytes | bytearray | None:
        """Read; None if the device is not served."""
        ...


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
    #: A mapped source: the device whose backing store ``fd`` is ...
    device: str | None = None
    #: ... the descriptor that keeps the file (and so its blocks) alive ...
    hold_fd: int = -1
    #: ... and the way to it (None: straight to ``fd``).
    via: MappedIO | None = None
    #: Cached data is read with ``RWF_NOWAIT`` first (False: not supported).
    nowait: bool = True
    #: A file blksnap made for the source (removed at release), and whether
    #: it was made immutable (the attribute is cleared at release).
    made: str | None = None
    immutable: bool = False

    @property
    def grows(self) -> bool:
        """Does it take room from its file system as chunks land?"""
        return self.kind in ("anonymous", "file")

    def describe(self) -> dict[str, Any]:
        """What a process taking over needs, beside the descriptors."""
        return {
            "path": self.path,
            "kind": self.kind,
            "ranges": [list(r) for r in self.ranges],
            "identity": list(self.identity),
            "device": self.device,
            "made": self.made,
        }


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


def fs_room(fd: int) -> int:
    """Bytes the file system under ``fd`` can still give an unprivileged
    writer (``f_bavail``); what a growing source can really take."""
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _close(src: StorageSource) -> None:
    if src.immutable:
        set_immutable(src.hold_fd, False)
    if src.made is not None:
        try:
            os.unlink(src.made)
        except OSError as exc:
            log.warning("diff storage file %s not removed: %s", src.made, exc)
    for fd in (src.fd, src.hold_fd):
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _allocated(fd: int) -> int:
    try:
        return os.fstat(fd).st_blocks * 512
    except OSError:
        return 0


class DiffStorage:
    """Chunk slots over one or more sources, with a low-water event."""

    def __init__(
        self,
        params: Params,
        on_low_space: Callable[[dict[str, int]], None] | None = None,
        slot_size: int | None = None,
        keep: SnapshotState | None = None,
    ) -> None:
        """``keep``: the snapshot's regions, where each source and its
        allocation are kept for a process taking over (None: nowhere)."""
        self.params = params
        self.keep = keep
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
        #: No need to look at the growing sources' file systems before this
        #: (monotonic) time: see :meth:`_trim_locked`.
        self._trim_after = 0.0
        #: Device name -> sorted (start, end) byte ranges of it that mapped
        #: sources use (replaced whole when a source is added: read lock-free).
        self.on_devices: dict[str, tuple[tuple[int, int], ...]] = {}
        #: Set (for good) before the first source on a served device goes in
        #: service, and then ``before_device_source`` is called: the images'
        #: compiled short way reads devices whole, without its ranges zeroed.
        self.on_device = False
        self.before_device_source: Callable[[], None] | None = None

    # -- sources ------------------------------------------------------------------

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
                # Chunks land in slots of the file: let them make the folios.
                keep_folios_small(fd, st, settle=True)
                use = self._ranges_for(fd, kind, path, size, ranges)
            except BaseException:
                os.close(fd)
                raise
        src = StorageSource(shown, fd, kind, use, ident)
        if src.grows:
            try:
                self._check_room(src)
            except BaseException:
                os.close(fd)
                raise
        return self._add_source(src, path)

    def add_mapped(
        self,
        path: str,
        fd: int,
        ranges: Sequence[tuple[int, int]],
        *,
        device: str,
        hold_fd: int,
        via: MappedIO | None = None,
        made: str | None = None,
        guard: bool = False,
    ) -> StorageSource:
        """Add byte ``ranges`` of a served device's backing store (``fd``, a
        descriptor of its own) as a source. ``hold_fd`` is the file those
        ranges are the extents of: closed with the source (the file removed
        if blksnap ``made`` it). ``guard``: make it immutable now (else at
        :meth:`guard`). Owns the descriptors, also on failure."""
        st = os.fstat(hold_fd)
        src = StorageSource(
            os.path.abspath(path),
            fd,
            "mapped",
            sorted(ranges),
            storage_identity(st),
            device=device,
            hold_fd=hold_fd,
            via=via,
            made=made,
        )
        self._add_source(src, path)
        if guard:
            self.guard()
        return src

    def guard(self) -> None:
        """Make the files of mapped sources immutable (cleared at release)."""
        with self._lock:
            todo = [s for s in self.sources if s.kind == "mapped" and not s.immutable]
            for src in todo:
                src.immutable = set_immutable(src.hold_fd, True)
                if not src.immutable:
                    log.warning(
                        "diff storage %s: cannot make it immutable: leave it alone", src.path
                    )

    def _check_room(self, src: StorageSource) -> None:
        """A growing source may not promise more than its file system holds."""
        want = sum(length for _, length in src.ranges)
        room = fs_room(src.fd) + _allocated(src.fd)
        if want > room:
            raise NoSpace(
                f"diff storage {src.path}: {format_size(want)} asked for, but its file "
                f"system can hold only {format_size(room)} more: give a smaller limit "
                "(-l), or storage on a larger file system"
            )

    def _add_source(self, src: StorageSource, path: str) -> StorageSource:
        """Put ``src`` in service; on failure its descriptors are closed."""
        src.slots_total = sum(length // self.slot_size for _, length in src.ranges)
        if src.slots_total == 0:
            _close(src)
            raise InvalidArgument(
                f"diff storage {path} has room for no chunk of {self.slot_size} bytes"
            )
        with self._lock:
            if self._released:
                _close(src)
                raise InvalidArgument("diff storage already released")
            if src.device is not None:
                self.on_device = True
                if self.before_device_source is not None:
                    self.before_device_source()
            if self.keep is not None:
                # Kept before it serves: a slot of it in a chunk map is
                # always found again.
                try:
                    self.keep.keep_source(len(self.sources), src.describe(), src.fd, src.hold_fd)
                except BaseException:
                    _close(src)
                    raise
            self.sources.append(src)
            self._save_row(len(self.sources) - 1)
            self._slots_total += src.slots_total
            self._trim_after = 0.0
            if src.device is not None:
                ranges = {
                    *self.on_devices.get(src.device, ()),
                    *((o, o + n) for o, n in src.ranges),
                }
                self.on_devices = {**self.on_devices, src.device: tuple(sorted(ranges))}
            free = self._usable_free_locked()
            if free >= self._threshold_locked(free):
                self._low_space_sent = False
        log.info("diff storage: added %s %s, %d chunk slots", src.kind, src.path, src.slots_total)
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
        """Bytes that can still be stored: free slots, of growing sources
        only as many as their file systems can still hold."""
        with self._lock:
            return self._usable_free_locked()

    def _free_locked(self) -> int:
        return (self._slots_total - self._slots_used) * self.slot_size

    def _usable_free_locked(self) -> int:
        """Free slots, after :meth:`_trim_locked`."""
        self._trim_locked()
        return self._free_locked()

    def _trim_locked(self) -> None:
        """Cap each growing source at the slots its file system can still
        hold (``statvfs``; the sources on one file system share its room),
        so that allocation moves on to other storage instead of failing
        with ENOSPC, and free space is what can really be stored. A
        source's room: what its file system can give, plus the blocks the
        file holds beyond the slots handed out (minus slots handed out and
        not yet written). Capacity only shrinks: room freed later is not
        taken back (``appendstorage`` adds more)."""
        now = time.monotonic()
        if now < self._trim_after:
            return
        slot = self.slot_size
        rooms: dict[int, int] = {}
        for index in range(self._next_source, len(self.sources)):
            src = self.sources[index]
            left = src.slots_total - src.slots_used
            if not left or not src.grows:
                continue
            fs = src.identity[0]
            if fs not in rooms:
                rooms[fs] = fs_room(src.fd)
            fit = max(0, rooms[fs] + _allocated(src.fd) - src.slots_used * slot) // slot
            if fit < left:
                self._slots_total -= left - fit
                src.slots_total = src.slots_used + fit
                self._save_row(index)
                if not fit:
                    log.warning("diff storage %s: its file system is full", src.path)
            rooms[fs] -= min(left, fit) * slot
        # Room to spare beyond every promise: others must write that much
        # before a promise breaks, so the next look can wait a little.
        spare = min(rooms.values(), default=1 << 62)
        p = self.params
        self._trim_after = now + (p.storage_fs_recheck if spare >= p.storage_fs_spare else 0.0)

    def _threshold_locked(self, free: int | None = None) -> int:
        """The low-water mark, against what can really be stored."""
        if free is None:
            free = self._usable_free_locked()
        cap = self._slots_used * self.slot_size + free
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
            free = self._usable_free_locked()
            if free >= count * self.slot_size:
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
                    if self.keep is not None:
                        self._save_row(index)  # before the slot is used
                self._next_source = index
                self._slots_used += len(out)
            event = self._low_space_event_locked(
                (count - len(out)) * self.slot_size, free - len(out) * self.slot_size
            )
        if event is not None and self._on_low_space is not None:
            self._on_low_space(event)
        if not out:
            raise NoSpace(
                f"diff storage full: {count * self.slot_size} bytes needed, "
                f"{self.free} of {self.capacity} free in {len(self.sources)} source(s)"
            )
        return out

    def _low_space_event_locked(self, unmet: int, free: int | None = None) -> dict[str, int] | None:
        """The ``low_free_space`` event's data if it is due (``free``: what
        :meth:`_usable_free_locked` says, if the caller just asked)."""
        if self._low_space_sent:
            return None
        if free is None:
            free = self._usable_free_locked()
        threshold = self._threshold_locked(free)
        if free >= threshold and not unmet:
            return None
        self._low_space_sent = True
        return {
            "free": free,
            "capacity": self.capacity,
            "requested": max(threshold * 2, unmet, self.slot_size),
        }

    def _save_row(self, index: int) -> None:
        """Source ``index``'s allocation into its kept row (under the lock)."""
        if self.keep is None:
            return
        src = self.sources[index]
        self.keep.row(index)[:] = (*src.cursor, src.slots_used, src.slots_total)

    # -- a process taking over ------------------------------------------------

    @classmethod
    def resume(
        cls,
        params: Params,
        keep: SnapshotState,
        slot_size: int,
        on_low_space: Callable[[dict[str, int]], None] | None,
        via_for: Callable[[str], MappedIO | None],
    ) -> DiffStorage:
        """The diff storage a process before this one left in ``keep``:
        every source with its descriptors (duplicated here) and allocation.
        ``InvalidArgument`` if a descriptor is not the file it was."""
        self = cls(params, on_low_space, slot_size, keep)
        try:
            self._resume_sources(keep, via_for)
        except BaseException:
            self.release()
            raise
        return self

    def _resume_sources(
        self,
        keep: SnapshotState,
        via_for: Callable[[str], MappedIO | None],
    ) -> None:
        for index, (desc, kept_fd, kept_hold) in enumerate(keep.sources()):
            fd = os.dup(kept_fd)
            hold = os.dup(kept_hold) if kept_hold >= 0 else -1
            src = StorageSource(
                str(desc["path"]),
                fd,
                str(desc["kind"]),
                [(int(o), int(n)) for o, n in desc["ranges"]],
                (int(desc["identity"][0]), int(desc["identity"][1])),
                device=desc.get("device"),
                hold_fd=hold,
                made=desc.get("made"),
            )
            self.sources.append(src)  # (closed at release, whatever follows)
            ident = storage_identity(os.fstat(hold if hold >= 0 else fd))
            if ident != src.identity:
                raise InvalidArgument(
                    f"diff storage {src.path}: the descriptor kept is not the file it was"
                )
            rindex, pos, used, total = (int(v) for v in keep.row(index))
            if total == 0 and used == 0:  # kept, never put in service
                total = sum(length // self.slot_size for _, length in src.ranges)
            src.cursor, src.slots_used, src.slots_total = (rindex, pos), used, total
            self._slots_total += total
            self._slots_used += used
            if src.device is not None:
                self.on_device = True
                src.via = via_for(src.device)
                ranges = {*self.on_devices.get(src.device, ()),
                          *((o, o + n) for o, n in src.ranges)}  # fmt: skip
                self.on_devices = {**self.on_devices, src.device: tuple(sorted(ranges))}
            self._save_row(index)
        sources = self.sources
        while (
            self._next_source < len(sources)
            and sources[self._next_source].slots_used == sources[self._next_source].slots_total
        ):
            self._next_source += 1

    # -- I/O ------------------------------------------------------------------

    def _where(self, location: int) -> tuple[StorageSource, int]:
        return self.sources[location >> LOCATION_SHIFT], location & LOCATION_MASK

    def write(self, location: int, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Into the page cache, which does not wait for the disk (nor calls
        :data:`may_block`); a large piece lets the front-end serve on."""
        src, base = self._where(location)
        if len(data) >= LONG_IO:
            may_block()
        if src.via is not None and src.via.write(base + offset, data):
            return
        try:
            pwrite_full(src.fd, base + offset, data)
        except OSError as exc:
            raise from_oserror(exc, f"diff storage {src.path}") from None

    def devices_used(self) -> set[str]:
        """Served devices whose backing stores hold mapped sources."""
        return set(self.on_devices)

    def read(self, location: int, length: int, offset: int = 0) -> bytes | bytearray:
        """Cached data without waiting, :data:`may_block` before the disk
        (:func:`~blksnap.fileio.pread_cache_first`)."""
        src, base = self._where(location)
        if src.via is not None:
            got = src.via.read(base + offset, length)
            if got is not None:
                return got
        try:
            data, src.nowait = pread_cache_first(src.fd, base + offset, length, src.nowait)
        except OSError as exc:
            raise from_oserror(exc, f"diff storage {src.path}") from None
        return data

    def release(self) -> None:
        """Close every source; anonymous files vanish with their descriptor.
        The low-space callback goes too: nothing to tell any more, and it
        would keep its snapshot (and the regions it holds) alive in a cycle
        until the garbage collector came by."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._on_low_space = None
            sources = list(self.sources)
        for src in sources:
            _close(src)
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
