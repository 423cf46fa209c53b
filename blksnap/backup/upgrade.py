"""``blksnap repo upgrade``: convert a version 1 repository into a version 2 one.

The version 1 repository is only read (under its read lock); the backups go
into a new directory, or into an empty version 2 repository made beforehand
(``blksnap key create``: the converted backups are then encrypted). Every ok
backup keeps its id, sequence number, times, snapshot id, kinds, parents and
CBT generation and changes number, so the next backup of a device is still
incremental against the newest one. Each device is rebuilt chunk by chunk
from its version 1 chain (every block checked against its blake3) and put
into the chunk store, which stores what it lacks: consecutive backups share
their unchanged chunks.

A backup already present in the new repository is skipped, so an interrupted
upgrade is finished by running it again. Failed and damaged backups are not
converted; the report lists them with why.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from typing import Any

import blake3
import numpy as np
import zstandard

from blksnap.backup import v1format as v1
from blksnap.backup.backends import open_storage
from blksnap.backup.format import (
    DEFAULT_CHUNK_SIZE,
    DeviceRecord,
    chunk_count,
    chunk_length,
)
from blksnap.backup.repository import Repository
from blksnap.errors import InvalidArgument, IOFailure, NotFound, from_oserror
from blksnap.fileio import pread_upto

ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def _no_progress(_desc: str, _total: int) -> Iterator[Callable[[int], None]]:
    yield lambda _n: None


class V1Repository:
    """A version 1 repository, read-only."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            with open(os.path.join(self.path, v1.REPO_FILE), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise NotFound(f"{self.path} is not a blksnap repository") from None
        except OSError as exc:
            raise from_oserror(exc, self.path) from None
        meta = v1.parse_repo_meta(self.path, raw)
        self.compression: str = meta["compression"]

    def backups(self) -> list[v1.BackupInfo]:
        root = os.path.join(self.path, v1.BACKUPS)
        infos = []
        for name in sorted(os.listdir(root)):
            if not v1.ID_RE.match(name):
                continue
            path = os.path.join(root, name)
            try:
                with open(os.path.join(path, v1.MANIFEST), "rb") as f:
                    infos.append(v1.parse_manifest(name, path, f.read()))
            except OSError as exc:
                infos.append(v1.damaged(name, path, f"manifest.json unreadable: {exc.strerror}"))
        infos.sort(key=lambda b: (b.seq, b.id))
        return infos


class V1Device:
    """The contents of one device as of one version 1 backup: its chain
    resolved (newest copy of a block wins), blocks read and checked on demand."""

    def __init__(self, index: dict[str, v1.BackupInfo], info: v1.BackupInfo, name: str) -> None:
        self.chain = v1.resolve_chain(index, info, name)
        self.record = info.device(name)
        count = self.record.block_count
        self.source = np.full(count, -1, dtype=np.int32)
        self.rows: list[np.ndarray] = []
        self.fds: list[int] = []
        self.row = np.zeros(count, dtype=np.int64)
        for k, member in enumerate(self.chain):
            rec = member.device(name)
            rows = self._read_map(member, rec)
            self.rows.append(rows)
            idx = rows["index"].astype(np.int64)
            self.source[idx] = k
            self.row[idx] = np.arange(len(rows), dtype=np.int64)
            data = os.path.join(member.path, rec.file + ".data")
            try:
                self.fds.append(os.open(data, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                self.close()
                raise from_oserror(exc, data) from None
        missing = np.flatnonzero(self.source < 0)
        if missing.size:
            self.close()
            raise IOFailure(f"device {name}: block {int(missing[0])} is in no backup of the chain")
        self.dctx = zstandard.ZstdDecompressor()

    @staticmethod
    def _read_map(info: v1.BackupInfo, record: v1.DeviceRecord) -> np.ndarray:
        where = f"backup {info.id} device {record.name}"
        path = os.path.join(info.path, record.file + ".map")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise from_oserror(exc, where) from None
        if blake3.blake3(raw).hexdigest() != record.map_checksum:
            raise IOFailure(f"{where}: block map checksum mismatch")
        if len(raw) % v1.MAP_DTYPE.itemsize:
            raise IOFailure(f"{where}: block map size is not a multiple of the row size")
        rows = np.frombuffer(raw, dtype=v1.MAP_DTYPE)
        problem = v1.map_structure_problem(rows, record)
        if problem:
            raise IOFailure(f"{where}: {problem}")
        return rows

    def block(self, i: int) -> bytes:
        rec = self.record
        expect = v1.block_length(rec.size, rec.block_size, i)
        k = int(self.source[i])
        row = self.rows[k][int(self.row[i])]
        if int(row["flags"]) & v1.FLAG_ZERO:
            return bytes(expect)
        try:
            blob = pread_upto(self.fds[k], int(row["offset"]), int(row["length"]))
        except OSError as exc:
            raise from_oserror(exc, f"backup {self.chain[k].id} device {rec.name}") from None
        try:
            data = v1.unpack_block(
                self.dctx, memoryview(blob), int(row["flags"]), expect, row["checksum"].tobytes()
            )
        except v1.BadBlock as exc:
            raise IOFailure(
                f"backup {self.chain[k].id} device {rec.name} block {i}: {exc}"
            ) from None
        return bytes(data)

    def read(self, offset: int, length: int) -> bytes:
        bs = self.record.block_size
        out = bytearray()
        first, last = offset // bs, (offset + length - 1) // bs
        for i in range(first, last + 1):
            data = self.block(i)
            lo = max(offset, i * bs) - i * bs
            hi = min(offset + length, i * bs + len(data)) - i * bs
            out += data[lo:hi]
        return bytes(out)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def upgrade(
    old: str,
    new: str,
    *,
    key_file: str | None = None,
    passphrase: bytes | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    endpoint: str | None = None,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Convert the version 1 repository ``old`` into ``new``, a directory or
    ``s3://BUCKET/PREFIX`` (``endpoint``: of an S3-compatible service)
    (module docstring)."""
    progress = progress or _no_progress
    source = V1Repository(old)
    storage = open_storage(new, endpoint=endpoint)
    if Repository.exists(storage):
        target = Repository.open(storage, key_file=key_file, passphrase=passphrase)
    elif key_file is not None or passphrase is not None:
        raise InvalidArgument(
            f"{new} is not a repository yet: make it encrypted first ('blksnap key create"
            f" --repo {new}'), or leave out the key to convert into a new plain one"
        )
    else:
        target = Repository.init(storage, compression=source.compression, chunk_size=chunk_size)
    read_lock = os.path.join(source.path, v1.READ_LOCK)
    lock_fd = -1
    with contextlib.suppress(OSError):
        lock_fd = os.open(read_lock, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(lock_fd, fcntl.LOCK_SH)  # no prune of the old one meanwhile
    report: dict[str, Any] = {
        "from": source.path,
        "to": target.path,
        "converted": 0,
        "skipped": 0,
        "not_converted": [],
        "bytes_stored": 0,
    }
    try:
        infos = source.backups()
        index = {info.id: info for info in infos}
        present = {info.id for info in target.backups()}
        for info in infos:
            if not info.ok:
                why = (info.error or {}).get("message") or info.state
                report["not_converted"].append({"id": info.id, "why": f"{info.state}: {why}"})
                continue
            if info.id in present:
                report["skipped"] += 1
                continue
            report["bytes_stored"] += _convert(target, index, info, progress)
            report["converted"] += 1
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
    return report


def _convert(
    target: Repository,
    index: dict[str, v1.BackupInfo],
    info: v1.BackupInfo,
    progress: ProgressFactory,
) -> int:
    writer = target.begin(info.kind, as_of=(info.id, info.seq, info.started))
    stored = 0
    with writer:
        writer.snapshot_id = info.snapshot_id
        writer.finished = info.finished
        devices = []
        for rec in info.devices:
            device = V1Device(index, info, rec.name)
            devices.append(device)
            writer.add_device(
                DeviceRecord(
                    name=rec.name,
                    size=rec.size,
                    block_size=rec.block_size,
                    generation_id=rec.generation_id,
                    changes_number=rec.changes_number,
                    kind=rec.kind,
                    parent=rec.parent,
                    bytes_read=rec.bytes_read,
                    image_bytes_read=rec.image_bytes_read,
                )
            )
        try:
            cs = target.chunk_size
            for device in devices:
                rec = device.record
                with progress(f"{info.id[-7:]}:{rec.name}"[:20], rec.size) as advance:
                    for i in range(chunk_count(rec.size, cs)):
                        length = chunk_length(rec.size, cs, i)
                        stored += writer.put(rec.name, i, device.read(i * cs, length))
                        advance(length)
        finally:
            for device in devices:
                device.close()
        writer.commit()
    return stored
