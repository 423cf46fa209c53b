"""Targets: a device or a snapshot image as something a front-end serves.

A front-end (the FUSE files, the NBD exports) reads, writes, flushes, trims
and zeroes a target, asks it for its allocation and its dirty ranges, and
whether a write may wait; it never reaches into the engine's objects. A
target is looked up by name when a client opens it, and is checked for
being still the engine's (:meth:`Target.alive`) when the front-end cares:
a device removed, or a snapshot destroyed, leaves a dead target behind.

Names: ``N`` is device ``N``; ``ID/N`` is the image of device ``N`` in
snapshot ``ID``; ``backups/B/N`` is device ``N`` of backup ``B`` mounted by
``blksnap mount`` (a :class:`~blksnap.engine.source.View`, read-only)
(:func:`lookup`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from blksnap.engine import source as sources
from blksnap.engine.device import Device
from blksnap.engine.engine import Engine
from blksnap.engine.image import Image
from blksnap.errors import BlksnapError

#: Zero-filled piece used to zero image ranges.
_ZERO_PIECE = 1 << 20

#: One run of a range: (offset, length, state), in bytes.
Run = tuple[int, int, bool]


class Target:
    """What a front-end serves. I/O methods run in worker threads (or, for
    a write that cannot wait, on an event loop: :meth:`write_may_wait`)."""

    kind: ClassVar[str] = ""

    def __init__(self, engine: Engine, name: str, size: int) -> None:
        self.engine = engine
        self.name = name
        self.size = size

    @property
    def served(self) -> Any:
        """The engine object behind the target (a Device or an Image)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.size}B>"

    def alive(self) -> bool:
        """Is the target still the engine's? Cheap (a dictionary lookup)."""
        raise NotImplementedError

    def description(self, readonly: bool = False) -> str:
        """One line for a client to show (``readonly``: as it is served)."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        return self.served.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua``, durable when this returns."""
        self.served.write(offset, data)
        if fua:
            self.served.flush()

    def flush(self) -> None:
        self.served.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        """Zeros; ``unmap``: the space may be released."""
        raise NotImplementedError

    def write_may_wait(self, offset: int, length: int) -> bool:
        """Could a write submitted now wait on more than the page cache?"""
        return self.served.write_may_wait(offset, length)

    def allocation(self, offset: int, length: int, limit: int = 0) -> list[Run]:
        """Runs ``(offset, length, is_hole)`` of a prefix of the range, at
        most ``limit`` (0: no limit); a hole reads as zeros."""
        return self.served.allocation(offset, length, limit)

    def has_dirty_map(self) -> bool:
        """Does a CBT say which blocks changed (else all may have)?"""
        return True

    def dirty_ranges(self, offset: int, length: int, limit: int = 0) -> list[Run]:
        """Runs ``(offset, length, dirty)`` of a prefix of the range, at most
        ``limit``, at CBT block granularity (:meth:`CbtMap.changed_runs`)."""
        raise NotImplementedError


class DeviceTarget(Target):
    """Device ``N``: I/O goes through its filter stack (CBT, COW). Its dirty
    ranges are the blocks written since the last take (all, untracked)."""

    kind = "device"

    def __init__(self, engine: Engine, dev: Device) -> None:
        super().__init__(engine, dev.name, dev.size)
        self.dev = dev

    @property
    def served(self) -> Device:
        return self.dev

    def alive(self) -> bool:
        try:
            return self.engine.device(self.name) is self.dev
        except BlksnapError:
            return False

    def description(self, readonly: bool = False) -> str:
        return f"blksnap device {self.dev.name} (backing {self.dev.path})"

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.dev.discard(offset, length)
        if fua:
            self.dev.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self.dev.write_zeroes(offset, length, unmap=unmap)
        if fua:
            self.dev.flush()

    def has_dirty_map(self) -> bool:
        return self.engine.tracker_of(self.name) is not None

    def dirty_ranges(self, offset: int, length: int, limit: int = 0) -> list[Run]:
        trk = self.engine.tracker_of(self.name)
        if trk is None:  # nothing tracks it: every block may have changed
            return [(offset, length, True)] if length > 0 else []
        cbt = trk.cbt
        return cbt.changed_runs(offset, length, cbt.active - 1, live=True, limit=limit)


class ImageTarget(Target):
    """The image of device ``N`` in snapshot ``ID``. Its dirty ranges are
    the blocks changed since the previous take (frozen CBT number at least
    this take's ``changes_number``; image writes mark them too)."""

    kind = "image"

    def __init__(self, engine: Engine, sid: str, img: Image) -> None:
        super().__init__(engine, f"{sid}/{img.name}", img.size)
        self.sid = sid
        self.img = img

    @property
    def served(self) -> Image:
        return self.img

    def alive(self) -> bool:
        try:
            return self.engine.image(self.sid, self.img.name) is self.img
        except BlksnapError:
            return False

    def description(self, readonly: bool = False) -> str:
        info = self.img.cbt.info()
        return (
            f"snapshot image of {self.img.name} in snapshot {self.sid}"
            f"{' (read-only)' if readonly else ''}; CBT generation {info.generation_id}, "
            f"changes_number {info.changes_number}, block size {info.block_size}"
        )

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """A hint the image may ignore: its chunks stay as they are."""
        self.img.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        """Zeros written into the image's copies of the chunks."""
        zero = bytes(min(length, _ZERO_PIECE))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self.img.write(offset, zero if n == len(zero) else zero[:n])
            offset += n
        if fua:
            self.img.flush()

    def dirty_ranges(self, offset: int, length: int, limit: int = 0) -> list[Run]:
        cbt = self.img.cbt
        return cbt.changed_runs(offset, length, cbt.changes_number - 1, limit=limit)


class BackupTarget(Target):
    """A mounted backup ``backups/B/N``: read-only; zero chunks are holes;
    no CBT (every block may differ from anything)."""

    kind = "backup"
    #: Where mounted backups' sources are registered (:mod:`blksnap.engine.source`).
    PREFIX = "backups/"
    KEY_PREFIX = "mount/"

    def __init__(self, engine: Engine, key: str, view: sources.View) -> None:
        super().__init__(engine, self.PREFIX + key, view.size)
        self.key = key
        self.view = view

    @property
    def served(self) -> sources.View:
        return self.view

    def alive(self) -> bool:
        try:
            return sources.get(self.KEY_PREFIX + self.key) is self.view.source
        except BlksnapError:
            return False

    def description(self, readonly: bool = False) -> str:
        return f"{self.view.source.description} (read-only)"

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.view.write(offset, b"")  # EROFS

    def write_zeroes(self, offset: int, length: int, fua: bool = False, unmap: bool = True) -> None:
        self.view.write(offset, b"")  # EROFS

    def has_dirty_map(self) -> bool:
        return False

    def dirty_ranges(self, offset: int, length: int, limit: int = 0) -> list[Run]:
        return [(offset, length, True)] if length > 0 else []


def backup_target(engine: Engine, key: str) -> BackupTarget:
    """Mounted backup ``key`` (``B/N``; NotFound if not mounted)."""
    src = sources.get(BackupTarget.KEY_PREFIX + key)
    return BackupTarget(engine, key, sources.View(key, src))


def device_target(engine: Engine, name: str) -> DeviceTarget:
    """Device ``name`` (NotFound if there is none)."""
    return DeviceTarget(engine, engine.device(name))


def image_target(engine: Engine, sid: str, name: str) -> ImageTarget:
    """The image of device ``name`` in snapshot ``sid`` (NotFound if none)."""
    return ImageTarget(engine, sid, engine.image(sid, name))


def lookup(engine: Engine, name: str) -> Target:
    """``N`` (a device), ``ID/N`` (an image) or ``backups/B/N`` (a mounted
    backup); NotFound if there is none."""
    if name.startswith(BackupTarget.PREFIX):
        return backup_target(engine, name[len(BackupTarget.PREFIX) :])
    sid, slash, dname = name.partition("/")
    if slash:
        return image_target(engine, sid, dname)
    return device_target(engine, name)


def names(engine: Engine) -> list[str]:
    """The names of every device and every image, devices first."""
    out = [d.name for d in engine.devices()]
    for snap in engine.snapshot_collect():
        out += [f"{snap['id']}/{d['name']}" for d in snap["devices"] if d["image"]]
    n = len(BackupTarget.KEY_PREFIX)
    out += [
        BackupTarget.PREFIX + k[n:]
        for k in sources.registered()
        if k.startswith(BackupTarget.KEY_PREFIX)
    ]
    return out
