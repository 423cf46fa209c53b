"""Verify: check the backups of a repository against their manifests, chunk by chunk.

:meth:`blksnap.backup.repository.Repository.verify` lists the backups under
its read lock; this module checks each one by the rules of
:mod:`blksnap.backup.format` (manifest, index size and checksum) and then
every chunk their indexes name, once each however many backups share it:
present, a chunk file of this repository, its seal opens, it decompresses to
the right length and its digest is its name. It reports every
:class:`Problem` it finds instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from blksnap.backup.digests import SortedSet
from blksnap.backup.format import BackupInfo, chunk_length
from blksnap.errors import BlksnapError
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
    from blksnap.backup.repository import Repository

#: Verify reports at most this many chunk problems per device, then a summary.
MAX_CHUNK_PROBLEMS = 50


@dataclass
class Problem:
    """One finding of :meth:`Repository.verify`."""

    backup: str
    device: str | None
    chunk: int | None
    offset: int | None  # byte offset of the chunk in the device
    message: str
    digest: str | None = None  # the chunk's name in the store
    object: str | None = None  # where it is: its file, or its object's URL

    def __str__(self) -> str:
        where = f"backup {self.backup}"
        if self.device is not None:
            where += f" device {self.device}"
        if self.chunk is not None:
            where += f" chunk {self.chunk}"
            if self.offset is not None:
                where += f" (offset {self.offset})"
        if self.object is not None:
            where += f" [{self.object}]"
        elif self.digest is not None:
            where += f" [{self.digest[:16]}]"
        return f"{where}: {self.message}"


def verify(
    repo: Repository,
    infos: list[BackupInfo],
    targets: list[BackupInfo] | None,
    progress: Callable[[int], None] | None = None,
) -> list[Problem]:
    """What is wrong with ``targets`` (None: every backup of ``infos``, the
    whole repository, that is not failed); see :meth:`Repository.verify
    <blksnap.backup.repository.Repository.verify>`."""
    if targets is None:
        targets = [info for info in infos if info.state != "failed"]
    problems: list[Problem] = []
    store = repo.store
    # Every distinct non-zero chunk, with the length it must have; and the
    # devices whose index could be read, in order (read again only to name
    # the bad chunks: never every index in memory at once).
    wanted = _Wanted()
    readable: list[tuple[BackupInfo, str]] = []
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
            try:
                digests = repo.read_index(info, record.name)
            except BlksnapError as exc:
                problems.append(Problem(info.id, record.name, None, None, exc.message))
                continue
            readable.append((info, record.name))
            wanted.add(digests, record.size, record.chunk_size, store.zero_digest)

    def check(item: tuple[bytes, int]) -> tuple[bytes, int, str | None]:
        digest, length = item
        try:
            store.read(digest, length)
            return digest, length, None
        except BlksnapError as exc:
            prefix = f"chunk {digest.hex()}"
            text = exc.message
            return digest, length, text[len(prefix) + 2 :] if text.startswith(prefix) else text

    bad: dict[bytes, str] = {}
    with ThreadPoolExecutor(
        max_workers=store.threads(SETTINGS.restore_threads), thread_name_prefix="blksnap-verify"
    ) as pool:
        for digests, lengths in wanted.result():  # (bounded: not a future per chunk at once)
            items = zip(digests, lengths, strict=True)
            for digest, length, message in pool.map(check, items):
                if message is not None:
                    bad[digest] = message
                if progress:
                    progress(length)

    if bad:
        problems += _where(repo, readable, bad)
    return problems


class _Wanted:
    """The distinct digests of the indexes read so far, but the zero
    chunks' (never stored), each with the length its chunk must have, in
    the order they were first named (the order the backups wrote them: on a
    disk, close to where they lie): a
    :class:`~blksnap.backup.digests.SortedSet` of ``V32`` with the first
    position and the length as payload. Measured with 4 M digests named
    twice (tracemalloc): 52 bytes a digest kept (with the reading order)
    and 95 at the peak of a fold, where the dict of them this replaced took
    107 and 108 (with 1 M), and every index was held besides."""

    def __init__(self) -> None:
        self._set = SortedSet("V32", np.int64, np.int32)
        self._seen = 0  # index entries so far: the next one's position

    def add(
        self, index: np.ndarray, size: int, chunk_size: int, zero: Callable[[int], bytes]
    ) -> None:
        """The digests of one device's ``index`` (``(n, 32)`` uint8) of
        ``size`` bytes in chunks of ``chunk_size``; ``zero(length)``: the
        digest of that many zero bytes."""
        rows = np.ascontiguousarray(index).view("V32").ravel()
        n = len(rows)
        if not n:
            return
        lengths = np.full(n, chunk_size, dtype=np.int32)
        lengths[-1] = chunk_length(size, chunk_size, n - 1)
        keep = rows != _row(zero(chunk_size))
        if lengths[-1] != chunk_size:  # (a short last chunk: its own zero digest)
            keep[-1] = rows[-1] != _row(zero(int(lengths[-1])))
        at = np.arange(self._seen, self._seen + n, dtype=np.int64)
        self._seen += n
        self._set.add(rows[keep], at[keep], lengths[keep])

    def result(self) -> Iterator[tuple[list[bytes], list[int]]]:
        """(digests, lengths) by batches of 1024, in the order they were
        first named."""
        first, lengths = self._set.payload
        digests, order = self._set.values, np.argsort(first)
        for k in range(0, len(order), 1024):
            part = order[k : k + 1024]
            yield [d.tobytes() for d in digests[part]], lengths[part].tolist()


def _row(digest: bytes) -> np.void:
    return np.frombuffer(digest, dtype="V32")[0]


def _where(
    repo: Repository, readable: list[tuple[BackupInfo, str]], bad: dict[bytes, str]
) -> list[Problem]:
    """The problems of the ``bad`` chunks, by backup, device and chunk
    number (each index read again)."""
    store = repo.store
    bad_rows = SortedSet("V32")
    bad_rows.add(np.frombuffer(b"".join(bad), dtype="V32"))
    problems: list[Problem] = []
    for info, name in readable:
        record = info.device(name)
        try:
            rows = np.ascontiguousarray(repo.read_index(info, name)).view("V32").ravel()
        except BlksnapError as exc:
            problems.append(Problem(info.id, name, None, None, exc.message))
            continue
        hits = np.flatnonzero(bad_rows.contains(rows))
        for i in hits[:MAX_CHUNK_PROBLEMS].tolist():
            digest = rows[i].tobytes()
            problems.append(
                Problem(
                    info.id,
                    name,
                    i,
                    i * record.chunk_size,
                    bad[digest],
                    digest.hex(),
                    store.path(digest),
                )
            )
        if len(hits) > MAX_CHUNK_PROBLEMS:
            found = len(hits)
            problems.append(
                Problem(
                    info.id,
                    name,
                    None,
                    None,
                    f"{found - MAX_CHUNK_PROBLEMS} more bad chunks not listed ({found} in all)",
                )
            )
    return problems
