"""Backups through a real blksnapd: images read over its FUSE files while a
writer keeps changing the devices; chains restored and compared with the
image at each take; CBT-driven incremental reads measured by the daemon;
generation changes, overflowed snapshots, damaged repositories."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blksnap.backup.repo import Repository
from blksnap.backup.session import BackupFailed, run_backup
from blksnap.errors import BlksnapError
from tests.integration.conftest import BIN, Daemon, run
from tests.integration.helpers import sha256_file

MiB = 1 << 20
SIZE = 24 * MiB


def random_device(daemon: Daemon, tmp_path: Path, name: str, seed: int) -> str:
    """A device with random content (and a zero tail), tracker attached."""
    path = tmp_path / f"{name}.img"
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(SIZE - 4 * MiB))
        f.truncate(SIZE)
    daemon.client.add_device(str(path), name)
    daemon.client.attach(name)
    return f"{daemon.mount}/dev/{name}"


class DeviceWriter(threading.Thread):
    """Random writes (any alignment) to device files until stopped."""

    def __init__(self, paths: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.paths, self.rng = paths, random.Random(seed)
        self.writes = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        fds = [os.open(p, os.O_WRONLY) for p in self.paths]
        try:
            while not self.halt.is_set():
                for fd in fds:
                    n = self.rng.randrange(1, 96 * 1024)
                    off = self.rng.randrange(SIZE - n)
                    os.pwrite(fd, self.rng.randbytes(n), off)
                    self.writes += 1
                self.halt.wait(0.002)
        except BaseException as exc:
            self.error = exc
        finally:
            for fd in fds:
                os.close(fd)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        assert self.error is None, self.error


def image_hashes(daemon: Daemon, sid: str, names: list[str], into: dict[str, str]) -> None:
    for n in names:
        into[n] = sha256_file(f"{daemon.mount}/images/{sid}/{n}")


def test_chain_restores_equal_the_image_at_take(daemon: Daemon, tmp_path: Path) -> None:
    names = ["d0", "d1"]
    for i, n in enumerate(names):
        random_device(daemon, tmp_path, n, seed=i)
    repo = Repository.init(tmp_path / "repo")
    writer = DeviceWriter([f"{daemon.mount}/dev/{n}" for n in names], seed=7)
    writer.start()
    at_take: list[dict[str, str]] = []
    results = []
    try:
        for mode in ["auto", "incremental", "incremental", "differential"]:
            hashes: dict[str, str] = {}
            res = run_backup(
                daemon.client,
                repo,
                names,
                mode,
                on_take=lambda sid, h=hashes: image_hashes(daemon, sid, names, h),
            )
            at_take.append(hashes)
            results.append(res)
    finally:
        writer.stop()
    assert writer.writes > 50
    kinds = [r.backup.kind for r in results]
    assert kinds == ["full", "incremental", "incremental", "differential"]
    # Parents: incrementals chain, the differential sits on the full.
    full_id = results[0].backup.id
    assert results[1].backup.device("d0").parent == full_id
    assert results[2].backup.device("d0").parent == results[1].backup.id
    assert results[3].backup.device("d1").parent == full_id
    for res, hashes in zip(results, at_take, strict=True):
        for n in names:
            out = tmp_path / f"restored-{res.backup.id}-{n}"
            r = repo.restore(res.backup.id, n, str(out))
            assert r["sha256"] == sha256_file(out) == hashes[n], (res.backup.id, n)
            out.unlink()
    # Every index is whole: the incrementals read only changed chunks and
    # inherit the others' digests; the chunks the full stored are shared.
    for res in results[1:]:
        for n in names:
            rec = res.backup.device(n)
            assert rec.chunks_read <= rec.chunk_count
            assert rec.chunks_new + rec.chunks_reused + rec.chunks_zero == rec.chunks_read
    assert results[1].backup.device("d1").chunks_read < results[1].backup.device("d1").chunk_count
    assert repo.verify() == []


def test_incremental_reads_only_changed_chunks(daemon: Daemon, tmp_path: Path) -> None:
    dev = random_device(daemon, tmp_path, "d0", seed=3)
    repo = Repository.init(tmp_path / "repo", chunk_size=256 * 1024)
    full = run_backup(daemon.client, repo, ["d0"])
    assert full.backup.kind == "full"
    bs = full.backup.device("d0").block_size
    # Full: every block read once; the daemon counted the same bytes.
    assert full.backup.device("d0").bytes_read == SIZE
    assert full.backup.device("d0").image_bytes_read == SIZE
    rng = random.Random(5)
    blocks = sorted(rng.sample(range(SIZE // bs), 9))
    fd = os.open(dev, os.O_WRONLY)
    try:
        for b in blocks:  # a small write inside each chosen block
            os.pwrite(fd, b"x" * 100, b * bs + rng.randrange(bs - 100))
    finally:
        os.close(fd)
    inc = run_backup(daemon.client, repo, ["d0"])
    rec = inc.backup.device("d0")
    assert inc.backup.kind == "incremental" and rec.parent == full.backup.id
    assert inc.plans[0].blocks.tolist() == blocks
    # The chunks that hold a changed block are read, no more (measured by
    # blksnapd too), and each changed chunk is new to the repository.
    cs = repo.chunk_size
    chunks = sorted({b * bs // cs for b in blocks})
    assert inc.plans[0].chunks.tolist() == chunks
    assert rec.image_bytes_read is not None
    assert rec.image_bytes_read <= len(chunks) * cs
    assert rec.bytes_read == len(chunks) * cs
    assert rec.chunks_read == rec.chunks_new == len(chunks)
    # And the chain restores to the device as it is now (nothing written since).
    out = tmp_path / "restored"
    assert repo.restore(inc.backup.id, "d0", str(out))["sha256"] == sha256_file(dev)


def test_generation_change_forces_full(daemon: Daemon, tmp_path: Path) -> None:
    random_device(daemon, tmp_path, "d0", seed=4)
    repo = str(tmp_path / "repo")
    first = json.loads(daemon.cli("--json", "backup", "-d", "d0", "--repo", repo).stdout)
    assert first["kind"] == "full"
    second = json.loads(daemon.cli("--json", "backup", "-d", "d0", "--repo", repo).stdout)
    assert second["kind"] == "incremental"
    assert second["devices"][0]["bytes_read"] == 0
    # Reattaching the tracker starts a new CBT generation: the map before it
    # cannot be trusted, so the next backup is full whatever was asked.
    daemon.client.detach("d0")
    daemon.client.attach("d0")
    third = json.loads(
        daemon.cli("--json", "backup", "-d", "d0", "--repo", repo, "--incremental").stdout
    )
    assert third["kind"] == "full"
    d = third["devices"][0]
    assert d["kind"] == "full" and d["parent"] is None
    assert "generation" in d["reason"]
    assert d["bytes_read"] == SIZE


def test_overflowed_backup_is_failed_and_never_a_parent(daemon: Daemon, tmp_path: Path) -> None:
    dev = random_device(daemon, tmp_path, "d0", seed=6)
    repo = Repository.init(tmp_path / "repo")
    good = run_backup(daemon.client, repo, ["d0"])

    def overwrite(_sid: str) -> None:
        # 8 MiB of fresh chunks against 1 MiB of diff storage: overflow.
        fd = os.open(dev, os.O_WRONLY)
        try:
            for off in range(0, 8 * MiB, MiB):
                try:
                    os.pwrite(fd, os.urandom(MiB), off)
                except OSError as exc:  # the device must keep working
                    raise AssertionError(f"device write failed: {exc}") from exc
        finally:
            os.close(fd)

    with pytest.raises(BackupFailed) as info:
        run_backup(
            daemon.client,
            repo,
            ["d0"],
            storage_size=MiB,
            storage_max=MiB,
            on_take=overwrite,
        )
    failed = info.value.backup
    assert failed is not None and failed.state == "failed"
    assert info.value.errno in (errno.ENOSPC, errno.EIO)
    assert "corrupted" in str(info.value)
    # Listed, but never a parent and never restorable.
    assert [b.id for b in repo.backups()] == [good.backup.id, failed.id]
    assert repo.latest("d0").id == good.backup.id
    with pytest.raises(BlksnapError):
        repo.read_index(failed, "d0")
    with pytest.raises(BlksnapError):
        repo.restore(failed.id, "d0", str(tmp_path / "nope"))
    # The next incremental builds on the good backup and restores to the device.
    nxt = run_backup(daemon.client, repo, ["d0"])
    assert nxt.backup.kind == "incremental"
    assert nxt.backup.device("d0").parent == good.backup.id
    out = tmp_path / "restored"
    assert repo.restore(nxt.backup.id, "d0", str(out))["sha256"] == sha256_file(dev)
    # The CLI lists the failed one as failed.
    table = daemon.cli("backups", "--repo", str(tmp_path / "repo")).stdout
    assert "failed (ENOSPC)" in table or "failed (EIO)" in table


def test_cli_backup_verify_damage_and_restore_to_block_device(
    daemon: Daemon, tmp_path: Path
) -> None:
    dev = random_device(daemon, tmp_path, "d0", seed=8)
    repo = tmp_path / "repo"
    doc = json.loads(daemon.cli("--json", "backup", "-d", "d0", "--repo", str(repo)).stdout)
    bid = doc["id"]
    listed = json.loads(daemon.cli("--json", "backups", "--repo", str(repo)).stdout)
    assert [b["id"] for b in listed] == [bid]
    assert daemon.cli("verify", "--repo", str(repo)).returncode == 0

    # Restore onto a block device (a loop device over a file of the same size).
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    loop = run("losetup", "--find", "--show", str(target)).stdout.strip()
    try:
        r = json.loads(
            daemon.cli(
                "--json",
                "restore",
                "--repo",
                str(repo),
                "--backup",
                "latest",
                "-d",
                "d0",
                "--to",
                loop,
                "--force",  # a block device is always overwritten on purpose
            ).stdout
        )
        assert r["sha256"] == sha256_file(dev)
    finally:
        run("losetup", "-d", loop)
    assert sha256_file(target) == sha256_file(dev)

    # One flipped byte in a stored chunk: verify fails and names the chunk.
    data = max((repo / "chunks").glob("*/*"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    bad = daemon.cli("--json", "verify", "--repo", str(repo), check=False)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert not report["ok"]
    (p,) = report["problems"]
    assert p["backup"] == bid and p["device"] == "d0" and isinstance(p["chunk"], int)
    assert p["digest"] == data.name
    assert "EIO" in bad.stderr
    text = daemon.cli("verify", "--repo", str(repo), check=False)
    assert f"chunk {p['chunk']}" in text.stdout
    # Restore refuses to write damaged data silently.
    fail = daemon.cli(
        "restore",
        "--repo",
        str(repo),
        "--backup",
        bid,
        "-d",
        "d0",
        "--to",
        str(tmp_path / "r2"),
        check=False,
    )
    assert fail.returncode == 1 and "EIO" in fail.stderr


def test_storage_grows_on_low_free_space(daemon: Daemon, tmp_path: Path) -> None:
    """1 MiB of diff storage to start with, 4 MiB of device writes while the
    backup reads: the session grows the storage on ``low_free_space`` and the
    backup succeeds with the image as it was at take."""
    dev = random_device(daemon, tmp_path, "d0", seed=9)
    repo = Repository.init(tmp_path / "repo")
    at_take: dict[str, str] = {}

    def slow_writes(sid: str) -> None:
        image_hashes(daemon, sid, ["d0"], at_take)
        fd = os.open(dev, os.O_WRONLY)
        try:
            for off in range(0, 4 * MiB, 64 * 1024):
                os.pwrite(fd, os.urandom(64 * 1024), off)
                threading.Event().wait(0.05)
        finally:
            os.close(fd)

    res = run_backup(
        daemon.client,
        repo,
        ["d0"],
        "full",
        storage_size=MiB,
        storage_max=16 * MiB,
        on_take=slow_writes,
    )
    assert "low_free_space" in res.events and "corrupted" not in res.events
    assert res.storage_added >= 3 * MiB
    out = tmp_path / "restored"
    assert repo.restore(res.backup.id, "d0", str(out))["sha256"] == at_take["d0"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_backup_leaves_nothing_that_blocks_the_next(
    daemon: Daemon, tmp_path: Path, sig: str
) -> None:
    """SIGTERM: the backup unwinds (snapshot destroyed, staging removed).
    SIGKILL: its snapshot stays in blksnapd, but the next backup into the
    same repository finds it named in the dead writer's staging dir (the
    writer lock proves that writer dead), destroys it and runs."""
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    daemon.client.add_device(str(path), "big")
    repo = tmp_path / "repo"
    proc = subprocess.Popen(
        [str(BIN / "blksnap"), "--socket", daemon.sock, "backup", "-d", "big", "--repo",
         str(repo), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # Strike while the image is being read: chunks are being stored.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            staged = list((repo / "tmp").glob("*/begun")) if repo.exists() else []
            if staged and any((repo / "chunks").glob("*/*")):
                break
            time.sleep(0.002)
        else:
            raise AssertionError("the backup never started reading")
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc == 0:
        pytest.skip(f"the backup finished before {sig} arrived")
    r = Repository.open(str(repo))
    assert r.backups() == []
    if sig == "SIGTERM":
        assert rc == 128 + signal.SIGTERM, proc.stderr.read() if proc.stderr else ""
        assert daemon.client.snapshot_collect() == [], "SIGTERM left the snapshot"
        assert os.listdir(repo / "tmp") == [], "SIGTERM left the staged backup"
    else:
        assert rc == -signal.SIGKILL
        assert len(daemon.client.snapshot_collect()) == 1  # left behind
        assert len(os.listdir(repo / "tmp")) == 1
    # The next backup runs; nothing is left behind afterwards.
    assert run_backup(daemon.client, r, ["big"]).backup.kind == "full"
    assert daemon.client.snapshot_collect() == []
    assert os.listdir(repo / "tmp") == []
