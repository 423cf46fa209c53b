"""NBD exports: a target (:mod:`blksnap.frontends.targets`) as one
connection serves it, and the table of exports the server looks names up in.

Exports are looked up by name in the engine whenever a client asks for one,
so nothing has to tell the server when devices or snapshots come and go.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from blksnap.engine.engine import Engine
from blksnap.errors import BlksnapError
from blksnap.frontends import targets
from blksnap.frontends.nbd.protocol import (
    CTX_ALLOCATION,
    CTX_DIRTY,
    NBD_ESHUTDOWN,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
    CommandError,
    run_extents,
    transmission_flags,
)
from blksnap.frontends.targets import BackupTarget, DeviceTarget, ImageTarget, Target

if TYPE_CHECKING:
    from blksnap.frontends.nbd.connection import Connection


class Export:
    """What one connection serves; I/O methods run in worker threads."""

    kind = ""

    def __init__(self, target: Target, readonly: bool) -> None:
        self.target = target
        self.name = target.name
        self.size = target.size
        self.readonly = readonly

    def flags(self, structured: bool) -> int:
        return transmission_flags(self.readonly, structured)

    def description(self) -> str:
        return self.target.description(self.readonly)

    def contexts(self) -> list[str]:
        return [CTX_ALLOCATION, CTX_DIRTY] if self.target.has_dirty_map() else [CTX_ALLOCATION]

    def gone(self) -> str:
        """What a client is told once the export went away."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise (ESHUTDOWN) if the export is gone. Cheap: runs on the loop."""
        if not self.target.alive():
            raise CommandError(NBD_ESHUTDOWN, self.gone())

    def read(self, offset: int, length: int) -> bytes:
        return self.target.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        self.target.write(offset, data, fua)

    def flush(self) -> None:
        self.target.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.target.trim(offset, length, fua)

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        """Zeros; ``unmap`` unless the client said ``NBD_CMD_FLAG_NO_HOLE``."""
        self.target.write_zeroes(offset, length, fua, unmap)

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents (length, flags) of a prefix of
        ``offset``..``offset+length``, at most ``limit``: holes read as
        zeros (``NBD_STATE_HOLE | NBD_STATE_ZERO``), data is flags 0."""
        return run_extents(self.target.allocation(offset, length, limit), STATE_HOLE | STATE_ZERO)

    def dirty(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """``qemu:dirty-bitmap:blksnap`` extents (length, flags) of a prefix
        of the range, at most ``limit``, at CBT block granularity."""
        return run_extents(self.target.dirty_ranges(offset, length, limit), STATE_DIRTY)


class DeviceExport(Export):
    """Device ``N``; writes go through its filter stack (CBT, COW)."""

    kind = "device"

    def __init__(self, target: DeviceTarget) -> None:
        super().__init__(target, readonly=False)

    def gone(self) -> str:
        return f"device {self.name} is no longer served"


class ImageExport(Export):
    """Image ``ID/N``, read-only unless the server was made with
    ``writable_images``."""

    kind = "image"

    def __init__(self, target: ImageTarget, readonly: bool) -> None:
        super().__init__(target, readonly=readonly)
        self.sid = target.sid

    def gone(self) -> str:
        return f"snapshot {self.sid} has been destroyed"


class BackupExport(Export):
    """A mounted backup ``backups/B/N``: always read-only."""

    kind = "backup"

    def __init__(self, target: BackupTarget) -> None:
        super().__init__(target, readonly=True)

    def gone(self) -> str:
        return f"{self.name} has been unmounted"


class Exports:
    """The exports of one server: lookups by name, the devices withdrawn
    while they are being removed, and the connections holding each device."""

    def __init__(self, engine: Engine, *, writable_images: bool = False) -> None:
        self.engine = engine
        self.writable_images = writable_images
        self._users: Counter[str] = Counter()
        self._withdrawn: set[str] = set()

    def lookup(self, name: str) -> Export | None:
        """The export ``name`` (``N`` or ``ID/N``), or None."""
        if not name or name in self._withdrawn:
            return None
        try:
            target = targets.lookup(self.engine, name)
        except BlksnapError:
            return None
        if isinstance(target, DeviceTarget):
            return DeviceExport(target)
        if isinstance(target, BackupTarget):
            return BackupExport(target)
        assert isinstance(target, ImageTarget)
        return ImageExport(target, readonly=not self.writable_images)

    def names(self) -> list[str]:
        return [n for n in targets.names(self.engine) if n not in self._withdrawn]

    @contextmanager
    def withdrawn(self, name: str) -> Iterator[None]:
        """While a device is being removed: no new client may open it."""
        self._withdrawn.add(name)
        try:
            yield
        finally:
            self._withdrawn.discard(name)

    def users(self, name: str) -> int:
        """Connections in transmission on device ``name``."""
        return self._users[name]

    def hold(self, conn: Connection, export: Export) -> None:
        """Count a connection entering transmission on a device, at once
        after the lookup (no await in between), so that a device removal
        never passes a client that is about to use it."""
        if isinstance(export, DeviceExport) and conn.held is None:
            conn.held = export.name
            self._users[export.name] += 1

    def release(self, conn: Connection) -> None:
        if conn.held is not None:
            self._users[conn.held] -= 1
            if not self._users[conn.held]:
                del self._users[conn.held]
            conn.held = None
