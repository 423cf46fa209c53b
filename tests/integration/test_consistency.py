"""Takes of a busy ext4 are consistent: the file system is frozen for the
instant, so its image mounts read-only without journal replay, checks clean,
and holds every file that was fsync'd before the take."""

from __future__ import annotations

import os

from tests.integration.conftest import run
from tests.integration.helpers import (
    KiB,
    MiB,
    Writer,
    add_device,
    create,
    fsck_ext4,
    md5_file,
    storage_dir,
    take,
)

ROUNDS = 3


def features(dev: str) -> list[str]:
    out = run("dumpe2fs", "-h", dev).stdout
    line = next(x for x in out.splitlines() if x.startswith("Filesystem features:"))
    return line.split(":", 1)[1].split()


def test_takes_of_busy_ext4_are_clean(daemon, backing, tmp_path):
    dev = add_device(daemon, backing("c.img", 64 * MiB), "c")
    run("mkfs.ext4", "-q", dev["loop"])
    m1 = daemon.mount_fs(dev["loop"], tmp_path / "m1")
    diff = storage_dir(tmp_path)
    # Old files are deleted so a slow run cannot fill the file system (ENOSPC).
    writer = Writer(m1, tmp_path / "stop", keep=300, maxsize=48 * KiB, pause=0.002)
    try:
        seen = 0
        for rnd in range(ROUNDS):
            # The writer is busy: a few more files since the last round.
            assert writer.wait_for(lambda lines, n=seen: len(lines) >= n + 20, 30), (
                writer.describe()
            )
            sid = create(daemon, ["c"], diff, "64M")
            synced = writer.files()  # all fsync'd before the take began
            img = take(daemon, sid)["c"]
            assert writer.proc.poll() is None, writer.describe()
            # Frozen at the instant: the image's journal needs no recovery,
            # unlike the live file system's (the control).
            assert "needs_recovery" not in features(img["loop"]), rnd
            assert "needs_recovery" in features(dev["loop"])

            where = daemon.mount_fs(img["loop"], tmp_path / f"img{rnd}", "ro", "noload")
            # Files the writer deleted (keep: the oldest go): one missing from
            # the image must be one of them (its unlink came before the take,
            # so its "del" line is out by now); every other one is whole.
            deleted = {line.split()[1] for line in writer.snapshot() if line.startswith("del ")}
            for name, digest in synced.items():
                path = os.path.join(where, name)
                if name in deleted and not os.path.exists(path):
                    continue
                assert md5_file(path) == digest, (rnd, name)
            # The append-only log: whole lines, each naming a file that is there
            # with that size (or was deleted), and at least every file reported
            # before the take.
            with open(os.path.join(where, "log")) as f:
                text = f.read()
            assert text.endswith("\n")
            logged = dict(line.split() for line in text.splitlines())
            assert set(synced) <= set(logged), rnd
            for name, size in logged.items():
                path = os.path.join(where, name)
                if name in deleted and not os.path.exists(path):
                    continue
                assert os.path.getsize(path) == int(size), (rnd, name)
            daemon.umount(where)

            r = fsck_ext4(img["loop"])
            assert r.returncode == 0, (rnd, r.stdout, r.stderr)
            daemon.cli("snapshot", "destroy", "-i", sid)
            seen = len(writer.snapshot())
        assert writer.stop(30) == 0, writer.describe()
        assert not writer.errors()
    finally:
        writer.reap()
    daemon.umount(m1)
    r = fsck_ext4(dev["loop"])
    assert r.returncode == 0, r.stdout + r.stderr
