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
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from blksnap import shortway
from blksnap.engine import cbt_checkpoint, cbt_intent
from blksnap.engine.cbt import CbtMap, tracking_block_shift
from blksnap.engine.filters import PASS, WRITE_OPS, Bio, Filter, FilterResult
from blksnap.engine.gate import WouldWait, no_wait
from blksnap.errors import Busy, InvalidArgument
from blksnap.fileio import fsync_dir
from blksnap.units import format_size, parse_sector_range

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
        #: "checkpoint" (blksnapd stopped cleanly and started again),
        #: "checkpoint and write intent: ..." (after a crash: the regions
        #: marked), or "new: WHY" (a new generation, and why the old one
        #: was not kept).
        self.origin = "region" if self.cbt.resumed else "new"
        if self.cbt.resumed:
            log.info("%s: CBT carried on from the region left (generation %s, number %d)",
                     device.name, self.cbt.generation_id, self.cbt.active)  # fmt: skip
        #: The snapshot holding this device, while there is one.
        self.snapshot_id: str | None = None
        self.diff_area = None  # (sets pass_write)
        self._checkpoint_lock = threading.Lock()
        #: The clean checkpoint is written: no other may follow it.
        self._stopped = False
        #: Checkpoints written by this tracker (status).
        self.checkpoints = 0

    @classmethod
    def prepare(cls, device: Device, opts: dict[str, str]) -> _Start | None:
        """Before the drain (the state dir may live on this very device):
        the device's checkpoint, loaded and judged (after a crash, merged
        with its write intent), the write-intent file opened or made, and the
        checkpoint marked in use (a crash from here on cannot make it look
        clean). When a region carries the map on (a worker taking over), only
        the write intent."""
        cls.refuse_options(opts)  # (before the checkpoint is marked in use)
        path = device.checkpoint_path
        if path is None:
            return None
        intent_off = _intent_off(device)
        ipath = intent_path(path)
        cp = cbt_checkpoint.load(path)
        if device.regions.find(f"cbt/{device.name}") is not None:
            token = cp.intent_token if not isinstance(cp, str) else None
            intent = None if intent_off else _reuse_intent(device, ipath, token)
            return _Start(None, "", intent, named=token)
        recovery = ""
        opened: cbt_intent.IntentLog | str | None = None
        store = device.backing
        now = cbt_checkpoint.BackingFacts.of_fd(store.fd, store.identity, store.size)
        if isinstance(cp, str):
            why: str | None = cp
        else:
            why = cbt_checkpoint.distrust(cp, now, device.params.cbt_trust_block_devices)
            shift = tracking_block_shift(device.size, device.params)
            if why is None and (cp.capacity, cp.block_shift) != (device.size, shift):
                why = f"the capacity changed ({cp.capacity} -> {device.size} bytes)"
            if why is None and not cp.clean:
                assert cp.intent_token is not None
                count = _regions(cp.capacity, cp.intent_shift)
                opened = cbt_intent.IntentLog.open(ipath, cp.intent_token, cp.intent_shift, count)
                bits = opened if isinstance(opened, str) else opened.regions_set()
                got = bits if isinstance(bits, str) else cbt_checkpoint.recovered(cp, bits)
                if isinstance(got, str):
                    why = f"blksnapd did not stop cleanly, and {got}"
                else:
                    assert not isinstance(bits, str)
                    n = int(np.count_nonzero(bits))
                    recovery = (
                        f" and write intent: blksnapd did not stop cleanly; {n} region(s) of "
                        f"{format_size(1 << cp.intent_shift)} marked to be read again"
                    )
                    cp = got
        if why is not None:
            cp = cbt_checkpoint.fresh(device.size, tracking_block_shift(device.size, device.params))
            if isinstance(opened, cbt_intent.IntentLog):  # (a new generation: a new file)
                opened.close()
                opened = None
        assert not isinstance(cp, str)
        intent = None
        if not intent_off:
            intent = _reuse_intent(device, ipath, cp.intent_token, cp.intent_shift, opened)
        elif isinstance(opened, cbt_intent.IntentLog):
            opened.close()
        try:
            cbt_checkpoint.save(
                path,
                replace(
                    cp,
                    clean=False,
                    facts=now,
                    written_at=time.time(),
                    intent_token=intent.token if intent is not None else None,
                    intent_shift=intent.shift if intent is not None else 0,
                ),
            )
        except OSError as exc:  # (unmarked, it must not be trusted)
            if why is None:
                why = f"the checkpoint could not be marked in use ({exc.strerror})"
                cp = cbt_checkpoint.fresh(cp.capacity, cp.block_shift)
            try:
                cbt_checkpoint.remove(path)
            except OSError as exc2:
                log.error("%s: checkpoint %s not removed: %s", device.name, path, exc2.strerror)
        origin = f"new: {why}" if why is not None else f"checkpoint{recovery}"
        if intent_off and intent_off is not True:
            origin += f" (no write intent: {intent_off})"
        return _Start(cp, origin, intent)

    @classmethod
    def unprepare(cls, device: Device, what: _Start) -> None:
        """The write intent prepare opened is closed. (The checkpoint stays
        marked in use with it: trusted again only with that intent file.)"""
        if what.intent is not None:
            what.intent.close()

    def prepared(self, what: _Start) -> None:
        dev, cbt = self.device, self.cbt
        if what.intent is not None:
            what.intent.on_failure = self._intent_failed
            cbt.intent = what.intent
        if cbt.resumed or what.checkpoint is None:
            if what.checkpoint is not None or (
                what.intent is not None and what.intent.token != what.named
            ):
                # A region carried the map on, with an intent file of its
                # own now: the checkpoint names it (in the drain: the state
                # dir is on no served device, or there is no intent).
                self._checkpoint_now()
            return
        cbt.restore(what.checkpoint)
        self.origin = what.origin
        if what.origin.startswith("new: "):
            why = what.origin[5:]
            if not why.startswith("no checkpoint"):
                log.warning("%s: CBT starts a new generation %s: %s", dev.name,
                            cbt.generation_id, why)  # fmt: skip
            return
        log.info("%s: CBT carried on from its %s (generation %s, number %d)",
                 dev.name, what.origin, cbt.generation_id, cbt.active)  # fmt: skip

    def _checkpoint_now(self) -> None:
        try:
            self.checkpoint(clean=False)
        except OSError as exc:
            log.error("%s: CBT checkpoint not written: %s", self.device.name, exc.strerror)

    def checkpoint(self, *, clean: bool) -> None:
        """Write the map to the device's checkpoint; ``clean``: blksnapd
        stops now, nothing will write the device until it serves it again.
        Otherwise (a take, the periodic checkpoint) the write intent starts
        a new epoch with it, and the regions of the last one are cleared
        once it is durable; without a working write intent an unclean
        checkpoint would not be trusted, so none is written."""
        path, store = self.device.checkpoint_path, self.device.backing
        if path is None:
            return
        with self._checkpoint_lock:
            intent = self.cbt.intent
            if not clean and (self._stopped or intent is None or intent.failed is not None):
                return  # (none after the clean one: the device is closing)
            facts = cbt_checkpoint.BackingFacts.of_fd(store.fd, store.identity, store.size)
            cp = self.cbt.export(facts, clean=clean, epoch=not clean)
            try:
                cbt_checkpoint.save(path, cp)
            except BaseException:
                if intent is not None and not clean:
                    intent.end_epoch(False)
                raise
            if intent is not None and not clean:
                if intent.failed is not None:  # (given up meanwhile: see _intent_failed)
                    cbt_checkpoint.remove(path)
                    return
                intent.end_epoch(True)
            self.checkpoints += 1
            self._stopped = self._stopped or clean

    def _intent_failed(self, why: str) -> bool:
        """The write intent was given up: the checkpoint in use must not be
        trusted after a crash (it would miss writes): it goes. False if it
        could not be removed: the device's writes then fail."""
        self.origin += f" (write intent given up: {why})"
        path = self.device.checkpoint_path
        if path is not None:
            try:
                cbt_checkpoint.remove(path)
                fsync_dir(os.path.dirname(path))
            except OSError as exc:
                log.critical("%s: checkpoint %s could not be removed (%s) after the write "
                             "intent failed: the device's writes fail from now on",
                             self.device.name, path, exc.strerror)  # fmt: skip
                return False
        return True

    def submit(self, bio: Bio) -> FilterResult:
        if bio.op in WRITE_OPS:
            diff_area = self.diff_area
            if diff_area is not None and no_wait.active:
                # Inside the gate this diff area stays the device's, and the
                # answer cannot go stale: no copy needed now, none at cow.
                if diff_area.write_needs_copy(bio.offset, bio.length):
                    raise WouldWait(f"write to {self.device.name} needs copy-on-write")
                diff_area = None
            if no_wait.active and self.cbt.mark_may_wait(bio.offset, bio.length):
                raise WouldWait(f"write to {self.device.name} waits for its write intent")
            self.cbt.mark(bio.offset, bio.length)
            if diff_area is not None:
                diff_area.cow(bio.offset, bio.length)
        return PASS

    passes_reads = True

    @property
    def diff_area(self) -> DiffArea | None:
        """Set while a taken snapshot needs copy-on-write (changed only with
        the device's gate drained)."""
        return self._diff_area

    @diff_area.setter
    def diff_area(self, area: DiffArea | None) -> None:
        """Also makes :meth:`pass_write` for the new state: every write of a
        device whose only filter is the tracker calls it, so each Python
        call left out of it shows in the device's IOPS. A write that copies
        nothing only marks the CBT (as :meth:`submit` does): no snapshot
        taken, or every chunk it touches already stored (a rewrite); one
        that may copy or wait for a copy goes the full way. (Inside the
        gate the diff area's answer cannot go stale.)"""
        self._diff_area = area
        self.device.queue.refresh()  # (the compiled short way, too)
        mark = self.cbt.mark  # (True, always)
        if area is None:
            self.pass_write = mark  # type: ignore[method-assign]
            return
        needs_copy = area.write_needs_copy

        def pass_write(offset: int, length: int) -> bool:
            return not needs_copy(offset, length) and mark(offset, length)

        self.pass_write = pass_write  # type: ignore[method-assign]

    def short_way(self) -> shortway.Grant:
        """Reads pass, always. Writes as :meth:`pass_write` lets them: the
        CBT marked first, in :meth:`CbtMap.mark`'s order (the write map, then
        the write intent: a write whose intent is not durable yet goes back to
        Python); under a snapshot taken, only writes whose chunks are all in
        diff storage already (:meth:`DiffArea.write_needs_copy`: rewrites)."""
        cbt, keep = self.cbt.short_way()
        mode = shortway.READS | shortway.WRITES | shortway.TRACKED
        area = self._diff_area
        if area is None:
            return shortway.Grant(mode, cbt, None, keep)
        chunks, area_keep = area.short_way()
        return shortway.Grant(mode | shortway.STORED, cbt, chunks, (*keep, *area_keep))

    def write_may_wait(self, offset: int, length: int) -> bool:
        """Could a device write of ``offset``..``offset+length`` submitted
        now wait in this filter (copy a chunk to diff storage, or wait for
        another thread's copy)? False only when it surely would not:

        * its write-intent regions are durable (or there is no write intent),
          and no snapshot holds the device: the write only marks the CBT;
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
        if self.cbt.mark_may_wait(offset, length):
            return True  # (the first write to its region since the checkpoint)
        diff_area = self.diff_area
        if diff_area is not None:
            return diff_area.write_needs_copy(offset, length)
        return self.snapshot_id is not None

    def detach(self) -> None:
        if self.snapshot_id is not None:
            raise Busy(f"{self.device.name} is in snapshot {self.snapshot_id}")
        self.cbt.release()
        path = self.device.checkpoint_path
        if path is not None:  # (tracking ends: so does its write intent)
            cbt_checkpoint.remove(intent_path(path))

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
            "checkpoints": self.checkpoints,
            "write_intent": self.cbt.intent.status() if self.cbt.intent is not None else None,
        }

    def check_capacity(self) -> None:
        """Before take: a device whose size changed starts a new generation."""
        size = self.device.backing.refresh_size()
        if self.cbt.capacity != size:
            old = self.cbt.intent
            self.cbt.resize(size)
            if old is not None:  # (its regions are of the old capacity)
                path = self.device.checkpoint_path
                assert path is not None
                self.cbt.intent = None
                old.close()
                try:
                    new = cbt_intent.IntentLog.create(intent_path(path), old.shift,
                                                      _regions(size, old.shift))  # fmt: skip
                except OSError as exc:
                    log.error("%s: no write intent after the resize: %s", self.device.name,
                              exc.strerror)  # fmt: skip
                    cbt_checkpoint.remove(path)
                else:
                    new.on_failure = self._intent_failed
                    self.cbt.intent = new


@dataclass
class _Start:
    """What :meth:`Tracker.prepare` found: the checkpoint to carry on (None:
    a region carries the map on), where it came from, the write intent."""

    checkpoint: cbt_checkpoint.Checkpoint | None
    origin: str
    intent: cbt_intent.IntentLog | None
    #: The intent token the checkpoint on disk names (a region carrying on).
    named: str | None = None


def intent_path(checkpoint_path: str) -> str:
    return checkpoint_path.removesuffix(".cbt") + ".intent"


def _regions(capacity: int, shift: int) -> int:
    return max(1, (capacity + (1 << shift) - 1) >> shift)


def _intent_off(device: Device) -> str | bool:
    """Why the device gets no write intent (True: turned off), or False."""
    if not device.params.cbt_intent_region_size:
        return True
    carrier = device.state_carrier() if device.state_carrier is not None else None
    if carrier is not None:
        return f"the state dir is on blksnapd device {carrier}"
    return False


def _reuse_intent(
    device: Device,
    path: str,
    token: str | None,
    shift: int | None = None,
    opened: cbt_intent.IntentLog | str | None = None,
) -> cbt_intent.IntentLog | None:
    """The intent file named ``token`` (``opened`` already, if it was) if it
    fits the device and the region size asked for, else a new one; None if
    none can be made."""
    want = cbt_intent.region_shift_for(device.params.cbt_intent_region_size)
    count = _regions(device.size, want)
    if isinstance(opened, cbt_intent.IntentLog):
        if (opened.shift, opened.count) == (want, count):
            return opened
        opened.close()
    elif token is not None and shift in (None, want):
        got = cbt_intent.IntentLog.open(path, token, want, count)
        if not isinstance(got, str):
            return got
    try:
        return cbt_intent.IntentLog.create(path, want, count)
    except OSError as exc:
        log.error("%s: no write intent (%s): after a crash its CBT starts a new generation",
                  device.name, exc.strerror)  # fmt: skip
        return None


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``SECTOR:COUNT[,SECTOR:COUNT ...]`` (512-byte sectors) as byte ranges."""
    ranges = [parse_sector_range(p.strip()) for p in text.split(",") if p.strip()]
    if not ranges:
        raise InvalidArgument("markdirty needs SECTOR:COUNT[,SECTOR:COUNT ...]")
    return ranges
