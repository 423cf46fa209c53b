"""Restore: rebuild a device as of a backup from its index, into a file or a block device.

The backup's index (one digest per chunk, checked against the manifest) is
read and the repository read-locked by
:meth:`blksnap.backup.repository.Repository.restore`; this module checks the
target, fetches and checks the chunks (several threads: reading, opening the
seal, decompressing and hashing release the GIL) and writes the device a
window (``restore_window`` of :mod:`blksnap.settings`) at a time, so that a
failed restore leaves nothing that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import numpy as np

from blksnap import inuse
from blksnap.backup.chunkstore import ChunkStore
from blksnap.backup.format import BackupInfo, DeviceRecord, chunk_length
from blksnap.errors import Busy, Exists, InvalidArgument, IOFailure, NoSpace, from_oserror
from blksnap.fileio import fd_size, fsync_dir, pwrite_full
from blksnap.settings import SETTINGS

#: A file is restored under ``.NAME`` + this + random, then renamed to NAME.
TEMP_MARK = ".blksnap-restore-"


def restore(
    store: ChunkStore,
    info: BackupInfo,
    device: str,
    digests: np.ndarray,
    target: str,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Rebuild ``device`` of backup ``info`` (its checked index ``digests``,
    read-locked by the caller) into ``target``: see :meth:`Repository.restore
    <blksnap.backup.repository.Repository.restore>`."""
    real = os.path.realpath(target)
    record = info.device(device)
    st = check_target(target, real, force)
    target_fd = -1
    temp: str | None = None
    try:
        if st is not None and stat.S_ISBLK(st.st_mode):
            target_fd = _open_blockdev(target, real, record.size, device)
            head = bytearray(min(SETTINGS.restore_head, record.size))
            try:  # no valid signature until the very end
                pwrite_full(target_fd, 0, head)
                os.fsync(target_fd)
            except OSError as exc:
                raise from_oserror(exc, f"write {target}") from None
            written, sha = _rebuild(
                store, info, record, digests, target, target_fd, True, progress, head
            )
            try:
                os.fsync(target_fd)
                pwrite_full(target_fd, 0, head)
                os.fsync(target_fd)
            except OSError as exc:
                raise from_oserror(exc, f"write {target}") from None
        else:
            target_fd, temp = _open_temp(target, real, record.size, st)
            written, sha = _rebuild(
                store, info, record, digests, target, target_fd, False, progress
            )
            try:
                os.fsync(target_fd)
            except OSError as exc:
                raise from_oserror(exc, f"fsync {target}") from None
            users = inuse.users_of(real)
            if users:  # something took the target while we wrote
                raise Busy(f"{target} is in use: {'; '.join(users)}; nothing restored")
            try:
                os.rename(temp, real)
                temp = None
                fsync_dir(os.path.dirname(real))
            except OSError as exc:
                raise from_oserror(exc, f"rename to {target}") from None
    finally:
        if target_fd >= 0:
            os.close(target_fd)
        if temp is not None:
            with suppress(OSError):
                os.unlink(temp)
    return {
        "backup": info.id,
        "device": device,
        "size": record.size,
        "bytes_written": written,
        "sha256": sha,
    }


def _named(target: str, real: str) -> str:
    return target if os.path.abspath(target) == real else f"{target} ({real})"


def check_target(target: str, real: str, force: bool) -> os.stat_result | None:
    """Refuse a restore target (``real``: its path, symlinks resolved) in use
    (EBUSY), neither a regular file nor a block device (EINVAL), or holding
    data without ``force`` (EEXIST); its stat, None if it does not exist yet."""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise from_oserror(exc, target) from None
    blockdev = stat.S_ISBLK(st.st_mode)
    if not blockdev and not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{target} is neither a regular file nor a block device")
    users = inuse.users_of(real)
    if users:
        raise Busy(
            f"{_named(target, real)} is in use: {'; '.join(users)}; restore will not write to it"
        )
    if force:
        return st
    if blockdev:
        raise Exists(
            f"{_named(target, real)} is a block device: everything on it would be"
            " overwritten; add --force to restore onto it"
        )
    if st.st_size:
        raise Exists(
            f"{_named(target, real)} exists and holds {st.st_size} bytes; add --force to replace it"
        )
    return st


def _open_blockdev(target: str, real: str, size: int, device: str) -> int:
    """Open a block device target exclusively; EBUSY if something holds it."""
    try:
        fd = os.open(real, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise Busy(f"{_named(target, real)} is in use: cannot open it exclusively") from None
        raise from_oserror(exc, target) from None
    try:
        capacity = fd_size(fd)
    except OSError as exc:
        os.close(fd)
        raise from_oserror(exc, target) from None
    if capacity < size:
        os.close(fd)
        raise NoSpace(f"{target} holds {capacity} bytes, device {device} needs {size}")
    return fd


def _open_temp(target: str, real: str, size: int, st: os.stat_result | None) -> tuple[int, str]:
    """A new file of ``size`` bytes beside ``real`` (O_EXCL): (fd, its path).
    It takes the mode (and, for root, the owner) of the file it will replace."""
    directory, base = os.path.split(real)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{base}{TEMP_MARK}", dir=directory)
    except OSError as exc:
        raise from_oserror(exc, target) from None
    try:
        if st is not None:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        with suppress(OSError):
            os.unlink(temp)
        raise from_oserror(exc, target) from None
    return fd, temp


class _Repeats:
    """The chunks a device holds more than once (the same digest at several
    places: a repeated pattern, a file copied): fetched once and kept until
    their last place is written, at most ``budget`` bytes of them at a time
    (past it a repeat is fetched again). Thread-safe."""

    def __init__(self, digests: np.ndarray, zero: np.ndarray, budget: int) -> None:
        rows = np.ascontiguousarray(digests[~zero])
        self.left: dict[bytes, int] = {}
        if len(rows):
            keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
            uniq, counts = np.unique(keys, return_counts=True)
            self.left = {bytes(u): int(c) for u, c in zip(uniq, counts, strict=True) if c > 1}
        self.budget = budget
        self.kept: dict[bytes, Future[bytes]] = {}
        self.held = 0
        self.lock = threading.Lock()

    def read(self, digest: bytes, length: int, fetch: Callable[[], bytes]) -> bytes:
        if digest not in self.left:
            return fetch()
        with self.lock:
            self.left[digest] -= 1
            last = self.left[digest] == 0
            fut = self.kept.get(digest)
            mine = fut is None and not last and self.held + length <= self.budget
            if mine:
                fut = self.kept[digest] = Future()
                self.held += length
            elif fut is not None and last:
                del self.kept[digest]
                self.held -= length
        if fut is None:
            return fetch()
        if not mine:
            return fut.result()
        try:
            data = fetch()
        except BaseException as exc:
            with self.lock:
                if self.kept.pop(digest, None) is not None:
                    self.held -= length
            fut.set_exception(exc)
            raise
        fut.set_result(data)
        return data


def _rebuild(
    store: ChunkStore,
    info: BackupInfo,
    record: DeviceRecord,
    digests: np.ndarray,
    target: str,
    target_fd: int,
    is_blockdev: bool,
    progress: Callable[[int], None] | None,
    head: bytearray | None = None,
) -> tuple[int, str]:
    """Write the device into ``target_fd`` window by window; (bytes written, sha256).
    With ``head``, its first ``len(head)`` bytes go there instead of the target
    (counted as written): the caller writes them last."""
    size, cs = record.size, record.chunk_size
    count = record.chunk_count
    zero = store.zero_chunks(digests, size, cs)
    per_window = max(1, SETTINGS.restore_window // cs)
    repeats = _Repeats(digests, zero, 4 * SETTINGS.restore_window)
    sha = hashlib.sha256()
    blank = bytes(min(per_window * cs, size))
    where = f"backup {info.id} device {record.name}"

    def fetch(index: int) -> tuple[bytes, bool]:
        """Read and check chunk ``index`` and, outside ``head``, write it (in
        the fetching thread: pwrite at an offset needs no order); (its bytes,
        written)."""
        digest = digests[index].tobytes()
        length = chunk_length(size, cs, index)
        try:
            data = repeats.read(digest, length, lambda: store.read(digest, length))
        except IOFailure as exc:
            raise IOFailure(f"{where} chunk {index} (offset {index * cs}): {exc.message}") from None
        if head is not None and index * cs < len(head):
            return data, False
        try:
            pwrite_full(target_fd, index * cs, data)
        except OSError as exc:
            raise from_oserror(exc, f"write {target}") from None
        return data, True

    def write(start: int, data: bytes | memoryview) -> int:
        """Write at ``start``; the part inside ``head`` goes there instead."""
        if head is not None and start < len(head):
            cut = min(len(head) - start, len(data))
            head[start : start + cut] = data[:cut]
            if cut < len(data):
                pwrite_full(target_fd, start + cut, data[cut:])
            return len(data)
        pwrite_full(target_fd, start, data)
        return len(data)

    written = 0
    threads = store.threads(SETTINGS.restore_threads)

    def hash_window(datas: list[bytes | memoryview]) -> None:
        for d in datas:
            sha.update(d)

    with (
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blksnap-restore") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="blksnap-sha256") as hasher,
    ):
        # One window fetched ahead: the next window's chunks are read and
        # checked while this one is written; the SHA-256 of the device runs
        # in a thread of its own, a window behind (in order: one worker).
        def submit(w0: int) -> list[Future[tuple[bytes, bool]] | None]:
            w1 = min(count, w0 + per_window)
            return [None if zero[i] else pool.submit(fetch, i) for i in range(w0, w1)]

        starts = list(range(0, count, per_window))
        ahead = submit(starts[0]) if starts else []
        hashing: Future[None] | None = None
        try:
            for k, w0 in enumerate(starts):
                jobs = ahead
                ahead = submit(starts[k + 1]) if k + 1 < len(starts) else []
                datas: list[bytes | memoryview] = []
                for j, job in enumerate(jobs):
                    i = w0 + j
                    length = chunk_length(size, cs, i)
                    if job is None:
                        data: bytes | memoryview = memoryview(blank)[:length]
                        done = not is_blockdev  # a hole in a file; zeroes on a device
                    else:
                        data, done = job.result()
                        if done:
                            written += length
                    datas.append(data)
                    if not done:
                        written += write(i * cs, data)
                    if progress:
                        progress(length)
                if hashing is not None:
                    hashing.result()
                hashing = hasher.submit(hash_window, datas)
            if hashing is not None:
                hashing.result()
        except BaseException as exc:
            for job in ahead:
                if job is not None:
                    job.cancel()
            if isinstance(exc, OSError):
                raise from_oserror(exc, f"write {target}") from None
            raise
    return written, sha.hexdigest()
