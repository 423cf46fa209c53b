"""Backup repository: full, incremental and differential backups of devices.

A repository is a plain directory. Each finished backup is one directory
under ``backups/`` holding a JSON manifest and, per device, a data file (the
stored blocks back to back, optionally zstd-compressed) and a block map (a
raw little-endian numpy array, one row per stored block, with the blake3
checksum of the block). A backup is staged under ``tmp/`` and published with
one ``rename``, so a crash never leaves a half backup that looks whole.

Incremental and differential backups store only the blocks the change-block
tracking (CBT) reported; a device record names its parent backup, and a
restore replays the chain full -> ... -> newest, the newest copy of a block
winning. The exact on-disk format is described in ``docs/REPOSITORY.md``.

Locks (``flock``): ``lock`` serializes writers (a backup from ``begin`` to
``commit``/``fail``/``abort``, and ``prune``); ``read.lock`` is held shared by
readers (``restore``, ``verify``) and exclusively by ``prune``, the only
operation that removes published backups. So a restore or a verify runs
while a backup is being written, and a backup can start while a verify runs.

This module has no user interface: progress is reported through callbacks.
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import zstandard

from blksnap import inuse
from blksnap.errors import (
    AlreadyDone,
    BlksnapError,
    Busy,
    Exists,
    InvalidArgument,
    IOFailure,
    NoSpace,
    NotFound,
    error,
    from_oserror,
)
from blksnap.fileio import fd_size, fsync_dir, pwrite_full

log = logging.getLogger(__name__)

REPO_FORMAT = "blksnap-repository"
BACKUP_FORMAT = "blksnap-backup"
FORMAT_VERSION = 1
CHECKSUM = "blake3"
COMPRESSIONS = ("zstd", "none")
KINDS = ("full", "incremental", "differential")
#: zstd level for stored blocks: fast; a block is kept compressed only when that saves space.
ZSTD_LEVEL = 1

FLAG_ZERO = 1
FLAG_ZSTD = 2

#: One row of a block map (``dev-<i>.map``): 56 bytes, little-endian, no padding.
MAP_DTYPE = np.dtype(
    [
        ("index", "<u8"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("flags", "<u4"),
        ("checksum", "u1", (32,)),
    ]
)

REPO_FILE = "REPO.json"
MANIFEST = "manifest.json"
WRITE_LOCK = "lock"
READ_LOCK = "read.lock"
BACKUPS = "backups"
TMP = "tmp"

_ID_RE = re.compile(r"^\d{8}T\d{6}Z(?:-[1-9]\d*)?$")
_FILE_RE = re.compile(r"^dev-\d+$")
_DIGEST = 32
#: Restore rebuilds the device this many bytes at a time (at least one block).
_WINDOW = 16 << 20
#: Restore onto a block device zeroes this many bytes at its start first and
#: writes them last: room for any file-system signature or superblock.
_HEAD = 64 << 10
#: A file is restored under ``.NAME`` + this + random, then renamed to NAME.
_TEMP_MARK = ".blksnap-restore-"
#: In a staging dir: the id of the snapshot the backup reads.
SNAPSHOT_FILE = "snapshot"
#: A backup's data file is sent to the disk in the background every this many
#: bytes (fdatasync in a helper thread), so writeback overlaps the reading of
#: the image and the fsync at commit has little left to do.
_WRITEBACK_STEP = 32 << 20
#: Verify reads the data file in pieces of about this size.
_VERIFY_CHUNK = 8 << 20
#: Verify reports at most this many block problems per device, then a summary.
_MAX_BLOCK_PROBLEMS = 50
#: What a crashed ``init`` may leave in the directory it was making a repository.
_INIT_LEFTOVERS = {BACKUPS, TMP, WRITE_LOCK, READ_LOCK, REPO_FILE + ".tmp"}


# ---------------------------------------------------------------------------
# small helpers


def _now() -> tuple[str, str]:
    """(backup id base, ISO 8601 UTC time) of this second."""
    t = time.gmtime()
    return time.strftime("%Y%m%dT%H%M%SZ", t), time.strftime("%Y-%m-%dT%H:%M:%SZ", t)


def _iso_now() -> str:
    return _now()[1]


def canonical_json(obj: Any) -> bytes:
    """The byte form checksums are computed over: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """Hex blake3 of the canonical JSON of ``manifest`` without ``manifest_checksum``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    return blake3.blake3(canonical_json(body)).hexdigest()


def _pread_upto(fd: int, length: int, offset: int) -> bytes:
    """Read ``length`` bytes, fewer only at end of file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _write_file(path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        pwrite_full(fd, 0, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


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


def _block_length(size: int, block_size: int, index: int) -> int:
    return min(block_size, size - index * block_size)


_zero_digests: dict[int, bytes] = {}


def _zero_digest(length: int) -> bytes:
    """blake3 of ``length`` zero bytes (cached: a few distinct lengths per repository)."""
    digest = _zero_digests.get(length)
    if digest is None:
        digest = blake3.blake3(bytes(length)).digest()
        if len(_zero_digests) < 64:
            _zero_digests[length] = digest
    return digest


def _decompress(dctx: zstandard.ZstdDecompressor, blob: memoryview, expect: int) -> bytes:
    """Decompress one stored blob of ``expect`` bytes; ZstdError if it is not one.

    The frame's declared size is checked first: a damaged header must not make
    us allocate whatever it claims.
    """
    declared = zstandard.frame_content_size(blob)
    if declared != expect:
        raise zstandard.ZstdError(f"frame declares {declared} bytes, the block has {expect}")
    return dctx.decompress(blob, max_output_size=expect)


def _runs(offsets: list[int], lengths: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Split rows ``[0, len)`` into ``(first, end)`` ranges whose blobs lie back to
    back in the data file, each at most ``limit`` bytes (or a single blob)."""
    count = len(offsets)
    j = 0
    while j < count:
        start = offsets[j]
        end = start + lengths[j]
        k = j + 1
        while k < count and offsets[k] == end and end + lengths[k] - start <= limit:
            end += lengths[k]
            k += 1
        yield j, k
        j = k


# ---------------------------------------------------------------------------
# records


@dataclass
class DeviceRecord:
    """What a backup holds of one device."""

    name: str
    size: int
    block_size: int
    generation_id: str
    changes_number: int
    kind: str  # "full" | "incremental" | "differential"
    parent: str | None = None
    blocks_stored: int = 0  # map rows (zero blocks included)
    blocks_zero: int = 0  # map rows that are ZERO (nothing in the data file)
    bytes_read: int = 0  # set by the caller before commit
    bytes_stored: int = 0  # bytes appended to the data file
    image_bytes_read: int | None = None  # set by the caller before commit
    file: str = ""  # "dev-<i>": the data file is <file>.data, the map <file>.map
    map_checksum: str = ""
    data_size: int = 0

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_size) if self.block_size > 0 else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "size": self.size,
            "block_size": self.block_size,
            "block_count": self.block_count,
            "generation_id": self.generation_id,
            "changes_number": self.changes_number,
            "kind": self.kind,
            "parent": self.parent,
            "blocks_stored": self.blocks_stored,
            "blocks_zero": self.blocks_zero,
            "bytes_read": self.bytes_read,
            "bytes_stored": self.bytes_stored,
            "image_bytes_read": self.image_bytes_read,
            "map_checksum": self.map_checksum,
            "data_size": self.data_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceRecord:
        """Build a record from :meth:`as_dict` output (``block_count`` is derived)."""

        def integer(key: str, default: int | None = None) -> int:
            value = d.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"device record: {key} is not an integer")
            return value

        def text(key: str, default: str | None = None) -> str:
            value = d.get(key, default)
            if not isinstance(value, str):
                raise ValueError(f"device record: {key} is not a string")
            return value

        parent = d.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ValueError("device record: parent is not a string")
        image = d.get("image_bytes_read")
        if image is not None and (not isinstance(image, int) or isinstance(image, bool)):
            raise ValueError("device record: image_bytes_read is not an integer")
        return cls(
            name=text("name"),
            size=integer("size"),
            block_size=integer("block_size"),
            generation_id=text("generation_id"),
            changes_number=integer("changes_number"),
            kind=text("kind"),
            parent=parent,
            blocks_stored=integer("blocks_stored", 0),
            blocks_zero=integer("blocks_zero", 0),
            bytes_read=integer("bytes_read", 0),
            bytes_stored=integer("bytes_stored", 0),
            image_bytes_read=image,
            file=text("file", ""),
            map_checksum=text("map_checksum", ""),
            data_size=integer("data_size", 0),
        )


@dataclass
class BackupInfo:
    """A published backup, as its manifest describes it."""

    id: str
    seq: int
    kind: str
    state: str  # "ok" | "failed" | "damaged" (manifest unreadable or checksum mismatch)
    error: dict[str, Any] | None
    started: str
    finished: str
    snapshot_id: str | None
    compression: str
    checksum: str
    devices: list[DeviceRecord]
    path: str

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def device(self, name: str) -> DeviceRecord:
        for record in self.devices:
            if record.name == name:
                return record
        raise NotFound(f"backup {self.id} has no device {name}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "kind": self.kind,
            "state": self.state,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "snapshot_id": self.snapshot_id,
            "compression": self.compression,
            "checksum": self.checksum,
            "devices": [record.as_dict() for record in self.devices],
            "path": self.path,
        }


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


def _info_from_manifest(m: dict[str, Any], path: str) -> BackupInfo:
    """Build a :class:`BackupInfo` from a parsed manifest (ValueError/KeyError/TypeError
    when a field is missing or of the wrong type)."""
    seq = m["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("seq is not an integer")
    for key in ("id", "kind", "state", "started", "finished", "compression", "checksum"):
        if not isinstance(m[key], str):
            raise ValueError(f"{key} is not a string")
    err = m.get("error")
    if err is not None and not isinstance(err, dict):
        raise ValueError("error is not an object")
    snapshot_id = m.get("snapshot_id")
    if snapshot_id is not None and not isinstance(snapshot_id, str):
        raise ValueError("snapshot_id is not a string")
    devices = m["devices"]
    if not isinstance(devices, list):
        raise ValueError("devices is not a list")
    return BackupInfo(
        id=m["id"],
        seq=seq,
        kind=m["kind"],
        state=m["state"],
        error=err,
        started=m["started"],
        finished=m["finished"],
        snapshot_id=snapshot_id,
        compression=m["compression"],
        checksum=m["checksum"],
        devices=[DeviceRecord.from_dict(d) for d in devices],
        path=path,
    )


def _damaged(backup_id: str, path: str, reason: str, m: Any = None) -> BackupInfo:
    """A backup whose manifest cannot be trusted: listed, never used."""
    m = m if isinstance(m, dict) else {}
    seq = m.get("seq")
    devices: list[DeviceRecord] = []
    if isinstance(m.get("devices"), list):
        for d in m["devices"]:
            try:
                devices.append(DeviceRecord.from_dict(d))
            except (KeyError, TypeError, ValueError, AttributeError):
                pass

    def text(key: str) -> str:
        value = m.get(key)
        return value if isinstance(value, str) else ""

    return BackupInfo(
        id=backup_id,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
        kind=text("kind"),
        state="damaged",
        error={"errno": "EIO", "message": reason},
        started=text("started"),
        finished=text("finished"),
        snapshot_id=m.get("snapshot_id") if isinstance(m.get("snapshot_id"), str) else None,
        compression=text("compression"),
        checksum=text("checksum"),
        devices=devices,
        path=path,
    )


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
                if not entries <= _INIT_LEFTOVERS or (
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
            meta = {
                "format": REPO_FORMAT,
                "version": FORMAT_VERSION,
                "checksum": CHECKSUM,
                "compression": compression,
                "created": _iso_now(),
            }
            staged = os.path.join(path, REPO_FILE + ".tmp")
            _write_file(staged, json.dumps(meta, indent=2).encode() + b"\n")
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
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):
            raise IOFailure(f"{meta_path} is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != REPO_FORMAT:
            raise NotFound(f"{path} is not a blksnap repository ({REPO_FILE} has another format)")
        version = meta.get("version")
        if version != FORMAT_VERSION:
            raise error(
                errno.EPROTONOSUPPORT,
                f"{path}: repository format version {version} is not supported"
                f" (this blksnap reads version {FORMAT_VERSION})",
            )
        if meta.get("checksum") != CHECKSUM:
            raise error(
                errno.EPROTONOSUPPORT, f"{path}: unsupported checksum {meta.get('checksum')!r}"
            )
        if meta.get("compression") not in COMPRESSIONS:
            raise error(
                errno.EPROTONOSUPPORT,
                f"{path}: unsupported compression {meta.get('compression')!r}",
            )
        return cls(path, meta)

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
                _remove_tree(os.path.join(self.tmp_dir, name))
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
            return _damaged(backup_id, path, "manifest.json is missing")
        except OSError as exc:
            return _damaged(backup_id, path, f"manifest.json unreadable: {exc.strerror}")
        try:
            m = json.loads(raw)
        except (ValueError, RecursionError):
            return _damaged(backup_id, path, "manifest.json is not valid JSON")
        if not isinstance(m, dict):
            return _damaged(backup_id, path, "manifest.json is not a JSON object")
        if m.get("format") != BACKUP_FORMAT or m.get("version") != FORMAT_VERSION:
            return _damaged(
                backup_id,
                path,
                f"unsupported manifest format {m.get('format')!r} version {m.get('version')!r}",
                m,
            )
        if m.get("manifest_checksum") != manifest_checksum(m):
            return _damaged(backup_id, path, "manifest checksum mismatch", m)
        if m.get("id") != backup_id:
            return _damaged(
                backup_id, path, f"manifest names backup {m.get('id')!r}, not its directory", m
            )
        try:
            info = _info_from_manifest(m, path)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return _damaged(backup_id, path, f"malformed manifest: {exc}", m)
        if info.state not in ("ok", "failed"):
            return _damaged(backup_id, path, f"unknown state {info.state!r}", m)
        return info

    def backups(self) -> list[BackupInfo]:
        """Every published backup (ok, failed, damaged), oldest first (by seq)."""
        try:
            names = [e.name for e in os.scandir(self.backups_dir) if _ID_RE.match(e.name)]
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
        info = self._load(backup_id) if _ID_RE.match(backup_id) else None
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
        return self._chain(index, start, device)

    @staticmethod
    def _chain(index: dict[str, BackupInfo], start: BackupInfo, device: str) -> list[BackupInfo]:
        if not start.ok:
            raise InvalidArgument(f"backup {start.id} is {start.state}: it cannot be restored")
        record = start.device(device)
        chain = [start]
        info = start
        while record.kind != "full":
            where = f"backup {info.id} device {device}"
            if record.kind not in KINDS:
                raise InvalidArgument(f"{where}: unknown kind {record.kind!r}")
            if record.parent is None:
                raise InvalidArgument(f"{where}: {record.kind} backup without a parent")
            parent = index.get(record.parent)
            if parent is None:
                raise InvalidArgument(f"{where}: parent backup {record.parent} is missing")
            if not parent.ok:
                raise InvalidArgument(f"{where}: parent backup {parent.id} is {parent.state}")
            if parent.seq >= info.seq:
                raise InvalidArgument(f"{where}: parent backup {parent.id} is not older")
            try:
                parent_record = parent.device(device)
            except NotFound:
                raise InvalidArgument(
                    f"{where}: parent backup {parent.id} has no device {device}"
                ) from None
            _check_link(where, parent.id, parent_record, record)
            chain.append(parent)
            info, record = parent, parent_record
        chain.reverse()
        return chain

    # -- writing ------------------------------------------------------------

    def _new_id(self) -> tuple[str, str]:
        base, started = _now()
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

    def _read_map(self, info: BackupInfo, record: DeviceRecord) -> np.ndarray:
        """The checked block map of ``record`` (EIO if it does not match the manifest)."""
        where = f"backup {info.id} device {record.name}"
        if not _FILE_RE.match(record.file):
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
        problem = _map_structure_problem(rows, record)
        if problem:
            raise IOFailure(f"{where}: {problem}")
        return rows

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
        removed on failure); on a block device the first :data:`_HEAD` bytes
        are zeroed first and written last, so a half-restored device has no
        valid file-system signature."""
        real = os.path.realpath(target)
        with self._read_lock():
            chain = self.chain(backup_id, device)
            record = chain[-1].device(device)
            st = _check_target(target, real, force)
            maps = [self._read_map(info, info.device(device)) for info in chain]
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
                    head = bytearray(min(_HEAD, record.size))
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

    def verify(
        self, backup_id: str | None = None, progress: Callable[[int], None] | None = None
    ) -> list[Problem]:
        """Check every ok or damaged backup (or just ``backup_id``) and return what
        is wrong (an empty list: all good). ``progress(n)`` is called with the
        data-file bytes checked: they sum to the ``data_size`` of the checked
        device records."""
        with self._read_lock():
            infos = self.backups()
            index = {info.id: info for info in infos}
            if backup_id is not None:
                targets = [self.get(backup_id)]
            else:
                targets = [info for info in infos if info.state != "failed"]
            problems: list[Problem] = []
            for info in targets:
                if info.state == "damaged":
                    message = info.error["message"] if info.error else "manifest damaged"
                    problems.append(Problem(info.id, None, None, None, message))
                    continue
                if info.state == "failed":
                    problems.append(
                        Problem(info.id, None, None, None, "backup failed: it holds no data")
                    )
                    continue
                if not info.devices:
                    problems.append(Problem(info.id, None, None, None, "backup has no device"))
                for record in info.devices:
                    problems.extend(self._verify_device(index, info, record, progress))
            return problems

    def _verify_device(
        self,
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
                self._chain(index, info, record.name)
            except BlksnapError as exc:
                problem(f"chain broken: {exc.message}")
        if record.block_size <= 0 or record.size < 0:
            problem(f"bad geometry: size {record.size}, block size {record.block_size}")
            return problems
        if not _FILE_RE.match(record.file):
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
        structure = _map_structure_problem(rows, record)
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
            self._verify_blobs(fd, file_size, rows, zero, record, problem, progress)
        except OSError as exc:
            problem(f"data file read error: {exc.strerror}")
        finally:
            os.close(fd)
        return problems

    @staticmethod
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
            if zero_sums[j * _DIGEST : (j + 1) * _DIGEST] != _zero_digest(
                _block_length(size, bs, bi)
            ):
                found += 1
                if found <= _MAX_BLOCK_PROBLEMS:
                    problem("zero block with a wrong checksum", bi)
        data = rows[~zero]
        oversized = data["length"] > bs
        for bi in data["index"][oversized].tolist():
            found += 1
            if found <= _MAX_BLOCK_PROBLEMS:
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
        for first, end in _runs(offsets, lengths, _VERIFY_CHUNK):
            base = offsets[first]
            total = offsets[end - 1] + lengths[end - 1] - base
            raw = _pread_upto(fd, max(0, min(total, file_size - base)), base)
            view = memoryview(raw)
            for j in range(first, end):
                bi = indices[j]
                message = None
                if bi >= block_count:
                    continue  # reported by the structure check
                expect = _block_length(size, bs, bi)
                a = offsets[j] - base
                if a + lengths[j] > len(raw):
                    message = "stored data is past the end of the data file"
                else:
                    blob = view[a : a + lengths[j]]
                    block: bytes | memoryview = blob
                    if flags[j] & FLAG_ZSTD:
                        try:
                            block = _decompress(dctx, blob, expect)
                        except zstandard.ZstdError as exc:
                            message = f"cannot decompress: {exc}"
                    if message is None and len(block) != expect:
                        message = f"holds {len(block)} bytes, not {expect}"
                    if (
                        message is None
                        and blake3.blake3(block).digest() != (sums[j * _DIGEST : (j + 1) * _DIGEST])
                    ):
                        message = "checksum mismatch"
                if message:
                    found += 1
                    if found <= _MAX_BLOCK_PROBLEMS:
                        problem(message, bi)
            if progress:
                progress(total)
        if found > _MAX_BLOCK_PROBLEMS:
            problem(f"{found - _MAX_BLOCK_PROBLEMS} more bad blocks not listed")

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
                _remove_tree(dest)
            except OSError as exc:
                log.warning("%s: cannot remove %s (next writer will): %s", self.path, dest, exc)


def _check_link(where: str, parent_id: str, parent: DeviceRecord, child: DeviceRecord) -> None:
    """EINVAL unless ``child`` can be restored on top of ``parent``."""
    if parent.generation_id != child.generation_id:
        raise InvalidArgument(
            f"{where}: parent backup {parent_id} has another CBT generation"
            f" ({parent.generation_id}, not {child.generation_id})"
        )
    if parent.block_size != child.block_size:
        raise InvalidArgument(
            f"{where}: parent backup {parent_id} has block size {parent.block_size},"
            f" not {child.block_size}"
        )
    if parent.size != child.size:
        raise InvalidArgument(
            f"{where}: parent backup {parent_id} has size {parent.size}, not {child.size}"
        )
    if child.kind == "differential" and parent.kind != "full":
        raise InvalidArgument(
            f"{where}: a differential backup must be based on a full one,"
            f" {parent_id} is {parent.kind}"
        )


def _map_structure_problem(rows: np.ndarray, record: DeviceRecord) -> str | None:
    """What is structurally wrong with a block map, or None."""
    count = len(rows)
    block_count = record.block_count
    if count == 0:
        if record.kind == "full" and block_count:
            return f"full backup holds 0 of {block_count} blocks"
        if record.data_size:
            return "no block in the map but a non-empty data file"
        return None
    index = rows["index"]
    if count > 1 and (np.diff(index.astype(np.int64)) <= 0).any():
        return "block map rows are not sorted by strictly increasing block index"
    if int(index[-1]) >= block_count:
        return f"block {int(index[-1])} is past the device end ({block_count} blocks)"
    if record.kind == "full" and count != block_count:
        return f"full backup holds {count} of {block_count} blocks"
    flags = rows["flags"]
    if (flags & ~np.uint32(FLAG_ZERO | FLAG_ZSTD)).any():
        return "unknown flags in the block map"
    zero = (flags & FLAG_ZERO) != 0
    if (flags[zero] & FLAG_ZSTD).any():
        return "a zero block is flagged compressed"
    if (rows["length"][zero] != 0).any():
        return "a zero block has a non-zero stored length"
    data = rows[~zero]
    if len(data):
        offsets = data["offset"].astype(np.int64)
        lengths = data["length"].astype(np.int64)
        expected = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        if (offsets != expected).any():
            return "stored blocks do not lie back to back in the data file"
        if int(lengths.sum()) != record.data_size:
            return f"blocks hold {int(lengths.sum())} bytes, the manifest says {record.data_size}"
        if (lengths == 0).any():
            return "a stored block has length 0"
        if (lengths > record.block_size).any():
            return "a stored block is longer than a block"
    elif record.data_size:
        return "no stored block but a non-empty data file"
    return None


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
        fd, temp = tempfile.mkstemp(prefix=f".{base}{_TEMP_MARK}", dir=directory)
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

    window_blocks = max(1, _WINDOW // bs) if bs else 1
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
                _fill_window(view, w0, sel.tolist(), rows, data_fds[k], record, chain[k].id, dctx)
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
) -> None:
    """Read, check and place the stored blocks ``rows`` (window slots ``sel``)."""
    bs, size = record.block_size, record.size
    offsets = rows["offset"].tolist()
    lengths = rows["length"].tolist()
    flags = rows["flags"].tolist()
    sums = np.ascontiguousarray(rows["checksum"]).tobytes()
    for first, end in _runs(offsets, lengths, _WINDOW):
        base = offsets[first]
        total = offsets[end - 1] + lengths[end - 1] - base
        try:
            raw = _pread_upto(fd, total, base)
        except OSError as exc:
            raise from_oserror(exc, f"backup {backup_id} device {record.name}") from None
        if len(raw) != total:
            raise IOFailure(f"backup {backup_id} device {record.name}: data file is short")
        rv = memoryview(raw)
        for j in range(first, end):
            slot = sel[j]
            bi = w0 + slot
            expect = _block_length(size, bs, bi)
            a = offsets[j] - base
            blob = rv[a : a + lengths[j]]
            where = f"backup {backup_id} device {record.name} block {bi} (offset {bi * bs})"
            if flags[j] & FLAG_ZSTD:
                try:
                    block: bytes | memoryview = _decompress(dctx, blob, expect)
                except zstandard.ZstdError as exc:
                    raise IOFailure(f"{where}: cannot decompress: {exc}") from None
            else:
                block = blob
            if len(block) != expect:
                raise IOFailure(f"{where}: holds {len(block)} bytes, not {expect}")
            if blake3.blake3(block).digest() != sums[j * _DIGEST : (j + 1) * _DIGEST]:
                raise IOFailure(f"{where}: checksum mismatch")
            lo = slot * bs
            view[lo : lo + expect] = block


# ---------------------------------------------------------------------------
# the writer


@dataclass(frozen=True)
class PreparedBlock:
    """One block ready to be stored: what :meth:`BackupWriter.prepare` computed."""

    device: str
    index: int
    length: int
    flags: int
    digest: bytes
    blob: bytes | memoryview


@dataclass
class _DeviceState:
    record: DeviceRecord
    fd: int
    data_path: str
    map_path: str
    zero: bytes  # block_size zero bytes (shared by devices of one block size)
    offset: int = 0  # bytes in the data file
    last: int = -1  # last block index put
    index: array.array = field(default_factory=lambda: array.array("Q"))
    offsets: array.array = field(default_factory=lambda: array.array("Q"))
    lengths: array.array = field(default_factory=lambda: array.array("Q"))
    flags: array.array = field(default_factory=lambda: array.array("B"))
    sums: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)
    kicked: int = 0  # data-file offset the last background fdatasync was started at
    flushing: Future[None] | None = None

    def settle(self) -> None:
        """Wait for the background fdatasync; raise its error."""
        job, self.flushing = self.flushing, None
        if job is not None:
            job.result()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.settle()  # never close the fd under a running fdatasync
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1

    def rows(self) -> np.ndarray:
        count = len(self.index)
        rows = np.zeros(count, dtype=MAP_DTYPE)
        if count:
            rows["index"] = np.frombuffer(self.index, dtype=np.uint64)
            rows["offset"] = np.frombuffer(self.offsets, dtype=np.uint64)
            rows["length"] = np.frombuffer(self.lengths, dtype=np.uint64)
            rows["flags"] = np.frombuffer(self.flags, dtype=np.uint8)
            rows["checksum"] = np.frombuffer(bytes(self.sums), dtype=np.uint8).reshape(
                count, _DIGEST
            )
        return rows


class BackupWriter:
    """One backup being written: holds the repository's writer lock until
    :meth:`commit`, :meth:`fail` or :meth:`abort`. As a context manager, leaving
    the block without commit or fail aborts (nothing is recorded).

    ``put`` may be called from several threads for different devices; the calls
    for one device must come in increasing block order.
    """

    def __init__(
        self,
        repo: Repository,
        *,
        backup_id: str,
        seq: int,
        kind: str,
        snapshot_id: str | None,
        started: str,
        staging: str,
        lock_fd: int,
        index: dict[str, BackupInfo],
        abandoned_snapshots: list[str] | None = None,
    ) -> None:
        self.repo = repo
        self.id = backup_id
        self.seq = seq
        self.kind = kind
        self.snapshot_id = snapshot_id
        self.started = started
        self.path = staging
        self._lock_fd = lock_fd
        self._index = index
        self._devices: dict[str, _DeviceState] = {}
        self._zeros: dict[int, bytes] = {}
        self._done = False
        self._pool: ThreadPoolExecutor | None = None
        self._tls = threading.local()
        #: Snapshots named by the staging dirs of writers that died (a killed
        #: backup): the caller may destroy them if they still exist.
        self.abandoned_snapshots = list(abandoned_snapshots or [])
        if snapshot_id is not None:
            self.attach_snapshot(snapshot_id)

    def attach_snapshot(self, snapshot_id: str) -> None:
        """Record the snapshot this backup reads, in the manifest and in the
        staging dir, so that if this process dies the next writer can name it
        (:attr:`abandoned_snapshots`)."""
        self.snapshot_id = snapshot_id
        try:
            _write_file(os.path.join(self.path, SNAPSHOT_FILE), snapshot_id.encode() + b"\n")
        except OSError as exc:
            raise from_oserror(exc, f"backup {self.id}") from None

    def _background(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blksnap-sync")
        return self._pool

    def __repr__(self) -> str:
        return f"<BackupWriter {self.id} {self.kind} in {self.repo.path}>"

    def __enter__(self) -> BackupWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()

    def __del__(self) -> None:
        try:
            if not self._done:
                self.abort()
        except Exception:
            pass

    @property
    def records(self) -> list[DeviceRecord]:
        return [state.record for state in self._devices.values()]

    def _check_open(self) -> None:
        if self._done:
            raise AlreadyDone(f"backup {self.id} is already finished")

    def add_device(self, record: DeviceRecord) -> None:
        """Add a device; the writer keeps ``record`` and fills in its counters."""
        self._check_open()
        name = record.name
        if not isinstance(name, str) or not name:
            raise InvalidArgument("a device needs a name")
        if name in self._devices:
            raise Exists(f"device {name} is already in backup {self.id}")
        if record.size < 0 or record.block_size <= 0:
            raise InvalidArgument(
                f"device {name}: bad size {record.size} or block size {record.block_size}"
            )
        if record.kind not in KINDS:
            raise InvalidArgument(f"device {name}: unknown kind {record.kind!r}")
        if record.kind not in ("full", self.kind):
            raise InvalidArgument(
                f"device {name}: a {self.kind} backup holds full or {self.kind} devices,"
                f" not {record.kind}"
            )
        if record.kind == "full":
            if record.parent is not None:
                raise InvalidArgument(f"device {name}: a full backup has no parent")
        else:
            if record.parent is None:
                raise InvalidArgument(f"device {name}: a {record.kind} backup needs a parent")
            parent = self._index.get(record.parent)
            if parent is None:
                raise InvalidArgument(f"device {name}: parent backup {record.parent} not found")
            if not any(r.name == name for r in parent.devices):
                raise InvalidArgument(
                    f"device {name}: parent backup {parent.id} has no device {name}"
                )
            # The whole chain must be restorable, or this backup never will be.
            self.repo._chain(self._index, parent, name)
            _check_link(f"device {name}", parent.id, parent.device(name), record)
        number = len(self._devices)
        record.file = f"dev-{number}"
        record.blocks_stored = record.blocks_zero = record.bytes_stored = record.data_size = 0
        record.map_checksum = ""
        data_path = os.path.join(self.path, record.file + ".data")
        try:
            fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_oserror(exc, data_path) from None
        zero = self._zeros.get(record.block_size)
        if zero is None:
            zero = self._zeros[record.block_size] = bytes(record.block_size)
        self._devices[name] = _DeviceState(
            record=record,
            fd=fd,
            data_path=data_path,
            map_path=os.path.join(self.path, record.file + ".map"),
            zero=zero,
        )

    def put(self, device: str, index: int, data: bytes | bytearray | memoryview) -> int:
        """Store block ``index`` of ``device``; returns the bytes stored (0 for a zero block)."""
        return self.put_prepared(self.prepare(device, index, data))

    def prepare(
        self, device: str, index: int, data: bytes | bytearray | memoryview
    ) -> PreparedBlock:
        """The CPU work of :meth:`put` (zero check, checksum, compression) for
        block ``index``, without storing it. Thread-safe: a backup prepares
        blocks in its reader threads and stores them in order with
        :meth:`put_prepared`. ``data`` must not change until then."""
        self._check_open()
        state = self._devices.get(device)
        if state is None:
            raise NotFound(f"device {device} is not in backup {self.id}")
        if not isinstance(data, bytes):
            data = memoryview(data)
            if data.itemsize != 1 or data.ndim != 1:
                try:
                    data = data.cast("B")
                except TypeError:
                    raise InvalidArgument("block data must be a contiguous buffer") from None
        record = state.record
        if index < 0 or index >= record.block_count:
            raise InvalidArgument(
                f"device {device}: block {index} is outside 0..{record.block_count - 1}"
            )
        length = len(data)
        expect = _block_length(record.size, record.block_size, index)
        if length != expect:
            raise InvalidArgument(
                f"device {device}: block {index} has {length} bytes, not {expect}"
            )
        if state.zero.startswith(data):
            return PreparedBlock(device, index, length, FLAG_ZERO, _zero_digest(length), b"")
        digest = blake3.blake3(data).digest()
        if self.repo.compression == "zstd":
            cctx = getattr(self._tls, "cctx", None)
            if cctx is None:  # compressors are not thread-safe: one per thread
                cctx = self._tls.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            packed = cctx.compress(data)
            if len(packed) < length:
                return PreparedBlock(device, index, length, FLAG_ZSTD, digest, packed)
        return PreparedBlock(device, index, length, 0, digest, data)

    def put_prepared(self, block: PreparedBlock) -> int:
        """Store a block made by :meth:`prepare`; bytes stored."""
        self._check_open()
        device, index = block.device, block.index
        state = self._devices.get(device)
        if state is None:
            raise NotFound(f"device {device} is not in backup {self.id}")
        record = state.record
        with state.lock:
            if index <= state.last:
                raise InvalidArgument(
                    f"device {device}: block {index} after block {state.last}"
                    " (indices must increase)"
                )
            flags, digest = block.flags, block.digest
            stored = 0 if flags == FLAG_ZERO else len(block.blob)
            if stored:
                try:
                    pwrite_full(state.fd, state.offset, block.blob)
                except OSError as exc:
                    raise from_oserror(exc, f"backup {self.id} device {device}") from None
            state.index.append(index)
            state.offsets.append(state.offset)
            state.lengths.append(stored)
            state.flags.append(flags)
            state.sums += digest
            state.offset += stored
            state.last = index
            if state.offset - state.kicked >= _WRITEBACK_STEP and (
                state.flushing is None or state.flushing.done()
            ):
                try:
                    state.settle()
                except OSError as exc:
                    raise from_oserror(exc, f"backup {self.id} device {device}") from None
                state.kicked = state.offset
                state.flushing = self._background().submit(os.fdatasync, state.fd)
            record.blocks_stored += 1
            record.bytes_stored += stored
            if flags == FLAG_ZERO:
                record.blocks_zero += 1
        return stored

    def commit(self) -> BackupInfo:
        """Write the maps and the manifest and publish the backup atomically."""
        self._check_open()
        if not self._devices:
            raise InvalidArgument(f"backup {self.id} has no device")
        for state in self._devices.values():
            record = state.record
            if record.kind == "full" and len(state.index) != record.block_count:
                raise IOFailure(
                    f"backup {self.id} device {record.name} incomplete: a full backup"
                    f" holds {len(state.index)} of {record.block_count} blocks"
                )
        try:
            for state in self._devices.values():
                record = state.record
                if state.fd >= 0:
                    state.settle()
                    os.ftruncate(state.fd, state.offset)  # drop a partial write that failed
                    os.fsync(state.fd)
                    state.close()
                raw = state.rows().tobytes()
                _write_file(state.map_path, raw)
                record.map_checksum = blake3.blake3(raw).hexdigest()
                record.data_size = state.offset
        except OSError as exc:
            raise from_oserror(exc, f"commit backup {self.id}") from None
        return self._publish("ok", None)

    def fail(self, err: int, message: str) -> BackupInfo:
        """Record a failed backup: the manifest only, with the error."""
        self._check_open()
        for state in self._devices.values():
            state.close()
            for path in (state.data_path, state.map_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise from_oserror(exc, f"fail backup {self.id}") from None
            state.record.file = ""
            state.record.map_checksum = ""
            state.record.data_size = 0
        name = errno.errorcode.get(err, f"E{err}")
        return self._publish("failed", {"errno": name, "message": str(message)})

    def _publish(self, state: str, err: dict[str, Any] | None) -> BackupInfo:
        manifest: dict[str, Any] = {
            "format": BACKUP_FORMAT,
            "version": FORMAT_VERSION,
            "id": self.id,
            "seq": self.seq,
            "kind": self.kind,
            "state": state,
            "error": err,
            "started": self.started,
            "finished": _iso_now(),
            "snapshot_id": self.snapshot_id,
            "compression": self.repo.compression,
            "checksum": CHECKSUM,
            "devices": [s.record.as_dict() for s in self._devices.values()],
        }
        manifest["manifest_checksum"] = manifest_checksum(manifest)
        final = os.path.join(self.repo.backups_dir, self.id)
        try:
            with suppress(FileNotFoundError):  # only a staging dir names its snapshot
                os.unlink(os.path.join(self.path, SNAPSHOT_FILE))
            _write_file(
                os.path.join(self.path, MANIFEST), json.dumps(manifest, indent=2).encode() + b"\n"
            )
            fsync_dir(self.path)
            os.rename(self.path, final)
        except OSError as exc:
            raise from_oserror(exc, f"publish backup {self.id}") from None
        # Published: whatever happens now, this writer is finished.
        self._done = True
        self._release()
        try:
            fsync_dir(self.repo.backups_dir)
        except OSError as exc:
            raise from_oserror(exc, f"backup {self.id} published, but fsync backups/") from None
        return _info_from_manifest(manifest, final)

    def abort(self) -> None:
        """Drop the backup: remove the staging directory, record nothing."""
        if self._done:
            return
        self._done = True
        for state in self._devices.values():
            state.close()
        try:
            _remove_tree(self.path)
        except OSError as exc:
            log.warning("backup %s: cannot remove %s: %s", self.id, self.path, exc)
        self._release()

    def _release(self) -> None:
        for state in self._devices.values():
            state.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
