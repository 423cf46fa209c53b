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
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blksnap.engine.diff_area import DiffArea
from blksnap.engine.diff_storage import DiffStorage
from blksnap.engine.event_queue import CORRUPTED, LOW_FREE_SPACE, NO_SPACE, EventQueue
from blksnap.engine.gate import Gate
from blksnap.engine.image import Image
from blksnap.engine.params import Params
from blksnap.errors import AlreadyDone, BlksnapError, InvalidArgument, NoSpace, NotFound

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
        self, params: Params, devices: list[tuple[Device, Tracker]], sid: str | None = None
    ) -> None:
        self.id = sid or str(uuid.uuid4())
        self.params = params
        self.created = time.time()
        self.taken_at: float | None = None
        self.state = CREATED
        self.error = 0
        self.events = EventQueue()
        #: One chunk size for the whole set, from its largest device.
        self.chunk_size = max(params.chunk_size_for(dev.size) for dev, _ in devices)
        self.storage = DiffStorage(params, on_low_space=self._low_space, slot_size=self.chunk_size)
        self.members = {dev.name: SnapshotDevice(dev, trk) for dev, trk in devices}
        #: Every image I/O holds this gate; destroy closes it.
        self.image_gate = Gate()
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
                area = DiffArea(
                    member.device,
                    self.storage,
                    self.params,
                    on_error=lambda exc, name=member.device.name: self._corrupted(name, exc),
                )
                member.diff_area = area
            # Nothing below can fail: the instant itself.
            for member in ordered:
                member.tracker.cbt.switch()
                assert member.diff_area is not None
                member.diff_area.armed = True
                member.tracker.diff_area = member.diff_area
            self.taken_at = time.time()
            self.state = TAKEN
        except BaseException:
            for member in ordered:
                member.tracker.diff_area = None
                member.diff_area = None
            raise
        finally:
            for member in frozen:
                member.device.queue.unfreeze()
        for member in ordered:
            assert member.diff_area is not None
            member.image = Image(
                self.id, member.device.name, member.diff_area, member.tracker.cbt, self.image_gate
            )
        log.info("snapshot %s taken: %s", self.id, ", ".join(m.device.name for m in ordered))

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
        sid = self.id
        self.image_gate.close(lambda: NotFound(f"snapshot {sid} has been destroyed"))
        for member in self.members.values():
            member.device.queue.freeze()
            try:
                member.tracker.diff_area = None
                member.tracker.snapshot_id = None
            finally:
                member.device.queue.unfreeze()
            member.image = None
        self.storage.release()
        self.events.close()
        log.info("snapshot %s destroyed", self.id)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "error": errno.errorcode.get(self.error) if self.error else None,
            "errno": self.error,
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
