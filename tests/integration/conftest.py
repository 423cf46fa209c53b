"""A real blksnapd per test: its own state dir, FUSE mount and socket under
the test's tmp_path. Everything it and the test made (mounts, loop devices,
the process) is removed afterwards, even when the test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blksnap.client import Client
from blksnap.errors import BlksnapError


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts, loop devices, mount, FIFREEZE)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices on this machine"
    return None


SKIP = _why_not()
BIN = Path(sys.executable).parent


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure show its output in the assertion."""
    out = subprocess.run(list(args), capture_output=True, text=True, check=False, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def cli(sock: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(str(BIN / "blksnap"), "--socket", sock, *args, check=check)


def mounts_under(root: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return out


def loops_under(root: str) -> list[str]:
    out = []
    for entry in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = entry.read_text().strip()
        except OSError:
            continue
        if backing.startswith(root + "/"):
            out.append("/dev/" + entry.parts[3])
    return out


@dataclass
class Daemon:
    root: Path
    sock: str
    mount: str
    state: str
    proc: subprocess.Popen[bytes]
    log: Path
    client: Client
    mounted: list[str] = field(default_factory=list)
    #: The NBD Unix socket, when the daemon was started with one.
    nbd: str | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(self.sock, *args, check=check)

    def mount_fs(self, dev: str, where: str | Path, *opts: str) -> str:
        where = str(where)
        os.makedirs(where, exist_ok=True)
        args = ["mount"]
        if opts:
            args += ["-o", ",".join(opts)]
        run(*args, dev, where)
        self.mounted.append(where)
        return where

    def umount(self, where: str | Path) -> None:
        run("umount", str(where))
        self.mounted.remove(str(where))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_daemon(root: Path, extra: Sequence[str] = ()) -> Daemon:
    sock, mount, state = str(root / "blksnapd.sock"), str(root / "mnt"), str(root / "state")
    log = root / "blksnapd.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                str(BIN / "blksnapd"),
                *("--socket", sock, "--mount", mount, "--state-dir", state),
                *extra,
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    client = Client(sock, timeout=120)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.status()
            break
        except BlksnapError:
            client.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"blksnapd did not start:\n{log.read_text()}") from None
            time.sleep(0.05)
    return Daemon(root, sock, mount, state, proc, log, client)


def stop_daemon(d: Daemon) -> None:
    """Clean stop when possible, then make sure nothing is left behind."""
    for where in reversed(d.mounted):
        run("umount", "-l", where, check=False)
    d.mounted.clear()
    with contextlib.suppress(BlksnapError):
        d.client.stop()
    d.client.close()
    try:
        d.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)
    root = str(d.root)
    for mp in sorted(mounts_under(root), reverse=True):
        run("umount", "-l", mp, check=False)
    for lp in loops_under(root):
        run("losetup", "-d", lp, check=False)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    if SKIP:
        pytest.skip(SKIP)
    # Short paths: loop backing file names are truncated at 64 characters
    # in some tools' output.
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)
        assert not mounts_under(str(tmp_path)), mounts_under(str(tmp_path))
        assert not loops_under(str(tmp_path)), loops_under(str(tmp_path))


@pytest.fixture
def nbd_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that also serves NBD on ``<tmp>/nbd.sock`` (``daemon.nbd``)."""
    if SKIP:
        pytest.skip(SKIP)
    nbd = str(tmp_path / "nbd.sock")
    d = start_daemon(tmp_path, ["--nbd", f"unix:{nbd}"])
    d.nbd = nbd
    try:
        yield d
    finally:
        stop_daemon(d)
        assert not os.path.exists(nbd), "NBD socket left behind"
        assert not mounts_under(str(tmp_path)), mounts_under(str(tmp_path))
        assert not loops_under(str(tmp_path)), loops_under(str(tmp_path))


@pytest.fixture
def backing(tmp_path: Path) -> Callable[[str, int], str]:
    def make(name: str, size: int) -> str:
        path = tmp_path / "backing" / name
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    return make


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
