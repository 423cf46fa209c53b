"""The writer: one backup being staged under ``tmp/`` and published with one rename.

:meth:`blksnap.backup.repository.Repository.begin` takes the writer lock and
makes the staging directory; a :class:`BackupWriter` then takes each
device's chunks (zero check and digest: :meth:`BackupWriter.prepare`; the
chunk store's put-if-absent: :meth:`BackupWriter.put_prepared`; both in any
thread, in any order), keeps the device's index (a full device starts empty,
an incremental or differential one from its parent's index: the chunks the
CBT says did not change keep their parent's digest), and
:meth:`~BackupWriter.commit`, :meth:`~BackupWriter.fail` or
:meth:`~BackupWriter.abort` finishes it, as ``docs/REPOSITORY.md`` describes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from blksnap.backup.chunkstore import ChunkStore
from blksnap.backup.format import (
    BEGUN_FILE,
    DIGEST,
    INDEX_SUFFIX,
    KINDS,
    MANIFEST,
    SNAPSHOT_FILE,
    BackupInfo,
    DeviceRecord,
    chunk_length,
    info_from_manifest,
    new_manifest,
)
from blksnap.errors import (
    AlreadyDone,
    Exists,
    InvalidArgument,
    IOFailure,
    NotFound,
    from_oserror,
)
from blksnap.fileio import fsync_dir, pwrite_full
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
    from blksnap.backup.repository import Repository

log = logging.getLogger("blksnap.backup.repo")  # the name its lines have always had


def write_file(path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        pwrite_full(fd, 0, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------
# the writer


@dataclass(frozen=True)
class PreparedChunk:
    """One chunk ready to be stored: what :meth:`BackupWriter.prepare` computed."""

    device: str
    index: int
    length: int
    digest: bytes
    zero: bool
    data: bytes | memoryview


@dataclass
class _DeviceState:
    record: DeviceRecord
    index_path: str  # (a directory's staging file; an object store's key)
    digests: np.ndarray  # (chunk_count, 32) uint8: the index being built
    filled: np.ndarray  # bool per chunk: has a digest (inherited or put)
    zero: bytes  # chunk_size zero bytes
    lock: threading.Lock


class BackupWriter:
    """One backup being written: holds the repository's writer lock until
    :meth:`commit`, :meth:`fail` or :meth:`abort`. As a context manager, leaving
    the block without commit or fail aborts (nothing is recorded).

    ``prepare``/``put_prepared``/``put`` may be called from several threads,
    for any device and chunk, in any order.
    """

    def __init__(
        self,
        repo: Repository,
        *,
        backup_id: str,
        seq: int,
        kind: str,
        snapshot_id: str | None,
        started: str,
        staging: str,
        lock_fd: int,
        index: dict[str, BackupInfo],
        abandoned_snapshots: list[str] | None = None,
    ) -> None:
        self.repo = repo
        self.store: ChunkStore = repo.store
        self.id = backup_id
        self.seq = seq
        self.kind = kind
        self.snapshot_id = snapshot_id
        self.started = started
        #: When the backup finished (None: at publication); a converted
        #: backup keeps its own.
        self.finished: str | None = None
        self.path = staging
        self._lock_fd = lock_fd
        self._index = index
        self._devices: dict[str, _DeviceState] = {}
        self._zeros: dict[int, bytes] = {}
        self._done = False
        #: Chunks stored are flushed in the background every this many bytes,
        #: so the disk writes overlap the backup (commit flushes the rest).
        self._flush_step = SETTINGS.backup_writeback_step
        self._flusher: ThreadPoolExecutor | None = None
        self._flushing: Future[None] | None = None
        self._flush_lock = threading.Lock()
        #: Snapshots named by the staging dirs of writers that died (a killed
        #: backup): the caller may destroy them if they still exist.
        self.abandoned_snapshots = list(abandoned_snapshots or [])
        if snapshot_id is not None:
            self.attach_snapshot(snapshot_id)

    def attach_snapshot(self, snapshot_id: str) -> None:
        """Record the snapshot this backup reads, in the manifest and in the
        staging dir, so that if this process dies the next writer can name it
        (:attr:`abandoned_snapshots`)."""
        self.snapshot_id = snapshot_id
        try:
            write_file(os.path.join(self.path, SNAPSHOT_FILE), snapshot_id.encode() + b"\n")
        except OSError as exc:
            raise from_oserror(exc, f"backup {self.id}") from None

    def __repr__(self) -> str:
        return f"<BackupWriter {self.id} {self.kind} in {self.repo.path}>"

    def __enter__(self) -> BackupWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def __del__(self) -> None:
        try:
            if not self._done:
                self.abort()
        except Exception:
            pass

    @property
    def records(self) -> list[DeviceRecord]:
        return [state.record for state in self._devices.values()]

    def _check_open(self) -> None:
        if self._done:
            raise AlreadyDone(f"backup {self.id} is already finished")

    def add_device(self, record: DeviceRecord, parent_index: np.ndarray | None = None) -> None:
        """Add a device; the writer keeps ``record`` and fills in its counters.

        An incremental or differential record starts from its parent's index
        (checked): only the chunks put into this backup change. A caller that
        has read that index already (:meth:`Repository.read_index`) passes it
        as ``parent_index`` instead of having it read again."""
        self._check_open()
        name = record.name
        if not isinstance(name, str) or not name:
            raise InvalidArgument("a device needs a name")
        if name in self._devices:
            raise Exists(f"device {name} is already in backup {self.id}")
        if record.size < 0 or record.block_size <= 0:
            raise InvalidArgument(
                f"device {name}: bad size {record.size} or block size {record.block_size}"
            )
        if record.kind not in KINDS:
            raise InvalidArgument(f"device {name}: unknown kind {record.kind!r}")
        if record.kind not in ("full", self.kind):
            raise InvalidArgument(
                f"device {name}: a {self.kind} backup holds full or {self.kind} devices,"
                f" not {record.kind}"
            )
        record.chunk_size = self.repo.chunk_size
        count = record.chunk_count
        if record.kind == "full":
            if record.parent is not None:
                raise InvalidArgument(f"device {name}: a full backup has no parent")
            digests = np.zeros((count, DIGEST), dtype=np.uint8)
            filled = np.zeros(count, dtype=bool)
        else:
            if record.parent is None:
                raise InvalidArgument(f"device {name}: a {record.kind} backup needs a parent")
            parent = self._index.get(record.parent)
            if parent is None:
                raise InvalidArgument(f"device {name}: parent backup {record.parent} not found")
            # (a generation an instant restore started from this parent)
            link = self.repo.generation_link(record.generation_id, name)
            linked = link is not None and link["backup"] == parent.id
            check_parent(f"device {name}", parent, record, linked=linked)
            if parent_index is None:
                parent_index = self.repo.read_index(parent, name)
            elif parent_index.shape != (count, DIGEST):
                raise InvalidArgument(
                    f"device {name}: parent index has shape {parent_index.shape},"
                    f" not ({count}, {DIGEST})"
                )
            digests = parent_index.copy()
            filled = np.ones(count, dtype=bool)
        number = len(self._devices)
        record.file = f"dev-{number}"
        for counter in (
            "chunks_read",
            "chunks_zero",
            "chunks_new",
            "chunks_reused",
            "bytes_stored",
            "bytes_new",
            "bytes_reused",
        ):
            setattr(record, counter, 0)
        record.index_checksum = ""
        zero = self._zeros.get(record.chunk_size)
        if zero is None:
            zero = self._zeros[record.chunk_size] = bytes(record.chunk_size)
        self._devices[name] = _DeviceState(
            record=record,
            index_path=self._index_location(record.file + INDEX_SUFFIX),
            digests=digests,
            filled=filled,
            zero=zero,
            lock=threading.Lock(),
        )

    def _state(self, device: str) -> _DeviceState:
        state = self._devices.get(device)
        if state is None:
            raise NotFound(f"device {device} is not in backup {self.id}")
        return state

    def put(self, device: str, index: int, data: bytes | bytearray | memoryview) -> int:
        """Store chunk ``index`` of ``device``; returns the bytes written to the
        chunk store (0 for a zero chunk or one the repository already has)."""
        return self.put_prepared(self.prepare(device, index, data))

    def prepare(
        self, device: str, index: int, data: bytes | bytearray | memoryview
    ) -> PreparedChunk:
        """The zero check and digest of chunk ``index``, without storing it.
        Thread-safe. ``data`` must not change until :meth:`put_prepared`."""
        self._check_open()
        state = self._state(device)
        if not isinstance(data, bytes):
            data = memoryview(data)
            if not data.c_contiguous:
                raise InvalidArgument("chunk data must be a contiguous buffer")
            if data.itemsize != 1 or data.ndim != 1:
                data = data.cast("B")
        record = state.record
        if index < 0 or index >= record.chunk_count:
            raise InvalidArgument(
                f"device {device}: chunk {index} is outside 0..{record.chunk_count - 1}"
            )
        length = len(data)
        expect = chunk_length(record.size, record.chunk_size, index)
        if length != expect:
            raise InvalidArgument(
                f"device {device}: chunk {index} has {length} bytes, not {expect}"
            )
        if state.zero.startswith(data):
            return PreparedChunk(device, index, length, self.store.zero_digest(length), True, b"")
        return PreparedChunk(device, index, length, self.store.keys.digest(data), False, data)

    def put_prepared(self, chunk: PreparedChunk) -> int:
        """Put a chunk made by :meth:`prepare` in the index, and in the chunk
        store unless it is there (or all zero); bytes written. Thread-safe."""
        self._check_open()
        state = self._state(chunk.device)
        stored = 0
        new = False
        if not chunk.zero:
            with self.store.shared():
                if not self.store.touch(chunk.digest):
                    blob = self.store.encode(chunk.digest, chunk.data)
                    new = self.store.put(chunk.digest, blob)
                    stored = len(blob) if new else 0
        if new and self.store.pending_bytes >= self._flush_step:
            self._kick_flush()
        record = state.record
        with state.lock:
            state.digests[chunk.index] = np.frombuffer(chunk.digest, dtype=np.uint8)
            state.filled[chunk.index] = True
            record.chunks_read += 1
            if chunk.zero:
                record.chunks_zero += 1
            elif new:
                record.chunks_new += 1
                record.bytes_new += chunk.length
                record.bytes_stored += stored
            else:
                record.chunks_reused += 1
                record.bytes_reused += chunk.length
        return stored

    def _kick_flush(self) -> None:
        """Start flushing the chunks stored so far, unless a flush is running;
        an error of the last one is raised here."""
        with self._flush_lock:
            job = self._flushing
            if job is not None:
                if not job.done():
                    return
                self._flushing = None
                job.result()
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(1, thread_name_prefix="blksnap-flushing")
            self._flushing = self._flusher.submit(self.store.flush)

    def _settle_flush(self) -> None:
        with self._flush_lock:
            job, self._flushing = self._flushing, None
        if job is not None:
            job.result()

    def commit(self) -> BackupInfo:
        """Write the indexes and the manifest and publish the backup atomically."""
        self._check_open()
        if not self._devices:
            raise InvalidArgument(f"backup {self.id} has no device")
        for state in self._devices.values():
            missing = np.flatnonzero(~state.filled)
            if missing.size:
                record = state.record
                raise IOFailure(
                    f"backup {self.id} device {record.name} incomplete: chunk"
                    f" {int(missing[0])} was never stored ({missing.size} of"
                    f" {record.chunk_count} missing)"
                )
        try:
            # Every chunk this backup stored is durable before anything names it.
            self._settle_flush()
            self.store.flush()
            self.store.sync()
            for state in self._devices.values():
                raw = state.digests.tobytes()
                self._write_index(state.index_path, raw)
                state.record.index_checksum = self.store.keys.mac(raw)
        except OSError as exc:
            raise from_oserror(exc, f"commit backup {self.id}") from None
        self._before_publish([state.digests for state in self._devices.values()])
        return self._publish("ok", None)

    # -- where a backup is staged and how it is published: a directory's way
    # (staging dir, one rename); blksnap.backup.objects has an object store's.

    def _index_location(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _write_index(self, where: str, raw: bytes) -> None:
        write_file(where, raw)

    def _remove_index(self, where: str) -> None:
        try:
            os.unlink(where)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise from_oserror(exc, f"fail backup {self.id}") from None

    def _before_publish(self, indexes: list[np.ndarray]) -> None:
        """Last check before the indexes are published (none in a directory:
        gc and writers exclude each other there by ``chunks.lock``)."""

    def fail(self, err: int, message: str) -> BackupInfo:
        """Record a failed backup: the manifest only, with the error. The chunks
        it stored stay until gc (a retry reuses them)."""
        self._check_open()
        for state in self._devices.values():
            self._remove_index(state.index_path)
            state.record.file = ""
            state.record.index_checksum = ""
        name = errno.errorcode.get(err, f"E{err}")
        return self._publish("failed", {"errno": name, "message": str(message)})

    def _publish(self, state: str, err: dict[str, Any] | None) -> BackupInfo:
        manifest = new_manifest(
            backup_id=self.id,
            seq=self.seq,
            kind=self.kind,
            state=state,
            err=err,
            started=self.started,
            snapshot_id=self.snapshot_id,
            compression=self.repo.compression,
            records=self.records,
            mac=self.store.keys.mac,
            finished=self.finished,
        )
        return self._publish_manifest(manifest)

    def _publish_manifest(self, manifest: dict[str, Any]) -> BackupInfo:
        final = os.path.join(self.repo.backups_dir, self.id)
        try:
            with suppress(FileNotFoundError):  # only a staging dir names its snapshot
                os.unlink(os.path.join(self.path, SNAPSHOT_FILE))
            write_file(
                os.path.join(self.path, MANIFEST), json.dumps(manifest, indent=2).encode() + b"\n"
            )
            fsync_dir(self.path)
            os.rename(self.path, final)
        except OSError as exc:
            raise from_oserror(exc, f"publish backup {self.id}") from None
        # Published: whatever happens now, this writer is finished. ``begun``
        # goes only now: until the rename gc must see this backup as running
        # (its index is not under backups/ yet).
        self._done = True
        self._release()
        with suppress(OSError):
            os.unlink(os.path.join(final, BEGUN_FILE))
        try:
            fsync_dir(self.repo.backups_dir)
        except OSError as exc:
            raise from_oserror(exc, f"backup {self.id} published, but fsync backups/") from None
        return info_from_manifest(manifest, final)

    def abort(self) -> None:
        """Drop the backup: remove the staging directory, record nothing (the
        chunks it stored stay until gc)."""
        if self._done:
            return
        self._done = True
        self._discard()
        self._release()

    def _discard(self) -> None:
        try:
            remove_tree(self.path)
        except OSError as exc:
            log.warning("backup %s: cannot remove %s: %s", self.id, self.path, exc)

    def _release(self) -> None:
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def check_parent(
    where: str, parent: BackupInfo, child: DeviceRecord, *, linked: bool = False
) -> None:
    """EINVAL unless ``child`` can be an incremental or differential of
    ``parent`` (``linked``: its CBT generation starts from ``parent``, see
    :meth:`Repository.link_generation`)."""
    if not parent.ok:
        raise InvalidArgument(f"{where}: parent backup {parent.id} is {parent.state}")
    try:
        rec = parent.device(child.name)
    except NotFound:
        raise InvalidArgument(f"{where}: parent backup {parent.id} has no device") from None
    if rec.generation_id != child.generation_id and not linked:
        raise InvalidArgument(
            f"{where}: parent backup {parent.id} has another CBT generation"
            f" ({rec.generation_id}, not {child.generation_id})"
        )
    if rec.size != child.size:
        raise InvalidArgument(
            f"{where}: parent backup {parent.id} has size {rec.size}, not {child.size}"
        )
    if rec.chunk_size != child.chunk_size:
        raise InvalidArgument(
            f"{where}: parent backup {parent.id} has chunk size {rec.chunk_size},"
            f" not {child.chunk_size}"
        )
    if child.kind == "differential" and rec.kind != "full":
        raise InvalidArgument(
            f"{where}: a differential backup must be based on a full one, {parent.id} is {rec.kind}"
        )
