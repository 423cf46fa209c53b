"""blksnap.inuse: who uses a file or a block device, from the host alone (no daemon)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blksnap import inuse


def _root_with(*tools: str) -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in tools if shutil.which(t) is None]
    return f"needs {', '.join(missing)}" if missing else None


def _run(*args: str) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, check=False)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout.strip()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator:
    """Start a process (comm ``inuse-holder``) that holds a path open until the test ends."""
    procs: list[subprocess.Popen[bytes]] = []

    def hold(path: str | Path) -> subprocess.Popen[bytes]:
        code = (
            "import ctypes, os, sys\n"
            "ctypes.CDLL(None).prctl(15, b'inuse-holder', 0, 0, 0)\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
        )
        p = subprocess.Popen(
            [sys.executable, "-c", code, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        return p

    try:
        yield hold
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


@pytest.fixture
def loops() -> Iterator[list[str]]:
    """Loop devices a test attached: detached afterwards."""
    made: list[str] = []
    try:
        yield made
    finally:
        for lp in made:
            subprocess.run(["losetup", "-d", lp], check=False)


def test_unused_and_missing_paths_have_no_users(tmp_path: Path) -> None:
    f = tmp_path / "plain.img"
    f.write_bytes(b"x" * 4096)
    assert inuse.users_of(str(f)) == []
    assert inuse.users_of(str(tmp_path / "missing")) == []
    # Our own open file descriptors do not count: the caller is no other user.
    fd = os.open(f, os.O_RDONLY)
    try:
        assert inuse.users_of(str(f)) == []
    finally:
        os.close(fd)


def test_a_process_holding_the_file_is_named(tmp_path: Path, holder) -> None:
    f = tmp_path / "held.img"
    f.write_bytes(b"x" * 4096)
    p = holder(f)
    assert inuse.users_of(str(f)) == [f"open by process {p.pid} (inuse-holder)"]
    # Through a symlink, and through a second hard link (same inode), too.
    link = tmp_path / "link.img"
    link.symlink_to(f)
    hard = tmp_path / "hard.img"
    os.link(f, hard)
    assert inuse.users_of(str(link)) == [f"open by process {p.pid} (inuse-holder)"]
    assert inuse.users_of(str(hard)) == [f"open by process {p.pid} (inuse-holder)"]
    p.kill()
    p.wait(timeout=30)
    assert inuse.users_of(str(f)) == []


@pytest.mark.skipif(bool(_root_with("losetup")), reason=str(_root_with("losetup")))
def test_loop_device_attached_to_the_file(tmp_path: Path, loops: list[str], holder) -> None:
    f = tmp_path / "backing.img"
    with open(f, "wb") as fh:
        fh.truncate(4 << 20)
    lp = _run("losetup", "--find", "--show", str(f))
    loops.append(lp)
    # Found by name and by inode (a symlink to the backing file).
    link = tmp_path / "link.img"
    link.symlink_to(f)
    for p in (f, link):
        assert inuse.users_of(str(p)) == [f"loop device {lp} is attached to it"]
    # A loop device over an unused file is itself unused ...
    assert inuse.users_of(lp) == []
    # ... but not when its backing file is held by someone else.
    proc = holder(f)
    users = inuse.users_of(lp)
    assert users == [f"its backing file {f} is open by process {proc.pid} (inuse-holder)"]
    # A process holding the block device itself is named too.
    proc2 = holder(lp)
    assert f"open by process {proc2.pid} (inuse-holder)" in inuse.users_of(lp)


@pytest.mark.skipif(
    bool(_root_with("losetup", "mkfs.ext4")), reason=str(_root_with("losetup", "mkfs.ext4"))
)
def test_mounted_loop_device_and_its_backing_file(tmp_path: Path, loops: list[str]) -> None:
    f = tmp_path / "fs.img"
    with open(f, "wb") as fh:
        fh.truncate(16 << 20)
    _run("mkfs.ext4", "-q", "-F", str(f))
    lp = _run("losetup", "--find", "--show", str(f))
    loops.append(lp)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("mount", lp, str(mnt))
    try:
        assert inuse.users_of(lp) == [f"mounted on {mnt} (ext4)"]
        assert inuse.users_of(str(f)) == [
            f"loop device {lp} is attached to it (mounted on {mnt} (ext4))"
        ]
    finally:
        _run("umount", str(mnt))
    assert inuse.users_of(lp) == []


def test_fuse_files_of_blksnapd_are_served(tmp_path: Path, monkeypatch) -> None:
    """A file on a ``fuse.blksnap`` mount is named as a device or an image of
    blksnapd (mountinfo is faked: the real mount is in the integration tests)."""
    d = tmp_path / "mnt"
    (d / "dev").mkdir(parents=True)
    (d / "images" / "SID").mkdir(parents=True)
    dev = d / "dev" / "disk0"
    img = d / "images" / "SID" / "disk0"
    dev.write_bytes(b"x")
    img.write_bytes(b"x")
    st = os.stat(dev)
    fake = tmp_path / "mountinfo"
    fake.write_text(
        f"1 0 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / {d} rw - fuse.blksnap blksnap rw\n"
    )
    real_open = open

    def fake_open(path, *a, **kw):
        return real_open(fake if path == "/proc/self/mountinfo" else path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    assert inuse.users_of(str(dev)) == [f"device disk0 served by blksnapd (FUSE file under {d})"]
    assert inuse.users_of(str(img)) == ["image of device disk0 in snapshot SID served by blksnapd"]
