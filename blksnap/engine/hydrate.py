"""The ``hydrate`` filter: a device that is usable before its data is there.

Attached to a device whose backing store is the *target* of an instant
restore, with ``source=KEY`` (a :class:`~blksnap.engine.source.Source`: a
backup in a repository) and ``map=PATH`` (where which units are done is
kept), it makes the device read as the source until every unit has been
copied, dm-clone's way:

* a read of a unit not yet done fetches it from the source, writes it to
  the target, marks it done, then reads the target;
* a write (discard, write-zeroes) that covers a unit not done whole goes
  to the target and marks it done; one that covers part of it fills the
  unit first, then writes;
* a background copy fills the units nobody asked for, in order, a few
  fetched ahead in parallel (fetching, checking, decrypting and
  decompressing release the GIL), at most ``rate`` bytes per second;
  ``ctl pause`` / ``resume`` / ``rate`` steer it, ``ctl status`` tells.

A unit's fill and a write into it are ordered by a lock per unit (striped),
so the copy never writes a unit over what a write put there: before writing
it looks again, under the lock, whether the unit is still not done.

**What is done is durable** in two places. The live map (one byte per unit)
is a region (:mod:`blksnap.engine.regions`): under blksnapd it is memory
its supervisor holds, so a worker that takes over after a crash finds every
unit marked, including those that acknowledged writes made done (the copy
will never overwrite them). The committed map is the file ``map``: a unit
is written there done only after the target was flushed with it, so after
a power cut the file never names a unit whose data did not reach the
target. It is committed at every flush the device gets (an acknowledged
flush covers the writes before it, and so their units), every
``COMMIT_BYTES`` of copy and at the end. A unit done but not committed at
a power cut is filled again from the source: what it held came from
writes nobody flushed.

When every unit is done, the target is flushed, the map marked complete,
and the filter takes itself off the stack (the device drained): from then
on the device is an ordinary one, its target all it reads. The engine's
``on_filter_retired`` callback lets blksnapd record it.

At altitude 250, below the tracker: a write is marked in the CBT before it
comes here, and the copy's own writes are not (they put back what the
source holds: nothing changed for a backup). It models the device
(``models_device``): a snapshot's copy-on-write reads the device through
it, so an image reads the source where the target has nothing yet.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from blksnap.engine import source as sources
from blksnap.engine.device import UNMAP
from blksnap.engine.filters import READ, WRITE, Bio, Filter, FilterResult, Op
from blksnap.errors import BlksnapError, Busy, InvalidArgument, IOFailure, error, from_oserror
from blksnap.fileio import fsync_dir, pwrite_full
from blksnap.units import parse_size

if TYPE_CHECKING:
    from blksnap.engine.device import Device

log = logging.getLogger(__name__)

ALTITUDE_HYDRATE = 250
#: Locks, each covering every STRIPES-th unit.
STRIPES = 64
#: Units fetched ahead by the copy.
FETCH_AHEAD = 8
#: Fetching threads of the copy.
FETCHERS = 3
#: The copy's current rate is measured over its last units (at most this
#: many, at most RATE_WINDOW seconds old).
RATE_SAMPLES = 64
RATE_WINDOW = 5.0
#: The copy commits the map (target flushed first) after this many bytes.
COMMIT_BYTES = 256 << 20
#: ... or after this many seconds with something to commit.
COMMIT_SECONDS = 5.0

_MAGIC = b"BSHYDR01"
_VERSION = 1
# magic, version, complete, device size, unit, units, target identity (2),
# digest of the source's identity
_HEADER = struct.Struct("<8sIIQQQQQ32s")
#: The map's bytes (one per unit) start here.
MAP_OFFSET = 4096
#: The live region: the same identity digest, the steering (rate limit,
#: paused: what ``ctl`` set, carried on by a worker taking over), then one
#: byte per unit from _LIVE_HEAD.
_STEER = struct.Struct("<QB")
_LIVE_HEAD = 64
_PAGE = 4096


def _digest(identity: str) -> bytes:
    return hashlib.blake2b(identity.encode(), digest_size=32).digest()


def _header(size: int, src: sources.Source, target: tuple[int, int]) -> bytes:
    """The map header of a hydration of ``src`` onto a target of ``size``
    bytes whose storage identity is ``target`` (not complete)."""
    a, b = target
    return _HEADER.pack(_MAGIC, _VERSION, 0, size, src.unit, src.count, a, b, _digest(src.identity))


def _same_hydration(head: bytes, want: bytes) -> bool:
    """Is the map header ``head`` that of the hydration whose header is
    ``want`` (the complete flag aside)?"""
    return len(head) == _HEADER.size and head[:12] + head[16:] == want[:12] + want[16:]


def map_state(path: str, src: sources.Source, target: tuple[int, int], size: int) -> str:
    """What the map file at ``path`` is to a hydration of ``src`` onto the
    target ``target`` (storage identity) of ``size`` bytes: ``"none"`` (no
    file), ``"same"`` (it carries this hydration on), ``"other"`` (another
    source, target or size, or not a map)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except FileNotFoundError:
        return "none"
    except OSError as exc:
        raise from_oserror(exc, path) from None
    same = _same_hydration(head, _header(size, src, target))
    return "same" if same else "other"


class Hydrate(Filter):
    name = "hydrate"
    altitude = ALTITUDE_HYDRATE
    reads_backing = False
    models_device = True
    summary = "serves a device from a backup at once and copies it to the device meanwhile"
    options = {
        "source": "the source's key (blksnapd registers it: blksnap restore --instant)",
        "map": "file keeping which units are done (made if missing)",
        "rate": "copy at most SIZE of data per second (e.g. 100M; zero regions are not"
        " counted; default: as fast as it goes)",
        "paused": "1: attach with the copy paused",
    }
    commands = {
        "status": 'state ("running", "paused", "failed", "done"), done, total, rate',
        "pause": "stop the background copy (reads and writes still fill what they touch)",
        "resume": "start the copy again (after a pause or a failure)",
        "rate": "set the rate limit (SIZE per second, 0: none)",
    }

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        opts = dict(opts)
        key = opts.pop("source", "")
        map_path = opts.pop("map", "")
        rate = opts.pop("rate", "0") or "0"
        paused = opts.pop("paused", "0") not in ("0", "", "false", "no")
        super().__init__(device, opts)
        if not key or not map_path:
            raise InvalidArgument("hydrate needs source=KEY and map=PATH")
        self.source = sources.get(key)
        self.rate = parse_size(rate[:-2] if rate.endswith("/s") else rate)
        src = self.source
        if src.size > device.size:
            raise error(
                errno.ENOSPC,
                f"{device.name}: {device.path} holds {device.size} bytes, the source "
                f"{src.size}: the target must be at least the source's size",
            )
        self.unit = src.unit
        self.count = src.count
        self.total = src.size
        self.map_path = os.path.abspath(map_path)
        a, b = device.backing.identity
        # (the live region names the target too: a region a removed
        # device's hydration left must not be taken for this one's)
        live_ident = _digest(f"{src.identity}\0{a}\0{b}\0{device.size}")
        self._header = _header(device.size, src, (a, b))
        committed = self._open_map()
        # The live map: kept by the supervisor when there is one (a worker
        # taking over finds the units acknowledged writes made done).
        self.region, existed = device.regions.open(self.state_key, _LIVE_HEAD + self.count)
        live = np.frombuffer(self.region, dtype=np.uint8, count=self.count, offset=_LIVE_HEAD)
        if not existed or bytes(self.region[:32]) != live_ident:
            live[:] = committed
            self.region[:32] = live_ident
            _STEER.pack_into(self.region, 32, self.rate, paused)
        else:
            live |= committed  # (never less than what is durable)
            self.rate, was_paused = _STEER.unpack_from(self.region, 32)
            paused = bool(was_paused)
        self.done = live
        self.committed = committed.copy()
        self.locks = [threading.Lock() for _ in range(STRIPES)]
        self._commit_lock = threading.Lock()
        self._resume = threading.Event()
        if not paused:
            self._resume.set()
        self._stop = threading.Event()
        self.paused = paused
        self.error: str | None = None
        self.complete = False
        self.retired = False
        self.started = time.monotonic()
        self.finished: float | None = None
        self.copied = 0  # by the copy, this attach
        self.filled = 0  # by reads and writes, this attach
        self._since_commit = 0
        self._last_commit = time.monotonic()
        #: Bytes of data (not zero units: those cost no I/O) the copy wrote:
        #: what the rate limit paces.
        self.paced = 0
        #: (time, bytes copied) of the copy's last units: its current rate.
        self._recent: deque[tuple[float, int]] = deque(maxlen=RATE_SAMPLES)
        self._pace_from, self._pace_base = time.monotonic(), 0
        self._thread = threading.Thread(
            target=self._run, name=f"hydrate-{device.name}", daemon=True
        )
        self._thread.start()
        log.info("%s: hydrating from %s: %d of %d bytes done", device.name,
                 src.description, self.done_bytes(), self.total)  # fmt: skip

    # -- the map file -----------------------------------------------------------

    def _open_map(self) -> np.ndarray:
        """The committed map (made, all not done, if there is none). A map
        of another source, target or size is refused: it would name units
        done that are not."""
        try:
            fd = os.open(self.map_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError as exc:
            raise from_oserror(exc, self.map_path) from None
        if fd < 0:
            return self._make_map()
        try:
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) != _HEADER.size or head[:8] != _MAGIC:
                raise InvalidArgument(f"{self.map_path} is not a hydration map")
            if not _same_hydration(head, self._header):
                raise error(
                    errno.EEXIST,
                    f"{self.map_path} is the map of another hydration (source, target or "
                    "size differ); remove it to start this one from nothing",
                )
            raw = os.pread(fd, self.count, MAP_OFFSET)
            if len(raw) != self.count:
                raise IOFailure(f"{self.map_path}: map cut short")
        except OSError as exc:
            os.close(fd)
            raise from_oserror(exc, self.map_path) from None
        except BaseException:
            os.close(fd)
            raise
        self.map_fd = fd
        return np.frombuffer(raw, dtype=np.uint8).copy()

    def _make_map(self) -> np.ndarray:
        os.makedirs(os.path.dirname(self.map_path), exist_ok=True)
        tmp = f"{self.map_path}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                pwrite_full(fd, 0, self._header)
                os.ftruncate(fd, MAP_OFFSET + self.count)
                os.fsync(fd)
                os.rename(tmp, self.map_path)
                fsync_dir(os.path.dirname(self.map_path))
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise from_oserror(exc, self.map_path) from None
        self.map_fd = fd
        return np.zeros(self.count, dtype=np.uint8)

    def commit(self, before: np.ndarray | None = None) -> None:
        """Make what is done durable: the units done now (or ``before``: as
        they were before a flush the caller made), the target flushed
        (unless the caller did), then the map's changed pages written and
        synced. A unit marked done after the flush began is left for the
        next commit. The file only ever gains units (commits may cross)."""
        with self._commit_lock:
            if before is None:
                now = self.done.copy()
                self.device.submit_below(self, Bio(Op.FLUSH, 0, 0, device=self.device))
            else:
                now = before
            now = np.maximum(now, self.committed)
            changed = np.flatnonzero(now != self.committed)
            if not len(changed) and not (self.complete and not self._marked_complete):
                return
            try:
                for page in np.unique(changed // _PAGE).tolist():
                    a = page * _PAGE
                    pwrite_full(self.map_fd, MAP_OFFSET + a, now[a : a + _PAGE].tobytes())
                if self.complete and not self._marked_complete:
                    pwrite_full(self.map_fd, 12, struct.pack("<I", 1))
                    self._marked_complete = True
                os.fdatasync(self.map_fd)
            except OSError as exc:
                raise from_oserror(exc, f"commit {self.map_path}") from None
            self.committed = now
            self._since_commit = 0
            self._last_commit = time.monotonic()

    _marked_complete = False

    # -- requests -----------------------------------------------------------------

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """Units ``first..last`` of the range (last < first: none, past the source)."""
        if offset >= self.total:
            return 0, -1
        end = min(offset + length, self.total)
        return offset // self.unit, (end - 1) // self.unit

    def _locked(self, first: int, last: int) -> list[threading.Lock]:
        if last - first + 1 >= STRIPES:
            return self.locks
        return [self.locks[i] for i in sorted({u % STRIPES for u in range(first, last + 1)})]

    def submit(self, bio: Bio) -> FilterResult:
        op = bio.op
        if op is Op.FLUSH:
            if self.retired:
                return FilterResult.PASS
            # The flush first, then the units done before it are committed:
            # an acknowledged flush leaves no done unit uncommitted.
            before = self.done.copy()
            self.device.submit_below(self, bio)
            self.commit(before)
            return FilterResult.SKIP
        if not bio.length or self.complete:
            return FilterResult.PASS
        first, last = self._span(bio.offset, bio.length)
        if last < first or self.done[first : last + 1].all():
            return FilterResult.PASS
        locks = self._locked(first, last)
        for lock in locks:
            lock.acquire()
        try:
            if op is READ:
                for i in range(first, last + 1):
                    if not self.done[i]:
                        self._fill(i, None)
                        self.filled += self.source.unit_length(i)
                return FilterResult.PASS
            # A write: units it covers only in part are filled first.
            end = bio.offset + bio.length
            for i in (first, last):
                if not self.done[i]:
                    a = i * self.unit
                    b = a + self.source.unit_length(i)
                    if bio.offset > a or end < b:
                        self._fill(i, None)
                        self.filled += b - a
            self.device.submit_below(self, bio)
            self.done[first : last + 1] = 1
            return FilterResult.SKIP
        finally:
            for lock in locks:
                lock.release()

    def _fill(self, i: int, data: bytes | None) -> None:
        """Unit ``i`` from the source to the target (its lock held)."""
        dev = self.device
        a = i * self.unit
        n = self.source.unit_length(i)
        if data is None and self.source.is_zero(i):
            # (a hole in a file target, as a plain restore leaves it)
            bio = Bio(Op.WRITE_ZEROES, a, n, device=dev)
            bio.private[UNMAP] = True
            dev.submit_below(self, bio)
        else:
            if data is None:
                data = self.source.read_unit(i)
            dev.submit_below(self, Bio(WRITE, a, n, data, dev))
        self.done[i] = 1

    def write_may_wait(self, offset: int, length: int) -> bool:
        if self.complete:
            return False
        first, last = self._span(offset, length)
        return last >= first and not bool(self.done[first : last + 1].all())

    # -- the copy -----------------------------------------------------------------

    def _fetch(self, i: int) -> bytes | None:
        return None if self.source.is_zero(i) else self.source.read_unit(i)

    def _run(self) -> None:
        dev = self.device
        pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix=f"hydrate-{dev.name}")
        pending: deque[tuple[int, Future[bytes | None]]] = deque()
        try:
            nxt = 0
            while not self._stop.is_set():
                if not self._resume.is_set():
                    for _, fut in pending:
                        fut.cancel()
                    pending.clear()
                    self._maybe_commit(force=True)
                    self._resume.wait(0.5)
                    continue
                while len(pending) < FETCH_AHEAD and nxt < self.count:
                    todo = np.flatnonzero(self.done[nxt : nxt + 4096] == 0)
                    if not len(todo):
                        nxt = min(nxt + 4096, self.count)
                        continue
                    i = nxt + int(todo[0])
                    nxt = i + 1
                    pending.append((i, pool.submit(self._fetch, i)))
                if not pending:
                    if not self.done.all():  # (a unit skipped while a pause cut the window)
                        nxt = 0
                        continue
                    break
                i, fut = pending.popleft()
                data = fut.result()
                # The gate first, then the unit's lock, as a request takes
                # them (the other order waits on a drain that waits on a
                # request that waits on the lock).
                dev.queue.enter()
                try:
                    with self.locks[i % STRIPES]:
                        if self.done[i]:
                            continue  # a write or a read got there first
                        self._fill(i, data)
                finally:
                    dev.queue.leave()
                n = self.source.unit_length(i)
                self.copied += n
                if data is not None:
                    self.paced += n
                self._since_commit += n
                self._recent.append((time.monotonic(), self.copied))
                self._maybe_commit()
                self._pace()
            else:  # (stopped: a detach at close; no break)
                return
            self._finish()
        except BlksnapError as exc:
            self._failed(exc)
        except Exception as exc:  # (a thread of its own: nothing else would see it)
            log.exception("%s: hydration failed", dev.name)
            self._failed(exc)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _maybe_commit(self, force: bool = False) -> None:
        if self._since_commit >= COMMIT_BYTES or (
            (force or time.monotonic() - self._last_commit >= COMMIT_SECONDS) and self._since_commit
        ):
            self.device.queue.enter()
            try:
                self.commit()
            finally:
                self.device.queue.leave()

    def _pace(self) -> None:
        if not self.rate:
            return
        due = self._pace_from + (self.paced - self._pace_base) / self.rate
        wait = due - time.monotonic()
        if wait > 0:
            self._stop.wait(wait)

    def _failed(self, exc: BaseException) -> None:
        msg = exc.message if isinstance(exc, BlksnapError) else str(exc)
        if self.device.closing:  # (the device goes: the copy stops with it)
            log.debug("%s: hydration stopped with the device: %s", self.device.name, msg)
            return
        log.error("%s: hydration stopped: %s (blksnap ctl -d %s --filter hydrate resume "
                  "tries again)", self.device.name, msg, self.device.name)  # fmt: skip
        self.error = msg
        self._resume.clear()

    def _finish(self) -> None:
        """Every unit done: durable, then off the stack."""
        dev = self.device
        self.complete = True
        dev.queue.enter()
        try:
            self.commit()
        finally:
            dev.queue.leave()
        self.finished = time.monotonic()
        log.info("%s: hydration done (%d bytes copied in %.1f s, %d filled by requests)",
                 dev.name, self.copied, self.finished - self.started, self.filled)  # fmt: skip
        # (the status answered once off the stack is there before it goes)
        dev.retired[self.name] = {**self.status(), "state": "done"}
        try:
            dev.retire_filter(self, self._retired)
        except BaseException:
            dev.retired.pop(self.name, None)
            raise

    def _retired(self) -> None:
        """Off the stack (the device drained, the record says so)."""
        self.retired = True
        self.device.retired[self.name] = self.status()
        self.device.regions.drop(self.state_key)
        self._close_map(remove=True)

    def _close_map(self, remove: bool) -> None:
        fd, self.map_fd = getattr(self, "map_fd", -1), -1
        if fd >= 0:
            os.close(fd)
        if remove:
            try:
                os.unlink(self.map_path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("%s: cannot remove %s: %s", self.device.name, self.map_path, exc)

    # -- control --------------------------------------------------------------------

    def done_bytes(self) -> int:
        n = int(np.count_nonzero(self.done)) * self.unit
        if self.count and self.done[-1]:
            n -= self.unit - self.source.unit_length(self.count - 1)
        return n

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        if cmd == "pause":
            self.paused = True
            self._resume.clear()
            self._steer()
        elif cmd == "resume":
            if self.error is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=30)  # (on its way out after the failure)
            self.paused = False
            self.error = None
            self._pace_from, self._pace_base = time.monotonic(), self.paced
            if not self._thread.is_alive() and not self.complete:
                self._thread = threading.Thread(
                    target=self._run, name=f"hydrate-{self.device.name}", daemon=True
                )
                self._thread.start()
            self._resume.set()
            self._steer()
        elif cmd == "rate":
            text = str(arg or "0")
            self.rate = parse_size(text[:-2] if text.endswith("/s") else text)
            self._pace_from, self._pace_base = time.monotonic(), self.paced
            self._steer()
        elif cmd != "status":
            return super().ctl(cmd, arg)
        return self.status()

    def _rate(self) -> int:
        """Bytes per second the copy moved over the last RATE_WINDOW seconds
        (0 while paused, failed or done)."""
        now = time.monotonic()
        recent = [(t, c) for t, c in list(self._recent) if now - t <= RATE_WINDOW]
        if self.complete or len(recent) < 2:
            return 0
        (t0, c0), (t1, c1) = recent[0], recent[-1]
        return int((c1 - c0) / (t1 - t0)) if t1 > t0 else 0

    def _steer(self) -> None:
        if not self.retired:
            _STEER.pack_into(self.region, 32, self.rate, self.paused)

    def status(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        elapsed = max(end - self.started, 1e-9)
        # "done" once off the stack (the retired status): until then the
        # last commit and the retirement are still to come.
        if self.retired:
            state = "done"
        elif self.complete:
            state = "running"
        elif self.error:
            state = "failed"
        elif self.paused:
            state = "paused"
        else:
            state = "running"
        return {
            "state": state,
            "done": self.done_bytes(),
            "total": self.total,
            "copied": self.copied,
            "filled": self.filled,
            "rate": self._rate(),
            "average_rate": int(self.copied / elapsed),
            "rate_limit": self.rate,
            "source": self.source.description,
            "error": self.error,
        }

    def detach(self) -> None:
        """Taken off by hand before the copy is done: refused (the target
        would be served with units it does not hold). At a device's close
        (blksnapd stopping) the copy stops and what is done is committed:
        the next attach carries on."""
        if not self.complete and not self.device.closing:
            raise Busy(
                f"{self.device.name}: hydration not done ({self.done_bytes()} of "
                f"{self.total} bytes): detaching would serve data not yet restored"
            )
        self._stop.set()
        self._resume.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if not self.retired:
            try:
                self.commit()
            except BlksnapError as exc:
                log.error("%s: hydration map not committed: %s", self.device.name, exc)
            self._close_map(remove=False)
            # (the region is kept: a worker taking over carries on from it)
