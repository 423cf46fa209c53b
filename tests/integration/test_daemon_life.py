"""blksnapd's life: systemd notification, SIGTERM, stale mounts, daemon start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.integration.conftest import BIN, SKIP, cli, loops_under, mounts_under, run

MiB = 1 << 20


def _notified(listener: socket.socket, what: str) -> str:
    """The next notify message saying ``what`` (others, such as the fd
    store's, are passed over; their fds closed)."""
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(listener, 4096, 16)
        for fd in fds:
            os.close(fd)
        if what in msg.decode():
            return msg.decode()


def test_sd_notify_and_sigterm_clean_shutdown(tmp_path, backing):
    if SKIP:
        pytest.skip(SKIP)
    notify = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify)
    listener.settimeout(20)
    sock, mount = str(tmp_path / "s.sock"), str(tmp_path / "mnt")
    env = dict(os.environ, NOTIFY_SOCKET=notify)
    proc = subprocess.Popen(
        [
            str(BIN / "blksnapd"),
            "--socket",
            sock,
            "--mount",
            mount,
            "--state-dir",
            str(tmp_path / "st"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = _notified(listener, "READY=1")
        assert f"MAINPID={proc.pid}" in ready
        path = backing("t.img", 8 * MiB)
        loop = json.loads(
            cli(sock, "--json", "device", "add", path, "--name", "t", "--loop").stdout
        )["loop"]
        storage = tmp_path / "d"
        storage.mkdir()
        sid = cli(
            sock, "snapshot", "create", "-d", "t", "-f", str(storage), "-l", "8M"
        ).stdout.strip()
        cli(sock, "snapshot", "take", "-i", sid, "--loop")
        assert len(loops_under(str(tmp_path))) == 2
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _notified(listener, "STOPPING=1")
        assert proc.wait(timeout=60) == 0
        assert not loops_under(str(tmp_path))
        assert not mounts_under(mount)
        assert not os.path.exists(sock)
        assert os.path.exists(loop)  # the loop device node itself stays; it is free now
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for lp in loops_under(str(tmp_path)):
            run("losetup", "-d", lp, check=False)
        for mp in mounts_under(str(tmp_path)):
            run("umount", "-l", mp, check=False)
        for lp in loops_under(str(tmp_path)):
            run("losetup", "-d", lp, check=False)


def test_daemon_start_and_stale_mount_after_kill(tmp_path, backing):
    """`blksnap daemon start` backgrounds blksnapd; after a SIGKILL the next
    start clears the dead FUSE mount and serves again."""
    if SKIP:
        pytest.skip(SKIP)
    sock, mount, state = str(tmp_path / "s.sock"), str(tmp_path / "mnt"), str(tmp_path / "st")
    pids: list[int] = []
    try:
        for _ in range(2):
            out = json.loads(
                cli(
                    sock, "--json", "daemon", "start", "--mount", mount, "--state-dir", state
                ).stdout
            )
            assert out["started"] is True
            pids.append(out["pid"])
            assert mounts_under(mount) == [mount]
            again = json.loads(cli(sock, "--json", "daemon", "start", "--state-dir", state).stdout)
            assert again["started"] is False and again["pid"] == out["pid"]
            # A loop device over the FUSE file, left behind by the kill.
            cli(
                sock,
                "device",
                "add",
                backing(f"k{len(pids)}.img", 4 * MiB),
                "--name",
                "k",
                "--loop",
            )
            assert len(loops_under(mount)) == 1
            os.kill(out["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{out['pid']}") and time.monotonic() < deadline:
                time.sleep(0.05)
        assert pids[0] != pids[1]
        cli(sock, "daemon", "start", "--mount", mount, "--state-dir", state)
        assert loops_under(mount) == []  # the stale ones were cleared at start
        cli(sock, "daemon", "stop")
        assert os.path.exists(os.path.join(state, "blksnapd.log"))
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for lp in loops_under(str(tmp_path)):
            run("losetup", "-d", lp, check=False)
        for mp in mounts_under(str(tmp_path)):
            run("umount", "-l", mp, check=False)
