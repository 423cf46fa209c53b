"""Real file systems on two protected devices: a snapshot of both holds exactly
the files from before the take, its images are writable file systems of their
own, and the devices keep their own files (ext4, then xfs)."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.integration.conftest import run
from tests.integration.helpers import (
    MiB,
    add_device,
    collect,
    create,
    md5,
    populate,
    storage_dir,
    take_full,
    tree,
    write_file,
)

# xfsprogs >= 5.19 refuses file systems under 300 MiB; the files are sparse.
SIZES = {"ext4": (64 * MiB, 128 * MiB), "xfs": (320 * MiB, 384 * MiB)}
MKFS = {"ext4": ["mkfs.ext4", "-q"], "xfs": ["mkfs.xfs", "-q", "-f"]}
#: Mount options of images whose original is mounted at the same time.
IMAGE_OPTS = {"ext4": (), "xfs": ("nouuid",)}
#: Read-only, without journal/log replay.
IMAGE_RO_OPTS = {"ext4": ("ro", "noload"), "xfs": ("ro", "nouuid", "norecovery")}


def fsck(fs: str, dev: str):
    """A read-only check of an unmounted file system."""
    if fs == "ext4":
        return run("fsck.ext4", "-fn", dev, check=False)
    return run("xfs_repair", "-n", dev, check=False)


def change_after_take(root: str, before: dict[str, str], rng: random.Random) -> dict[str, str]:
    """New files, an overwritten middle, an append, deletions; the new tree."""
    after = dict(before)
    after.update(populate(root, rng, 8, "new"))
    files = sorted(k for k, v in before.items() if v != "dir" and not k.startswith("sub"))
    # Overwrite the middle of a file in place (COW of a few chunks).
    victim = next(f for f in files if os.path.getsize(os.path.join(root, f)) > 200_000)
    path = os.path.join(root, victim)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[70_000:150_000] = rng.randbytes(80_000)
        f.seek(0)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    after[victim] = md5(bytes(data))
    # Append to another.
    grown = files[-1]
    with open(os.path.join(root, grown), "ab") as f:
        f.write(b"appended after the take")
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(root, grown), "rb") as f:
        after[grown] = md5(f.read())
    # Delete two, and the whole subdirectory.
    for gone in files[1:3]:
        os.unlink(os.path.join(root, gone))
        del after[gone]
    shutil.rmtree(os.path.join(root, "sub"))
    after = {k: v for k, v in after.items() if k != "sub" and not k.startswith("sub/")}
    run("sync", "-f", str(root))
    return after


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_two_filesystems_snapshot_images_and_originals(daemon, backing, tmp_path, fs):
    if not shutil.which(MKFS[fs][0]):
        pytest.skip(f"{MKFS[fs][0]} is not installed")
    rng = random.Random(f"fs-{fs}")
    names = ["a", "b"]
    loops, orig, before = {}, {}, {}
    for name, size in zip(names, SIZES[fs], strict=True):
        loops[name] = add_device(daemon, backing(f"{name}.img", size), name)["loop"]
        run(*MKFS[fs], loops[name])
        orig[name] = daemon.mount_fs(loops[name], tmp_path / f"orig-{name}")
        before[name] = populate(orig[name], rng, 12 if name == "a" else 16, name)
        assert tree(orig[name]) == before[name]

    diff = storage_dir(tmp_path)
    sid = create(daemon, names, diff, "128M")
    taken = take_full(daemon, sid)
    images = taken["images"]
    assert sorted(images) == names
    # Both file systems were frozen for the instant.
    assert sorted(taken["frozen"]) == sorted(orig.values())
    snap = collect(daemon, sid)[0]
    assert snap["state"] == "taken" and snap["error"] is None
    assert {d["name"]: d["loop"] for d in snap["devices"]} == {n: images[n]["loop"] for n in names}
    # The storage directory holds only an anonymous file: nothing to see.
    assert os.listdir(diff) == []

    after = {n: change_after_take(orig[n], before[n], rng) for n in names}
    for name in names:
        assert after[name] != before[name]

    img_mounts, img_expect = {}, {}
    for name in names:
        where = tmp_path / f"img-{name}"
        # Frozen at the take: read-only without log replay, exactly the files
        # from before the take, whatever the device did since.
        daemon.mount_fs(images[name]["loop"], where, *IMAGE_RO_OPTS[fs])
        assert tree(where) == before[name], name
        daemon.umount(where)
        img_mounts[name] = daemon.mount_fs(images[name]["loop"], where, *IMAGE_OPTS[fs])
        assert tree(img_mounts[name]) == before[name], name
        # Images are writable: new files, a changed one, a deleted one.
        img_expect[name] = dict(before[name])
        for i in range(3):
            rel = f"image-only-{i}.bin"
            img_expect[name][rel] = write_file(
                os.path.join(img_mounts[name], rel), rng.randbytes(rng.randint(1, 900_000))
            )
        first = sorted(k for k, v in before[name].items() if v != "dir")[0]
        img_expect[name][first] = write_file(os.path.join(img_mounts[name], first), b"x" * 9000)
        last = sorted(k for k, v in before[name].items() if v != "dir")[-1]
        os.unlink(os.path.join(img_mounts[name], last))
        del img_expect[name][last]
    for name in names:
        daemon.umount(img_mounts[name])
    for name in names:
        daemon.mount_fs(images[name]["loop"], img_mounts[name], *IMAGE_OPTS[fs])
        assert tree(img_mounts[name]) == img_expect[name], name
    # Image writes never reached the devices.
    for name in names:
        assert tree(orig[name]) == after[name], name
    for name in names:
        daemon.umount(img_mounts[name])
        r = fsck(fs, images[name]["loop"])
        assert r.returncode == 0, (name, r.stdout, r.stderr)

    daemon.cli("snapshot", "destroy", "-i", sid)
    assert collect(daemon) == []
    assert not os.path.exists(os.path.join(daemon.mount, "images", sid))

    for name in names:
        daemon.umount(orig[name])
        r = fsck(fs, loops[name])
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        daemon.mount_fs(loops[name], orig[name])
        assert tree(orig[name]) == after[name], name
        daemon.umount(orig[name])
