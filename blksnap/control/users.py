"""Who uses a device or a snapshot image of blksnapd: loop devices over its
FUSE file, file systems mounted on them, their holders, processes with the
file or a loop device open, file handles blksnapd cannot name, NBD clients.

A command that would pull a device or an image from under a user (``device
remove``, ``snapshot destroy``, ``daemon stop``, a stop signal) asks
:class:`Users` first and refuses (EBUSY) with the list. The host side
(:func:`host_users`) blocks and runs in a worker thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from blksnap import hostinfo, inuse
from blksnap.engine import source as sources
from blksnap.errors import BlksnapError
from blksnap.frontends.targets import BackupTarget
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
    from blksnap.control.daemon import Daemon


def open_exclusively_elsewhere(blockdev: str) -> bool:
    """Does something hold ``blockdev`` exclusively (a file system, mounted
    in another namespace or lazily unmounted and still busy; device mapper,
    md, mkfs ...)? An ``O_EXCL`` open of a block device fails with EBUSY then."""
    try:
        fd = os.open(blockdev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def holds_files_on(blockdev: str) -> bool:
    """Does this process have a file open on the file system of ``blockdev``
    (diff storage on a protected file system, say)? Such a file system may
    be kept alive, lazily unmounted, by blksnapd alone, which a stop
    releases (snapshots destroyed) before it detaches the loop devices."""
    try:
        rdev = os.stat(blockdev).st_rdev
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.fstat(int(fd)).st_dev == rdev:
                return True
        except (OSError, ValueError):
            continue
    return False


def host_users(path: str, own_loop: str | None) -> tuple[list[str], int, bool]:
    """Who uses the FUSE file ``path`` through the host: loop devices over it
    (blksnapd's own ``own_loop`` counts only if mounted or held), file
    systems on them, their holders and the processes that have them or the
    file open. Returns (descriptions, loop devices over the file that are
    not ``own_loop`` (each holds one handle of the file), whether processes
    were found with the file open). Blocking."""
    out: list[str] = []
    loops = hostinfo.loops_backed_by(path)
    others = [lp for lp in loops if lp != own_loop]
    procs = inuse.openers({path, *loops})
    for lp in loops:
        what = lp if lp == own_loop else f"loop device {lp} (not blksnapd's) over {path}"
        mounts = hostinfo.mounts_of(lp)
        for m in mounts:
            out.append(f"{lp} is mounted on {m.mountpoint} ({m.fstype})")
        holders = inuse.holders(os.path.basename(lp))
        if holders:
            out.append(f"{what} is held by {', '.join(holders)}")
        elif not mounts and open_exclusively_elsewhere(lp) and not holds_files_on(lp):
            out.append(f"{what} is held open exclusively (a file system still unmounting?)")
        elif lp != own_loop and not mounts:
            out.append(f"{what} is attached")
        if lp in procs:
            out.append(f"{lp} is open in {', '.join(procs[lp])}")
    if path in procs:
        out.append(f"{path} is open in {', '.join(procs[path])}")
    return out, len(others), path in procs


class Users:
    """The users of the devices and images of one daemon. A user gone a
    moment ago (a handle the kernel releases late, a lazy unmount
    finishing) is waited for up to ``grace`` seconds (``SETTINGS.users_grace``)."""

    def __init__(self, daemon: Daemon, grace: float | None = None) -> None:
        self.daemon = daemon
        self.grace = SETTINGS.users_grace if grace is None else grace

    def _nbd_export_users(self, export: str) -> int:
        nbd = self.daemon.nbd
        if nbd is None:
            return 0
        return sum(
            1
            for c in list(nbd.connections)
            if c.export is not None and c.export.name == export and not c.finished
        )

    async def of(
        self, name: str, sid: str | None = None, *, grace: float | None = None
    ) -> list[str]:
        """Who uses device ``name`` (or, with ``sid``, its image in snapshot
        ``sid``): file systems mounted on loop devices over its FUSE file,
        other loop devices over the file, holders of those, processes with
        the loop device or the file open (blksnapd's own loop device holds
        one handle of it), NBD clients. Empty when nothing does."""
        d = self.daemon
        if sid is None:
            target: Any = d.engine.device(name)
            path, label, export = d.device_path(name), f"device {name}", name
        else:
            target = d.engine.image(sid, name)
            export = f"{sid}/{name}"
            path, label = d.image_path(sid, name), f"image {export}"
        return await self._watch(target, path, label, export, grace, device=sid is None)

    async def of_backup(self, key: str, *, grace: float | None = None) -> list[str]:
        """Who uses the mounted backup ``key`` (``B/N``), as :meth:`of`."""
        return await self._watch(
            sources.get(BackupTarget.KEY_PREFIX + key),
            self.daemon.backups.mount_path(key),
            f"backup {key}",
            BackupTarget.PREFIX + key,
            grace,
        )

    async def _watch(
        self,
        target: Any,
        path: str,
        label: str,
        export: str,
        grace: float | None,
        *,
        device: bool = False,
    ) -> list[str]:
        """Who uses the FUSE file ``path`` served from ``target`` (its NBD
        export ``export``, a device's if ``device``), asked again for up to
        ``grace`` seconds while someone does."""
        d = self.daemon
        deadline = trio.current_time() + (self.grace if grace is None else grace)
        while True:
            own = d.loops.get(path)
            found, other_loops, named = await d.thread(host_users, path, own)
            handles = d.fs.open_count(target) - (1 if own else 0) - other_loops
            if handles > 0 and not named:  # held, but not by a process we can name
                found.append(f"{path} is open in {handles} file handle(s)")
            if not device:
                nbd = self._nbd_export_users(export)
            else:
                nbd = d.nbd.device_users(export) if d.nbd else 0
            if nbd:
                found.append(f"{nbd} NBD client(s) on export {export}")
            if not found or trio.current_time() > deadline:
                return [f"{label}: {what}" for what in found]
            await trio.sleep(0.05)

    async def _of_all(self, targets: Callable[[], list[tuple[str, str | None]]]) -> list[str]:
        """Users of every (device, snapshot id or None) ``targets()`` lists,
        with one grace for them all."""
        deadline = trio.current_time() + self.grace
        while True:
            out: list[str] = []
            for name, sid in targets():
                try:
                    out += await self.of(name, sid, grace=0)
                except BlksnapError:  # removed or destroyed meanwhile
                    pass
            if not out or trio.current_time() > deadline:
                return out
            await trio.sleep(0.05)

    def _images(self, sid: str) -> list[tuple[str, str | None]]:
        snap = self.daemon.engine.snapshot(sid)
        return [(n, sid) for n in sorted(snap.members) if snap.members[n].image is not None]

    async def of_snapshot(self, sid: str) -> list[str]:
        """Who uses the images of snapshot ``sid`` (see :meth:`of`)."""
        self.daemon.engine.snapshot(sid)  # ENOENT
        return await self._of_all(lambda: self._images(sid))

    async def of_all(self) -> list[str]:
        """Who uses any device or image: what a stop would break."""
        engine = self.daemon.engine

        def targets() -> list[tuple[str, str | None]]:
            out: list[tuple[str, str | None]] = [(d.name, None) for d in engine.devices()]
            for snap in engine.snapshot_collect():
                try:
                    out += self._images(snap["id"])
                except BlksnapError:
                    pass
            return out

        return await self._of_all(targets)
