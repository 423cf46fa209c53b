"""A repository in a real object store (Ceph RADOS Gateway): the same
repository code as a directory's, over S3, with several hosts writing
into one bucket at once.

Each ``Repository`` opened on the bucket is one host: its own S3 client,
nothing shared with the others but the bucket.
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
from pathlib import Path

import pytest

from blksnap.backup.repo import Repository
from blksnap.backup.s3 import S3Storage
from blksnap.errors import BlksnapError
from blksnap.tools import rgw
from tests.backup.test_repo import (
    cheap_argon2,  # noqa: F401 - autouse fixture
    record,
)
from tests.s3.conftest import empty_bucket, objects_of

MiB = 1 << 20
CS = 256 * 1024
MARKER = b"BLKSNAP-PLAINTEXT-MARKER-"


@pytest.fixture(autouse=True)
def _aws_environment(s3env: rgw.Gateway) -> None:
    """Every test here: credentials, region and endpoint in the environment."""


def host(url: str, **kw: object) -> Repository:
    """One host's view of the repository at ``url`` (made if missing)."""
    return Repository.init(url, chunk_size=CS, **kw)  # type: ignore[arg-type]


def device(seed: int, size: int = 8 * MiB, common: bytes = b"") -> bytearray:
    """Random data, ``common`` at its start (what two hosts share)."""
    import random

    data = bytearray(random.Random(seed).randbytes(size))
    data[: len(common)] = common
    return data


def change(data: bytearray, chunks: list[int], seed: int) -> bytearray:
    """``data`` with ``chunks`` rewritten with random bytes."""
    import random

    rnd = random.Random(seed)
    new = bytearray(data)
    for i in chunks:
        new[i * CS : (i + 1) * CS] = rnd.randbytes(CS)
    return new


def put_all(w: object, data: bytes | bytearray, name: str = "disk0", pause: float = 0) -> None:
    for i in range(-(-len(data) // CS)):
        w.put(name, i, bytes(data[i * CS : (i + 1) * CS]))  # type: ignore[attr-defined]
        if pause:
            time.sleep(pause)


def backup(
    repo: Repository, data: bytes | bytearray, kind: str = "full", parent: str | None = None,
    chunks: list[int] | None = None, name: str = "disk0",
) -> object:  # fmt: skip
    with repo.begin(kind) as w:
        w.add_device(record(name, kind, parent, size=len(data)))
        if chunks is None:
            put_all(w, data, name)
        else:
            for i in chunks:
                w.put(name, i, bytes(data[i * CS : (i + 1) * CS]))
        return w.commit()


def restored(repo: Repository, backup_id: str, tmp_path: Path, name: str = "disk0") -> bytes:
    target = tmp_path / f"r-{backup_id}-{uuid.uuid4().hex[:6]}.img"
    repo.restore(backup_id, name, str(target), force=True)
    data = target.read_bytes()
    target.unlink()
    return data


def test_full_incremental_differential_restore_verify_prune_gc(bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/repo"
    repo = host(url)
    assert not repo.local and repo.path == url
    v1 = device(1)
    b1 = backup(repo, v1)
    v2 = change(v1, [0, 5], seed=2)
    b2 = backup(repo, v2, "incremental", b1.id, [0, 5])  # type: ignore[attr-defined]
    v3 = change(v2, [9], seed=3)
    b3 = backup(repo, v3, "differential", b1.id, [0, 5, 9])  # type: ignore[attr-defined]
    again = Repository.open(url)  # another process: nothing but the bucket
    assert [b.id for b in again.backups()] == [b.id for b in (b1, b2, b3)]  # type: ignore[attr-defined]
    for b, want in ((b1, v1), (b2, v2), (b3, v3)):
        assert restored(again, b.id, tmp_path) == bytes(want)  # type: ignore[attr-defined]
    assert again.verify() == []
    again.prune(1)
    assert [b.id for b in again.backups()] == [b3.id]  # type: ignore[attr-defined]
    report = again.gc(grace=0)
    assert report.chunks_removed == 3  # b1's chunks 0, 5 and 9, which b3 replaced
    assert restored(again, b3.id, tmp_path) == bytes(v3)  # type: ignore[attr-defined]
    assert again.verify() == []
    traffic = again.traffic()
    assert traffic.requests > 0 and traffic.bytes_received >= 3 * len(v1)


def test_two_hosts_back_up_at_once_and_share_chunks(
    bucket: str, s3env: rgw.Gateway, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/fleet"
    a, b = host(url), host(url)
    common = device(10, 4 * MiB)
    da, db = device(11, common=common), device(12, common=common)
    done: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(name: str, repo: Repository, data: bytearray) -> None:
        try:
            done[name] = backup(repo, data)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=("a", a, da)),
        threading.Thread(target=run, args=("b", b, db)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = {done["a"].id, done["b"].id}  # type: ignore[attr-defined]
    assert len(ids) == 2 and {x.id for x in a.backups()} == ids
    chunks = [k for k in objects_of(s3env, bucket, "fleet/chunks/")]
    # 32 chunks of 256 KiB each, 16 of them common: 16 + 16 + 16
    assert len(chunks) == 48
    assert restored(b, done["a"].id, tmp_path) == bytes(da)  # type: ignore[attr-defined]
    assert restored(a, done["b"].id, tmp_path) == bytes(db)  # type: ignore[attr-defined]
    # nothing of a writer is left behind
    assert not objects_of(s3env, bucket, "fleet/sessions/")


def test_encrypted_repository_holds_no_plaintext(
    bucket: str, s3env: rgw.Gateway, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/enc"
    key = tmp_path / "repo.key"
    repo = host(url, encrypt=True, key_file=str(key))
    data = bytearray(8 * MiB)
    for off in range(0, len(data), 4096):
        data[off : off + len(MARKER) + 8] = MARKER + b"%08d" % off
    info = backup(repo, data)
    objs = objects_of(s3env, bucket, "enc/")
    assert any(k.startswith("enc/chunks/") for k in objs)
    assert [k for k, v in objs.items() if MARKER[:12] in v] == []
    with pytest.raises(BlksnapError) as exc:
        Repository.open(url)
    assert exc.value.errno == errno.ENOKEY
    again = Repository.open(url, key_file=str(key))
    assert restored(again, info.id, tmp_path) == bytes(data)  # type: ignore[attr-defined]


def test_verify_names_the_object_of_a_damaged_chunk(
    bucket: str, s3env: rgw.Gateway, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/v"
    repo = host(url)
    info = backup(repo, device(20))
    digest = repo.read_index(info, "disk0")[3].tobytes()  # type: ignore[arg-type]
    key = f"v/chunks/{digest.hex()[:2]}/{digest.hex()}"
    client = s3env.client()
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())  # type: ignore[attr-defined]
    body[100] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))  # type: ignore[attr-defined]
    problems = repo.verify()
    assert len(problems) == 1
    p = problems[0]
    assert p.chunk == 3 and p.digest == digest.hex()
    assert p.object == f"s3://{bucket}/{key}"
    assert f"s3://{bucket}/{key}" in str(p)


def test_gc_on_one_host_while_another_backs_up(bucket: str, tmp_path: Path) -> None:
    """Host A backs up slowly, reusing chunks of a backup host B prunes; B's
    gc (no grace) runs in the middle. A's backup publishes (or, if B's gc
    removed a chunk A reused, refuses with EAGAIN and its retry publishes):
    never a backup naming a chunk that is gone."""
    url = f"s3://{bucket}/gc"
    a, b = host(url), host(url)
    v1 = device(30)
    old = backup(b, v1)
    backup(b, device(31))
    b.prune(1)
    assert old.id not in {x.id for x in b.backups()}  # type: ignore[attr-defined]
    v2 = change(v1, [0], seed=32)
    time.sleep(2)  # old's chunks are older than A's start (by more than a second)
    result: list[object] = []

    def slow() -> None:
        for _attempt in range(2):
            try:
                with a.begin("full") as w:
                    w.add_device(record(size=len(v2)))
                    put_all(w, v2, pause=0.05)
                    result.append(w.commit())
                    return
            except BlksnapError as exc:
                result.append(exc)
                if exc.errno != errno.EAGAIN:
                    return

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)
    reports = [b.gc(grace=0)]
    t.join()
    reports.append(b.gc(grace=0))
    assert reports[0].running_backups == 1
    assert reports[0].chunks_removed > 0  # old's chunks, which A was reusing
    # A found its reused chunks gone before publishing, and its retry stored them
    assert len(result) == 2, result
    assert isinstance(result[0], BlksnapError) and result[0].errno == errno.EAGAIN
    published = [r for r in result if not isinstance(r, BaseException)]
    assert restored(b, published[0].id, tmp_path) == bytes(v2)  # type: ignore[attr-defined]
    assert b.verify() == []


def test_a_backup_cut_off_from_the_store_is_retried_and_reuses_what_it_sent(
    bucket: str, s3env: rgw.Gateway, tmp_path: Path
) -> None:
    """radosgw stopped in the middle of a backup: the uploads retry with
    backoff, give up (EIO) and the backup is dropped; run again once the
    store is back, it sends only what the first did not."""
    url = f"s3://{bucket}/cut"
    repo = Repository.init(S3Storage(url, retries=2, backoff=0.2), chunk_size=CS)
    data = device(40, 16 * MiB)
    half = len(data) // 2 // CS
    failure: list[BaseException] = []
    before = repo.traffic()
    try:
        with repo.begin("full") as w:
            w.add_device(record(size=len(data)))
            for i in range(-(-len(data) // CS)):
                if i == half:
                    s3env.stop_gateway()
                w.put("disk0", i, bytes(data[i * CS : (i + 1) * CS]))
            w.commit()
    except BlksnapError as exc:
        failure.append(exc)
    finally:
        s3env.start_gateway()
    assert failure and failure[0].errno == errno.EIO, failure
    first = repo.traffic().since(before)
    assert first.retries >= 2
    assert repo.backups() == []
    again = Repository.open(url)
    before = again.traffic()
    info = backup(again, data)
    second = again.traffic().since(before)
    assert second.bytes_sent < 0.6 * len(data)  # the first half was not sent again
    assert restored(again, info.id, tmp_path) == bytes(data)  # type: ignore[attr-defined]


def test_two_hosts_making_the_repository_at_once(bucket: str) -> None:
    url = f"s3://{bucket}/new"
    made: list[Repository] = []
    threads = [threading.Thread(target=lambda: made.append(host(url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 4 and len({r.created for r in made}) == 1


def test_a_missing_bucket_is_enoent(s3env: rgw.Gateway) -> None:
    with pytest.raises(BlksnapError) as exc:
        Repository.open(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x")
    assert exc.value.errno == errno.ENOENT


def test_a_repository_in_a_bucket_not_made_yet(s3env: rgw.Gateway, tmp_path: Path) -> None:
    """The first backup into s3://NEW/... makes the bucket (and only then)."""
    name = f"blksnap-{uuid.uuid4().hex[:12]}"
    url = f"s3://{name}/first"
    with pytest.raises(BlksnapError) as exc:
        Repository.open(url)
    assert exc.value.errno == errno.ENOENT and "no such bucket" in exc.value.message
    try:
        repo = host(url)
        info = backup(repo, device(50, 2 * MiB))
        assert restored(Repository.open(url), info.id, tmp_path) == bytes(device(50, 2 * MiB))  # type: ignore[attr-defined]
    finally:
        empty_bucket(s3env.client(), name)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_v1_repository_upgraded_into_a_bucket(
    s3env: rgw.Gateway, bucket: str, tmp_path: Path, encrypted: bool
) -> None:
    """``repo upgrade --to s3://...`` (through the CLI): every ok backup into
    the bucket, restorable and verified; into an encrypted repository made
    there by ``key create``, no object holds the plaintext; run again, it
    converts nothing more."""
    import json
    import subprocess
    import sys

    from tests.backup.test_repo_v2 import (
        BS1,
        SIZE1,
        V1_FULL,
        V1_INCR,
        make_v1_repository,
        marker_device,
    )

    old, url, key = tmp_path / "old", f"s3://{bucket}/upgraded", tmp_path / "new.key"
    contents = make_v1_repository(old, "none", sda=marker_device(712, size=SIZE1, cs=BS1))
    blksnap = [sys.executable, "-m", "blksnap.cli"]
    keys: list[str] = []
    if encrypted:
        subprocess.run([*blksnap, "key", "create", "--repo", url, "--key-file", str(key)],
                       check=True, capture_output=True)  # fmt: skip
        keys = ["--key-file", str(key)]

    def upgrade() -> dict:
        out = subprocess.run([*blksnap, "--json", "repo", "upgrade", "--repo", str(old),
                              "--to", url, *keys, "--no-progress"],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    report = upgrade()
    assert report["converted"] == 2 and report["to"].startswith(url), report
    repo = Repository.open(url, key_file=str(key) if encrypted else None)
    assert [b.id for b in repo.backups()] == [V1_FULL, V1_INCR]
    for backup_id, devices in contents.items():
        for name, data in devices.items():
            assert restored(repo, backup_id, tmp_path, name) == data
    assert repo.verify() == []
    if encrypted:
        assert repo.keys.encrypted
        assert not any(MARKER[:16] in v for v in objects_of(s3env, bucket).values())
    again = upgrade()
    assert again["converted"] == 0 and again["skipped"] == 2
