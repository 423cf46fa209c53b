"""What the host's block layer says, read-only: the backing file of a loop
device, the loop devices over a file, the file systems mounted from a block
device. Shared by the control layer (which attaches, detaches and freezes:
:mod:`blksnap.control.loop`) and by :mod:`blksnap.inuse`."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass


def proc_stat(pid: int, tid: int | None = None) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` (or of thread ``tid`` of it) after
    the command name: ``[0]`` the state (``R``, ``S``, ``D``, ``Z`` ...),
    ``[1]`` the parent's pid, ``[49]`` the exit code; None if it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def backing_file(loop: str) -> str | None:
    name = os.path.basename(loop)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``."""
    path = os.path.abspath(path)
    out = []
    for entry in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        try:
            with open(entry) as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing == path or backing.removesuffix(" (deleted)") == path:
            out.append("/dev/" + entry.split("/")[3])
    return out


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str


def unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts_of(blockdev: str) -> list[Mount]:
    """File systems mounted from ``blockdev`` (by device number)."""
    try:
        rdev = os.stat(blockdev).st_rdev
    except OSError:
        return []
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and fields[2] == want:
                tail = right.split()
                out.append(Mount(unescape(fields[4]), tail[0], tail[1] if len(tail) > 1 else ""))
    return out
