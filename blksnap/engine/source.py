"""Sources: read-only data that lives elsewhere (a backup in a repository),
served as a file of its own or hydrated into a device.

The engine knows nothing of repositories: a :class:`Source` is whatever
gives the bytes of a fixed-size image in *units* (a backup's chunks), one
unit at a time, and says which units are all zeros without reading them.
blksnapd makes them (:mod:`blksnap.backup.source`) and registers them here
under a key; two things use them:

* a :class:`View` serves a source read-only (``<mount>/backups/B/N``, the
  NBD export ``backups/B/N``): reads come from the source, writes are
  refused (``EROFS``), zero units are holes for ``base:allocation``;
* the ``hydrate`` filter (:mod:`blksnap.engine.hydrate`) fills a device
  from a source while it is in use; its ``source=KEY`` option names the
  key (:func:`get`).

The registry is the process's: a source holds descriptors and a cache, and
is made again by a process taking over (its key is recorded by blksnapd).
"""

from __future__ import annotations

import errno as _errno
import threading

from blksnap.errors import BlksnapError, InvalidArgument, NotFound, error


class Source:
    """Read-only bytes in units of :attr:`unit` (the last may be short).

    Subclasses give :meth:`read_unit`, :meth:`is_zero`, :attr:`identity`
    and :meth:`close`; everything else is built on them. Thread-safe."""

    #: Bytes in all.
    size: int = 0
    #: Bytes per unit (the backup's chunk size).
    unit: int = 1
    #: One line for people (``backup B device N of /repo``).
    description: str = ""
    #: What names this source for good (a hydration map refuses another).
    identity: str = ""

    @property
    def count(self) -> int:
        return (self.size + self.unit - 1) // self.unit

    def unit_length(self, index: int) -> int:
        return min(self.unit, self.size - index * self.unit)

    def read_unit(self, index: int) -> bytes:
        """The bytes of unit ``index`` (``unit_length`` of them); EIO naming
        what failed."""
        raise NotImplementedError

    def is_zero(self, index: int) -> bool:
        """Is unit ``index`` known to be all zeros (never read to say so)?"""
        return False

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(
                f"{self.description}: read at {offset}+{length} is past its end ({self.size} bytes)"
            )
        if not length:
            return b""
        unit = self.unit
        first, last = offset // unit, (offset + length - 1) // unit
        if first == last:
            start = offset - first * unit
            if self.is_zero(first):
                return bytes(length)
            data = self.read_unit(first)
            return data if start == 0 and length == len(data) else data[start : start + length]
        parts: list[bytes] = []
        for i in range(first, last + 1):
            a = max(offset, i * unit) - i * unit
            b = min(offset + length, (i + 1) * unit) - i * unit
            if self.is_zero(i):
                parts.append(bytes(b - a))
            else:
                data = self.read_unit(i)
                parts.append(data if a == 0 and b == len(data) else data[a:b])
        return b"".join(parts)

    def zero_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs ``(offset, length, all_zero)`` covering the range, by unit."""
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        pos = offset
        while pos < end:
            i = pos // self.unit
            stop = min(end, (i + 1) * self.unit)
            zero = self.is_zero(i)
            if out and out[-1][2] == zero:
                o, n, _ = out[-1]
                out[-1] = (o, n + stop - pos, zero)
            else:
                out.append((pos, stop - pos, zero))
            pos = stop
        return out

    def close(self) -> None:
        """Release what it holds (descriptors, locks, the cache)."""


class View:
    """A source served read-only as a file: what front-ends call."""

    def __init__(self, key: str, source: Source) -> None:
        self.key = key
        self.source = source
        self.size = source.size

    def read(self, offset: int, length: int) -> bytes:
        return self.source.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise error(_errno.EROFS, f"backups/{self.key} is read-only")

    def flush(self) -> None:
        """Nothing to make durable."""

    def write_may_wait(self, offset: int, length: int) -> bool:
        return False

    def allocation(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int, bool]]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"backups/{self.key}: range past its end")
        runs = self.source.zero_runs(offset, length)
        return runs[:limit] if limit else runs


# -- the registry --------------------------------------------------------------

_SOURCES: dict[str, Source] = {}
_LOCK = threading.Lock()


def register(key: str, source: Source) -> None:
    with _LOCK:
        if key in _SOURCES:
            raise BlksnapError(f"a source {key!r} is already registered", _errno.EEXIST)
        _SOURCES[key] = source


def unregister(key: str) -> Source | None:
    """Remove ``key`` (its source is returned, not closed); None if unknown."""
    with _LOCK:
        return _SOURCES.pop(key, None)


def get(key: str) -> Source:
    with _LOCK:
        src = _SOURCES.get(key)
    if src is None:
        raise NotFound(f"no source {key!r} (the repository is opened by blksnapd first)")
    return src


def registered() -> list[str]:
    with _LOCK:
        return sorted(_SOURCES)
