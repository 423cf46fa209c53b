"""`snapshot destroy` while the device's file system, the image's file system
and raw readers of the image are all busy: the daemon stays up, whatever used
the image fails or stops without hanging, and the device is unharmed."""

from __future__ import annotations

import os
import time

from tests.integration.conftest import loops_under, run
from tests.integration.helpers import (
    Background,
    KiB,
    Writer,
    add_device,
    create,
    fsck_ext4,
    md5_file,
    storage_dir,
    take,
)


def dd_reader(loop: str) -> Background:
    """Reads the whole image loop device with O_DIRECT, again and again,
    until dd fails (exit 3)."""
    script = (
        f"while :; do dd if={loop} of=/dev/null bs=1M iflag=direct status=none || exit 3; "
        "echo pass; done"
    )
    return Background(["bash", "-c", script])


def test_destroy_under_load(daemon, backing, tmp_path):
    dev = add_device(daemon, backing("l.img", 64 * 1024 * KiB), "l")
    run("mkfs.ext4", "-q", dev["loop"])
    m1 = daemon.mount_fs(dev["loop"], tmp_path / "m1")
    sid = create(daemon, ["l"], storage_dir(tmp_path), "256M")
    img = take(daemon, sid)["l"]
    m2 = daemon.mount_fs(img["loop"], tmp_path / "m2")

    procs: list[Background] = []
    try:
        dev_writer = Writer(m1, tmp_path / "stop-dev", keep=40, maxsize=256 * KiB)
        img_writer = Writer(m2, tmp_path / "stop-img", keep=40, maxsize=256 * KiB)
        readers = [dd_reader(img["loop"]) for _ in range(2)]
        procs = [dev_writer, img_writer, *readers]
        # Everything is busy and working before the destroy.
        for p in procs:
            assert p.wait_for(lambda lines: len(lines) >= 3, 30), p.describe()
        assert not dev_writer.errors() and not img_writer.errors()

        # An image in use is not destroyed unless forced (issue 9 point 6).
        refused = daemon.cli("snapshot", "destroy", "-i", sid, check=False)
        assert refused.returncode == 1 and "EBUSY" in refused.stderr, refused.stderr
        t0 = time.monotonic()
        daemon.cli("snapshot", "destroy", "-i", sid, "--force")
        destroy_seconds = time.monotonic() - t0
        assert destroy_seconds < 30
        assert daemon.client.status()["snapshots"] == 0
        assert not os.path.exists(img["path"])

        # The image's users fail (or are told to stop) and none hangs.
        for r in readers:
            assert r.wait(30) == 3, r.describe()
        if img_writer.wait(15) is None:
            img_writer.stop(30)
        assert img_writer.proc.poll() is not None, img_writer.describe()
        # Reading the image now fails at once.
        r = run(
            "dd",
            f"if={img['loop']}",
            "of=/dev/null",
            "bs=1M",
            "count=1",
            "iflag=direct",
            check=False,
            timeout=30,
        )
        assert r.returncode != 0

        # The device's writer went on through it all.
        n = dev_writer.count()
        assert dev_writer.wait_for(lambda lines: len(lines) > 2 * n + 10, 30), dev_writer.describe()
        assert dev_writer.proc.poll() is None and not dev_writer.errors(), dev_writer.describe()
        assert dev_writer.stop(30) == 0, dev_writer.describe()
        dev_writer.finish()
        files = dev_writer.files()
        assert len(files) > 10

        daemon.umount(m2)
        deadline = time.monotonic() + 10
        while loops_under(os.path.join(daemon.mount, "images")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not loops_under(os.path.join(daemon.mount, "images"))
        assert daemon.client.status()["pid"] == daemon.proc.pid
        assert daemon.proc.poll() is None

        daemon.umount(m1)
        r = fsck_ext4(dev["loop"])
        assert r.returncode == 0, r.stdout + r.stderr
        daemon.mount_fs(dev["loop"], m1)
        for name, digest in files.items():
            assert md5_file(os.path.join(m1, name)) == digest, name
        daemon.umount(m1)
    finally:
        for p in procs:
            p.reap()
