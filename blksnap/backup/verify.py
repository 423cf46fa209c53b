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

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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
    # (backup, device, index) of every device that could be read, in order.
    readable: list[tuple[BackupInfo, str, np.ndarray]] = []
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
                readable.append((info, record.name, repo.read_index(info, record.name)))
            except BlksnapError as exc:
                problems.append(Problem(info.id, record.name, None, None, exc.message))

    # Every distinct non-zero chunk, with the length it must have.
    store = repo.store
    wanted: dict[bytes, int] = {}
    for info, name, digests in readable:
        record = info.device(name)
        for i, raw in enumerate(digests):
            digest = raw.tobytes()
            length = chunk_length(record.size, record.chunk_size, i)
            if digest == store.zero_digest(length) or digest in wanted:
                continue
            wanted[digest] = length

    def check(item: tuple[bytes, int]) -> tuple[bytes, str | None]:
        digest, length = item
        try:
            store.read(digest, length)
            return digest, None
        except BlksnapError as exc:
            prefix = f"chunk {digest.hex()}"
            text = exc.message
            return digest, text[len(prefix) + 2 :] if text.startswith(prefix) else text

    bad: dict[bytes, str] = {}
    with ThreadPoolExecutor(
        max_workers=store.threads(SETTINGS.restore_threads), thread_name_prefix="blksnap-verify"
    ) as pool:
        items = list(wanted.items())
        for k in range(0, len(items), 1024):  # bounded: not a future per chunk at once
            for digest, message in pool.map(check, items[k : k + 1024]):
                if message is not None:
                    bad[digest] = message
                if progress:
                    progress(wanted[digest])

    for info, name, digests in readable:
        if not bad:
            break
        record = info.device(name)
        found = 0
        for i, raw in enumerate(digests):
            message = bad.get(raw.tobytes())
            if message is None:
                continue
            found += 1
            if found <= MAX_CHUNK_PROBLEMS:
                problems.append(
                    Problem(
                        info.id,
                        name,
                        i,
                        i * record.chunk_size,
                        message,
                        raw.tobytes().hex(),
                        store.path(raw.tobytes()),
                    )
                )
        if found > MAX_CHUNK_PROBLEMS:
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
