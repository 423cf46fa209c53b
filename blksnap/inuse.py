"""Who uses a file or a block device: what a destructive command must not break.

:func:`users_of` answers from the host alone (/proc, /sys, mountinfo, swaps),
with no daemon: a process holding the file or device open (blksnapd holds the
backing files it serves), a loop device attached to the file (and whatever
uses that loop device), a file served by blksnapd's FUSE file system, a
mounted file system, holders (device-mapper, md), a mounted or held
partition, swap. Processes of other users are seen only by root.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Callable

from blksnap import hostinfo

#: The FUSE file system type of blksnapd's mount (``subtype=blksnap``).
FUSE_TYPE = "fuse.blksnap"


def users_of(path: str) -> list[str]:
    """Human-readable descriptions of what uses ``path`` (symlinks resolved);
    empty if nothing does or ``path`` does not exist."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return []
    if stat.S_ISBLK(st.st_mode):
        return _blockdev_users(real, st, set())
    if stat.S_ISREG(st.st_mode):
        return _file_users(real, st, set())
    return []


def _file_users(real: str, st: os.stat_result, seen: set[str]) -> list[str]:
    out = []
    served = _served_by_blksnapd(real, st)
    if served:
        out.append(served)
    out += [
        f"open by process {pid} ({comm})"
        for pid, comm in _processes_with(lambda s: _same_file(s, st))
    ]
    if _is_swap(real):
        out.append("in use as swap")
    for lp in _loops_of_file(real, st):
        if lp in seen:
            continue
        seen.add(lp)
        used = _blockdev_users(lp, None, seen)
        what = f"loop device {lp} is attached to it"
        out.append(what + (f" ({'; '.join(used)})" if used else ""))
    return out


def _blockdev_users(dev: str, st: os.stat_result | None, seen: set[str]) -> list[str]:
    if st is None:
        try:
            st = os.stat(dev)
        except OSError:
            return []
    seen.add(dev)
    out = [f"mounted on {m.mountpoint} ({m.fstype})" for m in hostinfo.mounts_of(dev)]
    name = _sysfs_name(st.st_rdev)
    if name:
        out += [f"held by {h}" for h in holders(name)]
        for part in _partitions(name):
            pdev = "/dev/" + part
            for m in hostinfo.mounts_of(pdev) if os.path.exists(pdev) else []:
                out.append(f"partition {pdev} mounted on {m.mountpoint} ({m.fstype})")
            out += [f"partition {pdev} held by {h}" for h in holders(part)]
    if _is_swap(dev):
        out.append("in use as swap")
    out += [
        f"open by process {pid} ({comm})"
        for pid, comm in _processes_with(
            lambda s: stat.S_ISBLK(s.st_mode) and s.st_rdev == st.st_rdev
        )
    ]
    backing = hostinfo.backing_file(dev) if name and name.startswith("loop") else None
    if backing:
        backing = backing.removesuffix(" (deleted)")
        try:
            bst = os.stat(backing)
        except OSError:
            bst = None
        if bst is not None and stat.S_ISREG(bst.st_mode):
            # The loop device itself is no user of its own backing file.
            for what in _file_users(os.path.realpath(backing), bst, seen):
                if what.startswith(f"loop device {dev} "):
                    continue
                out.append(f"its backing file {backing} is {what}")
    return out


def _same_file(s: os.stat_result, st: os.stat_result) -> bool:
    return s.st_dev == st.st_dev and s.st_ino == st.st_ino and stat.S_ISREG(s.st_mode)


def _processes_with(match: Callable[[os.stat_result], bool]) -> list[tuple[int, str]]:
    """(pid, comm) of every other process with an open fd that ``match``es."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to see
            continue
        for fd in fds:
            try:
                s = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if match(s):
                out.append((int(entry), _comm(entry)))
                break
    return out


def openers(paths: set[str]) -> dict[str, list[str]]:
    """Processes (other than this one) with one of ``paths`` open, by the
    name of the open file: path -> ``["pid 123 (dd)", ...]``. (By name, not
    by stat: a file of this process's own FUSE mount is never stat-ed.)"""
    found: dict[str, list[str]] = {}
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        hits = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in paths:
                hits.add(target)
        if hits:
            comm = _comm(pid)
            for target in hits:
                found.setdefault(target, []).append(f"pid {pid} ({comm})")
    return found


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _loops_of_file(real: str, st: os.stat_result) -> list[str]:
    """Loop devices whose backing file is this file (by name, then by inode)."""
    out = set(hostinfo.loops_backed_by(real))
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(entry) as f:
                backing = f.read().strip().removesuffix(" (deleted)")
            if _same_file(os.stat(backing), st):
                out.add("/dev/" + entry.split("/")[3])
        except OSError:
            continue
    return sorted(out)


def _served_by_blksnapd(real: str, st: os.stat_result) -> str | None:
    """A file of blksnapd's FUSE file system: a served device or an image."""
    best = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or not tail or tail[0] != FUSE_TYPE:
                continue
            major, _, minor = fields[2].partition(":")
            if os.makedev(int(major), int(minor)) != st.st_dev:
                continue
            best = hostinfo.unescape(fields[4])
    if best is None:
        return None
    rel = os.path.relpath(real, best)
    parts = rel.split(os.sep)
    if len(parts) == 2 and parts[0] == "dev":
        return f"device {parts[1]} served by blksnapd (FUSE file under {best})"
    if len(parts) == 3 and parts[0] == "images":
        return f"image of device {parts[2]} in snapshot {parts[1]} served by blksnapd"
    return f"served by blksnapd (FUSE file system at {best})"


def _sysfs_name(rdev: int) -> str | None:
    """The kernel name (``loop3``, ``sda1``) of block device ``rdev``."""
    try:
        link = os.readlink(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    except OSError:
        return None
    return os.path.basename(link)


def holders(name: str) -> list[str]:
    """What holds block device ``name`` (device-mapper, md ...), from sysfs."""
    try:
        return sorted(os.listdir(f"/sys/class/block/{name}/holders"))
    except OSError:
        return []


def _partitions(name: str) -> list[str]:
    base = f"/sys/class/block/{name}"
    try:
        entries = os.listdir(base)
    except OSError:
        return []
    return sorted(e for e in entries if os.path.exists(f"{base}/{e}/partition"))


def _is_swap(real: str) -> bool:
    try:
        with open("/proc/swaps") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if fields and os.path.realpath(hostinfo.unescape(fields[0])) == real:
            return True
    return False
