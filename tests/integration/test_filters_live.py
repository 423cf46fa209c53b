"""The filters on live devices through blksnapd: attached and detached under
a mounted ext4 with fio and writers running; what the application, the file
system, fsck and the backups see of each."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from blksnap.backup.repo import Repository
from blksnap.backup.session import BackupFailed, run_backup
from tests.integration.conftest import SKIP, Daemon, run
from tests.integration.helpers import (
    MiB,
    Writer,
    add_device,
    direct_read,
    direct_write,
    fio_json,
    fio_verify,
    kill_worker,
    md5,
    sha256_file,
)

pytestmark = pytest.mark.skipif(bool(SKIP), reason=SKIP or "")
needs_fio = pytest.mark.skipif(not shutil.which("fio"), reason="fio is not installed")
FS_SIZE = 96 * MiB


def ctl(daemon: Daemon, dev: str, flt: str, *cmd: str) -> dict:
    return json.loads(daemon.cli("--json", "ctl", "-d", dev, "--filter", flt, *cmd).stdout)


def attach(daemon: Daemon, dev: str, flt: str, **opts: str) -> None:
    args = ["attach", "-d", dev, "--filter", flt]
    for k, v in opts.items():
        args += ["--opt", f"{k}={v}"]
    daemon.cli(*args)


def ext4(daemon: Daemon, tmp_path: Path, name: str = "a", size: int = FS_SIZE) -> tuple[str, str]:
    """Device ``name`` (tracker attached) with ext4, mounted: (loop, mount)."""
    path = tmp_path / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    lp = add_device(daemon, str(path), name)["loop"]
    daemon.cli("attach", "-d", name)
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", lp)
    mnt = daemon.mount_fs(lp, tmp_path / f"mnt-{name}")
    return lp, mnt


def write_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def files_ok(root: str, want: dict[str, str]) -> None:
    for name, digest in want.items():
        with open(os.path.join(root, name), "rb") as f:
            assert md5(f.read()) == digest, name


# -- flakey ---------------------------------------------------------------------------


@needs_fio
def test_flakey_errors_reach_fio_and_ext4(daemon: Daemon, tmp_path: Path) -> None:
    lp, mnt = ext4(daemon, tmp_path)
    rng = random.Random(1)
    kept = {f"k{i}": rng.randbytes(50_000) for i in range(5)}
    for name, data in kept.items():
        write_synced(os.path.join(mnt, name), data)
    # Attached under the mounted file system; up until told (a day of up).
    attach(daemon, "a", "flakey", mode="error_writes", up="86400", down="1")
    assert ctl(daemon, "a", "flakey", "status")["state"] == "up"
    listed = daemon.client.devices()[0]
    assert listed["filters"] == ["flakey", "blksnap"]
    fio = subprocess.Popen(
        ["fio", "--name=flaky", f"--filename={mnt}/fio.dat", "--size=16M", "--ioengine=libaio",
         "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--runtime=60",
         "--time_based", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        assert fio.poll() is None, fio.communicate()
        status = ctl(daemon, "a", "flakey", "down")
        assert status["state"] == "down" and status["forced"] == "down"
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode != 0
    job = fio_json(out)
    assert job["error"] == errno.EIO, (job["error"], err[-1000:])
    assert ctl(daemon, "a", "flakey", "status")["failed"] >= 1
    # ext4 meets the failing journal as with dm-flakey: a synced write fails.
    with pytest.raises(OSError) as info:
        write_synced(os.path.join(mnt, "late"), b"x" * 10_000)
    assert info.value.errno in (errno.EIO, errno.EROFS)
    ctl(daemon, "a", "flakey", "up")
    daemon.umount(mnt)
    daemon.cli("detach", "-d", "a", "--filter", "flakey")
    # fsck repairs what the failed writes left (journal replay); then clean.
    assert run("fsck.ext4", "-fy", lp, check=False).returncode in (0, 1)
    assert run("fsck.ext4", "-fn", lp, check=False).returncode == 0
    mnt = daemon.mount_fs(lp, tmp_path / "again")
    files_ok(mnt, {k: md5(v) for k, v in kept.items()})


# -- powercut -------------------------------------------------------------------------


def test_drop_writes_then_powercut_is_a_power_loss(daemon: Daemon, tmp_path: Path) -> None:
    lp, mnt = ext4(daemon, tmp_path)
    attach(daemon, "a", "powercut")
    attach(daemon, "a", "flakey", mode="drop_writes", up="86400", down="1")
    assert [s["filter"] for s in daemon.client.devices()[0]["stack"]] == [
        "flakey", "blksnap", "powercut"
    ]  # fmt: skip
    rng = random.Random(2)
    durable = {f"d{i}": rng.randbytes(rng.randrange(1, 300_000)) for i in range(20)}
    for name, data in durable.items():
        write_synced(os.path.join(mnt, name), data)
    # Overwrite one file in place with O_DIRECT and no fsync: the blocks
    # reach the device, no flush follows them.
    victim = os.path.join(mnt, "victim")
    old = rng.randbytes(256 * 1024)
    write_synced(victim, old)
    fd = os.open(victim, os.O_WRONLY | os.O_DIRECT)
    try:
        direct_write_fd(fd, 0, rng.randbytes(256 * 1024))
    finally:
        os.close(fd)
    status = ctl(daemon, "a", "powercut", "status")
    assert status["unflushed_blocks"] >= 64, status
    # The power goes: writes from now on vanish, then what was not flushed.
    ctl(daemon, "a", "flakey", "down")
    for i in range(5):  # (acknowledged, never written)
        with open(os.path.join(mnt, f"lost{i}"), "wb") as f:
            f.write(b"gone" * 1000)
    status = ctl(daemon, "a", "powercut", "cut")
    assert status["state"] == "cut" and status["cuts"] == 1
    daemon.umount(mnt)
    ctl(daemon, "a", "powercut", "restore")
    daemon.cli("detach", "-d", "a", "--filter", "flakey")
    daemon.cli("detach", "-d", "a", "--filter", "powercut")
    # What fsck and a mount find is what a power loss leaves: the journal
    # replays, every synced file is whole, the unsynced overwrite is undone.
    assert run("fsck.ext4", "-fy", lp, check=False).returncode in (0, 1)
    assert run("fsck.ext4", "-fn", lp, check=False).returncode == 0
    mnt = daemon.mount_fs(lp, tmp_path / "after")
    files_ok(mnt, {k: md5(v) for k, v in durable.items()})
    with open(os.path.join(mnt, "victim"), "rb") as f:
        assert f.read() == old
    assert not any(os.path.exists(os.path.join(mnt, f"lost{i}")) for i in range(5))


def direct_write_fd(fd: int, offset: int, data: bytes) -> None:
    """An O_DIRECT write of ``data`` (page-aligned buffer) at ``offset``."""
    import mmap

    buf = mmap.mmap(-1, len(data))
    try:
        buf.write(data)
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        buf.close()


def test_powercut_during_a_backup_fails_it_cleanly(daemon: Daemon, tmp_path: Path) -> None:
    path = tmp_path / "p.img"
    path.write_bytes(random.Random(3).randbytes(64 * MiB))
    daemon.client.add_device(str(path), "p")
    daemon.client.attach("p")
    repo = Repository.init(tmp_path / "repo")
    first = run_backup(daemon.client, repo, ["p"], "full")
    attach(daemon, "p", "powercut")
    attach(daemon, "p", "delay", read_ms="5")  # (the backup lasts long enough)
    fd = os.open(f"{daemon.mount}/dev/p", os.O_WRONLY)
    try:
        os.pwrite(fd, b"unflushed" * 1000, 4 * MiB)
    finally:
        os.close(fd)

    assert ctl(daemon, "p", "powercut", "status")["unflushed_blocks"] == 3

    def cut(sid: str) -> None:
        ctl(daemon, "p", "powercut", "cut")

    with pytest.raises(BackupFailed) as info:
        run_backup(daemon.client, repo, ["p"], "full", on_take=cut)
    assert "EIO" in str(info.value) or "Input/output" in str(info.value), info.value
    # The repository: the first backup whole, the failed one never a parent.
    assert repo.verify() == []
    good = [b for b in repo.backups() if b.state == "ok"]
    assert [b.id for b in good] == [first.backup.id]
    assert not daemon.client.snapshot_collect()  # the session cleaned up
    ctl(daemon, "p", "powercut", "restore")
    daemon.cli("detach", "-d", "p", "--filter", "delay")
    out = tmp_path / "restored"
    repo.restore(first.backup.id, "p", str(out))
    # The cut put back what the device held at the last flush (the backup's).
    assert sha256_file(out) == sha256_file(path)


# -- delay ----------------------------------------------------------------------------


@needs_fio
def test_delay_adds_its_latency(daemon: Daemon, tmp_path: Path) -> None:
    """On a mounted ext4 under fio: the delay is attached and detached live,
    and fio's completion latencies show it (printed; the assertions are
    lower bounds only, which a delay cannot miss)."""
    _, mnt = ext4(daemon, tmp_path)

    def fio(name: str) -> dict:
        out = run("fio", f"--name={name}", f"--filename={mnt}/lat.dat", "--size=8M",
                  "--ioengine=psync", "--direct=1", "--rw=randrw", "--bs=4k", "--runtime=1.5",
                  "--time_based", "--output-format=json", timeout=60).stdout  # fmt: skip
        job = fio_json(out)
        assert job["error"] == 0, job["error"]
        return {rw: job[rw]["clat_ns"] for rw in ("read", "write")}

    plain = fio("plain")
    attach(daemon, "a", "delay", write_ms="8", read_ms="4")
    slow = fio("slow")
    held = ctl(daemon, "a", "delay", "status")["held"]
    daemon.cli("detach", "-d", "a", "--filter", "delay")
    after = fio("after")
    for name, lat in (("plain", plain), ("write_ms=8,read_ms=4", slow), ("detached", after)):
        r, w = lat["read"], lat["write"]
        print(f"fio 4 KiB QD1 on ext4, {name}: completion latency read "
              f"{r['mean'] / 1e6:.2f} ms (min {r['min'] / 1e6:.2f}), write "
              f"{w['mean'] / 1e6:.2f} ms (min {w['min'] / 1e6:.2f})")  # fmt: skip
    assert slow["write"]["min"] >= 8e6 and slow["read"]["min"] >= 4e6
    assert held >= slow["write"]["N"] + slow["read"]["N"]


# -- migrate --------------------------------------------------------------------------


def wait_migrated(daemon: Daemon, dev: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = ctl(daemon, dev, "migrate", "status")
        if st["state"] != "copying":
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


@needs_fio
def test_migrate_a_mounted_ext4_under_fio_and_a_writer(daemon: Daemon, tmp_path: Path) -> None:
    lp, mnt = ext4(daemon, tmp_path, size=128 * MiB)
    repo = Repository.init(tmp_path / "repo")
    first = run_backup(daemon.client, repo, ["a"], "full")
    generation = daemon.client.cbt_info("a").generation_id
    old_path = daemon.client.devices()[0]["backing"]
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(160 * MiB)  # larger than the device: it keeps its size
    os.makedirs(os.path.join(mnt, "w"))
    writer = Writer(os.path.join(mnt, "w"), tmp_path / "stop", keep=40, maxsize=200_000)
    fio = fio_verify(f"{mnt}/fio.dat", "24M", 8, name="mig")
    try:
        time.sleep(1)
        attach(daemon, "a", "migrate", target=str(target), rate="24M")
        mid = ctl(daemon, "a", "migrate", "status")
        assert mid["state"] == "copying" and mid["total"] == 128 * MiB
        st = wait_migrated(daemon, "a")
        out, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        writer.stop()
    assert st["state"] == "switched" and st["copied"] == st["total"], st
    assert fio.returncode == 0, err[-2000:]
    job = fio_json(out)
    assert job["error"] == 0 and job["read"]["io_bytes"] > 0, job["error"]
    assert not writer.errors() and writer.count() > 10, writer.describe()
    dev = daemon.client.devices()[0]
    assert dev["backing"] == str(target) and dev["size"] == 128 * MiB
    assert dev["filters"] == ["blksnap"]
    assert daemon.client.cbt_info("a").generation_id == generation
    # The old file is no longer written; the device is the target's bytes.
    old_sum = sha256_file(old_path)
    write_synced(os.path.join(mnt, "after-switch"), b"new" * 100_000)
    assert sha256_file(old_path) == old_sum
    run("sync", "-f", mnt)
    assert sha256_file(f"{daemon.mount}/dev/a") == sha256_file(target, 128 * MiB)
    files_ok(os.path.join(mnt, "w"), writer.files())
    # The next backup is incremental in the same generation, and right.
    hashes: dict[str, str] = {}

    def at_take(sid: str) -> None:
        hashes["a"] = sha256_file(f"{daemon.mount}/images/{sid}/a")

    res = run_backup(daemon.client, repo, ["a"], "auto", on_take=at_take)
    assert res.backup.kind == "incremental" and res.backup.device("a").parent == first.backup.id
    restored = tmp_path / "restored"
    assert repo.restore(res.backup.id, "a", str(restored))["sha256"] == hashes["a"]
    daemon.umount(mnt)
    assert run("fsck.ext4", "-fn", lp, check=False).returncode == 0


def test_migrate_carries_on_after_the_worker_is_killed(daemon: Daemon, tmp_path: Path) -> None:
    rng = random.Random(5)
    data = bytearray(rng.randbytes(48 * MiB))
    path = tmp_path / "m.img"
    path.write_bytes(data)
    lp = add_device(daemon, str(path), "m")["loop"]
    target = tmp_path / "mt.img"
    with open(target, "wb") as f:
        f.truncate(48 * MiB)
    attach(daemon, "m", "migrate", target=str(target), rate="8M")
    time.sleep(1)
    for i in range(20):  # writes while copying, each in both stores
        chunk = rng.randbytes(4096)
        direct_write(lp, i * 2 * MiB + 8192, chunk)
        data[i * 2 * MiB + 8192 : i * 2 * MiB + 8192 + 4096] = chunk
    before = ctl(daemon, "m", "migrate", "status")["copied"]
    assert 0 < before < 48 * MiB
    kill_worker(daemon)
    st = ctl(daemon, "m", "migrate", "status")  # attached again, carrying on
    assert st["state"] == "copying" and st["copied"] >= before - MiB, (before, st)
    chunk = rng.randbytes(4096)
    direct_write(lp, 47 * MiB, chunk)
    data[47 * MiB : 47 * MiB + 4096] = chunk
    daemon.cli("ctl", "-d", "m", "--filter", "migrate", "abort")
    daemon.cli("detach", "-d", "m", "--filter", "migrate")
    attach(daemon, "m", "migrate", target=str(target))  # again, full speed
    assert wait_migrated(daemon, "m")["state"] == "switched"
    assert daemon.client.devices()[0]["backing"] == str(target)
    # A worker taking over after the switch serves the device from the target.
    kill_worker(daemon)
    assert daemon.client.devices()[0]["backing"] == str(target)
    assert md5(direct_read(lp, 0, 48 * MiB)) == md5(bytes(data))
    assert sha256_file(target) == sha256_file(f"{daemon.mount}/dev/m")


# -- diff storage on a failing device -------------------------------------------------


def test_diff_storage_on_a_flakey_device_fails_only_the_snapshot(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The snapshot's diff storage is a file on ext4 on device ``store``,
    which flakey fails mid-snapshot: the snapshot is corrupted, the device
    it protects keeps every write."""
    _, smnt = ext4(daemon, tmp_path, name="store", size=64 * MiB)
    rng = random.Random(6)
    data = bytearray(rng.randbytes(32 * MiB))
    path = tmp_path / "o.img"
    path.write_bytes(data)
    lo = add_device(daemon, str(path), "o")["loop"]
    sdir = os.path.join(smnt, "diff")
    os.makedirs(sdir)
    sid = json.loads(daemon.cli("--json", "snapshot", "create", "-d", "o", "-f", sdir,
                                "-l", "24M").stdout)["id"]  # fmt: skip
    daemon.cli("snapshot", "take", "-i", sid)
    for i in range(4):  # copied on write into the storage, fine
        chunk = rng.randbytes(4096)
        direct_write(lo, i * MiB, chunk)
        data[i * MiB : i * MiB + 4096] = chunk
    assert daemon.client.snapshot_collect(sid)[0]["error"] is None
    attach(daemon, "store", "flakey", mode="error_writes,error_reads", up="86400", down="1")
    ctl(daemon, "store", "flakey", "down")
    for i in range(4, 12):  # the copies fail now: the writes must not
        chunk = rng.randbytes(4096)
        direct_write(lo, i * MiB, chunk)
        data[i * MiB : i * MiB + 4096] = chunk
    snap = daemon.client.snapshot_collect(sid)[0]
    assert snap["error"] is not None, snap
    assert ctl(daemon, "store", "flakey", "status")["failed"] >= 1
    # The origin: every write there, 0 bytes lost.
    assert md5(direct_read(lo, 0, 32 * MiB)) == md5(bytes(data))
    ctl(daemon, "store", "flakey", "up")
    daemon.cli("snapshot", "destroy", "-i", sid)
    assert md5(path.read_bytes()) == md5(bytes(data))


# -- the CLI --------------------------------------------------------------------------


def test_filter_list_ctl_and_device_list(daemon: Daemon, tmp_path: Path) -> None:
    kinds = json.loads(daemon.cli("--json", "filter", "list").stdout)
    names = [k["filter"] for k in kinds]
    assert names == ["flakey", "delay", "blksnap", "powercut", "hydrate", "migrate"]
    assert [k["altitude"] for k in kinds] == sorted(k["altitude"] for k in kinds)
    text = daemon.cli("filter", "list").stdout
    assert "flakey" in text and "ALTITUDE" in text
    path = tmp_path / "c.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    daemon.client.add_device(str(path), "c")
    attach(daemon, "c", "flakey", mode="drop_writes")
    out = daemon.cli("device", "list").stdout
    assert "flakey(down)" in out
    r = daemon.cli("--json", "ctl", "-d", "c", "--filter", "powercut", "status", check=False)
    assert r.returncode != 0 and json.loads(r.stderr)["error"] == "ENOENT"
    r = daemon.cli("--json", "ctl", "-d", "c", "--filter", "flakey", "explode", check=False)
    assert r.returncode != 0 and json.loads(r.stderr)["error"] in ("ENOTTY", "EOPNOTSUPP")
    r = daemon.cli("--json", "attach", "-d", "c", "--filter", "flakey", check=False)
    assert json.loads(r.stderr)["error"] == "EALREADY"
    r = daemon.cli("--json", "attach", "-d", "c", "--filter", "migrate", "--opt",
                   f"target={daemon.mount}/dev/c", check=False)  # fmt: skip
    assert json.loads(r.stderr)["error"] in ("EINVAL", "EBUSY")
    daemon.cli("attach", "-d", "c")
    info = ctl(daemon, "c", "blksnap", "cbtinfo")
    assert info["block_count"] > 0
    daemon.cli("detach", "-d", "c", "--filter", "flakey")


def test_filter_state_carries_on_after_the_worker_is_killed(daemon: Daemon, tmp_path: Path) -> None:
    path = tmp_path / "k.img"
    path.write_bytes(random.Random(8).randbytes(16 * MiB))
    lp = add_device(daemon, str(path), "k")["loop"]
    attach(daemon, "k", "flakey", mode="error_writes")  # down until told
    attach(daemon, "k", "delay")
    attach(daemon, "k", "powercut")
    ctl(daemon, "k", "flakey", "up")
    daemon.cli("ctl", "-d", "k", "--filter", "delay", "set", "write_ms=3")
    fd = os.open(f"{daemon.mount}/dev/k", os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x11" * 4096, 0)  # not flushed
    finally:
        os.close(fd)
    assert ctl(daemon, "k", "powercut", "status")["unflushed_blocks"] == 1
    kill_worker(daemon)
    assert [s["filter"] for s in daemon.client.devices()[0]["stack"]] == [
        "flakey", "delay", "powercut"
    ]  # fmt: skip
    assert ctl(daemon, "k", "flakey", "status")["forced"] == "up"  # not down again
    assert ctl(daemon, "k", "delay", "status")["write_ms"] == 3
    assert ctl(daemon, "k", "powercut", "status")["unflushed_blocks"] == 1
    fd = os.open(f"{daemon.mount}/dev/k", os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x22" * 4096, 8192)  # not flushed either
    finally:
        os.close(fd)
    assert ctl(daemon, "k", "powercut", "status")["unflushed_blocks"] == 2
    ctl(daemon, "k", "powercut", "cut")
    ctl(daemon, "k", "powercut", "restore")
    data = path.read_bytes()
    assert md5(direct_read(lp, 0, 16 * MiB)) == md5(data)
    assert data[:4096] != b"\x11" * 4096 and data[8192:12288] != b"\x22" * 4096
    ctl(daemon, "k", "flakey", "down")
    with pytest.raises(OSError) as info:
        direct_write(lp, 0, b"\x33" * 4096)
    assert info.value.errno == errno.EIO
