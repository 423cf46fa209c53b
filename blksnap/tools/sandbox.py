"""A throwaway blksnapd in one directory: its socket, FUSE mount, state and
log all under ``root``. The demo, the integration tests and the benchmarks
use it; :meth:`Sandbox.stop` leaves no mount, loop device or process behind,
even after a failure."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blksnap.control.client import Client
from blksnap.errors import BlksnapError

BIN = Path(sys.executable).parent


def why_not() -> str | None:
    """Why a real daemon cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (FUSE mounts, loop devices, mount, FIFREEZE)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices on this machine"
    return None


def run(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output."""
    out = subprocess.run(list(args), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def mounts_under(root: str) -> list[str]:
    """Mount points at or below ``root``."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return out


def loops_under(root: str) -> list[str]:
    """Loop devices whose backing file is below ``root``."""
    out = []
    for entry in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            # A backing file removed while attached reads "PATH (deleted)".
            backing = entry.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if backing.startswith(root + "/"):
            out.append("/dev/" + entry.parts[3])
    return out


def cleanup_under(root: str) -> None:
    """Unmount everything below ``root``, then detach its loop devices.
    The loop devices are listed first: once a FUSE mount under ``root`` is
    lazily unmounted, the loop devices over its files name them relative to
    the detached mount, and would no longer be found."""
    loops = loops_under(root)
    for mp in sorted(mounts_under(root), reverse=True):
        run("umount", "-l", mp, check=False)
    for lp in sorted({*loops, *loops_under(root)}):
        run("losetup", "-d", lp, check=False)


@dataclass
class Sandbox:
    root: Path
    sock: str
    mount: str
    state: str
    proc: subprocess.Popen[bytes]
    log: Path
    client: Client
    nbd: str | None = None
    mounted: list[str] = field(default_factory=list)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(str(BIN / "blksnap"), "--socket", self.sock, *args, check=check)

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

    def stop(self) -> None:
        """Clean stop when possible, then make sure nothing is left behind."""
        for where in reversed(self.mounted):
            run("umount", "-l", where, check=False)
        self.mounted.clear()
        try:
            self.client.stop()
        except BlksnapError as exc:
            # Something the test made and did not track still uses it: a
            # sandbox goes all the same (whatever it is loses its device).
            if exc.errno == errno.EBUSY:
                with contextlib.suppress(BlksnapError):
                    self.client.stop(force=True)
        self.client.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        cleanup_under(str(self.root))


def start(
    root: str | Path,
    extra: Sequence[str] = (),
    *,
    timeout: float = 20,
    client_timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> Sandbox:
    """Start blksnapd with everything under ``root`` (``env``: added to its
    environment); wait up to ``timeout`` seconds until it answers. The
    sandbox's client gives each request ``client_timeout`` seconds."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
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
            env=None if env is None else {**os.environ, **env},
        )
    client = Client(sock, timeout=client_timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.status()
            break
        except BlksnapError:
            client.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"blksnapd did not start:\n{log.read_text()}") from None
            time.sleep(0.05)
    return Sandbox(root, sock, mount, state, proc, log, client)
