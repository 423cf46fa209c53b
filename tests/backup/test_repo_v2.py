"""Backup repository format version 2: what is new since version 1.

Deduplication (one chunk store for every backup and device), encryption,
chunk-level damage reports, garbage collection beside running backups,
prune by a retention policy, and the upgrade of a version 1 repository.
Each test asserts a behaviour that would fail if its feature were broken.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard

import blksnap.backup.writer as writer_module
from blksnap.backup import retention
from blksnap.backup import v1format as v1
from blksnap.backup.crypto import PASSPHRASE_ENV
from blksnap.backup.format import CHUNK_HEADER, DIGEST
from blksnap.backup.repo import BackupInfo, Policy, Repository, manifest_checksum
from blksnap.backup.upgrade import upgrade
from blksnap.errors import BlksnapError, IOFailure
from tests.backup.test_repo import (
    CHUNKS,
    CS,
    SIZE,
    change,
    cheap_argon2,  # noqa: F401 - autouse fixture: cheap Argon2id, no passphrase in env
    chunk,
    chunk_files,
    count_chunks,
    digest_of,
    errno_of,
    flip,
    full,
    incr,
    make_device,
    record,
    restored,
    sha256,
    write_backup,
    zero_chunks,
)

PASS = b"correct horse battery staple"
MARKER = b"BLKSNAP-PLAINTEXT-MARKER-"


# ---------------------------------------------------------------------------
# helpers


def make_repo(
    tmp_path: Path, name: str = "repo", compression: str = "zstd", enc: str = "none"
) -> tuple[Repository, dict]:
    """A new repository and the keyword arguments that open it.
    ``enc``: "none", "passphrase" or "keyfile" (the key file beside it)."""
    path = str(tmp_path / name)
    if enc == "none":
        opener: dict = {}
        repo = Repository.init(path, compression, chunk_size=CS)
    elif enc == "passphrase":
        opener = {"passphrase": PASS}
        repo = Repository.init(path, compression, chunk_size=CS, encrypt=True, passphrase=PASS)
    else:
        opener = {"key_file": str(tmp_path / f"{name}.key")}
        repo = Repository.init(path, compression, chunk_size=CS, encrypt=True, **opener)
    assert repo.keys.encrypted == (enc != "none")
    return repo, opener


def nonzero_digests(repo: Repository, info: BackupInfo, name: str = "disk0") -> set[str]:
    """Hex digests of the non-zero chunks of ``name`` in ``info``."""
    rec = info.device(name)
    out = set()
    for i, row in enumerate(repo.read_index(info, name)):
        length = min(CS, rec.size - i * CS)
        if row.tobytes() != repo.store.zero_digest(length):
            out.add(row.tobytes().hex())
    return out


def files_under(root: str | Path) -> dict[str, bytes]:
    """Every file under ``root``: relative path -> contents."""
    out = {}
    for top, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def holding(root: str | Path, needle: bytes) -> list[str]:
    """The files under ``root`` whose bytes contain ``needle``."""
    return sorted(path for path, data in files_under(root).items() if needle in data)


def tree_hash(root: str | Path) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in files_under(root).items()}


def marker_device(seed: int, size: int = SIZE, cs: int = CS) -> bytearray:
    """A device full of a plaintext marker, mixed with random and zero parts."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for i in range(count_chunks(size, cs)):
        lo, hi = i * cs, min(size, (i + 1) * cs)
        kind = i % 4
        if kind == 0:  # the marker, repeated (compresses to almost nothing)
            piece = MARKER * (cs // len(MARKER) + 1)
        elif kind == 1:  # the marker between random runs
            piece = b"".join(MARKER + rnd.randbytes(75) for _ in range(cs // 100 + 1))
        elif kind == 2:
            piece = rnd.randbytes(cs)
        else:
            continue  # zero
        data[lo:hi] = piece[: hi - lo]
    return data


def full_two(repo: Repository, a: bytes | bytearray, b: bytes | bytearray) -> BackupInfo:
    """One full backup of two devices, "a" and "b"."""
    with repo.begin("full") as w:
        write_backup(w, {"a": (a, None, None, "full"), "b": (b, None, None, "full")})
        return w.commit()


def series(repo: Repository) -> list[tuple[BackupInfo, bytes]]:
    """full -> incremental -> incremental -> differential; (backup, device contents)."""
    v0 = make_device(500)
    b0 = full(repo, v0)
    c1 = [0, 3, 10, CHUNKS - 1]
    v1 = change(v0, c1, 501)
    b1 = incr(repo, v1, c1, b0.id)
    c2 = [3, 4, 22]
    v2 = change(v1, c2, 502)
    b2 = incr(repo, v2, c2, b1.id)
    v3 = change(v2, [30], 503)
    b3 = incr(repo, v3, set(c1 + c2 + [30]), b0.id, kind="differential")
    return [(b0, bytes(v0)), (b1, bytes(v1)), (b2, bytes(v2)), (b3, bytes(v3))]


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CS)


# ---------------------------------------------------------------------------
# 1. deduplication


def test_second_full_of_unchanged_data_stores_nothing(repo: Repository, tmp_path: Path) -> None:
    data = make_device(200)
    zeros = zero_chunks(data)
    b0 = full(repo, data)
    files = chunk_files(repo)
    assert len(files) == CHUNKS - len(zeros)
    with repo.begin("full") as w:
        rec = record()
        w.add_device(rec)
        assert [w.put("disk0", i, chunk(data, i)) for i in range(CHUNKS)] == [0] * CHUNKS
        b1 = w.commit()
    d = b1.device("disk0")
    assert d.chunks_read == CHUNKS
    assert d.chunks_new == 0
    assert d.bytes_stored == 0 and d.bytes_new == 0
    assert d.chunks_zero == len(zeros)
    assert d.chunks_reused == CHUNKS - len(zeros)
    assert d.bytes_reused == SIZE - sum(len(chunk(data, i)) for i in zeros)
    assert chunk_files(repo) == files
    assert (repo.read_index(b0, "disk0") == repo.read_index(b1, "disk0")).all()
    assert restored(repo, b1.id, tmp_path) == data


def test_devices_sharing_half_their_content_store_it_once(repo: Repository, tmp_path: Path) -> None:
    a = make_device(201)
    b = bytearray(a)
    half = CHUNKS // 2 * CS
    b[half:] = make_device(202)[half:]
    shared = [i for i in range(CHUNKS // 2) if any(chunk(a, i))]
    distinct = {blake3.blake3(chunk(x, i)).hexdigest() for x in (a, b) for i in range(CHUNKS)}
    distinct -= {blake3.blake3(bytes(CS)).hexdigest(), blake3.blake3(bytes(SIZE % CS)).hexdigest()}
    nonzero = sum(1 for x in (a, b) for i in range(CHUNKS) if any(chunk(x, i)))
    info = full_two(repo, a, b)
    assert len(chunk_files(repo)) == len(distinct) == nonzero - len(shared)
    assert info.device("a").chunks_new == CHUNKS - len(zero_chunks(a))
    assert info.device("b").chunks_reused == len(shared)
    assert info.device("b").chunks_new == len(distinct) - info.device("a").chunks_new
    assert restored(repo, info.id, tmp_path, "a") == a
    assert restored(repo, info.id, tmp_path, "b") == b


def test_incremental_reads_only_the_changed_chunks(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(210)
    b0 = full(repo, v0)
    before = chunk_files(repo)
    changed = [3, 17, 30]
    v1 = change(v0, changed, 211)
    v1[17 * CS : 18 * CS] = chunk(v0, 0)  # new here, but already in the repository
    puts: list[int] = []
    with repo.begin("incremental") as w:
        rec = record(kind="incremental", parent=b0.id)
        w.add_device(rec)
        for i in changed:
            puts.append(i)
            w.put("disk0", i, chunk(v1, i))
        b1 = w.commit()
    d = b1.device("disk0")
    assert puts == changed and d.chunks_read == 3
    assert d.chunks_new <= 2 and d.chunks_reused >= 1
    assert d.chunks_new + d.chunks_reused + d.chunks_zero == 3
    new_files = chunk_files(repo) - before
    assert len(new_files) == d.chunks_new
    assert new_files <= {digest_of(repo, b1, i).hex() for i in changed}
    assert digest_of(repo, b1, 17) == digest_of(repo, b0, 0)
    assert restored(repo, b1.id, tmp_path) == v1
    assert restored(repo, b0.id, tmp_path) == v0


@pytest.mark.parametrize("enc", ["none", "passphrase", "keyfile"])
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_series_restores_every_backup(tmp_path: Path, compression: str, enc: str) -> None:
    repo, opener = make_repo(tmp_path, compression=compression, enc=enc)
    backups = series(repo)
    # Another process opening the repository with its key sees the same thing.
    again = Repository.open(repo.path, **opener)
    assert again.keys.key_id == repo.keys.key_id
    assert [b.id for b in again.backups()] == [b.id for b, _ in backups]
    for info, version in backups:
        result = again.restore(info.id, "disk0", str(tmp_path / "out.img"), force=True)
        assert result["sha256"] == sha256(version), info.id
        assert (tmp_path / "out.img").read_bytes() == version
    assert again.verify() == []
    # The incrementals stored only what changed.
    assert all(b.device("disk0").chunks_read <= 8 for b, _ in backups[1:])


# ---------------------------------------------------------------------------
# 2. encryption


@pytest.mark.parametrize("enc", ["passphrase", "keyfile"])
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_encrypted_repository_holds_no_plaintext(
    tmp_path: Path, compression: str, enc: str
) -> None:
    data = marker_device(220)
    assert data.count(MARKER) > 5000
    # The scan is meaningful: without encryption or compression, the marker is there.
    plain, _ = make_repo(tmp_path, "plain", compression="none")
    full(plain, data)
    assert holding(plain.path, MARKER) and holding(plain.path, MARKER[:16])

    repo, opener = make_repo(tmp_path, "secret", compression=compression, enc=enc)
    info = full(repo, data)
    files = files_under(repo.path)
    assert len([p for p in files if p.startswith("chunks/")]) == len(chunk_files(repo)) > 0
    assert holding(repo.path, MARKER) == []
    assert holding(repo.path, MARKER[:16]) == []
    assert restored(Repository.open(repo.path, **opener), info.id, tmp_path) == data


def test_encrypted_chunk_names_are_not_plain_digests(tmp_path: Path) -> None:
    data = make_device(230)
    plain_names = {blake3.blake3(chunk(data, i)).hexdigest() for i in range(CHUNKS)}
    repo, _ = make_repo(tmp_path, "one", enc="passphrase")
    info = full(repo, data)
    names = chunk_files(repo)
    assert len(names) == CHUNKS - len(zero_chunks(data))
    assert names.isdisjoint(plain_names)
    index = Path(info.path, "dev-0.index").read_bytes()
    assert all(bytes.fromhex(h) not in index for h in plain_names)
    # Another key: other names for the same contents.
    other, _ = make_repo(tmp_path, "two", enc="keyfile")
    full(other, data)
    assert chunk_files(other).isdisjoint(names)
    assert len(chunk_files(other)) == len(names)


def test_opening_with_the_wrong_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_pass, _ = make_repo(tmp_path, "bypass", enc="passphrase")
    by_file, opener = make_repo(tmp_path, "byfile", enc="keyfile")
    _, other_key = make_repo(tmp_path, "other", enc="keyfile")
    data = make_device(240, size=3 * CS)
    info = full(by_pass, data)

    cases = [
        (by_pass, {"passphrase": b"wrong"}, errno.EKEYREJECTED),
        (by_pass, {}, errno.ENOKEY),
        (by_pass, other_key, errno.EKEYREJECTED),
        (by_file, {}, errno.ENOKEY),
        (by_file, {"passphrase": PASS}, errno.ENOKEY),
        (by_file, other_key, errno.EKEYREJECTED),
    ]
    for repo, kwargs, expect in cases:
        with pytest.raises(BlksnapError) as exc:
            Repository.open(repo.path, **kwargs)
        assert errno_of(exc) == expect, (repo.path, kwargs)
        with pytest.raises(BlksnapError) as exc:
            Repository.init(repo.path, **kwargs)
        assert errno_of(exc) == expect, (repo.path, kwargs)
    assert Repository.open(by_file.path, **opener).keys.key_id == by_file.keys.key_id
    monkeypatch.setenv(PASSPHRASE_ENV, PASS.decode())
    assert restored(Repository.open(by_pass.path), info.id, tmp_path) == data
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(BlksnapError) as exc:
        Repository.open(by_pass.path)
    assert errno_of(exc) == errno.EKEYREJECTED


def test_encrypted_manifest_altered_is_damaged(tmp_path: Path) -> None:
    repo, _ = make_repo(tmp_path, enc="passphrase")
    info = full(repo, make_device(250, size=5 * CS))
    path = Path(info.path, "manifest.json")
    m = json.loads(path.read_text())
    # The manifest's checksum is a keyed MAC, not a plain blake3.
    body = {k: v for k, v in m.items() if k != "manifest_checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert m["manifest_checksum"] != blake3.blake3(canon).hexdigest()
    assert m["manifest_checksum"] == manifest_checksum(m, repo.keys.mac)

    m["devices"][0]["size"] += 1
    path.write_text(json.dumps(m, indent=2))
    assert repo.get(info.id).state == "damaged"
    # Re-checksummed by someone without the key: still damaged.
    m["manifest_checksum"] = manifest_checksum(m, lambda raw: blake3.blake3(raw).hexdigest())
    path.write_text(json.dumps(m, indent=2))
    damaged = repo.get(info.id)
    assert damaged.state == "damaged" and "checksum" in damaged.error["message"]
    problems = repo.verify()
    assert [(p.backup, p.device) for p in problems] == [(info.id, None)]
    with pytest.raises(BlksnapError) as exc:
        repo.restore(info.id, "disk0", str(tmp_path / "x"))
    assert errno_of(exc) == errno.EINVAL


def test_a_chunk_from_another_repository_fails(tmp_path: Path) -> None:
    data = make_device(260, size=8 * CS)
    secret, _ = make_repo(tmp_path, "secret", enc="passphrase")
    other, _ = make_repo(tmp_path, "other", enc="passphrase")
    plain, _ = make_repo(tmp_path, "plain")
    infos = {r.path: full(r, data) for r in (secret, other, plain)}
    target = digest_of(secret, infos[secret.path], 0)
    repo_path = secret.store.path(target)
    for source, why in ((other, "authentication failed"), (plain, "not encrypted")):
        shutil.copyfile(source.store.path(digest_of(source, infos[source.path], 0)), repo_path)
        problems = secret.verify()
        assert [(p.chunk, p.digest) for p in problems] == [(0, target.hex())]
        assert why in problems[0].message


# ---------------------------------------------------------------------------
# 3. damage


@pytest.mark.parametrize("enc", ["none", "passphrase"])
def test_flipped_chunk_byte(tmp_path: Path, enc: str) -> None:
    repo, _ = make_repo(tmp_path, enc=enc)
    data = make_device(300)
    info = full(repo, data)
    digest = digest_of(repo, info, 4)
    path = repo.store.path(digest)
    flip(path, CHUNK_HEADER.size + 1 + 1000)
    problems = repo.verify()
    assert len(problems) == 1
    p = problems[0]
    assert (p.backup, p.device, p.chunk, p.offset, p.digest) == (
        info.id,
        "disk0",
        4,
        4 * CS,
        digest.hex(),
    )
    assert ("authentication failed" if enc != "none" else "digest mismatch") in p.message
    assert f"chunk 4 (offset {4 * CS}) [{repo.store.path(digest)}]" in str(p)
    assert p.object == os.path.join(repo.path, "chunks", digest.hex()[:2], digest.hex())
    with pytest.raises(IOFailure) as exc:
        repo.restore(info.id, "disk0", str(tmp_path / "x.img"))
    assert errno_of(exc) == errno.EIO
    assert "chunk 4 " in exc.value.message and digest.hex() in exc.value.message
    assert not (tmp_path / "x.img").exists()


def test_deleted_chunk_is_missing(repo: Repository, tmp_path: Path) -> None:
    data = make_device(310)
    info = full(repo, data)
    digest = digest_of(repo, info, 6)
    os.unlink(repo.store.path(digest))
    problems = repo.verify()
    assert [(p.backup, p.device, p.chunk, p.digest) for p in problems] == [
        (info.id, "disk0", 6, digest.hex())
    ]
    assert "missing" in problems[0].message
    with pytest.raises(IOFailure) as exc:
        repo.restore(info.id, "disk0", str(tmp_path / "x.img"))
    assert errno_of(exc) == errno.EIO
    assert "chunk 6 " in exc.value.message and "missing" in exc.value.message


def test_a_chunk_cut_short_is_reported_and_stored_again(repo: Repository, tmp_path: Path) -> None:
    """A power cut before a chunk reached the disk leaves its file shorter
    than its header says: verify and restore name it, and the next backup of
    the same data stores it again instead of trusting it."""
    data = make_device(312)
    info = full(repo, data)
    digest = digest_of(repo, info, 0)  # random data: stored raw, CS bytes
    path = repo.store.path(digest)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4096)
    [problem] = repo.verify()
    assert (problem.chunk, problem.digest) == (0, digest.hex())
    assert "cut short" in problem.message, problem.message
    with pytest.raises(IOFailure):
        repo.restore(info.id, "disk0", str(tmp_path / "x.img"))
    again = full(repo, data)
    rec = again.device("disk0")
    assert rec.chunks_new == 1 and rec.bytes_new == CS  # only the cut one
    assert repo.verify() == []  # the same name, whole again: both backups are good
    assert restored(repo, info.id, tmp_path) == data


def test_missing_chunk_message_is_not_mangled(repo: Repository) -> None:
    info = full(repo, make_device(311, size=4 * CS))
    os.unlink(repo.store.path(digest_of(repo, info, 0)))
    [problem] = repo.verify()
    assert problem.message == "missing from the repository", problem.message


def test_truncated_index(repo: Repository, tmp_path: Path) -> None:
    info = full(repo, make_device(320))
    with open(os.path.join(info.path, "dev-0.index"), "r+b") as f:
        f.truncate(10 * DIGEST)
    problems = repo.verify()
    assert [(p.backup, p.device, p.chunk) for p in problems] == [(info.id, "disk0", None)]
    assert "truncated" in problems[0].message and str(10 * DIGEST) in problems[0].message
    with pytest.raises(IOFailure) as exc:
        repo.restore(info.id, "disk0", str(tmp_path / "x.img"))
    assert errno_of(exc) == errno.EIO and "truncated" in exc.value.message


def test_shared_damaged_chunk_is_reported_for_every_backup(
    repo: Repository, tmp_path: Path
) -> None:
    a, b = make_device(330), make_device(331)
    b[5 * CS : 6 * CS] = chunk(a, 0)  # the same chunk in both devices
    b0 = full_two(repo, a, b)
    b1 = full_two(repo, a, b)
    digest = digest_of(repo, b0, 0, "a")
    assert digest_of(repo, b1, 5, "b") == digest
    flip(repo.store.path(digest), CHUNK_HEADER.size + 10)
    problems = repo.verify()
    assert sorted((p.backup, p.device, p.chunk) for p in problems) == sorted(
        [(b0.id, "a", 0), (b0.id, "b", 5), (b1.id, "a", 0), (b1.id, "b", 5)]
    )
    assert {p.digest for p in problems} == {digest.hex()}
    assert [(p.device, p.chunk) for p in repo.verify(b1.id)] == [("a", 0), ("b", 5)]
    with pytest.raises(IOFailure):
        repo.restore(b1.id, "b", str(tmp_path / "x.img"))


@pytest.mark.parametrize("enc", ["none", "passphrase"])
def test_chunk_under_another_digest_fails(tmp_path: Path, enc: str) -> None:
    repo, _ = make_repo(tmp_path, enc=enc)
    data = make_device(340)
    info = full(repo, data)
    a, b = digest_of(repo, info, 0), digest_of(repo, info, 4)  # two random chunks
    shutil.copyfile(repo.store.path(a), repo.store.path(b))
    problems = repo.verify()
    assert [(p.chunk, p.digest) for p in problems] == [(4, b.hex())]
    assert ("authentication failed" if enc != "none" else "digest mismatch") in problems[0].message
    with pytest.raises(IOFailure) as exc:
        repo.restore(info.id, "disk0", str(tmp_path / "x.img"))
    assert "chunk 4 " in exc.value.message


# ---------------------------------------------------------------------------
# 4. gc


def test_gc_removes_only_what_pruned_backups_used(repo: Repository, tmp_path: Path) -> None:
    d0 = make_device(400)
    d1 = change(d0, range(0, CHUNKS, 2), 401)  # half of it rewritten
    b0 = full(repo, d0)
    b1 = full(repo, d1)
    only_b0 = nonzero_digests(repo, b0) - nonzero_digests(repo, b1)
    assert len(only_b0) >= 10
    sizes = sum(os.path.getsize(repo.store.path(bytes.fromhex(h))) for h in only_b0)
    assert [d.id for d in repo.prune(1) if not d.keep] == [b0.id]

    files = chunk_files(repo)
    young = repo.gc()  # the default grace: the chunks are seconds old
    assert young.grace == 300.0
    assert young.chunks_removed == 0 and young.chunks_recent == len(only_b0)
    dry = repo.gc(dry_run=True, grace=0)
    assert dry.dry_run and dry.chunks_removed == len(only_b0) and dry.bytes_removed == sizes
    assert chunk_files(repo) == files
    report = repo.gc(grace=0)
    assert report.chunks_removed == len(only_b0) and report.bytes_removed == sizes
    assert report.chunks == len(files) and report.indexes == 1
    assert report.chunks_referenced == len({r.tobytes() for r in repo.read_index(b1, "disk0")})
    assert chunk_files(repo) == files - only_b0 == nonzero_digests(repo, b1)
    assert repo.gc(grace=0).chunks_removed == 0
    assert restored(repo, b1.id, tmp_path) == d1
    assert repo.verify() == []


def test_gc_beside_a_running_backup(repo: Repository, tmp_path: Path) -> None:
    v0 = make_device(410)
    b0 = full(repo, v0)
    before = chunk_files(repo)
    v1 = make_device(411)
    w = repo.begin("full")
    rec = record()
    w.add_device(rec)
    for i in range(CHUNKS // 2):
        w.put("disk0", i, chunk(v1, i))
    mine = chunk_files(repo) - before
    assert mine  # in no index yet
    report = repo.gc(grace=0)
    assert report.running_backups == 1
    assert report.chunks_removed == 0 and report.chunks_recent == len(mine)
    assert all(os.path.exists(repo.store.path(bytes.fromhex(h))) for h in mine)

    # gc in another thread, over and over, while the backup goes on.
    stop = threading.Event()
    reports = []

    def loop() -> None:
        while not stop.is_set():
            reports.append(repo.gc(grace=0))

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for i in range(CHUNKS // 2, CHUNKS):
            w.put("disk0", i, chunk(v1, i))
    finally:
        stop.set()
        thread.join()
    assert reports and all(r.chunks_removed == 0 for r in reports)
    b1 = w.commit()
    assert repo.gc(grace=0).chunks_removed == 0
    assert restored(repo, b1.id, tmp_path) == v1
    assert restored(repo, b0.id, tmp_path) == v0
    assert repo.verify() == []


def test_gc_keeps_an_old_chunk_a_running_backup_reuses(repo: Repository, tmp_path: Path) -> None:
    v0, v1 = make_device(420), make_device(421)
    full(repo, v0)
    full(repo, v1)
    repo.prune(1)  # the first backup's chunks are now in no index
    orphans = {blake3.blake3(chunk(v0, i)).hexdigest() for i in range(CHUNKS) if any(chunk(v0, i))}
    assert orphans <= chunk_files(repo)
    long_ago = time.time() - 30 * 86400
    for h in orphans:
        os.utime(repo.store.path(bytes.fromhex(h)), (long_ago, long_ago))

    half = CHUNKS // 2
    first = {blake3.blake3(chunk(v0, i)).hexdigest() for i in range(half) if any(chunk(v0, i))}
    second = orphans - first
    assert first and second
    w = repo.begin("full")
    rec = record()
    w.add_device(rec)
    for i in range(half):  # reused: touched, so young again
        w.put("disk0", i, chunk(v0, i))
    assert rec.chunks_new == 0 and rec.chunks_reused == len(first)
    report = repo.gc(grace=0)
    # The chunks the backup reused survive; the old ones it has not reached yet go.
    assert report.chunks_removed == len(second)
    assert all(os.path.exists(repo.store.path(bytes.fromhex(h))) for h in first)
    assert not any(os.path.exists(repo.store.path(bytes.fromhex(h))) for h in second)
    for i in range(half, CHUNKS):  # so the backup stores them again
        w.put("disk0", i, chunk(v0, i))
    assert rec.chunks_new == len(second)
    b2 = w.commit()
    assert restored(repo, b2.id, tmp_path) == v0
    assert repo.verify() == []


def test_second_gc_is_busy(repo: Repository) -> None:
    full(repo, make_device(430, size=3 * CS))
    fd = os.open(os.path.join(repo.path, "gc.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for kwargs in ({}, {"dry_run": True}, {"grace": 0}):
            with pytest.raises(BlksnapError) as exc:
                repo.gc(**kwargs)
            assert errno_of(exc) == errno.EBUSY
    finally:
        os.close(fd)
    assert repo.gc(grace=0).chunks_removed == 0


def test_gc_removes_old_temporaries_and_leaves_foreign_files(repo: Repository) -> None:
    info = full(repo, make_device(440, size=4 * CS))
    fan = os.path.join(repo.store.dir, "ab")
    os.makedirs(fan, exist_ok=True)
    old_temp = os.path.join(fan, ".tmp-0123456789abcdef-000000")
    young_temp = os.path.join(fan, ".tmp-fedcba9876543210-000000")
    foreign = [os.path.join(fan, "README"), os.path.join(fan, "cd" * 32)]  # cd.. is not in ab/
    for path in [old_temp, young_temp, *foreign]:
        Path(path).write_bytes(b"x")
    os.utime(old_temp, (1e9, 1e9))
    os.utime(foreign[1], (1e9, 1e9))
    report = repo.gc()
    assert report.temps_removed == 1 and report.chunks_removed == 0
    assert not os.path.exists(old_temp) and os.path.exists(young_temp)
    assert all(os.path.exists(p) for p in foreign)
    assert repo.gc(grace=0).temps_removed == 1
    assert all(os.path.exists(p) for p in foreign)
    assert repo.verify(info.id) == []


def test_gc_while_a_backup_is_being_published(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long backup (began two hours ago, chunks an hour old) publishing while
    gc runs with its default grace: no chunk of the backup may go."""
    data = make_device(450, size=6 * CS)
    w = repo.begin("full")
    began = time.time() - 7200
    os.utime(os.path.join(w.path, "begun"), (began, began))
    w.add_device(record(size=len(data)))
    for i in range(6):
        w.put("disk0", i, chunk(data, i))
    for h in chunk_files(repo):
        os.utime(repo.store.path(bytes.fromhex(h)), (began + 3600, began + 3600))
    assert repo.gc().chunks_removed == 0  # while it runs: protected by begun

    real = writer_module.write_file
    reports = []

    def write_file(path: str, contents: bytes) -> None:
        if os.path.basename(path) == "manifest.json":
            reports.append(repo.gc())  # another process's gc, at the wrong moment
        real(path, contents)

    monkeypatch.setattr(writer_module, "write_file", write_file)
    info = w.commit()
    monkeypatch.undo()
    assert reports and reports[0].chunks_removed == 0
    assert repo.verify() == []
    assert restored(repo, info.id, tmp_path) == data


# ---------------------------------------------------------------------------
# 5. prune by a retention policy


def test_prune_by_policy_on_synthetic_dates(repo: Repository, tmp_path: Path) -> None:
    size = 2 * CS + 123
    v = make_device(600, size=size)
    versions: dict[str, bytes] = {}
    started: dict[str, str] = {}
    ok: list[BackupInfo] = []
    failed: dict[str, BackupInfo] = {}
    seq = 0
    day0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def as_of(t: dt.datetime) -> tuple[str, int, str]:
        nonlocal seq
        seq += 1
        return t.strftime("%Y%m%dT%H%M%SZ"), seq, t.strftime("%Y-%m-%dT%H:%M:%SZ")

    def fail_at(t: dt.datetime, parent: str) -> None:
        w = repo.begin("incremental", as_of=as_of(t))
        w.add_device(record(kind="incremental", parent=parent, size=size))
        info = w.fail(errno.EIO, "read error")
        failed[info.id] = info

    for day in range(20):
        for hour in (1, 13):
            t = day0 + dt.timedelta(days=day, hours=hour)
            kind = "full" if not ok or (day % 7 == 0 and hour == 1) else "incremental"
            k = (day * 2 + hour) % 3
            v = change(v, [k], day * 100 + hour, cs=CS)
            with repo.begin(kind, snapshot_id=f"s{day}-{hour}", as_of=as_of(t)) as w:
                parent = None if kind == "full" else ok[-1].id
                write_backup(w, {"disk0": (v, None if kind == "full" else [k], parent, kind)})
                info = w.commit()
            assert info.started == t.strftime("%Y-%m-%dT%H:%M:%SZ")
            ok.append(info)
            versions[info.id] = bytes(v)
            started[info.id] = info.started
        if day == 1:
            fail_at(day0 + dt.timedelta(days=1, hours=20), ok[-1].id)
        if day == 18:
            fail_at(day0 + dt.timedelta(days=18, hours=20), ok[-1].id)
    assert len(ok) == 40 and len(repo.backups()) == 42
    assert [b.seq for b in repo.backups()] == list(range(1, 43))

    policy = Policy(last=2, daily=5, weekly=2)
    expected = retention.select(
        [retention.Backup(b.id, retention.parse_backup_time(b.id, b.started), b.seq) for b in ok],
        policy,
    )
    expected_kept = {d.id for d in expected if d.keep}
    # By hand: the last two, the newest of Jan 16..20, the newest of ISO weeks 3 and 4.
    by_hand = {"20260120T130000Z", "20260120T010000Z"}
    by_hand |= {f"202601{d:02d}T130000Z" for d in (16, 17, 18, 19, 20)}
    by_hand |= {"20260118T130000Z", "20260120T130000Z"}
    assert expected_kept == by_hand
    old_failed, new_failed = sorted(failed)

    everything = tree_hash(repo.path)
    dry = repo.prune(policy, dry_run=True)
    assert tree_hash(repo.path) == everything  # nothing removed, nothing written
    decisions = repo.prune(policy)
    assert decisions == dry
    assert [(d.id, d.keep, d.reasons) for d in decisions if d.id not in failed] == [
        (d.id, d.keep, d.reasons) for d in expected
    ]
    by_id = {d.id: d for d in decisions}
    assert not by_id[old_failed].keep and by_id[new_failed].keep
    seqs = {b.id: b.seq for b in [*ok, *failed.values()]}
    listed = [b.id for b in repo.backups()]
    assert listed == sorted(expected_kept | {new_failed}, key=seqs.__getitem__)
    for info in ok:
        assert os.path.isdir(info.path) == (info.id in expected_kept)
    assert not os.path.exists(failed[old_failed].path)
    # The kept ones are whole, even after gc freed what only the others used.
    assert repo.gc(grace=0).chunks_removed > 0
    for backup_id in sorted(expected_kept):
        assert restored(repo, backup_id, tmp_path) == versions[backup_id], backup_id
    assert repo.verify() == []


# ---------------------------------------------------------------------------
# 6. upgrading a version 1 repository

BS1 = 16 * 1024  # the version 1 block size
SIZE1 = 37 * BS1 + 1000  # 38 blocks, the last one short; 10 chunks
GEN1 = "gen-v1"
V1_FULL = "20251101T010000Z"
V1_INCR = "20251102T010000Z"
V1_FAILED = "20251103T010000Z"


def _v1_device(
    out_dir: Path,
    number: int,
    name: str,
    data: bytes | bytearray,
    blocks: Iterable[int],
    kind: str,
    parent: str | None,
    compression: str,
    changes: int,
) -> v1.DeviceRecord:
    """Write ``dev-<number>.data`` and ``.map`` of ``blocks`` of ``data``; its record."""
    cctx = zstandard.ZstdCompressor()
    blocks = sorted(blocks)
    rows = np.zeros(len(blocks), dtype=v1.MAP_DTYPE)
    blobs = bytearray()
    zero = 0
    for r, i in enumerate(blocks):
        piece = bytes(data[i * BS1 : min(len(data), (i + 1) * BS1)])
        rows[r]["index"] = i
        rows[r]["checksum"] = np.frombuffer(blake3.blake3(piece).digest(), dtype=np.uint8)
        if not any(piece):
            rows[r]["flags"] = v1.FLAG_ZERO
            zero += 1
            continue
        blob, flags = piece, 0
        if compression == "zstd":
            packed = cctx.compress(piece)
            if len(packed) < len(piece):
                blob, flags = packed, v1.FLAG_ZSTD
        rows[r]["offset"] = len(blobs)
        rows[r]["length"] = len(blob)
        rows[r]["flags"] = flags
        blobs += blob
    (out_dir / f"dev-{number}.data").write_bytes(bytes(blobs))
    raw_map = rows.tobytes()
    (out_dir / f"dev-{number}.map").write_bytes(raw_map)
    read = sum(min(BS1, len(data) - i * BS1) for i in blocks)
    return v1.DeviceRecord(
        name=name,
        size=len(data),
        block_size=BS1,
        generation_id=GEN1,
        changes_number=changes,
        kind=kind,
        parent=parent,
        blocks_stored=len(blocks),
        blocks_zero=zero,
        bytes_read=read,
        bytes_stored=len(blobs),
        image_bytes_read=read,
        file=f"dev-{number}",
        map_checksum=blake3.blake3(raw_map).hexdigest(),
        data_size=len(blobs),
    )


def _v1_backup(
    root: Path,
    backup_id: str,
    seq: int,
    kind: str,
    state: str,
    records: list[v1.DeviceRecord],
    compression: str,
) -> None:
    err = None if state == "ok" else {"errno": "EIO", "message": "read error"}
    started = f"{backup_id[:4]}-{backup_id[4:6]}-{backup_id[6:8]}T01:00:00Z"
    manifest = v1.new_manifest(
        backup_id=backup_id,
        seq=seq,
        kind=kind,
        state=state,
        err=err,
        started=started,
        snapshot_id=f"snap-{seq}",
        compression=compression,
        records=records,
    )
    (root / "backups" / backup_id / "manifest.json").write_text(json.dumps(manifest, indent=2))


def make_v1_repository(
    root: Path, compression: str, sda: bytes | bytearray | None = None
) -> dict[str, dict[str, bytes]]:
    """A version 1 repository: a full and an incremental of two devices, and a
    failed incremental. The device contents as of each ok backup."""
    root.mkdir()
    (root / "REPO.json").write_text(json.dumps(v1.repo_meta(compression), indent=2))
    for sub in ("backups", "tmp"):
        (root / sub).mkdir()
    for name in ("lock", "read.lock"):
        (root / name).write_bytes(b"")
    a0 = make_device(700, size=SIZE1, cs=BS1) if sda is None else bytearray(sda)
    b0 = make_device(701, size=5 * BS1, cs=BS1)
    changed_a, changed_b = [0, 5, 6, 36, 37], [1]
    a1, b1 = change(a0, changed_a, 702, cs=BS1), change(b0, changed_b, 703, cs=BS1)
    a1[20 * BS1 : 21 * BS1] = bytes(BS1)  # a block that became zero
    changed_a.append(20)

    for backup_id, seq, kind, devs in (
        (V1_FULL, 1, "full", [(a0, None, None), (b0, None, None)]),
        (V1_INCR, 2, "incremental", [(a1, changed_a, V1_FULL), (b1, changed_b, V1_FULL)]),
    ):
        out = root / "backups" / backup_id
        out.mkdir()
        records = []
        for number, (name, (data, blocks, parent)) in enumerate(
            zip(("sda", "vg/root"), devs, strict=True)
        ):
            every = range(-(-len(data) // BS1))
            records.append(
                _v1_device(
                    out,
                    number,
                    name,
                    data,
                    every if blocks is None else blocks,
                    kind,
                    parent,
                    compression,
                    changes=seq,
                )
            )
        _v1_backup(root, backup_id, seq, kind, "ok", records, compression)

    (root / "backups" / V1_FAILED).mkdir()
    failed = v1.DeviceRecord("sda", SIZE1, BS1, GEN1, 3, "incremental", V1_INCR)
    _v1_backup(root, V1_FAILED, 3, "incremental", "failed", [failed], compression)
    return {
        V1_FULL: {"sda": bytes(a0), "vg/root": bytes(b0)},
        V1_INCR: {"sda": bytes(a1), "vg/root": bytes(b1)},
    }


def test_v1_repository_is_refused_with_the_upgrade_hint(tmp_path: Path) -> None:
    make_v1_repository(tmp_path / "old", "zstd")
    for call in (Repository.open, Repository.init):
        with pytest.raises(BlksnapError) as exc:
            call(str(tmp_path / "old"))
        assert errno_of(exc) == errno.EPROTONOSUPPORT
        assert "blksnap repo upgrade" in exc.value.message


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_upgrade_v1(tmp_path: Path, compression: str) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    contents = make_v1_repository(old, compression)
    old_infos = {
        name: v1.parse_manifest(name, str(old / "backups" / name), raw)
        for name in (V1_FULL, V1_INCR)
        for raw in [(old / "backups" / name / "manifest.json").read_bytes()]
    }
    before = tree_hash(old)

    report = upgrade(str(old), str(new), chunk_size=CS)
    assert report["converted"] == 2 and report["skipped"] == 0
    assert [x["id"] for x in report["not_converted"]] == [V1_FAILED]
    assert "failed" in report["not_converted"][0]["why"]
    assert report["bytes_stored"] > 0

    repo = Repository.open(str(new))
    assert repo.compression == compression and repo.chunk_size == CS
    backups = repo.backups()
    assert [(b.id, b.seq, b.kind, b.state) for b in backups] == [
        (V1_FULL, 1, "full", "ok"),
        (V1_INCR, 2, "incremental", "ok"),
    ]
    for info in backups:
        was = old_infos[info.id]
        assert (info.started, info.finished, info.snapshot_id) == (
            was.started,
            was.finished,
            was.snapshot_id,
        )
        for name in ("sda", "vg/root"):
            rec, old_rec = info.device(name), was.device(name)
            for field in (
                "kind",
                "parent",
                "generation_id",
                "changes_number",
                "size",
                "block_size",
                "bytes_read",
            ):
                assert getattr(rec, field) == getattr(old_rec, field), (info.id, name, field)
            assert restored(repo, info.id, tmp_path, name) == contents[info.id][name]
    # The incremental shares its unchanged chunks with the full: its blocks
    # 0, 5-6, 20 and 36-37 changed, in chunks 0, 1, 5 and 9.
    incr_sda = backups[1].device("sda")
    assert incr_sda.chunks_new <= 4 and incr_sda.chunks_reused >= 4
    assert repo.verify() == []

    again = upgrade(str(old), str(new), chunk_size=CS)
    assert again["converted"] == 0 and again["skipped"] == 2
    assert [x["id"] for x in again["not_converted"]] == [V1_FAILED]
    assert [b.id for b in Repository.open(str(new)).backups()] == [V1_FULL, V1_INCR]
    assert tree_hash(old) == before

    # The next backup is an incremental against the newest converted one.
    a2 = change(bytearray(contents[V1_INCR]["sda"]), [2], 704)
    with repo.begin("incremental") as w:
        rec = record("sda", "incremental", V1_INCR, size=SIZE1, bs=BS1, gen=GEN1, changes=3)
        w.add_device(rec)
        w.put("sda", 2, chunk(a2, 2))
        b3 = w.commit()
    assert restored(repo, b3.id, tmp_path, "sda") == a2


def test_upgrade_into_an_encrypted_repository(tmp_path: Path) -> None:
    old, new, key = tmp_path / "old", tmp_path / "new", tmp_path / "new.key"
    contents = make_v1_repository(old, "none", sda=marker_device(710, size=SIZE1, cs=BS1))
    assert holding(old, MARKER)
    Repository.init(str(new), "zstd", chunk_size=CS, encrypt=True, key_file=str(key))
    report = upgrade(str(old), str(new), key_file=str(key))
    assert report["converted"] == 2
    with pytest.raises(BlksnapError) as exc:
        Repository.open(str(new))
    assert errno_of(exc) == errno.ENOKEY
    repo = Repository.open(str(new), key_file=str(key))
    assert repo.keys.encrypted and repo.chunk_size == CS
    assert holding(new, MARKER) == [] and holding(new, MARKER[:16]) == []
    plain = {blake3.blake3(chunk(contents[V1_FULL]["sda"], i)).hexdigest() for i in range(10)}
    assert chunk_files(repo).isdisjoint(plain)
    for backup_id, devices in contents.items():
        for name, data in devices.items():
            assert restored(repo, backup_id, tmp_path, name) == data
    assert repo.verify() == []


def test_upgrade_stops_at_a_damaged_v1_block(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    make_v1_repository(old, "none")
    flip(str(old / "backups" / V1_FULL / "dev-1.data"), 100)
    with pytest.raises(IOFailure) as exc:
        upgrade(str(old), str(new), chunk_size=CS)
    assert V1_FULL in exc.value.message and "checksum mismatch" in exc.value.message
    repo = Repository.open(str(new))
    assert repo.backups() == [] and os.listdir(repo.tmp_dir) == []


def test_large_chunks_are_probed_before_compression(tmp_path: Path) -> None:
    """A 1 MiB chunk of random bytes is stored raw (its samples did not
    shrink), one with zeroes in it compressed, and both restore."""
    from blksnap.backup.format import KIND_RAW, KIND_ZSTD

    mib = 1 << 20
    repo = Repository.init(tmp_path / "r", chunk_size=mib)
    rng = random.Random(5)
    noise = rng.randbytes(mib)
    mixed = rng.randbytes(mib // 2) + bytes(mib // 2)
    data = noise + mixed
    with repo.begin("full") as w:
        w.add_device(record(size=len(data)))
        w.put("disk0", 0, noise)
        w.put("disk0", 1, mixed)
        info = w.commit()
    kinds = []
    for i in (0, 1):
        blob = Path(repo.store.path(digest_of(repo, info, i))).read_bytes()
        kinds.append(blob[CHUNK_HEADER.size])
    assert kinds == [KIND_RAW, KIND_ZSTD]
    assert restored(repo, info.id, tmp_path) == data
