"""The in-process engine: devices, filters, trackers, snapshots and images.

Synchronous and thread-safe. Control operations (add, attach, create, take,
destroy ...) serialise on one lock; I/O never takes it. No module below this
one knows of FUSE, NBD or the daemon.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from .cbt import CbtInfo
from .device import Device, identity_of
from .diff_storage import DiffStorage
from .errors import Busy, Exists, InvalidArgument, NotFound
from .event_queue import Event
from .filters import Filter, FilterRegistry
from .image import Image
from .params import Params
from .snapshot import Snapshot
from .tracker import Tracker

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Engine:
    """Everything blksnap does, in one process.

    >>> eng = Engine("/var/lib/blksnap")          # doctest: +SKIP
    >>> eng.add_device("/srv/disk0.img", name="disk0")
    """

    def __init__(self, state_dir: str | os.PathLike[str], params: Params | None = None) -> None:
        self.state_dir = os.fspath(state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.params = params or Params()
        self.registry = FilterRegistry()
        self.registry.register(Tracker)
        self._devices: dict[str, Device] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._lock = threading.RLock()
        self._closed = False

    # -- devices --------------------------------------------------------------

    def add_device(self, path: str | os.PathLike[str], name: str) -> Device:
        path = os.fspath(path)
        if not NAME_RE.match(name or ""):
            raise InvalidArgument(
                f"bad device name {name!r}: 1-64 of letters, digits and _ . + -, "
                "starting with a letter or digit"
            )
        with self._lock:
            self._check_open()
            if name in self._devices:
                raise Exists(f"a device named {name!r} is already served")
            ident = identity_of(path)
            if ident is None:
                raise NotFound(f"no such file or block device: {path}")
            for dev in self._devices.values():
                if dev.backing.identity == ident:
                    raise Busy(f"{path} is already served as {dev.name!r}")
            dev = Device(name, path, self.params)
            self._devices[name] = dev
        log.info("device %s added: %s (%d bytes)", name, dev.path, dev.size)
        return dev

    def remove_device(self, name: str) -> None:
        with self._lock:
            dev = self.device(name)
            trk = self._tracker_or_none(dev)
            if trk is not None and trk.snapshot_id is not None:
                raise Busy(f"{name} is in snapshot {trk.snapshot_id}")
            del self._devices[name]
        dev.close()
        log.info("device %s removed", name)

    def device(self, name: str) -> Device:
        dev = self._devices.get(name)
        if dev is None:
            raise NotFound(f"no device named {name!r}")
        return dev

    def devices(self) -> list[Device]:
        with self._lock:
            return [self._devices[n] for n in sorted(self._devices)]

    # -- filters --------------------------------------------------------------

    def register_filter(self, cls: type[Filter]) -> None:
        self.registry.register(cls)

    def attach(
        self, name: str, filter: str = "blksnap", opts: dict[str, str] | None = None
    ) -> Filter:
        with self._lock:
            dev = self.device(name)
            cls = self.registry.get(filter)
            return dev.attach_filter(cls, dict(opts or {}))

    def detach(self, name: str, filter: str = "blksnap") -> None:
        with self._lock:
            dev = self.device(name)
            cls = self.registry.get(filter)
            dev.detach_filter(cls)

    def ctl(self, name: str, filter: str, cmd: str, arg: Any = None) -> Any:
        dev = self.device(name)
        flt = dev.filters.find(filter)
        if flt is None:
            self.registry.get(filter)  # ENOENT for an unknown filter name
            raise NotFound(f"filter {filter!r} is not attached to {name}")
        return flt.ctl(cmd, arg)

    def filters(self, name: str) -> list[str]:
        return [f.name for f in self.device(name).filters]

    def _tracker_or_none(self, dev: Device) -> Tracker | None:
        flt = dev.filters.find(Tracker.name)
        return flt if isinstance(flt, Tracker) else None

    def tracker(self, name: str) -> Tracker:
        trk = self._tracker_or_none(self.device(name))
        if trk is None:
            raise NotFound(f"the blksnap tracker is not attached to {name}")
        return trk

    # -- CBT ------------------------------------------------------------------

    def cbt_info(self, name: str) -> CbtInfo:
        return self.ctl(name, Tracker.name, "cbtinfo")

    def cbt_map(self, name: str) -> bytes:
        return self.ctl(name, Tracker.name, "cbtmap")

    def mark_dirty(self, name: str, ranges: Iterable[tuple[int, int]]) -> None:
        dev = self.device(name)
        checked = []
        for offset, length in ranges:
            if offset < 0 or length <= 0 or offset + length > dev.size:
                raise InvalidArgument(
                    f"range {offset}+{length} is outside {name} ({dev.size} bytes)"
                )
            checked.append((offset, length))
        self.ctl(name, Tracker.name, "markdirty", checked)

    # -- snapshots --------------------------------------------------------------

    def _snapshot(self, sid: str) -> Snapshot:
        snap = self._snapshots.get(sid) if isinstance(sid, str) else None
        if snap is None:
            raise NotFound(f"no snapshot {sid!r}")
        return snap

    def snapshot_create(
        self,
        names: Sequence[str],
        storage: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        ranges: Sequence[tuple[int, int]] | None = None,
        sid: str | None = None,
    ) -> str:
        """A snapshot of ``names``; the tracker is attached where it is not.

        ``sid`` lets the caller choose the id (a UUID) before the call, so a
        caller that dies before the answer can still name the snapshot it
        may have created (a backup records it in its staging dir first).

        ``storage`` is a directory (an anonymous file of up to ``limit``
        bytes), a regular file (up to ``limit`` bytes, or its ``ranges``) or a
        block device (whole, up to ``limit``, or its ``ranges``).
        """
        if isinstance(names, str):
            names = [names]
        if not names:
            raise InvalidArgument("a snapshot needs at least one device")
        if len(set(names)) != len(names):
            raise InvalidArgument("a device is named twice")
        if sid is not None:
            try:
                sid = str(uuid.UUID(sid))
            except (ValueError, TypeError, AttributeError):
                raise InvalidArgument(f"snapshot id {sid!r} is not a UUID") from None
        with self._lock:
            self._check_open()
            if sid is not None and sid in self._snapshots:
                raise Exists(f"snapshot {sid} already exists")
            devs = [self.device(n) for n in names]
            for dev in devs:
                trk = self._tracker_or_none(dev)
                if trk is not None and trk.snapshot_id is not None:
                    raise Busy(f"{dev.name} is already in snapshot {trk.snapshot_id}")
            if storage is not None:
                self._check_storage(os.fspath(storage), devs)
            attached: list[Device] = []
            pairs: list[tuple[Device, Tracker]] = []
            try:
                for dev in devs:
                    trk = self._tracker_or_none(dev)
                    if trk is None:
                        trk = dev.attach_filter(Tracker, {})  # type: ignore[assignment]
                        attached.append(dev)
                    assert isinstance(trk, Tracker)
                    pairs.append((dev, trk))
                snap = Snapshot(self.params, pairs, sid)
                if storage is not None:
                    snap.storage.add(os.fspath(storage), size=limit, ranges=ranges)
            except BaseException:
                for dev in attached:
                    dev.detach_filter(Tracker)
                raise
            for _, trk in pairs:
                trk.snapshot_id = snap.id
            self._snapshots[snap.id] = snap
        log.info("snapshot %s created: %s", snap.id, ", ".join(names))
        return snap.id

    def _check_storage(self, path: str, devs: Sequence[Device]) -> None:
        try:
            ident = DiffStorage.identity(path)
        except OSError as exc:
            raise NotFound(f"diff storage {path}: {exc.strerror}") from None
        if ident is None:
            return
        for dev in devs:
            if dev.backing.identity == ident:
                raise InvalidArgument(f"diff storage {path} is device {dev.name} of this snapshot")

    def snapshot_append_storage(
        self,
        sid: str,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        with self._lock:
            snap = self._snapshot(sid)
            if snap.state not in ("created", "taken"):
                raise InvalidArgument(f"snapshot {sid} is {snap.state}")
            self._check_storage(os.fspath(path), [m.device for m in snap.members.values()])
        snap.storage.add(os.fspath(path), size=size, ranges=ranges)

    def snapshot_take(self, sid: str) -> None:
        with self._lock:
            self._snapshot(sid).take()

    def snapshot_destroy(self, sid: str) -> None:
        with self._lock:
            snap = self._snapshot(sid)
            del self._snapshots[sid]
        snap.destroy()

    def snapshot_collect(self, sid: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            snaps = [self._snapshot(sid)] if sid is not None else list(self._snapshots.values())
        return [s.describe() for s in sorted(snaps, key=lambda s: s.created)]

    def snapshot_info(self, name: str) -> dict[str, Any]:
        """The snapshot holding device ``name``: its id, error and image."""
        trk = self.tracker(name)
        sid = trk.snapshot_id
        if sid is None:
            raise NotFound(f"{name} is in no snapshot")
        snap = self._snapshot(sid)
        member = snap.members[name]
        return {
            "id": sid,
            "state": snap.state,
            "error": snap.error,
            "image": name if member.image is not None else None,
        }

    def snapshot(self, sid: str) -> Snapshot:
        return self._snapshot(sid)

    def image(self, sid: str, name: str) -> Image:
        return self._snapshot(sid).image(name)

    def wait_event(self, sid: str, timeout: float | None = None) -> Event | None:
        return self._snapshot(sid).events.wait(timeout)

    # -- life ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("engine is closed")

    def close(self) -> None:
        """Destroy every snapshot, flush and release every device."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            snaps = list(self._snapshots.values())
            self._snapshots.clear()
        for snap in snaps:
            snap.destroy()
        for dev in self.devices():
            try:
                dev.backing.flush()
            except Exception as exc:  # keep closing the others
                log.error("flush of %s failed: %s", dev.name, exc)
            dev.close()
        self._devices.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
