"""The writer: one backup being staged under ``tmp/`` and published with one rename.

:meth:`blksnap.backup.repository.Repository.begin` takes the writer lock and
makes the staging directory; a :class:`BackupWriter` then stores each
device's blocks (zero check, blake3, zstd: :meth:`BackupWriter.prepare`, in
any thread; :meth:`BackupWriter.put_prepared`, in block order), and
:meth:`~BackupWriter.commit`, :meth:`~BackupWriter.fail` or
:meth:`~BackupWriter.abort` finishes it, as ``docs/REPOSITORY.md`` describes.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np
import zstandard

from blksnap.backup.format import (
    DIGEST,
    FLAG_ZERO,
    FLAG_ZSTD,
    KINDS,
    MANIFEST,
    MAP_DTYPE,
    SNAPSHOT_FILE,
    BackupInfo,
    DeviceRecord,
    block_length,
    check_link,
    info_from_manifest,
    new_manifest,
    resolve_chain,
    zero_digest,
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
class PreparedBlock:
    """One block ready to be stored: what :meth:`BackupWriter.prepare` computed."""

    device: str
    index: int
    length: int
    flags: int
    digest: bytes
    blob: bytes | memoryview


@dataclass
class _DeviceState:
    record: DeviceRecord
    fd: int
    data_path: str
    map_path: str
    zero: bytes  # block_size zero bytes (shared by devices of one block size)
    offset: int = 0  # bytes in the data file
    last: int = -1  # last block index put
    index: array.array = field(default_factory=lambda: array.array("Q"))
    offsets: array.array = field(default_factory=lambda: array.array("Q"))
    lengths: array.array = field(default_factory=lambda: array.array("Q"))
    flags: array.array = field(default_factory=lambda: array.array("B"))
    sums: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)
    kicked: int = 0  # data-file offset the last background fdatasync was started at
    flushing: Future[None] | None = None

    def settle(self) -> None:
        """Wait for the background fdatasync; raise its error."""
        job, self.flushing = self.flushing, None
        if job is not None:
            job.result()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.settle()  # never close the fd under a running fdatasync
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1

    def rows(self) -> np.ndarray:
        count = len(self.index)
        rows = np.zeros(count, dtype=MAP_DTYPE)
        if count:
            rows["index"] = np.frombuffer(self.index, dtype=np.uint64)
            rows["offset"] = np.frombuffer(self.offsets, dtype=np.uint64)
            rows["length"] = np.frombuffer(self.lengths, dtype=np.uint64)
            rows["flags"] = np.frombuffer(self.flags, dtype=np.uint8)
            rows["checksum"] = np.frombuffer(bytes(self.sums), dtype=np.uint8).reshape(
                count, DIGEST
            )
        return rows


class BackupWriter:
    """One backup being written: holds the repository's writer lock until
    :meth:`commit`, :meth:`fail` or :meth:`abort`. As a context manager, leaving
    the block without commit or fail aborts (nothing is recorded).

    ``put`` may be called from several threads for different devices; the calls
    for one device must come in increasing block order.
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
        self.id = backup_id
        self.seq = seq
        self.kind = kind
        self.snapshot_id = snapshot_id
        self.started = started
        self.path = staging
        self._lock_fd = lock_fd
        self._index = index
        self._devices: dict[str, _DeviceState] = {}
        self._zeros: dict[int, bytes] = {}
        self._done = False
        self._pool: ThreadPoolExecutor | None = None
        self._tls = threading.local()
        self._zstd_level = SETTINGS.backup_zstd_level
        self._writeback_step = SETTINGS.backup_writeback_step
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

    def _background(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blksnap-sync")
        return self._pool

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

    def add_device(self, record: DeviceRecord) -> None:
        """Add a device; the writer keeps ``record`` and fills in its counters."""
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
        if record.kind == "full":
            if record.parent is not None:
                raise InvalidArgument(f"device {name}: a full backup has no parent")
        else:
            if record.parent is None:
                raise InvalidArgument(f"device {name}: a {record.kind} backup needs a parent")
            parent = self._index.get(record.parent)
            if parent is None:
                raise InvalidArgument(f"device {name}: parent backup {record.parent} not found")
            if not any(r.name == name for r in parent.devices):
                raise InvalidArgument(
                    f"device {name}: parent backup {parent.id} has no device {name}"
                )
            # The whole chain must be restorable, or this backup never will be.
            resolve_chain(self._index, parent, name)
            check_link(f"device {name}", parent.id, parent.device(name), record)
        number = len(self._devices)
        record.file = f"dev-{number}"
        record.blocks_stored = record.blocks_zero = record.bytes_stored = record.data_size = 0
        record.map_checksum = ""
        data_path = os.path.join(self.path, record.file + ".data")
        try:
            fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_oserror(exc, data_path) from None
        zero = self._zeros.get(record.block_size)
        if zero is None:
            zero = self._zeros[record.block_size] = bytes(record.block_size)
        self._devices[name] = _DeviceState(
            record=record,
            fd=fd,
            data_path=data_path,
            map_path=os.path.join(self.path, record.file + ".map"),
            zero=zero,
        )

    def put(self, device: str, index: int, data: bytes | bytearray | memoryview) -> int:
        """Store block ``index`` of ``device``; returns the bytes stored (0 for a zero block)."""
        return self.put_prepared(self.prepare(device, index, data))

    def prepare(
        self, device: str, index: int, data: bytes | bytearray | memoryview
    ) -> PreparedBlock:
        """The CPU work of :meth:`put` (zero check, checksum, compression) for
        block ``index``, without storing it. Thread-safe: a backup prepares
        blocks in its reader threads and stores them in order with
        :meth:`put_prepared`. ``data`` must not change until then."""
        self._check_open()
        state = self._devices.get(device)
        if state is None:
            raise NotFound(f"device {device} is not in backup {self.id}")
        if not isinstance(data, bytes):
            data = memoryview(data)
            if data.itemsize != 1 or data.ndim != 1:
                try:
                    data = data.cast("B")
                except TypeError:
                    raise InvalidArgument("block data must be a contiguous buffer") from None
        record = state.record
        if index < 0 or index >= record.block_count:
            raise InvalidArgument(
                f"device {device}: block {index} is outside 0..{record.block_count - 1}"
            )
        length = len(data)
        expect = block_length(record.size, record.block_size, index)
        if length != expect:
            raise InvalidArgument(
                f"device {device}: block {index} has {length} bytes, not {expect}"
            )
        if state.zero.startswith(data):
            return PreparedBlock(device, index, length, FLAG_ZERO, zero_digest(length), b"")
        digest = blake3.blake3(data).digest()
        if self.repo.compression == "zstd":
            cctx = getattr(self._tls, "cctx", None)
            if cctx is None:  # compressors are not thread-safe: one per thread
                cctx = self._tls.cctx = zstandard.ZstdCompressor(level=self._zstd_level)
            packed = cctx.compress(data)
            if len(packed) < length:
                return PreparedBlock(device, index, length, FLAG_ZSTD, digest, packed)
        return PreparedBlock(device, index, length, 0, digest, data)

    def put_prepared(self, block: PreparedBlock) -> int:
        """Store a block made by :meth:`prepare`; bytes stored."""
        self._check_open()
        device, index = block.device, block.index
        state = self._devices.get(device)
        if state is None:
            raise NotFound(f"device {device} is not in backup {self.id}")
        record = state.record
        with state.lock:
            if index <= state.last:
                raise InvalidArgument(
                    f"device {device}: block {index} after block {state.last}"
                    " (indices must increase)"
                )
            flags, digest = block.flags, block.digest
            stored = 0 if flags == FLAG_ZERO else len(block.blob)
            if stored:
                try:
                    pwrite_full(state.fd, state.offset, block.blob)
                except OSError as exc:
                    raise from_oserror(exc, f"backup {self.id} device {device}") from None
            state.index.append(index)
            state.offsets.append(state.offset)
            state.lengths.append(stored)
            state.flags.append(flags)
            state.sums += digest
            state.offset += stored
            state.last = index
            if state.offset - state.kicked >= self._writeback_step and (
                state.flushing is None or state.flushing.done()
            ):
                try:
                    state.settle()
                except OSError as exc:
                    raise from_oserror(exc, f"backup {self.id} device {device}") from None
                state.kicked = state.offset
                state.flushing = self._background().submit(os.fdatasync, state.fd)
            record.blocks_stored += 1
            record.bytes_stored += stored
            if flags == FLAG_ZERO:
                record.blocks_zero += 1
        return stored

    def commit(self) -> BackupInfo:
        """Write the maps and the manifest and publish the backup atomically."""
        self._check_open()
        if not self._devices:
            raise InvalidArgument(f"backup {self.id} has no device")
        for state in self._devices.values():
            record = state.record
            if record.kind == "full" and len(state.index) != record.block_count:
                raise IOFailure(
                    f"backup {self.id} device {record.name} incomplete: a full backup"
                    f" holds {len(state.index)} of {record.block_count} blocks"
                )
        try:
            for state in self._devices.values():
                record = state.record
                if state.fd >= 0:
                    state.settle()
                    os.ftruncate(state.fd, state.offset)  # drop a partial write that failed
                    os.fsync(state.fd)
                    state.close()
                raw = state.rows().tobytes()
                write_file(state.map_path, raw)
                record.map_checksum = blake3.blake3(raw).hexdigest()
                record.data_size = state.offset
        except OSError as exc:
            raise from_oserror(exc, f"commit backup {self.id}") from None
        return self._publish("ok", None)

    def fail(self, err: int, message: str) -> BackupInfo:
        """Record a failed backup: the manifest only, with the error."""
        self._check_open()
        for state in self._devices.values():
            state.close()
            for path in (state.data_path, state.map_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise from_oserror(exc, f"fail backup {self.id}") from None
            state.record.file = ""
            state.record.map_checksum = ""
            state.record.data_size = 0
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
        )
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
        # Published: whatever happens now, this writer is finished.
        self._done = True
        self._release()
        try:
            fsync_dir(self.repo.backups_dir)
        except OSError as exc:
            raise from_oserror(exc, f"backup {self.id} published, but fsync backups/") from None
        return info_from_manifest(manifest, final)

    def abort(self) -> None:
        """Drop the backup: remove the staging directory, record nothing."""
        if self._done:
            return
        self._done = True
        for state in self._devices.values():
            state.close()
        try:
            remove_tree(self.path)
        except OSError as exc:
            log.warning("backup %s: cannot remove %s: %s", self.id, self.path, exc)
        self._release()

    def _release(self) -> None:
        for state in self._devices.values():
            state.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
