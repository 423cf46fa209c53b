"""The repository's on-disk format, version 2: the code twin of ``docs/REPOSITORY.md``.

Names of files and directories, backup ids, the ``REPO.json`` and manifest
layouts and the manifest checksum (a MAC when the repository is encrypted),
the device index (one chunk digest per chunk of the device), the stored
chunk's framing, the device and backup records, and the rules a reader
checks: a manifest that can be trusted (else the backup is *damaged*), an
index's size and checksum, a chunk's contents. A change here is a change of
the format: the document changes with it (and so does ``FORMAT_VERSION``
where old readers would misread new repositories).

Nothing here takes a lock or writes a file; :mod:`blksnap.backup.repository`,
:mod:`~blksnap.backup.chunkstore`, :mod:`~blksnap.backup.writer`,
:mod:`~blksnap.backup.restore` and :mod:`~blksnap.backup.verify` do, by these
rules. Version 1 repositories are read only by ``blksnap repo upgrade``
(:mod:`blksnap.backup.v1format`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zstandard

from blksnap.errors import IOFailure, NotFound, error
from blksnap.units import MiB

REPO_FORMAT = "blksnap-repository"
BACKUP_FORMAT = "blksnap-backup"
FORMAT_VERSION = 2
CHECKSUM = "blake3"
COMPRESSIONS = ("zstd", "none")
KINDS = ("full", "incremental", "differential")

#: The chunk size of a new repository (``--chunk-size``): chosen by
#: ``make bench`` (BENCHMARKS.md, "Repository v2"): 1 MiB keeps an
#: incremental's re-read small next to 64 KiB CBT blocks and a 16 GiB device
#: at 16384 chunk files.
DEFAULT_CHUNK_SIZE = 1 * MiB
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * MiB

REPO_FILE = "REPO.json"
MANIFEST = "manifest.json"
WRITE_LOCK = "lock"
READ_LOCK = "read.lock"
#: flock: held shared around each chunk a backup stores or reuses, and
#: exclusively by gc while it removes chunks.
CHUNK_LOCK = "chunks.lock"
#: flock: one gc at a time.
GC_LOCK = "gc.lock"
BACKUPS = "backups"
CHUNKS = "chunks"
TMP = "tmp"
#: In a staging dir: the id of the snapshot the backup reads.
SNAPSHOT_FILE = "snapshot"
#: In a staging dir: written once at begin; its mtime is when the backup
#: began, in the repository file system's own clock (gc's grace rule).
BEGUN_FILE = "begun"
#: What a crashed ``init`` may leave in the directory it was making a repository.
INIT_LEFTOVERS = {
    BACKUPS,
    TMP,
    CHUNKS,
    WRITE_LOCK,
    READ_LOCK,
    CHUNK_LOCK,
    GC_LOCK,
    REPO_FILE + ".tmp",
}

#: A backup id (the name of its directory under ``backups/``).
ID_RE = re.compile(r"^\d{8}T\d{6}Z(?:-[1-9]\d*)?$")
#: A device record's ``file``: the index is ``<file>.index``.
FILE_RE = re.compile(r"^dev-\d+$")
INDEX_SUFFIX = ".index"
#: Bytes of a chunk digest (one index row).
DIGEST = 32

#: A stored chunk: magic, version, flags, reserved, plain length, payload
#: length (16 bytes), then the payload: ``kind`` byte (0 raw, 1 zstd) and the
#: data, sealed (AES-256-GCM, nonce first) when the repository is encrypted.
#: The payload length lets a reader see a chunk file cut short (a power cut
#: before it reached the disk) from its size alone.
CHUNK_MAGIC = b"BKSC"
CHUNK_HEADER = struct.Struct("<4sBBHII")
CHUNK_VERSION = 1
CHUNK_ENCRYPTED = 1
KIND_RAW = 0
KIND_ZSTD = 1


# ---------------------------------------------------------------------------
# names, checksums, chunks


def now() -> tuple[str, str]:
    """(backup id base, ISO 8601 UTC time) of this second."""
    t = time.gmtime()
    return time.strftime("%Y%m%dT%H%M%SZ", t), time.strftime("%Y-%m-%dT%H:%M:%SZ", t)


def iso_now() -> str:
    return now()[1]


def canonical_json(obj: Any) -> bytes:
    """The byte form checksums are computed over: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_checksum(manifest: dict[str, Any], mac: Callable[[bytes], str]) -> str:
    """``mac`` (hex blake3, keyed in an encrypted repository) of the canonical
    JSON of ``manifest`` without ``manifest_checksum``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    return mac(canonical_json(body))


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    return min(chunk_size, size - index * chunk_size)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size) if chunk_size > 0 else 0


def check_chunk_size(chunk_size: int) -> None:
    if (
        not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise error(
            errno.EINVAL,
            f"chunk size {chunk_size} is not a power of two from {MIN_CHUNK_SIZE}"
            f" to {MAX_CHUNK_SIZE}",
        )


def chunk_name(digest: bytes) -> tuple[str, str]:
    """(fan-out directory, file name) of a chunk under ``chunks/``."""
    hexd = digest.hex()
    return hexd[:2], hexd


def decompress(dctx: zstandard.ZstdDecompressor, blob: bytes | memoryview, expect: int) -> bytes:
    """Decompress one stored payload of ``expect`` bytes; ZstdError if it is not one.

    The frame's declared size is checked first: a damaged header must not make
    us allocate whatever it claims.
    """
    declared = zstandard.frame_content_size(blob)
    if declared != expect:
        raise zstandard.ZstdError(f"frame declares {declared} bytes, the chunk has {expect}")
    return dctx.decompress(blob, max_output_size=expect)


# ---------------------------------------------------------------------------
# records


def _integer(d: dict[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"device record: {key} is not an integer")
    return value


def _text(d: dict[str, Any], key: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"device record: {key} is not a string")
    return value


@dataclass
class DeviceRecord:
    """What a backup holds of one device: its index lists every chunk."""

    name: str
    size: int
    block_size: int  # the CBT's block size when the backup was taken
    generation_id: str
    changes_number: int
    kind: str  # "full" | "incremental" | "differential"
    parent: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunks_read: int = 0  # chunks read from the image (the rest came from the parent's index)
    chunks_zero: int = 0  # of chunks_read: all zero (never stored)
    chunks_new: int = 0  # of chunks_read: stored now (the repository lacked them)
    chunks_reused: int = 0  # of chunks_read: already in the repository
    bytes_read: int = 0  # set by the caller before commit
    bytes_stored: int = 0  # bytes of the chunk files stored now (compressed, sealed)
    bytes_new: int = 0  # device bytes of chunks_new
    bytes_reused: int = 0  # device bytes of chunks_reused
    image_bytes_read: int | None = None  # set by the caller before commit
    file: str = ""  # "dev-<i>": the index is <file>.index
    index_checksum: str = ""

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_size) if self.block_size > 0 else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "size": self.size,
            "block_size": self.block_size,
            "generation_id": self.generation_id,
            "changes_number": self.changes_number,
            "kind": self.kind,
            "parent": self.parent,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
            "chunks_read": self.chunks_read,
            "chunks_zero": self.chunks_zero,
            "chunks_new": self.chunks_new,
            "chunks_reused": self.chunks_reused,
            "bytes_read": self.bytes_read,
            "bytes_stored": self.bytes_stored,
            "bytes_new": self.bytes_new,
            "bytes_reused": self.bytes_reused,
            "image_bytes_read": self.image_bytes_read,
            "index_checksum": self.index_checksum,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceRecord:
        """Build a record from :meth:`as_dict` output (``chunk_count`` is derived)."""
        parent = d.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ValueError("device record: parent is not a string")
        image = d.get("image_bytes_read")
        if image is not None and (not isinstance(image, int) or isinstance(image, bool)):
            raise ValueError("device record: image_bytes_read is not an integer")
        counters = {
            key: _integer(d, key, 0)
            for key in (
                "chunks_read",
                "chunks_zero",
                "chunks_new",
                "chunks_reused",
                "bytes_read",
                "bytes_stored",
                "bytes_new",
                "bytes_reused",
            )
        }
        return cls(
            name=_text(d, "name"),
            size=_integer(d, "size"),
            block_size=_integer(d, "block_size"),
            generation_id=_text(d, "generation_id"),
            changes_number=_integer(d, "changes_number"),
            kind=_text(d, "kind"),
            parent=parent,
            chunk_size=_integer(d, "chunk_size"),
            image_bytes_read=image,
            file=_text(d, "file", ""),
            index_checksum=_text(d, "index_checksum", ""),
            **counters,
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


def info_from_manifest(
    m: dict[str, Any], path: str, record: Callable[[dict[str, Any]], Any] | None = None
) -> BackupInfo:
    """Build a :class:`BackupInfo` from a parsed manifest (ValueError/KeyError/TypeError
    when a field is missing or of the wrong type); ``record`` builds a device
    record (version 1's are another type)."""
    record = record or DeviceRecord.from_dict
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
        devices=[record(d) for d in devices],
        path=path,
    )


def damaged(
    backup_id: str,
    path: str,
    reason: str,
    m: Any = None,
    record: Callable[[dict[str, Any]], Any] | None = None,
) -> BackupInfo:
    """A backup whose manifest cannot be trusted: listed, never used."""
    record = record or DeviceRecord.from_dict
    m = m if isinstance(m, dict) else {}
    seq = m.get("seq")
    devices: list[DeviceRecord] = []
    if isinstance(m.get("devices"), list):
        for d in m["devices"]:
            try:
                devices.append(record(d))
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
# REPO.json and manifests


def repo_meta(
    compression: str, chunk_size: int, encryption: dict[str, Any] | None
) -> dict[str, Any]:
    """The contents of a new ``REPO.json``."""
    return {
        "format": REPO_FORMAT,
        "version": FORMAT_VERSION,
        "checksum": CHECKSUM,
        "compression": compression,
        "chunk_size": chunk_size,
        "encryption": encryption,
        "created": iso_now(),
    }


def parse_repo_meta(path: str, raw: bytes) -> dict[str, Any]:
    """The checked contents of the ``REPO.json`` of repository ``path``: ENOENT
    if it is not a repository's, EPROTONOSUPPORT if this blksnap cannot read it
    (a version 1 repository: the message names the converter)."""
    meta_path = os.path.join(path, REPO_FILE)
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise IOFailure(f"{meta_path} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != REPO_FORMAT:
        raise NotFound(f"{path} is not a blksnap repository ({REPO_FILE} has another format)")
    version = meta.get("version")
    if version == 1:
        raise error(
            errno.EPROTONOSUPPORT,
            f"{path} is a version 1 repository; this blksnap writes and reads version"
            f" {FORMAT_VERSION}. Convert it with 'blksnap repo upgrade --repo {path} --to NEW'"
            " (a new directory; the old one is left as it is)",
        )
    if version != FORMAT_VERSION:
        raise error(
            errno.EPROTONOSUPPORT,
            f"{path}: repository format version {version} is not supported"
            f" (this blksnap reads version {FORMAT_VERSION})",
        )
    if meta.get("checksum") != CHECKSUM:
        raise error(errno.EPROTONOSUPPORT, f"{path}: unsupported checksum {meta.get('checksum')!r}")
    if meta.get("compression") not in COMPRESSIONS:
        raise error(
            errno.EPROTONOSUPPORT,
            f"{path}: unsupported compression {meta.get('compression')!r}",
        )
    try:
        check_chunk_size(meta.get("chunk_size"))  # type: ignore[arg-type]
    except Exception:
        raise error(
            errno.EPROTONOSUPPORT, f"{path}: unsupported chunk size {meta.get('chunk_size')!r}"
        ) from None
    enc = meta.get("encryption")
    if enc is not None and not isinstance(enc, dict):
        raise error(errno.EPROTONOSUPPORT, f"{path}: unreadable encryption settings")
    return meta


def new_manifest(
    *,
    backup_id: str,
    seq: int,
    kind: str,
    state: str,
    err: dict[str, Any] | None,
    started: str,
    snapshot_id: str | None,
    compression: str,
    records: list[DeviceRecord],
    mac: Callable[[bytes], str],
    finished: str | None = None,
    version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    """The manifest of a backup finished now, with its checksum (``mac``);
    ``version`` 1 writes the old format (tests build version 1 repositories)."""
    manifest: dict[str, Any] = {
        "format": BACKUP_FORMAT,
        "version": version,
        "id": backup_id,
        "seq": seq,
        "kind": kind,
        "state": state,
        "error": err,
        "started": started,
        "finished": finished or iso_now(),
        "snapshot_id": snapshot_id,
        "compression": compression,
        "checksum": CHECKSUM,
        "devices": [record.as_dict() for record in records],
    }
    manifest["manifest_checksum"] = manifest_checksum(manifest, mac)
    return manifest


def parse_manifest(
    backup_id: str,
    path: str,
    raw: bytes,
    mac: Callable[[bytes], str],
    *,
    version: int = FORMAT_VERSION,
    record: Callable[[dict[str, Any]], Any] | None = None,
) -> BackupInfo:
    """The backup ``backup_id`` (directory ``path``) its manifest ``raw``
    describes: damaged if the manifest cannot be trusted. ``version`` and
    ``record`` read a version 1 manifest (:mod:`blksnap.backup.v1format`)."""

    def bad(reason: str, m: Any = None) -> BackupInfo:
        return damaged(backup_id, path, reason, m, record)

    try:
        m = json.loads(raw)
    except (ValueError, RecursionError):
        return bad("manifest.json is not valid JSON")
    if not isinstance(m, dict):
        return bad("manifest.json is not a JSON object")
    if m.get("format") != BACKUP_FORMAT or m.get("version") != version:
        return bad(
            f"unsupported manifest format {m.get('format')!r} version {m.get('version')!r}", m
        )
    if m.get("manifest_checksum") != manifest_checksum(m, mac):
        return bad("manifest checksum mismatch (damaged, or written with another key)", m)
    if m.get("id") != backup_id:
        return bad(f"manifest names backup {m.get('id')!r}, not its directory", m)
    try:
        info = info_from_manifest(m, path, record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return bad(f"malformed manifest: {exc}", m)
    if info.state not in ("ok", "failed"):
        return bad(f"unknown state {info.state!r}", m)
    if version != FORMAT_VERSION:
        return info
    for rec in info.devices:
        try:
            check_chunk_size(rec.chunk_size)
        except Exception:
            return bad(f"device {rec.name}: bad chunk size", m)
        if info.ok and not FILE_RE.match(rec.file):
            return bad(f"device {rec.name}: bad file {rec.file!r}", m)
    return info


# ---------------------------------------------------------------------------
# stored chunks


class BadChunk(Exception):
    """A stored chunk that is not what its name says (the message says why)."""


def frame_chunk(length: int, parts: Sequence[bytes | memoryview], encrypted: bool) -> bytes:
    """A chunk file: the header, then the payload ``parts`` (the kind byte
    and data, or their seal when ``encrypted``), joined in one copy."""
    payload = sum(len(p) for p in parts)
    header = CHUNK_HEADER.pack(
        CHUNK_MAGIC, CHUNK_VERSION, CHUNK_ENCRYPTED if encrypted else 0, 0, length, payload
    )
    return b"".join((header, *parts))


def chunk_file_size(header: bytes) -> int | None:
    """The size a whole chunk file with this header has; None if ``header``
    is not a chunk header."""
    if len(header) < CHUNK_HEADER.size:
        return None
    magic, version, _, _, _, payload = CHUNK_HEADER.unpack_from(header)
    if magic != CHUNK_MAGIC or version != CHUNK_VERSION:
        return None
    return CHUNK_HEADER.size + payload


def unframe_chunk(blob: bytes | memoryview, expect: int, encrypted: bool) -> memoryview:
    """The payload of a chunk file of ``expect`` plain bytes; BadChunk if its
    header is not one this repository writes."""
    if len(blob) < CHUNK_HEADER.size + 1:
        raise BadChunk(f"holds {len(blob)} bytes: too short for a chunk")
    magic, version, flags, _, length, payload = CHUNK_HEADER.unpack_from(blob)
    if magic != CHUNK_MAGIC or version != CHUNK_VERSION:
        raise BadChunk("not a chunk file (bad magic or version)")
    if len(blob) != CHUNK_HEADER.size + payload:
        raise BadChunk(
            f"chunk file holds {len(blob)} bytes, its header says {CHUNK_HEADER.size + payload}"
            " (cut short?)"
        )
    if bool(flags & CHUNK_ENCRYPTED) != encrypted:
        raise BadChunk(
            "not encrypted, in an encrypted repository"
            if encrypted
            else "encrypted, in a repository without encryption"
        )
    if length != expect:
        raise BadChunk(f"holds {length} bytes of data, not {expect}")
    return memoryview(blob)[CHUNK_HEADER.size :]
