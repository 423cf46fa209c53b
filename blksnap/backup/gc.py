"""Garbage collection: remove the chunks that no backup's index names.

Mark and sweep, beside running backups:

1. One gc at a time (``gc.lock``). gc reads the repository file system's own
   clock: the mtime of a file it makes in ``tmp/`` (never the host clock, so a
   repository on another machine's file system is judged by one clock).
2. The *cutoff*: that time minus the grace period (``gc_grace``), or, if a
   backup is running, the time it began (the mtime of ``begun`` in its staging
   dir) minus one second, whichever is earlier.
3. Mark: every digest of every ``*.index`` under ``backups/`` (manifest
   trusted or not: a damaged backup's chunks stay until the backup is pruned).
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
import secrets
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from blksnap.backup.chunkstore import TEMP_PREFIX
from blksnap.backup.format import BEGUN_FILE, DIGEST, GC_LOCK, ID_RE, INDEX_SUFFIX
from blksnap.errors import Busy, from_oserror
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
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


def _store_now(repo: Repository) -> float:
    """Now, by the repository file system's clock."""
    os.makedirs(repo.tmp_dir, mode=0o700, exist_ok=True)
    probe = os.path.join(repo.tmp_dir, f"gc-clock-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with suppress(FileNotFoundError):  # a backup's begin may have cleaned tmp/
            os.unlink(probe)


def _running_since(repo: Repository) -> list[float]:
    """When each running backup began (staging dirs with ``begun``)."""
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


def _marked(repo: Repository) -> tuple[set[bytes], int]:
    """Every digest named by an index under ``backups/``; (digests, indexes read)."""
    seen: set[bytes] = set()
    count = 0
    try:
        backups = [e.path for e in os.scandir(repo.backups_dir) if ID_RE.match(e.name)]
    except FileNotFoundError:
        return seen, 0
    for path in backups:
        try:
            names = [n for n in os.listdir(path) if n.endswith(INDEX_SUFFIX)]
        except FileNotFoundError:
            continue  # pruned meanwhile
        for name in names:
            try:
                with open(os.path.join(path, name), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue
            count += 1
            seen.update(raw[i : i + DIGEST] for i in range(0, len(raw) - DIGEST + 1, DIGEST))
    return seen, count


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
        try:
            now = _store_now(repo)
            running = _running_since(repo)
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
        for fan in store.fanouts():
            doomed = []
            for entry in store.entries(fan):
                name = entry.name
                if name.startswith(TEMP_PREFIX):
                    doomed.append((entry.path, None))
                    continue
                try:
                    digest = bytes.fromhex(name)
                except ValueError:
                    continue  # not ours: left alone
                if len(digest) != DIGEST or not name.startswith(fan):
                    continue
                report.chunks += 1
                if digest not in referenced:
                    doomed.append((entry.path, digest))
            if doomed:
                with store.exclusive():
                    for path, digest in doomed:
                        try:
                            st = os.stat(path)
                        except FileNotFoundError:
                            continue
                        if st.st_mtime >= cutoff:
                            if digest is not None:
                                report.chunks_recent += 1
                            continue
                        if not dry_run:
                            try:
                                os.unlink(path)
                            except FileNotFoundError:
                                continue
                            except OSError as exc:
                                raise from_oserror(exc, f"gc {path}") from None
                        if digest is None:
                            report.temps_removed += 1
                        else:
                            report.chunks_removed += 1
                            report.bytes_removed += st.st_size
            if progress:
                progress(1)
        report.seconds = round(time.monotonic() - started, 3)
        return report
    finally:
        os.close(lock_fd)
