"""Verify: check the backups of a repository against their manifests, block by block.

:meth:`blksnap.backup.repository.Repository.verify` lists the backups under
its read lock; this module checks each one by the rules of
:mod:`blksnap.backup.format` and reports every :class:`Problem` it finds
instead of stopping at the first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import numpy as np
import zstandard

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
    resolve_chain,
    runs,
    unpack_block,
    zero_digest,
)
from blksnap.errors import BlksnapError
from blksnap.fileio import pread_upto

#: Verify reads the data file in pieces of about this size.
VERIFY_CHUNK = 8 << 20
#: Verify reports at most this many block problems per device, then a summary.
MAX_BLOCK_PROBLEMS = 50


@dataclass
class Problem:
    """One finding of :meth:`Repository.verify`."""

    backup: str
    device: str | None
    block: int | None
    offset: int | None  # byte offset of the block in the device
    message: str

    def __str__(self) -> str:
        where = f"backup {self.backup}"
        if self.device is not None:
            where += f" device {self.device}"
        if self.block is not None:
            where += f" block {self.block}"
            if self.offset is not None:
                where += f" (offset {self.offset})"
        return f"{where}: {self.message}"


def verify(
    infos: list[BackupInfo],
    targets: list[BackupInfo] | None,
    progress: Callable[[int], None] | None = None,
) -> list[Problem]:
    """What is wrong with ``targets`` (None: every backup of ``infos``, the
    whole repository, that is not failed); see :meth:`Repository.verify
    <blksnap.backup.repository.Repository.verify>`."""
    index = {info.id: info for info in infos}
    if targets is None:
        targets = [info for info in infos if info.state != "failed"]
    problems: list[Problem] = []
    for info in targets:
        if info.state == "damaged":
            message = info.error["message"] if info.error else "manifest damaged"
            problems.append(Problem(info.id, None, None, None, message))
            continue
        if info.state == "failed":
            problems.append(Problem(info.id, None, None, None, "backup failed: it holds no data"))
            continue
        if not info.devices:
            problems.append(Problem(info.id, None, None, None, "backup has no device"))
        for record in info.devices:
            problems.extend(_verify_device(index, info, record, progress))
    return problems


def _verify_device(
    index: dict[str, BackupInfo],
    info: BackupInfo,
    record: DeviceRecord,
    progress: Callable[[int], None] | None,
) -> list[Problem]:
    problems: list[Problem] = []

    def problem(message: str, block: int | None = None) -> None:
        offset = None if block is None else block * record.block_size
        problems.append(Problem(info.id, record.name, block, offset, message))

    if record.kind != "full":
        try:
            resolve_chain(index, info, record.name)
        except BlksnapError as exc:
            problem(f"chain broken: {exc.message}")
    if record.block_size <= 0 or record.size < 0:
        problem(f"bad geometry: size {record.size}, block size {record.block_size}")
        return problems
    if not FILE_RE.match(record.file):
        problem(f"bad file name {record.file!r} in manifest")
        return problems
    map_path = os.path.join(info.path, record.file + ".map")
    data_path = os.path.join(info.path, record.file + ".data")
    try:
        with open(map_path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        problem(f"block map unreadable: {exc.strerror}")
        return problems
    if blake3.blake3(raw).hexdigest() != record.map_checksum:
        problem("block map checksum mismatch")
    if len(raw) % MAP_DTYPE.itemsize:
        problem("block map size is not a multiple of the row size")
        return problems
    rows = np.frombuffer(raw, dtype=MAP_DTYPE)
    structure = map_structure_problem(rows, record)
    if structure:
        problem(structure)
    if record.blocks_stored != len(rows):
        problem(f"manifest says {record.blocks_stored} blocks stored, the map has {len(rows)}")
    zero = (rows["flags"] & FLAG_ZERO) != 0
    if record.blocks_zero != int(zero.sum()):
        problem(f"manifest says {record.blocks_zero} zero blocks, the map has {zero.sum()}")
    try:
        fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        problem(f"data file unreadable: {exc.strerror}")
        return problems
    try:
        file_size = os.fstat(fd).st_size
        if file_size != record.data_size:
            problem(f"data file holds {file_size} bytes, the manifest says {record.data_size}")
        _verify_blobs(fd, file_size, rows, zero, record, problem, progress)
    except OSError as exc:
        problem(f"data file read error: {exc.strerror}")
    finally:
        os.close(fd)
    return problems


def _verify_blobs(
    fd: int,
    file_size: int,
    rows: np.ndarray,
    zero: np.ndarray,
    record: DeviceRecord,
    problem: Callable[..., None],
    progress: Callable[[int], None] | None,
) -> None:
    bs, size = record.block_size, record.size
    block_count = record.block_count
    found = 0
    # Zero rows: nothing stored, the checksum must be that of a zero block.
    zero_idx = rows["index"][zero].tolist()
    zero_sums = np.ascontiguousarray(rows["checksum"][zero]).tobytes()
    for j, bi in enumerate(zero_idx):
        if bi >= block_count:
            continue  # reported by the structure check
        if zero_sums[j * DIGEST : (j + 1) * DIGEST] != zero_digest(block_length(size, bs, bi)):
            found += 1
            if found <= MAX_BLOCK_PROBLEMS:
                problem("zero block with a wrong checksum", bi)
    data = rows[~zero]
    oversized = data["length"] > bs
    for bi in data["index"][oversized].tolist():
        found += 1
        if found <= MAX_BLOCK_PROBLEMS:
            problem("stored length is larger than a block", bi if bi < block_count else None)
    data = data[~oversized]
    order = np.argsort(data["offset"], kind="stable")
    data = data[order]
    indices = data["index"].tolist()
    offsets = data["offset"].tolist()
    lengths = data["length"].tolist()
    flags = data["flags"].tolist()
    sums = np.ascontiguousarray(data["checksum"]).tobytes()
    dctx = zstandard.ZstdDecompressor()
    for first, end in runs(offsets, lengths, VERIFY_CHUNK):
        base = offsets[first]
        total = offsets[end - 1] + lengths[end - 1] - base
        raw = pread_upto(fd, base, max(0, min(total, file_size - base)))
        view = memoryview(raw)
        for j in range(first, end):
            bi = indices[j]
            message = None
            if bi >= block_count:
                continue  # reported by the structure check
            expect = block_length(size, bs, bi)
            a = offsets[j] - base
            if a + lengths[j] > len(raw):
                message = "stored data is past the end of the data file"
            else:
                digest = sums[j * DIGEST : (j + 1) * DIGEST]
                try:
                    unpack_block(dctx, view[a : a + lengths[j]], flags[j], expect, digest)
                except BadBlock as exc:
                    message = str(exc)
            if message:
                found += 1
                if found <= MAX_BLOCK_PROBLEMS:
                    problem(message, bi)
        if progress:
            progress(total)
    if found > MAX_BLOCK_PROBLEMS:
        problem(f"{found - MAX_BLOCK_PROBLEMS} more bad blocks not listed")
