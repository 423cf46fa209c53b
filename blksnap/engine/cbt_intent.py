"""Write intent: the regions of a device that may hold writes the CBT's last
checkpoint does not know of, durable before those writes reach the device.

md's write-intent bitmap is the model. A device is cut into coarse regions
(``Params.cbt_intent_region_size``); the intent file,
``<state dir>/cbt/<device>.intent``, holds one byte per region after a
header. The first write to a region since the last checkpoint waits until
that region's byte is on stable storage (written and ``fdatasync``); every
later write to it passes at the cost of one lookup. Writes that arrive while
a flush is under way share the next one (group commit), so a burst of first
writes costs a few flushes, not one each.

A checkpoint (:mod:`blksnap.engine.cbt_checkpoint`) starts a new *epoch*:
the regions set so far are kept aside, writes must set their region again,
and once the checkpoint is durable the regions kept aside are cleared from
the file. So at any moment the file holds, for every write that reached the
device after the last durable checkpoint, its region. After a crash the CBT
is that checkpoint plus every region in the file marked changed: nothing
missed, and the extra re-read bounded by the regions written since the last
checkpoint.

Every write of the file writes the whole wanted state of the pages that
changed, so a file torn by a power cut (some pages new, some old) still
holds every byte that had been made durable and is still needed. The header
is written once, when the file is made, with a token that the checkpoints
name: an intent file that is not the one a checkpoint names is not used.

A failure to write the file (``EIO``, ``ENOSPC``) does not fail the device's
writes: the intent is given up (:attr:`IntentLog.failed`), the caller
removes the checkpoint, and after a crash the CBT starts a new generation.
Only if that removal fails too (the state dir's disk is gone) do the
device's writes fail with ``EIO`` from then on: a checkpoint left behind
would be trusted after a crash and miss them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np

from blksnap.errors import IOFailure
from blksnap.fileio import fsync_dir, pwrite_full

log = logging.getLogger(__name__)

_MAGIC = b"BSNPINT1"
_VERSION = 1
#: magic, version, region shift, region count, token (UUID bytes)
_HEADER = struct.Struct("<8sIIQ16s")
_DIGEST = 16
#: The region bytes start here (the header has a page of its own).
_BITS_AT = 4096
_PAGE = 4096


def region_blocks(region: int, shift: int, block_shift: int, block_count: int) -> tuple[int, int]:
    """The first and last tracking block (of 2**``block_shift`` bytes, of
    ``block_count``) that region ``region`` of 2**``shift`` bytes touches."""
    first = (region << shift) >> block_shift
    return first, min((((region + 1) << shift) - 1) >> block_shift, block_count - 1)


def region_shift_for(region_size: int) -> int:
    return region_size.bit_length() - 1


class IntentLog:
    """The intent file of one device, open for writing.

    After marking the map, a writer looks its region up in :attr:`durable`
    (set: durable in this epoch, done) and else calls :meth:`cover`, which
    returns once its regions are durable (see :meth:`CbtMap.mark
    <blksnap.engine.cbt.CbtMap.mark>` for why the order matters).
    """

    def __init__(self, path: str, fd: int, token: str, shift: int, bits: np.ndarray) -> None:
        self.path = path
        self.fd = fd
        self.token = token
        self.shift = shift
        self.count = len(bits)
        #: Durable and of this epoch: a write there passes at once. (Changed
        #: in place only: the map keeps a reference for its fast path.)
        self.durable = bytearray(self.count)
        #: Asked for, not yet durable.
        self._want = np.zeros(self.count, dtype=bool)
        #: Of earlier epochs, still needed until a checkpoint is durable.
        self._old = bits.astype(bool)
        #: What the file holds now (as last written).
        self._on_disk = bits.astype(bool)
        self._cv = threading.Condition(threading.Lock())
        self._flushing = False
        #: Why the intent was given up (None while it works).
        self.failed: str | None = None
        #: Told (with the lock held) of regions made durable, and of a new
        #: epoch (every region to be set again): the map's per-block cache.
        self.on_durable: Callable[[np.ndarray], None] | None = None
        self.on_clear: Callable[[], None] | None = None
        #: Called once, in the failing thread, when the intent is given up;
        #: False: nothing keeps the CBT from being trusted wrongly after a
        #: crash (:attr:`fatal`).
        self.on_failure: Callable[[str], bool] | None = None
        #: Set when writes must fail from now on (see the module's doc).
        self.fatal: str | None = None
        #: Flushes done, and the seconds they took (for status).
        self.flushes = 0
        self.flush_seconds = 0.0

    # -- making and opening --------------------------------------------------------

    @classmethod
    def create(cls, path: str, shift: int, count: int) -> IntentLog:
        """A new intent file (new token, no region set), durable."""
        token = str(uuid.uuid4())
        head = _HEADER.pack(_MAGIC, _VERSION, shift, count, uuid.UUID(token).bytes)
        head += hashlib.blake2b(head, digest_size=_DIGEST).digest()
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # Written out, not a hole: its pages are allocated now, so a
            # flush later never waits for block allocation.
            pwrite_full(fd, 0, head.ljust(_BITS_AT, b"\0") + bytes(count))
            os.fsync(fd)
            os.replace(tmp, path)
            fsync_dir(directory)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, token, shift, np.zeros(count, dtype=bool))

    @classmethod
    def open(cls, path: str, token: str, shift: int, count: int) -> IntentLog | str:
        """The intent file at ``path`` if it is the one named ``token`` and
        made for ``count`` regions of 2**``shift`` bytes; else why not."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return "its write-intent file is missing"
        except OSError as exc:
            return f"its write-intent file cannot be opened ({exc.strerror})"
        try:
            data = os.pread(fd, _BITS_AT + count, 0)
            why = _check(data, token, shift, count)
            if why is not None:
                os.close(fd)
                return why
        except OSError as exc:
            os.close(fd)
            return f"its write-intent file cannot be read ({exc.strerror})"
        bits = np.frombuffer(data, dtype=np.uint8, offset=_BITS_AT) != 0
        return cls(path, fd, token, shift, bits)

    def close(self) -> None:
        with self._cv:
            while self._flushing:
                self._cv.wait()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    # -- the write path ------------------------------------------------------------

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """The first and last region of bytes ``offset``..``offset+length``."""
        return offset >> self.shift, (offset + length - 1) >> self.shift

    def regions_set(self) -> np.ndarray:
        """The regions the file holds (a bool per region): after a crash,
        those that may hold writes its checkpoint does not know of."""
        return self._on_disk.copy()

    def covered(self, first: int, last: int) -> bool:
        """Are regions ``first``..``last`` durable in this epoch? (Lock-free
        reads of a bytearray; EIO once writes must fail.)"""
        if self.failed is not None:
            if self.fatal is not None:
                raise IOFailure(f"write refused: {self.fatal}")
            return True
        durable = self.durable
        if first == last:
            return bool(durable[first])
        return all(durable[first : last + 1])

    def cover(self, first: int, last: int) -> None:
        """Return once regions ``first``..``last`` are durable in the file
        (group commit: one flush for every region asked for meanwhile)."""
        with self._cv:
            self._want[first : last + 1] = True
            while True:
                if self.failed is not None:
                    if self.fatal is not None:
                        raise IOFailure(f"write refused: {self.fatal}")
                    return
                if all(self.durable[first : last + 1]):
                    return
                if self._flushing:
                    self._cv.wait()
                    continue
                self._flush_locked()

    def _flush_locked(self) -> None:
        """Write the wanted state and make it durable; with ``_cv`` held on
        entry and exit, released during the I/O."""
        wanted = self._want.copy()
        state = wanted | self._old | np.frombuffer(self.durable, dtype=bool)
        t0 = time.monotonic()
        if not self._write_locked(state):
            return
        self.flushes += 1
        self.flush_seconds += time.monotonic() - t0
        idx = np.flatnonzero(wanted)
        self._want[idx] = False
        for r in idx.tolist():
            self.durable[r] = 1
        if self.on_durable is not None:
            self.on_durable(idx)

    def _write_locked(self, state: np.ndarray) -> bool:
        """Make ``state`` the file's, durably; with ``_cv`` held on entry and
        exit (released during the I/O, other writers then wait for it).
        False if it failed (the intent is given up)."""
        self._flushing = True
        self._cv.release()
        err: str | None = None
        try:
            self._write(state)
        except OSError as exc:
            err = f"write-intent file {self.path}: {exc.strerror or exc}"
        finally:
            self._cv.acquire()
            self._flushing = False
            self._cv.notify_all()
        if err is not None:
            self._give_up(err)
            return False
        self._on_disk = state
        return True

    def _write(self, state: np.ndarray) -> None:
        """The pages of the file that differ from ``state``, then fdatasync."""
        if self.fd < 0:
            raise OSError(9, "intent file closed")
        changed = np.flatnonzero(state != self._on_disk)
        if changed.size:
            raw = state.astype(np.uint8).tobytes()
            pages = np.unique(changed // _PAGE).tolist()
            for p in pages:
                a = p * _PAGE
                pwrite_full(self.fd, _BITS_AT + a, raw[a : a + _PAGE])
        os.fdatasync(self.fd)

    def _give_up(self, why: str) -> None:
        if self.failed is not None:
            return
        self.failed = why
        log.error("%s: write intent given up: the CBT survives a clean stop only", why)
        if self.on_failure is not None and not self.on_failure(why):
            self.fatal = f"{why}, and the CBT checkpoint could not be removed"

    # -- checkpoints ---------------------------------------------------------------

    def begin_epoch(self) -> None:
        """A checkpoint is being taken: regions set so far are kept aside
        until it is durable; writes from now on set theirs again. Called
        before the map is copied for it."""
        with self._cv:
            self._old |= np.frombuffer(self.durable, dtype=bool)
            self.durable[:] = bytes(self.count)
            if self.on_clear is not None:
                self.on_clear()

    def end_epoch(self, durable: bool) -> None:
        """The checkpoint begun by :meth:`begin_epoch` is on stable storage
        (``durable``) or failed (the regions kept aside stay in the file).
        On success the file is rewritten without them."""
        with self._cv:
            if not durable or self.failed is not None:
                return
            self._old[:] = False
            while self._flushing:
                self._cv.wait()
            state = self._want | np.frombuffer(self.durable, dtype=bool)
            if not np.array_equal(state, self._on_disk):
                # Not urgent (a stale set region costs a re-read only), but
                # done now keeps the re-read after a crash small.
                self._write_locked(state)

    def dirty(self) -> bool:
        """Was anything written since the last checkpoint?"""
        return any(self.durable) or bool(self._want.any())

    def status(self) -> dict[str, object]:
        return {
            "region_size": 1 << self.shift,
            "regions": self.count,
            "regions_set": int(np.count_nonzero(self._on_disk)),
            "flushes": self.flushes,
            "flush_seconds": round(self.flush_seconds, 6),
            "failed": self.failed,
        }


def _check(data: bytes, token: str, shift: int, count: int) -> str | None:
    if len(data) < _HEADER.size + _DIGEST:
        return "its write-intent file is torn (too short)"
    head, digest = data[: _HEADER.size], data[_HEADER.size : _HEADER.size + _DIGEST]
    if hashlib.blake2b(head, digest_size=_DIGEST).digest() != digest:
        return "its write-intent file is damaged (header digest mismatch)"
    magic, version, got_shift, got_count, got_token = _HEADER.unpack(head)
    if magic != _MAGIC or version != _VERSION:
        return "its write-intent file is of an unknown format"
    if str(uuid.UUID(bytes=got_token)) != token:
        return "its write-intent file is not the one the checkpoint names"
    if (got_shift, got_count) != (shift, count):
        return "its write-intent file was made for another region size or capacity"
    if len(data) != _BITS_AT + count:
        return "its write-intent file is torn (wrong length)"
    return None
