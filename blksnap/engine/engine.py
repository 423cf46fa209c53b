"""The in-process engine: devices, filters, trackers, snapshots and images.

Synchronous and thread-safe. Control operations (add, attach, create, take,
destroy ...) serialise on one lock; I/O never takes it. No module below this
one knows of FUSE, NBD or the daemon.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from blksnap import blockstack
from blksnap.blockstack import Extent
from blksnap.engine import cbt_checkpoint
from blksnap.engine.cbt import CbtInfo
from blksnap.engine.delay import Delay
from blksnap.engine.device import Device
from blksnap.engine.event_queue import Event, EventQueue
from blksnap.engine.filters import READ, WRITE, Bio, Filter, FilterRegistry
from blksnap.engine.flakey import Flakey
from blksnap.engine.hydrate import Hydrate
from blksnap.engine.image import Image
from blksnap.engine.migrate import Migrate
from blksnap.engine.params import Params
from blksnap.engine.powercut import Powercut
from blksnap.engine.regions import LOCAL as LOCAL_REGIONS
from blksnap.engine.regions import Regions
from blksnap.engine.snapshot import Snapshot
from blksnap.engine.snapshot_state import S_DESTROYING, SnapshotState, drop_regions
from blksnap.engine.tracker import Tracker
from blksnap.errors import (
    BlksnapError,
    Busy,
    Exists,
    InvalidArgument,
    NoDevice,
    NotFound,
    from_oserror,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

#: Event: a device's backing store (or a filter) failed a request. Data: the
#: device, errno, error, op, offset, length, time, message, and how many
#: failures since the previous report went unreported (rate limit).
DEVICE_ERROR = "device_error"


#: The filters every engine knows, lowest altitude (sees requests first) first.
BUILTIN_FILTERS: tuple[type[Filter], ...] = (
    Flakey, Delay, Tracker, Powercut, Hydrate, Migrate
)  # fmt: skip


class Engine:
    """Everything blksnap does, in one process.

    >>> eng = Engine("/var/lib/blksnap")          # doctest: +SKIP
    >>> eng.add_device("/srv/disk0.img", name="disk0")
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        params: Params | None = None,
        regions: Regions | None = None,
    ) -> None:
        self.state_dir = os.fspath(state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.params = params or Params()
        #: Where state that may outlive this process lives (the CBT maps):
        #: this process's memory unless given memory a supervisor holds.
        self.regions = regions or LOCAL_REGIONS
        self.registry = FilterRegistry()
        for cls in BUILTIN_FILTERS:
            self.registry.register(cls)
        #: Called when a device's backing store changed (a migration done),
        #: with the gate drained, before any request reaches the new store;
        #: an exception keeps the old one (blksnapd records the change here).
        self.on_backing_switch: Callable[[str, str], None] | None = None
        #: Called when a filter took itself off a device (a hydration
        #: done), with the gate drained: (device, filter); an exception
        #: keeps it on (blksnapd records the change here).
        self.on_filter_retired: Callable[[str, str], None] | None = None
        self._devices: dict[str, Device] = {}
        self._snapshots: dict[str, Snapshot] = {}
        #: Where each device's bytes really live (see :mod:`blksnap.blockstack`).
        self._extents: dict[str, list[Extent]] = {}
        #: The directory a front-end serves devices under as ``dev/NAME``
        #: (blksnapd's FUSE mount), so that a loop device over one of those
        #: files is known as that device.
        self.served_root: str | None = None
        self._lock = threading.RLock()
        self._closed = False
        #: Engine-wide events (``device_error``), beside each snapshot's own.
        self.events = EventQueue()
        #: Rate limit of device error reports: name -> (last report time,
        #: failures since then that were not reported).
        self._error_reports: dict[str, tuple[float, int]] = {}
        self._error_report_lock = threading.Lock()
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if self.params.cbt_checkpoint_interval > 0:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="blksnap-checkpoint", daemon=True
            )
            self._checkpointer.start()

    # -- devices --------------------------------------------------------------

    def add_device(
        self, path: str | os.PathLike[str], name: str, *, taking_over: bool = False
    ) -> Device:
        """Serve ``path`` as device ``name``. ``taking_over``: a process
        carrying on another's devices (the backing file's page cache is kept
        as it is; see :class:`BackingStore`)."""
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
            extents = blockstack.resolve(path, self._alias)
            self._check_not_served(path, extents)
            dev = Device(name, path, self.params, self.regions, settle_cache=not taking_over)
            dev.on_error = self._device_failed  # backing store failures: log, event
            dev.on_backing_switch = self._backing_switched
            dev.on_filter_retired = self._filter_retired
            dev.checkpoint_path = cbt_checkpoint.path_for(self.state_dir, name)
            dev.state_carrier = self._state_carrier
            self._devices[name] = dev
            self._extents[name] = extents
        log.info("device %s added: %s (%d bytes)", name, dev.path, dev.size)
        return dev

    def remove_device(self, name: str) -> None:
        with self._lock:
            dev = self.device(name)
            trk = self._tracker_or_none(dev)
            if trk is not None and trk.snapshot_id is not None:
                raise Busy(f"{name} is in snapshot {trk.snapshot_id}")
            holder = self._storage_holder(name)
            if holder is not None:
                raise Busy(f"{name} holds the diff storage of snapshot {holder}")
            del self._devices[name]
            self._extents.pop(name, None)
        if trk is not None:
            # (added again later, untouched meanwhile, it carries its CBT on)
            self._checkpoint_clean(dev)
            trk.cbt.release()
        dev.close()
        log.info("device %s removed", name)

    def _alias(self, path: str) -> str | None:
        """The device whose served file ``path`` is (see :attr:`served_root`)."""
        if not self.served_root:
            return None
        # The mount point itself is not stat'ed (a worker taking over
        # resolves devices before it serves its own mount: a stat of it
        # would wait for an answer only this process can give).
        root = os.path.join(
            os.path.realpath(os.path.dirname(self.served_root)), os.path.basename(self.served_root)
        )
        if not path.startswith(root + "/"):
            return None
        rel = path[len(root) + 1 :].split("/")
        if len(rel) == 2 and rel[0] == "dev":
            return rel[1]
        raise InvalidArgument(f"{path} is a file that blksnapd serves, not a device or storage")

    def _check_not_served(self, path: str, extents: list[Extent]) -> None:
        """``Busy`` when ``path`` reaches data that a device already serves."""
        for ext in extents:
            if ext.served is not None:
                raise Busy(f"{path} is device {ext.served!r} itself (through {ext.bottom})")
        for name, theirs in self._extents.items():
            hit = blockstack.overlap(extents, theirs)
            if hit is not None:
                raise Busy(
                    f"{path} is the same data as device {name!r} "
                    f"({self._devices[name].path}): both reach {blockstack.describe(hit)}"
                )

    def _backing_switched(self, dev: Device, old: Any) -> None:
        """A device now lives on other storage (its gate is drained)."""
        extents = blockstack.resolve(dev.path, self._alias)
        callback = self.on_backing_switch
        if callback is not None:
            callback(dev.name, dev.path)
        self._extents[dev.name] = extents

    def _filter_retired(self, dev: Device, flt: Filter) -> None:
        callback = self.on_filter_retired
        if callback is not None:
            callback(dev.name, flt.name)

    def _storage_holder(self, name: str) -> str | None:
        """The live snapshot whose diff storage lies on device ``name``."""
        for snap in self._snapshots.values():
            if name in snap.storage.devices_used():
                return snap.id
        return None

    def device(self, name: str) -> Device:
        dev = self._devices.get(name)
        if dev is None:
            raise NotFound(f"no device named {name!r}")
        return dev

    def devices(self) -> list[Device]:
        with self._lock:
            return [self._devices[n] for n in sorted(self._devices)]

    def device_errors(self) -> dict[str, dict[str, Any]]:
        """Devices whose backing store (or a filter) failed requests: name ->
        ``{"errors": total, "by_op": {op: count}, "last": {errno, error, op,
        offset, length, time, message}}``."""
        out: dict[str, dict[str, Any]] = {}
        for dev in self.devices():
            with dev._error_lock:
                counts, last = dict(dev.error_counts), dev.last_error
            if counts:
                out[dev.name] = {"errors": sum(counts.values()), "by_op": counts, "last": last}
        return out

    def _device_failed(self, dev: Device, failure: dict[str, Any]) -> None:
        """A request of ``dev`` failed in its backing store or a filter: log it
        and queue ``device_error`` (engine queue, and the queue of the
        snapshot holding the device), at most once per
        :attr:`Params.device_error_report_interval` seconds per device; the reports after
        the first say how many failures they stand for."""
        now = time.monotonic()
        with self._error_report_lock:
            last, held = self._error_reports.get(dev.name, (None, 0))
            if last is not None and now - last < self.params.device_error_report_interval:
                self._error_reports[dev.name] = (last, held + 1)
                return
            self._error_reports[dev.name] = (now, 0)
        data = {"device": dev.name, **failure, "unreported": held}
        log.error(
            "device %s: %s at %d+%d failed: %s (%s)%s",
            dev.name,
            failure["op"],
            failure["offset"],
            failure["length"],
            failure["error"],
            failure["message"],
            f"; {held} more failure(s) since the last report" if held else "",
        )
        self.events.push(DEVICE_ERROR, data)
        trk = self._tracker_or_none(dev)
        sid = trk.snapshot_id if trk is not None else None
        snap = self._snapshots.get(sid) if sid is not None else None
        if snap is not None:
            snap.events.push(DEVICE_ERROR, data)

    # -- filters --------------------------------------------------------------

    def register_filter(self, cls: type[Filter]) -> None:
        self.registry.register(cls)

    def attach(
        self, name: str, filter: str = "blksnap", opts: dict[str, str] | None = None
    ) -> Filter:
        with self._lock:
            dev = self.device(name)
            cls = self.registry.get(filter)
            opts = dict(opts or {})
            for key in cls.path_options:
                if opts.get(key):
                    path = os.path.abspath(opts[key])
                    self._check_not_served(path, blockstack.resolve(path, self._alias))
                    opts[key] = path
            flt = dev.attach_filter(cls, opts)
            dev.retired.pop(filter, None)
            return flt

    def detach(self, name: str, filter: str = "blksnap") -> None:
        with self._lock:
            dev = self.device(name)
            cls = self.registry.get(filter)
            dev.detach_filter(cls)
            if cls is Tracker and dev.checkpoint_path is not None:
                cbt_checkpoint.remove(dev.checkpoint_path)  # (tracking ends: so does its CBT)

    def ctl(self, name: str, filter: str, cmd: str, arg: Any = None) -> Any:
        dev = self.device(name)
        flt = dev.filters.find(filter)
        if flt is None:
            self.registry.get(filter)  # ENOENT for an unknown filter name
            last = dev.retired.get(filter)
            if cmd == "status" and last is not None:
                return last  # (a filter that detached itself: how it ended)
            raise NotFound(f"filter {filter!r} is not attached to {name}")
        return flt.ctl(cmd, arg)

    def filter_status(self, name: str) -> list[dict[str, Any]]:
        """Device ``name``'s stack, in the order requests meet it: name,
        altitude and the filter's own status."""
        return [
            {"filter": f.name, "altitude": f.altitude, "status": f.status()}
            for f in self.device(name).filters
        ]

    def filter_kinds(self) -> list[dict[str, Any]]:
        """The registered filters by altitude: name, altitude, summary,
        options and control commands."""
        kinds = [self.registry.get(n) for n in self.registry.names()]
        return [
            {
                "filter": c.name,
                "altitude": c.altitude,
                "summary": c.summary,
                "options": dict(c.options),
                "commands": dict(c.commands),
            }
            for c in sorted(kinds, key=lambda c: c.altitude)
        ]

    def filters(self, name: str) -> list[str]:
        return [f.name for f in self.device(name).filters]

    def _tracker_or_none(self, dev: Device) -> Tracker | None:
        flt = dev.filters.find(Tracker.name)
        return flt if isinstance(flt, Tracker) else None

    def tracker_of(self, name: str) -> Tracker | None:
        """The ``blksnap`` tracker of device ``name``, or None if not attached."""
        return self._tracker_or_none(self.device(name))

    def snapshot_of(self, name: str) -> str | None:
        """The id of the snapshot holding device ``name``, or None."""
        trk = self.tracker_of(name)
        return trk.snapshot_id if trk is not None else None

    def tracker(self, name: str) -> Tracker:
        trk = self.tracker_of(name)
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
                holder = self._storage_holder(dev.name)
                if holder is not None:
                    raise Busy(f"{dev.name} holds the diff storage of snapshot {holder}")
            carrier = None
            if storage is not None:
                carrier = self._check_storage(os.fspath(storage), devs)
            attached: list[Device] = []
            pairs: list[tuple[Device, Tracker]] = []
            snap: Snapshot | None = None
            try:
                for dev in devs:
                    trk = self._tracker_or_none(dev)
                    if trk is None:
                        trk = dev.attach_filter(Tracker, {})  # type: ignore[assignment]
                        attached.append(dev)
                    assert isinstance(trk, Tracker)
                    pairs.append((dev, trk))
                snap = Snapshot(self.params, pairs, sid, self.regions)
                if storage is not None:
                    self._add_storage(snap, os.fspath(storage), limit, ranges, carrier)
            except BaseException:
                if snap is not None:
                    snap.storage.release()
                    snap.keep.drop()
                for dev in attached:
                    dev.detach_filter(Tracker)
                raise
            for _, trk in pairs:
                trk.snapshot_id = snap.id
            self._snapshots[snap.id] = snap
        log.info("snapshot %s created: %s", snap.id, ", ".join(names))
        return snap.id

    def _check_storage(self, path: str, devs: Sequence[Device]) -> Extent | None:
        """Check diff storage ``path`` for a snapshot of ``devs``. Returns
        None to use it as it is, or, for a regular file on a file system that
        a served device carries, that device's extent under the file system:
        the file is then used through its blocks on the device's backing
        store (see :meth:`_add_mapped`). ``InvalidArgument`` for storage that
        would be written through a device of the snapshot, ``Busy`` for
        storage that is another served device's data."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise NotFound(f"diff storage {path}: {exc.strerror}") from None
        members = {dev.name for dev in devs}
        if not stat.S_ISDIR(st.st_mode):
            extents = blockstack.resolve(path, self._alias)
            for ext in extents:
                if ext.served is not None:
                    raise InvalidArgument(
                        f"diff storage {path} is device {ext.served} (through {ext.bottom}): "
                        "copy-on-write would write through the device itself"
                    )
            for name, theirs in self._extents.items():
                if blockstack.overlap(extents, theirs) is None:
                    continue
                if name in members:
                    raise InvalidArgument(f"diff storage {path} is device {name} of this snapshot")
                raise Busy(f"diff storage {path} is the data of device {name}")
            if stat.S_ISBLK(st.st_mode):
                return None
        # The file system holding it: on a served device?
        fs = blockstack.resolve_devnum(st.st_dev, self._alias)
        carrier = next((e for e in fs if e.served is not None), None)
        if carrier is None:
            for name, theirs in self._extents.items():
                if blockstack.overlap(fs, theirs) is not None:
                    raise Busy(
                        f"diff storage {path} is on a file system mounted from the data of "
                        f"device {name} without blksnapd in between"
                    )
            return None
        where = f"{path} is on a file system that blksnapd device {carrier.served} carries"
        if not blockstack.is_linear(fs):
            raise InvalidArgument(
                f"diff storage {where} through a stack that is not linear: its blocks "
                "cannot be found on the device; use storage on a file system blksnapd "
                "does not serve"
            )
        fstype = blockstack.mount_fstype(st.st_dev)
        if fstype not in blockstack.STABLE_EXTENT_FS:
            raise InvalidArgument(
                f"diff storage {where}: {fstype or 'its file system'} may move a file's blocks; "
                f"use a file on {', '.join(sorted(blockstack.STABLE_EXTENT_FS))}, or storage "
                "on a file system blksnapd does not serve"
            )
        assert carrier.served is not None
        dev = self.device(carrier.served)
        if dev.name not in members:
            trk = self._tracker_or_none(dev)
            if trk is not None and trk.snapshot_id is not None:
                raise Busy(f"diff storage {where}, and {dev.name} is in snapshot {trk.snapshot_id}")
        return carrier

    def _add_storage(
        self,
        snap: Snapshot,
        path: str,
        size: int | None,
        ranges: Sequence[tuple[int, int]] | None,
        carrier: Extent | None,
    ) -> None:
        if carrier is None:
            snap.storage.add(path, size=size, ranges=ranges)
        else:
            if ranges:
                raise InvalidArgument(
                    f"diff storage {path}: sector ranges are for block devices and files "
                    "that no served device carries; give a size (-l) instead"
                )
            self._add_mapped(snap, path, size, carrier)

    def _add_mapped(self, snap: Snapshot, path: str, size: int | None, carrier: Extent) -> None:
        """Diff storage on a file system that served device ``carrier.served``
        carries, taken as the kernel module takes it: a regular file (or, for
        a directory, a file ``.blksnap-diff-ID-N`` made there and removed at
        release) is preallocated, its extents (FIEMAP) are mapped through
        the block stack onto the device, and chunks are written there in the
        device's backing store, below its filters: never through the file
        system, the FUSE file or the tracker. The file is made immutable
        from the take on (see :meth:`guard_storage`), so that no write,
        truncate or defragmenter moves its blocks from under the snapshot.
        It is part of the device, so of the image too: a file of zeroes
        there (a file made in a directory is removed at release, and so
        gone from the device, not from backups of the image). The ranges
        are zeroed first, through the filters (the CBT marks them); the
        image reads them as those zeroes,
        and every chunk written there later is marked changed, so the next
        backup reads them again."""
        assert carrier.served is not None
        dev = self.device(carrier.served)
        made = None
        try:
            if os.path.isdir(path):
                if size is None:
                    raise InvalidArgument(f"a size (limit) is needed for storage in {path}")
                made = os.path.join(path, f".blksnap-diff-{snap.id}-{len(snap.storage.sources)}")
                fd = os.open(made, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, f"diff storage {path}") from None
        try:
            st = os.fstat(fd)
            length = size if size is not None else st.st_size
            length -= length % max(st.st_blksize, 4096)
            if length <= 0:
                raise InvalidArgument(f"diff storage {path} is empty: give a size (-l)")
            try:
                os.posix_fallocate(fd, 0, length)
            except OSError as exc:
                raise from_oserror(exc, f"preallocate diff storage {path}") from None
            ranges: list[tuple[int, int]] = []
            for logical, physical, elen in blockstack.fiemap(fd, length):
                elen = min(elen, length - logical)
                if carrier.length is not None and physical + elen > carrier.length:
                    raise InvalidArgument(f"diff storage {path}: an extent lies past its device")
                off = carrier.start + physical
                if off + elen > dev.size:
                    raise InvalidArgument(f"diff storage {path}: an extent lies past {dev.name}")
                if ranges and ranges[-1][0] + ranges[-1][1] == off:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + elen)
                else:
                    ranges.append((off, elen))
            for off, n in ranges:
                dev.write_zeroes(off, n)
            dev.flush()
            backing_fd = os.dup(dev.backing.fd)
        except BaseException:
            if made is not None:
                os.unlink(made)
            os.close(fd)
            raise

        snap.storage.add_mapped(
            made or path,
            backing_fd,
            ranges,
            device=dev.name,
            hold_fd=fd,
            via=self._mapped_io(dev.name),
            made=made,
            guard=snap.state == "taken",
        )
        log.info(
            "diff storage %s: %d bytes in %d extent(s) of device %s, below its filters",
            made or path,
            length,
            len(ranges),
            dev.name,
        )

    def _mapped_io(self, name: str) -> _MappedIO:
        """The way of diff storage mapped on device ``name`` to it."""
        return _MappedIO(self, name)

    # -- a process taking over ------------------------------------------------------

    def snapshots_left(self) -> list[str]:
        """Ids of the snapshots a process before this one left in the
        regions (blksnapd's dead worker)."""
        out = []
        for key in self.regions.held_keys():
            kind, _, sid = key.partition("/")
            if kind == "snap" and UUID_RE.match(sid):
                out.append(sid)
        return out

    def snapshot_resume(self, sid: str) -> Snapshot | None:
        """Carry on snapshot ``sid`` as a process before this one left it
        (its devices served again first): :meth:`Snapshot.resume`. A
        snapshot left half destroyed is destroyed (None). One that cannot be
        carried on is released and ``BlksnapError`` says why."""
        keep = SnapshotState.find(self.regions, sid)
        if keep is None:
            if SnapshotState.cut_short(self.regions, sid):
                # (it never was a snapshot: its create failed)
                drop_regions(self.regions, sid)
                log.info("snapshot %s: its create was cut short; nothing to carry on", sid)
                return None
            raise InvalidArgument(f"snapshot {sid}: its state was not kept whole")
        if keep.state == S_DESTROYING:
            Snapshot.finish_destroy(self.params, keep)
            log.info("snapshot %s: its destroy, cut short, is finished", sid)
            return None
        try:
            desc = keep.desc()
            if desc is None:
                raise InvalidArgument(f"snapshot {sid}: its description was not kept")
            with self._lock:
                self._check_open()
                pairs: list[tuple[Device, Tracker]] = []
                for name in desc["devices"]:
                    dev = self._devices.get(name)
                    if dev is None:
                        raise NotFound(f"snapshot {sid}: its device {name} is not served")
                    trk = self._tracker_or_none(dev)
                    if trk is None:
                        trk = dev.attach_filter(Tracker, {})  # type: ignore[assignment]
                    assert isinstance(trk, Tracker)
                    if trk.snapshot_id is not None:
                        raise Busy(f"snapshot {sid}: {name} is in snapshot {trk.snapshot_id}")
                    pairs.append((dev, trk))
                snap = Snapshot.resume(self.params, self.regions, keep, pairs, self._mapped_io)
                for _, trk in pairs:
                    trk.snapshot_id = snap.id
                self._snapshots[snap.id] = snap
        except BlksnapError:
            Snapshot.finish_destroy(self.params, keep)
            raise
        log.info("snapshot %s carried on from the process before: %s", sid, snap.state)
        return snap

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
            carrier = self._check_storage(
                os.fspath(path), [m.device for m in snap.members.values()]
            )
        self._add_storage(snap, os.fspath(path), size, ranges, carrier)

    def snapshot_take(self, sid: str, *, guard_storage: bool = True) -> None:
        """Take the snapshot. ``guard_storage=False`` for a caller that holds
        file systems on the devices frozen around the take: it calls
        :meth:`guard_storage` after the thaw instead."""
        with self._lock:
            snap = self._snapshot(sid)
            snap.take()
        if guard_storage:
            self.guard_storage(sid)

    def guard_storage(self, sid: str) -> None:
        """After a take, what writes file systems: make the files of diff
        storage that lies on served devices immutable (``chattr +i``) until
        the snapshot releases them (a write, truncate or defragmenter on them
        would corrupt the snapshot), and write the CBT checkpoints of its
        devices (the take's numbers durable, their write intent afresh).
        Never while file systems on the devices are frozen: that would wait
        on them, or make them wait."""
        snap = self._snapshot(sid)
        snap.storage.guard()
        self.checkpoint_cbt(list(snap.members))

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

    # -- CBT checkpoints ------------------------------------------------------------

    def _state_carrier(self) -> str | None:
        """The served device whose data carries the state dir's file
        system, if any."""
        try:
            fs = blockstack.resolve_devnum(os.stat(self.state_dir).st_dev, self._alias)
        except (OSError, BlksnapError):
            return None
        for ext in fs:
            if ext.served is not None:
                return ext.served
        with self._lock:
            for name, theirs in self._extents.items():
                if blockstack.overlap(fs, theirs) is not None:
                    return name
        return None

    def _checkpoint_loop(self) -> None:
        """Every ``cbt_checkpoint_interval`` seconds, a checkpoint of each
        device written since its last one: the re-read after a crash stays
        bounded by what was written in one interval."""
        while not self._stop_checkpoints.wait(self.params.cbt_checkpoint_interval):
            self.checkpoint_cbt(only_dirty=True)

    def checkpoint_cbt(
        self, names: Sequence[str] | None = None, *, only_dirty: bool = False
    ) -> int:
        """Write the CBT checkpoint of devices ``names`` (all) that have a
        working write intent (``only_dirty``: and were written since their
        last one); how many were written. Failures are logged."""
        with self._lock:
            devs = [d for n, d in self._devices.items() if names is None or n in names]
        done = 0
        for dev in devs:
            trk = self._tracker_or_none(dev)
            intent = trk.cbt.intent if trk is not None else None
            if trk is None or intent is None or intent.failed is not None:
                continue
            if only_dirty and not intent.dirty():
                continue
            try:
                trk.checkpoint(clean=False)
                done += 1
            except OSError as exc:
                log.error("%s: CBT checkpoint not written: %s", dev.name, exc.strerror or exc)
        return done

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
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        for snap in snaps:
            snap.destroy()
        for dev in self.devices():
            try:
                dev.backing.flush()
            except Exception as exc:  # keep closing the others
                log.error("flush of %s failed: %s", dev.name, exc)
            else:
                self._checkpoint_clean(dev)
            dev.close()
        self._devices.clear()
        self.events.close()

    def _checkpoint_clean(self, dev: Device) -> None:
        """At a clean stop, the device flushed: its CBT's checkpoint, so the
        next blksnapd carries it on (same generation)."""
        trk = self._tracker_or_none(dev)
        if trk is None:
            return
        dev.queue.close(lambda: NoDevice(f"device {dev.name} is closing"))  # (no write after)
        try:
            trk.checkpoint(clean=True)
        except OSError as exc:
            log.error("%s: CBT checkpoint not written (%s): the next start begins a new "
                      "generation", dev.name, exc)  # fmt: skip

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MappedIO:
    """Diff storage I/O on served device ``name``, below its tracker: through
    the filters that stand for the device itself (:attr:`Filter.models_device`:
    a disk that fails, is slow, loses its cache, moves) to its backing store
    as it is now; writes marked changed in its CBT (the next backup reads
    them: they are part of the device)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        dev = self.engine._devices.get(self.name)
        if dev is None:
            return False
        dev.submit_physical(Bio(WRITE, offset, len(data), data, dev))
        trk = self.engine._tracker_or_none(dev)
        if trk is not None:
            trk.cbt.mark(offset, len(data))
        return True

    def read(self, offset: int, length: int) -> bytes | bytearray | None:
        dev = self.engine._devices.get(self.name)
        if dev is None:
            return None
        bio = Bio(READ, offset, length, device=dev)
        dev.submit_physical(bio)
        assert bio.result is not None
        return bio.result
