"""blksnapd's FUSE files on its own session: the key scenarios. ext4 on a loop device over a
device, a take with it mounted, the image mounted and its files checked; fio
with crc32c verification at QD32 on a device in a taken snapshot; fstrim on
the protected file system (FALLOCATE reaches the engine on this session:
the image stays as it was and the CBT marks the trimmed blocks)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import pytest

from blksnap import shortway
from tests.integration.conftest import SKIP, Daemon, loops_under, mounts_under, run, start_daemon
from tests.integration.helpers import (
    MiB,
    add_device,
    collect,
    create,
    populate,
    storage_dir,
    take_full,
    tree,
    write_file,
)

IMAGE_RO_OPTS = ("ro", "noload")


@pytest.fixture
def own(tmp_path):
    if SKIP:
        pytest.skip(SKIP)
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()
        assert not mounts_under(str(tmp_path)), mounts_under(str(tmp_path))
        assert not loops_under(str(tmp_path)), loops_under(str(tmp_path))


def md5_of(path: str, chunk: int = 4 * MiB) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cbt_marked_after(daemon: Daemon, name: str, changes_number: int) -> set[int]:
    data = daemon.client.cbt_map(name)
    return {i for i, b in enumerate(data) if b > changes_number}


def test_status_and_tree(own: Daemon) -> None:
    st = own.client.status()
    assert st["fuse"] == "up" and st["healthy"], st
    assert sorted(os.listdir(own.mount)) == ["backups", "dev", "images"]


def test_ext4_take_mounted_image_files(own: Daemon, backing, tmp_path) -> None:
    rng = random.Random("own-ext4")
    lp = add_device(own, backing("a.img", 128 * MiB), "a")["loop"]
    assert os.listdir(os.path.join(own.mount, "dev")) == ["a"]
    run("mkfs.ext4", "-q", lp)
    orig = own.mount_fs(lp, tmp_path / "orig")
    before = populate(orig, rng, 12, "a")
    sid = create(own, ["a"], storage_dir(tmp_path), "128M")
    taken = take_full(own, sid)
    assert taken["frozen"] == [orig]
    assert os.listdir(os.path.join(own.mount, "images", sid)) == ["a"]
    # The device goes on changing: the image does not.
    write_file(os.path.join(orig, "after.bin"), rng.randbytes(3 * MiB))
    for name, kind in list(before.items())[:3]:
        if kind != "dir":
            write_file(os.path.join(orig, name), rng.randbytes(50_000))
    run("sync", "-f", orig)
    where = own.mount_fs(taken["images"]["a"]["loop"], tmp_path / "img", *IMAGE_RO_OPTS)
    assert tree(where) == before
    own.umount(where)
    snap = collect(own, sid)[0]
    assert snap["state"] == "taken" and snap["error"] is None, snap
    own.umount(orig)
    assert run("fsck.ext4", "-fn", lp, check=False).returncode == 0
    own.cli("snapshot", "destroy", "-i", sid)
    assert os.listdir(os.path.join(own.mount, "images")) == []
    assert own.client.status()["healthy"]


@pytest.fixture(params=["compiled", "python"])
def either_way(request, tmp_path):
    """blksnapd with its compiled short way, and with it turned off
    (``BLKSNAP_SHORT_WAY=0``: every request served in Python)."""
    if SKIP:
        pytest.skip(SKIP)
    compiled = request.param == "compiled"
    if compiled and shortway.LIB is None:
        pytest.skip(f"no compiled short way: {shortway.WHY_NOT}")
    d = start_daemon(tmp_path, env=None if compiled else {"BLKSNAP_SHORT_WAY": "0"})
    try:
        log = d.log.read_text()
        assert ("the compiled short way" in log) == compiled, log
        assert ("Python only (BLKSNAP_SHORT_WAY=0" in log) == (not compiled), log
        yield d
    finally:
        d.stop()
        assert not mounts_under(str(tmp_path)), mounts_under(str(tmp_path))
        assert not loops_under(str(tmp_path)), loops_under(str(tmp_path))


@pytest.mark.skipif(not shutil.which("fio"), reason="fio is not installed")
def test_fio_verify_qd32_with_snapshot_taken(either_way: Daemon, backing, tmp_path) -> None:
    own = either_way
    size = 128 * MiB
    path = backing("f.img", size)
    with open(path, "r+b") as f:  # something for the image to keep
        f.write(random.Random("own-fio").randbytes(size))
    lp = add_device(own, path, "f")["loop"]
    sid = create(own, ["f"], storage_dir(tmp_path), "256M")
    img = take_full(own, sid)["images"]["f"]
    image_md5 = md5_of(img["path"])
    out = run(
        "fio", "--name=own", f"--filename={lp}", "--direct=1", "--ioengine=libaio",
        "--iodepth=32", "--rw=randwrite", "--bs=4k", "--size=64M", "--verify=crc32c",
        "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=0",
        "--output-format=json", cwd=tmp_path,
    )  # fmt: skip
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == 64 * MiB
    assert md5_of(img["path"]) == image_md5
    snap = collect(own, sid)[0]
    assert snap["state"] == "taken" and snap["error"] is None, snap
    assert own.client.status()["healthy"]


@pytest.mark.skipif(not shutil.which("fstrim"), reason="fstrim is not installed")
def test_fstrim_reaches_the_engine(own: Daemon, backing, tmp_path) -> None:
    rng = random.Random("own-trim")
    lp = add_device(own, backing("t.img", 128 * MiB), "t")["loop"]
    run("mkfs.ext4", "-q", "-E", "nodiscard", lp)
    orig = own.mount_fs(lp, tmp_path / "orig")
    names = []
    for i in range(8):
        name = f"big{i}.bin"
        write_file(os.path.join(orig, name), rng.randbytes(4 * MiB))
        names.append(name)
    run("sync", "-f", orig)
    sid = create(own, ["t"], storage_dir(tmp_path), "128M")
    img = take_full(own, sid)["images"]["t"]
    image_md5 = md5_of(img["path"])
    cn = own.client.cbt_info("t").changes_number
    for name in names:
        os.unlink(os.path.join(orig, name))
    run("sync", "-f", orig)
    out = run("fstrim", "-v", orig)
    trimmed = int(out.stdout.split("(")[1].split()[0])
    assert trimmed >= 32 * MiB, out.stdout
    # The image still holds the files, as at the take.
    assert md5_of(img["path"]) == image_md5
    where = own.mount_fs(img["loop"], tmp_path / "img", *IMAGE_RO_OPTS)
    assert sorted(n for n in os.listdir(where) if n != "lost+found") == names
    own.umount(where)
    snap = collect(own, sid)[0]
    assert snap["state"] == "taken" and snap["error"] is None, snap
    own.cli("snapshot", "destroy", "-i", sid)
    # The next take's CBT marks the trimmed blocks (the unlinks alone write
    # a few metadata blocks and the journal, not 32 MiB).
    sid2 = create(own, ["t"], storage_dir(tmp_path, "diff2"), "128M")
    take_full(own, sid2)
    marked = cbt_marked_after(own, "t", cn)
    block = own.client.cbt_info("t").block_size
    assert len(marked) * block >= 24 * MiB, (len(marked), block)
    own.cli("snapshot", "destroy", "-i", sid2)


def fuse_record(daemon: Daemon) -> dict:
    with open(os.path.join(daemon.state, "fuse-nodes.json")) as f:
        return json.load(f)


def test_node_ids_and_handles_recorded_names_never_stale(own: Daemon, backing, tmp_path) -> None:
    """The state dir records the id of every name and the open handles (what
    a process taking over the connection needs); names are cached by the
    kernel for SETTINGS.fuse_cache_seconds (60 s) yet a device removed is
    gone at once and a device added again under its name is the new one."""
    path = os.path.join(own.mount, "dev", "a")
    lp = add_device(own, backing("a.img", 16 * MiB), "a")["loop"]
    ino = os.stat(path).st_ino
    rec = fuse_record(own)
    assert rec["nodes"]["dev/a"] == ino
    # The loop device holds the file open: one handle on it, recorded.
    assert list(rec["handles"].values()) == ["dev/a"], rec
    sid = create(own, ["a"], storage_dir(tmp_path), "64M")
    take_full(own, sid)
    img = os.path.join(own.mount, "images", sid, "a")
    img_ino = os.stat(img).st_ino
    rec = fuse_record(own)
    assert rec["nodes"][f"images/{sid}/a"] == img_ino and rec["nodes"][f"images/{sid}"]
    own.cli("snapshot", "destroy", "-i", sid)
    assert not os.path.exists(img)
    assert not os.path.exists(os.path.dirname(img))
    assert f"images/{sid}" not in fuse_record(own)["nodes"]
    own.cli("device", "remove", "a")
    assert lp not in loops_under(own.mount)  # its loop device detached
    assert not os.path.exists(path)  # gone at once, cache or not
    rec = fuse_record(own)
    assert "dev/a" not in rec["nodes"] and rec["handles"] == {}, rec
    add_device(own, backing("b.img", 32 * MiB), "a", loop=False)
    again = os.stat(path)
    assert again.st_size == 32 * MiB and again.st_ino != ino
    assert fuse_record(own)["nodes"]["dev/a"] == again.st_ino
