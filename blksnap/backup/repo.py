"""Backup repository: the public face of the repository modules.

Full, incremental and differential backups of devices in a plain directory.
What callers (the CLI, :mod:`blksnap.backup.session`, tests, other tools)
use is re-exported here, so they import from one place while the code lives
where it belongs:

* :mod:`blksnap.backup.format` — the on-disk format, version 1: names,
  records, manifests and their checksum, block maps (the code twin of
  ``docs/REPOSITORY.md``);
* :mod:`blksnap.backup.repository` — :class:`Repository`: init and open,
  locks, listing, chains, prune;
* :mod:`blksnap.backup.writer` — :class:`BackupWriter`: staging and
  publication of a backup;
* :mod:`blksnap.backup.restore` — rebuilding a device into a file or a block
  device;
* :mod:`blksnap.backup.verify` — checking backups, :class:`Problem`.
"""

from __future__ import annotations

from blksnap.backup.format import (
    BACKUP_FORMAT,
    BACKUPS,
    CHECKSUM,
    COMPRESSIONS,
    FLAG_ZERO,
    FLAG_ZSTD,
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    MAP_DTYPE,
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
from blksnap.backup.repository import Repository
from blksnap.backup.verify import Problem
from blksnap.backup.writer import BackupWriter, PreparedBlock

__all__ = [
    "BACKUPS",
    "BACKUP_FORMAT",
    "CHECKSUM",
    "COMPRESSIONS",
    "FLAG_ZERO",
    "FLAG_ZSTD",
    "FORMAT_VERSION",
    "KINDS",
    "MANIFEST",
    "MAP_DTYPE",
    "READ_LOCK",
    "REPO_FILE",
    "REPO_FORMAT",
    "SNAPSHOT_FILE",
    "TMP",
    "WRITE_LOCK",
    "BackupInfo",
    "BackupWriter",
    "DeviceRecord",
    "PreparedBlock",
    "Problem",
    "Repository",
    "canonical_json",
    "manifest_checksum",
]
