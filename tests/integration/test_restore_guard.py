"""``blksnap restore --to`` never loses data (issue 9, point 1), through the CLI
on real parts: a target in use (the backing file blksnapd serves under a
mounted ext4, its loop device, its FUSE file, a loop device over it) is
refused with EBUSY naming the user and left byte for byte as it was; an
existing file or block device is overwritten only with --force; a restore that
fails midway leaves no file at the target name and no temporary behind, and a
block device without a file-system signature (its first 64 KiB zero)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from blksnap.backup.repo import Repository
from blksnap.control import loop as hostloop
from blksnap.hostinfo import proc_stat
from tests.integration.conftest import Daemon, run
from tests.integration.helpers import (
    MiB,
    add_device,
    fsck_ext4,
    md5_file,
    populate,
    sha256_file,
    tree,
)

HEAD = 64 * 1024


def restore(daemon: Daemon, repo: Path, to: str | Path, *extra: str):
    return daemon.cli(
        "--json", "restore", "--repo", str(repo), "-b", "latest", "-d", "d0",
        "--to", str(to), "--no-progress", *extra, check=False,
    )  # fmt: skip


def error_of(out) -> dict:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    return json.loads(out.stderr.strip().splitlines()[-1])


def leftovers(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".blksnap-restore-" in n]


def random_backup(daemon: Daemon, tmp_path: Path, size: int, seed: int) -> tuple[Path, str]:
    """A served device of random data (a zero tail), backed up in full by the
    CLI into ``<tmp>/repo``: (repo, sha256 of the device)."""
    path = tmp_path / "d0.img"
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(size - 4 * MiB))
        f.truncate(size)
    add_device(daemon, str(path), "d0", loop=False)
    daemon.cli("attach", "-d", "d0")
    repo = tmp_path / "repo"
    daemon.cli("backup", "-d", "d0", "--repo", str(repo), "--no-progress")
    return repo, sha256_file(path)


def damage_tail(repo: Path) -> None:
    """Flip a byte near the end of the last stored chunk of the (only)
    backup: the restore fails on that chunk after writing the windows before it."""
    (index,) = (repo / "backups").glob("*/dev-0.index")
    raw = index.read_bytes()
    names = [raw[i : i + 32].hex() for i in range(0, len(raw), 32)]
    stored = [repo / "chunks" / n[:2] / n for n in names if (repo / "chunks" / n[:2] / n).exists()]
    data = stored[-1]
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 1000)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 is not installed")
def test_restore_refuses_what_a_mounted_served_device_uses(daemon: Daemon, tmp_path: Path) -> None:
    backing = tmp_path / "backing" / "d0.img"
    backing.parent.mkdir()
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    dev = add_device(daemon, str(backing), "d0")
    lp, fuse_file = dev["loop"], dev["path"]
    daemon.cli("attach", "-d", "d0")
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", lp)
    mnt = daemon.mount_fs(lp, tmp_path / "fs")
    files = populate(mnt, random.Random(1), 10, "f")
    run("sync", "-f", str(mnt))
    repo = tmp_path / "repo"
    daemon.cli("backup", "-d", "d0", "--repo", str(repo), "--no-progress")
    # Changes after the backup: a restore over the device would lose them.
    files.update(populate(mnt, random.Random(2), 4, "after"))
    run("sync", "-f", str(mnt))
    link = tmp_path / "link-to-backing"
    link.symlink_to(backing)
    # A second loop device, read-only, straight over the backing file.
    other = run("losetup", "--find", "--show", "--read-only", str(backing)).stdout.strip()
    try:
        # Frozen: the file system writes nothing while the backing file is compared.
        fd = hostloop.freeze(mnt)
        try:
            size, before = os.path.getsize(backing), sha256_file(backing)
            for to, named in [
                # blksnapd holds the backing file open; a loop device is attached to it.
                (backing, ["open by process", "loop device"]),
                (link, ["open by process", str(backing)]),
                (lp, [f"mounted on {mnt} (ext4)"]),
                (fuse_file, ["served by blksnapd", lp, f"mounted on {mnt}"]),
                (other, ["its backing file", "open by process"]),
            ]:
                for extra in ([], ["--force"]):  # --force never overrides EBUSY
                    err = error_of(restore(daemon, repo, to, *extra))
                    assert err["error"] == "EBUSY", (to, err)
                    for word in named:
                        assert word in err["message"], (to, word, err)
                    assert os.path.getsize(backing) == size
                    assert sha256_file(backing) == before, to
            assert leftovers(backing.parent) == [] and leftovers(tmp_path) == []
            # The process named is blksnapd (its worker holds the backing file).
            msg = error_of(restore(daemon, repo, backing))["message"]
            pid = int(msg.split("open by process ")[1].split()[0])
            assert pid in (daemon.proc.pid, *_children(daemon.proc.pid)), msg
        finally:
            hostloop.thaw(fd, mnt)
    finally:
        run("losetup", "-d", other)
    # The mounted file system is still fine: every file, then a clean fsck.
    assert tree(mnt) == files
    for rel, digest in files.items():
        if digest != "dir":
            assert md5_file(os.path.join(mnt, rel)) == digest
    daemon.umount(mnt)
    r = fsck_ext4(lp)
    assert r.returncode == 0, (r.stdout, r.stderr)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def test_existing_file_is_replaced_only_with_force(daemon: Daemon, tmp_path: Path) -> None:
    repo, want = random_backup(daemon, tmp_path, 12 * MiB, seed=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "precious.img"
    target.write_bytes(b"precious data " * 10_000)
    before = sha256_file(target)
    err = error_of(restore(daemon, repo, target))
    assert err["error"] == "EEXIST" and "--force" in err["message"], err
    assert sha256_file(target) == before
    # Through a symlink: the same file, the same answer.
    link = out_dir / "link.img"
    link.symlink_to(target)
    assert error_of(restore(daemon, repo, link))["error"] == "EEXIST"
    assert sha256_file(target) == before and link.is_symlink()
    # With --force: replaced by the backup.
    r = restore(daemon, repo, target, "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == sha256_file(target) == want
    assert os.path.getsize(target) == 12 * MiB
    # An empty file holds nothing to lose: no --force needed.
    empty = out_dir / "empty.img"
    empty.touch()
    r = restore(daemon, repo, empty)
    assert r.returncode == 0, r.stderr
    assert sha256_file(empty) == want
    assert leftovers(out_dir) == []


def test_failed_restore_leaves_no_file_and_no_temporary(daemon: Daemon, tmp_path: Path) -> None:
    repo, want = random_backup(daemon, tmp_path, 40 * MiB, seed=4)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # Out of space midway: a 4 MiB tmpfs for a 40 MiB device.
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tiny))
    try:
        err = error_of(restore(daemon, repo, tiny / "new.img"))
        assert err["error"] == "ENOSPC", err
        assert os.listdir(tiny) == []
        # Over an existing file (with --force): it stays as it was.
        (tiny / "old.img").write_bytes(b"old" * 1000)
        err = error_of(restore(daemon, repo, tiny / "old.img", "--force"))
        assert err["error"] == "ENOSPC", err
        assert os.listdir(tiny) == ["old.img"]
        assert (tiny / "old.img").read_bytes() == b"old" * 1000
    finally:
        run("umount", str(tiny))
    # A damaged block near the end: the checksum fails after 32 MiB were written.
    damage_tail(repo)
    err = error_of(restore(daemon, repo, out_dir / "new.img"))
    assert err["error"] == "EIO" and "digest mismatch" in err["message"], err
    assert os.listdir(out_dir) == []
    keep = out_dir / "keep.img"
    keep.write_bytes(b"keep" * 1000)
    assert error_of(restore(daemon, repo, keep, "--force"))["error"] == "EIO"
    assert os.listdir(out_dir) == ["keep.img"] and keep.read_bytes() == b"keep" * 1000
    # Ctrl-C midway (the first progress report): the same.
    repo_api = Repository.open(str(repo))

    def interrupt(_n: int) -> None:
        raise KeyboardInterrupt

    for name in ("new.img", "keep.img"):
        with pytest.raises(KeyboardInterrupt):
            repo_api.restore("latest", "d0", str(out_dir / name), progress=interrupt, force=True)
        assert os.listdir(out_dir) == ["keep.img"] and keep.read_bytes() == b"keep" * 1000
    assert want  # the device itself is fine; only the repository was damaged


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 is not installed")
def test_block_device_needs_force_and_a_failed_one_has_no_signature(
    daemon: Daemon, tmp_path: Path
) -> None:
    size = 40 * MiB
    repo, want = random_backup(daemon, tmp_path, size, seed=5)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size + 8 * MiB)  # larger than the device: the rest is left alone
    run("mkfs.ext4", "-q", str(disk))
    lp = run("losetup", "--find", "--show", str(disk)).stdout.strip()
    try:
        assert run("blkid", "-p", lp, check=False).returncode == 0  # an ext4 signature
        err = error_of(restore(daemon, repo, lp))
        assert err["error"] == "EEXIST" and "--force" in err["message"], err
        assert run("blkid", "-p", lp, check=False).returncode == 0  # untouched
        r = restore(daemon, repo, lp, "--force")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sha256"] == want
        assert sha256_file(lp, size) == want
        # Now a restore that fails midway: the head was zeroed first and is
        # written last, so the device is left with no valid signature.
        run("mkfs.ext4", "-q", "-F", lp)
        damage_tail(repo)
        err = error_of(restore(daemon, repo, lp, "--force"))
        assert err["error"] == "EIO", err
        with open(lp, "rb") as f:
            head = f.read(HEAD)
            f.seek(HEAD)
            body = f.read(MiB)
        assert head == bytes(HEAD)
        with open(tmp_path / "d0.img", "rb") as f:
            f.seek(HEAD)
            assert body == f.read(MiB)  # the windows before the damage were written
        assert run("blkid", "-p", lp, check=False).returncode != 0
    finally:
        run("losetup", "-d", lp)
