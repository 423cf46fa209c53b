"""Per-device copy-on-write state of a snapshot: which chunks hold their
original data in diff storage, and the state machine that gets them there.

A chunk is *new* (its original is still on the device), *loading* (one
thread is copying the original out; others wait until it is done), *stored*
(diff storage holds it: the image reads it there and device writes to it go
straight through) or, once the snapshot is corrupted, nothing matters any
more: copy-on-write stops and the device keeps working.

The chunk map lives in a region (:mod:`blksnap.engine.regions`): a header
(capacity, chunk size, the error that corrupted the snapshot), a directory
of pages, and pages of ``chunk_map_page`` int64s, each the packed
diff-storage location (+1, so 0 means "not stored") of one chunk. A page is
marked in the directory before its first chunk is stored and never read
before, so its memory is made only then: memory follows the chunks touched,
not the device size. In memory its pages are numpy views, found in a dict.
A process taking over (blksnapd's next worker) finds the region as it was
left and carries on: a location is published (one aligned 8-byte store)
only once the chunk's copy is in diff storage, so a chunk whose copy was
cut short counts as not stored, and its device write had not been let
through.

Ordering rules (the hard part, as in the kernel):

* a device write to a chunk returns only after that chunk's original is in
  diff storage: ``cow`` claims every new chunk of the range, copies them, and
  waits for chunks another thread is loading;
* an image read never sees a half-copied chunk or new data: it reads chunks
  not yet stored from the device *first* and checks their state *after*;
  the location is published before the device write is let through, so a
  chunk that is still unstored after the read was not overwritten during it.
  Chunks found stored are read from diff storage instead.
"""

from __future__ import annotations

import errno
import logging
import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from blksnap import shortway
from blksnap.engine.device import Device
from blksnap.engine.diff_storage import DiffStorage
from blksnap.engine.filters import Bio, Op
from blksnap.engine.gate import may_block
from blksnap.engine.params import Params
from blksnap.engine.regions import LOCAL
from blksnap.errors import BlksnapError, InvalidArgument, IOFailure

log = logging.getLogger(__name__)

_MAGIC = 0x6273617265613031  # "bsarea01"
_HEADER_WORDS = 512  # 4 KiB: magic, capacity, chunk size, page size, error, stats
_ALIGN = 4096


def _layout(capacity: int, chunk_size: int, page_size: int) -> tuple[int, int, int]:
    """(pages, byte offset of page 0, region size) of a chunk map."""
    chunks = (capacity + chunk_size - 1) // chunk_size
    pages = (chunks + page_size - 1) // page_size
    first = _HEADER_WORDS * 8 + (pages + _ALIGN - 1) // _ALIGN * _ALIGN
    return pages, first, first + pages * page_size * 8


def region_size(capacity: int, chunk_size: int, page_size: int) -> int:
    """Bytes of the region a chunk map of this shape needs (sparse)."""
    return _layout(capacity, chunk_size, page_size)[2]


def _nobody(exc: BlksnapError) -> None:
    """Where a disowned diff area's failures go."""


class DiffArea:
    def __init__(
        self,
        device: Device,
        storage: DiffStorage,
        params: Params,
        on_error: Callable[[BlksnapError], None],
        region: mmap.mmap | None = None,
        *,
        resumed: bool = False,
    ) -> None:
        """``region``: where the chunk map lives (of :func:`region_size`;
        None: memory of this process). ``resumed``: the region holds the
        map a process before this one left: carry on from it."""
        self.device = device
        self.storage = storage
        #: The snapshot's chunk size: one diff storage slot.
        self.chunk_size = storage.slot_size
        self.chunk_shift = self.chunk_size.bit_length() - 1
        self.page_size = params.chunk_map_page
        self.max_io = params.max_io_size
        #: Device capacity frozen at take: the image's size.
        self.capacity = device.size
        self._pages: dict[int, np.ndarray] = {}
        #: The same pages as memoryviews (an item of one reads as an int in
        #: a third of a numpy item's time: the check of every write).
        self._views: dict[int, memoryview] = {}
        #: errno of the failure that corrupted the snapshot, 0 while healthy.
        self.error = 0
        self.chunks_stored = 0
        if region is None:
            size = region_size(self.capacity, self.chunk_size, self.page_size)
            region, _ = LOCAL.open("area", size)
        self._region = region
        self._head = np.frombuffer(region, dtype=np.int64, count=_HEADER_WORDS)
        #: The image's I/O counters (bytes read, reads, bytes written), kept
        #: here so that they carry on too.
        self.stats = self._head[5:8]
        if resumed:
            self._resume()
        else:
            self._head[1:4] = (self.capacity, self.chunk_size, self.page_size)
            self._head[0] = _MAGIC
        self.chunk_count = (self.capacity + self.chunk_size - 1) >> self.chunk_shift
        pages, self._pages_at, _ = _layout(self.capacity, self.chunk_size, self.page_size)
        self._directory = np.frombuffer(
            region, dtype=np.uint8, count=pages, offset=_HEADER_WORDS * 8
        )
        if resumed:
            for pno in np.flatnonzero(self._directory).tolist():
                page = self._page_view(pno)
                self._pages[pno] = page
                self._views[pno] = memoryview(page)
                self.chunks_stored += int(np.count_nonzero(page))
        #: Chunks a thread is copying; threads that need one of them wait on
        #: ``_loaded`` (counted in ``_waiters``, so a copy that nobody waits
        #: for wakes nobody).
        self._loading: set[int] = set()
        self._lock = threading.Lock()
        self._loaded = threading.Condition(self._lock)
        self._waiters = 0
        self._on_error = on_error
        self.armed = False

    def _resume(self) -> None:
        head = self._head
        magic, capacity, chunk_size, page_size, error = (int(v) for v in head[:5])
        if magic != _MAGIC or chunk_size != self.chunk_size or page_size != self.page_size:
            raise InvalidArgument(
                f"chunk map of {self.device.name} left by the process before is not one "
                f"(magic {magic:#x}, chunk {chunk_size}, page {page_size})"
            )
        need = region_size(capacity, chunk_size, page_size)
        if len(self._region) < need:
            raise InvalidArgument(
                f"chunk map of {self.device.name}: {len(self._region)} bytes left, {need} needed"
            )
        self.capacity = capacity
        self.error = error

    def _page_view(self, pno: int) -> np.ndarray:
        return np.frombuffer(
            self._region,
            dtype=np.int64,
            count=self.page_size,
            offset=self._pages_at + pno * self.page_size * 8,
        )

    # -- chunk map ------------------------------------------------------------------

    def _location(self, chunk: int) -> int:
        page = self._pages.get(chunk // self.page_size)
        if page is None:
            return 0
        return int(page[chunk % self.page_size])

    def _locations(self, first: int, last: int) -> np.ndarray:
        """Stored locations (+1; 0 = not stored) of chunks first..last."""
        out = np.zeros(last - first + 1, dtype=np.int64)
        ps = self.page_size
        chunk = first
        while chunk <= last:
            pno, start = divmod(chunk, ps)
            n = min(ps - start, last - chunk + 1)
            page = self._pages.get(pno)
            if page is not None:
                out[chunk - first : chunk - first + n] = page[start : start + n]
            chunk += n
        return out

    def _publish(self, chunk: int, location: int) -> None:
        pno, idx = divmod(chunk, self.page_size)
        page = self._pages.get(pno)
        if page is None:  # (under the lock: one thread makes it)
            self._directory[pno] = 1
            page = self._pages[pno] = self._page_view(pno)
            self._views[pno] = memoryview(page)
        # The fences order it for the compiled short way's readers, which
        # take a chunk found here as copied (its rewrites) and one not found
        # as untouched on the device (image reads): the copy before the
        # entry, the entry before the device write that follows it. (x86-64
        # orders plain stores so already; other machines need them.)
        shortway.fence()
        page[idx] = location + 1
        shortway.fence()
        self.chunks_stored += 1

    @property
    def map_bytes(self) -> int:
        """Memory held by the chunk map."""
        return sum(p.nbytes for p in self._pages.values())

    # -- failure ------------------------------------------------------------------

    def fail(self, exc: BlksnapError) -> None:
        """Diff storage could not take a chunk: stop copy-on-write for good."""
        if self.error:
            return
        # (The word first: a device write that finds ``error`` set goes on
        # without copy-on-write, and a read of the compiled short way that
        # saw its data must then find the word set.)
        self._head[4] = exc.errno or errno.EIO
        shortway.fence()
        self.error = exc.errno or errno.EIO
        log.error("snapshot of %s corrupted: %s", self.device.name, exc)
        self._on_error(exc)

    def disown(self) -> None:
        """Its snapshot is destroyed: a failure has no one to tell (and the
        callback would keep the snapshot, with this area's chunk map, alive
        in a cycle until the garbage collector came by)."""
        self._on_error = _nobody

    def check(self) -> None:
        if self.error:
            raise IOFailure(
                f"snapshot image of {self.device.name} is corrupted "
                f"({errno.errorcode.get(self.error, self.error)})"
            )

    # -- copy-on-write ------------------------------------------------------------

    def _claim(self, first: int, last: int) -> tuple[list[int], list[int]]:
        """Claim the new chunks of first..last for this thread to copy; return
        them, and the chunks of the range other threads are copying."""
        if first == last:  # one chunk: the common case, without numpy
            with self._lock:
                if self._location(first):
                    return [], []
                if first in self._loading:
                    return [], [first]
                self._loading.add(first)
                return [first], []
        locs = self._locations(first, last)
        todo = [first + int(i) for i in np.flatnonzero(locs == 0)]
        mine: list[int] = []
        theirs: list[int] = []
        if not todo:
            return mine, theirs
        with self._lock:
            for chunk in todo:
                if chunk in self._loading:
                    theirs.append(chunk)
                elif self._location(chunk) == 0:
                    self._loading.add(chunk)
                    mine.append(chunk)
        return mine, theirs

    def _wait_loaded(self, chunks: list[int]) -> None:
        """Until no chunk of ``chunks`` is being copied any more (each is
        stored then, or the snapshot failed)."""
        loading = self._loading
        with self._loaded:
            if not any(c in loading for c in chunks):
                return
        may_block()
        with self._loaded:
            self._waiters += 1
            try:
                while any(c in loading for c in chunks):
                    self._loaded.wait()
            finally:
                self._waiters -= 1

    def _copy(self, chunks: list[int]) -> None:
        """Copy the originals of claimed chunks into diff storage, in runs of
        adjacent chunks read with one request each."""
        try:
            if len(chunks) == 1:
                self._copy_run(chunks)
                return
            start = 0
            max_run = max(1, self.max_io >> self.chunk_shift)
            while start < len(chunks):
                end = start + 1
                while (
                    end < len(chunks)
                    and chunks[end] == chunks[end - 1] + 1
                    and end - start < max_run
                ):
                    end += 1
                self._copy_run(chunks[start:end])
                start = end
        finally:
            with self._lock:
                self._loading.difference_update(chunks)
                if self._waiters:
                    self._loaded.notify_all()

    def _copy_run(self, run: list[int]) -> None:
        if self.error:
            return
        cs = self.chunk_size
        offset = run[0] << self.chunk_shift
        length = min(len(run) * cs, self.capacity - offset)
        try:
            data = memoryview(self._read_device(offset, length))
            locations = self.storage.alloc_many(len(run))
            # Slots handed out together are mostly adjacent: one write per stretch.
            i = 0
            while i < len(run):
                j = i + 1
                while j < len(run) and locations[j] == locations[j - 1] + cs:
                    j += 1
                self.storage.write(locations[i], data[i * cs : j * cs])
                i = j
            with self._lock:
                for chunk, location in zip(run, locations, strict=True):
                    self._publish(chunk, location)
        except BlksnapError as exc:
            self.fail(exc)

    def _none_stored(self, first: int, last: int) -> bool:
        """No chunk of first..last is stored (pages never made hold none)."""
        ps = self.page_size
        if first == last:  # one chunk (a small read: twice per image read), without a slice
            pno, idx = divmod(first, ps)
            page = self._pages.get(pno)
            return page is None or not page[idx]
        for pno in range(first // ps, last // ps + 1):
            page = self._pages.get(pno)
            if page is not None:
                base = pno * ps
                a, b = max(first, base) - base, min(last, base + ps - 1) - base + 1
                if np.count_nonzero(page[a:b]):
                    return False
        return True

    def _all_stored(self, first: int, last: int) -> bool:
        ps = self.page_size
        pno, start = divmod(first, ps)
        if last < (pno + 1) * ps:  # one page: the common case
            page = self._pages.get(pno)
            if page is None:
                return False
            # (cheaper than a ufunc reduction such as .all(): this runs on
            # every device write of a snapshot, and is the fast path's check)
            if first == last:
                return bool(page[start])
            n = last - first + 1
            return np.count_nonzero(page[start : start + n]) == n
        return bool(self._locations(first, last).all())

    def short_way(self) -> tuple[tuple[int, int, int], tuple[Any, ...]]:
        """(chunk map address, chunk shift, capacity) for the compiled short
        way (:meth:`Tracker.short_way`), and what owns the map. The pages
        lie in one region, chunk after chunk (a page not made yet reads as
        zeros: not stored), so the map is one array of int64 from
        ``_pages_at``."""
        return (int(self._head.ctypes.data) + self._pages_at, self.chunk_shift,
                self.capacity), (self._head,)  # fmt: skip

    def image_short_way(self) -> tuple[int, int]:
        """(error word address, stats address) for an image's compiled
        short way (:meth:`Image.open_short_way`): the words it checks and
        counts in, in the region (they carry on with it)."""
        base = int(self._head.ctypes.data)
        return base + 4 * 8, base + 5 * 8

    def write_needs_copy(self, offset: int, length: int) -> bool:
        """Could :meth:`cow` for this device write copy a chunk or wait for
        one? False only when it is sure to return at once: copy-on-write not
        armed, the snapshot corrupted, the range past the capacity frozen at
        take, or every chunk it touches already stored. A chunk being loaded
        is not stored yet (its location is published when its copy is
        safe), so it answers True for it, as for a new chunk.

        Lock-free, and an answer of False stays true for this diff area:
        ``armed`` and ``error`` are only ever set, a stored chunk is never
        unstored, and a chunk is published only once its copy is in diff
        storage. (Which diff area a device's writes meet changes only while
        its gate is drained: see :meth:`Tracker.write_may_wait`.)
        """
        if not self.armed or self.error or length <= 0:
            return False
        end = offset + length
        if end > self.capacity:  # (not min(): a third of this method's time)
            end = self.capacity
            if offset >= end:
                return False
        shift = self.chunk_shift
        first, last = offset >> shift, (end - 1) >> shift
        if first == last:  # (one chunk: most writes; _all_stored's, one call less)
            pno, idx = divmod(first, self.page_size)
            view = self._views.get(pno)
            return view is None or not view[idx]
        return not self._all_stored(first, last)

    def cow(self, offset: int, length: int) -> None:
        """Before a device write: make sure every chunk it touches is stored.
        Returns at once in every case :meth:`write_needs_copy` answers False."""
        if not self.armed or self.error or length <= 0:
            return
        end = min(offset + length, self.capacity)
        if offset >= end:
            return  # beyond the size frozen at take
        first = offset >> self.chunk_shift
        last = (end - 1) >> self.chunk_shift
        if self._all_stored(first, last):
            return
        mine, theirs = self._claim(first, last)
        if mine:  # (its reads call may_block if they wait for the disk)
            self._copy(mine)
        if theirs:
            self._wait_loaded(theirs)

    def stored_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Where the image reads ``offset``..``offset+length`` from: runs
        ``(offset, length, stored)``, chunk by chunk and merged, clipped to
        the range: ``stored`` in diff storage, else on the device. Read-only
        and lock-free: a chunk once stored stays stored, so a chunk found
        unstored *after* reading the device was not written since take."""
        if length <= 0:
            return []
        shift = self.chunk_shift
        end = offset + length
        first, last = offset >> shift, (end - 1) >> shift
        if self._none_stored(first, last):
            return [(offset, length, False)]
        stored = self._locations(first, last) != 0
        out: list[tuple[int, int, bool]] = []
        starts = (np.flatnonzero(stored[1:] != stored[:-1]) + 1).tolist()
        edges = [offset, *((first + s) << shift for s in starts), end]
        for i, k in enumerate([0, *starts]):
            out.append((edges[i], edges[i + 1] - edges[i], bool(stored[k])))
        return out

    # -- image I/O ------------------------------------------------------------------

    def _read_device(self, offset: int, length: int) -> bytes:
        """The device's bytes as they were at take, for chunks not stored."""
        device = self.device
        # Below the tracker, through the filters that model the disk (a
        # failing or powered-off disk fails the image's reads too); with
        # none of them, the short way: the backing store itself.
        for flt in device.filters:
            if flt.models_device:
                bio = Bio(Op.READ, offset, length, device=device)
                device.submit_physical(bio)
                assert bio.result is not None
                data = bio.result
                break
        else:
            data = device.backing.pread(offset, length)
        holes = self.storage.on_devices.get(device.name)
        return data if not holes else _zero_holes(data, offset, holes)

    def _read_stored(self, location: int, chunk: int, a: int, b: int) -> bytes:
        return self.storage.read(location - 1, b - a, a - (chunk << self.chunk_shift))

    def read(self, offset: int, length: int) -> bytes:
        """The device as it was at take, for ``offset``..``offset+length``.

        Pieces not stored are read from the device and checked *after* the
        read: any that became stored meanwhile are read again from diff
        storage. Pieces are joined once at the end (no zero-filled buffer:
        fresh pages cost more than the copy).
        """
        self.check()
        if length == 0:
            return b""
        shift = self.chunk_shift
        end = offset + length
        first, last = offset >> shift, (end - 1) >> shift
        if self._none_stored(first, last):
            # Nothing stored: one device read, then make sure it stayed so.
            # (The common case of a backup read: checked without building
            # location arrays, which cost more than the rest of the request.)
            data = self._read_device(offset, length)
            if not self._none_stored(first, last):
                after = self._locations(first, last)
                data = self._patch(bytearray(data), offset, end, first, after)
            self.check()
            return data
        locs = self._locations(first, last)
        # Pieces: (start, end, storage position of start + 1, or 0 for the
        # device). Runs of unstored chunks are merged, and so are stored
        # chunks that lie one after the other in diff storage (they were
        # copied in one run), so each run is one read.
        pieces: list[tuple[int, int, int]] = []
        for k, loc in enumerate(locs.tolist()):
            chunk = first + k
            a = max(offset, chunk << shift)
            b = min(end, (chunk + 1) << shift)
            spos = loc + (a - (chunk << shift)) if loc else 0
            if pieces:
                pa, _, ppos = pieces[-1]
                if (not spos and not ppos) or (spos and ppos and ppos + (a - pa) == spos):
                    pieces[-1] = (pa, b, ppos)
                    continue
            pieces.append((a, b, spos))
        parts: list[bytes] = []
        for a, b, spos in pieces:
            if spos:
                parts.append(self.storage.read(spos - 1, b - a))
            else:
                parts.append(self._read_device(a, b - a))
        after = self._locations(first, last)
        data = b"".join(parts)
        if (after != locs).any():
            data = self._patch(bytearray(data), offset, end, first, np.where(locs, 0, after))
        self.check()
        return data

    def _patch(self, buf: bytearray, offset: int, end: int, first: int, locs: np.ndarray) -> bytes:
        """Overwrite ``buf`` with the stored chunks of ``locs`` (0 = keep)."""
        shift = self.chunk_shift
        for k in np.flatnonzero(locs).tolist():
            chunk = first + k
            a = max(offset, chunk << shift)
            b = min(end, (chunk + 1) << shift)
            buf[a - offset : b - offset] = self._read_stored(int(locs[k]), chunk, a, b)
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """An image write: lands in the chunks' copies in diff storage."""
        self.check()
        length = len(data)
        if length == 0:
            return
        shift = self.chunk_shift
        end = offset + length
        first, last = offset >> shift, (end - 1) >> shift
        while True:
            mine, theirs = self._claim(first, last)
            if mine:
                self._copy(mine)
            if theirs:
                self._wait_loaded(theirs)
            self.check()
            locs = self._locations(first, last)
            if locs.all():
                break
        view = memoryview(data)
        for k, loc in enumerate(locs):
            chunk = first + k
            a = max(offset, chunk << shift)
            b = min(end, (chunk + 1) << shift)
            try:
                piece = view[a - offset : b - offset]
                self.storage.write(int(loc) - 1, piece, a - (chunk << shift))
            except BlksnapError as exc:
                self.fail(exc)
                raise IOFailure(f"image write to {self.device.name} failed: {exc}") from None


def _zero_holes(data: bytes, offset: int, holes: tuple[tuple[int, int], ...]) -> bytes:
    """``data`` (read at ``offset``) with the bytes inside ``holes`` zeroed:
    the device's own diff storage, which held zeroes at take (the engine
    zeroes it before) and holds copied chunks since, is no part of its image."""
    end = offset + len(data)
    buf: bytearray | None = None
    for start, stop in holes:
        if stop <= offset or start >= end:
            continue
        if buf is None:
            buf = bytearray(data)
        a, b = max(start, offset) - offset, min(stop, end) - offset
        buf[a:b] = bytes(b - a)
    return data if buf is None else bytes(buf)
