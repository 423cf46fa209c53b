"""A snapshot: a set of devices taken at one instant, its diff storage, its
images and its event queue.

Life cycle: ``created`` (devices held, storage ready) -> ``taken`` (images
exist, copy-on-write armed) -> ``destroyed``. A failure of diff storage turns
a taken snapshot ``corrupted``: the error is kept, a ``corrupted`` event is
queued, image I/O fails with ``EIO``, and the devices go on as if nothing
happened.
"""

from __future__ import annotations

import errno
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blksnap.engine.diff_area import DiffArea, region_size
from blksnap.engine.diff_storage import DiffStorage
from blksnap.engine.event_queue import CORRUPTED, LOW_FREE_SPACE, NO_SPACE, EventQueue
from blksnap.engine.gate import Gate
from blksnap.engine.image import Image
from blksnap.engine.params import Params
from blksnap.engine.regions import LOCAL, Regions
from blksnap.engine.snapshot_state import (
    S_CREATED,
    S_DESTROYING,
    S_TAKEN,
    S_TAKING,
    SnapshotState,
)
from blksnap.errors import (
    AlreadyDone,
    BlksnapError,
    InvalidArgument,
    IOFailure,
    NoSpace,
    NotFound,
)

if TYPE_CHECKING:
    from blksnap.engine.device import Device
    from blksnap.engine.tracker import Tracker

log = logging.getLogger(__name__)

CREATED = "created"
TAKEN = "taken"
CORRUPTED_STATE = "corrupted"
DESTROYED = "destroyed"


@dataclass
class SnapshotDevice:
    device: Device
    tracker: Tracker
    diff_area: DiffArea | None = None
    image: Image | None = None


class Snapshot:
    def __init__(
        self,
        params: Params,
        devices: list[tuple[Device, Tracker]],
        sid: str | None = None,
        regions: Regions = LOCAL,
        *,
        chunk_size: int | None = None,
        keep: SnapshotState | None = None,
    ) -> None:
        """A new snapshot of ``devices``; its state kept in ``regions``
        (a process taking over finds it there: :meth:`resume`, which gives
        the ``chunk_size`` and ``keep`` found)."""
        self.id = sid or str(uuid.uuid4())
        self.params = params
        self.regions = regions
        self.taken_at: float | None = None
        self.state = CREATED
        self.error = 0
        #: Why it is corrupted, where no event says it (a take cut short).
        self.reason: str | None = None
        self.events = EventQueue()
        #: One chunk size for the whole set, from its largest device.
        self.chunk_size = chunk_size or max(params.chunk_size_for(dev.size) for dev, _ in devices)
        self.members = {dev.name: SnapshotDevice(dev, trk) for dev, trk in devices}
        if keep is None:
            desc = {"devices": sorted(self.members), "chunk_size": self.chunk_size}
            keep = SnapshotState.create(regions, self.id, desc)
        self.keep = keep
        self.created = keep.created
        self.storage = DiffStorage(
            params, on_low_space=self._low_space, slot_size=self.chunk_size, keep=keep
        )
        #: Every image I/O holds this gate; destroy closes it (and the
        #: images' compiled short ways).
        self.image_gate = Gate(self._close_image_ways)
        self.storage.before_device_source = self._close_image_ways
        self._lock = threading.Lock()

    # -- events ---------------------------------------------------------------

    def _low_space(self, data: dict[str, int]) -> None:
        log.warning("snapshot %s: diff storage low: %s", self.id, data)
        self.events.push(LOW_FREE_SPACE, data)

    def _corrupted(self, name: str, exc: BlksnapError) -> None:
        with self._lock:
            first = self.state != CORRUPTED_STATE
            if first:
                self.state = CORRUPTED_STATE
                self.error = exc.errno or errno.EIO
        if not first:
            return
        data: dict[str, Any] = {
            "device": name,
            "errno": self.error,
            "error": errno.errorcode.get(self.error, str(self.error)),
            "message": exc.message,
        }
        if isinstance(exc, NoSpace):
            self.events.push(NO_SPACE, {"device": name, "capacity": self.storage.capacity})
        self.events.push(CORRUPTED, data)
        # One failed device invalidates the whole consistent set.
        for member in self.members.values():
            if member.diff_area is not None and not member.diff_area.error:
                member.diff_area.fail(exc)

    # -- take -----------------------------------------------------------------

    def take(self) -> None:
        """All devices at one instant: drain every device's in-flight writes,
        switch every CBT map and arm copy-on-write, then let writes go on."""
        if self.state != CREATED:
            raise AlreadyDone(f"snapshot {self.id} is {self.state}, not {CREATED}")
        if not self.storage.sources:
            # Nothing changed: the snapshot stays created, storage can still be added.
            raise InvalidArgument(
                f"snapshot {self.id}: no diff storage: add some with "
                f"blksnap snapshot appendstorage -i {self.id} -f PATH [-l SIZE]"
            )
        ordered = sorted(self.members.values(), key=lambda m: m.device.name)
        frozen: list[SnapshotDevice] = []
        try:
            for member in ordered:
                member.device.queue.freeze()
                frozen.append(member)
            for member in ordered:
                member.tracker.check_capacity()
                dev = member.device
                size = region_size(dev.size, self.chunk_size, self.params.chunk_map_page)
                region, _ = self.regions.open(self.keep.area_key(dev.name), size)
                member.diff_area = self._area(member, region, resumed=False)
            # Nothing below can fail: the instant itself. (A process cut off
            # here leaves ``taking``: the next cannot prove the set whole.)
            self.keep.set_state(S_TAKING)
            for member in ordered:
                member.tracker.cbt.switch()
                assert member.diff_area is not None
                member.diff_area.armed = True
                member.tracker.diff_area = member.diff_area
            self.keep.set_state(S_TAKEN)
            self.taken_at = self.keep.taken_at
            self.state = TAKEN
        except BaseException:
            for member in ordered:
                member.tracker.diff_area = None
                member.diff_area = None
                self.regions.drop(self.keep.area_key(member.device.name))
            self.keep.set_state(S_CREATED)
            raise
        finally:
            for member in frozen:
                member.device.queue.unfreeze()
        self._make_images()
        log.info("snapshot %s taken: %s", self.id, ", ".join(m.device.name for m in ordered))

    def _area(self, member: SnapshotDevice, region: Any, *, resumed: bool) -> DiffArea:
        name = member.device.name
        return DiffArea(
            member.device,
            self.storage,
            self.params,
            on_error=lambda exc: self._corrupted(name, exc),
            region=region,
            resumed=resumed,
        )

    def _make_images(self) -> None:
        for name, member in sorted(self.members.items()):
            assert member.diff_area is not None
            member.image = image = Image(
                self.id, name, member.diff_area, member.tracker.cbt, self.image_gate
            )
            dev = member.device
            dev.images = [*dev.images, image]  # (replaced whole: read lock-free)
            dev.queue.refresh()  # (its way opens with the device's)

    def _close_image_ways(self) -> None:
        for member in self.members.values():
            if member.image is not None:
                member.image.close_short_way()

    # -- a process taking over ----------------------------------------------------

    @classmethod
    def resume(
        cls,
        params: Params,
        regions: Regions,
        keep: SnapshotState,
        devices: list[tuple[Device, Tracker]],
        via_for: Any,
    ) -> Snapshot:
        """The snapshot a process before this one left in ``keep``, on
        ``devices`` (its members, served again): created, or taken with its
        chunk maps and diff storage as they were (copy-on-write armed again),
        or corrupted where that cannot be proven (a take cut short, a chunk
        map missing). A snapshot left ``destroying`` is not resumed: see
        :meth:`finish_destroy`. ``InvalidArgument`` if it cannot be resumed
        at all (its description or storage missing)."""
        desc = keep.desc()
        if desc is None:
            raise InvalidArgument(f"snapshot {keep.sid}: its description was not kept")
        snap = cls(params, devices, keep.sid, regions, chunk_size=int(desc["chunk_size"]),
                   keep=keep)  # fmt: skip
        snap.storage = DiffStorage.resume(params, keep, snap.chunk_size, snap._low_space, via_for)
        try:
            return snap._resume_state(regions, keep)
        except BaseException:
            snap.storage.release()  # (the caller finishes it off from ``keep``)
            raise

    def _resume_state(self, regions: Regions, keep: SnapshotState) -> Snapshot:
        snap = self
        state = keep.state
        if state == S_CREATED:
            return snap
        snap.taken_at = keep.taken_at
        if state == S_TAKING:
            snap._resumed_corrupted("its take was cut short by a restart of blksnapd's "
                                    "worker: the devices' instant cannot be proven")  # fmt: skip
            return snap
        if state != S_TAKEN:
            raise InvalidArgument(f"snapshot {keep.sid}: state {state} left, not resumable")
        missing: list[str] = []
        for name, member in sorted(snap.members.items()):
            region = regions.find(keep.area_key(name))
            if region is None:
                missing.append(name)
                continue
            try:
                member.diff_area = snap._area(member, region, resumed=True)
            except BlksnapError as exc:
                missing.append(f"{name} ({exc.message})")
        if missing:
            for member in snap.members.values():
                member.diff_area = None
            snap._resumed_corrupted("the chunk map of " + ", ".join(missing) + " was not kept")
            return snap
        snap.state = TAKEN
        for member in snap.members.values():
            assert member.diff_area is not None
            member.diff_area.armed = True
            member.tracker.diff_area = member.diff_area
        snap._make_images()
        failed = [m.diff_area for m in snap.members.values() if m.diff_area and m.diff_area.error]
        if failed:
            area = failed[0]
            snap._corrupted(area.device.name, IOFailure(
                f"corrupted before the restart ({errno.errorcode.get(area.error, area.error)})",
                errno=area.error))  # fmt: skip
        snap.storage.guard()
        return snap

    def _resumed_corrupted(self, reason: str) -> None:
        self.state = CORRUPTED_STATE
        self.error = errno.EIO
        self.reason = reason
        log.error("snapshot %s corrupted: %s", self.id, reason)
        self.events.push(CORRUPTED, {"device": None, "errno": errno.EIO, "error": "EIO",
                                     "message": reason})  # fmt: skip

    @staticmethod
    def finish_destroy(params: Params, keep: SnapshotState) -> None:
        """A snapshot whose destroy was cut short: release what is left
        (its diff storage files made here are removed) and its regions."""
        try:
            storage = DiffStorage.resume(params, keep, 1 << 16, None, lambda _name: None)
        except BlksnapError as exc:
            log.warning("snapshot %s: finishing its destroy: %s", keep.sid, exc)
        else:
            for src in storage.sources:
                src.immutable = src.kind == "mapped"  # clear it, in case
            storage.release()
        keep.drop()

    # -- access ---------------------------------------------------------------

    def image(self, name: str) -> Image:
        member = self.members.get(name)
        if member is None:
            raise NotFound(f"device {name!r} is not in snapshot {self.id}")
        if member.image is None or self.state == DESTROYED:
            raise NotFound(f"snapshot {self.id} has no image of {name!r} (state {self.state})")
        return member.image

    # -- destroy --------------------------------------------------------------

    def destroy(self) -> None:
        """Stop copy-on-write (devices drained first), wait for image I/O in
        flight, release the storage. Trackers stay attached and keep tracking."""
        with self._lock:
            if self.state == DESTROYED:
                return
            self.state = DESTROYED
        self.keep.set_state(S_DESTROYING)
        sid = self.id
        self.image_gate.close(lambda: NotFound(f"snapshot {sid} has been destroyed"))
        for member in self.members.values():
            dev = member.device
            dev.queue.freeze()
            try:
                member.tracker.diff_area = None
                member.tracker.snapshot_id = None
                dev.images = [i for i in dev.images if i is not member.image]
            finally:
                dev.queue.unfreeze()
            member.image = None
            if member.diff_area is not None:
                member.diff_area.disown()
        # (no cycle through its own methods keeps it, and its chunk maps, alive)
        self.image_gate.close_ways = self.storage.before_device_source = None
        self.storage.release()
        self.keep.drop()
        self.events.close()
        log.info("snapshot %s destroyed", self.id)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "error": errno.errorcode.get(self.error) if self.error else None,
            "errno": self.error,
            "reason": self.reason,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "taken": self.taken_at,
            "storage": {
                "capacity": self.storage.capacity,
                "used": self.storage.used,
                "free": self.storage.capacity - self.storage.used,
                "sources": self.storage.describe(),
            },
            "devices": [
                {
                    "name": name,
                    "image": name if m.image is not None else None,
                    "size": m.diff_area.capacity if m.diff_area else m.device.size,
                    "chunks_stored": m.diff_area.chunks_stored if m.diff_area else 0,
                    "image_bytes_read": m.image.bytes_read if m.image else 0,
                    "image_reads": m.image.reads if m.image else 0,
                    "image_bytes_written": m.image.bytes_written if m.image else 0,
                }
                for name, m in sorted(self.members.items())
            ],
        }
