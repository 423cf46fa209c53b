"""The ``blksnap`` filter: change-block tracking on every write, and
copy-on-write into the diff area while a snapshot of the device is taken.

Like the kernel module's, its control commands (``ctl``) are the way in:
``cbtinfo``, ``cbtmap``, ``markdirty``.

A front-end that serves writes on a thread that must not block (the FUSE
event loop) asks :meth:`Device.write_may_wait` (which asks
:meth:`Tracker.write_may_wait`) first, and submits the write
inside ``with no_wait:``: should the answer have gone stale before the write
entered the device's gate (a take armed copy-on-write meanwhile), the tracker
refuses it with :class:`WouldWait` before doing anything, and the front-end
hands it to a worker thread instead. Like the kernel's ``REQ_NOWAIT``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from blksnap.engine import cbt_checkpoint
from blksnap.engine.cbt import CbtMap, tracking_block_shift
from blksnap.engine.filters import PASS, WRITE_OPS, Bio, Filter, FilterResult
from blksnap.engine.gate import WouldWait, no_wait
from blksnap.errors import Busy, InvalidArgument
from blksnap.units import parse_sector_range

if TYPE_CHECKING:
    from blksnap.engine.device import Device
    from blksnap.engine.diff_area import DiffArea

ALTITUDE_BLKSNAP = 100

log = logging.getLogger(__name__)

__all__ = ["ALTITUDE_BLKSNAP", "Tracker", "WouldWait", "no_wait"]


class Tracker(Filter):
    name = "blksnap"
    altitude = ALTITUDE_BLKSNAP
    reads_backing = True
    summary = "change-block tracking, and copy-on-write while a snapshot is taken"
    commands = {
        "cbtinfo": "the CBT's block size, generation and changes number",
        "cbtmap": "the read map of the last take (one byte per block)",
        "markdirty": "SECTOR:COUNT[,...]: mark ranges changed, for the backup under way too",
    }

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        super().__init__(device, opts)
        self.cbt = CbtMap(device.size, device.params, device.regions, f"cbt/{device.name}")
        #: Where the map came from: "region" (a worker taking over),
        #: "checkpoint" (blksnapd stopped cleanly and started again), or
        #: "new: WHY" (a new generation, and why the old one was not kept).
        self.origin = "region" if self.cbt.resumed else "new"
        if self.cbt.resumed:
            log.info("%s: CBT carried on from the region left (generation %s, number %d)",
                     device.name, self.cbt.generation_id, self.cbt.active)  # fmt: skip
        #: The snapshot holding this device, while there is one.
        self.snapshot_id: str | None = None
        #: Set while a taken snapshot needs copy-on-write.
        self.diff_area: DiffArea | None = None

    @classmethod
    def prepare(cls, device: Device, opts: dict[str, str]) -> Any:
        """Before the drain (the state dir may live on this very device):
        the device's checkpoint, loaded and judged, then marked in use (a
        crash from here on cannot make it look trusted). Nothing when a
        region carries the map on (a worker taking over)."""
        path = device.checkpoint_path
        if path is None or device.regions.find(f"cbt/{device.name}") is not None:
            return None
        cp = cbt_checkpoint.load(path)
        if isinstance(cp, str):
            why: str | None = cp
        else:
            store = device.backing
            now = cbt_checkpoint.BackingFacts.of_fd(store.fd, store.identity, store.size)
            why = cbt_checkpoint.distrust(cp, now, device.params.cbt_trust_block_devices)
            shift = tracking_block_shift(device.size, device.params)
            if why is None and (cp.capacity, cp.block_shift) != (device.size, shift):
                why = f"the capacity changed ({cp.capacity} -> {device.size} bytes)"
        if why is None:
            assert not isinstance(cp, str)
            try:
                cbt_checkpoint.save(path, replace(cp, clean=False, written_at=time.time()))
                return cp
            except OSError as exc:  # (unmarked, it must not be trusted)
                why = f"the checkpoint could not be marked in use ({exc.strerror})"
        try:
            cbt_checkpoint.remove(path)  # (the map it held will not be carried on)
        except OSError as exc:
            log.error("%s: checkpoint %s not removed: %s", device.name, path, exc.strerror)
        return why

    def prepared(self, what: Any) -> None:
        dev, cbt = self.device, self.cbt
        if cbt.resumed:
            return  # (a region appeared meanwhile: it wins)
        if isinstance(what, str):
            self.origin = f"new: {what}"
            if what != "no checkpoint":
                log.warning("%s: CBT starts a new generation %s: %s", dev.name,
                            cbt.generation_id, what)  # fmt: skip
            return
        cbt.restore(what)
        self.origin = "checkpoint"
        log.info("%s: CBT carried on from its checkpoint (generation %s, number %d)",
                 dev.name, cbt.generation_id, cbt.active)  # fmt: skip

    def checkpoint(self, *, clean: bool) -> None:
        """Write the map to the device's checkpoint; ``clean``: blksnapd
        stops now, nothing will write the device until it serves it again."""
        path, store = self.device.checkpoint_path, self.device.backing
        if path is not None:
            facts = cbt_checkpoint.BackingFacts.of_fd(store.fd, store.identity, store.size)
            cbt_checkpoint.save(path, self.cbt.export(facts, clean=clean))

    def submit(self, bio: Bio) -> FilterResult:
        if bio.op in WRITE_OPS:
            diff_area = self.diff_area
            if diff_area is not None and no_wait.active:
                # Inside the gate this diff area stays the device's, and the
                # answer cannot go stale: no copy needed now, none at cow.
                if diff_area.write_needs_copy(bio.offset, bio.length):
                    raise WouldWait(f"write to {self.device.name} needs copy-on-write")
                diff_area = None
            self.cbt.mark(bio.offset, bio.length)
            if diff_area is not None:
                diff_area.cow(bio.offset, bio.length)
        return PASS

    def write_may_wait(self, offset: int, length: int) -> bool:
        """Could a device write of ``offset``..``offset+length`` submitted
        now wait in this filter (copy a chunk to diff storage, or wait for
        another thread's copy)? False only when it surely would not:

        * no snapshot holds the device: the write only marks the CBT;
        * a snapshot is taken and its diff area needs no copy for the range
          (:meth:`DiffArea.write_needs_copy`: every chunk stored, or the
          snapshot corrupted, in which case writes go straight through).

        True while the device is in a snapshot created but not taken: a take
        may be under way in another thread, and arm copy-on-write before the
        write gets in.

        Lock-free. It runs outside the device's gate, so the answer may go
        stale before the write is let in, should a take arm copy-on-write
        meanwhile. (A False about a taken snapshot stays true as long as that
        diff area is the device's, which changes only while the gate is
        drained: by destroy, which leaves nothing to wait for, and only then
        by the take of another snapshot.) Submit inside ``with no_wait:`` to be sure: the
        tracker repeats the check inside the gate, where it cannot go stale.
        """
        diff_area = self.diff_area
        if diff_area is not None:
            return diff_area.write_needs_copy(offset, length)
        return self.snapshot_id is not None

    def detach(self) -> None:
        if self.snapshot_id is not None:
            raise Busy(f"{self.device.name} is in snapshot {self.snapshot_id}")
        self.cbt.release()

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        if cmd == "cbtinfo":
            return self.cbt.info()
        if cmd == "cbtmap":
            return self.cbt.read_map_bytes()
        if cmd == "markdirty":
            if isinstance(arg, str):
                arg = parse_ranges(arg)
            for offset, length in arg:
                self.cbt.mark_both(offset, length)
            return None
        return super().ctl(cmd, arg)

    def status(self) -> dict[str, Any]:
        info = self.cbt.info()
        return {
            "generation_id": info.generation_id,
            "changes_number": info.changes_number,
            "snapshot": self.snapshot_id,
            "origin": self.origin,
        }

    def check_capacity(self) -> None:
        """Before take: a device whose size changed starts a new generation."""
        size = self.device.backing.refresh_size()
        if self.cbt.capacity != size:
            self.cbt.resize(size)


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``SECTOR:COUNT[,SECTOR:COUNT ...]`` (512-byte sectors) as byte ranges."""
    ranges = [parse_sector_range(p.strip()) for p in text.split(",") if p.strip()]
    if not ranges:
        raise InvalidArgument("markdirty needs SECTOR:COUNT[,SECTOR:COUNT ...]")
    return ranges
