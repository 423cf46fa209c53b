"""The chunk store: every backup's chunks, once each, named by their digest.

``chunks/<first two hex digits>/<64 hex digits>``: a fan-out of 256
directories (a million chunks, a terabyte at 1 MiB, is about 4000 files a
directory; ext4's and xfs's hashed directories take far more), kept by a
:class:`blksnap.backup.storage.Storage` (a directory or an object store),
whose ``put_if_absent`` makes the store put-if-absent. In a directory a chunk
is written under a temporary name and linked to its name. Durability is
batched, not per chunk (an ``fdatasync`` per chunk costs a journal commit
each): the chunks stored since the last flush are synced together, in the
background as a backup goes and all of them before it publishes anything that names them
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
import fcntl
import os
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
    DIGEST,
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
from blksnap.backup.storage import Entry, Storage
from blksnap.errors import BlksnapError, IOFailure, NotFound, from_oserror

#: Chunks from this size on are probed before compression: PROBE_SAMPLES
#: slices of PROBE_BYTES; if they do not shrink below PROBE_RATIO of their
#: size, the chunk is stored raw.
PROBE_MIN = 256 * 1024
PROBE_SAMPLES = 8
PROBE_BYTES = 4096
PROBE_RATIO = 0.97


def syncfs(path: str) -> None:
    """Make everything written to the file system holding ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
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

    def __init__(self, storage: Storage, keys: Keys, compression: str, level: int = 1) -> None:
        self.storage = storage
        #: The repository directory (None in an object store): flock lives there.
        self.root = storage.local_path
        self.dir = os.path.join(self.root, CHUNKS) if self.root else f"{storage.url}/{CHUNKS}"
        self.keys = keys
        self.compression = compression
        self.level = level
        self._tls = threading.local()
        self._pending_lock = threading.Lock()
        #: Bytes of chunk files stored and not yet flushed.
        self.pending_bytes = 0
        self._zero_digests: dict[int, bytes] = {}
        #: Digests known present (an object store: listed when a backup
        #: begins, so that a chunk costs no request to look for), and whether
        #: that list is the whole store.
        self._known: set[bytes] | None = None
        self._known_whole = False

    def threads(self, local: int) -> int:
        """How many requests to keep in flight: ``local`` for a directory,
        at least the storage's own parallelism for an object store (each
        request waits on the network)."""
        local = max(1, local)
        return local if self.root else max(local, self.storage.parallelism)

    # -- names -------------------------------------------------------------

    @staticmethod
    def key(digest: bytes) -> str:
        """The storage key of chunk ``digest``."""
        fan, name = chunk_name(digest)
        return f"{CHUNKS}/{fan}/{name}"

    def path(self, digest: bytes) -> str:
        """Where chunk ``digest`` is: a file path, or its URL in an object store."""
        fan, name = chunk_name(digest)
        return os.path.join(self.dir, fan, name) if self.root else f"{self.dir}/{fan}/{name}"

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

    def preload(self, limit: int) -> int:
        """List the chunks present (a request per 1000) and look for chunks in
        that list instead of asking the storage for each: a chunk not in a
        whole list is put at once (put-if-absent still finds one stored
        since). At most ``limit`` digests are kept (about 150 bytes each);
        past that, chunks not listed are looked for one by one. Returns how
        many are known."""
        known: set[bytes] = set()
        whole = True

        def listing(first: str) -> list[bytes]:
            out = []
            for entry in self.storage.list(f"{CHUNKS}/{first}"):
                fan, _, name = entry.key[len(CHUNKS) + 1 :].partition("/")
                if len(name) == 2 * DIGEST and name.startswith(fan):
                    try:
                        out.append(bytes.fromhex(name))
                    except ValueError:
                        continue
            return out

        # One listing per first hex digit, several at once (a listing is
        # 1000 keys a request, one after the other).
        with ThreadPoolExecutor(self.threads(1), thread_name_prefix="blksnap-list") as pool:
            for digests in pool.map(listing, "0123456789abcdef"):
                known.update(digests)
                if len(known) >= limit:
                    whole = False
                    break
        self._known, self._known_whole = known, whole
        return len(known)

    def forget(self) -> None:
        """Stop using the list :meth:`preload` made."""
        self._known, self._known_whole = None, False

    def touch(self, digest: bytes) -> bool:
        """Is the chunk present and whole? If so its time is renewed where the
        storage makes that cheap (a directory: gc's grace rule, a chunk a
        running backup reuses is never old). A chunk file cut short (its size
        is not what its header says: a power cut in a directory) counts as
        absent. Hold :meth:`shared`."""
        known = self._known
        if known is not None:
            if digest in known:
                return True
            if self._known_whole:
                return False
        key = self.key(digest)
        if self.storage.atomic_puts:
            return self.storage.touch(key) is not None
        found = self.storage.touch_head(key, CHUNK_HEADER.size)
        return found is not None and chunk_file_size(found[1]) == found[0].size

    def put(self, digest: bytes, blob: bytes) -> bool:
        """Store the chunk file ``blob`` under ``digest`` unless a whole one is
        there; True if this call stored it (durable after :meth:`flush`).
        Hold :meth:`shared`."""
        key = self.key(digest)
        stored = self.storage.put_if_absent(key, blob, durable=False)
        if not stored and not self.storage.atomic_puts and not self.touch(digest):
            # a file cut short by a power cut: replace it
            self.storage.put(key, blob, durable=False)
            stored = True
        if stored:
            with self._pending_lock:
                self.pending_bytes += len(blob)
        known = self._known
        if known is not None:
            known.add(digest)
        return stored

    def flush(self) -> None:
        """Make the chunks stored so far durable (data; :meth:`sync` does the
        directories)."""
        with self._pending_lock:
            self.pending_bytes = 0
        self.storage.flush()

    def read(self, digest: bytes, expect: int) -> bytes:
        """The checked plain bytes of chunk ``digest`` (IOFailure naming it)."""
        try:
            blob = self.storage.get(self.key(digest))
        except NotFound:
            raise IOFailure(f"chunk {digest.hex()}: missing from the repository") from None
        except BlksnapError as exc:
            raise IOFailure(f"chunk {digest.hex()}: {exc.message}") from None
        try:
            return self.decode(digest, blob, expect)
        except BadChunk as exc:
            raise IOFailure(f"chunk {digest.hex()}: {exc}") from None

    def sync(self) -> None:
        """Make the directories chunks were linked into durable too."""
        self.storage.flush(dirs=True)

    # -- locks -------------------------------------------------------------

    def _lock_fd(self) -> int:
        lock = getattr(self._tls, "lock", None)
        if lock is None:
            assert self.root is not None
            lock = self._tls.lock = _LockFile(os.path.join(self.root, CHUNK_LOCK))
        return lock.fd

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the chunk lock shared (a directory; an object store has no
        lock: gc and backups there follow the rules of
        :mod:`blksnap.backup.objects`)."""
        if self.root is None:
            yield
            return
        fd = self._lock_fd()
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if self.root is None:
            yield
            return
        fd = self._lock_fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    # -- listing -----------------------------------------------------------

    def fanouts(self) -> list[str]:
        return self.storage.list_dirs(CHUNKS + "/")

    def entries(self, fan: str) -> Iterator[Entry]:
        """The objects of fan-out directory ``fan`` (keys relative to the storage)."""
        return self.storage.list(f"{CHUNKS}/{fan}/")
