"""The CBT across a stop of the whole blksnapd: after a clean stop a new
blksnapd on the same state dir carries the map on (same generation, next
backup incremental and right); without write intent, after a kill of every
process it starts a new generation and says why."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from blksnap.backup.repo import Repository
from blksnap.backup.session import run_backup
from blksnap.tools import sandbox
from tests.integration.conftest import SKIP, Daemon, cli
from tests.integration.helpers import kill_daemon, sha256_file

pytestmark = pytest.mark.skipif(bool(SKIP), reason=SKIP or "")
MiB = 1 << 20
SIZE = 32 * MiB


def write_dev(d: sandbox.Sandbox, name: str, rng: random.Random, count: int) -> None:
    fd = os.open(f"{d.mount}/dev/{name}", os.O_WRONLY)
    try:
        for _ in range(count):
            n = rng.randrange(1, 200_000)
            os.pwrite(fd, rng.randbytes(n), rng.randrange(SIZE - n))
        os.fsync(fd)
    finally:
        os.close(fd)


def serve(root: Path, disk: Path, opts: tuple[str, ...] = ()) -> sandbox.Sandbox:
    d = sandbox.start(root, opts)
    try:
        d.client.add_device(str(disk), "a")
        d.client.attach("a")
    except BaseException:
        d.stop()  # (nothing left running when the test fails here)
        raise
    return d


def origin(d: sandbox.Sandbox) -> str:
    stack = d.client.devices()[0]["stack"]
    return next(f["status"]["origin"] for f in stack if f["filter"] == "blksnap")


def test_a_clean_stop_and_a_new_blksnapd_keep_the_backups_incremental(tmp_path: Path) -> None:
    rng = random.Random(11)
    disk = tmp_path / "a.img"
    disk.write_bytes(rng.randbytes(SIZE))
    repo = Repository.init(tmp_path / "repo")
    root = tmp_path / "d"
    d = serve(root, disk)
    try:
        full = run_backup(d.client, repo, ["a"], "auto")
        assert full.backup.kind == "full"
        write_dev(d, "a", rng, 20)
        info = d.client.cbt_info("a")
    finally:
        d.stop()
    assert not sandbox.mounts_under(str(root))
    d = serve(root, disk)  # a new blksnapd, as after a reboot
    try:
        assert origin(d) == "checkpoint"
        assert d.client.cbt_info("a") == info
        write_dev(d, "a", rng, 20)
        hashes: dict[str, str] = {}

        def at_take(sid: str) -> None:
            hashes["a"] = sha256_file(f"{d.mount}/images/{sid}/a")

        inc = run_backup(d.client, repo, ["a"], "auto", on_take=at_take)
        assert inc.backup.kind == "incremental", inc.backup.device("a").reason
        assert inc.backup.device("a").parent == full.backup.id
        out = tmp_path / "restored"
        assert repo.restore(inc.backup.id, "a", str(out))["sha256"] == hashes["a"]
        assert sha256_file(out) == sha256_file(disk)  # nothing written since the take
    finally:
        d.stop()


def test_a_killed_blksnapd_without_write_intent_starts_a_new_generation(tmp_path: Path) -> None:
    """With write intent off (``cbt_intent_region_size=0``) the CBT survives
    a clean stop only: after a kill of every process a new generation, and
    why. (With it, the generation is kept: tests/integration/test_cbt_crash.py.)"""
    rng = random.Random(12)
    disk = tmp_path / "a.img"
    disk.write_bytes(rng.randbytes(SIZE))
    root = tmp_path / "d"
    off = ("--param", "cbt_intent_region_size=0")
    serve(root, disk, off).stop()  # a clean stop: a checkpoint
    d = serve(root, disk, off)
    try:
        assert origin(d) == "checkpoint"  # carried on, and marked in use
        gen = d.client.cbt_info("a").generation_id
        write_dev(d, "a", rng, 5)
    finally:
        kill_daemon(d)
    d = serve(root, disk, off)  # clears the dead mount, serves again
    try:
        why = origin(d)
        assert why.startswith("new: ") and "no write intent covers" in why, why
        assert d.client.cbt_info("a").generation_id != gen
        assert "did not stop cleanly" in d.log_text()
    finally:
        d.stop()


def test_restore_devices_serves_the_last_run_again(tmp_path: Path) -> None:
    """``blksnapd --restore-devices`` (a boot): the devices of the last run
    are served again with their trackers and loop devices; the CBT carries
    on from its checkpoint; a device whose file is missing stays in the
    record and is served at a later start once the file is back."""
    rng = random.Random(13)
    disk, gone = tmp_path / "a.img", tmp_path / "b.img"
    disk.write_bytes(rng.randbytes(SIZE))
    gone.write_bytes(rng.randbytes(4 * MiB))
    root = tmp_path / "d"
    d = sandbox.start(root, ["--restore-devices"])
    try:
        d.client.add_device(str(disk), "a", loop=True)
        d.client.attach("a")
        d.client.add_device(str(gone), "b")
        d.client.attach("b", "flakey", {"mode": "error_writes"})
        write_dev(d, "a", rng, 10)
        info = d.client.cbt_info("a")
    finally:
        d.stop()
    os.rename(gone, f"{gone}.away")
    d = sandbox.start(root, ["--restore-devices"])
    try:
        devs = {x["name"]: x for x in d.client.devices()}
        assert sorted(devs) == ["a"], devs
        assert devs["a"]["filters"] == ["blksnap"] and devs["a"]["loop"], devs["a"]
        assert origin(d) == "checkpoint" and d.client.cbt_info("a") == info
        assert "device b" in d.log_text() and "not served again" in d.log_text()
    finally:
        d.stop()
    os.rename(f"{gone}.away", gone)
    d = sandbox.start(root, ["--restore-devices"])
    try:
        devs = {x["name"]: x for x in d.client.devices()}
        assert sorted(devs) == ["a", "b"], devs
        assert devs["b"]["filters"] == [], devs["b"]  # (flakey is not attached again)
        assert "filters flakey not attached again" in d.log_text()
    finally:
        d.stop()
    d = sandbox.start(root)  # without the option: nothing served
    try:
        assert d.client.devices() == []
    finally:
        d.stop()


def test_daemon_start_restore_devices(tmp_path: Path) -> None:
    """``blksnap daemon start --restore-devices`` passes the option on."""
    disk = tmp_path / "a.img"
    disk.write_bytes(random.Random(14).randbytes(4 * MiB))
    root = tmp_path / "d"
    serve(root, disk).stop()  # the last run: device a, tracked
    sock, mount, state = str(root / "blksnapd.sock"), str(root / "mnt"), str(root / "state")
    cli(sock, "daemon", "start", "--restore-devices", "--mount", mount, "--state-dir", state)
    try:
        devs = json.loads(cli(sock, "--json", "device", "list").stdout)
        assert [d["name"] for d in devs] == ["a"] and devs[0]["filters"] == ["blksnap"]
    finally:
        cli(sock, "daemon", "stop", check=False)
        sandbox.cleanup_under(str(root))


def test_a_reboot_keeps_the_backups_incremental(tmp_path: Path) -> None:
    """A reboot, simulated: ext4 on a blksnapd loop device, a full backup,
    files written; then everything stops (the file system unmounted, blksnapd
    stopped: its loop device and FUSE mount gone) and blksnapd starts fresh
    with ``--restore-devices`` on the same state dir. The device and its
    loop device are back, same generation; more files; the incremental
    backup restores to exactly the device, and the file system's files
    are all there."""
    from tests.integration.helpers import populate, tree

    rng = random.Random(14)
    disk = tmp_path / "a.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    repo = Repository.init(tmp_path / "repo")
    root = tmp_path / "d"
    opts = ("--restore-devices",)
    mnt = tmp_path / "fs"
    d = sandbox.start(root, opts)
    try:
        lp = d.client.add_device(str(disk), "a", loop=True)["loop"]
        d.client.attach("a")
        sandbox.run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", lp)
        d.mount_fs(lp, mnt)
        populate(mnt, rng, 20, "before")
        sandbox.run("sync", "-f", str(mnt))
        full = run_backup(d.client, repo, ["a"], "full")
        populate(mnt, rng, 20, "between")
        d.umount(mnt)
        gen = d.client.cbt_info("a").generation_id
    finally:
        d.stop()
    assert not sandbox.mounts_under(str(root)) and not sandbox.loops_under(str(root))
    d = sandbox.start(root, opts)  # the boot
    try:
        (dev,) = d.client.devices()
        assert dev["name"] == "a" and dev["loop"], dev
        assert origin(d) == "checkpoint"
        assert d.client.cbt_info("a").generation_id == gen
        d.mount_fs(dev["loop"], mnt)
        populate(mnt, rng, 20, "after")
        files = tree(mnt)
        d.umount(mnt)
        inc = run_backup(d.client, repo, ["a"], "auto")
        rec = inc.backup.device("a")
        assert rec.kind == "incremental" and rec.parent == full.backup.id, rec.reason
        out = tmp_path / "restored.img"
        assert repo.restore(inc.backup.id, "a", str(out))["sha256"] == sha256_file(disk)
        sandbox.run("mount", "-o", "ro,loop,noload", str(out), str(mnt))
        try:
            assert tree(mnt) == files
        finally:
            sandbox.run("umount", str(mnt))
    finally:
        d.stop()


def test_a_power_cut_keeps_the_devices_to_serve_again(
    daemon: Daemon, backing: Callable[[str, int], str], tmp_path: Path
) -> None:
    """blksnapd's state dir on ext4 over a device of another blksnapd, with
    powercut and flakey (drop_writes) on it; a device added, then the power
    cut at once (writes from then on vanish, then what was not flushed),
    blksnapd killed, and the file system mounted again from what the disk
    kept: the record lists the device and ``--restore-devices`` serves it
    again. (A record renamed into place without a sync is still in the page
    cache and the journal's open transaction: gone at the cut.)"""
    disk = backing("a.img", 4 * MiB)
    lp = daemon.client.add_device(backing("s.img", 64 * MiB), "s", loop=True)["loop"]
    sandbox.run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", lp)
    for args in (("powercut",), ("flakey", "--opt", "mode=drop_writes", "--opt", "up=86400")):
        daemon.cli("attach", "-d", "s", "--filter", *args)
    # (its state dir a link to the mount: the inner blksnapd's clean-ups
    # unmount what is under its root, and this mount is the outer one's)
    root = tmp_path / "inner"
    root.mkdir()
    (root / "state").symlink_to(tmp_path / "state")
    state = daemon.mount_fs(lp, tmp_path / "state")
    inner = sandbox.start(root, ["--restore-devices"])
    try:
        inner.client.add_device(disk, "a")
        daemon.cli("ctl", "-d", "s", "--filter", "flakey", "down")
        daemon.cli("ctl", "-d", "s", "--filter", "powercut", "cut")
        kill_daemon(inner)
    finally:
        if inner.proc.poll() is None:
            inner.stop()
    daemon.umount(state)
    daemon.cli("ctl", "-d", "s", "--filter", "powercut", "restore")
    for flt in ("flakey", "powercut"):
        daemon.cli("detach", "-d", "s", "--filter", flt)
    state = daemon.mount_fs(lp, tmp_path / "state")  # the boot
    rec = json.loads((root / "state" / "daemon.json").read_text())
    assert [x["name"] for x in rec["devices"]] == ["a"], rec
    inner = sandbox.start(root, ["--restore-devices"])
    try:
        assert [x["name"] for x in inner.client.devices()] == ["a"]
    finally:
        inner.stop()
    daemon.umount(state)
