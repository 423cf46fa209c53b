"""CBT checkpoints: a device's change-block tracking map in the state dir,
so that it outlives the process and the machine.

A checkpoint is one file, ``<state dir>/cbt/<device>.cbt``: a header (the
map's capacity, block size and count, active and changes numbers, both
generations; what the backing store was: its identity, size and, for a
regular file, mtime and ctime; whether blksnapd stopped cleanly after it),
the write map, the read map, and a BLAKE2b digest of all of it. It is
written whole and atomically: a temporary file, fsync, rename over the old
one, fsync of the directory; a reader sees the old checkpoint or the new
one, never a mix, and a torn one fails its digest.

When the tracker of a device is attached and no region carries its map on
(a worker taking over has one; a new blksnapd does not), the checkpoint is
loaded if it can be trusted, and the map carries on: **same generation**, so
the next backup stays incremental. It is not trusted, and the device starts
a new generation saying why, when:

* there is none, or it is torn or fails its digest;
* the capacity or the tracking block size differs;
* the backing store is another one (identity), or a regular file whose
  size, mtime or ctime changed since the checkpoint: written while
  blksnapd was not serving it;
* it is a block device and ``Params.cbt_trust_block_devices`` is off (the
  default): nothing tells whether a block device was written meanwhile;
* it was not written at a clean stop: blksnapd crashed or was killed after
  it, and writes after it cannot be known.

A checkpoint loaded is marked in use (not clean) at once, before any write
reaches the device: a crash after that cannot make it look trusted again.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import time
import uuid
from dataclasses import dataclass

from blksnap.fileio import fsync_dir

_MAGIC = b"BSNPCKP1"
_VERSION = 1
# magic, version, clean, capacity, block shift, block count, active, changes,
# generation, read generation, identity (2), kind (0 file, 1 block device),
# size, mtime_ns, ctime_ns, written at (time.time())
_HEADER = struct.Struct("<8sIIQIQII16s16sQQIQqqd")
_DIGEST = 32


@dataclass(frozen=True)
class BackingFacts:
    """What a backing store was, to tell whether it changed meanwhile."""

    identity: tuple[int, int]
    blockdev: bool
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of_fd(cls, fd: int, identity: tuple[int, int], size: int) -> BackingFacts:
        st = os.fstat(fd)
        blk = stat.S_ISBLK(st.st_mode)
        return cls(identity, blk, size, 0 if blk else st.st_mtime_ns, 0 if blk else st.st_ctime_ns)


@dataclass(frozen=True)
class Checkpoint:
    clean: bool
    capacity: int
    block_shift: int
    block_count: int
    active: int
    changes_number: int
    generation_id: str
    read_generation_id: str
    facts: BackingFacts
    written_at: float
    write_map: bytes
    read_map: bytes


def path_for(state_dir: str, device: str) -> str:
    return os.path.join(state_dir, "cbt", f"{device}.cbt")


def save(path: str, cp: Checkpoint) -> None:
    """Write ``cp`` at ``path`` atomically and durably."""
    f = cp.facts
    head = _HEADER.pack(
        _MAGIC, _VERSION, int(cp.clean), cp.capacity, cp.block_shift, cp.block_count,
        cp.active, cp.changes_number, uuid.UUID(cp.generation_id).bytes,
        uuid.UUID(cp.read_generation_id).bytes, f.identity[0], f.identity[1],
        int(f.blockdev), f.size, f.mtime_ns, f.ctime_ns, cp.written_at,
    )  # fmt: skip
    digest = hashlib.blake2b(head, digest_size=_DIGEST)
    digest.update(cp.write_map)
    digest.update(cp.read_map)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for part in (head, cp.write_map, cp.read_map, digest.digest()):
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def load(path: str) -> Checkpoint | str:
    """The checkpoint at ``path``, or why there is none to use."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "no checkpoint"
    except OSError as exc:
        return f"checkpoint unreadable: {exc.strerror}"
    if len(data) < _HEADER.size + _DIGEST:
        return "checkpoint torn (too short)"
    fields = _HEADER.unpack_from(data)
    magic, version, clean, capacity, shift, count, active, changes, gen, rgen = fields[:10]
    ident_a, ident_b, blk, size, mtime_ns, ctime_ns, written_at = fields[10:]
    if magic != _MAGIC or version != _VERSION:
        return "checkpoint of an unknown format"
    if len(data) != _HEADER.size + 2 * count + _DIGEST:
        return "checkpoint torn (wrong length)"
    body = data[:-_DIGEST]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != data[-_DIGEST:]:
        return "checkpoint damaged (digest mismatch)"
    at = _HEADER.size
    return Checkpoint(
        clean=bool(clean),
        capacity=capacity,
        block_shift=shift,
        block_count=count,
        active=active,
        changes_number=changes,
        generation_id=str(uuid.UUID(bytes=gen)),
        read_generation_id=str(uuid.UUID(bytes=rgen)),
        facts=BackingFacts((ident_a, ident_b), bool(blk), size, mtime_ns, ctime_ns),
        written_at=written_at,
        write_map=data[at : at + count],
        read_map=data[at + count : at + 2 * count],
    )


def distrust(cp: Checkpoint, now: BackingFacts, trust_block_devices: bool) -> str | None:
    """Why checkpoint ``cp`` cannot be trusted for a backing store that is
    ``now``; None if it can."""
    was = cp.facts
    if not cp.clean:
        return (
            "blksnapd did not stop cleanly after the last checkpoint "
            f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(cp.written_at))}): "
            "writes after it cannot be known"
        )
    if was.identity != now.identity or was.blockdev != now.blockdev:
        return "the backing store is not the one checkpointed"
    if was.size != now.size:
        return f"the backing store's size changed ({was.size} -> {now.size} bytes)"
    if now.blockdev:
        if not trust_block_devices:
            return (
                "a block device written while blksnapd was stopped cannot be detected "
                "(Params.cbt_trust_block_devices is off)"
            )
    elif (was.mtime_ns, was.ctime_ns) != (now.mtime_ns, now.ctime_ns):
        return "the backing file was changed while blksnapd was not serving it (mtime/ctime)"
    return None


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
