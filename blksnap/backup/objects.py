"""Many writers, one bucket: backups, prunes and gc sharing a repository in an
object store, without locks.

A directory repository serializes writers with ``flock`` and publishes a
backup with one ``rename``. An object store (S3) has neither, and the hosts
writing into one bucket share nothing but the bucket. The rules there, each
relying only on conditional puts and on the store's strong read-after-write
consistency (S3 since 2020, Ceph RGW always):

* **A backup reserves its id** by a conditional put of ``sessions/ID.json``
  (``If-None-Match: *``): two hosts beginning in the same second get ``ID``
  and ``ID-2``. The session record says which host, process and snapshot;
  its time (the store's ``Last-Modified``) is renewed every third of
  ``object_lease``; a record older than the lease is a dead writer's. The
  time the session was first made is when the backup *began*, by the store's
  clock.
* **Chunks are put if absent** (``If-None-Match: *``): two hosts storing the
  same chunk store it once, and what is stored is never replaced.
* **Publication**: the indexes are written to their final keys
  ``backups/ID/dev-N.index`` first; the manifest ``backups/ID/manifest.json``
  last, by one conditional put. A backup without a manifest is invisible to
  every reader (listing, restore, parent choice), so nobody sees another
  host's half-written backup. Then the session record is removed.
* **seq** is 1 + the highest published when a backup begins: two hosts may
  take the same one; order is then (seq, id).
* **gc** (several hosts may run one; each announces itself by a record
  ``gc/RUN.json`` made before it removes anything, marked done at the end,
  renewed like a session):

  1. its *cutoff* is the store's time minus the grace period, or the time the
     oldest live session began minus one second, whichever is earlier: a
     chunk a running backup stored is never older than that backup;
  2. it marks every digest of every index under ``backups/``, published or
     not (an unpublished backup's indexes count from the moment they exist);
  3. it removes unmarked chunks whose time is before the cutoff, looking at
     each again just before (``HEAD``), and indexes of backups that never
     got a manifest, once their session is gone and they are older than the
     cutoff.

  A backup that *reuses* a chunk (found present) could lose it to a gc that
  decided before the backup's index existed. So **a backup checks before it
  publishes**: once its indexes are written it looks at ``gc/``; if a gc was
  removing chunks at any time since the backup began, it waits for that gc to
  end and then checks that every chunk its indexes name is present (a
  ``HEAD`` each). A gc that starts later marks the backup's indexes, which
  exist by then. If a chunk is missing the backup is not published (``EAGAIN``:
  run it again; what it stored is kept and reused).
* **Prune** unpublishes a backup by removing its manifest, then its indexes.
  A backup running on another host with that parent is unharmed: its own
  indexes, once written, name the chunks it took from the parent, and the
  check above covers the time before.
* **Readers** (restore, verify, a mounted backup, an instant restore) make a
  renewed record ``readers/R.json`` before they read anything, and remove it
  when done. A prune refuses (``EBUSY``) while one is live; it looks again
  after it removed the manifests and puts them back if a reader appeared.

The clock is always the store's (:meth:`Storage.now`, ``Last-Modified``),
never a host's: hosts whose clocks disagree still agree on the cutoff.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from blksnap.backup.crypto import create_encryption
from blksnap.backup.format import (
    BACKUPS,
    CHUNKS,
    ID_RE,
    INDEX_SUFFIX,
    MANIFEST,
    REPO_FILE,
    BackupInfo,
    info_from_manifest,
    now,
    repo_meta,
)
from blksnap.backup.storage import Entry, Storage
from blksnap.backup.writer import BackupWriter
from blksnap.errors import BlksnapError, Busy, Exists, IOFailure, NotFound
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
    from blksnap.backup.repository import Repository

log = logging.getLogger("blksnap.backup.repo")

#: Records of running backups.
SESSIONS = "sessions"
#: Records of gc runs.
GC_RUNS = "gc"
#: Records of readers (restore, verify, a mounted backup, an instant restore).
READERS = "readers"


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _lease() -> float:
    return SETTINGS.object_lease


# ---------------------------------------------------------------------------
# creation


def init(
    storage: Storage,
    compression: str,
    chunk_size: int,
    passphrase: bytes | None,
    key_file: str | None,
    encrypt: bool,
) -> None:
    """Make a repository in an object store (the bucket too, if missing).
    ``REPO.json`` is put if absent: two hosts making the same repository at
    once end with one (the second opens the first's)."""
    make_bucket = getattr(storage, "create_bucket", None)
    if make_bucket is not None:
        make_bucket()  # (nothing if it exists and is ours)
    for top in (BACKUPS, CHUNKS):
        if next(storage.list(top + "/"), None) is not None:
            raise Exists(f"{storage.url} holds objects and is not a blksnap repository")
    encryption = None
    if encrypt:
        encryption, _ = create_encryption(passphrase=passphrase, key_file=key_file)
    meta = repo_meta(compression, chunk_size, encryption)
    if not storage.put_if_absent(REPO_FILE, json.dumps(meta, indent=2).encode() + b"\n"):
        log.info("%s: made by another host meanwhile; opening it", storage.url)


# ---------------------------------------------------------------------------
# renewed records: sessions and gc runs


class Record:
    """An object saying a process is at work (``sessions/ID.json``,
    ``gc/RUN.json``), renewed every third of the lease by a thread until
    :meth:`close` removes it (or :meth:`finish` replaces it)."""

    def __init__(self, storage: Storage, key: str, doc: dict[str, Any]) -> None:
        self.storage = storage
        self.key = key
        self.doc = doc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: When the record was made, by the store's clock.
        self.began = 0.0
        #: When it was last written (this host's monotonic clock).
        self.renewed = time.monotonic()

    def create(self) -> bool:
        """Make the record unless one has its key; False if one had."""
        if not self.storage.put_if_absent(self.key, _json(self.doc)):
            return False
        entry = self.storage.stat(self.key)
        self.began = entry.mtime if entry is not None else self.storage.now()
        self.doc["began"] = self.began
        self.update()
        self._thread = threading.Thread(
            target=self._renew, name=f"blksnap-lease-{self.key}", daemon=True
        )
        self._thread.start()
        return True

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.doc.update(fields)
            self.storage.put(self.key, _json(self.doc))
            self.renewed = time.monotonic()

    def check_alive(self, what: str) -> None:
        """EIO if the record went longer than half the lease without being
        renewed (this process was paused, or the store unreachable): others
        may take it for a dead process's by now, so ``what`` must stop."""
        quiet = time.monotonic() - self.renewed
        if quiet > _lease() / 2:
            raise IOFailure(
                f"{what} stopped: its record {self.key} was not renewed for {quiet:.0f} s"
                " (the process paused, or the store out of reach); run it again"
            )

    def _renew(self) -> None:
        while not self._stop.wait(_lease() / 3):
            try:
                self.update()
            except BlksnapError as exc:
                log.warning("%s: cannot renew %s: %s", self.storage.url, self.key, exc.message)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def finish(self, **fields: Any) -> None:
        """Stop renewing and leave the record with ``fields``."""
        self._halt()
        self.update(**fields)

    def close(self) -> None:
        """Stop renewing and remove the record."""
        self._halt()
        try:
            self.storage.delete(self.key)
        except BlksnapError as exc:  # it ages out
            log.warning("%s: cannot remove %s: %s", self.storage.url, self.key, exc.message)


@dataclass
class Seen:
    """A record as another process sees it."""

    key: str
    doc: dict[str, Any]
    mtime: float
    live: bool

    @property
    def began(self) -> float:
        value = self.doc.get("began")
        return float(value) if isinstance(value, (int, float)) else self.mtime


def records(storage: Storage, prefix: str, store_now: float) -> list[Seen]:
    """The records under ``prefix``, each live or not (older than the lease)."""
    out = []
    for entry in storage.list(prefix + "/"):
        if not entry.key.endswith(".json"):
            continue
        try:
            doc = json.loads(storage.get(entry.key))
        except NotFound:
            continue  # removed meanwhile
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        out.append(Seen(entry.key, doc, entry.mtime, entry.mtime >= store_now - _lease()))
    return out


def _who() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


# ---------------------------------------------------------------------------
# a backup


def begin(
    repo: Repository,
    kind: str,
    snapshot_id: str | None,
    as_of: tuple[str, int, str] | None,
) -> BackupWriter:
    """Start a backup in an object store: reserve its id by its session record."""
    storage = repo.storage
    store_now = storage.now()
    sessions = records(storage, SESSIONS, store_now)
    host = socket.gethostname()
    abandoned = []
    for seen in sessions:
        if seen.live:
            continue
        sid = seen.doc.get("snapshot")
        if seen.doc.get("host") == host and isinstance(sid, str):
            abandoned.append(sid)
        log.info("%s: removing the record of a backup that died: %s", repo.path, seen.key)
        storage.delete(seen.key)
    infos = repo.backups()
    seq = 1 + max((info.seq for info in infos), default=0)
    base, started = now()
    if as_of is not None:
        base, seq, started = as_of
    candidate, n = base, 2
    while True:
        record = Record(
            storage,
            f"{SESSIONS}/{candidate}.json",
            {**_who(), "id": candidate, "kind": kind, "snapshot": snapshot_id},
        )
        # (an id is never reused: a dead writer's indexes may be under it)
        taken = next(storage.list(f"{BACKUPS}/{candidate}/"), None) is not None
        if not taken and record.create():
            break
        if as_of is not None:
            raise Exists(f"backup {candidate} exists in {repo.path}")
        candidate, n = f"{base}-{n}", n + 1
    return ObjectBackupWriter(
        repo,
        record,
        backup_id=candidate,
        seq=seq,
        kind=kind,
        snapshot_id=snapshot_id,
        started=started,
        staging=repo.backup_path(candidate),
        lock_fd=-1,
        index={info.id: info for info in infos},
        abandoned_snapshots=abandoned,
    )


class ObjectBackupWriter(BackupWriter):
    """A backup written into an object store (the module docstring's rules)."""

    def __init__(self, repo: Repository, session: Record, **kw: Any) -> None:
        self.session = session
        self.storage = repo.storage
        self._written: list[str] = []
        super().__init__(repo, **kw)
        known = self.store.preload(SETTINGS.object_known_chunks)
        log.info("backup %s: %d chunks in %s", self.id, known, repo.path)

    def attach_snapshot(self, snapshot_id: str) -> None:
        self.snapshot_id = snapshot_id
        self.session.update(snapshot=snapshot_id)

    def _index_location(self, name: str) -> str:
        return f"{BACKUPS}/{self.id}/{name}"

    def _write_index(self, where: str, raw: bytes) -> None:
        self._written.append(where)
        self.storage.put(where, raw)

    def _remove_index(self, where: str) -> None:
        self.storage.delete(where)

    def _before_publish(self, indexes: list[np.ndarray]) -> None:
        """If a gc removed chunks at any time since this backup began, wait
        for it to end and check every chunk the indexes name is there. The
        same if this backup's own record went unrenewed for half the lease
        (paused: a gc may have taken it for dead and removed what it stored)."""
        overlapped = wait_for_sweeps(self.storage, self.session.began)
        quiet = time.monotonic() - self.session.renewed
        if quiet > _lease() / 2:
            overlapped.append(f"(its own record unrenewed for {quiet:.0f} s)")
        if not overlapped:
            return
        digests = {row.tobytes() for index in indexes for row in index}
        zero = {self.store.zero_digest(n) for n in {self.repo.chunk_size} | self._last_lengths()}
        wanted = [d for d in digests if d not in zero]
        log.info(
            "backup %s: a gc ran while it did (%s): checking its %d chunks are there",
            self.id,
            ", ".join(overlapped),
            len(wanted),
        )
        with ThreadPoolExecutor(self.storage.parallelism) as pool:
            present = list(pool.map(lambda d: self.storage.stat(self.store.key(d)), wanted))
        missing = [d for d, e in zip(wanted, present, strict=True) if e is None]
        if missing:
            raise BlksnapError(
                f"backup {self.id}: {len(missing)} chunk(s) it names were removed by a gc that"
                f" ran meanwhile (first {missing[0].hex()}); run the backup again (what it"
                " stored is kept)",
                errno.EAGAIN,
            )

    def _last_lengths(self) -> set[int]:
        out = set()
        for record in self.records:
            if record.chunk_count:
                out.add(record.size - (record.chunk_count - 1) * record.chunk_size)
        return out

    def _publish_manifest(self, manifest: dict[str, Any]) -> BackupInfo:
        key = f"{BACKUPS}/{self.id}/{MANIFEST}"
        if not self.storage.put_if_absent(key, json.dumps(manifest, indent=2).encode() + b"\n"):
            raise Exists(f"backup {self.id} is already published in {self.repo.path}")
        self._done = True
        self._release()
        return info_from_manifest(manifest, self.repo.backup_path(self.id))

    def _discard(self) -> None:
        for key in self._written:
            try:
                self.storage.delete(key)
            except BlksnapError as exc:  # gc removes it later
                log.warning("backup %s: cannot remove %s: %s", self.id, key, exc.message)

    def _release(self) -> None:
        super()._release()
        self.store.forget()
        self.session.close()


def wait_for_sweeps(storage: Storage, since: float) -> list[str]:
    """The gc runs that removed chunks at some time after ``since`` (store
    time), once none of them is still running (a live one is waited for; one
    whose record stopped being renewed died)."""
    while True:
        store_now = storage.now()
        runs = [
            seen
            for seen in records(storage, GC_RUNS, store_now)
            if seen.doc.get("state") == "sweeping" or seen.mtime >= since
        ]
        busy = [seen for seen in runs if seen.doc.get("state") == "sweeping" and seen.live]
        if not busy:
            return [seen.key for seen in runs if seen.mtime >= since]
        log.info("waiting for gc %s to end", ", ".join(s.key for s in busy))
        time.sleep(min(2.0, _lease() / 10))


# ---------------------------------------------------------------------------
# gc and prune


@dataclass
class GcGuard:
    """gc's record in an object store (``gc/RUN.json``): made before anything
    is removed, renewed, marked done at the end."""

    storage: Storage
    record: Record | None = None
    sessions: list[Seen] = field(default_factory=list)
    #: The store's time just after the record was made.
    now: float = 0.0

    def running_since(self) -> list[float]:
        return [s.began for s in self.sessions if s.live]

    def check_alive(self) -> None:
        """Before removing anything: still known to be running (a gc paused
        past its lease may be taken for dead by a backup, which then
        publishes without waiting for it)."""
        if self.record is not None:
            self.record.check_alive("gc")


@contextmanager
def gc_guard(repo: Repository) -> Iterator[GcGuard]:
    storage = repo.storage
    run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
    record = Record(storage, f"{GC_RUNS}/{run}.json", {**_who(), "state": "sweeping"})
    if not record.create():
        raise Busy(f"gc run {run} exists in {repo.path}")
    store_now = storage.now()
    others = [
        s
        for s in records(storage, GC_RUNS, store_now)
        if s.key != record.key and s.live and s.doc.get("state") == "sweeping"
    ]
    if others:
        record.close()
        raise Busy(f"another gc is running on {repo.path} ({others[0].doc.get('host')})")
    guard = GcGuard(storage, record, records(storage, SESSIONS, store_now), store_now)
    try:
        yield guard
    except BaseException:
        record.finish(state="failed")
        raise
    record.finish(state="done")
    # Old records of finished runs go (a backup only needs those since it began).
    store_now = storage.now()
    cutoff = store_now - 4 * _lease()
    for seen in records(storage, GC_RUNS, store_now):
        if seen.key != record.key and not seen.live and seen.mtime < cutoff:
            storage.delete(seen.key)


def orphan_indexes(repo: Repository, guard: GcGuard, cutoff: float) -> list[Entry]:
    """Index objects of backups that never got a manifest and whose session
    is gone (a writer that died), older than ``cutoff``."""
    live = {s.doc.get("id") for s in guard.sessions if s.live}
    out = []
    for backup_id in repo.storage.list_dirs(BACKUPS + "/"):
        if not ID_RE.match(backup_id) or backup_id in live:
            continue
        entries = list(repo.storage.list(f"{BACKUPS}/{backup_id}/"))
        if any(e.key.endswith("/" + MANIFEST) for e in entries):
            continue
        out.extend(e for e in entries if e.key.endswith(INDEX_SUFFIX) and e.mtime < cutoff)
    return out


def reader(storage: Storage) -> Record:
    """A reader's record (``readers/R.json``), renewed until closed: a prune
    on any host refuses (``EBUSY``) while one is live."""
    while True:
        record = Record(storage, f"{READERS}/{secrets.token_hex(8)}.json", _who())
        if record.create():
            return record


def check_no_readers(storage: Storage, busy: str) -> None:
    """EBUSY (``busy``) if a live reader record exists."""
    live = [s for s in records(storage, READERS, storage.now()) if s.live]
    if live:
        who = live[0].doc
        raise Busy(f"{busy} (host {who.get('host')}, pid {who.get('pid')})")


def remove_backups(repo: Repository, doomed: list[BackupInfo], busy: str) -> None:
    """Unpublish (the manifests first) and delete backups. A reader that
    appeared meanwhile puts the manifests back (``EBUSY``): a reader makes its
    record before it reads a manifest, so either it sees this prune's
    manifests gone, or this prune sees its record."""
    storage = repo.storage
    manifests = {}
    for info in doomed:
        key = f"{BACKUPS}/{info.id}/{MANIFEST}"
        try:
            manifests[key] = storage.get(key)
        except NotFound:
            continue  # pruned by another host meanwhile
        storage.delete(key)
    try:
        check_no_readers(storage, busy)
    except Busy:
        for key, raw in manifests.items():
            storage.put_if_absent(key, raw)
        raise
    for info in doomed:
        for entry in storage.list(f"{BACKUPS}/{info.id}/"):
            try:
                storage.delete(entry.key)
            except BlksnapError as exc:
                log.warning("%s: cannot remove %s (gc will): %s", repo.path, entry.key, exc)


__all__ = [
    "GC_RUNS",
    "READERS",
    "SESSIONS",
    "GcGuard",
    "ObjectBackupWriter",
    "Record",
    "begin",
    "check_no_readers",
    "gc_guard",
    "init",
    "orphan_indexes",
    "reader",
    "records",
    "remove_backups",
    "wait_for_sweeps",
]
