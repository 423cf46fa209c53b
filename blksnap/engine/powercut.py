"""The ``powercut`` filter: what a device would hold after a power loss.

A disk's write cache may lose any write acknowledged since the last flush.
This filter keeps the old contents of every block written since the last
FLUSH (an undo log: the first write of a block after a flush saves what the
block held); ``ctl cut`` writes them back, so the device then holds exactly
what was durable, and from then on fails every request with EIO, as a disk
without power would, until ``ctl restore`` (or detach). The harshest legal
outcome of a power loss: every unflushed write lost (a write racing a flush
may count as flushed, which a disk may also do).

The undo log lives in a region (:mod:`blksnap.engine.regions`): under
blksnapd it outlives a crash of the worker, so a cut after a restart still
throws away what was not flushed before it. Layout: a header, one byte per
4 KiB block (the epoch in which the block was saved, 0: not saved), then
the saved blocks at their own offsets in a sparse area the size of the
device. A flush moves to the next epoch with one store, so the entries it
makes obsolete are void at once, then clears them.

At altitude 200, below the tracker: it sees the writes that reach the
store (not those flakey failed or dropped), and its write-backs at a cut go
through the filters below it (a migration copies them too).
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from blksnap.engine.filters import READ, WRITE, WRITE_OPS, Bio, Filter, FilterResult, Op
from blksnap.errors import IOFailure

if TYPE_CHECKING:
    from blksnap.engine.device import Device

ALTITUDE_POWERCUT = 200
BLOCK = 4096
_MAGIC = b"PCUT0001"
# magic, block size, capacity, epoch, cut (0/1), flushes, cuts
_HEADER = struct.Struct("<8sIQQIQQ")
_HEADER_SIZE = 64
_PAGE = mmap.PAGESIZE


def _layout(capacity: int) -> tuple[int, int, int]:
    """(blocks, offset of the data area, region size)."""
    blocks = -(-capacity // BLOCK)
    data_at = -(-(_HEADER_SIZE + blocks) // _PAGE) * _PAGE
    return blocks, data_at, data_at + capacity


class Powercut(Filter):
    name = "powercut"
    altitude = ALTITUDE_POWERCUT
    reads_backing = True
    models_device = True
    summary = "keeps what was written since the last flush; `cut` throws it away"
    commands = {
        "cut": "write back the old contents of every block written since the last "
        "flush, then fail every request with EIO (power off)",
        "restore": "power back on: requests are served again",
        "status": "power state, unflushed blocks, flushes and cuts so far",
    }

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        super().__init__(device, opts)
        capacity = device.size
        self.blocks, self.data_at, size = _layout(capacity)
        self.region, existed = device.regions.open(self.state_key, size)
        self._lock = threading.Lock()
        self.map = np.frombuffer(self.region, dtype=np.uint8, count=self.blocks,
                                 offset=_HEADER_SIZE)  # fmt: skip
        head = _HEADER.unpack_from(self.region) if existed else None
        if head is not None and head[0] == _MAGIC and head[1] == BLOCK and head[2] == capacity:
            _, _, _, self.epoch, cut, self.flushes, self.cuts = head
            self.is_cut = bool(cut)
            code = self._code()
            stale = np.flatnonzero((self.map != 0) & (self.map != code))
            self.map[stale] = 0  # (a flush cut short: its entries are void)
            self.saved = int(np.count_nonzero(self.map))
        else:
            self.epoch, self.is_cut, self.flushes, self.cuts, self.saved = 0, False, 0, 0, 0
            self.map[:] = 0
            self._save_header()

    def _code(self) -> int:
        return self.epoch % 255 + 1

    def _save_header(self) -> None:
        _HEADER.pack_into(self.region, 0, _MAGIC, BLOCK, self.device.size, self.epoch,
                          int(self.is_cut), self.flushes, self.cuts)  # fmt: skip

    def _power_off(self) -> IOFailure:
        return IOFailure(f"{self.device.name}: power is cut (powercut filter)")

    # -- requests -------------------------------------------------------------

    def submit(self, bio: Bio) -> FilterResult:
        if self.is_cut:
            raise self._power_off()
        op = bio.op
        if op in WRITE_OPS:
            if bio.length:
                self._save(bio.offset, bio.length)
            return FilterResult.PASS
        if op is Op.FLUSH:
            self.device.submit_below(self, bio)
            self._forget()
            return FilterResult.SKIP
        return FilterResult.PASS

    def _save(self, offset: int, length: int) -> None:
        """Keep the blocks under a write that were not kept since the flush."""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        code = self._code()
        if (self.map[first : last + 1] == code).all():
            return
        with self._lock:
            code = self._code()
            todo = np.flatnonzero(self.map[first : last + 1] != code) + first
            for run, a, b in self._runs(todo):  # (one read per run)
                bio = Bio(READ, a, b - a, device=self.device)
                self.device.submit_below(self, bio)
                assert bio.result is not None
                at = self.data_at + a
                self.region[at : at + (b - a)] = bio.result
                self.map[run] = code  # (after the data: a crash keeps it whole)
                self.saved += len(run)

    def _forget(self) -> None:
        """After a flush: everything written so far is durable."""
        with self._lock:
            self.flushes += 1
            if not self.saved:
                self._save_header()
                return
            self._void()

    def _runs(self, blocks: np.ndarray) -> Iterator[tuple[np.ndarray, int, int]]:
        """Runs of consecutive ``blocks`` (sorted): each run and its bytes
        ``a``..``b`` on the device (the last block may be short)."""
        if not len(blocks):
            return
        size = self.device.size
        for run in np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1):
            yield run, int(run[0]) * BLOCK, min((int(run[-1]) + 1) * BLOCK, size)

    def _void(self) -> None:
        """The next epoch: every block kept so far is let go (with the lock)."""
        self.epoch += 1
        self._save_header()  # (the old entries are void from here)
        self.map[:] = 0
        self.saved = 0
        self.region.madvise(mmap.MADV_REMOVE, self.data_at, len(self.region) - self.data_at)

    # -- control --------------------------------------------------------------

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        if cmd == "cut":
            self.cut()
        elif cmd == "restore":
            with self._lock:
                self.is_cut = False
                self._save_header()
        elif cmd != "status":
            return super().ctl(cmd, arg)
        return self.status()

    def cut(self) -> None:
        """Put back what the blocks held at the last flush, then power off."""
        dev = self.device
        dev.queue.freeze()  # (no write in flight meanwhile)
        try:
            with self._lock:
                if self.is_cut:
                    return
                for _, a, b in self._runs(np.flatnonzero(self.map == self._code())):
                    at = self.data_at + a
                    data = bytes(self.region[at : at + (b - a)])
                    dev.submit_below(self, Bio(WRITE, a, b - a, data, dev))
                dev.submit_below(self, Bio(Op.FLUSH, 0, 0, device=dev))
                self.cuts += 1
                self.is_cut = True
                self._void()
        finally:
            dev.queue.unfreeze()

    def status(self) -> dict[str, Any]:
        return {
            "state": "cut" if self.is_cut else "on",
            "unflushed_blocks": self.saved,
            "block_size": BLOCK,
            "flushes": self.flushes,
            "cuts": self.cuts,
        }

    def write_may_wait(self, offset: int, length: int) -> bool:
        return True  # it may read the old blocks first

    def detach(self) -> None:
        self.map = np.zeros(0, dtype=np.uint8)
        super().detach()
