"""Restore: rebuild a device as of a backup from its chain, into a file or a block device.

The chain (full first) is resolved and locked by
:meth:`blksnap.backup.repository.Repository.restore`; this module checks the
target, reads and checks every chain member's map and stored blocks
(:mod:`blksnap.backup.format`), and writes the device a window
(``restore_window`` of :mod:`blksnap.settings`) at a time, so that a failed
restore leaves nothing that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import blake3
import numpy as np
import zstandard

from blksnap import inuse
from blksnap.backup.format import (
    DIGEST,
    FILE_RE,
    FLAG_ZERO,
    MAP_DTYPE,
    BackupInfo,
    BadBlock,
    DeviceRecord,
    block_length,
    map_structure_problem,
    runs,
    unpack_block,
)
from blksnap.errors import Busy, Exists, InvalidArgument, IOFailure, NoSpace, from_oserror
from blksnap.fileio import fd_size, fsync_dir, pread_upto, pwrite_full
from blksnap.settings import SETTINGS

#: A file is restored under ``.NAME`` + this + random, then renamed to NAME.
TEMP_MARK = ".blksnap-restore-"


def restore(
    chain: list[BackupInfo],
    device: str,
    target: str,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Rebuild ``device`` from ``chain`` (full first, resolved and read-locked by
    the caller) into ``target``: see :meth:`Repository.restore
    <blksnap.backup.repository.Repository.restore>`."""
    real = os.path.realpath(target)
    record = chain[-1].device(device)
    st = _check_target(target, real, force)
    maps = [read_map(info, info.device(device)) for info in chain]
    data_fds: list[int] = []
    target_fd = -1
    temp: str | None = None
    try:
        for info in chain:
            path = os.path.join(info.path, info.device(device).file + ".data")
            try:
                data_fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise from_oserror(exc, path) from None
        if st is not None and stat.S_ISBLK(st.st_mode):
            target_fd = _open_blockdev(target, real, record.size, device)
            head = bytearray(min(SETTINGS.restore_head, record.size))
            try:  # no valid signature until the very end
                pwrite_full(target_fd, 0, head)
                os.fsync(target_fd)
            except OSError as exc:
                raise from_oserror(exc, f"write {target}") from None
            written, sha = _rebuild(
                chain, maps, data_fds, record, target, target_fd, True, progress, head
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
                chain, maps, data_fds, record, target, target_fd, False, progress
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
        for fd in data_fds:
            os.close(fd)
        if target_fd >= 0:
            os.close(target_fd)
        if temp is not None:
            with suppress(OSError):
                os.unlink(temp)
    return {
        "backup": chain[-1].id,
        "device": device,
        "size": record.size,
        "bytes_written": written,
        "chain": [info.id for info in chain],
        "sha256": sha,
    }


def read_map(info: BackupInfo, record: DeviceRecord) -> np.ndarray:
    """The checked block map of ``record`` (EIO if it does not match the manifest)."""
    where = f"backup {info.id} device {record.name}"
    if not FILE_RE.match(record.file):
        raise IOFailure(f"{where}: bad file name {record.file!r} in manifest")
    path = os.path.join(info.path, record.file + ".map")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data_size = os.stat(os.path.join(info.path, record.file + ".data")).st_size
    except OSError as exc:
        raise from_oserror(exc, where) from None
    if blake3.blake3(raw).hexdigest() != record.map_checksum:
        raise IOFailure(f"{where}: block map checksum mismatch")
    if len(raw) % MAP_DTYPE.itemsize:
        raise IOFailure(f"{where}: block map size is not a multiple of the row size")
    if data_size != record.data_size:
        raise IOFailure(
            f"{where}: data file holds {data_size} bytes, the manifest says {record.data_size}"
        )
    rows = np.frombuffer(raw, dtype=MAP_DTYPE)
    problem = map_structure_problem(rows, record)
    if problem:
        raise IOFailure(f"{where}: {problem}")
    return rows


def _named(target: str, real: str) -> str:
    return target if os.path.abspath(target) == real else f"{target} ({real})"


def _check_target(target: str, real: str, force: bool) -> os.stat_result | None:
    """Refuse a restore target in use (EBUSY) or holding data without ``force``
    (EEXIST); its stat, None if it does not exist yet."""
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


def _rebuild(
    chain: list[BackupInfo],
    maps: list[np.ndarray],
    data_fds: list[int],
    record: DeviceRecord,
    target: str,
    target_fd: int,
    is_blockdev: bool,
    progress: Callable[[int], None] | None,
    head: bytearray | None = None,
) -> tuple[int, str]:
    """Write the device into ``target_fd`` window by window; (bytes written, sha256).
    With ``head``, its first ``len(head)`` bytes go there instead of the target
    (counted as written): the caller writes them last."""
    device, size, bs = record.name, record.size, record.block_size
    count = record.block_count
    # Which chain member holds each block (newest wins), and at which map row.
    source = np.full(count, -1, dtype=np.int32)
    row = np.zeros(count, dtype=np.int64)
    for k, rows in enumerate(maps):
        idx = rows["index"].astype(np.int64)
        source[idx] = k
        row[idx] = np.arange(len(rows), dtype=np.int64)
    missing = np.flatnonzero(source < 0)
    if missing.size:
        raise IOFailure(
            f"device {device}: block {int(missing[0])} is in no backup of the chain"
            f" ({missing.size} blocks missing)"
        )
    zero = np.zeros(count, dtype=bool)
    for k, rows in enumerate(maps):
        mine = source == k
        zero[mine] = (rows["flags"][row[mine]] & FLAG_ZERO) != 0

    window = SETTINGS.restore_window
    window_blocks = max(1, window // bs) if bs else 1
    span = min(window_blocks * bs, size)
    blank = memoryview(bytes(span))
    dctx = zstandard.ZstdDecompressor()
    sha = hashlib.sha256()

    def flush(view: memoryview, w0: int, wbytes: int, wzero: np.ndarray) -> int:
        """Hash a rebuilt window and write it (holes skipped in a file); bytes written."""
        window = view[:wbytes]
        sha.update(window)
        try:
            start = w0 * bs
            if head is not None and start < len(head):
                cut = min(len(head) - start, wbytes)
                head[start : start + cut] = window[:cut]
                if cut < wbytes:
                    pwrite_full(target_fd, start + cut, window[cut:])
                return wbytes
            if is_blockdev or not wzero.any():
                pwrite_full(target_fd, start, window)
                return wbytes
            done = 0
            edges = np.diff(np.concatenate(([0], (~wzero).astype(np.int8), [0])))
            for a, b in zip(
                np.flatnonzero(edges == 1).tolist(),
                np.flatnonzero(edges == -1).tolist(),
                strict=True,
            ):
                lo, hi = a * bs, min(b * bs, wbytes)
                pwrite_full(target_fd, w0 * bs + lo, view[lo:hi])
                done += hi - lo
            return done
        except OSError as exc:
            raise from_oserror(exc, f"write {target}") from None

    # Two window buffers: one thread hashes and writes a window (hashlib and
    # pwrite release the GIL) while this one reads and checks the next.
    views = [memoryview(bytearray(span)) for _ in range(2 if count > window_blocks else 1)]
    pending: list[tuple[Future[int], int] | None] = [None] * len(views)
    written = 0

    def settle(slot: int) -> None:
        nonlocal written
        job = pending[slot]
        if job is not None:
            pending[slot] = None
            written += job[0].result()
            if progress:
                progress(job[1])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blksnap-restore") as pool:
        slot = 0
        for number, w0 in enumerate(range(0, count, window_blocks)):
            slot = number % len(views)
            settle(slot)
            view = views[slot]
            w1 = min(count, w0 + window_blocks)
            wbytes = min(size, w1 * bs) - w0 * bs
            wzero = zero[w0:w1]
            if wzero.any():
                view[:wbytes] = blank[:wbytes]
            wsource = source[w0:w1]
            for k in np.unique(wsource[~wzero]).tolist():
                sel = np.flatnonzero((wsource == k) & ~wzero)
                rows = maps[k][row[w0:w1][sel]]
                _fill_window(
                    view, w0, sel.tolist(), rows, data_fds[k], record, chain[k].id, dctx, window
                )
            pending[slot] = (pool.submit(flush, view, w0, wbytes, wzero), wbytes)
        for other in range(1, len(views) + 1):
            settle((slot + other) % len(views))
    return written, sha.hexdigest()


def _fill_window(
    view: memoryview,
    w0: int,
    sel: list[int],
    rows: np.ndarray,
    fd: int,
    record: DeviceRecord,
    backup_id: str,
    dctx: zstandard.ZstdDecompressor,
    window: int,
) -> None:
    """Read, check and place the stored blocks ``rows`` (window slots ``sel``),
    in reads of at most ``window`` bytes."""
    bs, size = record.block_size, record.size
    offsets = rows["offset"].tolist()
    lengths = rows["length"].tolist()
    flags = rows["flags"].tolist()
    sums = np.ascontiguousarray(rows["checksum"]).tobytes()
    for first, end in runs(offsets, lengths, window):
        base = offsets[first]
        total = offsets[end - 1] + lengths[end - 1] - base
        try:
            raw = pread_upto(fd, base, total)
        except OSError as exc:
            raise from_oserror(exc, f"backup {backup_id} device {record.name}") from None
        if len(raw) != total:
            raise IOFailure(f"backup {backup_id} device {record.name}: data file is short")
        rv = memoryview(raw)
        for j in range(first, end):
            slot = sel[j]
            bi = w0 + slot
            expect = block_length(size, bs, bi)
            a = offsets[j] - base
            blob = rv[a : a + lengths[j]]
            try:
                block = unpack_block(
                    dctx, blob, flags[j], expect, sums[j * DIGEST : (j + 1) * DIGEST]
                )
            except BadBlock as exc:
                where = f"backup {backup_id} device {record.name} block {bi} (offset {bi * bs})"
                raise IOFailure(f"{where}: {exc}") from None
            lo = slot * bs
            view[lo : lo + expect] = block
