"""Diff storage on the protected device itself: the main deployment (the
root file system protected, its snapshot's storage a file on that same
file system). The file is preallocated at create and used through its
extents on the device's backing store, below the filters: the take does
not hang on the freeze, copy-on-write never writes through the file system
or the tracker, and the image of the busy file system is exactly what it
held at take. What cannot be done safely is refused with EINVAL."""

from __future__ import annotations

import json
import os
import random
import struct
import time
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, Daemon, have, run
from tests.integration.helpers import (
    MiB,
    add_device,
    collect,
    kill_worker,
    populate,
    tree,
)

pytestmark = pytest.mark.timeout(240)

#: (ext4 with its inode tables and journal zeroed at mkfs: otherwise
#: ext4lazyinit zeroes them in the background after the mount, and those
#: writes copy chunks on write at moments of their own: the storage used
#: then grows between two looks that expect it to stand still.)
TOOLS = {
    "ext4": ("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"),
    "xfs": ("mkfs.xfs", "-q", "-f"),
}
#: How an image mounts beside its mounted original.
IMAGE_OPTS = {"ext4": ("ro", "noload"), "xfs": ("ro", "nouuid", "norecovery")}


def cli_json(daemon: Daemon, *args: str, timeout: float = 120) -> dict:
    out = run(str(BIN / "blksnap"), "--socket", daemon.sock, "--json", *args, timeout=timeout)
    return json.loads(out.stdout)


def cli_fails(daemon: Daemon, *args: str) -> dict:
    out = daemon.cli("--json", *args, check=False)
    assert out.returncode == 1, (out.stdout, out.stderr)
    return json.loads(out.stderr.strip().splitlines()[-1])


def sync_fs(path: str | Path) -> None:
    run("sync", "-f", str(path))


@pytest.mark.parametrize(("fstype", "given"), [("ext4", "file"), ("xfs", "file"), ("ext4", "dir")])
def test_storage_file_on_the_protected_file_system(daemon, backing, tmp_path, fstype, given):
    if not have(TOOLS[fstype][0]):
        pytest.skip(f"{TOOLS[fstype][0]} is not installed")
    dev = add_device(daemon, backing("disk0", 320 * MiB), "disk0")  # xfs: >= 300 MB
    run(*TOOLS[fstype], dev["loop"])
    mnt = daemon.mount_fs(dev["loop"], tmp_path / "fs")
    rng = random.Random(7)
    populate(mnt, rng, 40, "before")
    if given == "file":
        storage = Path(mnt) / "blksnap.diff"
        storage.touch()
        where = storage
    else:  # a directory: blksnap makes the file there, and removes it
        where = Path(mnt) / "tmp"
        where.mkdir()

    sid = cli_json(daemon, "snapshot", "create", "-d", "disk0", "-f", str(where), "-l", "48M")["id"]
    [snap] = collect(daemon, sid)
    [src] = snap["storage"]["sources"]
    assert src["kind"] == "mapped", src
    if given == "dir":
        storage = Path(src["path"])
        assert storage.parent == where and storage.name.startswith(".blksnap-diff-"), src
    assert src["path"] == str(storage), src
    # Preallocated through the file system, before the take.
    assert os.stat(storage).st_blocks * 512 >= 48 * MiB
    sync_fs(mnt)
    at_take = tree(mnt)

    # The take freezes the file system that holds the storage: it must not hang.
    taken = cli_json(daemon, "snapshot", "take", "-i", sid, "--loop", timeout=60)
    image_loop = taken["images"]["disk0"]["loop"]

    # From the take on the storage file is immutable: nothing can write,
    # truncate or move its blocks under the snapshot.
    with pytest.raises(PermissionError):
        open(storage, "r+b").close()
    with pytest.raises(PermissionError):
        os.unlink(storage)

    # The file system goes on being written: every first write after take
    # copies a chunk into the storage file's blocks, below the file system.
    populate(mnt, rng, 20, "after")
    sync_fs(mnt)
    # blksnapd's worker dies: the next one carries the snapshot on, storage
    # mapped on the device included (still immutable, still marked in the CBT).
    used = collect(daemon, sid)[0]["storage"]["used"]
    st = kill_worker(daemon)
    assert st["snapshots"] == 1 and not st["lost_snapshots"], st
    assert collect(daemon, sid)[0]["storage"]["used"] == used
    with pytest.raises(PermissionError):
        open(storage, "r+b").close()
    populate(mnt, rng, 20, "later")
    for name in sorted(at_take)[:10]:
        with open(os.path.join(mnt, name), "r+b") as f:
            f.write(os.urandom(8192))
    sync_fs(mnt)
    [snap] = collect(daemon, sid)
    assert snap["storage"]["used"] > used, snap
    assert snap["state"] == "taken", snap
    assert snap["storage"]["used"] > 0, snap
    # Nothing went through the file system into the storage file.
    with open(storage, "rb") as f:
        assert f.read(1 * MiB) == bytes(1 * MiB)

    # The image: exactly the files at take, and a clean file system.
    img_mnt = daemon.mount_fs(image_loop, tmp_path / "img", *IMAGE_OPTS[fstype])
    got = tree(img_mnt)
    assert got == at_take
    daemon.umount(img_mnt)
    if fstype == "ext4":
        fsck = run("fsck.ext4", "-fn", image_loop, check=False)
    else:
        # xfs_repair -n ignores the log (its lazy counters then disagree with
        # the superblock): replay it by a mount of the writable image first.
        img_mnt = daemon.mount_fs(image_loop, tmp_path / "img", "nouuid")
        assert tree(img_mnt) == at_take
        daemon.umount(img_mnt)
        fsck = run("xfs_repair", "-n", image_loop, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    cli_json(daemon, "snapshot", "destroy", "-i", sid)
    if given == "file":  # the user's file, free again
        os.truncate(storage, 0)
    else:  # the one blksnap made is gone
        assert not storage.exists() and os.listdir(where) == []

    # The blocks that took copied chunks, written below the tracker, are
    # marked changed all the same: the next snapshot's CBT (what the next
    # incremental backup reads) has them above this take's number.
    before = cli_json(daemon, "cbtinfo", "-d", "disk0")["changes_number"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    sid2 = cli_json(daemon, "snapshot", "create", "-d", "disk0", "-f", str(other), "-l", "64M")[
        "id"
    ]
    cli_json(daemon, "snapshot", "take", "-i", sid2)
    info = cli_json(daemon, "cbtinfo", "-d", "disk0")
    cbt = tmp_path / "cbt"
    daemon.cli("readcbtmap", "-d", "disk0", "-f", str(cbt))
    changed = sum(1 for b in cbt.read_bytes() if b > before)
    assert changed * info["block_size"] >= snap["storage"]["used"], (changed, snap["storage"])
    cli_json(daemon, "snapshot", "destroy", "-i", sid2)
    daemon.umount(mnt)


def test_storage_that_cannot_be_used_safely_is_refused(daemon, backing, tmp_path):
    dev = add_device(daemon, backing("disk0", 128 * MiB), "disk0")
    add_device(daemon, backing("disk1", 64 * MiB), "disk1", loop=False)
    run("mkfs.ext4", "-q", "-F", dev["loop"])
    mnt = daemon.mount_fs(dev["loop"], tmp_path / "fs")
    fuse_file = os.path.join(daemon.mount, "dev", "disk0")
    link = tmp_path / "link-to-backing"
    link.symlink_to(dev["backing"])

    cases = {
        # The device itself, under any of its names.
        fuse_file: ("EINVAL", "disk0"),
        dev["loop"]: ("EINVAL", "disk0"),
        dev["backing"]: ("EINVAL", "disk0"),
        str(link): ("EINVAL", "disk0"),
        # Another served device's data.
        os.path.join(daemon.mount, "dev", "disk1"): ("EINVAL", "disk1"),
    }
    for path, (code, word) in cases.items():
        err = cli_fails(daemon, "snapshot", "create", "-d", "disk0", "-f", path, "-l", "8M")
        assert err["error"] == code, (path, err)
        assert word in err["message"], (path, err)
    assert collect(daemon) == []
    err = cli_fails(
        daemon, "snapshot", "create", "-d", "disk0", "-f", dev["backing"].replace("disk0", "disk1")
    )
    assert err["error"] == "EBUSY", err
    assert collect(daemon) == []
    daemon.umount(mnt)


def write_mbr(path: str, start: int, length: int) -> None:
    """An MS-DOS partition table with one Linux partition."""
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start >> 9, length >> 9)
    with open(path, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")


def _losetup(*args: str) -> str:
    return run("losetup", "--find", "--show", *args).stdout.strip()


def refused(daemon: Daemon, path: str, name: str, word: str) -> None:
    err = cli_fails(daemon, "device", "add", path, "--name", name)
    assert err["error"] == "EBUSY", (path, err)
    assert word in err["message"], (path, err)


def device_names(daemon: Daemon) -> list[str]:
    return sorted(d["name"] for d in json.loads(daemon.cli("--json", "device", "list").stdout))


def test_the_same_data_under_two_names_is_refused(daemon, backing, tmp_path):
    """A file and a loop device over it, two loop devices over one file, a
    symlink, a loop device over blksnapd's own file: the CBT of one name
    would miss the writes made through the other."""
    f0 = backing("disk0", 64 * MiB)
    add_device(daemon, f0, "disk0", loop=False)
    shared = backing("shared", 64 * MiB)
    link = tmp_path / "alias"
    link.symlink_to(f0)
    loops: list[str] = []
    try:
        loops.append(_losetup(f0))  # a loop device over a served file
        loops.append(_losetup(os.path.join(daemon.mount, "dev", "disk0")))
        loops.append(_losetup(shared))
        loops.append(_losetup("-o", str(4 * MiB), "--sizelimit", str(8 * MiB), shared))
        loops.append(_losetup("-o", str(32 * MiB), shared))
        refused(daemon, loops[0], "x0", "disk0")
        refused(daemon, str(link), "x1", "disk0")
        refused(daemon, loops[1], "x2", "disk0")
        # Windows of one file: 4..12 MiB and 32..64 MiB do not overlap.
        add_device(daemon, loops[3], "w1", loop=False)
        add_device(daemon, loops[4], "w2", loop=False)
        refused(daemon, loops[2], "x3", "w1")  # all of it
        refused(daemon, shared, "x4", "w1")
        assert device_names(daemon) == ["disk0", "w1", "w2"]
        for name in ("w1", "w2"):
            daemon.cli("device", "remove", name)
    finally:
        for lp in reversed(loops):
            run("losetup", "-d", lp, check=False)


def test_a_disk_and_its_partition_are_the_same_data(daemon, backing):
    parted = backing("parted", 64 * MiB)
    write_mbr(parted, start=1 * MiB, length=32 * MiB)
    loop = _losetup("-P", parted)
    try:
        part = loop + "p1"
        for _ in range(20):
            if os.path.exists(part):
                break
            time.sleep(0.05)
        else:
            pytest.skip("this kernel shows no partitions of loop devices (partscan)")
        add_device(daemon, part, "p1", loop=False)
        refused(daemon, loop, "x5", "p1")
        daemon.cli("device", "remove", "p1")
    finally:
        run("losetup", "-d", loop, check=False)
