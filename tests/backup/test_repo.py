"""Backup repository: format, chains, restore, verify, crash safety, prune, locks."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import blake3
import numpy as np
import pytest

import blksnap.backup.restore as restore_module
from blksnap.backup.repo import (
    FLAG_ZERO,
    FLAG_ZSTD,
    MAP_DTYPE,
    BackupInfo,
    BackupWriter,
    DeviceRecord,
    Problem,
    Repository,
    manifest_checksum,
)
from blksnap.errors import BlksnapError
from blksnap.settings import SETTINGS

BS = 16 * 1024
BLOCKS = 40
TAIL = 5000  # the odd-sized last block
SIZE = (BLOCKS - 1) * BS + TAIL
GEN = "gen-1"


# ---------------------------------------------------------------------------
# helpers


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def make_device(seed: int = 0, size: int = SIZE, bs: int = BS) -> bytearray:
    """Random, zero and compressible blocks; the last block is short."""
    rnd = random.Random(seed)
    data = bytearray(size)
    count = -(-size // bs)
    for i in range(count):
        lo, hi = i * bs, min(size, (i + 1) * bs)
        kind = i % 4
        if kind == 0:
            data[lo:hi] = rnd.randbytes(hi - lo)
        elif kind == 1:
            pass  # zero
        elif kind == 2:
            text = (f"block {i} seed {seed} compresses well. " * (bs // 16 + 1)).encode()
            data[lo:hi] = text[: hi - lo]
        else:
            data[lo:hi] = rnd.randbytes(hi - lo) if rnd.random() < 0.5 else bytes(hi - lo)
    return data


def block(data: bytes | bytearray, i: int, bs: int = BS) -> bytes:
    return bytes(data[i * bs : min(len(data), (i + 1) * bs)])


def change(data: bytearray, blocks: list[int], seed: int, bs: int = BS) -> bytearray:
    """A new version of ``data`` with ``blocks`` rewritten (random or zero)."""
    rnd = random.Random(seed)
    new = bytearray(data)
    for i in blocks:
        lo, hi = i * bs, min(len(new), (i + 1) * bs)
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


def backup(
    repo: Repository,
    kind: str,
    devices: dict[str, tuple[bytes | bytearray, list[int] | None, str | None, str]],
) -> BackupInfo:
    """One backup. ``devices``: name -> (contents, blocks to put or None for all,
    parent, record kind)."""
    with repo.begin(kind, snapshot_id="snap-x") as w:
        for name, (data, blocks, parent, rkind) in devices.items():
            rec = record(name, rkind, parent, size=len(data))
            w.add_device(rec)
            indices = blocks if blocks is not None else range(rec.block_count)
            for i in indices:
                w.put(name, i, block(data, i))
            rec.bytes_read = sum(len(block(data, i)) for i in indices)
            rec.image_bytes_read = rec.bytes_read
        return w.commit()


def full(repo: Repository, data: bytes | bytearray, name: str = "disk0") -> BackupInfo:
    return backup(repo, "full", {name: (data, None, None, "full")})


def incr(
    repo: Repository,
    data: bytes | bytearray,
    blocks: list[int],
    parent: str,
    kind: str = "incremental",
    name: str = "disk0",
) -> BackupInfo:
    return backup(repo, kind, {name: (data, sorted(blocks), parent, kind)})


def restored(repo: Repository, backup_id: str, tmp_path: Path, name: str = "disk0") -> bytes:
    target = tmp_path / f"restore-{backup_id}-{name.replace('/', '_')}.img"
    result = repo.restore(backup_id, name, str(target))
    data = target.read_bytes()
    assert result["sha256"] == sha256(data)
    assert result["size"] == len(data)
    return data


def rewrite_manifest(info: BackupInfo, **changes: object) -> None:
    """Edit a manifest the way another (buggy) writer could: checksum still valid."""
    path = os.path.join(info.path, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    for key, value in changes.items():
        if key.startswith("dev_"):
            m["devices"][0][key[4:]] = value
        else:
            m[key] = value
    m["manifest_checksum"] = manifest_checksum(m)
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


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"))


# ---------------------------------------------------------------------------
# repository creation


def test_init_is_idempotent_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "repo"
    repo = Repository.init(str(path), compression="none")
    meta = json.loads((path / "REPO.json").read_text())
    assert meta["format"] == "blksnap-repository"
    assert meta["version"] == 1
    assert meta["checksum"] == "blake3"
    assert meta["compression"] == "none"
    assert repo.compression == "none"
    # Again: the same repository, its compression kept.
    again = Repository.init(str(path))
    assert again.compression == "none"
    assert Repository.open(str(path)).path == str(path)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert Repository.init(str(empty)).compression == "zstd"

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

    with pytest.raises(BlksnapError) as exc:
        Repository.open(str(foreign))
    assert errno_of(exc) == errno.ENOENT

    meta["version"] = 2
    (path / "REPO.json").write_text(json.dumps(meta))
    with pytest.raises(BlksnapError) as exc:
        Repository.open(str(path))
    assert errno_of(exc) == errno.EPROTONOSUPPORT


# ---------------------------------------------------------------------------
# full backups


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_full_backup_restores_and_keeps_holes(tmp_path: Path, compression: str) -> None:
    repo = Repository.init(str(tmp_path / "repo"), compression=compression)
    data = make_device(1)
    zero_blocks = [i for i in range(BLOCKS) if not any(block(data, i))]
    with repo.begin("full", snapshot_id="snap-1") as w:
        rec = record()
        w.add_device(rec)
        assert rec.file == "dev-0"
        for i in range(BLOCKS):
            stored = w.put("disk0", i, memoryview(block(data, i)))
            if i in zero_blocks:
                assert stored == 0
            else:
                assert 0 < stored <= BS
        rec.bytes_read = SIZE
        info = w.commit()
    assert info.ok and info.kind == "full" and info.seq == 1
    assert info.snapshot_id == "snap-1"
    assert info.compression == compression
    d = info.device("disk0")
    assert d.block_count == BLOCKS
    assert d.blocks_stored == BLOCKS
    assert d.blocks_zero == len(zero_blocks)
    assert d.bytes_read == SIZE
    assert d.bytes_stored == d.data_size
    assert sorted(os.listdir(info.path)) == ["dev-0.data", "dev-0.map", "manifest.json"]

    # The format as documented: a raw map, blobs back to back.
    raw_map = (Path(info.path) / "dev-0.map").read_bytes()
    assert blake3.blake3(raw_map).hexdigest() == d.map_checksum
    rows = np.frombuffer(raw_map, dtype=MAP_DTYPE)
    assert MAP_DTYPE.itemsize == 56
    assert rows["index"].tolist() == list(range(BLOCKS))
    assert set(np.flatnonzero(rows["flags"] & FLAG_ZERO).tolist()) == set(zero_blocks)
    zstd_rows = np.flatnonzero(rows["flags"] & FLAG_ZSTD).tolist()
    if compression == "zstd":
        assert 2 in zstd_rows  # the compressible block
        assert 0 not in zstd_rows  # random data is kept raw
    else:
        assert zstd_rows == []
    blob_data = (Path(info.path) / "dev-0.data").read_bytes()
    assert len(blob_data) == d.data_size
    row0 = rows[0]
    assert bytes(row0["checksum"]) == blake3.blake3(block(data, 0)).digest()
    assert blob_data[row0["offset"] : row0["offset"] + row0["length"]] == block(data, 0)

    manifest = json.loads((Path(info.path) / "manifest.json").read_text())
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["manifest_checksum"] == blake3.blake3(canon).hexdigest()
    assert manifest["devices"][0]["name"] == "disk0"

    target = tmp_path / "out.img"
    target.write_bytes(b"old contents " * 100_000)  # longer: must be truncated
    seen: list[int] = []
    result = repo.restore(info.id, "disk0", str(target), progress=seen.append, force=True)
    out = target.read_bytes()
    assert out == bytes(data)
    assert result["sha256"] == sha256(data)
    assert result["chain"] == [info.id]
    assert result["backup"] == info.id and result["device"] == "disk0"
    assert sum(seen) == SIZE
    assert result["bytes_written"] <= SIZE - (len(zero_blocks) - 1) * BS
    # Zero blocks are holes: far less allocated than the size.
    allocated = os.stat(target).st_blocks * 512
    assert allocated <= SIZE - (len(zero_blocks) - 2) * BS


def test_put_and_add_device_errors(repo: Repository) -> None:
    data = make_device(2)
    w = repo.begin("full")
    w.add_device(record())
    with pytest.raises(BlksnapError) as exc:
        w.add_device(record())
    assert errno_of(exc) == errno.EEXIST
    with pytest.raises(BlksnapError) as exc:
        w.add_device(record("other", kind="incremental", parent=None))
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc:
        w.put("nosuch", 0, block(data, 0))
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(BlksnapError) as exc:
        w.put("disk0", 0, block(data, 0)[:-1])
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc:
        w.put("disk0", BLOCKS - 1, bytes(BS))  # the last block is short
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc:
        w.put("disk0", BLOCKS, bytes(BS))
    assert errno_of(exc) == errno.EINVAL
    w.put("disk0", 3, block(data, 3))
    for i in (3, 2):
        with pytest.raises(BlksnapError) as exc:
            w.put("disk0", i, block(data, i))
        assert errno_of(exc) == errno.EINVAL
    w.abort()
    with pytest.raises(BlksnapError) as exc:
        w.put("disk0", 4, block(data, 4))
    assert errno_of(exc) == errno.EALREADY
    assert repo.backups() == []
    assert os.listdir(repo.tmp_dir) == []


def test_full_with_a_missing_block_cannot_commit(repo: Repository) -> None:
    data = make_device(3)
    with pytest.raises(BlksnapError) as exc, repo.begin("full") as w:
        w.add_device(record())
        for i in range(BLOCKS):
            if i != 17:
                w.put("disk0", i, block(data, i))
        w.commit()
    assert errno_of(exc) == errno.EIO
    assert "incomplete" in str(exc.value)
    # The with block aborted: nothing recorded, staging gone, lock free.
    assert repo.backups() == []
    assert os.listdir(repo.tmp_dir) == []
    repo.begin("full", blocking=False).abort()

    # Without a with block the writer stays open: the caller records a failure.
    w = repo.begin("full")
    w.add_device(record())
    w.put("disk0", 0, block(data, 0))
    with pytest.raises(BlksnapError):
        w.commit()
    info = w.fail(errno.EIO, "device read error")
    assert info.state == "failed"


def test_several_devices_in_one_backup(repo: Repository, tmp_path: Path) -> None:
    a = make_device(4)
    b = make_device(5, size=7 * BS)
    info = backup(
        repo, "full", {"sda": (a, None, None, "full"), "vg/root": (b, None, None, "full")}
    )
    assert [d.file for d in info.devices] == ["dev-0", "dev-1"]
    assert not any("sda" in f or "root" in f for f in os.listdir(info.path))
    assert restored(repo, info.id, tmp_path, "sda") == a
    assert restored(repo, info.id, tmp_path, "vg/root") == b
    with pytest.raises(BlksnapError) as exc:
        info.device("sdb")
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(BlksnapError) as exc:
        repo.restore(info.id, "sdb", str(tmp_path / "x"))
    assert errno_of(exc) == errno.ENOENT
    assert repo.verify() == []


# ---------------------------------------------------------------------------
# chains


def test_incremental_and_differential_chains(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(10)
    b0 = full(repo, v0)
    c1 = [1, 5, 6, BLOCKS - 1]
    v1 = change(v0, c1, 11)
    b1 = incr(repo, v1, c1, b0.id)
    c2 = [0, 5, 20, 21]
    v2 = change(v1, c2, 12)
    b2 = incr(repo, v2, c2, b1.id)
    c3 = [7, 8, 9]
    v3 = change(v2, c3, 13)
    # Differential: everything changed since the full.
    b3 = incr(repo, v3, sorted(set(c1 + c2 + c3)), b0.id, kind="differential")
    c4 = [30]
    v4 = change(v3, c4, 14)
    b4 = incr(repo, v4, c4, b3.id)  # an incremental on top of a differential

    assert [b.seq for b in repo.backups()] == [1, 2, 3, 4, 5]
    assert [b.id for b in repo.chain(b2.id, "disk0")] == [b0.id, b1.id, b2.id]
    assert [b.id for b in repo.chain(b3.id, "disk0")] == [b0.id, b3.id]
    assert [b.id for b in repo.chain(b4.id, "disk0")] == [b0.id, b3.id, b4.id]
    assert [b.id for b in repo.chain("latest", "disk0")] == [b0.id, b3.id, b4.id]
    for info, version in [(b0, v0), (b1, v1), (b2, v2), (b3, v3), (b4, v4)]:
        assert restored(repo, info.id, tmp_path) == version, info.id
    assert restored(repo, "latest", tmp_path) == v4
    assert repo.restore(b2.id, "disk0", str(tmp_path / "r"))["chain"] == [b0.id, b1.id, b2.id]

    assert repo.get("latest").id == b4.id
    assert repo.latest("disk0").id == b4.id
    assert repo.latest("disk0", ("full",)).id == b0.id
    assert repo.latest("disk0", ("differential",)).id == b3.id
    assert repo.latest("disk1") is None
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
    assert [x.id for x in repo.chain(second.id, "b")] == [second.id]
    assert restored(repo, second.id, tmp_path, "a") == a1
    assert restored(repo, second.id, tmp_path, "b") == b0
    assert repo.latest("b", ("full",)).id == second.id
    with pytest.raises(BlksnapError) as exc, repo.begin("full") as w:
        w.add_device(record("c", kind="incremental", parent=first.id))
    assert errno_of(exc) == errno.EINVAL


def test_chain_errors(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(30)
    b0 = full(repo, v0)
    v1 = change(v0, [2], 31)
    b1 = incr(repo, v1, [2], b0.id)

    # A writer refuses a parent of another generation, block size or a failed one.
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id, gen="gen-2"))
    assert errno_of(exc) == errno.EINVAL and "generation" in str(exc.value)
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id, bs=2 * BS))
    assert errno_of(exc) == errno.EINVAL
    w = repo.begin("full")
    w.add_device(record())
    failed = w.fail(errno.ENOSPC, "disk full")
    with pytest.raises(BlksnapError) as exc, repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=failed.id))
    assert errno_of(exc) == errno.EINVAL
    with pytest.raises(BlksnapError) as exc, repo.begin("differential") as w:
        w.add_device(record(kind="differential", parent=b1.id))
    assert errno_of(exc) == errno.EINVAL and "full" in str(exc.value)

    # Chains broken behind the writer's back (another writer, a hand edit).
    rewrite_manifest(b0, dev_generation_id="gen-other")
    with pytest.raises(BlksnapError) as exc:
        repo.chain(b1.id, "disk0")
    assert errno_of(exc) == errno.EINVAL and "generation" in str(exc.value)
    rewrite_manifest(b0, dev_generation_id=GEN, dev_block_size=BS * 2)
    with pytest.raises(BlksnapError) as exc:
        repo.chain(b1.id, "disk0")
    assert errno_of(exc) == errno.EINVAL and "block size" in str(exc.value)
    rewrite_manifest(b0, dev_block_size=BS, state="failed")
    with pytest.raises(BlksnapError) as exc:
        repo.chain(b1.id, "disk0")
    assert errno_of(exc) == errno.EINVAL and "failed" in str(exc.value)
    with pytest.raises(BlksnapError) as exc:
        repo.restore(b1.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EINVAL
    rewrite_manifest(b0, state="ok")
    assert restored(repo, b1.id, tmp_path) == v1

    flip(os.path.join(b0.path, "manifest.json"), 30)
    with pytest.raises(BlksnapError) as exc:
        repo.chain(b1.id, "disk0")
    assert errno_of(exc) == errno.EINVAL and "damaged" in str(exc.value)
    shutil.rmtree(b0.path)
    with pytest.raises(BlksnapError) as exc:
        repo.chain(b1.id, "disk0")
    assert errno_of(exc) == errno.EINVAL and "missing" in str(exc.value)
    problems = repo.verify(b1.id)
    assert problems and "chain" in problems[0].message

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
    w.put("disk0", 0, block(v0, 0))
    rec.bytes_read = BS
    info = w.fail(errno.ENOSPC, "no space left in diff storage")
    assert info.state == "failed" and not info.ok
    assert info.error == {"errno": "ENOSPC", "message": "no space left in diff storage"}
    assert os.listdir(info.path) == ["manifest.json"]
    assert info.device("disk0").bytes_read == BS
    listed = repo.backups()
    assert [(b.id, b.state) for b in listed] == [(b0.id, "ok"), (info.id, "failed")]
    assert listed[1].seq == 2
    assert repo.get(info.id).state == "failed"
    assert repo.get("latest").id == b0.id
    assert repo.latest("disk0").id == b0.id
    with pytest.raises(BlksnapError) as exc:
        repo.restore(info.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EINVAL
    assert repo.verify() == []  # failed backups are not problems ...
    assert repo.verify(info.id)  # ... unless asked for by name
    with pytest.raises(BlksnapError) as exc:
        w.commit()
    assert errno_of(exc) == errno.EALREADY


def _crash_in_child(repo_path: str, data: bytes) -> None:
    """Fork a child that writes half a backup and dies without cleaning up."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            repo = Repository.open(repo_path)
            w = repo.begin("full")
            w.add_device(record())
            for i in range(BLOCKS // 2):
                w.put("disk0", i, block(data, i))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_crash_leaves_only_staging(repo: Repository, tmp_path: Path) -> None:
    data = make_device(50)
    b0 = full(repo, data)
    _crash_in_child(repo.path, bytes(data))
    staged = os.listdir(repo.tmp_dir)
    assert len(staged) == 1
    assert os.path.exists(os.path.join(repo.tmp_dir, staged[0], "dev-0.data"))
    assert [b.id for b in repo.backups()] == [b0.id]  # the half backup is not listed
    with pytest.raises(BlksnapError) as exc:
        repo.get(staged[0])
    assert errno_of(exc) == errno.ENOENT
    assert repo.verify() == []
    # The dead writer's lock is gone with it; the next writer removes its leftovers.
    w = repo.begin("full", blocking=False)
    assert os.listdir(repo.tmp_dir) == [w.id]
    w.abort()
    assert os.listdir(repo.tmp_dir) == []
    assert restored(repo, b0.id, tmp_path) == data


def test_exception_inside_with_aborts(repo: Repository) -> None:
    data = make_device(51)
    with pytest.raises(RuntimeError), repo.begin("full") as w:
        w.add_device(record())
        w.put("disk0", 0, block(data, 0))
        raise RuntimeError("reader died")
    assert repo.backups() == []
    assert os.listdir(repo.tmp_dir) == []
    repo.begin("full", blocking=False).abort()


# ---------------------------------------------------------------------------
# verify


def _row_of(info: BackupInfo, index: int) -> np.void:
    rows = np.fromfile(os.path.join(info.path, "dev-0.map"), dtype=MAP_DTYPE)
    return rows[np.flatnonzero(rows["index"] == index)[0]]


def test_verify_finds_a_flipped_data_byte(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(60)
    b0 = full(repo, v0)
    b1 = incr(repo, change(v0, [4, 9], 61), [4, 9], b0.id)
    seen: list[int] = []
    assert repo.verify(progress=seen.append) == []
    assert sum(seen) == b0.devices[0].data_size + b1.devices[0].data_size

    for i in (2, 12):  # a compressed and a raw block
        row = _row_of(b0, i)
        assert row["length"] > 0
        flip(os.path.join(b0.path, "dev-0.data"), int(row["offset"]) + int(row["length"]) // 2)
    problems = repo.verify()
    assert [(p.backup, p.device, p.block) for p in problems] == [
        (b0.id, "disk0", 2),
        (b0.id, "disk0", 12),
    ]
    assert problems[1].offset == 12 * BS
    assert str(problems[1]) == (
        f"backup {b0.id} device disk0 block 12 (offset {12 * BS}): checksum mismatch"
    )
    assert [p.block for p in repo.verify(b0.id)] == [2, 12]
    assert repo.verify(b1.id) == []  # its own blocks are fine
    with pytest.raises(BlksnapError) as exc:
        repo.restore(b1.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EIO
    assert b0.id in str(exc.value) and "block 2" in str(exc.value)


def test_verify_finds_damaged_maps_and_manifests(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(70)
    b0 = full(repo, v0)
    b1 = full(repo, v0)
    b2 = full(repo, v0)
    # A map byte: the map checksum fails (and here the checksum column no longer matches).
    flip(os.path.join(b0.path, "dev-0.map"), 3 * MAP_DTYPE.itemsize + 30)
    problems = repo.verify(b0.id)
    assert problems
    assert all(p.backup == b0.id and p.device == "disk0" for p in problems)
    assert any("map checksum" in p.message for p in problems)
    with pytest.raises(BlksnapError) as exc:
        repo.restore(b0.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EIO

    # A manifest byte: the backup is listed as damaged, verify says so.
    manifest = os.path.join(b1.path, "manifest.json")
    text = Path(manifest).read_text()
    Path(manifest).write_text(text.replace('"snap-x"', '"snap-y"'))
    states = {b.id: b.state for b in repo.backups()}
    assert states == {b0.id: "ok", b1.id: "damaged", b2.id: "ok"}
    assert repo.get(b1.id).state == "damaged"
    problems = repo.verify()
    assert [p.backup for p in problems if p.device is None] == [b1.id]
    assert "checksum" in next(p for p in problems if p.backup == b1.id).message
    with pytest.raises(BlksnapError) as exc:
        repo.restore(b1.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EINVAL

    # A truncated data file.
    with open(os.path.join(b2.path, "dev-0.data"), "r+b") as f:
        f.truncate(100)
    problems = repo.verify(b2.id)
    assert any("data file holds 100 bytes" in p.message for p in problems)
    assert any(p.block is not None for p in problems)


def test_deeply_nested_json_is_damage_not_a_crash(repo: Repository, tmp_path: Path) -> None:
    """A manifest or REPO.json of '[' * 100000: damaged / EIO, never a
    RecursionError escaping as an internal error."""
    b0 = full(repo, make_device(3))
    Path(b0.path, "manifest.json").write_text("[" * 100_000)
    assert repo.get(b0.id).state == "damaged"
    assert "not valid JSON" in repo.verify()[0].message
    Path(repo.path, "REPO.json").write_text("[" * 100_000)
    with pytest.raises(BlksnapError) as exc:
        Repository.open(repo.path)
    assert errno_of(exc) == errno.EIO


# ---------------------------------------------------------------------------
# prune


def test_prune_keeps_chains(repo: Repository, tmp_path: Path) -> None:
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
    b4 = incr(repo, v, [1, 2, 3], b2.id)
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

    with pytest.raises(BlksnapError) as exc:
        repo.prune(0)
    assert errno_of(exc) == errno.EINVAL

    # keep 3: b4, b5, b7 and b4's chain (b1, b2): only the failure f3 is old enough.
    assert repo.prune(3, dry_run=True) == [f3.id]
    assert [b.id for b in repo.backups()] == ids
    assert repo.prune(3) == [f3.id]
    # keep 2: b5, b7; b1, b2, b4 go; f6 is newer than b5 and stays.
    assert repo.prune(2, dry_run=True) == [b1.id, b2.id, b4.id]
    assert repo.prune(2) == [b1.id, b2.id, b4.id]
    assert [b.id for b in repo.backups()] == [b5.id, f6.id, b7.id]
    assert os.listdir(repo.tmp_dir) == []
    # keep 1: b7 needs b5; f6 is older than b7.
    assert repo.prune(1) == [f6.id]
    assert [b.id for b in repo.backups()] == [b5.id, b7.id]
    assert repo.prune(1) == []
    for b in repo.backups():
        assert restored(repo, b.id, tmp_path) == versions[b.id]
    assert repo.verify() == []


# ---------------------------------------------------------------------------
# ids, locks


def test_ids_and_sequence(repo: Repository) -> None:
    data = make_device(90, size=3 * BS)
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


def test_writer_lock(repo: Repository, tmp_path: Path) -> None:
    data = make_device(100, size=5 * BS)
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
    assert str(Problem("B", "d", 17, 1114112, "checksum mismatch")) == (
        "backup B device d block 17 (offset 1114112): checksum mismatch"
    )


def test_record_round_trip() -> None:
    rec = record(kind="incremental", parent="20261123T013000Z")
    rec.image_bytes_read = 7
    d = rec.as_dict()
    assert d["block_count"] == BLOCKS
    assert DeviceRecord.from_dict(d) == rec


def test_restore_in_many_windows(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restore rebuilds the device a window at a time, two windows in flight."""
    monkeypatch.setattr(
        restore_module, "SETTINGS", dataclasses.replace(SETTINGS, restore_window=3 * BS)
    )
    v0 = make_device(110)
    v0[9 * BS : 15 * BS] = bytes(6 * BS)  # whole windows of zeroes
    w = repo.begin("full")
    rec = record()
    w.add_device(rec)
    for i in range(BLOCKS):
        piece = block(v0, i)
        if i % 3 == 0 and len(piece) % 8 == 0:
            w.put("disk0", i, np.frombuffer(piece, dtype=np.uint64))  # any buffer
        else:
            w.put("disk0", i, bytearray(piece))
    b0 = w.commit()
    c1 = [0, 10, 11, 25, BLOCKS - 1]
    v1 = change(v0, c1, 111)
    b1 = incr(repo, v1, c1, b0.id)
    for info, version in [(b0, v0), (b1, v1)]:
        seen: list[int] = []
        target = tmp_path / f"{info.id}.img"
        result = repo.restore(info.id, "disk0", str(target), progress=seen.append, force=True)
        assert target.read_bytes() == version
        assert result["sha256"] == sha256(version)
        assert sum(seen) == SIZE and len(seen) == -(-BLOCKS // 3)
        pieces = [block(version, i) for i in range(BLOCKS)]
        assert result["bytes_written"] == sum(len(p) for p in pieces if any(p))
