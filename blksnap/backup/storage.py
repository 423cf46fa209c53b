"""Where a repository keeps its bytes: one small interface, two implementations.

Everything of a repository (``REPO.json``, chunks, manifests, indexes, links)
is an *object* named by a key such as ``chunks/3f/3fa4...`` or
``backups/20261128T233805Z/dev-0.index``. :class:`Storage` is what the rest
of :mod:`blksnap.backup` asks of the place holding them:

* ``get``, ``get_range``: an object's bytes, or some of them (``ENOENT`` if
  absent);
* ``put``: make an object, or replace it, whole (a reader sees the old bytes
  or the new ones, never a mix);
* ``put_if_absent``: make an object unless one has that key (the chunk store
  stores each chunk once; a backup is published by one conditional put of
  its manifest);
* ``list``: the objects under a key prefix, with their size and the time
  they were last written by the store's own clock; ``list_dirs`` the names
  one level below a prefix;
* ``delete``; ``stat``; ``now`` (the store's clock, never the host's).

Two implementations: :class:`DirStorage`, a local directory (keys are
relative paths; ``put`` writes a temporary file and renames it,
``put_if_absent`` links one; fsync where asked, in batches for chunks), and
:class:`blksnap.backup.s3.S3Storage`, a bucket of an S3-compatible service
(``s3://BUCKET/PREFIX``); :mod:`blksnap.backup.backends` opens either by
its URL. What only a directory offers (``flock``, a rename of
a whole directory, a file system to ``syncfs``) is reached through
:attr:`Storage.local_path`; everything else is shared.

Every storage counts what it sends and receives (:class:`Traffic`): requests,
bytes up and down; the backup report shows them.
"""

from __future__ import annotations

import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass

from blksnap.errors import InvalidArgument, NotFound, from_oserror
from blksnap.fileio import fsync_dir, pwrite_full

#: Temporary files of a directory storage start with this (gc removes old ones).
TEMP_PREFIX = ".tmp-"
#: fdatasyncs in flight when a batch of objects is made durable (the file
#: system folds concurrent ones into few journal commits).
FLUSH_THREADS = 16


class NoBucket(NotFound):
    """The place itself is missing (an object store's bucket), not an object."""


@dataclass(frozen=True)
class Entry:
    """One object: its key, size in bytes, and when it was last written
    (seconds since the epoch, by the store's clock)."""

    key: str
    size: int
    mtime: float


class Traffic:
    """Requests made and bytes sent and received by a storage (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.retries = 0

    def count(self, requests: int = 1, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_sent += sent
            self.bytes_received += received

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def snapshot(self) -> TrafficCount:
        with self._lock:
            return TrafficCount(self.requests, self.bytes_sent, self.bytes_received, self.retries)


@dataclass(frozen=True)
class TrafficCount:
    requests: int
    bytes_sent: int
    bytes_received: int
    retries: int

    def since(self, before: TrafficCount) -> TrafficCount:
        return TrafficCount(
            self.requests - before.requests,
            self.bytes_sent - before.bytes_sent,
            self.bytes_received - before.bytes_received,
            self.retries - before.retries,
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Storage(ABC):
    """The objects of one repository (see the module docstring). Thread-safe."""

    #: Where it is, for messages and records: a path or ``s3://BUCKET/PREFIX``.
    url: str
    #: An object is whole or absent, even after a crash of the writer or a
    #: power cut (an object store). A directory may hold a file cut short.
    atomic_puts: bool = False
    #: The directory, for what only a local directory has (flock, rename of
    #: a directory, syncfs); None for an object store.
    local_path: str | None = None
    #: How many requests are worth having in flight at once.
    parallelism: int = 4

    def __init__(self) -> None:
        self.traffic = Traffic()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; NotFound if there is none."""

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end); NotFound if absent."""

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Make or replace the object, whole. ``durable=False``: it may be
        lost by a power cut until :meth:`flush` (a directory; an object
        store's puts are durable when they return)."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        """Make the object unless one has that key; True if this call made it."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[Entry]:
        """Every object whose key starts with ``prefix``, by key."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (which ends with ``/``) that
        hold objects: ``list_dirs("backups/")`` gives the backup ids."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (nothing if there is none)."""

    @abstractmethod
    def stat(self, key: str) -> Entry | None:
        """The object's entry, or None."""

    @abstractmethod
    def now(self) -> float:
        """The time by the store's own clock (what :attr:`Entry.mtime` uses)."""

    def touch(self, key: str) -> Entry | None:
        """The object's entry if it exists, its time renewed where that is
        cheap (a directory: ``utime``; an object store: a look only)."""
        return self.stat(key)

    def touch_head(self, key: str, length: int) -> tuple[Entry, bytes] | None:
        """:meth:`touch`, and the object's first ``length`` bytes; None if absent."""
        entry = self.touch(key)
        if entry is None:
            return None
        try:
            return entry, self.get_range(key, 0, length)
        except NotFound:
            return None  # removed since

    def flush(self, dirs: bool = False) -> None:  # noqa: B027 (no-op by default)
        """Make the puts made with ``durable=False`` durable (``dirs``: the
        directories they were made in too)."""

    def close(self) -> None:  # noqa: B027 (no-op by default)
        """Release what the storage holds (connections)."""


def check_key(key: str) -> str:
    """A key is relative, with ``/`` between non-empty parts, no ``.`` or ``..``."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"bad storage key {key!r}")
    return key


# ---------------------------------------------------------------------------
# a local directory


def _fdatasync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # removed since (gc: nothing named it)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class DirStorage(Storage):
    """A local directory: key ``a/b/c`` is the file ``ROOT/a/b/c`` (mode 0600,
    directories 0700). ``put`` writes ``.tmp-*`` beside the file and renames
    it; ``put_if_absent`` links it (``link`` fails if the name exists). With
    ``durable=True`` the file and its directory are fsynced before the call
    returns; with ``durable=False`` they are recorded and synced together by
    :meth:`flush` (an fsync per chunk costs a journal commit each)."""

    parallelism = 4

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.url = self.root
        self.local_path = self.root
        self._lock = threading.Lock()
        self._unsynced: list[str] = []
        self._dirty: set[str] = set()

    def path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{path}: no such file") from None
        except IsADirectoryError:
            raise NotFound(f"{path} is a directory") from None
        except OSError as exc:
            raise from_oserror(exc, path) from None
        self.traffic.count(received=len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{path}: no such file") from None
        except OSError as exc:
            raise from_oserror(exc, path) from None
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        finally:
            os.close(fd)
        self.traffic.count(received=len(data))
        return data

    def _temp(self, path: str) -> tuple[str, int]:
        where, name = os.path.split(path)
        temp = os.path.join(where, f"{TEMP_PREFIX}{name[:16]}-{secrets.token_hex(6)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return temp, os.open(temp, flags, 0o600)
        except FileNotFoundError:
            self._makedirs(where)
            return temp, os.open(temp, flags, 0o600)

    def _makedirs(self, where: str) -> None:
        parent = os.path.dirname(where)
        if not os.path.isdir(parent) and parent.startswith(self.root):
            self._makedirs(parent)
        with suppress(FileExistsError):
            os.mkdir(where, 0o700)
        with self._lock:
            self._dirty.add(parent)

    def _write(self, path: str, data: bytes | memoryview, durable: bool) -> str:
        temp, fd = self._temp(path)
        try:
            pwrite_full(fd, 0, data)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def _made(self, path: str, durable: bool) -> None:
        where = os.path.dirname(path)
        if durable:
            fsync_dir(where)
        else:
            with self._lock:
                self._unsynced.append(path)
                self._dirty.add(where)

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        path = self.path(key)
        try:
            temp = self._write(path, data, durable)
            try:
                os.rename(temp, path)
            except BaseException:
                with suppress(OSError):
                    os.unlink(temp)
                raise
            self._made(path, durable)
        except OSError as exc:
            raise from_oserror(exc, f"write {path}") from None
        self.traffic.count(sent=len(data))

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        path = self.path(key)
        try:
            temp = self._write(path, data, durable)
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
            finally:
                with suppress(OSError):
                    os.unlink(temp)
            self._made(path, durable)
        except OSError as exc:
            raise from_oserror(exc, f"write {path}") from None
        finally:
            self.traffic.count(sent=len(data))
        return True

    def list(self, prefix: str) -> Iterator[Entry]:
        # The deepest directory the prefix names whole, then a walk below it.
        head, _, _ = prefix.rpartition("/")
        base = os.path.join(self.root, *head.split("/")) if head else self.root
        yield from sorted(self._walk(base, head + "/" if head else "", prefix), key=lambda e: e.key)

    def _walk(self, path: str, key_prefix: str, want: str) -> Iterator[Entry]:
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise from_oserror(exc, path) from None
        for e in entries:
            key = key_prefix + e.name
            if e.is_dir(follow_symlinks=False):
                if (key + "/").startswith(want) or want.startswith(key + "/"):
                    yield from self._walk(e.path, key + "/", want)
            elif key.startswith(want):
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield Entry(key, st.st_size, st.st_mtime)

    def list_dirs(self, prefix: str) -> list[str]:
        path = os.path.join(self.root, *prefix.rstrip("/").split("/")) if prefix else self.root
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise from_oserror(exc, path) from None

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise from_oserror(exc, f"remove {path}") from None

    def stat(self, key: str) -> Entry | None:
        try:
            st = os.stat(self.path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise from_oserror(exc, self.path(key)) from None
        return Entry(key, st.st_size, st.st_mtime)

    def touch(self, key: str) -> Entry | None:
        found = self.touch_head(key, 0)
        return None if found is None else found[0]

    def touch_head(self, key: str, length: int) -> tuple[Entry, bytes] | None:
        """One open of the file: its time renewed, its size, its first bytes."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise from_oserror(exc, path) from None
        try:
            head = os.pread(fd, length, 0) if length else b""
            os.utime(fd)
            st = os.fstat(fd)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        finally:
            os.close(fd)
        if length:
            self.traffic.count(received=len(head))
        return Entry(key, st.st_size, st.st_mtime), head

    def now(self) -> float:
        """The mtime of a file made (and removed) in ``tmp/``: the clock of the
        file system holding the repository (it may be another machine's)."""
        where = os.path.join(self.root, "tmp")
        os.makedirs(where, mode=0o700, exist_ok=True)
        probe = os.path.join(where, f"clock-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_oserror(exc, f"read the clock of {self.root}") from None
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            with suppress(FileNotFoundError):  # a writer's begin may have cleaned tmp/
                os.unlink(probe)

    def flush(self, dirs: bool = False) -> None:
        with self._lock:
            paths, self._unsynced = self._unsynced, []
            dirty: set[str] = set()
            if dirs:
                dirty, self._dirty = self._dirty, set()
        try:
            if paths:
                with ThreadPoolExecutor(
                    max_workers=min(FLUSH_THREADS, len(paths)), thread_name_prefix="blksnap-flush"
                ) as pool:
                    list(pool.map(_fdatasync_path, paths))
            for path in sorted(dirty, key=len, reverse=True):  # deeper ones first
                with suppress(FileNotFoundError):
                    fsync_dir(path)
        except OSError as exc:
            with self._lock:
                self._unsynced[:0] = paths
                self._dirty |= dirty
            raise from_oserror(exc, f"sync {self.root}") from None


__all__ = [
    "TEMP_PREFIX",
    "DirStorage",
    "Entry",
    "NoBucket",
    "Storage",
    "Traffic",
    "TrafficCount",
    "check_key",
]
