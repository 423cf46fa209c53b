"""The repository: a directory of backups; open it, list and read backups, prune.

A repository is a plain directory. Each finished backup is one directory
under ``backups/`` holding a JSON manifest and, per device, a data file (the
stored blocks back to back, optionally zstd-compressed) and a block map (a
raw little-endian numpy array, one row per stored block, with the blake3
checksum of the block). A backup is staged under ``tmp/`` and published with
one ``rename`` (:mod:`blksnap.backup.writer`), so a crash never leaves a half
backup that looks whole.

Incremental and differential backups store only the blocks the change-block
tracking (CBT) reported; a device record names its parent backup, and a
restore (:mod:`blksnap.backup.restore`) replays the chain full -> ... ->
newest, the newest copy of a block winning. The exact on-disk format is
described in ``docs/REPOSITORY.md`` and spoken by :mod:`blksnap.backup.format`.

Locks (``flock``): ``lock`` serializes writers (a backup from ``begin`` to
``commit``/``fail``/``abort``, and ``prune``); ``read.lock`` is held shared by
readers (``restore``, ``verify``) and exclusively by ``prune``, the only
operation that removes published backups. So a restore or a verify runs
while a backup is being written, and a backup can start while a verify runs.

This module has no user interface: progress is reported through callbacks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from blksnap.backup import restore as _restore
from blksnap.backup import verify as _verify
from blksnap.backup.format import (
    BACKUPS,
    COMPRESSIONS,
    ID_RE,
    INIT_LEFTOVERS,
    KINDS,
    MANIFEST,
    READ_LOCK,
    REPO_FILE,
    SNAPSHOT_FILE,
    TMP,
    WRITE_LOCK,
    BackupInfo,
    damaged,
    now,
    parse_manifest,
    parse_repo_meta,
    repo_meta,
    resolve_chain,
)
from blksnap.backup.verify import Problem
from blksnap.backup.writer import BackupWriter, remove_tree, write_file
from blksnap.errors import Busy, Exists, InvalidArgument, NotFound, from_oserror
from blksnap.fileio import fsync_dir

log = logging.getLogger("blksnap.backup.repo")  # the name its lines have always had


def _flock(path: str, mode: int, blocking: bool, busy: str) -> int:
    """Open ``path`` (created if missing) and ``flock`` it; the fd holds the lock.

    -1 (no lock needed) for a shared lock on a read-only file system that lacks
    the lock file: nobody can change that repository.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise from_oserror(exc, path) from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if exc.errno == errno.EROFS and mode == fcntl.LOCK_SH:
                return -1
            raise from_oserror(exc, path) from None
        except OSError as exc2:
            raise from_oserror(exc2, path) from None
    try:
        fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise Busy(busy) from None
    except OSError as exc:
        os.close(fd)
        raise from_oserror(exc, f"lock {path}") from None
    return fd


# ---------------------------------------------------------------------------
# the repository


class Repository:
    """A backup repository directory (see the module docstring)."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.compression: str = meta["compression"]
        self.created: str = meta.get("created", "")
        self.backups_dir = os.path.join(path, BACKUPS)
        self.tmp_dir = os.path.join(path, TMP)

    def __repr__(self) -> str:
        return f"<Repository {self.path} compression={self.compression}>"

    # -- creation -----------------------------------------------------------

    @classmethod
    def init(cls, path: str, compression: str = "zstd") -> Repository:
        """Make ``path`` a repository (``mkdir -p``), or open it if it already is one.

        An existing repository keeps its own compression.
        """
        if compression not in COMPRESSIONS:
            raise InvalidArgument(
                f"unknown compression {compression!r} (one of: {', '.join(COMPRESSIONS)})"
            )
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, REPO_FILE)):
            return cls.open(path)
        try:
            if os.path.lexists(path):
                if not os.path.isdir(path):
                    raise Exists(f"{path} exists and is not a directory")
                entries = set(os.listdir(path))
                backups = os.path.join(path, BACKUPS)
                if not entries <= INIT_LEFTOVERS or (
                    os.path.isdir(backups) and os.listdir(backups)
                ):
                    raise Exists(f"{path} is not empty and is not a blksnap repository")
            else:
                os.makedirs(path, mode=0o700)
            for sub in (BACKUPS, TMP):
                os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
            for name in (WRITE_LOCK, READ_LOCK):
                os.close(
                    os.open(
                        os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
                    )
                )
            meta = repo_meta(compression)
            staged = os.path.join(path, REPO_FILE + ".tmp")
            write_file(staged, json.dumps(meta, indent=2).encode() + b"\n")
            os.rename(staged, os.path.join(path, REPO_FILE))
            fsync_dir(path)
        except OSError as exc:
            raise from_oserror(exc, f"init repository {path}") from None
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> Repository:
        path = os.path.abspath(path)
        meta_path = os.path.join(path, REPO_FILE)
        try:
            with open(meta_path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{path} is not a blksnap repository (no {REPO_FILE})") from None
        except OSError as exc:
            raise from_oserror(exc, meta_path) from None
        return cls(path, parse_repo_meta(path, raw))

    # -- locks --------------------------------------------------------------

    def _write_lock(self, blocking: bool = True) -> int:
        return _flock(
            os.path.join(self.path, WRITE_LOCK),
            fcntl.LOCK_EX,
            blocking,
            f"another backup or prune is running on {self.path}",
        )

    @contextmanager
    def _read_lock(self, exclusive: bool = False) -> Iterator[None]:
        fd = _flock(
            os.path.join(self.path, READ_LOCK),
            fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH,
            True,
            f"{self.path} is busy",
        )
        try:
            yield
        finally:
            if fd >= 0:
                os.close(fd)

    def _clean_tmp(self) -> list[str]:
        """Remove what crashed writers and prunes left in ``tmp/`` (writer lock
        held, so they are dead); the snapshot ids their staging dirs name."""
        try:
            entries = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
            return []
        snapshots = []
        for name in entries:
            try:
                with open(os.path.join(self.tmp_dir, name, SNAPSHOT_FILE)) as f:
                    sid = f.read().strip()
                if re.fullmatch(r"[0-9A-Za-z-]{1,64}", sid):
                    snapshots.append(sid)
            except OSError:
                pass
            log.info("%s: removing stale %s", self.path, name)
            try:
                remove_tree(os.path.join(self.tmp_dir, name))
            except OSError as exc:
                log.warning("%s: cannot remove tmp/%s: %s", self.path, name, exc)
        return snapshots

    # -- listing ------------------------------------------------------------

    def _load(self, backup_id: str) -> BackupInfo | None:
        """The backup ``backup_id`` (damaged if its manifest is bad), None if absent."""
        path = os.path.join(self.backups_dir, backup_id)
        try:
            with open(os.path.join(path, MANIFEST), "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.isdir(path):
                return None  # never there, or removed by a prune meanwhile
            return damaged(backup_id, path, "manifest.json is missing")
        except OSError as exc:
            return damaged(backup_id, path, f"manifest.json unreadable: {exc.strerror}")
        return parse_manifest(backup_id, path, raw)

    def backups(self) -> list[BackupInfo]:
        """Every published backup (ok, failed, damaged), oldest first (by seq)."""
        try:
            names = [e.name for e in os.scandir(self.backups_dir) if ID_RE.match(e.name)]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise from_oserror(exc, self.backups_dir) from None
        infos = [info for info in map(self._load, names) if info is not None]
        infos.sort(key=lambda b: (b.seq, b.id))
        return infos

    def get(self, backup_id: str) -> BackupInfo:
        """The backup ``backup_id``; ``"latest"`` is the newest ok backup."""
        if backup_id == "latest":
            for info in reversed(self.backups()):
                if info.ok:
                    return info
            raise NotFound(f"no usable backup in {self.path}")
        info = self._load(backup_id) if ID_RE.match(backup_id) else None
        if info is None:
            raise NotFound(f"no backup {backup_id} in {self.path}")
        return info

    def latest(
        self, device: str, kinds: tuple[str, ...] = ("full", "incremental", "differential")
    ) -> BackupInfo | None:
        """The newest ok backup holding ``device`` with a record of one of ``kinds``."""
        for info in reversed(self.backups()):
            if not info.ok:
                continue
            for record in info.devices:
                if record.name == device and record.kind in kinds:
                    return info
        return None

    def chain(self, backup_id: str, device: str) -> list[BackupInfo]:
        """The backups a restore of ``device`` as of ``backup_id`` reads: full first."""
        start = self.get(backup_id)
        index = {info.id: info for info in self.backups()}
        return resolve_chain(index, start, device)

    def block_digests(self, backup_id: str, device: str) -> np.ndarray:
        """The blake3 of every block of ``device`` as of ``backup_id`` (its
        chain resolved, newest wins): ``(block_count, 32)`` uint8."""
        chain = self.chain(backup_id, device)
        record = chain[-1].device(device)
        out = np.zeros((record.block_count, 32), dtype=np.uint8)
        for info in chain:
            rows = _restore.read_map(info, info.device(device))
            out[rows["index"].astype(np.int64)] = rows["checksum"]
        return out

    # -- writing ------------------------------------------------------------

    def _new_id(self) -> tuple[str, str]:
        base, started = now()
        candidate = base
        n = 2
        while os.path.lexists(os.path.join(self.backups_dir, candidate)) or os.path.lexists(
            os.path.join(self.tmp_dir, candidate)
        ):
            candidate = f"{base}-{n}"
            n += 1
        return candidate, started

    def begin(
        self, kind: str, snapshot_id: str | None = None, *, blocking: bool = True
    ) -> BackupWriter:
        """Start a backup: take the writer lock (wait, or EBUSY with ``blocking=False``)."""
        if kind not in KINDS:
            raise InvalidArgument(f"unknown backup kind {kind!r} (one of: {', '.join(KINDS)})")
        lock_fd = self._write_lock(blocking)
        try:
            abandoned = self._clean_tmp()
            infos = self.backups()
            seq = 1 + max((info.seq for info in infos), default=0)
            backup_id, started = self._new_id()
            staging = os.path.join(self.tmp_dir, backup_id)
            os.makedirs(self.backups_dir, mode=0o700, exist_ok=True)
            os.mkdir(staging, 0o700)
        except OSError as exc:
            os.close(lock_fd)
            raise from_oserror(exc, f"begin backup in {self.path}") from None
        except BaseException:
            os.close(lock_fd)
            raise
        return BackupWriter(
            self,
            backup_id=backup_id,
            seq=seq,
            kind=kind,
            snapshot_id=snapshot_id,
            started=started,
            staging=staging,
            lock_fd=lock_fd,
            index={info.id: info for info in infos},
            abandoned_snapshots=abandoned,
        )

    # -- reading ------------------------------------------------------------

    def restore(
        self,
        backup_id: str,
        device: str,
        target: str,
        progress: Callable[[int], None] | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Rebuild ``device`` as of ``backup_id`` into ``target`` (symlinks
        resolved): a regular file (zero blocks left as holes) or a block device
        at least as large (zero blocks written). ``progress(n)`` is called as
        the device is rebuilt: the ``n`` sum to the device size (holes included).

        A target in use (:func:`blksnap.inuse.users_of`: open by a process,
        attached to a loop device, served by blksnapd, mounted, held, or not
        openable exclusively) is refused with ``EBUSY``, ``force`` or not. An
        existing regular file of non-zero size, or any block device, is
        overwritten only with ``force`` (else ``EEXIST``).

        A failed restore leaves nothing that looks complete: a file is written
        to a temporary name in the target's directory and renamed over the
        target only when all of it is written and synced (the temporary is
        removed on failure); on a block device the first ``restore_head`` bytes
        (:mod:`blksnap.settings`) are zeroed first and written last, so a
        half-restored device has no valid file-system signature."""
        with self._read_lock():
            chain = self.chain(backup_id, device)
            return _restore.restore(chain, device, target, progress, force)

    def verify(
        self, backup_id: str | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Problem]:
        """Check every ok or damaged backup (or just ``backup_id``) and return what
        is wrong (an empty list: all good). ``progress(n)`` is called with the
        data-file bytes checked: they sum to the ``data_size`` of the checked
        device records."""
        with self._read_lock():
            infos = self.backups()
            targets = [self.get(backup_id)] if backup_id is not None else None
            return _verify.verify(infos, targets, progress)

    # -- prune --------------------------------------------------------------

    def prune(self, keep: int, dry_run: bool = False) -> list[str]:
        """Keep the newest ``keep`` ok backups and every backup their chains refer
        to; remove the other ok backups and the failed or damaged backups older
        than the oldest of those ``keep``. Returns the removed ids, oldest first."""
        if not isinstance(keep, int) or keep < 1:
            raise InvalidArgument(f"prune must keep at least one backup (keep={keep})")
        lock_fd = -1 if dry_run else self._write_lock(True)
        try:
            with nullcontext() if dry_run else self._read_lock(exclusive=True):
                infos = self.backups()
                index = {info.id: info for info in infos}
                ok = [info for info in infos if info.ok]
                if not ok:
                    return []
                heads = ok[-keep:]
                window = heads[0].seq
                kept: set[str] = set()
                stack = list(heads)
                while stack:
                    info = stack.pop()
                    if info.id in kept:
                        continue
                    kept.add(info.id)
                    for record in info.devices:
                        if record.parent is not None and record.parent in index:
                            stack.append(index[record.parent])
                doomed = [
                    info for info in infos if info.id not in kept and (info.ok or info.seq < window)
                ]
                if not dry_run and doomed:
                    self._remove(doomed)
                return [info.id for info in doomed]
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)

    def _remove(self, doomed: list[BackupInfo]) -> None:
        """Unpublish (rename into tmp/, one fsync) and then delete backups."""
        self._clean_tmp()
        moved = []
        try:
            for info in doomed:
                dest = os.path.join(self.tmp_dir, info.id + ".pruned")
                os.rename(info.path, dest)
                moved.append(dest)
        except OSError as exc:
            raise from_oserror(exc, f"prune {self.path}") from None
        finally:
            if moved:
                try:
                    fsync_dir(self.backups_dir)
                except OSError as exc:
                    log.warning("%s: fsync backups/: %s", self.path, exc)
        for dest in moved:
            try:
                remove_tree(dest)
            except OSError as exc:
                log.warning("%s: cannot remove %s (next writer will): %s", self.path, dest, exc)
