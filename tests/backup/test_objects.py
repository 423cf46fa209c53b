"""The rules of a repository in an object store (blksnap/backup/objects.py),
exercised fast on a directory used the way an object store is used: no
``flock``, no rename of a directory, only the storage interface (get, put,
put-if-absent, list, delete). The same code runs against a real RADOS
Gateway in tests/s3.

Two ``Repository`` objects on one storage are two hosts: nothing is shared
between them but the objects.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blksnap.backup import objects
from blksnap.backup.format import BACKUPS, MANIFEST
from blksnap.backup.repo import BackupWriter, Repository
from blksnap.backup.storage import DirStorage, Entry
from blksnap.errors import BlksnapError
from blksnap.settings import SETTINGS
from tests.backup.test_repo import (
    CS,
    change,
    cheap_argon2,  # noqa: F401 - autouse fixture
    chunk,
    full,
    incr,
    make_device,
    record,
    restored,
)


class ObjectDir(DirStorage):
    """A directory seen only through the storage interface."""

    atomic_puts = True

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.local_path = None

    def touch(self, key: str) -> Entry | None:
        return self.stat(key)  # (an object store cannot renew an object's time)


def host(root: Path) -> Repository:
    """One host's view of the repository at ``root`` (made if missing)."""
    return Repository.init(ObjectDir(str(root)), chunk_size=CS)


def writing(repo: Repository, data: bytes | bytearray, **kw: Any) -> BackupWriter:
    """A full backup of ``data`` as device disk0, every chunk put, not committed."""
    w = repo.begin("full", **kw)
    w.add_device(record(size=len(data)))
    for c in range(-(-len(data) // CS)):
        w.put("disk0", c, chunk(data, c))
    return w


def chunk_keys(repo: Repository) -> set[str]:
    return {e.key for e in repo.storage.list("chunks/") if not e.key.split("/")[-1].startswith(".")}


def age(repo: Repository, key: str, seconds: float) -> None:
    """Make ``key`` look ``seconds`` old by the store's clock."""
    path = repo.storage.path(key)  # type: ignore[attr-defined]
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "bucket"


def test_round_trip_full_incremental_prune_gc(root: Path, tmp_path: Path) -> None:
    repo = host(root)
    assert not repo.local
    data = make_device(1)
    b1 = full(repo, data)
    data2 = change(data, [0, 4], seed=2)  # (random chunks: b1's are b1's only)
    b2 = incr(repo, data2, [0, 4], b1.id)
    only_b1 = {r.tobytes() for r in repo.read_index(b1, "disk0")} - {
        r.tobytes() for r in repo.read_index(b2, "disk0")
    }
    only_b1 -= {repo.store.zero_digest(CS)}
    assert only_b1
    assert [b.id for b in repo.backups()] == [b1.id, b2.id]
    assert restored(repo, b1.id, tmp_path) == bytes(data)
    assert restored(repo, b2.id, tmp_path) == bytes(data2)
    assert repo.verify() == []
    # nothing of the sessions is left once published
    assert list(repo.storage.list(objects.SESSIONS + "/")) == []
    repo.prune(1)
    assert [b.id for b in repo.backups()] == [b2.id]
    for key in chunk_keys(repo):
        age(repo, key, 3600)
    report = repo.gc(grace=60)
    assert report.chunks_removed == len(only_b1)  # the chunks only b1 had
    assert restored(repo, b2.id, tmp_path) == bytes(data2)
    assert repo.verify() == []


def test_two_hosts_at_once_get_distinct_ids_and_share_chunks(root: Path, tmp_path: Path) -> None:
    a, b = host(root), host(root)
    data = make_device(3)
    wa, wb = a.begin("full"), b.begin("full")
    assert wa.id != wb.id  # reserved by a conditional put of the session record
    for w in (wa, wb):
        w.add_device(record(size=len(data)))
    stored = [0, 0]

    def fill(i: int, w: object) -> None:
        for c in range(-(-len(data) // CS)):
            stored[i] += w.put("disk0", c, chunk(data, c))  # type: ignore[attr-defined]

    threads = [threading.Thread(target=fill, args=(i, w)) for i, w in enumerate((wa, wb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ia, ib = wa.commit(), wb.commit()
    assert {x.id for x in a.backups()} == {ia.id, ib.id} == {x.id for x in b.backups()}
    distinct = {chunk(data, c) for c in range(-(-len(data) // CS)) if any(chunk(data, c))}
    assert len(chunk_keys(a)) == len(distinct)  # stored once, whoever stored it
    assert restored(b, ia.id, tmp_path) == bytes(data) == restored(a, ib.id, tmp_path)


def test_a_backup_being_written_is_invisible(root: Path) -> None:
    a, b = host(root), host(root)
    data = make_device(4)
    w = writing(a, data)
    # its indexes written, the manifest not yet: as after a crash at that point
    state = next(iter(w._devices.values()))
    w._write_index(state.index_path, state.digests.tobytes())
    assert a.storage.stat(state.index_path) is not None
    assert b.backups() == []
    with pytest.raises(BlksnapError) as exc:
        b.get(w.id)
    assert exc.value.errno == errno.ENOENT
    assert b.latest("disk0") is None
    w.abort()
    assert a.storage.stat(state.index_path) is None  # abort removes what it wrote
    assert list(a.storage.list(objects.SESSIONS + "/")) == []


def test_gc_keeps_what_a_running_backup_stored(root: Path, tmp_path: Path) -> None:
    a, b = host(root), host(root)
    data = make_device(5)
    w = writing(a, data)
    report = b.gc(grace=0)  # another host, no grace: the session's start protects
    assert report.running_backups == 1 and report.chunks_removed == 0
    info = w.commit()
    assert restored(b, info.id, tmp_path) == bytes(data)


def test_a_chunk_removed_by_a_gc_meanwhile_stops_publication(root: Path, tmp_path: Path) -> None:
    """Host A reuses an old chunk nobody names (its backup was pruned); host B's
    gc removes it before A's index exists. A must not publish an index naming a
    chunk that is gone: EAGAIN, and the retry stores it again."""
    a, b = host(root), host(root)
    data = make_device(6)
    old = full(a, data)
    a.prune(1)  # keeps it; make another so that `old` can go
    newer = full(a, make_device(7))
    a.prune(1)
    assert [x.id for x in a.backups()] == [newer.id]
    for key in chunk_keys(a):
        age(a, key, 3600)
    w = a.begin("full")
    w.add_device(record(size=len(data)))
    reused = 0
    for c in range(-(-len(data) // CS)):
        reused += w.put("disk0", c, chunk(data, c)) == 0
    assert reused == -(-len(data) // CS)  # every chunk was there (or zero)
    # B's gc: old's chunks are unnamed and older than A's start
    report = b.gc(grace=60)
    assert report.chunks_removed > 0
    with pytest.raises(BlksnapError) as exc:
        w.commit()
    assert exc.value.errno == errno.EAGAIN
    assert "run the backup again" in exc.value.message
    w.abort()
    assert [x.id for x in a.backups()] == [newer.id]
    again = full(a, data)
    assert restored(a, again.id, tmp_path) == bytes(data)
    assert a.verify() == []
    del old


def test_a_gc_that_starts_later_marks_the_unpublished_indexes(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A gc that begins after a backup wrote its indexes (and checked for
    gc runs) but before its manifest is published keeps what they name."""
    a, b = host(root), host(root)
    data = make_device(8)
    old = full(a, data)
    full(a, make_device(9))
    a.prune(1)
    for key in chunk_keys(a):
        age(a, key, 3600)
    w = writing(a, data)
    real = objects.ObjectBackupWriter._publish_manifest
    reports = []

    def publish(self: objects.ObjectBackupWriter, manifest: dict) -> object:
        reports.append(b.gc(grace=60))
        return real(self, manifest)

    monkeypatch.setattr(objects.ObjectBackupWriter, "_publish_manifest", publish)
    info = w.commit()
    assert reports and reports[0].chunks_removed == 0
    assert restored(a, info.id, tmp_path) == bytes(data)
    del old


def test_a_dead_writer_is_cleared(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = host(root)
    data = make_device(10)
    w = writing(a, data, snapshot_id="snap-1")
    state = next(iter(w._devices.values()))
    w._write_index(state.index_path, state.digests.tobytes())
    w.session._halt()  # the process "dies": nothing renews or removes its record
    w._done = True
    monkeypatch.setattr(objects, "SETTINGS", dataclasses.replace(SETTINGS, object_lease=5.0))
    age(a, w.session.key, 60)
    age(a, state.index_path, 3600)
    for key in chunk_keys(a):
        age(a, key, 3600)
    b = host(root)
    nxt = b.begin("full")
    assert nxt.abandoned_snapshots == ["snap-1"]  # same host: its snapshot is named
    assert a.storage.stat(w.session.key) is None
    nxt.abort()
    report = b.gc(grace=60)
    assert a.storage.stat(state.index_path) is None  # the orphan index went
    assert report.chunks_removed == 0  # (the chunks go at the next gc)
    assert b.gc(grace=60).chunks_removed > 0
    assert chunk_keys(b) == set()


def test_sessions_are_renewed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects, "SETTINGS", dataclasses.replace(SETTINGS, object_lease=0.6))
    a = host(root)
    w = a.begin("full")
    key = w.session.key
    first = a.storage.stat(key)
    assert first is not None
    age(a, key, 30)
    time.sleep(0.5)
    renewed = a.storage.stat(key)
    assert renewed is not None and renewed.mtime > time.time() - 5
    w.abort()
    assert a.storage.stat(key) is None


def test_a_backup_waits_for_a_running_gc(root: Path, tmp_path: Path) -> None:
    a, b = host(root), host(root)
    data = make_device(11)
    w = writing(a, data)
    run = objects.Record(b.storage, f"{objects.GC_RUNS}/test-run.json", {"state": "sweeping"})
    assert run.create()
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(w.commit()))
    t.start()
    time.sleep(2.5)
    assert not done, "published while a gc was removing chunks"
    run.finish(state="done")
    t.join(30)
    assert done
    assert restored(a, done[0].id, tmp_path) == bytes(data)  # type: ignore[attr-defined]


def test_prune_on_one_host_while_another_backs_up_on_that_parent(
    root: Path, tmp_path: Path
) -> None:
    a, b = host(root), host(root)
    data = make_device(12)
    parent = full(a, data)
    data2 = change(data, [1], seed=13)
    w = a.begin("incremental")
    w.add_device(record(kind="incremental", parent=parent.id, size=len(data)))
    w.put("disk0", 1, chunk(data2, 1))
    full(b, make_device(14))
    b.prune(1)  # removes the parent meanwhile
    assert parent.id not in {x.id for x in b.backups()}
    info = w.commit()
    assert restored(b, info.id, tmp_path) == bytes(data2)
    assert b.verify() == []


def test_manifest_is_published_once(root: Path) -> None:
    a = host(root)
    info = full(a, make_device(15))
    key = f"{BACKUPS}/{info.id}/{MANIFEST}"
    assert a.storage.put_if_absent(key, b"{}") is False
    assert a.get(info.id).ok


def test_prune_is_busy_while_another_host_reads(root: Path, tmp_path: Path) -> None:
    a, b = host(root), host(root)
    first = full(a, make_device(16))
    full(a, make_device(17))
    hold = b.read_hold()  # (a restore, a verify, a mounted backup on host B)
    with pytest.raises(BlksnapError) as exc:
        a.prune(1)
    assert exc.value.errno == errno.EBUSY and "being read" in exc.value.message
    assert len(a.backups()) == 2
    hold.close()
    a.prune(1)
    assert first.id not in {x.id for x in a.backups()}


def test_a_reader_arriving_during_a_prune_gets_the_manifests_back(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = host(root), host(root)
    data = make_device(18)
    first = full(a, data)
    full(a, make_device(19))
    real = a.storage.delete
    holds = []

    def delete(key: str) -> None:
        real(key)
        if key.endswith("/" + MANIFEST) and not holds:
            holds.append(b.read_hold())  # B starts reading right then

    monkeypatch.setattr(a.storage, "delete", delete)
    with pytest.raises(BlksnapError) as exc:
        a.prune(1)
    assert exc.value.errno == errno.EBUSY
    assert [x.id for x in b.backups()] == [first.id, a.backups()[1].id]  # published again
    assert restored(b, first.id, tmp_path) == bytes(data)
    holds[0].close()


def test_a_gc_paused_past_its_lease_removes_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gc whose record went unrenewed for half its lease (the process was
    paused: a backup elsewhere may have taken it for dead and published
    without waiting) stops before removing anything."""
    a = host(root)
    full(a, make_device(20))
    full(a, make_device(21))
    a.prune(1)
    for key in chunk_keys(a):
        age(a, key, 3600)
    before = chunk_keys(a)
    monkeypatch.setattr(objects, "SETTINGS", dataclasses.replace(SETTINGS, object_lease=1.0))
    monkeypatch.setattr(objects.Record, "_renew", lambda self: None)  # paused: no renewal
    real = a.store.fanouts

    def slow_fanouts() -> list[str]:
        time.sleep(0.7)
        return real()

    monkeypatch.setattr(a.store, "fanouts", slow_fanouts)
    with pytest.raises(BlksnapError) as exc:
        a.gc(grace=0)
    assert exc.value.errno == errno.EIO and "not renewed" in exc.value.message
    assert chunk_keys(a) == before
    (run,) = [s for s in objects.records(a.storage, objects.GC_RUNS, time.time())]
    assert run.doc["state"] == "failed"


def test_a_backup_paused_past_its_lease_checks_its_chunks(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup whose record went unrenewed (the process paused) may have
    been taken for dead by a gc elsewhere, which may have removed what it
    stored: it looks at every chunk before publishing, and refuses (EAGAIN)
    when one is gone."""
    a, b = host(root), host(root)
    data = make_device(22)
    monkeypatch.setattr(objects, "SETTINGS", dataclasses.replace(SETTINGS, object_lease=1.0))
    monkeypatch.setattr(objects.Record, "_renew", lambda self: None)  # paused: no renewal
    w = writing(a, data)
    time.sleep(1.2)  # its record is stale: another host's gc ignores it
    for key in chunk_keys(a):
        age(a, key, 3600)
    monkeypatch.setattr(objects, "wait_for_sweeps", lambda storage, since: [])  # (none seen)
    assert b.gc(grace=60).chunks_removed > 0
    with pytest.raises(BlksnapError) as exc:
        w.commit()
    assert exc.value.errno == errno.EAGAIN
    w.abort()
    assert a.backups() == []
