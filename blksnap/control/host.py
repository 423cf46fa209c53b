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


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; nothing without NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


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
