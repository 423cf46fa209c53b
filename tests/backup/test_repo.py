"""Backup repository (format version 2): layout, writer, restore, verify,
crash safety, prune, locks.

The new capabilities of version 2 (deduplication, encryption, gc, retention
policies, upgrading a version 1 repository) are tested in test_repo_v2.py,
which shares the helpers of this file.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import blake3
import numpy as np
import pytest

import blksnap.backup.crypto as crypto
import blksnap.backup.restore as restore_module
from blksnap.backup.format import CHUNK_HEADER, CHUNK_MAGIC, KIND_RAW, KIND_ZSTD
from blksnap.backup.repo import (
    BackupInfo,
    BackupWriter,
    DeviceRecord,
    Problem,
    Repository,
    manifest_checksum,
)
from blksnap.errors import BlksnapError
from blksnap.settings import SETTINGS

CS = 64 * 1024  # the repository's chunk size (the minimum)
CHUNKS = 40
TAIL = 5000  # the odd-sized last chunk
SIZE = (CHUNKS - 1) * CS + TAIL
BS = 16 * 1024  # the CBT block size recorded with each device
GEN = "gen-1"


# ---------------------------------------------------------------------------
# helpers (also used by test_repo_v2.py)


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def count_chunks(size: int, cs: int = CS) -> int:
    return -(-size // cs)


def make_device(seed: int = 0, size: int = SIZE, cs: int = CS) -> bytearray:
    """Random, zero and compressible chunks; the last chunk is short."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for i in range(count_chunks(size, cs)):
        lo, hi = i * cs, min(size, (i + 1) * cs)
        kind = i % 4
        if kind == 0:
            data[lo:hi] = rnd.randbytes(hi - lo)
        elif kind == 1:
            pass  # zero
        elif kind == 2:
            text = (f"chunk {i} seed {seed} compresses well. " * (cs // 16 + 1)).encode()
            data[lo:hi] = text[: hi - lo]
        else:
            data[lo:hi] = rnd.randbytes(hi - lo) if rnd.random() < 0.5 else bytes(hi - lo)
    return data


def chunk(data: bytes | bytearray, i: int, cs: int = CS) -> bytes:
    return bytes(data[i * cs : min(len(data), (i + 1) * cs)])


def zero_chunks(data: bytes | bytearray, cs: int = CS) -> list[int]:
    return [i for i in range(count_chunks(len(data), cs)) if not any(chunk(data, i, cs))]


def change(data: bytearray, chunks: Iterable[int], seed: int, cs: int = CS) -> bytearray:
    """A new version of ``data`` with ``chunks`` rewritten (random, or zero)."""
    rnd = random.Random(seed)
    new = bytearray(data)
    for i in chunks:
        lo, hi = i * cs, min(len(new), (i + 1) * cs)
        new[lo:hi] = rnd.randbytes(hi - lo) if rnd.random() < 0.7 else bytes(hi - lo)
    return new


def record(
    name: str = "disk0",
    kind: str = "full",
    parent: str | None = None,
    size: int = SIZE,
    bs: int = BS,
    gen: str = GEN,
    changes: int = 1,
) -> DeviceRecord:
    return DeviceRecord(
        name=name,
        size=size,
        block_size=bs,
        generation_id=gen,
        changes_number=changes,
        kind=kind,
        parent=parent,
    )


def write_backup(
    w: BackupWriter,
    devices: dict[str, tuple[bytes | bytearray, Iterable[int] | None, str | None, str]],
    changes: int = 1,
) -> None:
    """Add ``devices`` to ``w`` and put their chunks: name -> (contents, chunk
    indices to put or None for all, parent, record kind)."""
    for name, (data, chunks, parent, rkind) in devices.items():
        rec = record(name, rkind, parent, size=len(data), changes=changes)
        w.add_device(rec)
        indices = list(chunks) if chunks is not None else range(rec.chunk_count)
        for i in indices:
            w.put(name, i, chunk(data, i))
        rec.bytes_read = sum(len(chunk(data, i)) for i in indices)
        rec.image_bytes_read = rec.bytes_read


def backup(
    repo: Repository,
    kind: str,
    devices: dict[str, tuple[bytes | bytearray, Iterable[int] | None, str | None, str]],
) -> BackupInfo:
    """One backup (see :func:`write_backup`)."""
    with repo.begin(kind, snapshot_id="snap-x") as w:
        write_backup(w, devices)
        return w.commit()


def full(repo: Repository, data: bytes | bytearray, name: str = "disk0") -> BackupInfo:
    return backup(repo, "full", {name: (data, None, None, "full")})


def incr(
    repo: Repository,
    data: bytes | bytearray,
    chunks: Iterable[int],
    parent: str,
    kind: str = "incremental",
    name: str = "disk0",
) -> BackupInfo:
    return backup(repo, kind, {name: (data, sorted(chunks), parent, kind)})


def restored(repo: Repository, backup_id: str, tmp_path: Path, name: str = "disk0") -> bytes:
    target = tmp_path / f"restore-{backup_id}-{name.replace('/', '_')}.img"
    result = repo.restore(backup_id, name, str(target), force=True)
    data = target.read_bytes()
    assert result["sha256"] == sha256(data)
    assert result["size"] == len(data)
    target.unlink()
    return data


def rewrite_manifest(repo: Repository, info: BackupInfo, **changes: object) -> None:
    """Edit a manifest the way another (buggy) writer could: checksum still valid."""
    path = os.path.join(info.path, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    for key, value in changes.items():
        if key.startswith("dev_"):
            m["devices"][0][key[4:]] = value
        else:
            m[key] = value
    m["manifest_checksum"] = manifest_checksum(m, repo.keys.mac)
    with open(path, "w") as f:
        json.dump(m, f)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def errno_of(excinfo: pytest.ExceptionInfo[BlksnapError]) -> int:
    return excinfo.value.errno


def digest_of(repo: Repository, info: BackupInfo, i: int, name: str = "disk0") -> bytes:
    """The digest chunk ``i`` of ``name`` has in ``info``'s index."""
    return repo.read_index(info, name)[i].tobytes()


def chunk_files(repo: Repository) -> set[str]:
    """The names of the chunk files under chunks/."""
    out = set()
    for fan in os.listdir(repo.store.dir):
        for name in os.listdir(os.path.join(repo.store.dir, fan)):
            assert name.startswith(fan) and len(name) == 64, name
            out.add(name)
    return out


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2id at a test cost, and no passphrase from the environment."""
    monkeypatch.setattr(crypto, "ARGON2_ITERATIONS", 1)
    monkeypatch.setattr(crypto, "ARGON2_LANES", 1)
    monkeypatch.setattr(crypto, "ARGON2_MEMORY_KIB", 1024)
    monkeypatch.delenv(crypto.PASSPHRASE_ENV, raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CS)


# ---------------------------------------------------------------------------
# repository creation


def test_init_is_idempotent_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "repo"
    repo = Repository.init(str(path), compression="none", chunk_size=CS)
    meta = json.loads((path / "REPO.json").read_text())
    assert meta["format"] == "blksnap-repository"
    assert meta["version"] == 2
    assert meta["checksum"] == "blake3"
    assert meta["compression"] == "none"
    assert meta["chunk_size"] == CS
    assert meta["encryption"] is None
    assert repo.compression == "none" and repo.chunk_size == CS
    assert not repo.keys.encrypted
    assert sorted(os.listdir(path)) == [
        "REPO.json",
        "backups",
        "chunks",
        "lock",
        "read.lock",
        "tmp",
    ]
    for sub in ("backups", "chunks", "tmp"):
        assert os.stat(path / sub).st_mode & 0o777 == 0o700
    # Again: the same repository, its compression and chunk size kept.
    again = Repository.init(str(path), chunk_size=4 * CS)
    assert again.compression == "none" and again.chunk_size == CS
    assert Repository.open(str(path)).path == str(path)
    # Encryption is chosen when the repository is made.
    with pytest.raises(BlksnapError) as exc:
        Repository.init(str(path), encrypt=True, passphrase=b"pw")
    assert errno_of(exc) == errno.EEXIST

    empty = tmp_path / "empty"
    empty.mkdir()
    fresh = Repository.init(str(empty))
    assert fresh.compression == "zstd" and fresh.chunk_size == 1024 * 1024

    # What a crashed init leaves is not foreign.
    leftovers = tmp_path / "leftovers"
    (leftovers / "chunks").mkdir(parents=True)
    (leftovers / "lock").write_bytes(b"")
    (leftovers / "REPO.json.tmp").write_bytes(b"{")
    assert Repository.init(str(leftovers), chunk_size=CS).chunk_size == CS

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"x")
    with pytest.raises(BlksnapError) as exc:
        Repository.init(str(foreign))
    assert errno_of(exc) == errno.EEXIST
    assert not (foreign / "REPO.json").exists()

    afile = tmp_path / "file"
    afile.write_bytes(b"x")
    with pytest.raises(BlksnapError) as exc:
        Repository.init(str(afile))
    assert errno_of(exc) == errno.EEXIST

    with pytest.raises(BlksnapError) as exc:
        Repository.init(str(tmp_path / "bad"), compression="lz4")
    assert errno_of(exc) == errno.EINVAL
    for bad in (CS // 2, 3 * CS, 1000, 32 * 1024 * 1024):
        with pytest.raises(BlksnapError) as exc:
            Repository.init(str(tmp_path / "bad"), chunk_size=bad)
        assert errno_of(exc) == errno.EINVAL
    assert not (tmp_path / "bad").exists()

    with pytest.raises(BlksnapError) as exc:
        Repository.open(str(foreign))
    assert errno_of(exc) == errno.ENOENT

    for key, value in (("version", 3), ("chunk_size", 1000), ("compression", "lz4")):
        changed = dict(meta, **{key: value})
        (path / "REPO.json").write_text(json.dumps(changed))
        with pytest.raises(BlksnapError) as exc:
            Repository.open(str(path))
        assert errno_of(exc) == errno.EPROTONOSUPPORT, key


# ---------------------------------------------------------------------------
# full backups


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_full_backup_restores_and_keeps_holes(tmp_path: Path, compression: str) -> None:
    repo = Repository.init(str(tmp_path / "repo"), compression=compression, chunk_size=CS)
    data = make_device(1)
    zeros = zero_chunks(data)
    assert 1 in zeros and len(zeros) >= 10
    stored_total = 0
    with repo.begin("full", snapshot_id="snap-1") as w:
        rec = record()
        w.add_device(rec)
        assert rec.file == "dev-0" and rec.chunk_size == CS
        for i in range(CHUNKS):
            stored = w.put("disk0", i, memoryview(chunk(data, i)))
            if i in zeros:
                assert stored == 0
            else:
                assert CHUNK_HEADER.size < stored <= CS + CHUNK_HEADER.size + 1
            stored_total += stored
        rec.bytes_read = SIZE
        info = w.commit()
    assert info.ok and info.kind == "full" and info.seq == 1
    assert info.snapshot_id == "snap-1"
    assert info.compression == compression
    d = info.device("disk0")
    assert d.chunk_count == CHUNKS and d.chunk_size == CS
    assert d.chunks_read == CHUNKS
    assert d.chunks_zero == len(zeros)
    assert d.chunks_new == CHUNKS - len(zeros)
    assert d.chunks_reused == 0
    assert d.bytes_new == SIZE - sum(len(chunk(data, i)) for i in zeros)
    assert d.bytes_read == SIZE
    assert d.bytes_stored == stored_total
    assert sorted(os.listdir(info.path)) == ["dev-0.index", "manifest.json"]

    # The format: an index of plain blake3 digests, one per chunk, in order ...
    raw = (Path(info.path) / "dev-0.index").read_bytes()
    assert raw == b"".join(blake3.blake3(chunk(data, i)).digest() for i in range(CHUNKS))
    assert blake3.blake3(raw).hexdigest() == d.index_checksum
    assert (repo.read_index(info, "disk0")[5].tobytes()) == blake3.blake3(chunk(data, 5)).digest()
    # ... and one chunk file per distinct non-zero chunk, named by its digest.
    expect = {blake3.blake3(chunk(data, i)).hexdigest() for i in range(CHUNKS) if i not in zeros}
    assert chunk_files(repo) == expect
    for i in (0, 2):
        hexd = blake3.blake3(chunk(data, i)).hexdigest()
        blob = (Path(repo.path) / "chunks" / hexd[:2] / hexd).read_bytes()
        magic, version, flags, _, length, payload = CHUNK_HEADER.unpack_from(blob)
        assert (magic, version, flags, length) == (CHUNK_MAGIC, 1, 0, CS)
        assert payload == len(blob) - CHUNK_HEADER.size
        kind = blob[CHUNK_HEADER.size]
        if compression == "zstd" and i == 2:  # the compressible chunk
            assert kind == KIND_ZSTD and len(blob) < CS // 4
        else:  # random data, or no compression: kept raw
            assert kind == KIND_RAW
            assert blob[CHUNK_HEADER.size + 1 :] == chunk(data, i)

    manifest = json.loads((Path(info.path) / "manifest.json").read_text())
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["manifest_checksum"] == blake3.blake3(canon).hexdigest()
    assert manifest["version"] == 2
    assert manifest["devices"][0]["name"] == "disk0"
    assert manifest["devices"][0]["chunk_count"] == CHUNKS

    target = tmp_path / "out.img"
    target.write_bytes(b"old contents " * 300_000)  # longer: must be replaced
    with pytest.raises(BlksnapError) as exc:
        repo.restore(info.id, "disk0", str(target))
    assert errno_of(exc) == errno.EEXIST
    seen: list[int] = []
    result = repo.restore(info.id, "disk0", str(target), progress=seen.append, force=True)
    out = target.read_bytes()
    assert out == bytes(data)
    assert result["sha256"] == sha256(data)
    assert result["backup"] == info.id and result["device"] == "disk0"
    assert result["size"] == SIZE
    assert sum(seen) == SIZE
    assert result["bytes_written"] == SIZE - sum(len(chunk(data, i)) for i in zeros)
    # Zero chunks are holes: far less allocated than the size.
    allocated = os.stat(target).st_blocks * 512
    assert allocated <= SIZE - (len(zeros) - 2) * CS
    # No temporary left beside the target.
    assert sorted(os.listdir(tmp_path)) == ["out.img", "repo"]

    with pytest.raises(BlksnapError) as exc:
        repo.restore(info.id, "disk0", str(tmp_path))
    assert errno_of(exc) == errno.EINVAL


def test_put_and_add_device_errors(repo: Repository) -> None:
    data = make_device(2)
    w = repo.begin("full")
    w.add_device(record())
    with pytest.raises(BlksnapError) as exc:
        w.add_device(record())
    assert errno_of(exc) == errno.EEXIST
    bad_records = [
        record(""),
        record("other", kind="incremental", parent=None),
        record("other", kind="incremental", parent="20260101T000000Z"),
        record("other", kind="weekly"),
        record("other", parent="20260101T000000Z"),  # a full has no parent
        record("other", size=-1),
        record("other", bs=0),
    ]
    for bad in bad_records:
        with pytest.raises(BlksnapError) as exc:
            w.add_device(bad)
        assert errno_of(exc) == errno.EINVAL, bad
    with pytest.raises(BlksnapError) as exc:
        w.put("nosuch", 0, chunk(data, 0))
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(BlksnapError) as exc:
        w.put("disk0", 0, chunk(data, 0)[:-1])
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc:
        w.put("disk0", CHUNKS - 1, bytes(CS))  # the last chunk is short
    assert errno_of(exc) == errno.EINVAL
    for index in (CHUNKS, -1):
        with pytest.raises(BlksnapError) as exc:
            w.put("disk0", index, bytes(CS))
        assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc:  # not contiguous, 8-byte items
        w.put("disk0", 0, np.zeros(CS // 4, dtype=np.uint64)[::2])
    assert errno_of(exc) == errno.EINVAL
    # Chunks go in any order.
    for i in (3, 2, 0):
        w.put("disk0", i, chunk(data, i))
    w.abort()
    with pytest.raises(BlksnapError) as exc:
        w.put("disk0", 4, chunk(data, 4))
    assert errno_of(exc) == errno.EALREADY
    assert repo.backups() == []
    assert os.listdir(repo.tmp_dir) == []

    # A backup with no device cannot commit.
    with pytest.raises(BlksnapError) as exc, repo.begin("full") as w:
        w.commit()
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc, repo.begin("full") as w:
        w.add_device(record(kind="differential", parent="20260101T000000Z"))
    assert errno_of(exc) == errno.EINVAL


def test_non_contiguous_byte_buffer_is_einval(repo: Repository) -> None:
    with repo.begin("full") as w:
        w.add_device(record(size=2 * CS))
        view = np.frombuffer(os.urandom(2 * CS), dtype=np.uint8)[::2]
        with pytest.raises(BlksnapError) as exc:
            w.put("disk0", 0, view)
        assert errno_of(exc) == errno.EINVAL


def test_full_with_a_missing_chunk_cannot_commit(repo: Repository) -> None:
    data = make_device(3)
    with pytest.raises(BlksnapError) as exc, repo.begin("full") as w:
        w.add_device(record())
        for i in range(CHUNKS):
            if i != 17:
                w.put("disk0", i, chunk(data, i))
        w.commit()
    assert errno_of(exc) == errno.EIO
    assert "incomplete" in str(exc.value) and "chunk 17" in str(exc.value)
    # The with block aborted: nothing recorded, staging gone, lock free.
    assert repo.backups() == []
    assert os.listdir(repo.tmp_dir) == []
    repo.begin("full", blocking=False).abort()

    # Without a with block the writer stays open: the caller records a failure.
    w = repo.begin("full")
    w.add_device(record())
    w.put("disk0", 0, chunk(data, 0))
    with pytest.raises(BlksnapError):
        w.commit()
    info = w.fail(errno.EIO, "device read error")
    assert info.state == "failed"
    assert [b.state for b in repo.backups()] == ["failed"]


def test_several_devices_in_one_backup(repo: Repository, tmp_path: Path) -> None:
    a = make_device(4)
    b = make_device(5, size=7 * CS)  # no short tail
    info = backup(
        repo,
        "full",
        {
            "sda": (a, None, None, "full"),
            "vg/root": (b, None, None, "full"),
            "empty": (b"", None, None, "full"),
        },
    )
    assert [d.file for d in info.devices] == ["dev-0", "dev-1", "dev-2"]
    assert sorted(os.listdir(info.path)) == [
        "dev-0.index",
        "dev-1.index",
        "dev-2.index",
        "manifest.json",
    ]
    assert info.device("vg/root").chunk_count == 7
    assert info.device("empty").chunk_count == 0
    assert restored(repo, info.id, tmp_path, "sda") == a
    assert restored(repo, info.id, tmp_path, "vg/root") == b
    assert restored(repo, info.id, tmp_path, "empty") == b""
    with pytest.raises(BlksnapError) as exc:
        info.device("sdb")
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(BlksnapError) as exc:
        repo.restore(info.id, "sdb", str(tmp_path / "x"))
    assert errno_of(exc) == errno.ENOENT
    assert not (tmp_path / "x").exists()
    assert repo.verify() == []


# ---------------------------------------------------------------------------
# incremental and differential backups


def test_incremental_and_differential(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(10)
    b0 = full(repo, v0)
    c1 = [1, 5, 6, CHUNKS - 1]
    v1 = change(v0, c1, 11)
    b1 = incr(repo, v1, c1, b0.id)
    c2 = [0, 5, 20, 21]
    v2 = change(v1, c2, 12)
    b2 = incr(repo, v2, c2, b1.id)
    c3 = [7, 8, 9]
    v3 = change(v2, c3, 13)
    # Differential: everything changed since the full.
    b3 = incr(repo, v3, set(c1 + c2 + c3), b0.id, kind="differential")
    c4 = [30]
    v4 = change(v3, c4, 14)
    b4 = incr(repo, v4, c4, b3.id)  # an incremental on top of a differential

    assert [b.seq for b in repo.backups()] == [1, 2, 3, 4, 5]
    assert [b.kind for b in repo.backups()] == [
        "full",
        "incremental",
        "incremental",
        "differential",
        "incremental",
    ]
    rec1 = b1.device("disk0")
    assert rec1.parent == b0.id and rec1.chunks_read == len(c1)
    assert b3.device("disk0").chunks_read == len(set(c1 + c2 + c3))
    # Every index is whole: the parent's digests where nothing was put.
    i0, i1 = repo.read_index(b0, "disk0"), repo.read_index(b1, "disk0")
    same = [i for i in range(CHUNKS) if i not in c1]
    assert (i0[same] == i1[same]).all()
    assert all((i0[i] != i1[i]).any() for i in c1)
    for info, version in [(b0, v0), (b1, v1), (b2, v2), (b3, v3), (b4, v4)]:
        assert restored(repo, info.id, tmp_path) == version, info.id
    assert restored(repo, "latest", tmp_path) == v4

    assert repo.get("latest").id == b4.id
    assert repo.latest("disk0").id == b4.id
    assert repo.latest("disk0", ("full",)).id == b0.id
    assert repo.latest("disk0", ("differential",)).id == b3.id
    assert repo.latest("disk1") is None
    assert repo.verify() == []

    # Nothing reads a parent at restore time: without b0 and b1, b2 is whole.
    shutil.rmtree(b0.path)
    shutil.rmtree(b1.path)
    assert restored(repo, b2.id, tmp_path) == v2
    assert restored(repo, b4.id, tmp_path) == v4
    assert repo.verify() == []


def test_device_full_inside_an_incremental_backup(repo: Repository, tmp_path: Path) -> None:
    a0, b0 = make_device(20), make_device(21)
    first = full(repo, a0, "a")
    a1 = change(a0, [3], 22)
    # Device b is new (no parent): full within an incremental backup.
    second = backup(
        repo,
        "incremental",
        {"a": (a1, [3], first.id, "incremental"), "b": (b0, None, None, "full")},
    )
    assert second.kind == "incremental"
    assert second.device("b").kind == "full"
    assert second.device("a").kind == "incremental"
    assert restored(repo, second.id, tmp_path, "a") == a1
    assert restored(repo, second.id, tmp_path, "b") == b0
    assert repo.latest("b", ("full",)).id == second.id
    with pytest.raises(BlksnapError) as exc, repo.begin("full") as w:
        w.add_device(record("c", kind="incremental", parent=first.id))
    assert errno_of(exc) == errno.EINVAL


def test_parent_errors(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(30)
    b0 = full(repo, v0)
    v1 = change(v0, [2], 31)
    b1 = incr(repo, v1, [2], b0.id)

    # A writer refuses a parent of another generation or size, a failed one,
    # one without the device, and a differential on top of an incremental.
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id, gen="gen-2"))
    assert errno_of(exc) == errno.EINVAL and "generation" in str(exc.value)
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id, size=SIZE + CS))
    assert errno_of(exc) == errno.EINVAL and "size" in str(exc.value)
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record("disk9", kind="incremental", parent=b0.id))
    assert errno_of(exc) == errno.EINVAL
    w = repo.begin("full")
    w.add_device(record())
    failed = w.fail(errno.ENOSPC, "disk full")
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=failed.id))
    assert errno_of(exc) == errno.EINVAL and "failed" in str(exc.value)
    with pytest.raises(BlksnapError) as exc, repo.begin("differential") as w:
        w.add_device(record(kind="differential", parent=b1.id))
    assert errno_of(exc) == errno.EINVAL and "full" in str(exc.value)

    # Parents changed behind the writer's back (another writer, a hand edit).
    rewrite_manifest(repo, b0, dev_chunk_size=2 * CS)
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id))
    assert errno_of(exc) == errno.EINVAL and "chunk size" in str(exc.value)
    rewrite_manifest(repo, b0, dev_chunk_size=CS)
    with open(os.path.join(b0.path, "dev-0.index"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id))
    assert errno_of(exc) == errno.EIO and "truncated" in str(exc.value)
    flip(os.path.join(b0.path, "manifest.json"), 30)
    assert repo.get(b0.id).state == "damaged"
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id))
    assert errno_of(exc) == errno.EINVAL and "damaged" in str(exc.value)
    # The incremental does not need its parent any more.
    assert restored(repo, b1.id, tmp_path) == v1

    with pytest.raises(BlksnapError) as exc:
        repo.get("20990101T000000Z")
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(BlksnapError) as exc:
        repo.get("../../etc")
    assert errno_of(exc) == errno.ENOENT


# ---------------------------------------------------------------------------
# failures and crashes


def test_failed_backup_is_listed_and_never_used(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(40)
    b0 = full(repo, v0)
    w = repo.begin("incremental", snapshot_id="snap-2")
    rec = record(kind="incremental", parent=b0.id)
    w.add_device(rec)
    w.put("disk0", 0, chunk(v0, 0))
    rec.bytes_read = CS
    info = w.fail(errno.ENOSPC, "no space left in diff storage")
    assert info.state == "failed" and not info.ok
    assert info.error == {"errno": "ENOSPC", "message": "no space left in diff storage"}
    assert os.listdir(info.path) == ["manifest.json"]
    assert info.device("disk0").bytes_read == CS
    assert info.device("disk0").file == ""
    assert info.snapshot_id == "snap-2"
    listed = repo.backups()
    assert [(b.id, b.state) for b in listed] == [(b0.id, "ok"), (info.id, "failed")]
    assert listed[1].seq == 2
    assert repo.get(info.id).state == "failed"
    assert repo.get("latest").id == b0.id
    assert repo.latest("disk0").id == b0.id
    with pytest.raises(BlksnapError) as exc:
        repo.restore(info.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc:
        repo.read_index(info, "disk0")
    assert errno_of(exc) == errno.EINVAL
    assert repo.verify() == []  # failed backups are not problems ...
    problems = repo.verify(info.id)  # ... unless asked for by name
    assert [(p.backup, p.device) for p in problems] == [(info.id, None)]
    assert "failed" in problems[0].message
    with pytest.raises(BlksnapError) as exc:
        w.commit()
    assert errno_of(exc) == errno.EALREADY
    # The next incremental is based on the last good backup.
    b2 = incr(repo, change(v0, [3], 41), [3], repo.latest("disk0").id)
    assert b2.device("disk0").parent == b0.id and b2.seq == 3


def _crash_in_child(repo_path: str, data: bytes) -> None:
    """Fork a child that writes half a backup and dies without cleaning up."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            repo = Repository.open(repo_path)
            w = repo.begin("full", snapshot_id="snap-dead")
            w.add_device(record())
            for i in range(CHUNKS // 2):
                w.put("disk0", i, chunk(data, i))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_crash_leaves_only_staging(repo: Repository, tmp_path: Path) -> None:
    data = make_device(50)
    b0 = full(repo, data)
    before = chunk_files(repo)
    other = make_device(51)
    _crash_in_child(repo.path, bytes(other))
    staged = os.listdir(repo.tmp_dir)
    assert len(staged) == 1
    assert sorted(os.listdir(os.path.join(repo.tmp_dir, staged[0]))) == ["begun", "snapshot"]
    orphans = chunk_files(repo) - before
    assert orphans  # the chunks it stored stay until gc
    assert [b.id for b in repo.backups()] == [b0.id]  # the half backup is not listed
    with pytest.raises(BlksnapError) as exc:
        repo.get(staged[0])
    assert errno_of(exc) == errno.ENOENT
    assert repo.verify() == []
    # A staging dir with "begun" protects its chunks from gc ...
    assert repo.gc(grace=0).chunks_removed == 0
    # ... the dead writer's lock is gone with it; the next writer removes its
    # leftovers and names the snapshot it left behind.
    w = repo.begin("full", blocking=False)
    assert w.abandoned_snapshots == ["snap-dead"]
    assert os.listdir(repo.tmp_dir) == [w.id]
    w.abort()
    assert os.listdir(repo.tmp_dir) == []
    assert restored(repo, b0.id, tmp_path) == data
    # Then gc frees exactly the orphans.
    report = repo.gc(grace=0)
    assert report.chunks_removed == len(orphans)
    assert chunk_files(repo) == before
    assert repo.verify() == []


def test_exception_inside_with_aborts(repo: Repository) -> None:
    data = make_device(52)
    with pytest.raises(RuntimeError), repo.begin("full") as w:
        w.add_device(record())
        w.put("disk0", 0, chunk(data, 0))
        raise RuntimeError("reader died")
    assert repo.backups() == []
    assert os.listdir(repo.tmp_dir) == []
    repo.begin("full", blocking=False).abort()


# ---------------------------------------------------------------------------
# verify


def test_verify_finds_a_flipped_chunk_byte(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(60)
    b0 = full(repo, v0)
    v1 = change(v0, [4, 8], 61)
    b1 = incr(repo, v1, [4, 8], b0.id)
    seen: list[int] = []
    assert repo.verify(progress=seen.append) == []
    # Each distinct non-zero chunk is checked once, whatever shares it.
    distinct = {
        digest_of(repo, b, i): len(chunk(v, i))
        for b, v in ((b0, v0), (b1, v1))
        for i in range(CHUNKS)
        if any(chunk(v, i))
    }
    assert sum(seen) == sum(distinct.values())

    digests = {}
    for i in (2, 12):  # a compressed and a raw chunk, shared by both backups
        digests[i] = digest_of(repo, b0, i).hex()
        path = repo.store.path(bytes.fromhex(digests[i]))
        flip(path, os.path.getsize(path) // 2)
    problems = repo.verify()
    assert [(p.backup, p.device, p.chunk, p.digest) for p in problems] == [
        (b0.id, "disk0", 2, digests[2]),
        (b0.id, "disk0", 12, digests[12]),
        (b1.id, "disk0", 2, digests[2]),
        (b1.id, "disk0", 12, digests[12]),
    ]
    assert problems[1].offset == 12 * CS
    assert str(problems[1]) == (
        f"backup {b0.id} device disk0 chunk 12 (offset {12 * CS})"
        f" [{repo.store.path(bytes.fromhex(digests[12]))}]: digest mismatch"
    )
    assert [p.chunk for p in repo.verify(b1.id)] == [2, 12]
    with pytest.raises(BlksnapError) as exc:
        repo.restore(b1.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EIO
    assert b1.id in str(exc.value) and "chunk 2 " in str(exc.value)
    # A failed restore leaves nothing behind.
    assert os.listdir(tmp_path) == ["repo"]

    # A chunk only the incremental has: only the incremental is hurt.
    own = digest_of(repo, b1, 4)
    flip(repo.store.path(own), CHUNK_HEADER.size + 100)
    assert [(p.backup, p.chunk) for p in repo.verify() if p.chunk == 4] == [(b1.id, 4)]


def test_verify_finds_damaged_indexes_and_manifests(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(70)
    b0, b1, b2, b3 = (full(repo, v0) for _ in range(4))
    # An index byte: the index checksum fails.
    flip(os.path.join(b0.path, "dev-0.index"), 3 * 32 + 7)
    problems = repo.verify(b0.id)
    assert [(p.backup, p.device, p.chunk) for p in problems] == [(b0.id, "disk0", None)]
    assert "index checksum mismatch" in problems[0].message
    with pytest.raises(BlksnapError) as exc:
        repo.restore(b0.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EIO

    # A manifest byte: the backup is listed as damaged, verify says so.
    manifest = os.path.join(b1.path, "manifest.json")
    text = Path(manifest).read_text()
    Path(manifest).write_text(text.replace('"snap-x"', '"snap-y"'))
    states = {b.id: b.state for b in repo.backups()}
    assert states == {b0.id: "ok", b1.id: "damaged", b2.id: "ok", b3.id: "ok"}
    assert repo.get(b1.id).state == "damaged"
    problems = repo.verify()
    assert [p.backup for p in problems if p.device is None] == [b1.id]
    assert "checksum" in next(p for p in problems if p.backup == b1.id).message
    with pytest.raises(BlksnapError) as exc:
        repo.restore(b1.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EINVAL

    # A truncated index.
    with open(os.path.join(b2.path, "dev-0.index"), "r+b") as f:
        f.truncate(100)
    problems = repo.verify(b2.id)
    assert len(problems) == 1 and problems[0].device == "disk0"
    assert "100 bytes" in problems[0].message and "truncated" in problems[0].message

    # A missing index, a missing manifest.
    os.unlink(os.path.join(b3.path, "dev-0.index"))
    problems = repo.verify(b3.id)
    assert [(p.backup, p.device) for p in problems] == [(b3.id, "disk0")]
    os.unlink(os.path.join(b3.path, "manifest.json"))
    assert repo.get(b3.id).state == "damaged"
    assert "missing" in repo.verify(b3.id)[0].message
    assert repo.get("latest").id == b2.id  # the newest ok one (its index is its problem)


def test_deeply_nested_json_is_damage_not_a_crash(repo: Repository, tmp_path: Path) -> None:
    """A manifest or REPO.json of '[' * 100000: damaged / EIO, never a
    RecursionError escaping as an internal error."""
    b0 = full(repo, make_device(3, size=3 * CS))
    Path(b0.path, "manifest.json").write_text("[" * 100_000)
    assert repo.get(b0.id).state == "damaged"
    assert "not valid JSON" in repo.verify()[0].message
    Path(repo.path, "REPO.json").write_text("[" * 100_000)
    with pytest.raises(BlksnapError) as exc:
        Repository.open(repo.path)
    assert errno_of(exc) == errno.EIO


# ---------------------------------------------------------------------------
# prune


def test_prune_keep_last(repo: Repository, tmp_path: Path) -> None:
    """Every index is whole: prune keeps the newest N ok backups, never their
    parents for their sake; failed backups older than the oldest kept go."""
    assert repo.prune(1) == []  # nothing to prune
    versions: dict[str, bytes] = {}
    v = make_device(80)
    b1 = full(repo, v)
    versions[b1.id] = bytes(v)
    v = change(v, [1], 81)
    b2 = incr(repo, v, [1], b1.id)
    versions[b2.id] = bytes(v)
    w = repo.begin("incremental")
    w.add_device(record(kind="incremental", parent=b2.id))
    f3 = w.fail(errno.EIO, "read error")
    v = change(v, [2, 3], 82)
    b4 = incr(repo, v, [2, 3], b2.id)
    versions[b4.id] = bytes(v)
    b5 = full(repo, v)
    versions[b5.id] = bytes(v)
    w = repo.begin("incremental")
    w.add_device(record(kind="incremental", parent=b5.id))
    f6 = w.fail(errno.ENOSPC, "full")
    v = change(v, [7], 83)
    b7 = incr(repo, v, [7], b5.id, kind="differential")
    versions[b7.id] = bytes(v)
    ids = [b.id for b in repo.backups()]
    assert ids == [b1.id, b2.id, f3.id, b4.id, b5.id, f6.id, b7.id]

    for bad in (0, -1):
        with pytest.raises(BlksnapError) as exc:
            repo.prune(bad)
        assert errno_of(exc) == errno.EINVAL

    def removed(decisions: list) -> list[str]:
        return sorted(d.id for d in decisions if not d.keep)

    # keep 3: b4, b5, b7; b1 and b2 (b4's parents) and the failure f3 go.
    dry = repo.prune(3, dry_run=True)
    assert [d.id for d in dry] == list(reversed(ids))  # newest first
    assert removed(dry) == sorted([b1.id, b2.id, f3.id])
    assert [b.id for b in repo.backups()] == ids
    decisions = repo.prune(3)
    assert decisions == dry
    assert [b.id for b in repo.backups()] == [b4.id, b5.id, f6.id, b7.id]
    by_id = {d.id: d for d in decisions}
    assert by_id[b7.id].reasons == ("last 1",)
    assert by_id[f6.id].keep and "newer than the oldest kept" in by_id[f6.id].reasons[0]
    assert by_id[b1.id].reasons == ()
    assert os.listdir(repo.tmp_dir) == []
    assert restored(repo, b4.id, tmp_path) == versions[b4.id]  # its parents are gone
    # keep 1: b7 alone (its parent b5 goes too), and f6, older than b7.
    assert removed(repo.prune(1)) == sorted([b4.id, b5.id, f6.id])
    assert [b.id for b in repo.backups()] == [b7.id]
    assert removed(repo.prune(1)) == []
    assert restored(repo, b7.id, tmp_path) == versions[b7.id]
    assert repo.verify() == []


# ---------------------------------------------------------------------------
# ids, locks, records


def test_ids_and_sequence(repo: Repository) -> None:
    data = make_device(90, size=3 * CS)
    infos = [full(repo, data) for _ in range(3)]
    ids = [b.id for b in infos]
    assert len(set(ids)) == 3
    assert [b.seq for b in infos] == [1, 2, 3]
    for b in infos:
        base = b.id.split("-")[0]
        assert len(base) == 16 and base[8] == "T" and base.endswith("Z")
        assert b.started.endswith("Z") and b.finished >= b.started
    bases = [b.id.split("-")[0] for b in infos]
    if bases[0] == bases[1]:
        assert infos[1].id == bases[0] + "-2"
    assert [b.id for b in repo.backups()] == ids
    # Entries under backups/ that are not backup ids are ignored.
    os.mkdir(os.path.join(repo.backups_dir, "lost+found"))
    Path(repo.backups_dir, "notes.txt").write_text("x")
    assert [b.id for b in repo.backups()] == ids


def test_writer_lock(repo: Repository, tmp_path: Path) -> None:
    data = make_device(100, size=5 * CS)
    b0 = full(repo, data)
    w = repo.begin("full")
    with pytest.raises(BlksnapError) as exc:
        repo.begin("full", blocking=False)
    assert errno_of(exc) == errno.EBUSY
    assert repo.path in str(exc.value)
    # Another Repository object on the same path sees the same lock.
    with pytest.raises(BlksnapError) as exc:
        Repository.open(repo.path).begin("incremental", blocking=False)
    assert errno_of(exc) == errno.EBUSY
    # Readers do not wait for a running backup.
    assert repo.verify() == []
    assert restored(repo, b0.id, tmp_path) == data
    w.abort()
    w2 = repo.begin("full", blocking=False)
    assert isinstance(w2, BackupWriter)
    w2.abort()
    with pytest.raises(BlksnapError) as exc:
        repo.begin("weekly")
    assert errno_of(exc) == errno.EINVAL


def test_problem_str() -> None:
    assert str(Problem("B", None, None, None, "manifest checksum mismatch")) == (
        "backup B: manifest checksum mismatch"
    )
    assert str(Problem("B", "d", None, None, "x")) == "backup B device d: x"
    assert str(Problem("B", "d", 17, 1114112, "digest mismatch")) == (
        "backup B device d chunk 17 (offset 1114112): digest mismatch"
    )
    assert str(Problem("B", "d", 17, 1114112, "digest mismatch", "ab" * 32)) == (
        "backup B device d chunk 17 (offset 1114112) [abababababababab]: digest mismatch"
    )


def test_record_round_trip() -> None:
    rec = record(kind="incremental", parent="20261123T013000Z")
    rec.chunk_size = CS
    rec.image_bytes_read = 7
    rec.chunks_read = 3
    rec.index_checksum = "ab" * 32
    d = rec.as_dict()
    assert d["chunk_count"] == CHUNKS
    assert DeviceRecord.from_dict(d) == rec
    assert rec.block_count == -(-SIZE // BS)
    for key, value in (("size", "1"), ("parent", 3), ("chunks_new", True)):
        with pytest.raises(ValueError):
            DeviceRecord.from_dict(dict(d, **{key: value}))


def test_restore_in_many_windows(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restore rebuilds the device a window at a time, a window fetched ahead."""
    monkeypatch.setattr(
        restore_module,
        "SETTINGS",
        dataclasses.replace(SETTINGS, restore_window=3 * CS, restore_threads=2),
    )
    v0 = make_device(110)
    v0[9 * CS : 15 * CS] = bytes(6 * CS)  # whole windows of zeroes
    w = repo.begin("full")
    rec = record()
    w.add_device(rec)
    for i in range(CHUNKS):
        piece = chunk(v0, i)
        if i % 3 == 0 and len(piece) % 8 == 0:
            w.put("disk0", i, np.frombuffer(piece, dtype=np.uint64))  # any buffer
        else:
            w.put("disk0", i, bytearray(piece))
    b0 = w.commit()
    c1 = [0, 10, 11, 25, CHUNKS - 1]
    v1 = change(v0, c1, 111)
    b1 = incr(repo, v1, c1, b0.id)
    for info, version in [(b0, v0), (b1, v1)]:
        seen: list[int] = []
        target = tmp_path / f"{info.id}.img"
        result = repo.restore(info.id, "disk0", str(target), progress=seen.append, force=True)
        assert target.read_bytes() == version
        assert result["sha256"] == sha256(version)
        assert sum(seen) == SIZE and len(seen) == CHUNKS
        pieces = [chunk(version, i) for i in range(CHUNKS)]
        assert result["bytes_written"] == sum(len(p) for p in pieces if any(p))


def test_restore_fetches_a_repeated_chunk_once(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device holding the same chunk at many places (a pattern, copies of
    a file): each distinct chunk is fetched once (an object store charges per
    request), and the device is rebuilt exactly."""
    rnd = random.Random(77)
    pattern = rnd.randbytes(CS)
    data = bytearray()
    for i in range(CHUNKS):
        data += pattern if i % 3 == 0 else (bytes(CS) if i % 3 == 1 else rnd.randbytes(CS))
    info = full(repo, data)
    calls: list[bytes] = []
    real = repo.store.read

    def read(digest: bytes, expect: int) -> bytes:
        calls.append(digest)
        return real(digest, expect)

    monkeypatch.setattr(repo.store, "read", read)
    assert restored(repo, info.id, tmp_path) == bytes(data)
    distinct = {d.tobytes() for d in repo.read_index(info, "disk0")} - {repo.store.zero_digest(CS)}
    assert len(calls) == len(distinct) == 1 + CHUNKS // 3
