"""blksnapd and the host around its life: systemd's notify socket, what a
daemon that died left behind (loop devices over its files, its dead FUSE
mount), and whether the FUSE data path answers at all.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import trio

from blksnap import hostinfo
from blksnap.control import loop
from blksnap.errors import BlksnapError

log = logging.getLogger("blksnapd")


def sd_notify(message: str, fds: list[int] | None = None) -> bool:
    """Tell systemd (Type=notify) how we are, with ``fds`` if given (for
    ``FDSTORE=1``); nothing without NOTIFY_SOCKET. False if not sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            if fds:
                socket.send_fds(s, [message.encode()], fds)
            else:
                s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False
    return True


#: The first fd systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
#: The fd store assumed under a systemd that does not say its size.
_ASSUMED_STORE = 512


def fd_store_size() -> int:
    """How many fds systemd's fd store keeps for us: ``$FDSTORE`` (systemd
    254 and later set it to the unit's ``FileDescriptorStoreMax=``); under
    an older systemd, which does not say, assume the unit has one (fds sent
    to a unit without one are dropped, with a warning in its log); 0 when
    not run by systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return 0
    try:
        return max(0, int(os.environ.get("FDSTORE", str(_ASSUMED_STORE))))
    except ValueError:
        return 0


def fd_store_put(name: str, fd: int) -> bool:
    """Keep a copy of ``fd`` in systemd's fd store under ``name`` (replacing
    any fd of that name): it comes back to the next start of the unit."""
    if not fd_store_size():
        return False
    sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
    return sd_notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def fd_store_drop(name: str) -> None:
    """Forget the fds of ``name`` in systemd's fd store."""
    if fd_store_size():
        sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def listen_fds() -> dict[str, list[int]]:
    """The fds systemd passed to this process (socket activation, or its fd
    store), by name, in the order passed; the environment variables that
    named them are removed (our children must not take them for theirs).
    Empty when none were passed to this very process."""
    env = os.environ
    try:
        pid, count = int(env.get("LISTEN_PID", "0")), int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        pid, count = 0, 0
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return {}
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, []).append(fd)
    return out


def is_mounted(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mountpoint for line in f)


def clear_stale_mount(mountpoint: str) -> None:
    """What a daemon that died left behind: loop devices over its files
    (detached, or auto-cleared once their users close them) and its dead
    FUSE mount (unmounted lazily)."""
    mountpoint = os.path.abspath(mountpoint)
    for entry in sorted(os.listdir("/sys/block")):
        backing = hostinfo.backing_file(entry) if entry.startswith("loop") else None
        if backing and backing.startswith(mountpoint + "/"):
            log.warning("detaching stale loop device /dev/%s (%s)", entry, backing)
            try:
                loop.detach("/dev/" + entry)
            except BlksnapError as exc:
                log.error("stale loop device /dev/%s: %s", entry, exc)
    if is_mounted(mountpoint):
        log.warning("clearing stale mount at %s", mountpoint)
        subprocess.run(["umount", "-l", mountpoint], check=False)


async def stat_problem(fn: Callable[[str], Any], path: str, timeout: float) -> str | None:
    """``fn(path)`` (a stat of a file blksnapd serves) in a thread, bounded by
    ``timeout``: what went wrong, or None. (A thread: the event loop serves
    the FUSE request.)"""
    with trio.move_on_after(timeout):
        try:
            await trio.to_thread.run_sync(fn, path, abandon_on_cancel=True)
            return None
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "EIO")
            return f"{path}: {name} ({exc.strerror}): the FUSE data path is down"
    return f"{path}: no answer in {timeout:g} s: the FUSE data path is stuck"


def unmount_left_behind(mountpoint: str) -> None:
    """libfuse does not unmount a connection aborted through
    /sys/fs/fuse/connections: clear such a dead mount lazily."""
    try:
        if is_mounted(mountpoint):
            log.warning("FUSE mount %s still there: unmounting lazily", mountpoint)
            subprocess.run(["umount", "-l", mountpoint], check=False)
    except OSError as exc:
        log.error("unmount %s: %s", mountpoint, exc)
