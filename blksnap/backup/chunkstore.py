"""The chunk store: every backup's chunks, once each, named by their digest.

``chunks/<first two hex digits>/<64 hex digits>``: a fan-out of 256
directories (a million chunks, a terabyte at 1 MiB, is about 4000 files a
directory; ext4's and xfs's hashed directories take far more). A chunk is
written under a temporary name in its directory and linked to its name
(``link`` fails if the name exists: the store is put-if-absent) and the
temporary removed. Durability is batched, not per chunk (an ``fdatasync``
per chunk costs a journal commit each): the chunks stored since the last
flush are synced together (``fdatasync``), in the background as a backup goes and
all of them before it publishes anything that names them
(:meth:`ChunkStore.flush`, then :meth:`ChunkStore.sync` for the
directories). Until then a power cut can leave a chunk file under its name
that is shorter than it should be: its header says its full size, so the
store treats such a file as absent (a backup stores it again, verify and
restore report it). One writer at a time (the repository's writer lock), and
a writer that finds a dead writer's staging dir first makes the whole file
system durable (``syncfs``), so no backup ever names a chunk it did not make
durable itself.

A chunk file is a 16-byte header (:data:`blksnap.backup.format.CHUNK_HEADER`)
and a payload: a kind byte (raw or zstd) and the data, AES-256-GCM sealed
with the digest as associated data when the repository is encrypted
(:class:`blksnap.backup.crypto.Keys`). Reading checks the header, opens the
seal, decompresses and compares the digest of the result with the name.

Concurrency with gc: a backup holds ``chunks.lock`` shared while it decides a
chunk is present (and renews its mtime) or stores it; gc holds it exclusively
while it removes chunks, and removes only chunks no index names whose mtime
is older than its cutoff (:mod:`blksnap.backup.gc`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress

import numpy as np
import zstandard

from blksnap.backup.crypto import Keys
from blksnap.backup.format import (
    CHUNK_HEADER,
    CHUNK_LOCK,
    CHUNKS,
    KIND_RAW,
    KIND_ZSTD,
    BadChunk,
    chunk_file_size,
    chunk_length,
    chunk_name,
    decompress,
    frame_chunk,
    unframe_chunk,
)
from blksnap.errors import IOFailure, from_oserror
from blksnap.fileio import fsync_dir, pwrite_full

#: Temporary chunk files start with this (gc removes old ones).
TEMP_PREFIX = ".tmp-"
#: Chunks from this size on are probed before compression: PROBE_SAMPLES
#: slices of PROBE_BYTES; if they do not shrink below PROBE_RATIO of their
#: size, the chunk is stored raw.
PROBE_MIN = 256 * 1024
PROBE_SAMPLES = 8
PROBE_BYTES = 4096
PROBE_RATIO = 0.97
#: fdatasyncs in flight when a batch of chunks is flushed (the file system
#: folds concurrent ones into few journal commits).
FLUSH_THREADS = 16


def syncfs(path: str) -> None:
    """Make everything written to the file system holding ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _fdatasync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # removed by gc since (it was not named by any index)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class _LockFile:
    """One thread's open file of ``chunks.lock``, closed when the thread's
    locals go (flock locks belong to an open file, so threads cannot share one)."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_oserror(exc, path) from None

    def __del__(self) -> None:
        with suppress(OSError, AttributeError):
            os.close(self.fd)


class ChunkStore:
    """The ``chunks/`` directory of a repository (see the module docstring)."""

    def __init__(self, root: str, keys: Keys, compression: str, level: int = 1) -> None:
        self.root = root
        self.dir = os.path.join(root, CHUNKS)
        self.keys = keys
        self.compression = compression
        self.level = level
        self._tls = threading.local()
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._unsynced: list[str] = []
        #: Bytes of chunk files stored and not yet flushed.
        self.pending_bytes = 0
        self._zero_digests: dict[int, bytes] = {}

    # -- names -------------------------------------------------------------

    def path(self, digest: bytes) -> str:
        fan, name = chunk_name(digest)
        return os.path.join(self.dir, fan, name)

    def zero_digest(self, length: int) -> bytes:
        """The digest of ``length`` zero bytes (a zero chunk is never stored)."""
        digest = self._zero_digests.get(length)
        if digest is None:
            digest = self._zero_digests[length] = self.keys.digest(bytes(length))
        return digest

    def zero_chunks(self, digests: np.ndarray, size: int, chunk_size: int) -> np.ndarray:
        """Which chunks of an index (``digests``, one row per chunk of a
        device of ``size`` bytes) are all zeros: a bool per chunk."""
        count = len(digests)
        if not count:
            return np.zeros(0, dtype=bool)
        zero = (digests == np.frombuffer(self.zero_digest(chunk_size), dtype=np.uint8)).all(axis=1)
        last = chunk_length(size, chunk_size, count - 1)
        if last != chunk_size:
            zero[-1] = digests[-1].tobytes() == self.zero_digest(last)
        return zero

    # -- encoding ----------------------------------------------------------

    def encode(self, digest: bytes, data: bytes | memoryview) -> bytes:
        """The chunk file of ``data`` (compressed if that makes it smaller,
        sealed if the repository is encrypted). Thread-safe."""
        kind, body = KIND_RAW, data
        if self.compression == "zstd" and self._compressible(data):
            packed = self._cctx().compress(data)
            if len(packed) < len(data):
                kind, body = KIND_ZSTD, packed
        kind_byte = bytes((kind,))
        if self.keys.encrypted:
            sealed = self.keys.seal(digest, b"".join((kind_byte, body)))
            return frame_chunk(len(data), (sealed,), True)
        return frame_chunk(len(data), (kind_byte, body), False)

    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._tls, "cctx", None)
        if cctx is None:  # compressors are not thread-safe: one per thread
            cctx = self._tls.cctx = zstandard.ZstdCompressor(level=self.level)
        return cctx

    def _compressible(self, data: bytes | memoryview) -> bool:
        """Worth compressing? Eight 4 KiB samples spread over a large chunk
        are compressed first: random data (already compressed or encrypted
        files) is stored raw without compressing the whole chunk in vain."""
        n = len(data)
        if n < PROBE_MIN:
            return True
        step = n // PROBE_SAMPLES
        view = memoryview(data)
        sample = b"".join(view[i * step : i * step + PROBE_BYTES] for i in range(PROBE_SAMPLES))
        return len(self._cctx().compress(sample)) < len(sample) * PROBE_RATIO

    def decode(self, digest: bytes, blob: bytes | memoryview, expect: int) -> bytes:
        """The ``expect`` plain bytes of a chunk file; BadChunk if it is not the
        chunk ``digest`` names. Thread-safe."""
        sealed = unframe_chunk(blob, expect, self.keys.encrypted)
        try:
            payload = memoryview(self.keys.unseal(digest, sealed))
        except IOFailure:
            raise BadChunk("authentication failed (damaged, or sealed with another key)") from None
        if not len(payload):
            raise BadChunk("empty payload")
        kind, body = payload[0], payload[1:]
        if kind == KIND_ZSTD:
            dctx = getattr(self._tls, "dctx", None)
            if dctx is None:
                dctx = self._tls.dctx = zstandard.ZstdDecompressor()
            try:
                data = decompress(dctx, body, expect)
            except zstandard.ZstdError as exc:
                raise BadChunk(f"cannot decompress: {exc}") from None
        elif kind == KIND_RAW:
            data = bytes(body)
        else:
            raise BadChunk(f"unknown payload kind {kind}")
        if len(data) != expect:
            raise BadChunk(f"holds {len(data)} bytes, not {expect}")
        if self.keys.digest(data) != digest:
            raise BadChunk("digest mismatch")
        return data

    # -- store and fetch ---------------------------------------------------

    def touch(self, digest: bytes) -> bool:
        """Is the chunk present and whole (its size is what its header says)?
        If so its mtime becomes now (gc's grace rule: a chunk a running backup
        reuses is never old). A chunk file cut short counts as absent.
        Hold :meth:`shared`."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise from_oserror(exc, f"chunk {digest.hex()}") from None
        try:
            if chunk_file_size(os.pread(fd, CHUNK_HEADER.size, 0)) != os.fstat(fd).st_size:
                return False
            os.utime(fd)
            return True
        except OSError as exc:
            raise from_oserror(exc, f"chunk {digest.hex()}") from None
        finally:
            os.close(fd)

    def put(self, digest: bytes, blob: bytes) -> bool:
        """Store the chunk file ``blob`` under ``digest`` unless a whole one is
        there; True if this call stored it (durable after :meth:`flush`).
        Hold :meth:`shared`."""
        fan, name = chunk_name(digest)
        where = os.path.join(self.dir, fan)
        final = os.path.join(where, name)
        temp = os.path.join(where, f"{TEMP_PREFIX}{name[:16]}-{secrets.token_hex(6)}")
        try:
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                os.makedirs(where, mode=0o700, exist_ok=True)
                self._mark_dirty(self.dir)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                pwrite_full(fd, 0, blob)
            finally:
                os.close(fd)
            try:
                os.link(temp, final)
                stored = True
            except FileExistsError:
                if self.touch(digest):
                    stored = False  # stored meanwhile: the same content
                else:  # a file cut short by a power cut: replace it
                    os.rename(temp, final)
                    stored = True
            if stored:
                with self._dirty_lock:
                    self._dirty.add(where)
                    self._unsynced.append(final)
                    self.pending_bytes += len(blob)
        except OSError as exc:
            raise from_oserror(exc, f"store chunk {name}") from None
        finally:
            with suppress(OSError):
                os.unlink(temp)
        return stored

    def flush(self) -> None:
        """Make the chunks stored so far durable (data; :meth:`sync` does the
        directories)."""
        with self._dirty_lock:
            paths, self._unsynced = self._unsynced, []
            self.pending_bytes = 0
        if not paths:
            return
        try:
            with ThreadPoolExecutor(
                max_workers=min(FLUSH_THREADS, len(paths)), thread_name_prefix="blksnap-flush"
            ) as pool:
                list(pool.map(_fdatasync_path, paths))
        except OSError as exc:
            with self._dirty_lock:
                self._unsynced[:0] = paths
            raise from_oserror(exc, "flush the chunk store") from None

    def read(self, digest: bytes, expect: int) -> bytes:
        """The checked plain bytes of chunk ``digest`` (IOFailure naming it)."""
        path = self.path(digest)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise IOFailure(f"chunk {digest.hex()}: missing from the repository") from None
        except OSError as exc:
            raise from_oserror(exc, f"chunk {digest.hex()}") from None
        try:
            return self.decode(digest, blob, expect)
        except BadChunk as exc:
            raise IOFailure(f"chunk {digest.hex()}: {exc}") from None

    def _mark_dirty(self, path: str) -> None:
        with self._dirty_lock:
            self._dirty.add(path)

    def sync(self) -> None:
        """fsync every directory chunks were linked into since the last call."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        try:
            for path in sorted(dirty, key=len, reverse=True):  # fan-outs before chunks/
                fsync_dir(path)
        except OSError as exc:
            with self._dirty_lock:
                self._dirty |= dirty
            raise from_oserror(exc, "fsync the chunk store") from None

    # -- locks -------------------------------------------------------------

    def _lock_fd(self) -> int:
        lock = getattr(self._tls, "lock", None)
        if lock is None:
            lock = self._tls.lock = _LockFile(os.path.join(self.root, CHUNK_LOCK))
        return lock.fd

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the chunk lock shared."""
        fd = self._lock_fd()
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        fd = self._lock_fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    # -- listing -----------------------------------------------------------

    def fanouts(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.dir) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise from_oserror(exc, self.dir) from None

    def entries(self, fan: str) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(os.path.join(self.dir, fan)) as it:
                yield from it
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise from_oserror(exc, os.path.join(self.dir, fan)) from None
