"""Under systemd with an fd store (``FileDescriptorStoreMax=``), blksnapd's
supervisor keeps a copy of the FUSE connection, its sockets and the CBT
regions there; killed outright (its worker with it), the next start of the
unit gets them back (``LISTEN_FDS``) and carries on: the file system on a
device only pauses, the CBT keeps its generation.

systemd itself is not needed: the test plays its part -- the notify socket
(``NOTIFY_SOCKET``, ``FDSTORE``), the store (fds received with ``FDSTORE=1``
and ``FDNAME=``, removed with ``FDSTOREREMOVE=1``) and the start of the
unit with the stored fds at 3, 4, ... named in ``LISTEN_FDNAMES``, its own
pid in ``LISTEN_PID``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blksnap.control.client import Client
from blksnap.errors import BlksnapError
from blksnap.hostinfo import proc_stat
from blksnap.tools.sandbox import Sandbox, cleanup_under
from tests.integration.conftest import BIN, SKIP, loops_under, mounts_under, run
from tests.integration.helpers import MiB, Writer, add_device, direct_write, sha256_file

# Starts blksnapd as systemd would: the fds named in argv[1] (comma list of
# current fd numbers) moved to 3, 4, ... and LISTEN_PID this very pid.
LAUNCH = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class FakeSystemd:
    """The notify socket and fd store of one unit."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.store: dict[str, list[int]] = {}
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 16)
            except OSError:
                return
            text = msg.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self.lock:
                self.messages.append(text)
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.store.pop(name, []):
                        os.close(fd)
                if fields.get("FDSTORE") == "1":
                    self.store.setdefault(name, []).extend(fds)
                    fds = []
            for fd in fds:
                os.close(fd)
            if fields.get("READY") == "1":
                self.ready.set()

    def names(self) -> set[str]:
        with self.lock:
            return set(self.store)

    def start(self, root: Path, passed: bool) -> subprocess.Popen[bytes]:
        """Start the unit: blksnapd with its options under ``root``; with
        ``passed``, the stored fds handed over."""
        env = {**os.environ, "NOTIFY_SOCKET": self.path, "FDSTORE": "64"}
        names: list[str] = []
        fds: list[int] = []
        if passed:
            with self.lock:
                for name, held in self.store.items():
                    names += [name] * len(held)
                    fds += held
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        self.ready.clear()
        args = [str(BIN / "blksnapd"), "--socket", str(root / "blksnapd.sock"),
                "--mount", str(root / "mnt"), "--state-dir", str(root / "state")]  # fmt: skip
        with open(root / "blksnapd.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-c", LAUNCH, ",".join(map(str, fds)), *args],
                env=env, pass_fds=fds, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            for held in self.store.values():
                for fd in held:
                    os.close(fd)
            self.store.clear()
        os.unlink(self.path)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in "ZX"


def _until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _sandbox(root: Path, proc: subprocess.Popen[bytes]) -> Sandbox:
    sock = str(root / "blksnapd.sock")
    return Sandbox(root, sock, str(root / "mnt"), str(root / "state"), proc,
                   root / "blksnapd.log", Client(sock, timeout=120))  # fmt: skip


def test_supervisor_killed_the_unit_restarts_and_carries_on(tmp_path: Path) -> None:
    if SKIP:
        pytest.skip(SKIP)
    unit = FakeSystemd(tmp_path / "notify")
    procs: list[subprocess.Popen[bytes]] = []
    box: Sandbox | None = None
    writer: Writer | None = None
    try:
        procs.append(unit.start(tmp_path, passed=False))
        assert unit.ready.wait(60), (tmp_path / "blksnapd.log").read_text()
        box = _sandbox(tmp_path, procs[-1])
        assert {"fuse-0", "control"} <= unit.names(), unit.messages
        img = tmp_path / "a.img"
        with open(img, "wb") as f:
            f.truncate(128 * MiB)
        la = add_device(box, str(img), "a")["loop"]
        box.cli("attach", "-d", "a")
        assert "region/cbt/a" in unit.names(), unit.names()
        gen = box.client.cbt_info("a").generation_id
        # A snapshot of a second device, with chunks stored, lives across it too.
        lb = add_device(box, str(_sparse(tmp_path / "b.img", 32 * MiB)), "b")["loop"]
        for off in range(0, 32 * MiB, MiB):
            direct_write(lb, off, os.urandom(MiB))
        at_take = sha256_file(lb)
        (tmp_path / "diff").mkdir()
        sid = box.client.snapshot_create(["b"], storage=str(tmp_path / "diff"), limit=32 * MiB)
        img_loop = box.cli("--json", "snapshot", "take", "-i", sid, "--loop").stdout
        img_loop = json.loads(img_loop)["images"]["b"]["loop"]
        for off in range(0, 32 * MiB, 2 * MiB):
            direct_write(lb, off, os.urandom(4096))
        assert f"region/snap/{sid}" in unit.names(), unit.names()
        run("mkfs.ext4", "-q", la)
        mnt = box.mount_fs(la, tmp_path / "fs")
        stop = tmp_path / "stop-writer"
        writer = Writer(mnt, stop, keep=20, maxsize=128 * 1024)
        time.sleep(1.0)
        before = writer.count()
        worker = box.client.status()["worker_pid"]

        # The supervisor dies outright; its worker goes with it.
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait(30)
        assert _until(lambda: not _alive(worker), 30), "the worker outlived its supervisor"
        time.sleep(0.5)  # nobody serves: the writer's requests wait in the kernel
        assert run("findmnt", "-n", str(tmp_path / "mnt"), check=False).returncode == 0

        procs.append(unit.start(tmp_path, passed=True))  # systemd restarts the unit
        assert unit.ready.wait(60), (tmp_path / "blksnapd.log").read_text()
        box.proc = procs[-1]
        st = box.client.status()
        assert st["devices"] == 2 and st["fuse"] == "up" and st["snapshots"] == 1, st
        assert box.client.cbt_info("a").generation_id == gen
        assert box.client.snapshot_collect(sid)[0]["state"] == "taken"
        assert sha256_file(img_loop) == at_take
        deadline = time.monotonic() + 30
        while writer.count() <= before + 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.count() > before + 5, "the writer made no progress after the restart"
        rc = writer.stop()
        assert rc == 0 and not writer.errors(), (rc, writer.errors(), writer.err[-5:])
        for name, digest in writer.files().items():
            with open(os.path.join(mnt, name), "rb") as f:
                assert hashlib.md5(f.read()).hexdigest() == digest, name
        run("sync", "-f", mnt)
        box.umount(mnt)
        fsck = run("fsck.ext4", "-fn", la, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr

        box.cli("snapshot", "destroy", "-i", sid)
        assert not any(n.startswith(f"region/snap/{sid}") for n in unit.names()), unit.names()
        # A clean stop ends the connection: nothing left for the next start.
        box.stop()
        box = None
        assert _until(
            lambda: not any(n.startswith(("fuse-", "region/")) for n in unit.names()), 10
        ), unit.names()
    finally:
        # Our own processes only, by pid; the daemon stopped cleanly if it
        # still runs, killed otherwise; then the store lets the connection
        # go (a writer waiting on it gets its error and ends).
        if box is not None and procs[-1].poll() is None:
            box.client.timeout = 20
            try:
                box.stop()
            except (BlksnapError, OSError, AssertionError, subprocess.TimeoutExpired):
                pass
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        unit.close()
        if writer is not None:
            try:
                writer.reap()
            except subprocess.TimeoutExpired:
                pass
        cleanup_under(str(tmp_path))
        assert not mounts_under(str(tmp_path)), mounts_under(str(tmp_path))
        assert not loops_under(str(tmp_path)), loops_under(str(tmp_path))
