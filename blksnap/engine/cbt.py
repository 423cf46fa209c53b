"""Change-block tracking map: one byte per tracking block.

Each byte holds the snapshot number under which its block was last written.
Writes mark the *write map* with the active number. A take copies the write
map into the frozen *read map*; the active number at that moment becomes the
take's ``changes_number`` (the kernel's ``snap_number_previous``) and the
active number moves on. So the blocks changed since a backup made at take j
are exactly those whose number is greater than ``changes_number(j)``, as long
as ``generation_id`` is the same.

A byte cannot count past 255: the take that uses number 255 still reports it
under the current generation, and the write map then starts a new generation
(new UUID, zeroed map, numbers from 1). A backup tool that sees a new
generation makes a full backup, so no change is ever missed. Reattach and a
capacity change also mean a new generation (a new map).

The maps and the numbers live in a region (:mod:`blksnap.engine.regions`)
keyed by the device: a header, the write map, the read map. Given a region
that outlives the process (blksnapd's worker), a map opened again for the
same capacity carries on where it was: same generation, every mark kept.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from blksnap import shortway
from blksnap.engine.cbt_checkpoint import (
    MAX_NUMBER,
    BackingFacts,
    Checkpoint,
    bits_numbers,
    numbers_bits,
)
from blksnap.engine.cbt_intent import IntentLog, region_blocks
from blksnap.engine.params import Params
from blksnap.engine.regions import LOCAL, Regions
from blksnap.errors import InvalidArgument

MAX_SNAP_NUMBER = MAX_NUMBER

#: The region's header: magic, capacity, block shift, block count, active
#: number, changes number, generation and read generation (UUID bytes).
_HEADER = struct.Struct("<8sQI4xQII16s16s")
_MAGIC = b"BSNPCBT1"
#: After it: the recovered numbers of the write and of the read generation.
_RECOVERED = struct.Struct("<32s32s")
_RECOVERED_AT = 128
#: Where the write map starts in the region (the read map follows it).
_MAPS_AT = 4096


def tracking_block_shift(capacity: int, params: Params) -> int:
    """The blksnap rule: start at the minimum block size and double while
    there would be more than ``tracking_block_maximum_count`` blocks, but
    never past the maximum block size."""
    shift = params.tracking_block_minimum_shift
    while (
        shift < params.tracking_block_maximum_shift
        and ((capacity + (1 << shift) - 1) >> shift) > params.tracking_block_maximum_count
    ):
        shift += 1
    return shift


def mask_runs(
    mask: np.ndarray, first_block: int, block_shift: int, offset: int, end: int, limit: int = 0
) -> list[tuple[int, int, bool]]:
    """Runs ``(offset, length, state)`` of ``offset``..``end`` from one
    boolean per block (``mask[i]`` is block ``first_block + i``): blocks
    alike merged, the first and last run clipped to the range; with
    ``limit``, at most that many runs (a prefix of the range)."""
    n = len(mask)
    if n == 0 or offset >= end:
        return []
    starts = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = ((starts + first_block) << block_shift).tolist()
    edges = [offset, *bounds, end]
    states = [bool(mask[0]), *mask[starts].tolist()]
    out: list[tuple[int, int, bool]] = []
    for i, state in enumerate(states):
        a, b = edges[i], min(edges[i + 1], end)
        if b > a:
            out.append((a, b - a, state))
        if limit and len(out) >= limit:
            break
    return out


@dataclass(frozen=True)
class CbtInfo:
    block_size: int
    device_capacity: int
    block_count: int
    generation_id: str
    changes_number: int
    #: Numbers of the read map that a recovery after a crash gave to the
    #: regions of its write intent: blocks with one of these numbers may or
    #: may not have changed (a backup compares them with its parent's).
    recovered: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "device_capacity": self.device_capacity,
            "block_count": self.block_count,
            "generation_id": self.generation_id,
            "changes_number": self.changes_number,
            "recovered": list(self.recovered),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CbtInfo:
        return cls(
            block_size=int(d["block_size"]),
            device_capacity=int(d["device_capacity"]),
            block_count=int(d["block_count"]),
            generation_id=str(d["generation_id"]),
            changes_number=int(d["changes_number"]),
            recovered=tuple(int(n) for n in d.get("recovered", ())),
        )


class CbtMap:
    def __init__(
        self, capacity: int, params: Params, regions: Regions = LOCAL, key: str = "cbt"
    ) -> None:
        self._lock = threading.Lock()
        self._intent: IntentLog | None = None
        #: Per block: are all the intent regions it touches durable in this
        #: epoch? (:meth:`mark`'s fast path: one lookup.)
        self._iok = bytearray()
        #: See :attr:`Checkpoint.recovered`.
        self.recovered: frozenset[int] = frozenset()
        self.read_recovered: frozenset[int] = frozenset()
        self.params = params
        self.regions = regions
        self.key = key
        self._region: mmap.mmap | None = None
        #: Did this map carry on from a region left by an earlier process?
        self.resumed = self._open(capacity, fresh=False)

    @property
    def intent(self) -> IntentLog | None:
        """The device's write intent (:mod:`blksnap.engine.cbt_intent`), if any."""
        return self._intent

    @intent.setter
    def intent(self, intent: IntentLog | None) -> None:
        old, self._intent = self._intent, intent
        if old is not None and old is not intent:
            old.on_durable = old.on_clear = None
        self._iok = bytearray(self.block_count)
        if intent is not None:
            intent.on_durable, intent.on_clear = self._intent_durable, self._intent_cleared
            self._intent_durable(np.flatnonzero(np.frombuffer(intent.durable, dtype=bool)))

    def _intent_durable(self, regions: np.ndarray) -> None:
        """Regions became durable (the intent's lock held): their blocks
        whose every region is durable pass :meth:`mark` at once."""
        intent, iok = self._intent, self._iok
        if intent is None or not len(regions):
            return
        rs, bs, n = intent.shift, self.block_shift, self.block_count
        durable = intent.durable
        for r in regions.tolist():
            b0, b1 = region_blocks(r, rs, bs, n)
            if rs >= bs:  # (blocks within the region)
                iok[b0 : b1 + 1] = b"\x01" * (b1 - b0 + 1)
                continue
            for b in range(b0, b1 + 1):  # (a block of several regions)
                ra, rb = intent.span(b << bs, 1 << bs)
                if durable.find(0, ra, min(rb, intent.count - 1) + 1) < 0:
                    iok[b] = 1

    def _intent_cleared(self) -> None:
        """A new intent epoch (before the checkpoint copies the map). The
        fence keeps the clear before the copy for the compiled short way,
        whose writes mark the map and then read these bytes (:meth:`mark`)."""
        self._iok[:] = bytes(len(self._iok))
        shortway.fence()

    def short_way(self) -> tuple[tuple[int, int, int, int, int], tuple[Any, ...]]:
        """What the compiled short way needs to mark this map as :meth:`mark`
        does (:meth:`blksnap.shortway.Way.open`'s ``cbt``), and the objects
        that own those bytes. Asked with the device drained: the map, the
        active number and the intent's bytes change only then."""
        iok, pin = 0, None
        if self._intent is not None and len(self._iok):
            iok, pin = shortway.address(self._iok)
        args = (self.write_map.ctypes.data, self.block_shift, self.block_count, self.active, iok)
        return args, (self.write_map, pin)

    def _open(self, capacity: int, *, fresh: bool) -> bool:
        """Map the region for ``capacity``; carry on from what it holds
        unless ``fresh`` or it was made for another capacity. Whether it
        carried on."""
        self.capacity = capacity
        self.block_shift = tracking_block_shift(capacity, self.params)
        self.block_size = 1 << self.block_shift
        self.block_count = (capacity + self.block_size - 1) >> self.block_shift
        if self._region is not None:
            self.regions.drop(self.key)
        region, existed = self.regions.open(self.key, _MAPS_AT + 2 * self.block_count)
        self._region = region
        n = self.block_count
        self.write_map = np.frombuffer(region, dtype=np.uint8, count=n, offset=_MAPS_AT)
        #: The same bytes, for :meth:`mark` of one block (an item set costs
        #: half a numpy item set).
        self._write_view = memoryview(self.write_map)
        self.read_map = np.frombuffer(region, dtype=np.uint8, count=n, offset=_MAPS_AT + n)
        if existed and not fresh:
            magic, cap, shift, count, active, changes, gen, read_gen = _HEADER.unpack_from(region)
            if (magic, cap, shift, count) == (_MAGIC, capacity, self.block_shift, n) and active:
                self.active, self.changes_number = active, changes
                self.generation_id = str(uuid.UUID(bytes=gen))
                self.read_generation_id = str(uuid.UUID(bytes=read_gen))
                rec, read_rec = _RECOVERED.unpack_from(region, _RECOVERED_AT)
                self.recovered, self.read_recovered = bits_numbers(rec), bits_numbers(read_rec)
                return True
        self.generation_id = str(uuid.uuid4())
        self.write_map.fill(0)
        self.active = 1
        # The read side: what the last take froze.
        self.read_map.fill(0)
        self.read_generation_id = self.generation_id
        self.changes_number = 0
        self.recovered = self.read_recovered = frozenset()
        self._save_header()
        return False

    def _save_header(self) -> None:
        assert self._region is not None
        _HEADER.pack_into(
            self._region, 0, _MAGIC, self.capacity, self.block_shift, self.block_count,
            self.active, self.changes_number, uuid.UUID(self.generation_id).bytes,
            uuid.UUID(self.read_generation_id).bytes,
        )  # fmt: skip
        _RECOVERED.pack_into(
            self._region, _RECOVERED_AT, numbers_bits(self.recovered),
            numbers_bits(self.read_recovered),
        )  # fmt: skip

    def release(self) -> None:
        """The map is done with (tracker detached, device removed): its
        region goes."""
        with self._lock:
            if self._region is not None:
                self.regions.drop(self.key)
        intent, self.intent = self.intent, None
        if intent is not None:
            intent.close()

    def export(self, facts: BackingFacts, *, clean: bool, epoch: bool = False) -> Checkpoint:
        """The map as a checkpoint (numbers and both maps, consistent), of a
        backing store that is ``facts``; ``clean``: taken at a clean stop.
        ``epoch``: the write intent starts a new epoch at the same instant
        (end it with ``intent.end_epoch`` once the checkpoint is durable)."""
        intent = self.intent
        with self._lock:
            if epoch and intent is not None:
                intent.begin_epoch()  # (before the maps are copied: see mark)
            live = intent if intent is not None and intent.failed is None else None
            return Checkpoint(
                clean=clean,
                capacity=self.capacity,
                block_shift=self.block_shift,
                block_count=self.block_count,
                active=self.active,
                changes_number=self.changes_number,
                generation_id=self.generation_id,
                read_generation_id=self.read_generation_id,
                facts=facts,
                written_at=time.time(),
                write_map=self.write_map.tobytes(),
                read_map=self.read_map.tobytes(),
                intent_token=live.token if live is not None else None,
                intent_shift=live.shift if live is not None else 0,
                recovered=self.recovered,
                read_recovered=self.read_recovered,
            )

    def restore(self, cp: Checkpoint) -> None:
        """Carry on from checkpoint ``cp`` of a map of this capacity and
        block size (before any write is marked)."""
        with self._lock:
            self.write_map[:] = np.frombuffer(cp.write_map, dtype=np.uint8)
            self.read_map[:] = np.frombuffer(cp.read_map, dtype=np.uint8)
            self.active, self.changes_number = cp.active, cp.changes_number
            self.generation_id, self.read_generation_id = cp.generation_id, cp.read_generation_id
            self.recovered, self.read_recovered = cp.recovered, cp.read_recovered
            self._save_header()

    def _blocks(self, offset: int, length: int) -> slice:
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise InvalidArgument(
                f"range {offset}+{length} is outside the tracked capacity {self.capacity}"
            )
        return slice(offset >> self.block_shift, (offset + length - 1 >> self.block_shift) + 1)

    def mark(self, offset: int, length: int) -> bool:
        """A device write: its blocks changed under the active number; with
        a write intent, returns once the write's regions are durable in it
        (the write may then reach the device). True, always: so it can serve
        as a tracker's :meth:`Tracker.pass_write` as it is (no snapshot
        holds the device: marking is all a write needs; one call less on the
        path of every write).

        Lock-free: it runs with the device's gate held, and take (the only
        change of ``active``) drains the gate first. With write intent the
        order makes it safe without a lock too: the map is marked *before*
        the regions are looked up (per block, in ``_iok``), and a checkpoint
        clears them (:meth:`IntentLog.begin_epoch`) *before* it copies the
        map. So a write that finds its regions durable was marked before the
        copy (the checkpoint has it), and one that does not waits in
        :meth:`IntentLog.cover` (the next checkpoint has it, and until then
        the file has its regions). (The GIL orders these steps.)
        """
        if length <= 0:
            return True
        shift = self.block_shift
        first, last = offset >> shift, (offset + length - 1) >> shift
        if first == last:  # (an item costs a sixth of a slice)
            self._write_view[first] = self.active
            if self._intent is None or self._iok[first]:
                return True
        else:
            self.write_map[first : last + 1] = self.active
            if self._intent is None or self._iok.find(0, first, last + 1) < 0:
                return True
        intent = self._intent
        if intent is not None:  # (not durable yet in this epoch)
            intent.cover(*intent.span(offset, length))
        return True

    def mark_may_wait(self, offset: int, length: int) -> bool:
        """Could :meth:`mark` of this range wait for a write-intent flush?"""
        intent = self.intent
        if intent is None or length <= 0 or intent.failed is not None:
            return False
        return not intent.covered(*intent.span(offset, length))

    def mark_both(self, offset: int, length: int) -> None:
        """Mark blocks changed in the write map *and* in the frozen read map,
        so both the backup under way and the next one read them (image
        writes, ``markdirtyblock``); with write intent, durable as
        :meth:`mark` makes them."""
        if length <= 0:
            return
        with self._lock:
            blocks = self._blocks(offset, length)
            self.write_map[blocks] = self.active
            if self.changes_number:
                self.read_map[blocks] = self.changes_number
        intent = self.intent
        if intent is not None:
            intent.cover(*intent.span(offset, length))

    def switch(self) -> None:
        """At take: freeze the read map and move to the next number."""
        with self._lock:
            self.read_map[:] = self.write_map
            self.read_generation_id = self.generation_id
            self.changes_number = self.active
            self.read_recovered = self.recovered
            if self.active == MAX_SNAP_NUMBER:
                self.generation_id = str(uuid.uuid4())
                self.write_map.fill(0)
                self.active = 1
                self.recovered = frozenset()
            else:
                self.active += 1
            self._save_header()

    def resize(self, capacity: int) -> None:
        """A capacity change: nothing before it can be trusted, new generation."""
        with self._lock:
            self._open(capacity, fresh=True)

    def info(self) -> CbtInfo:
        with self._lock:
            return CbtInfo(
                block_size=self.block_size,
                device_capacity=self.capacity,
                block_count=self.block_count,
                generation_id=self.read_generation_id,
                changes_number=self.changes_number,
                recovered=tuple(sorted(self.read_recovered)),
            )

    def read_map_bytes(self) -> bytes:
        with self._lock:
            return self.read_map.tobytes()

    def changed_runs(
        self, offset: int, length: int, since: int, *, live: bool = False, limit: int = 0
    ) -> list[tuple[int, int, bool]]:
        """Runs ``(offset, length, changed)`` covering ``offset``..``offset+length``
        in bytes: changed where the block's number in the frozen read map
        (with ``live``, the write map) is greater than ``since``. Blocks
        alike are merged, the first and last run clipped to the range; with
        ``limit``, at most that many runs (a prefix of the range). Blocks
        past the map (a range past the tracked capacity) count as changed.

        Changed since the previous take, on the image of take *k*:
        ``since=changes_number - 1``; written since the last take, on the
        device: ``since=active - 1, live=True``.
        """
        if offset < 0 or length <= 0:
            return []
        end = offset + length
        with self._lock:
            shift = self.block_shift
            first, last = offset >> shift, (end - 1) >> shift
            numbers = (self.write_map if live else self.read_map)[first : last + 1]
            mask = numbers > since
        blocks = last - first + 1
        if len(mask) < blocks:
            mask = np.concatenate([mask, np.ones(blocks - len(mask), dtype=bool)])
        return mask_runs(mask, first, shift, offset, end, limit)

    def changed_blocks(self, since: int) -> np.ndarray:
        """Indices of read-map blocks whose number is greater than ``since``."""
        with self._lock:
            return np.flatnonzero(self.read_map > since)
