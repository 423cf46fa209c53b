"""The repository's on-disk format version 1, kept to read old repositories.

Version 2 (:mod:`blksnap.backup.format`) replaced it; this module is what
``blksnap repo upgrade`` (:mod:`blksnap.backup.upgrade`) reads a version 1
repository with. ``docs/REPOSITORY.md`` describes version 2; the history of
that file holds the version 1 description.

What is here: version 1's ``REPO.json``, its device records and manifest
rules (the records are its own; manifests are parsed by
:func:`blksnap.backup.format.parse_manifest` with version 1's rules), the
block map's row type and flags, a chain's links, a stored block's contents.
Nothing is written in this format any more (tests build version 1
repositories with :func:`repo_meta` and :func:`new_manifest`).
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import zstandard

from blksnap.backup import format as _format
from blksnap.backup.format import BackupInfo, decompress, iso_now
from blksnap.errors import InvalidArgument, IOFailure, NotFound, error

REPO_FORMAT = "blksnap-repository"
FORMAT_VERSION = 1
CHECKSUM = "blake3"
COMPRESSIONS = ("zstd", "none")
KINDS = ("full", "incremental", "differential")

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
READ_LOCK = "read.lock"
BACKUPS = "backups"

#: A backup id (the name of its directory under ``backups/``).
ID_RE = re.compile(r"^\d{8}T\d{6}Z(?:-[1-9]\d*)?$")


# ---------------------------------------------------------------------------
# names, checksums, blocks


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """Hex blake3 of the canonical JSON of ``manifest`` without ``manifest_checksum``."""
    return _format.manifest_checksum(manifest, _plain_mac)


def block_length(size: int, block_size: int, index: int) -> int:
    return min(block_size, size - index * block_size)


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


# ---------------------------------------------------------------------------
# REPO.json and manifests


def repo_meta(compression: str) -> dict[str, Any]:
    """The contents of a new ``REPO.json``."""
    return {
        "format": REPO_FORMAT,
        "version": FORMAT_VERSION,
        "checksum": CHECKSUM,
        "compression": compression,
        "created": iso_now(),
    }


def parse_repo_meta(path: str, raw: bytes) -> dict[str, Any]:
    """The checked contents of the ``REPO.json`` of repository ``path``: ENOENT
    if it is not a repository's, EPROTONOSUPPORT if this blksnap cannot read it."""
    meta_path = os.path.join(path, REPO_FILE)
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
        raise error(errno.EPROTONOSUPPORT, f"{path}: unsupported checksum {meta.get('checksum')!r}")
    if meta.get("compression") not in COMPRESSIONS:
        raise error(
            errno.EPROTONOSUPPORT,
            f"{path}: unsupported compression {meta.get('compression')!r}",
        )
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
) -> dict[str, Any]:
    """A version 1 manifest finished now, with its checksum."""
    return _format.new_manifest(
        backup_id=backup_id,
        seq=seq,
        kind=kind,
        state=state,
        err=err,
        started=started,
        snapshot_id=snapshot_id,
        compression=compression,
        records=records,  # type: ignore[arg-type]
        mac=_plain_mac,
        version=FORMAT_VERSION,
    )


def _plain_mac(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def damaged(backup_id: str, path: str, reason: str, m: Any = None) -> BackupInfo:
    """A version 1 backup whose manifest cannot be trusted."""
    return _format.damaged(backup_id, path, reason, m, DeviceRecord.from_dict)


def parse_manifest(backup_id: str, path: str, raw: bytes) -> BackupInfo:
    """The version 1 backup ``backup_id`` its manifest ``raw`` describes
    (:func:`blksnap.backup.format.parse_manifest`, version 1 rules)."""
    return _format.parse_manifest(
        backup_id, path, raw, _plain_mac, version=FORMAT_VERSION, record=DeviceRecord.from_dict
    )


# ---------------------------------------------------------------------------
# chains


def resolve_chain(index: dict[str, BackupInfo], start: BackupInfo, device: str) -> list[BackupInfo]:
    """The chain of ``device`` as of ``start``, full first, every link checked
    (EINVAL saying which is wrong); ``index`` maps ids to the backups present."""
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
        check_link(where, parent.id, parent_record, record)
        chain.append(parent)
        info, record = parent, parent_record
    chain.reverse()
    return chain


def check_link(where: str, parent_id: str, parent: DeviceRecord, child: DeviceRecord) -> None:
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


# ---------------------------------------------------------------------------
# block maps and stored blocks


def map_structure_problem(rows: np.ndarray, record: DeviceRecord) -> str | None:
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


class BadBlock(Exception):
    """A stored block that is not what its map row says (the message says why)."""


def unpack_block(
    dctx: zstandard.ZstdDecompressor,
    blob: memoryview,
    flags: int,
    expect: int,
    digest: bytes,
) -> bytes | memoryview:
    """The block of ``expect`` bytes a stored ``blob`` holds, checked against its
    row's ``flags`` and ``digest``; :class:`BadBlock` if it is not that block."""
    block: bytes | memoryview = blob
    if flags & FLAG_ZSTD:
        try:
            block = decompress(dctx, blob, expect)
        except zstandard.ZstdError as exc:
            raise BadBlock(f"cannot decompress: {exc}") from None
    if len(block) != expect:
        raise BadBlock(f"holds {len(block)} bytes, not {expect}")
    if blake3.blake3(block).digest() != digest:
        raise BadBlock("checksum mismatch")
    return block
