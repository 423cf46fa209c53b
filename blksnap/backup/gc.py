"""Garbage collection: remove the chunks that no backup's index names.

Mark and sweep, beside running backups:

1. One gc at a time (``gc.lock``). gc reads the repository file system's own
   clock: the mtime of a file it makes in ``tmp/`` (never the host clock, so a
   repository on another machine's file system is judged by one clock).
2. The *cutoff*: that time minus the grace period (``gc_grace``), or, if a
   backup is running, the time it began (the mtime of ``begun`` in its staging
   dir) minus one second, whichever is earlier.
3. Mark: every digest of every ``*.index`` under ``backups/`` (manifest
   trusted or not: a damaged backup's chunks stay until the backup is pruned),
   kept by its first 8 bytes (:class:`Marks`: 8 bytes of memory a chunk).
4. Sweep, one fan-out directory at a time, holding ``chunks.lock``
   exclusively: a chunk no index names is removed only if its mtime is before
   the cutoff. Leftover temporary chunk files older than the cutoff go too.

Why nothing a backup needs is removed: a backup holds ``chunks.lock`` shared
while it finds a chunk present (which renews its mtime) or stores it, so gc's
look at a chunk and its removal never straddle a backup's reuse; every chunk
a running backup touched has an mtime after the backup began, hence after the
cutoff; a backup that begins after gc read ``tmp/`` touches its chunks after
gc's own time. The chunks an incremental inherits from its parent's index
without reading them are marked through that index: prune, the only remover of
indexes, cannot run while a backup holds the writer lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from blksnap.backup import objects
from blksnap.backup.digests import SortedSet
from blksnap.backup.format import BACKUPS, BEGUN_FILE, DIGEST, GC_LOCK, ID_RE, INDEX_SUFFIX
from blksnap.backup.storage import TEMP_PREFIX, Entry, Storage
from blksnap.errors import Busy, NotFound, from_oserror
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
    from blksnap.backup.chunkstore import ChunkStore
    from blksnap.backup.repository import Repository


@dataclass
class GcReport:
    """What a gc found and did (or, with ``dry_run``, would do)."""

    dry_run: bool
    cutoff: str  # ISO 8601 UTC: chunks younger than this are kept
    grace: float
    running_backups: int
    indexes: int
    chunks_referenced: int
    chunks: int  # chunk files found
    chunks_removed: int
    bytes_removed: int
    chunks_recent: int  # unreferenced but younger than the cutoff: kept
    temps_removed: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _running_since(repo: Repository) -> list[float]:
    """When each running backup of a directory began (staging dirs with ``begun``)."""
    out = []
    try:
        names = os.listdir(repo.tmp_dir)
    except FileNotFoundError:
        return []
    for name in names:
        try:
            out.append(os.stat(os.path.join(repo.tmp_dir, name, BEGUN_FILE)).st_mtime)
        except OSError:
            pass
    return out


class Marks:
    """The digests the indexes name, as gc keeps them: the first 8 bytes of
    each (a :class:`~blksnap.backup.digests.SortedSet` of ``uint64``).
    Measured with 4 M digests named twice (tracemalloc): 8 bytes a digest
    kept and 27 at the peak of a fold, where a set of the digests took 99
    and 100.

    A lookup by the first 8 bytes can only answer *named* too often, never
    too rarely: a chunk no index names whose digest begins as a named one's
    is kept (for a repository of N chunks, one in 2**64 / N of the
    unnamed), and no named chunk is ever taken for garbage."""

    def __init__(self) -> None:
        self.heads = SortedSet(np.uint64)

    @staticmethod
    def head(digests: bytes) -> np.ndarray:
        """The first 8 bytes of each whole digest in ``digests`` (back to back)."""
        n = len(digests) // DIGEST
        words = np.frombuffer(digests, dtype=np.uint64, count=n * DIGEST // 8)
        return words.reshape(n, DIGEST // 8)[:, 0]

    def add(self, digests: bytes) -> None:
        """Mark the digests of one index (back to back, as an index holds them)."""
        self.heads.add(self.head(digests))

    def named(self, digests: bytes) -> np.ndarray:
        """For each digest in ``digests`` (back to back): may an index name it?"""
        return self.heads.contains(self.head(digests))

    def __len__(self) -> int:
        """How many digests are marked (digests beginning alike count once)."""
        return len(self.heads)


def _marked(repo: Repository) -> tuple[Marks, int]:
    """Every digest named by an index under ``backups/``; (marks, indexes read)."""
    seen = Marks()
    count = 0
    storage = repo.storage
    keys = [
        e.key
        for e in storage.list(BACKUPS + "/")
        if e.key.endswith(INDEX_SUFFIX) and ID_RE.match(e.key.split("/")[1])
    ]
    with ThreadPoolExecutor(storage.parallelism) as pool:
        for raw in pool.map(_get_or_empty(storage), keys):
            if raw is None:
                continue  # pruned meanwhile
            count += 1
            seen.add(raw)
    return seen, count


def _get_or_empty(storage: Storage) -> Callable[[str], bytes | None]:
    def get(key: str) -> bytes | None:
        try:
            return storage.get(key)
        except NotFound:
            return None

    return get


@contextmanager
def _local_guard(repo: Repository) -> Iterator[None]:
    """One gc at a time in a directory: ``gc.lock``."""
    lock_path = os.path.join(repo.path, GC_LOCK)
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise from_oserror(exc, lock_path) from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another gc is running on {repo.path}") from None
        yield
    finally:
        os.close(lock_fd)


def collect(
    repo: Repository,
    *,
    dry_run: bool = False,
    grace: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> GcReport:
    """Run gc on ``repo`` (module docstring); ``progress(1)`` per fan-out directory."""
    grace = SETTINGS.gc_grace if grace is None else float(grace)
    started = time.monotonic()
    storage = repo.storage
    with ExitStack() as stack:
        if repo.local:
            stack.enter_context(_local_guard(repo))
            guard = None
        else:
            guard = stack.enter_context(objects.gc_guard(repo))
        try:
            if guard is None:
                now, running = storage.now(), _running_since(repo)
            else:  # (read with the sessions, once gc's record was made)
                now, running = guard.now, guard.running_since()
        except OSError as exc:
            raise from_oserror(exc, f"gc {repo.path}") from None
        cutoff = now - grace
        if running:
            cutoff = min(cutoff, min(running) - 1.0)
        try:
            referenced, indexes = _marked(repo)
        except OSError as exc:
            raise from_oserror(exc, f"gc {repo.path}: reading the indexes") from None
        store = repo.store
        report = GcReport(
            dry_run=dry_run,
            cutoff=_iso(cutoff),
            grace=grace,
            running_backups=len(running),
            indexes=indexes,
            chunks_referenced=len(referenced),
            chunks=0,
            chunks_removed=0,
            bytes_removed=0,
            chunks_recent=0,
            temps_removed=0,
            seconds=0.0,
        )
        fans = store.fanouts()
        listings: Iterator[list[Entry]]
        if repo.local:  # one directory at a time
            listings = (list(store.entries(f)) for f in fans)
        else:  # the listings of an object store, several requests at once
            lister = ThreadPoolExecutor(store.threads(1), thread_name_prefix="blksnap-gc-list")
            stack.callback(lister.shutdown, cancel_futures=True)
            listings = lister.map(lambda f: list(store.entries(f)), fans)
        for fan, listing in zip(fans, listings, strict=True):
            doomed: list[tuple[str, bytes | None]] = []
            chunks: list[tuple[str, bytes]] = []
            for entry in listing:
                name = entry.key.rsplit("/", 1)[-1]
                if name.startswith(TEMP_PREFIX):
                    doomed.append((entry.key, None))
                    continue
                try:
                    digest = bytes.fromhex(name)
                except ValueError:
                    continue  # not ours: left alone
                if len(digest) != DIGEST or not name.startswith(fan):
                    continue
                chunks.append((entry.key, digest))
            report.chunks += len(chunks)
            if chunks:
                named = referenced.named(b"".join(d for _, d in chunks))
                doomed += [c for c, n in zip(chunks, named.tolist(), strict=True) if not n]
            if doomed:
                with store.exclusive():
                    _sweep(store, doomed, cutoff, dry_run, report, guard)
            if progress:
                progress(1)
        if guard is not None and not dry_run:
            for entry in objects.orphan_indexes(repo, guard, cutoff):
                storage.delete(entry.key)
        report.seconds = round(time.monotonic() - started, 3)
        return report


def _sweep(
    store: ChunkStore,
    doomed: list[tuple[str, bytes | None]],
    cutoff: float,
    dry_run: bool,
    report: GcReport,
    guard: objects.GcGuard | None = None,
) -> None:
    """Remove the ``doomed`` objects still older than ``cutoff`` (each looked at
    again just before: a backup may have renewed it since the listing)."""
    storage = store.storage

    def one(item: tuple[str, bytes | None]) -> tuple[bytes | None, int] | None:
        key, digest = item
        if guard is not None:
            guard.check_alive()
        entry = storage.stat(key)
        if entry is None:
            return None
        if entry.mtime >= cutoff:
            return (digest, -1)
        if not dry_run:
            storage.delete(key)
        return (digest, entry.size)

    with ThreadPoolExecutor(store.threads(1)) as pool:
        for result in pool.map(one, doomed):
            if result is None:
                continue
            digest, size = result
            if size < 0:
                if digest is not None:
                    report.chunks_recent += 1
            elif digest is None:
                report.temps_removed += 1
            else:
                report.chunks_removed += 1
                report.bytes_removed += size
