"""The ``migrate`` filter: move a live device to new storage.

Attached with ``target=PATH`` (a file or block device at least the device's
size), it copies the device to the target in the background, one piece of
:data:`PIECE` bytes at a time, in order, while every write that reaches it
(discard, write-zeroes) is done on both stores if the copy has passed its
first piece (on the device's store only if not: the copy takes it from
there when it comes). A write and the copy of a piece it touches are ordered
by a lock per piece: the copy reads the device and writes the target under
it, a write does its writes under it, so the copy never writes what a later
write changed (the target never holds stale data). Holes of a backing file
are punched in the target, not copied. Flushes go to the device's store
only: nothing on the target needs to be durable before the switch, which
syncs it (a crash before it leaves the device on its old store).

When the copy is done the target is synced and, with the device's gate
drained, becomes the device's backing store; the engine's callback records
the switch (blksnapd's state) before any request reaches the target, then
the filter detaches itself and the old store is closed (nothing writes it
after). From the file system's side nothing changed: the device keeps its
size, the filters above keep their state (the tracker its CBT generation).
``ctl status`` tells the progress (and, after the switch, the device keeps
the last status: ``ctl -d N --filter migrate status`` still answers),
``ctl abort`` stops the copy; the device stays on its old store and the
filter passes requests until detached.

The progress lives in a region: a worker of blksnapd that takes over after
a crash re-attaches the filter (same options) and carries on from the
last piece copied; writes in flight at the crash are sent again by the
kernel and go to both. At altitude 300 it is the last filter a request
meets: what it mirrors is what reached the store, tracked once above it.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from blksnap.engine.device import BackingStore
from blksnap.engine.filters import READ, WRITE, WRITE_OPS, Bio, Filter, FilterResult, Op
from blksnap.errors import BlksnapError, Busy, InvalidArgument, NoSpace
from blksnap.units import parse_size

if TYPE_CHECKING:
    from blksnap.engine.device import Device

log = logging.getLogger(__name__)

ALTITUDE_MIGRATE = 300
#: The unit of the copy, and of the locks that order it against writes.
PIECE = 1 << 20
#: Read ahead of the copy (the device's file has readahead off).
PREFETCH = 8 * PIECE
#: Locks, each covering every STRIPES-th piece.
STRIPES = 64
_MAGIC = b"MIGR0001"
# magic, target st_dev/rdev, target ino, capacity, copied
_PROGRESS = struct.Struct("<8sQQQQ")


class Migrate(Filter):
    name = "migrate"
    altitude = ALTITUDE_MIGRATE
    reads_backing = True
    models_device = True
    path_options = ("target",)
    summary = "moves the device to new storage while it is in use, then switches to it"
    options = {
        "target": "file or block device to move to (at least the device's size)",
        "rate": "copy at most SIZE per second (e.g. 100M; default: as fast as it goes)",
    }
    commands = {
        "status": 'state ("copying", "switched", "aborted"), copied, total, rate',
        "abort": "stop; the device stays where it is",
    }

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        opts = dict(opts)
        target = opts.pop("target", "")
        if not target:
            raise InvalidArgument("migrate needs target=PATH (a file or block device)")
        rate = opts.pop("rate", "0")
        self.rate = parse_size(rate[:-2] if rate.endswith("/s") else rate)
        super().__init__(device, opts)
        self.store = BackingStore(target)
        try:
            if self.store.identity == device.backing.identity:
                raise InvalidArgument(f"{target} is the device's own storage")
            if self.store.size < device.size:
                raise NoSpace(
                    f"{target} holds {self.store.size} bytes, the device {device.size}: "
                    "the target must be at least the device's size"
                )
        except BaseException:
            self.store.close()
            raise
        self.target = self.store.path
        self.total = device.size
        self.region, existed = device.regions.open(self.state_key, _PROGRESS.size)
        self.copied = 0
        if existed:
            magic, a, b, total, copied = _PROGRESS.unpack_from(self.region)
            if magic == _MAGIC and (a, b) == self.store.identity and total == self.total:
                self.copied = min(copied, total) // PIECE * PIECE
                log.info("%s: migration to %s carries on from %d bytes", device.name,
                         self.target, self.copied)  # fmt: skip
        self._save_progress()
        self.state = "copying"
        self.error: str | None = None
        #: Writes go to both stores while True.
        self.mirroring = True
        self._locks = [threading.Lock() for _ in range(STRIPES)]
        self._stop = threading.Event()
        self._switch_lock = threading.Lock()
        self.started = time.monotonic()
        self._from = self.copied
        self.finished: float | None = None
        # (The device is drained while a filter is attached: no write can
        # come before this filter is in its stack, so starting here is safe.)
        self._thread = threading.Thread(
            target=self._run, name=f"migrate-{device.name}", daemon=True
        )
        self._thread.start()

    def _save_progress(self) -> None:
        a, b = self.store.identity
        _PROGRESS.pack_into(self.region, 0, _MAGIC, a, b, self.total, self.copied)

    # -- requests -------------------------------------------------------------

    def _locked(self, offset: int, length: int) -> list[threading.Lock]:
        first, last = offset // PIECE, (offset + max(length, 1) - 1) // PIECE
        if last - first + 1 >= STRIPES:
            return self._locks
        return [self._locks[i] for i in sorted({p % STRIPES for p in range(first, last + 1)})]

    def submit(self, bio: Bio) -> FilterResult:
        # A flush passes: nothing on the target needs to be durable before
        # the switch, which syncs it (a crash before leaves the device on its
        # old store, which has every write).
        if not self.mirroring or bio.op not in WRITE_OPS or not bio.length:
            return FilterResult.PASS
        offset = bio.offset
        first, last = offset // PIECE, (offset + bio.length - 1) // PIECE
        if first == last:  # (the common case: one lock)
            with self._locks[first % STRIPES]:
                self.device.submit_below(self, bio)  # the device's own store first
                if first * PIECE < self.copied:
                    self._on_target(bio)
            return FilterResult.SKIP
        locks = self._locked(offset, bio.length)
        for lock in locks:
            lock.acquire()
        try:
            self.device.submit_below(self, bio)
            # (Pieces the copy has not reached get this write from the
            # device's store when it does: holding their locks, the copy
            # cannot be inside any of them now.)
            if first * PIECE < self.copied:
                self._on_target(bio)
        finally:
            for lock in locks:
                lock.release()
        return FilterResult.SKIP

    def _on_target(self, bio: Bio) -> None:
        """The same request on the target; a failure there ends the
        migration, not the request (the device's own store has it)."""
        if not self.mirroring:
            return
        store, op = self.store, bio.op
        try:
            if op is WRITE:
                assert bio.data is not None
                store.pwrite(bio.offset, bio.data)
            elif op is Op.DISCARD:
                store.discard(bio.offset, bio.length)
            elif op is Op.WRITE_ZEROES:
                store.zero(bio.offset, bio.length, unmap=bool(bio.private.get("unmap")))
        except BlksnapError as exc:
            self._abort(f"target failed: {exc}")

    def write_may_wait(self, offset: int, length: int) -> bool:
        return self.mirroring

    # -- the copy -------------------------------------------------------------

    def _run(self) -> None:
        dev = self.device
        try:
            while self.copied < self.total:
                if self._stop.is_set():
                    return
                pos = self.copied
                n = min(PIECE, self.total - pos)
                with self._locks[(pos // PIECE) % STRIPES]:
                    if not self.mirroring:
                        return
                    src = dev.backing
                    # (the device's file is read without readahead: ask for
                    # the next pieces now, so the disk works while we write)
                    src.prefetch(pos + n, PREFETCH)
                    runs = src.extents(pos, n)
                    for off, length, hole in runs:
                        if hole:
                            self.store.discard(off, length)
                        else:
                            bio = Bio(READ, off, length, device=dev)
                            dev.submit_physical(bio)  # (a failing disk fails it)
                            assert bio.result is not None
                            self.store.pwrite(off, bio.result)
                    self.copied = pos + n
                    self._save_progress()
                self._pace()
            if self._stop.is_set():
                return
            self.store.flush()  # (most of it, before the gate is drained)
            with self._switch_lock:  # (a detach waits for it, or it for the detach)
                if self._stop.is_set():
                    return
                try:
                    dev.switch_backing(self, self.store, before=self._last_sync)
                except BaseException:
                    dev.retired.pop(self.name, None)
                    raise
                self.mirroring = False
                self.state = "switched"
        except BlksnapError as exc:
            self._abort(f"copy failed: {exc}")
            return
        except Exception as exc:  # (a thread of its own: nothing else would see it)
            log.exception("%s: migration failed", dev.name)
            self._abort(f"copy failed: {exc}")
            return
        self.finished = time.monotonic()
        dev.retired[self.name] = self.status()
        dev.regions.drop(self.state_key)
        log.info("%s: migrated to %s (%d bytes in %.1f s)", dev.name, self.target,
                 self.total - self._from, self.finished - self.started)  # fmt: skip

    def _last_sync(self) -> None:
        """In the switch, the device drained: the target synced, and the
        status that ``ctl status`` answers once the filter is off the stack
        put in place before it goes (withdrawn if the switch fails)."""
        self.store.flush()
        self.device.retired[self.name] = {**self.status(), "state": "switched"}

    def _pace(self) -> None:
        """Sleep so that the copy keeps to ``rate`` bytes per second."""
        if not self.rate:
            return
        due = self.started + (self.copied - self._from) / self.rate
        wait = due - time.monotonic()
        if wait > 0:
            self._stop.wait(wait)

    def _abort(self, why: str) -> None:
        if self.state == "copying":
            log.error("%s: migration to %s aborted: %s", self.device.name, self.target, why)
            self.error = why
            self.state = "aborted"
        self.mirroring = False
        self._stop.set()

    # -- control --------------------------------------------------------------

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        if cmd == "abort":
            self._abort("aborted by request")
            self._thread.join(timeout=30)
        elif cmd != "status":
            return super().ctl(cmd, arg)
        return self.status()

    def status(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        elapsed = max(end - self.started, 1e-9)
        return {
            "state": self.state,
            "target": self.target,
            "copied": self.copied,
            "total": self.total,
            "rate": int((self.copied - self._from) / elapsed),
            "rate_limit": self.rate,
            "seconds": round(elapsed, 3),
            "error": self.error,
        }

    def detach(self) -> None:
        # A switch under way is not waited for here (it may need the
        # engine's lock, held by whoever detaches): try again once it is done.
        if not self._switch_lock.acquire(blocking=False):
            raise Busy(f"{self.device.name}: the migration is switching to its target")
        try:
            self._abort("detached")
        finally:
            self._switch_lock.release()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self.state != "switched":
            self.store.close()
            super().detach()
        self.device.retired[self.name] = self.status()
