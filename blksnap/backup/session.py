"""One backup session: snapshot the devices, take, copy what changed, destroy.

The steps, as the kernel module's backup tools do them:

1. ``snapshot_create`` of every device (the tracker is attached where it is
   not), diff storage in the repository directory (or ``storage``), grown on
   ``low_free_space`` events by a watcher thread up to ``storage_max``.
2. ``snapshot_take``: all devices at one instant (blksnapd freezes the file
   systems mounted on them first).
3. Per device, the CBT after the take decides what to read: everything for a
   full backup; for an incremental one the blocks whose number is greater
   than the parent backup's ``changes_number`` (the parent is the newest good
   backup of that device; for a differential one, the newest good full).
   No parent, another ``generation_id``, another size or block size, or a
   chain that does not resolve: that device is backed up in full, and the
   reason is reported.
4. The image is read in runs of adjacent blocks by a few threads and every
   block goes to the repository writer (checksummed, maybe compressed).
5. A ``corrupted`` event, an image read error, or a snapshot found corrupted
   before the commit fails the backup: it is recorded as failed (never a
   parent) and the error says why. The snapshot is destroyed in every case.

``service`` is a :class:`blksnap.Engine` (in process) or a
:class:`blksnap.Client` (blksnapd): both have the same method names. With the
engine the image is read through ``Engine.image``; with blksnapd through its
FUSE file ``<mount>/images/ID/N``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blksnap.backup.format import BackupInfo, DeviceRecord
from blksnap.backup.repository import Repository
from blksnap.backup.storage import TrafficCount
from blksnap.errors import BlksnapError, InvalidArgument, error
from blksnap.settings import SETTINGS
from blksnap.units import GiB, MiB

log = logging.getLogger("blksnap.backup")

MODES = ("auto", "full", "incremental", "differential")

ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def _no_progress(_desc: str, _total: int) -> Iterator[Callable[[int], None]]:
    yield lambda _n: None


@dataclass
class DevicePlan:
    """What one device's part of the backup reads, and why."""

    name: str
    kind: str
    parent: str | None
    reason: str
    size: int
    block_size: int
    generation_id: str
    changes_number: int
    #: CBT blocks changed since the parent (every block for a full).
    blocks: np.ndarray = field(repr=False)
    #: The repository's chunk size, and the chunks read: every chunk that
    #: holds a changed block (the rest keep their parent's digest).
    chunk_size: int = 0
    chunks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    #: Chunks of ``chunks`` read only because a crash left write-intent
    #: regions set (every changed block in them has one of the CBT's
    #: ``recovered`` numbers): each is compared with the parent's index and
    #: counted unchanged if its digest is the same.
    recheck: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    #: ``recheck`` chunk -> its digest in the parent's index (filled before the copy).
    parent_digests: dict[int, bytes] = field(default_factory=dict, repr=False)
    #: The parent's index, read and checked once while planning: the writer
    #: starts this device's index from it.
    parent_index: np.ndarray | None = field(default=None, repr=False)
    #: Of ``recheck``: bytes read, and chunks found unchanged (not stored).
    recheck_bytes: int = 0
    recheck_unchanged: int = 0

    @property
    def bytes_planned(self) -> int:
        if not len(self.chunks):
            return 0
        cs = self.chunk_size
        n = len(self.chunks) * cs
        last = (self.size + cs - 1) // cs - 1
        if self.chunks[-1] == last:
            n -= last * cs + cs - self.size
        return int(n)


def chunks_of(blocks: np.ndarray, block_size: int, chunk_size: int, size: int) -> np.ndarray:
    """The chunks that hold any byte of ``blocks`` (sorted, unique)."""
    if not len(blocks):
        return np.zeros(0, np.int64)
    first = blocks * block_size // chunk_size
    last = (np.minimum((blocks + 1) * block_size, size) - 1) // chunk_size
    if (first == last).all():
        return np.unique(first)
    return np.unique(
        np.concatenate(
            [np.arange(a, b + 1) for a, b in zip(first.tolist(), last.tolist(), strict=True)]
        )
    ).astype(np.int64)


@dataclass
class BackupResult:
    backup: BackupInfo
    plans: list[DevicePlan]
    seconds: float
    #: Diff storage added on ``low_free_space`` while the snapshot lived.
    storage_added: int = 0
    #: The snapshot's events, in order.
    events: list[str] = field(default_factory=list)
    #: Requests and bytes exchanged with the repository's storage.
    traffic: TrafficCount | None = None

    def as_dict(self) -> dict[str, Any]:
        doc = self.backup.as_dict()
        reasons = {p.name: p for p in self.plans}
        for d in doc["devices"]:
            p = reasons.get(d["name"])
            if p is not None:
                d["reason"] = p.reason
                d["blocks_changed"] = len(p.blocks)
                d["chunks_planned"] = len(p.chunks)
                d["reread_after_crash"] = {
                    "chunks": len(p.recheck),
                    "bytes": p.recheck_bytes,
                    "unchanged": p.recheck_unchanged,
                    "stored": len(p.recheck) - p.recheck_unchanged,
                }
        doc["seconds"] = round(self.seconds, 3)
        doc["storage_added"] = self.storage_added
        doc["events"] = list(self.events)
        if self.traffic is not None:
            doc["traffic"] = self.traffic.as_dict()
        return doc


class BackupFailed(BlksnapError):
    """The backup was recorded as failed (its ``backup`` says so)."""

    def __init__(self, message: str, errno_: int, backup: BackupInfo | None) -> None:
        super().__init__(message, errno_)
        self.backup = backup


# -- planning ---------------------------------------------------------------------


def plan_device(repo: Repository, name: str, mode: str, info: Any, cbt_map: bytes) -> DevicePlan:
    """Decide the kind, the blocks and the chunks of ``name`` from its CBT after take."""
    size, bs = int(info.device_capacity), int(info.block_size)
    gen, number = str(info.generation_id), int(info.changes_number)
    cs = repo.chunk_size
    count = (size + bs - 1) // bs

    def full(reason: str) -> DevicePlan:
        everything = np.arange(count, dtype=np.int64)
        chunks = np.arange((size + cs - 1) // cs, dtype=np.int64)
        return DevicePlan(name, "full", None, reason, size, bs, gen, number, everything, cs, chunks)

    if mode == "full":
        return full("full backup asked for")
    kind = "differential" if mode == "differential" else "incremental"
    kinds = ("full",) if kind == "differential" else ("full", "incremental", "differential")
    parent = repo.latest(name, kinds=kinds)
    base: int | None = None  # (the linked changes number, when the parent is linked)
    if parent is None or parent.device(name).generation_id != gen:
        linked = _linked_parent(repo, name, gen, kinds)
        if linked is not None:
            parent, base = linked
    if parent is None:
        what = "full backup" if kind == "differential" else "backup"
        return full(f"no earlier good {what} of {name}")
    rec = parent.device(name)
    if base is None and rec.generation_id != gen:
        return full(
            f"CBT generation changed since {parent.id} ({rec.generation_id[:8]} -> {gen[:8]}): "
            "the change map cannot be trusted"
        )
    since = rec.changes_number if base is None else base
    if rec.size != size or rec.block_size != bs:
        return full(f"size or block size changed since {parent.id}")
    if rec.chunk_size != cs:
        return full(f"{parent.id} has chunk size {rec.chunk_size}, the repository {cs}")
    if since > number:
        return full(f"{parent.id} is newer than this take (changes number {since})")
    try:
        parent_index = repo.read_index(parent, name)
    except BlksnapError as exc:
        return full(f"the index of {parent.id} cannot be read: {exc.message}")
    if len(cbt_map) != count:
        return full(f"the CBT map has {len(cbt_map)} blocks, {count} expected")
    numbers = np.frombuffer(cbt_map, dtype=np.uint8)
    changed = np.flatnonzero(numbers > since).astype(np.int64)
    recovered = np.array([n for n in info.recovered if n > since], dtype=np.uint8)
    by_crash = np.isin(numbers[changed], recovered)
    chunks = chunks_of(changed, bs, cs, size)
    # A chunk is only re-checked if every changed block in it is there by a crash.
    really = chunks_of(changed[~by_crash], bs, cs, size)
    recheck = np.setdiff1d(chunks_of(changed[by_crash], bs, cs, size), really)
    return DevicePlan(
        name,
        kind,
        parent.id,
        f"blocks changed since {parent.id} (changes number > {since})"
        + ("" if base is None else f"; generation {gen[:8]} starts from {parent.id}"),
        size,
        bs,
        gen,
        number,
        changed,
        cs,
        chunks,
        recheck,
        parent_index=parent_index,
    )


def _linked_parent(
    repo: Repository, name: str, gen: str, kinds: tuple[str, ...]
) -> tuple[BackupInfo, int] | None:
    """The backup CBT generation ``gen`` of ``name`` starts from (an instant
    restore linked it: :meth:`Repository.link_generation`) and the changes
    number above which its blocks changed since, if that backup is still
    there, good, of one of ``kinds`` for ``name``; None otherwise."""
    link = repo.generation_link(gen, name)
    if link is None:
        return None
    try:
        info = repo.get(link["backup"])
        rec = info.device(name)
    except BlksnapError:
        return None
    if not info.ok or rec.kind not in kinds:
        return None
    return info, int(link["changes_number"])


def runs(blocks: np.ndarray, max_blocks: int) -> list[tuple[int, int]]:
    """Adjacent block indices merged: ``[(first, count), ...]``, each at most
    ``max_blocks`` long."""
    if not len(blocks):
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    out: list[tuple[int, int]] = []
    for seg in np.split(blocks, breaks):
        first, n = int(seg[0]), len(seg)
        for off in range(0, n, max_blocks):
            out.append((first + off, min(max_blocks, n - off)))
    return out


# -- image access -----------------------------------------------------------------


class _ImageReader:
    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _EngineImage(_ImageReader):
    def __init__(self, image: Any) -> None:
        self.image = image

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)


class _FileImage(_ImageReader):
    """An image file of blksnapd (``<mount>/images/ID/N``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, offset: int, length: int) -> bytes:
        try:
            first = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise error(exc.errno or errno.EIO, f"reading {self.path}: {exc.strerror}") from None
        if len(first) == length:
            return first  # the usual case: no copy
        buf = bytearray(first)
        while len(buf) < length:
            try:
                part = os.pread(self.fd, length - len(buf), offset + len(buf))
            except OSError as exc:
                raise error(
                    exc.errno or errno.EIO, f"reading {self.path}: {exc.strerror}"
                ) from None
            if not part:
                raise error(errno.EIO, f"{self.path}: short read at {offset + len(buf)}")
            buf += part
        return bytes(buf)

    def close(self) -> None:
        os.close(self.fd)


# -- snapshot requests across a restart of blksnapd's worker -------------------------

#: The connection broke under a request: blksnapd's worker restarted (its
#: supervisor keeps the socket; the client reconnects for the next request).
_BROKEN = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def _state(service: Any, sid: str) -> dict[str, Any] | None:
    """Snapshot ``sid`` as blksnapd has it now, or None if it has none."""
    try:
        return service.snapshot_collect(sid)[0]
    except BlksnapError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def _create(service: Any, names: list[str], where: str, limit: int, sid: str) -> None:
    """``snapshot_create``; cut by a worker restart, made again if it was not."""
    try:
        service.snapshot_create(names, storage=where, limit=limit, sid=sid)
    except BlksnapError as exc:
        if exc.errno not in _BROKEN:
            raise
        log.warning("snapshot %s: create cut by a restart of blksnapd's worker", sid)
        if _state(service, sid) is None:
            service.snapshot_create(names, storage=where, limit=limit, sid=sid)


def _take(service: Any, sid: str) -> dict[str, Any]:
    """``snapshot_take``; cut by a worker restart, where it stands decides:
    taken (the answer was lost), created (it never began: again), or
    corrupted (cut in the middle: the backup fails, saying so)."""
    try:
        return service.snapshot_take(sid)  # type: ignore[no-any-return]
    except BlksnapError as exc:
        if exc.errno not in _BROKEN:
            raise
        log.warning("snapshot %s: take cut by a restart of blksnapd's worker", sid)
    snap = _state(service, sid)
    state = snap["state"] if snap else "gone"
    if state == "created":
        return service.snapshot_take(sid)  # type: ignore[no-any-return]
    if snap is None or state != "taken":
        why = (snap or {}).get("reason") or f"it is {state}"
        raise error(errno.EIO, f"snapshot {sid}: its take was cut by a restart of blksnapd's "
                    f"worker ({why}); run the backup again")  # fmt: skip
    return {
        "id": sid,
        "images": {d["name"]: {"path": d["image"]} for d in snap["devices"]},
        "frozen": [],
    }


def _destroy(service: Any, sid: str) -> None:
    """``snapshot_destroy``; cut by a worker restart, again if it is still there."""
    try:
        service.snapshot_destroy(sid)
    except BlksnapError as exc:
        if exc.errno not in _BROKEN:
            raise
        if _state(service, sid) is not None:
            service.snapshot_destroy(sid)


def _open_image(service: Any, sid: str, name: str, taken: Any) -> _ImageReader:
    if hasattr(service, "image"):
        return _EngineImage(service.image(sid, name))
    return _FileImage(taken["images"][name]["path"])


# -- events -----------------------------------------------------------------------


class _Watcher(threading.Thread):
    """Follows the snapshot's events: grows its storage on ``low_free_space``,
    remembers the first ``corrupted`` event."""

    def __init__(self, service: Any, sid: str, storage: str | None, step: int, most: int) -> None:
        super().__init__(name=f"blksnap-backup-events-{sid[:8]}", daemon=True)
        self.service, self.sid = service, sid
        self.storage, self.step, self.most = storage, step, most
        self.added = 0
        self.failure: tuple[int, str] | None = None
        self.events: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                try:
                    ev = self.service.wait_event(self.sid, timeout=0.2)
                except BlksnapError:
                    return  # snapshot gone
                if ev is None:
                    continue
                self.events.append(ev.code)
                if ev.code == "corrupted":
                    data = ev.data or {}
                    self.failure = (
                        int(data.get("errno") or errno.EIO),
                        f"the snapshot became corrupted ({data.get('error', 'EIO')}: "
                        f"{data.get('message', '')})",
                    )
                elif ev.code == "low_free_space":
                    self._grow()
        finally:
            if not hasattr(self.service, "image"):  # a Client: this thread's connection
                with contextlib.suppress(Exception):
                    self.service.close()

    def _grow(self) -> None:
        if self.storage is None or not os.path.isdir(self.storage):
            log.warning("snapshot %s: diff storage low, nowhere to grow it", self.sid)
            return
        size = min(self.step, self.most - self.added)
        if size <= 0:
            log.warning("snapshot %s: diff storage low, limit reached", self.sid)
            return
        try:
            self.service.snapshot_append_storage(self.sid, self.storage, size=size)
            self.added += size
            log.info("snapshot %s: diff storage grown by %d bytes", self.sid, size)
        except BlksnapError as exc:
            log.warning("snapshot %s: growing diff storage failed: %s", self.sid, exc)


# -- the session ------------------------------------------------------------------


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a call that must not be cut in two
    (a snapshot created in blksnapd but its answer lost); each runs its own
    handler at the end. Only the main thread can do this; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for s in sigs:
            signal.signal(s, old[s])
        for s in dict.fromkeys(caught):
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def default_storage_sizes(total: int) -> tuple[int, int]:
    """(first size and step, most) of the diff storage for devices of ``total`` bytes.

    A snapshot never needs more than the devices' size (each chunk is copied
    at most once); it starts at an eighth of that, between 64 MiB and 1 GiB."""
    most = max(total, 64 * MiB)
    first = min(max(total // 8, 64 * MiB), GiB, most)
    return first, most


def run_backup(
    service: Any,
    repo: Repository,
    devices: Sequence[str],
    mode: str = "auto",
    *,
    storage: str | None = None,
    storage_size: int | None = None,
    storage_max: int | None = None,
    read_size: int | None = None,
    threads: int | None = None,
    progress: ProgressFactory | None = None,
    on_plan: Callable[[DevicePlan], None] | None = None,
    on_take: Callable[[str], None] | None = None,
) -> BackupResult:
    """One whole backup of ``devices`` into ``repo``; raises :class:`BackupFailed`
    (the backup is then recorded as failed) or another :class:`BlksnapError`
    (nothing recorded). ``on_take(snapshot_id)`` runs right after the take,
    while the images exist; ``on_plan(plan)`` once per device before it is
    read. The image is read ``read_size`` bytes at most at a time by
    ``threads`` readers (by default ``backup_read_size`` and
    ``backup_read_threads`` of :mod:`blksnap.settings`)."""
    read_size = SETTINGS.backup_read_size if read_size is None else read_size
    if threads is None:  # (an object store: as many uploads in flight as it takes)
        threads = repo.store.threads(SETTINGS.backup_read_threads)
    if mode not in MODES:
        raise InvalidArgument(f"backup mode must be one of {', '.join(MODES)}")
    names = list(devices)
    if not names:
        raise InvalidArgument("name at least one device to back up")
    if len(set(names)) != len(names):
        raise InvalidArgument("a device is named twice")
    progress = progress or _no_progress
    started = time.monotonic()
    sizes = {d["name"]: int(d["size"]) for d in _device_list(service) if d["name"] in names}
    missing = [n for n in names if n not in sizes]
    if missing:
        raise error(errno.ENOENT, f"no device {missing[0]!r}")
    first, most = default_storage_sizes(sum(sizes.values()))
    first = storage_size or first
    most = storage_max or most
    if storage is None and not repo.local:  # (an object store holds no diff storage)
        storage = os.path.join(SETTINGS.state_dir, "diff")
        os.makedirs(storage, mode=0o700, exist_ok=True)
    where = os.path.abspath(storage or repo.path)
    traffic = repo.traffic()

    # The repository's writer lock first: holding it proves that the backups
    # whose staging dirs are left over are dead, so the snapshots they name
    # (a killed backup's) can be destroyed before they block this one.
    writer = repo.begin(_overall_kind(mode), blocking=False)
    try:
        for old in writer.abandoned_snapshots:
            try:
                service.snapshot_destroy(old)
                log.warning("destroyed snapshot %s, left by a backup that died", old)
            except BlksnapError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        # The id is chosen and recorded first: if this process dies at any
        # point from here, the next backup can name (and destroy) the snapshot.
        sid = str(uuid.uuid4())
        writer.attach_snapshot(sid)
        with _signals_deferred():  # Ctrl-C / SIGTERM only once the answer is in
            _create(service, names, where, min(first, most), sid)
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, BlksnapError) and exc.errno == errno.EBUSY:
            raise error(
                errno.EBUSY,
                f"{exc.message} (see 'blksnap snapshot collect'; a snapshot is released "
                "with 'blksnap snapshot destroy -i ID')",
            ) from None
        raise
    watcher = _Watcher(service, sid, where, first, max(0, most - first))
    readers: dict[str, _ImageReader] = {}
    try:
        watcher.start()
        taken = _take(service, sid)
        if on_take:
            on_take(sid)
        plans = []
        for name in names:
            info = service.cbt_info(name)
            plan = plan_device(repo, name, mode, info, service.cbt_map(name))
            if len(plan.recheck) and plan.parent_index is not None:
                digests = plan.parent_index
                plan.parent_digests = {int(i): digests[i].tobytes() for i in plan.recheck.tolist()}
            plans.append(plan)
            if on_plan:
                on_plan(plan)
        writer.kind = _resolved_kind(mode, plans)
        records: dict[str, DeviceRecord] = {}
        for plan in plans:
            rec = DeviceRecord(
                name=plan.name,
                size=plan.size,
                block_size=plan.block_size,
                generation_id=plan.generation_id,
                changes_number=plan.changes_number,
                kind=plan.kind,
                parent=plan.parent,
            )
            writer.add_device(rec, parent_index=plan.parent_index)
            records[plan.name] = rec
        read_error: tuple[int, str] | None = None
        try:
            for plan in plans:
                readers[plan.name] = _open_image(service, sid, plan.name, taken)
            for plan in plans:
                with progress(plan.name, plan.bytes_planned) as advance:
                    records[plan.name].bytes_read = _copy(
                        plan, readers[plan.name], writer, read_size, threads, advance, watcher
                    )
        except (BlksnapError, OSError) as exc:
            what = exc.message if isinstance(exc, BlksnapError) else str(exc)
            read_error = (exc.errno or errno.EIO, f"reading the image failed: {what}")
        failure, stats = _final_state(service, sid, watcher)
        failure = failure or read_error
        for name, rec in records.items():
            rec.image_bytes_read = stats.get(name)
        if failure is not None:
            code, why = failure
            lost = _lost_at_restart(service, sid)
            if lost is not None:
                why = (
                    f"snapshot {sid} was {lost}. Nothing of this backup is kept; run it "
                    "again (the CBT carried on, so it can still be incremental)"
                )
            info = writer.fail(code, why)
            writer = None
            raise BackupFailed(f"backup {info.id} failed: {why}", code, info)
        info = writer.commit()
        writer = None
        return BackupResult(
            info,
            plans,
            time.monotonic() - started,
            watcher.added,
            list(watcher.events),
            repo.traffic().since(traffic),
        )
    finally:
        watcher.stop()
        for r in readers.values():
            with contextlib.suppress(OSError):
                r.close()
        try:
            _destroy(service, sid)
        except BlksnapError as exc:
            log.warning("destroying snapshot %s: %s", sid, exc)
        if watcher.is_alive():
            watcher.join(timeout=5)
        if writer is not None:
            writer.abort()


def _device_list(service: Any) -> list[dict[str, Any]]:
    devs = service.devices()
    out = []
    for d in devs:
        if isinstance(d, dict):
            out.append(d)
        else:  # Engine: Device objects
            out.append({"name": d.name, "size": d.size})
    return out


def _overall_kind(mode: str) -> str:
    return "incremental" if mode == "auto" else mode


def _resolved_kind(mode: str, plans: list[DevicePlan]) -> str:
    if mode == "full" or all(p.kind == "full" for p in plans):
        return "full"
    return _overall_kind(mode)


def _copy(
    plan: DevicePlan,
    image: _ImageReader,
    writer: Any,
    read_size: int,
    threads: int,
    advance: Callable[[int], None],
    watcher: _Watcher,
) -> int:
    """Read ``plan``'s chunks from ``image`` into ``writer``; bytes read."""
    cs, size = plan.chunk_size, plan.size
    per_read = max(1, read_size // cs)
    pending: deque[Future[int]] = deque()
    window = max(2, threads * 2)
    total = 0
    recheck = plan.parent_digests
    count_lock = threading.Lock()

    def read_and_store(first: int, n: int) -> int:
        # In a reader thread: the read, the digests, and the chunk store's
        # put-if-absent (compression, sealing and fdatasync only for chunks
        # the repository lacks): all of it releases the GIL where it counts.
        offset = first * cs
        data = memoryview(image.read(offset, min(n * cs, size - offset)))
        for i in range(n):
            chunk = writer.prepare(plan.name, first + i, data[i * cs : (i + 1) * cs])
            was = recheck.get(chunk.index) if recheck else None
            if was is not None:
                with count_lock:
                    plan.recheck_bytes += chunk.length
                    if was == chunk.digest:
                        # Marked only by a crash's write intent, and the same
                        # as in the parent's index: it keeps that digest.
                        plan.recheck_unchanged += 1
                        continue
            writer.put_prepared(chunk)
        return len(data)

    def drain_one() -> None:
        nonlocal total
        nbytes = pending.popleft().result()
        total += nbytes
        advance(nbytes)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blksnap-read") as pool:
        try:
            for first, n in runs(plan.chunks, per_read):
                if watcher.failure is not None:
                    raise error(watcher.failure[0], watcher.failure[1])
                pending.append(pool.submit(read_and_store, first, n))
                if len(pending) >= window:
                    drain_one()
            while pending:
                drain_one()
        finally:
            for fut in pending:
                fut.cancel()
    return total


def _lost_at_restart(service: Any, sid: str) -> str | None:
    """Why blksnapd lost snapshot ``sid`` at a worker restart (as its status
    says), or None (it was not, or this service cannot tell)."""
    status = getattr(service, "status", None)
    if status is None:
        return None
    try:
        lost = status().get("lost_snapshots") or {}
    except BlksnapError:
        return None
    return lost.get(sid)


def _final_state(
    service: Any, sid: str, watcher: _Watcher
) -> tuple[tuple[int, str] | None, dict[str, int]]:
    """After the read, from one ``snapshot_collect``: why the backup failed
    (None if it did not) and the image bytes blksnapd served per device."""
    try:
        snap = service.snapshot_collect(sid)[0]
    except BlksnapError as exc:
        vanished = (exc.errno or errno.EIO, f"the snapshot vanished: {exc.message}")
        return watcher.failure or vanished, {}
    stats = {
        d["name"]: int(d["image_bytes_read"]) for d in snap["devices"] if "image_bytes_read" in d
    }
    if watcher.failure is not None:
        return watcher.failure, stats
    if snap.get("state") == "corrupted":
        code = int(snap.get("errno") or errno.EIO)
        name = errno.errorcode.get(code, str(code))
        why = f"the snapshot became corrupted ({name}), e.g. its diff storage overflowed"
        return (code, why), stats
    return None, stats
