"""Backups used at once: ``blksnap mount`` serves any backup of a chain
read-only (file-level restore from its loop device), and ``blksnap restore
--instant`` serves a target as the device while it is hydrated, a worker
crash in the middle carried on, the next backup incremental."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, have, run
from tests.integration.helpers import add_device, kill_worker, populate, sha256_file, tree

MiB = 1 << 20
SIZE = 64 * MiB


def jcli(daemon: Daemon, *args: str) -> dict:
    return json.loads(daemon.cli("--json", *args).stdout)


def backup(daemon: Daemon, repo: Path, name: str, *mode: str) -> dict:
    return jcli(daemon, "backup", "-d", name, "--repo", str(repo), "--no-progress", *mode)


def ext4_device(daemon: Daemon, tmp_path: Path, name: str, size: int = SIZE) -> tuple[str, str]:
    """A device with ext4 on it, mounted: (its loop device, the mount point)."""
    path = tmp_path / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    out = add_device(daemon, str(path), name)
    daemon.cli("attach", "-d", name)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", out["loop"])
    where = daemon.mount_fs(out["loop"], tmp_path / f"mnt-{name}")
    return out["loop"], where


def hydration(daemon: Daemon, name: str) -> dict:
    for d in daemon.client.devices():
        if d["name"] == name:
            return d["hydration"]
    raise AssertionError(f"no device {name}")


def wait_hydrated(daemon: Daemon, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = hydration(daemon, name)
        if h and h["state"] == "done":
            return h
        assert h is None or h["state"] != "failed", h
        time.sleep(0.1)
    raise AssertionError(f"{name} not hydrated in {timeout} s: {hydration(daemon, name)}")


@pytest.mark.skipif(not have("mkfs.ext4"), reason="mkfs.ext4 is not installed")
def test_mount_every_backup_of_a_chain(daemon: Daemon, tmp_path: Path) -> None:
    """full -> incremental -> differential -> incremental: each backup,
    mounted with a loop device, holds the files as they were at its take."""
    rng = random.Random(16)
    _, where = ext4_device(daemon, tmp_path, "d0")
    repo = tmp_path / "repo"
    states: dict[str, dict[str, str]] = {}
    for step, mode in enumerate(["--full", "--incremental", "--differential", "--incremental"]):
        populate(where, rng, 6, f"s{step}-")
        if step == 2:
            os.unlink(os.path.join(where, "s0-000.bin"))
        run("sync", "-f", where)
        states[backup(daemon, repo, "d0", mode)["id"]] = tree(where)
    kinds = [b["devices"][0]["kind"] for b in jcli(daemon, "backups", "--repo", str(repo))]
    assert kinds == ["full", "incremental", "differential", "incremental"]
    for i, (bid, want) in enumerate(states.items()):
        got = jcli(daemon, "mount", "--repo", str(repo), "-b", bid, "-d", "d0", "--loop")
        assert got["name"] == f"backups/{bid}/d0"
        assert got["path"] == os.path.join(daemon.mount, "backups", bid, "d0")
        assert got["loop"].startswith("/dev/loop")
        # read-only: a write is refused
        with pytest.raises(OSError), open(got["path"], "r+b") as f:
            f.write(b"x")
        mnt = daemon.mount_fs(got["loop"], tmp_path / f"ro{i}", "ro", "noload")
        assert tree(mnt) == want, bid
        # in use: umount refused
        err = daemon.cli("--json", "umount", "-b", bid, "-d", "d0", check=False)
        assert err.returncode != 0 and "EBUSY" in err.stderr
        daemon.umount(mnt)
        daemon.cli("umount", "--repo", str(repo), "-b", bid, "-d", "d0")
        assert not os.path.exists(got["path"])


def test_instant_restore_smoke(daemon: Daemon, tmp_path: Path) -> None:
    rng = random.Random(5)
    data = bytearray(rng.randbytes(8 * MiB)) + bytes(8 * MiB)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    add_device(daemon, str(src), "d0", loop=False)
    daemon.cli("attach", "-d", "d0")
    repo = tmp_path / "repo"
    b = backup(daemon, repo, "d0")
    daemon.cli("device", "remove", "d0")
    target = tmp_path / "target.img"
    got = jcli(
        daemon, "restore", "--instant", "--repo", str(repo), "-b", b["id"], "-d", "d0",
        "--to", str(target), "--paused",
    )  # fmt: skip
    assert got["hydration"]["state"] == "paused", got
    path = got["path"]
    with open(path, "rb") as f:
        assert f.read(4096) == bytes(data[:4096])
        f.seek(5 * MiB)
        assert f.read(MiB) == bytes(data[5 * MiB : 6 * MiB])
    daemon.cli("ctl", "-d", "d0", "--filter", "hydrate", "resume")
    wait_hydrated(daemon, "d0")
    assert sha256_file(path) == sha256_file(src)
    assert "hydrate" not in daemon.client.devices()[0]["filters"]
    _ = kill_worker
