"""A snapshot image: the point-in-time view of one device of a snapshot.

Reads see the device as it was at take. Writes land in the image's own
copies of the chunks in diff storage (never on the device) and mark their
blocks changed in the CBT, so the next backup re-reads them from the device.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from blksnap import shortway
from blksnap.errors import InvalidArgument, NoSpace

if TYPE_CHECKING:
    from blksnap.engine.cbt import CbtMap
    from blksnap.engine.diff_area import DiffArea
    from blksnap.engine.gate import Gate


class Image:
    def __init__(
        self, snapshot_id: str, name: str, diff_area: DiffArea, cbt: CbtMap, gate: Gate
    ) -> None:
        self.snapshot_id = snapshot_id
        self.name = name
        self.diff_area = diff_area
        self.cbt = cbt
        self._gate = gate
        self.size = diff_area.capacity
        # What has been read from and written to this image (bytes, requests):
        # a backup tool's reads, as blksnapd saw them (kept with the chunk map).
        self._stats_lock = threading.Lock()
        self._stats = diff_area.stats
        #: Its reads served in C (:mod:`blksnap.shortway`), while its device
        #: has no filter but the tracker and its diff storage is on no
        #: served device; opened and closed with its device's gate (and its
        #: snapshot's image gate closes it for good).
        self.short_way = shortway.Way() if shortway.LIB is not None else None
        #: The address of the counters (the short way adds to them too).
        self._stats_at = int(self._stats.ctypes.data)

    @property
    def bytes_read(self) -> int:
        return int(self._stats[0])

    @property
    def reads(self) -> int:
        return int(self._stats[1])

    @property
    def bytes_written(self) -> int:
        return int(self._stats[2])

    def __repr__(self) -> str:
        return f"<Image {self.snapshot_id}/{self.name} {self.size}B>"

    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"image {self.name}: negative offset or length")
        if offset + length > self.size:
            cls = NoSpace if write else InvalidArgument
            raise cls(
                f"image {self.name}: I/O at {offset}+{length} is past its end ({self.size} bytes)"
            )

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, write=False)
        self._gate.enter()
        try:
            data = self.diff_area.read(offset, length)
        finally:
            self._gate.leave()
        self._count(0, length)
        return data

    def _count(self, which: int, length: int) -> None:
        """Count a read (``which`` 0) or a write (2) of ``length`` bytes; the
        compiled short way counts its reads in the same words."""
        if self.short_way is not None:
            shortway.add64(self._stats_at + which * 8, length)
            if which == 0:
                shortway.add64(self._stats_at + 8, 1)
            return
        with self._stats_lock:
            self._stats[which] += length
            if which == 0:
                self._stats[1] += 1

    def open_short_way(self) -> None:
        """Open its way if its reads may be served in C: its device has no
        filter but the tracker (none that stands for the disk), its diff
        storage lies on no served device (whose ranges read as zeros), the
        snapshot is healthy and not destroyed. Only with the way closed (its
        device's gate calls it when a drain ends)."""
        way, area = self.short_way, self.diff_area
        if way is None or self._gate.closed or area.error or area.storage.on_device:
            return
        dev = area.device
        if len(dev.filters._filters) != 1:
            return
        chunks, keep = area.short_way()
        grant = shortway.Grant(shortway.READS | shortway.IMAGE, None, chunks, keep,
                               area.image_short_way())  # fmt: skip
        way.open(grant, dev.backing.fd, self.size)

    def close_short_way(self) -> None:
        if self.short_way is not None:
            self.short_way.close()

    def allocation(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        """Allocation of the image at ``offset``..``offset+length``: runs
        ``(offset, length, is_hole)``, as :meth:`BackingStore.extents`. A
        chunk in diff storage is data; one still on the device is what the
        device's backing store says, which is the device at take: a write
        after take stores the chunk first. (The backing store is asked
        first and the chunks after, so a chunk found unstored was not
        written while it was asked.) With ``limit``, at most that many runs,
        covering a prefix of the range."""
        self._check(offset, length, write=False)
        if length == 0:
            return []
        diff_area = self.diff_area
        self._gate.enter()
        try:
            diff_area.check()
            dev = diff_area.device
            if all(flt.reads_backing for flt in dev.filters):
                device = dev.backing.extents(offset, length, limit)
            else:  # (a filter serves reads from elsewhere: a hydration)
                device = [(offset, length, False)]
            stored = diff_area.stored_runs(offset, length)
            diff_area.check()
        finally:
            self._gate.leave()
        out: list[tuple[int, int, bool]] = []
        covered = device[-1][0] + device[-1][1]
        pos = offset
        i = j = 0
        while pos < covered:
            d_off, d_len, d_hole = device[i]
            s_off, s_len, s_stored = stored[j]
            stop = min(d_off + d_len, s_off + s_len)
            hole = d_hole and not s_stored
            if out and out[-1][2] == hole:
                out[-1] = (out[-1][0], stop - out[-1][0], hole)
            elif limit and len(out) >= limit:
                break
            else:
                out.append((pos, stop - pos, hole))
            pos = stop
            if pos >= d_off + d_len:
                i += 1
            if pos >= s_off + s_len:
                j += 1
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data), write=True)
        self._gate.enter()
        try:
            self.diff_area.write(offset, data)
            self.cbt.mark_both(offset, len(data))
        finally:
            self._gate.leave()
        self._count(2, len(data))

    def write_may_wait(self, offset: int, length: int) -> bool:
        """A write to an image may always wait (its chunks are copied into
        diff storage, which may grow): as :meth:`Device.write_may_wait`."""
        return True

    def flush(self) -> None:
        """Diff storage is not persistent: nothing to make durable."""
        self._gate.enter()
        try:
            self.diff_area.check()
        finally:
            self._gate.leave()
