"""The repository: a directory of backups sharing one chunk store; open it,
list and read backups, prune, gc.

A repository is a plain directory. Devices are cut into fixed-size chunks
(``chunk_size`` of ``REPO.json``); each chunk is stored once in the chunk store
(:mod:`blksnap.backup.chunkstore`) under its digest, whichever backup or
device it came from. Each finished backup is one directory under
``backups/`` holding a JSON manifest and, per device, an index: the digest of
every chunk of the device, in order. Every index is whole, so a restore reads
one index, and removing a backup never breaks another; an incremental
reads only the chunks the CBT says changed and copies the other digests from
its parent's index. A backup is staged under ``tmp/`` and published with one
``rename`` (:mod:`blksnap.backup.writer`), so a crash never leaves a half
backup that looks whole. The exact format is ``docs/REPOSITORY.md``, spoken by
:mod:`blksnap.backup.format`; encryption is :mod:`blksnap.backup.crypto`.

Locks (``flock``): ``lock`` serializes writers (a backup from ``begin`` to
``commit``/``fail``/``abort``, and ``prune``); ``read.lock`` is held shared by
readers (``restore``, ``verify``) and exclusively by ``prune``, the only
operation that removes published backups; ``chunks.lock`` and ``gc.lock`` are
gc's (:mod:`blksnap.backup.gc`). So a restore or a verify runs while a backup
is being written, a backup can start while a verify runs, and gc runs beside
backups.

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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any
from urllib.parse import quote

import numpy as np

from blksnap.backup import gc as _gc
from blksnap.backup import objects, retention
from blksnap.backup import restore as _restore
from blksnap.backup import verify as _verify
from blksnap.backup.backends import open_storage
from blksnap.backup.chunkstore import ChunkStore, syncfs
from blksnap.backup.crypto import Keys, create_encryption, open_keys, passphrase_from_env
from blksnap.backup.format import (
    BACKUPS,
    BEGUN_FILE,
    CHUNKS,
    COMPRESSIONS,
    DEFAULT_CHUNK_SIZE,
    DIGEST,
    ID_RE,
    INDEX_SUFFIX,
    INIT_LEFTOVERS,
    KINDS,
    MANIFEST,
    READ_LOCK,
    REPO_FILE,
    SNAPSHOT_FILE,
    TMP,
    WRITE_LOCK,
    BackupInfo,
    check_chunk_size,
    damaged,
    now,
    parse_manifest,
    parse_repo_meta,
    repo_meta,
)
from blksnap.backup.storage import DirStorage, NoBucket, Storage, TrafficCount
from blksnap.backup.verify import Problem
from blksnap.backup.writer import BackupWriter, remove_tree, write_file
from blksnap.errors import (
    BlksnapError,
    Busy,
    Exists,
    InvalidArgument,
    IOFailure,
    NotFound,
    from_oserror,
)
from blksnap.fileio import fsync_dir
from blksnap.settings import SETTINGS

log = logging.getLogger("blksnap.backup.repo")  # the name its lines have always had

#: Where generation links live (:meth:`Repository.link_generation`).
LINKS = "links"
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


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


def _time_or_epoch(info: BackupInfo) -> Any:
    """When a failed or damaged backup began (its id says, if its manifest cannot)."""
    try:
        return retention.parse_backup_time(info.id, info.started or None)
    except InvalidArgument:
        return retention.parse_backup_time("19700101T000000Z", None)


class ReadHold:
    """What keeps a repository held for reading: a locked fd (a directory) or
    a renewed reader record (an object store); ``close()`` lets go."""

    def __init__(self, fd: int = -1, record: objects.Record | None = None) -> None:
        self.fd = fd
        self.record = record

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        record, self.record = self.record, None
        if record is not None:
            record.close()


# ---------------------------------------------------------------------------
# the repository


class Repository:
    """A backup repository: a directory, or a prefix of an object store
    bucket (see the module docstring and :mod:`blksnap.backup.objects`)."""

    def __init__(self, storage: Storage | str, meta: dict[str, Any], keys: Keys) -> None:
        if isinstance(storage, str):
            storage = DirStorage(storage)
        self.storage = storage
        #: The directory, or the ``s3://`` URL.
        self.path = storage.url
        #: A local directory (flock, staging by rename); False: an object store.
        self.local = storage.local_path is not None
        self.compression: str = meta["compression"]
        self.chunk_size: int = meta["chunk_size"]
        self.encryption: dict[str, Any] | None = meta.get("encryption")
        self.created: str = meta.get("created", "")
        self.keys = keys
        self.backups_dir = (
            os.path.join(self.path, BACKUPS) if self.local else f"{self.path}/{BACKUPS}"
        )
        self.tmp_dir = os.path.join(self.path, TMP) if self.local else f"{self.path}/{TMP}"
        self.store = ChunkStore(storage, keys, self.compression, SETTINGS.backup_zstd_level)

    @property
    def locator(self) -> str:
        """What opens this repository again elsewhere (blksnapd): the path,
        or the ``s3://`` URL with its endpoint when one was given."""
        endpoint = getattr(self.storage, "endpoint", None)
        if not endpoint or ".amazonaws.com" in endpoint:
            return self.path
        return f"{self.path}?endpoint={quote(endpoint, safe=':/')}"

    def traffic(self) -> TrafficCount:
        """Requests and bytes exchanged with the storage so far."""
        return self.storage.traffic.snapshot()

    def backup_path(self, backup_id: str) -> str:
        return (
            os.path.join(self.backups_dir, backup_id)
            if self.local
            else f"{self.backups_dir}/{backup_id}"
        )

    def __repr__(self) -> str:
        enc = f" encrypted key_id={self.keys.key_id}" if self.keys.encrypted else ""
        return f"<Repository {self.path} compression={self.compression}{enc}>"

    # -- creation -----------------------------------------------------------

    @staticmethod
    def exists(storage: Storage) -> bool:
        """Is there a repository in ``storage`` (its ``REPO.json``)? False
        also when its bucket is missing (made with the repository)."""
        try:
            return storage.stat(REPO_FILE) is not None
        except NoBucket:
            return False

    @classmethod
    def init(
        cls,
        path: str | Storage,
        compression: str = "zstd",
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        passphrase: bytes | None = None,
        key_file: str | None = None,
        encrypt: bool = False,
        endpoint: str | None = None,
    ) -> Repository:
        """Make ``path`` a repository (``mkdir -p``; ``s3://BUCKET/PREFIX``: in
        an object store, the bucket made if missing), or open it if it already is one.

        An existing repository keeps its own compression, chunk size and keys
        (``passphrase``/``key_file`` then open it). With ``encrypt``, a new
        repository gets a random master key, wrapped by ``passphrase`` into
        ``REPO.json`` or written to the new file ``key_file``
        (:func:`blksnap.backup.crypto.create_encryption`); an existing one must
        already be encrypted (``EEXIST`` otherwise: encryption is chosen once).
        """
        if compression not in COMPRESSIONS:
            raise InvalidArgument(
                f"unknown compression {compression!r} (one of: {', '.join(COMPRESSIONS)})"
            )
        check_chunk_size(chunk_size)
        storage = path if isinstance(path, Storage) else open_storage(path, endpoint=endpoint)
        path = storage.url
        if cls.exists(storage):
            repo = cls.open(storage, passphrase=passphrase, key_file=key_file)
            if encrypt and not repo.keys.encrypted:
                raise Exists(
                    f"{path} is a repository without encryption; encryption is chosen when"
                    " a repository is made (make a new one and back up into it)"
                )
            return repo
        if not storage.local_path:
            objects.init(storage, compression, chunk_size, passphrase, key_file, encrypt)
            return cls.open(storage, passphrase=passphrase, key_file=key_file)
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
            encryption = None
            if encrypt:
                encryption, _ = create_encryption(passphrase=passphrase, key_file=key_file)
            for sub in (BACKUPS, TMP, CHUNKS):
                os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
            for name in (WRITE_LOCK, READ_LOCK):
                os.close(
                    os.open(
                        os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
                    )
                )
            meta = repo_meta(compression, chunk_size, encryption)
            staged = os.path.join(path, REPO_FILE + ".tmp")
            write_file(staged, json.dumps(meta, indent=2).encode() + b"\n")
            os.rename(staged, os.path.join(path, REPO_FILE))
            fsync_dir(path)
        except OSError as exc:
            raise from_oserror(exc, f"init repository {path}") from None
        return cls.open(storage, passphrase=passphrase, key_file=key_file)

    @classmethod
    def open(
        cls,
        path: str | Storage,
        *,
        passphrase: bytes | None = None,
        key_file: str | None = None,
        keys: Keys | None = None,
        endpoint: str | None = None,
    ) -> Repository:
        """Open the repository at ``path`` (a directory or ``s3://BUCKET/PREFIX``,
        ``endpoint`` for an S3-compatible service); an encrypted one needs
        ``key_file`` or ``passphrase`` (default: ``BLKSNAP_PASSPHRASE``), or its
        ``keys`` already opened (blksnapd is handed them by the command line)."""
        storage = path if isinstance(path, Storage) else open_storage(path, endpoint=endpoint)
        path = storage.url
        try:
            raw = storage.get(REPO_FILE)
        except NoBucket:
            raise
        except NotFound:
            raise NotFound(f"{path} is not a blksnap repository (no {REPO_FILE})") from None
        meta = parse_repo_meta(path, raw)
        if keys is not None:
            enc = meta.get("encryption")
            want = enc.get("key_id") if isinstance(enc, dict) else ""
            if keys.key_id != (want or ""):
                raise BlksnapError(
                    f"{path}: the key given (id {keys.key_id or 'none'}) is not the "
                    f"repository's ({want or 'not encrypted'})",
                    errno.EKEYREJECTED,
                )
            return cls(storage, meta, keys)
        if passphrase is None and key_file is None:
            passphrase = passphrase_from_env()
        keys = open_keys(
            meta.get("encryption"), passphrase=passphrase, key_file=key_file, where=path
        )
        return cls(storage, meta, keys)

    # -- locks --------------------------------------------------------------

    def _write_lock(self, blocking: bool = True) -> int:
        if not self.local:
            return -1  # many writers: see blksnap.backup.objects
        return _flock(
            os.path.join(self.path, WRITE_LOCK),
            fcntl.LOCK_EX,
            blocking,
            f"another backup or prune is running on {self.path}",
        )

    def read_hold(self, exclusive: bool = False, blocking: bool = True) -> ReadHold:
        """Hold the repository for reading until ``close()`` (shared: readers;
        exclusive: prune, which is refused with ``EBUSY`` while anything
        reads). A directory: ``read.lock``; an object store: a reader record
        (:mod:`blksnap.backup.objects`)."""
        if not self.local:
            if exclusive:
                objects.check_no_readers(self.storage, self._busy_reading())
                return ReadHold()
            return ReadHold(record=objects.reader(self.storage))
        return ReadHold(
            fd=_flock(
                os.path.join(self.path, READ_LOCK),
                fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH,
                blocking,
                self._busy_reading(),
            )
        )

    def _busy_reading(self) -> str:
        return (
            f"{self.path} is being read (a restore, a verify, a mounted backup or an instant "
            "restore: blksnap umount / wait for it) and cannot be pruned now"
        )

    @contextmanager
    def _read_lock(self, exclusive: bool = False, blocking: bool = True) -> Iterator[None]:
        hold = self.read_hold(exclusive, blocking)
        try:
            yield
        finally:
            hold.close()

    def _clean_tmp(self) -> list[str]:
        """Remove what crashed writers and prunes left in ``tmp/`` (writer lock
        held, so they are dead); the snapshot ids their staging dirs name."""
        try:
            entries = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
            return []
        snapshots = []
        if any(not name.endswith(".pruned") for name in entries):
            # A writer died. The chunks it stored may not be durable yet, and
            # this writer may reuse them without storing them: make the file
            # system durable first (what the dead writer's commit would have).
            try:
                syncfs(self.path)
            except OSError as exc:
                raise from_oserror(exc, f"sync {self.path} after a writer that died") from None
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
        """The backup ``backup_id`` (damaged if its manifest is bad), None if absent.

        In an object store a backup without a manifest is not published (being
        written, or abandoned): absent. In a directory, ``backups/ID`` exists
        only by the rename that publishes it, so a missing manifest is damage."""
        path = self.backup_path(backup_id)
        try:
            raw = self.storage.get(f"{BACKUPS}/{backup_id}/{MANIFEST}")
        except NotFound:
            if not self.local or not os.path.isdir(path):
                return None  # never there, or removed by a prune meanwhile
            return damaged(backup_id, path, "manifest.json is missing")
        except BlksnapError as exc:
            return damaged(backup_id, path, f"manifest.json unreadable: {exc.message}")
        return parse_manifest(backup_id, path, raw, self.keys.mac)

    def backups(self) -> list[BackupInfo]:
        """Every published backup (ok, failed, damaged), oldest first (by seq)."""
        names = [n for n in self.storage.list_dirs(BACKUPS + "/") if ID_RE.match(n)]
        if self.local:
            infos = [info for info in map(self._load, names) if info is not None]
        else:  # a request each: several in flight
            with ThreadPoolExecutor(self.storage.parallelism) as pool:
                infos = [info for info in pool.map(self._load, names) if info is not None]
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

    def read_index(self, info: BackupInfo, device: str) -> np.ndarray:
        """The checked index of ``device`` in backup ``info``: ``(chunk_count, 32)``
        uint8, one digest per chunk (EIO naming what is wrong)."""
        where = f"backup {info.id} device {device}"
        if not info.ok:
            raise InvalidArgument(f"backup {info.id} is {info.state}: it cannot be read")
        record = info.device(device)
        try:
            raw = self.storage.get(f"{BACKUPS}/{info.id}/{record.file}{INDEX_SUFFIX}")
        except BlksnapError as exc:
            raise BlksnapError(f"{where}: index: {exc.message}", exc.errno) from None
        expect = record.chunk_count * DIGEST
        if len(raw) != expect:
            raise IOFailure(f"{where}: index holds {len(raw)} bytes, not {expect} (truncated?)")
        if self.keys.mac(raw) != record.index_checksum:
            raise IOFailure(f"{where}: index checksum mismatch")
        return np.frombuffer(raw, dtype=np.uint8).reshape(record.chunk_count, DIGEST)

    # -- generation links ---------------------------------------------------

    def link_generation(
        self, generation_id: str, backup_id: str, device: str, changes_number: int
    ) -> dict[str, Any]:
        """Record that CBT generation ``generation_id`` of ``device`` starts
        from backup ``backup_id``: its blocks numbered above
        ``changes_number`` are those written since the device held exactly
        that backup (an instant restore). The next backup of the device in
        that generation is then incremental against ``backup_id``
        (:func:`blksnap.backup.session.plan_device`). One small file,
        ``links/<generation>.json``, with a MAC when the repository is
        encrypted; a link whose backup was pruned is just not used."""
        if not _UUID_RE.fullmatch(generation_id):
            raise InvalidArgument(f"bad generation id {generation_id!r}")
        info = self.get(backup_id)
        info.device(device)  # (NotFound if the backup lacks it)
        doc: dict[str, Any] = {
            "version": 1,
            "generation_id": generation_id,
            "device": device,
            "backup": info.id,
            "changes_number": int(changes_number),
            "created": now(),
        }
        doc["mac"] = self.keys.mac(_canonical(doc))
        self.storage.put(
            f"{LINKS}/{generation_id}.json", json.dumps(doc, indent=1).encode() + b"\n"
        )
        return doc

    def generation_link(self, generation_id: str, device: str) -> dict[str, Any] | None:
        """The link recorded for ``generation_id`` of ``device`` (checked), or None."""
        if not _UUID_RE.fullmatch(generation_id or ""):
            return None
        path = f"{LINKS}/{generation_id}.json"
        try:
            doc = json.loads(self.storage.get(path))
        except NotFound:
            return None
        except (BlksnapError, ValueError) as exc:
            log.warning("%s: link %s unreadable, not used: %s", self.path, path, exc)
            return None
        if not isinstance(doc, dict) or doc.get("generation_id") != generation_id:
            log.warning("%s: link %s malformed, not used", self.path, path)
            return None
        mac = doc.pop("mac", None)
        if mac != self.keys.mac(_canonical(doc)):
            log.warning("%s: link %s fails its MAC, not used", self.path, path)
            return None
        if not isinstance(doc.get("backup"), str) or not isinstance(doc.get("changes_number"), int):
            return None
        return doc if doc.get("device") == device else None

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
        self,
        kind: str,
        snapshot_id: str | None = None,
        *,
        blocking: bool = True,
        as_of: tuple[str, int, str] | None = None,
    ) -> BackupWriter:
        """Start a backup: take the writer lock (wait, or EBUSY with ``blocking=False``).
        ``as_of`` (id, seq, started) keeps a converted backup's own identity."""
        if kind not in KINDS:
            raise InvalidArgument(f"unknown backup kind {kind!r} (one of: {', '.join(KINDS)})")
        if not self.local:
            return objects.begin(self, kind, snapshot_id, as_of)
        lock_fd = self._write_lock(blocking)
        try:
            abandoned = self._clean_tmp()
            infos = self.backups()
            seq = 1 + max((info.seq for info in infos), default=0)
            backup_id, started = self._new_id()
            if as_of is not None:
                backup_id, seq, started = as_of
            staging = os.path.join(self.tmp_dir, backup_id)
            os.makedirs(self.backups_dir, mode=0o700, exist_ok=True)
            os.mkdir(staging, 0o700)
            write_file(os.path.join(staging, BEGUN_FILE), b"")
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
            info = self.get(backup_id)
            digests = self.read_index(info, device)
            return _restore.restore(self.store, info, device, digests, target, progress, force)

    def verify(
        self, backup_id: str | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Problem]:
        """Check every ok or damaged backup (or just ``backup_id``) and return what
        is wrong (an empty list: all good). Each distinct chunk is read and
        checked once; ``progress(n)`` is called with the device bytes of the
        chunks checked."""
        with self._read_lock():
            infos = self.backups()
            targets = [self.get(backup_id)] if backup_id is not None else None
            return _verify.verify(self, infos, targets, progress)

    # -- prune --------------------------------------------------------------

    def prune(
        self, policy: retention.Policy | int, dry_run: bool = False
    ) -> list[retention.Decision]:
        """Apply a retention ``policy`` (an int: keep the newest N) to the ok
        backups; also remove failed or damaged backups older than the oldest
        kept one. Every index is whole, so removing a backup never breaks
        another. Returns the decisions, newest first (failed and damaged
        backups included, with why). The chunks only removed backups used
        are freed by :meth:`gc`."""
        if isinstance(policy, int):
            if policy < 1:
                raise InvalidArgument(f"prune must keep at least one backup (keep={policy})")
            policy = retention.Policy(last=policy)
        lock_fd = -1 if dry_run else self._write_lock(True)
        try:
            with nullcontext() if dry_run else self._read_lock(exclusive=True, blocking=False):
                infos = self.backups()
                ok = [info for info in infos if info.ok]
                if not ok:
                    return []
                candidates = [
                    retention.Backup(
                        info.id, retention.parse_backup_time(info.id, info.started), info.seq
                    )
                    for info in ok
                ]
                decisions = retention.select(candidates, policy)
                kept = [d for d in decisions if d.keep]
                oldest = min((d.seq for d in kept), default=None)
                for info in infos:
                    if info.ok:
                        continue
                    old = oldest is not None and info.seq < oldest
                    why = () if old else (f"{info.state}, newer than the oldest kept backup",)
                    decisions.append(
                        retention.Decision(info.id, info.seq, _time_or_epoch(info), not old, why)
                    )
                decisions.sort(key=lambda d: (d.time, d.seq), reverse=True)
                by_id = {info.id: info for info in infos}
                doomed = [by_id[d.id] for d in decisions if not d.keep]
                doomed.sort(key=lambda b: b.seq)
                if not dry_run and doomed:
                    self._remove(doomed)
                return decisions
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)

    def gc(
        self,
        dry_run: bool = False,
        grace: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> _gc.GcReport:
        """Remove the chunks no backup's index names (see :mod:`blksnap.backup.gc`)."""
        return _gc.collect(self, dry_run=dry_run, grace=grace, progress=progress)

    def _remove(self, doomed: list[BackupInfo]) -> None:
        """Unpublish (rename into tmp/, one fsync) and then delete backups."""
        if not self.local:
            objects.remove_backups(self, doomed, self._busy_reading())
            return
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
