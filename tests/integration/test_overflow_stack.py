"""Diff storage overflow through the whole stack: the snapshot turns corrupted
(event, state, ENOSPC, image reads fail with EIO), the device and its file
system carry on with nothing lost."""

from __future__ import annotations

import errno
import json
import os
import random

import pytest

from tests.integration.conftest import run
from tests.integration.helpers import (
    MiB,
    add_device,
    collect,
    create,
    direct_read,
    direct_write,
    fsck_ext4,
    md5_file,
    populate,
    storage_dir,
    take,
    tree,
)


def test_overflow_corrupts_snapshot_not_device(daemon, backing, tmp_path):
    dev = add_device(daemon, backing("o.img", 64 * MiB), "o")
    # Inode tables and journal written now, not by ext4lazyinit after mount:
    # those background writes alone could overflow 2 MiB before the first read.
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev["loop"])
    m1 = daemon.mount_fs(dev["loop"], tmp_path / "m1")
    expect = populate(m1, random.Random("overflow"), 10, "f")
    sid = create(daemon, ["o"], storage_dir(tmp_path), "2M")
    img = take(daemon, sid)["o"]
    assert len(direct_read(img["loop"], 0, MiB)) == MiB  # readable while healthy

    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(32 * MiB))
    run("dd", f"if={src}", f"of={m1}/big", "bs=1M", "conv=fsync", "status=none")
    run("sync", "-f", str(m1))
    expect["big"] = md5_file(src)

    events = []
    for _ in range(6):
        out = daemon.cli("--json", "snapshot", "waitevent", "-i", sid, "-t", "5000").stdout
        ev = json.loads(out)
        events.append(ev["event"])
        if ev["event"] in ("corrupted", "timeout"):
            break
    assert events[-1] == "corrupted", events
    assert set(events[:-1]) <= {"low_free_space", "no_space"}, events
    assert ev["data"]["error"] == "ENOSPC" and ev["data"]["errno"] == errno.ENOSPC, ev

    snap = collect(daemon, sid)[0]
    assert snap["state"] == "corrupted" and snap["error"] == "ENOSPC", snap
    info = json.loads(daemon.cli("--json", "snapshot", "info", "-d", "o").stdout)
    assert info["id"] == sid and info["state"] == "corrupted" and info["error"] == "ENOSPC"
    assert info["image"] == img["path"] and info["loop"] == img["loop"]

    # Image reads fail with EIO: through its loop device and its FUSE file.
    with pytest.raises(OSError) as exc:
        direct_read(img["loop"], 0, MiB)
    assert exc.value.errno == errno.EIO
    with pytest.raises(OSError) as exc, open(img["path"], "rb") as f:
        f.read(4096)
    assert exc.value.errno == errno.EIO
    # And so do image writes.
    with pytest.raises(OSError) as exc:
        direct_write(img["loop"], 0, b"w" * 4096)
    assert exc.value.errno == errno.EIO

    # The original file system is healthy, with everything in it.
    assert tree(m1) == expect
    daemon.umount(m1)
    r = fsck_ext4(dev["loop"])
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.mount_fs(dev["loop"], m1)
    assert tree(m1) == expect
    with open(os.path.join(m1, "after"), "wb") as f:  # and it still takes writes
        f.write(b"still here")
    daemon.umount(m1)

    daemon.cli("snapshot", "destroy", "-i", sid)
    assert collect(daemon) == []
    r = fsck_ext4(dev["loop"])
    assert r.returncode == 0, r.stdout + r.stderr
