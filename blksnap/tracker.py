"""The ``blksnap`` filter: change-block tracking on every write, and
copy-on-write into the diff area while a snapshot of the device is taken.

Like the kernel module's, its control commands (``ctl``) are the way in:
``cbtinfo``, ``cbtmap``, ``markdirty``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cbt import CbtMap
from .errors import Busy
from .filters import WRITE_OPS, Bio, Filter, FilterResult

if TYPE_CHECKING:
    from .device import Device
    from .diff_area import DiffArea

ALTITUDE_BLKSNAP = 0


class Tracker(Filter):
    name = "blksnap"
    altitude = ALTITUDE_BLKSNAP

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        super().__init__(device, opts)
        self.cbt = CbtMap(device.size, device.params)
        #: The snapshot holding this device, while there is one.
        self.snapshot_id: str | None = None
        #: Set while a taken snapshot needs copy-on-write.
        self.diff_area: DiffArea | None = None

    def submit(self, bio: Bio) -> FilterResult:
        if bio.op in WRITE_OPS:
            self.cbt.mark(bio.offset, bio.length)
            diff_area = self.diff_area
            if diff_area is not None:
                diff_area.cow(bio.offset, bio.length)
        return FilterResult.PASS

    def detach(self) -> None:
        if self.snapshot_id is not None:
            raise Busy(f"{self.device.name} is in snapshot {self.snapshot_id}")

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        if cmd == "cbtinfo":
            return self.cbt.info()
        if cmd == "cbtmap":
            return self.cbt.read_map_bytes()
        if cmd == "markdirty":
            for offset, length in arg:
                self.cbt.mark_both(offset, length)
            return None
        return super().ctl(cmd, arg)

    def check_capacity(self) -> None:
        """Before take: a device whose size changed starts a new generation."""
        size = self.device.backing.refresh_size()
        if self.cbt.capacity != size:
            self.cbt.resize(size)
