"""Backup repository: the public face of the repository modules.

Full, incremental and differential backups of devices in a plain directory,
deduplicated (one chunk store shared by every backup and device) and
optionally encrypted. What callers (the CLI, :mod:`blksnap.backup.session`,
tests, other tools) use is re-exported here, so they import from one place
while the code lives where it belongs:

* :mod:`blksnap.backup.format` — the on-disk format, version 2: names,
  records, manifests and their checksum, indexes, chunk framing (the code
  twin of ``docs/REPOSITORY.md``);
* :mod:`blksnap.backup.crypto` — keys: the passphrase or key file, chunk
  sealing, keyed digests and MACs;
* :mod:`blksnap.backup.chunkstore` — the chunks, once each, by digest;
* :mod:`blksnap.backup.repository` — :class:`Repository`: init and open,
  locks, listing, indexes, prune, gc;
* :mod:`blksnap.backup.writer` — :class:`BackupWriter`: staging and
  publication of a backup;
* :mod:`blksnap.backup.restore` — rebuilding a device into a file or a block
  device;
* :mod:`blksnap.backup.verify` — checking backups, :class:`Problem`;
* :mod:`blksnap.backup.retention` — which backups a prune keeps;
* :mod:`blksnap.backup.gc` — removing chunks no backup names;
* :mod:`blksnap.backup.upgrade` — converting a version 1 repository.
"""

from __future__ import annotations

from blksnap.backup.chunkstore import ChunkStore
from blksnap.backup.crypto import Keys
from blksnap.backup.format import (
    BACKUP_FORMAT,
    BACKUPS,
    CHECKSUM,
    CHUNKS,
    COMPRESSIONS,
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    READ_LOCK,
    REPO_FILE,
    REPO_FORMAT,
    SNAPSHOT_FILE,
    TMP,
    WRITE_LOCK,
    BackupInfo,
    DeviceRecord,
    canonical_json,
    manifest_checksum,
)
from blksnap.backup.gc import GcReport
from blksnap.backup.repository import Repository
from blksnap.backup.retention import Decision, Policy
from blksnap.backup.verify import Problem
from blksnap.backup.writer import BackupWriter, PreparedChunk

__all__ = [
    "BACKUPS",
    "BACKUP_FORMAT",
    "CHECKSUM",
    "CHUNKS",
    "COMPRESSIONS",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "KINDS",
    "MANIFEST",
    "READ_LOCK",
    "REPO_FILE",
    "REPO_FORMAT",
    "SNAPSHOT_FILE",
    "TMP",
    "WRITE_LOCK",
    "BackupInfo",
    "BackupWriter",
    "ChunkStore",
    "Decision",
    "DeviceRecord",
    "GcReport",
    "Keys",
    "Policy",
    "PreparedChunk",
    "Problem",
    "Repository",
    "canonical_json",
    "manifest_checksum",
]
