"""blksnapd guards what it serves (issue 9, points 4, 5, 6 and 8), through the
CLI with real loop devices, ext4 and mounts:

- a backing store that fills (ENOSPC) is logged (rate-limited), counted and
  shown by ``daemon status``, and the device keeps serving reads;
- ``daemon stop`` and SIGTERM refuse while a file system is mounted on one of
  its loop devices or its files are open (``--force`` goes anyway);
- ``snapshot destroy`` refuses while an image is mounted or open;
- an aborted FUSE connection makes ``daemon status`` say not healthy, and
  ``daemon stop`` clears the dead mount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, mounts_under, run
from tests.integration.helpers import (
    MiB,
    add_device,
    create,
    direct_read,
    opened,
    storage_dir,
    take,
)
from tests.integration.nbd_client import RawNbd


def _mkfs(dev: str) -> None:
    run("mkfs.ext4", "-q", "-F", dev)


def _status(daemon: Daemon) -> dict:
    return json.loads(daemon.cli("--json", "daemon", "status").stdout)


def _refused(daemon: Daemon, *args: str) -> str:
    """Run a CLI command that must fail with EBUSY; its message."""
    out = daemon.cli("--json", *args, check=False)
    assert out.returncode == 1, (out.stdout, out.stderr)
    err = json.loads(out.stderr)
    assert err["error"] == "EBUSY", err
    return err["message"]


def _alive(daemon: Daemon) -> bool:
    return daemon.proc.poll() is None


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    where.mkdir(exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    try:
        yield where
    finally:
        run("umount", "-l", str(where), check=False)


def _direct_pwrite(fd: int, offset: int, data: bytes) -> None:
    import mmap

    buf = mmap.mmap(-1, len(data))
    try:
        buf[:] = data
        with memoryview(buf) as view:
            assert os.pwrite(fd, view, offset) == len(data)
    finally:
        buf.close()


# -- point 4: a backing store that fills -----------------------------------------------


def test_backing_store_full_is_reported_and_reads_go_on(daemon: Daemon, tmp_path: Path) -> None:
    """A 32 MiB sparse backing file on a 4 MiB tmpfs: O_DIRECT writes through
    <mount>/dev/N fail with ENOSPC once the tmpfs is full; ``daemon status``
    names the device, errno ENOSPC, and says not healthy; the log has the
    error, once (not one line per failed request); reads still work."""
    with _tmpfs(tmp_path / "small", "4m") as small:
        path = small / "sparse.img"
        with open(path, "wb") as f:
            f.truncate(32 * MiB)
        assert _status(daemon)["healthy"] is True
        dev = add_device(daemon, str(path), "full", loop=False)["path"]
        try:
            first = os.urandom(MiB)
            failures = 0
            with opened(dev, os.O_RDWR | os.O_DIRECT) as fd:
                _direct_pwrite(fd, 0, first)
                for i in range(1, 32):  # fills the 4 MiB tmpfs
                    try:
                        _direct_pwrite(fd, i * MiB, os.urandom(MiB))
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        failures += 1
                for i in range(200):  # many more failures: still one log line
                    with pytest.raises(OSError) as exc_info:
                        _direct_pwrite(fd, 16 * MiB + i * 4096, b"z" * 4096)
                    assert exc_info.value.errno == errno.ENOSPC
                    failures += 1
            assert failures > 200
            st = _status(daemon)
            assert st["healthy"] is False, st
            err = st["device_errors"]["full"]
            assert err["last"]["errno"] == errno.ENOSPC and err["last"]["error"] == "ENOSPC"
            assert err["last"]["op"] == "write"
            assert err["errors"] == failures
            assert any("full" in p and "ENOSPC" in p for p in st["problems"]), st["problems"]
            text = daemon.cli("daemon", "status").stdout
            assert "NOT HEALTHY" in text and "ENOSPC" in text, text
            lines = [
                line
                for line in daemon.log_text().splitlines()
                if "device full:" in line and "ENOSPC" in line
            ]
            assert 1 <= len(lines) <= 2, lines
            # The device keeps serving reads (and what was written stays).
            assert direct_read(dev, 0, MiB) == first
            assert _alive(daemon)
        finally:
            daemon.cli("device", "remove", "full", check=False)


# -- point 5: daemon stop / SIGTERM while in use ----------------------------------------


def test_stop_refused_while_mounted_then_force(daemon: Daemon, backing, tmp_path: Path) -> None:
    lp = add_device(daemon, backing("s.img", 64 * MiB), "s")["loop"]
    _mkfs(lp)
    where = daemon.mount_fs(lp, tmp_path / "fs")
    (Path(where) / "file").write_bytes(b"kept")
    # Also a process holding the FUSE file open, beyond blksnapd's own loop.
    fuse_file = os.path.join(daemon.mount, "dev", "s")
    with opened(fuse_file, os.O_RDONLY):
        msg = _refused(daemon, "daemon", "stop")
        assert where in msg and lp in msg, msg
        assert f"pid {os.getpid()}" in msg, msg
    msg = _refused(daemon, "daemon", "stop")
    assert where in msg and f"pid {os.getpid()}" not in msg, msg
    time.sleep(0.5)
    assert _alive(daemon)
    assert _status(daemon)["devices"] == 1
    assert (Path(where) / "file").read_bytes() == b"kept"  # still served
    # --force goes anyway; the fixture clears the mount left over a dead loop.
    out = json.loads(daemon.cli("--json", "daemon", "stop", "--force").stdout)
    assert out["stopped"] is True
    assert daemon.proc.wait(timeout=30) == 0
    # the mounted file system keeps the FUSE connection: no use waiting for
    # its reader threads, said as such (not an error)
    log = daemon.log_text()
    assert "is still in use" in log and "ERROR unmount" not in log, log[-2000:]


def test_sigterm_while_mounted_keeps_serving(daemon: Daemon, backing, tmp_path: Path) -> None:
    lp = add_device(daemon, backing("t.img", 64 * MiB), "t")["loop"]
    _mkfs(lp)
    where = daemon.mount_fs(lp, tmp_path / "fs")
    for _ in range(2):  # a second signal does not force
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert _alive(daemon)
    daemon.proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert _alive(daemon)
    assert _status(daemon)["devices"] == 1
    data = os.urandom(300_000)
    (Path(where) / "after").write_bytes(data)
    run("sync", "-f", str(where))
    log = daemon.log_text()
    assert "signal SIGTERM: NOT stopping" in log and where in log, log[-2000:]
    assert "signal SIGINT: NOT stopping" in log
    daemon.umount(where)
    run("fsck.ext4", "-fn", lp)  # clean: nothing was pulled from under it
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=60) == 0
    assert not mounts_under(daemon.mount)


# -- point 6: snapshot destroy while an image is in use ----------------------------------


def test_destroy_refused_while_image_in_use(daemon: Daemon, backing, tmp_path: Path) -> None:
    lp = add_device(daemon, backing("d.img", 64 * MiB), "d")["loop"]
    _mkfs(lp)
    sid = create(daemon, ["d"], storage_dir(tmp_path), "64M")
    img = take(daemon, sid)["d"]
    # 1. The image's loop device mounted.
    where = daemon.mount_fs(img["loop"], tmp_path / "snap", "ro", "noload")
    msg = _refused(daemon, "snapshot", "destroy", "-i", sid)
    assert where in msg and img["loop"] in msg, msg
    daemon.umount(where)
    # 2. A process holding the image file open.
    with opened(img["path"], os.O_RDONLY):
        msg = _refused(daemon, "snapshot", "destroy", "-i", sid)
        assert img["path"] in msg and f"pid {os.getpid()}" in msg, msg
    # 3. Another loop device over the image file.
    other = run("losetup", "--find", "--show", "--read-only", img["path"]).stdout.strip()
    try:
        msg = _refused(daemon, "snapshot", "destroy", "-i", sid)
        assert other in msg, msg
    finally:
        run("losetup", "-d", other)
    # Nothing left: destroy goes.
    assert daemon.cli("--json", "snapshot", "destroy", "-i", sid).returncode == 0
    # --force with the image mounted.
    sid = create(daemon, ["d"], storage_dir(tmp_path), "64M")
    img = take(daemon, sid)["d"]
    daemon.mount_fs(img["loop"], tmp_path / "snap2", "ro", "noload")
    _refused(daemon, "snapshot", "destroy", "-i", sid)
    daemon.cli("snapshot", "destroy", "-i", sid, "--force")
    assert json.loads(daemon.cli("--json", "snapshot", "collect").stdout) == []


def test_destroy_refused_with_nbd_client_on_image(nbd_daemon: Daemon, backing, tmp_path) -> None:
    d = nbd_daemon
    add_device(d, backing("n.img", 16 * MiB), "n", loop=False)
    sid = create(d, ["n"], storage_dir(tmp_path), "16M")
    d.cli("snapshot", "take", "-i", sid)
    assert d.nbd is not None
    with RawNbd(d.nbd) as c:
        c.open(f"{sid}/n")
        assert c.read(0, 4096) == bytes(4096)
        msg = _refused(d, "snapshot", "destroy", "-i", sid)
        assert "NBD" in msg and f"{sid}/n" in msg, msg
        msg = _refused(d, "daemon", "stop")
        assert "NBD" in msg and f"{sid}/n" in msg, msg
        c.disconnect()
    deadline = time.monotonic() + 10
    while d.client.status()["nbd_clients"] and time.monotonic() < deadline:
        time.sleep(0.05)
    d.cli("snapshot", "destroy", "-i", sid)


# -- point 8: an aborted FUSE connection -------------------------------------------------


@contextlib.contextmanager
def _fusectl():
    conns = "/sys/fs/fuse/connections"
    mounted = False
    if not os.listdir(conns):
        run("mount", "-t", "fusectl", "none", conns)
        mounted = True
    try:
        yield conns
    finally:
        if mounted:
            run("umount", conns, check=False)


def test_aborted_fuse_connection_is_unhealthy_and_stop_clears_it(daemon: Daemon, backing) -> None:
    lp = add_device(daemon, backing("a.img", 16 * MiB), "a")["loop"]
    assert lp
    assert _status(daemon)["healthy"] is True
    minor = os.minor(os.stat(daemon.mount).st_dev)
    with _fusectl() as conns, open(f"{conns}/{minor}/abort", "w") as f:
        f.write("1")
    deadline = time.monotonic() + 10
    while True:
        st = _status(daemon)  # the control socket still answers
        if not st["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["healthy"] is False, st
    assert st["problems"], st
    # The data path check (statfs of the mount) and the ended FUSE session.
    assert any("ENOTCONN" in p for p in st["problems"]), st
    assert any("FUSE session ended" in p for p in st["problems"]), st
    assert "NOT HEALTHY" in daemon.cli("daemon", "status").stdout
    assert _alive(daemon)
    out = json.loads(daemon.cli("--json", "daemon", "stop").stdout)
    assert out["stopped"] is True
    assert daemon.proc.wait(timeout=30) == 0
    assert not mounts_under(daemon.mount), "the dead FUSE mount is still there"
