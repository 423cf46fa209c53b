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
* it was not written at a clean stop and names no write-intent file that
  can be used (:mod:`blksnap.engine.cbt_intent`): writes after it cannot be
  known.

A checkpoint loaded is marked in use (not clean) at once, before any write
reaches the device: a crash after that cannot make it look trusted again.
While the device is served, checkpoints are also written at each take and
periodically; those name the device's write-intent file, and after a crash
the map is the checkpoint plus every region that file holds (see
:func:`recovered`).
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np

from blksnap.engine.cbt_intent import region_blocks
from blksnap.fileio import fsync_dir

_MAGIC = b"BSNPCKP1"
_VERSION = 2
# magic, version, clean, capacity, block shift, block count, active, changes,
# generation, read generation, identity (2), kind (0 file, 1 block device),
# size, mtime_ns, ctime_ns, written at (time.time())
_HEADER_V1 = struct.Struct("<8sIIQIQII16s16sQQIQqqd")
# version 2 adds: the intent file's token (zeroes: none) and region shift,
# and the numbers a recovery gave write-intent regions, of the write map's
# generation and of the read map's (a bit per number)
_HEADER = struct.Struct("<8sIIQIQII16s16sQQIQqqd16sI32s32s")
_DIGEST = 32
#: The largest change number a byte of the map holds.
MAX_NUMBER = 255


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
    #: The write-intent file covering writes after this checkpoint (its
    #: token and region shift), if any.
    intent_token: str | None = None
    intent_shift: int = 0
    #: Numbers that a recovery after a crash gave to write-intent regions
    #: (maybe changed, maybe not), in the write map's generation ...
    recovered: frozenset[int] = frozenset()
    #: ... and in the read map's.
    read_recovered: frozenset[int] = frozenset()


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
        uuid.UUID(cp.intent_token).bytes if cp.intent_token else bytes(16), cp.intent_shift,
        numbers_bits(cp.recovered), numbers_bits(cp.read_recovered),
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
    if len(data) < _HEADER_V1.size + _DIGEST:
        return "checkpoint torn (too short)"
    magic, version = struct.unpack_from("<8sI", data)
    if magic != _MAGIC or version not in (1, _VERSION):
        return "checkpoint of an unknown format"
    header = _HEADER if version == _VERSION else _HEADER_V1
    if len(data) < header.size + _DIGEST:
        return "checkpoint torn (too short)"
    fields = header.unpack_from(data)
    _, _, clean, capacity, shift, count, active, changes, gen, rgen = fields[:10]
    ident_a, ident_b, blk, size, mtime_ns, ctime_ns, written_at = fields[10:17]
    token, ishift, rec, rrec = fields[17:] if version == _VERSION else (bytes(16), 0, b"", b"")
    if len(data) != header.size + 2 * count + _DIGEST:
        return "checkpoint torn (wrong length)"
    body = data[:-_DIGEST]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != data[-_DIGEST:]:
        return "checkpoint damaged (digest mismatch)"
    at = header.size
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
        intent_token=str(uuid.UUID(bytes=token)) if any(token) else None,
        intent_shift=ishift,
        recovered=bits_numbers(rec),
        read_recovered=bits_numbers(rrec),
    )


def numbers_bits(numbers: frozenset[int]) -> bytes:
    bits = bytearray(32)
    for n in numbers:
        bits[n >> 3] |= 1 << (n & 7)
    return bytes(bits)


def bits_numbers(bits: bytes) -> frozenset[int]:
    return frozenset(i for i in range(8 * len(bits)) if bits[i >> 3] >> (i & 7) & 1)


def distrust(cp: Checkpoint, now: BackingFacts, trust_block_devices: bool) -> str | None:
    """Why checkpoint ``cp`` cannot be trusted for a backing store that is
    ``now``; None if it can. A checkpoint not written at a clean stop can be
    trusted only with the write-intent file it names, which the caller
    checks (:func:`recovered`)."""
    was = cp.facts
    if not cp.clean and cp.intent_token is None:
        return (
            "blksnapd did not stop cleanly after the last checkpoint "
            f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(cp.written_at))}) "
            "and no write intent covers the writes after it"
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
    elif cp.clean and (was.mtime_ns, was.ctime_ns) != (now.mtime_ns, now.ctime_ns):
        return "the backing file was changed while blksnapd was not serving it (mtime/ctime)"
    return None


def fresh(capacity: int, block_shift: int) -> Checkpoint:
    """A new generation's empty map (nothing known of the backing store)."""
    count = (capacity + (1 << block_shift) - 1) >> block_shift
    gen = str(uuid.uuid4())
    return Checkpoint(
        clean=False,
        capacity=capacity,
        block_shift=block_shift,
        block_count=count,
        active=1,
        changes_number=0,
        generation_id=gen,
        read_generation_id=gen,
        facts=BackingFacts((0, 0), False, 0, 0, 0),
        written_at=time.time(),
        write_map=bytes(count),
        read_map=bytes(count),
    )


def recovered(cp: Checkpoint, regions: np.ndarray) -> Checkpoint | str:
    """After a crash: the map of checkpoint ``cp`` with every block of the
    write-intent ``regions`` (a bool per region of 2**``cp.intent_shift``
    bytes) marked changed, **same generation**, or why that cannot be.

    Those blocks get a number of their own, one past the checkpoint's active
    number (listed in :attr:`Checkpoint.recovered`, so a backup can tell
    them from blocks surely written), and the active number moves one
    further. One past is needed because a take may have happened after the
    checkpoint (its own checkpoint lost in the crash): a backup made then
    holds ``changes_number`` = the checkpoint's active number, and every
    write after it must count as newer."""
    if cp.active + 2 > MAX_NUMBER:
        return "the change numbers of this generation ran out at the recovery after a crash"
    numbers = np.frombuffer(cp.write_map, dtype=np.uint8).copy()
    mark = cp.active + 1
    for r in np.flatnonzero(regions).tolist():
        first, last = region_blocks(r, cp.intent_shift, cp.block_shift, cp.block_count)
        numbers[first : last + 1] = mark
    return replace(
        cp,
        clean=False,
        active=cp.active + 2,
        write_map=numbers.tobytes(),
        recovered=cp.recovered | {mark},
    )


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
