"""The ``flakey`` filter: a device that fails now and then, as dm-flakey.

The device is *up* for ``up`` seconds, then *down* for ``down`` seconds,
and so on from the attach (both 0, the default: down until ``ctl up``).
``ctl up`` and ``ctl down`` hold it in that state whatever the intervals
say; ``ctl auto`` gives it back to them. While down, each of its ``mode``
features (a comma-separated list, changed at run time with ``ctl mode``):

``error_writes``    writes (and discards, write-zeroes, flushes) fail with EIO
``error_reads``     reads fail with EIO
``drop_writes``     writes are acknowledged and thrown away (flushes pass)
``corrupt_writes``  byte ``byte`` (1-based) of each write long enough is
                    replaced by ``value`` before it goes down
``corrupt_reads``   the same on the data each read returns

With no ``mode`` every request fails while down (dm-flakey without
features). At altitude 10 it sees requests before every other filter: a
write it fails or drops reaches neither the tracker (no CBT mark, no
copy-on-write) nor the backing store.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from blksnap.engine.filters import READ, SKIP, WRITE, WRITE_OPS, Bio, Filter, FilterResult, Op
from blksnap.errors import InvalidArgument, IOFailure

if TYPE_CHECKING:
    from blksnap.engine.device import Device

ALTITUDE_FLAKEY = 10
MODES = ("error_writes", "error_reads", "drop_writes", "corrupt_writes", "corrupt_reads")


def parse_modes(text: str) -> frozenset[str]:
    modes = frozenset(m.strip() for m in text.split(",") if m.strip())
    bad = sorted(modes - set(MODES))
    if bad:
        raise InvalidArgument(f"flakey: unknown mode {bad[0]!r} (modes: {', '.join(MODES)})")
    if "drop_writes" in modes and "error_writes" in modes:
        raise InvalidArgument("flakey: drop_writes and error_writes exclude each other")
    return modes or frozenset(("error_writes", "error_reads"))


def _seconds(opts: dict[str, str], key: str) -> float:
    try:
        value = float(opts.pop(key, "0"))
    except ValueError:
        raise InvalidArgument(f"flakey: {key} must be a number of seconds") from None
    if value < 0:
        raise InvalidArgument(f"flakey: {key} must be >= 0")
    return value


class Flakey(Filter):
    name = "flakey"
    altitude = ALTITUDE_FLAKEY
    reads_backing = True
    models_device = True
    summary = "fails, drops or corrupts requests while down, as dm-flakey"
    options = {
        "mode": "while down, comma-separated: "
        + ", ".join(MODES)
        + " (default: every request fails)",
        "up": "seconds up, then `down` seconds down, and so on (both 0: down until `ctl up`)",
        "down": "seconds down in each cycle",
        "byte": "the byte corrupted, 1-based (default 1)",
        "value": "its new value, 0-255 (default 0)",
    }
    commands = {
        "down": "down now, until `up` or `auto`",
        "up": "up now, until `down` or `auto`",
        "auto": "follow the up/down intervals again",
        "mode": "MODES: change what happens while down",
        "status": "state, mode and what was failed, dropped and corrupted",
    }

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        opts = dict(opts)
        self.modes = parse_modes(opts.pop("mode", ""))
        self.up_s = _seconds(opts, "up")
        self.down_s = _seconds(opts, "down")
        try:
            self.byte = int(opts.pop("byte", "1"))
            self.value = int(opts.pop("value", "0"))
        except ValueError:
            raise InvalidArgument("flakey: byte and value are integers") from None
        if self.byte < 1 or not 0 <= self.value <= 255:
            raise InvalidArgument("flakey: byte is >= 1 and value 0-255")
        super().__init__(device, opts)
        self.start = time.monotonic()
        #: "up"/"down" held by ctl, or None: the intervals decide.
        self.forced: str | None = None
        self.counts = {"failed": 0, "dropped": 0, "corrupted": 0}
        self._lock = threading.Lock()
        kept = self.kept_state()  # (a worker taking over: as it was left)
        if kept is not None:
            self.forced = kept.get("forced") if kept.get("forced") in ("up", "down") else None
            self.modes = parse_modes(",".join(kept.get("modes") or []))

    def is_down(self) -> bool:
        forced = self.forced
        if forced is not None:
            return forced == "down"
        cycle = self.up_s + self.down_s
        if cycle == 0:
            return True
        return (time.monotonic() - self.start) % cycle >= self.up_s

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def submit(self, bio: Bio) -> FilterResult:
        if not self.is_down():
            return FilterResult.PASS
        modes = self.modes
        op = bio.op
        if op is READ:
            if "error_reads" in modes:
                self._count("failed")
                raise IOFailure(f"{self.device.name}: flakey is down (read failed)")
            if "corrupt_reads" in modes:
                self.device.submit_below(self, bio)
                if bio.result is not None and len(bio.result) >= self.byte:
                    data = bytearray(bio.result)
                    data[self.byte - 1] = self.value
                    bio.result = data
                    self._count("corrupted")
                return SKIP
            return FilterResult.PASS
        if op in WRITE_OPS or op is Op.FLUSH:
            if "error_writes" in modes:
                self._count("failed")
                raise IOFailure(f"{self.device.name}: flakey is down ({op.name.lower()} failed)")
            if "drop_writes" in modes:
                if op is Op.FLUSH:
                    return FilterResult.PASS
                self._count("dropped")
                return SKIP
            if op is WRITE and "corrupt_writes" in modes and bio.length >= self.byte:
                data = bytearray(bio.data or b"")
                data[self.byte - 1] = self.value
                bio.data = data
                self._count("corrupted")
        return FilterResult.PASS

    def write_may_wait(self, offset: int, length: int) -> bool:
        return False  # it fails or passes at once, never waits

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        if cmd in ("down", "up"):
            self.forced = cmd
        elif cmd == "auto":
            self.start = time.monotonic()
            self.forced = None
        elif cmd == "mode":
            self.modes = parse_modes(str(arg or ""))
        elif cmd != "status":
            return super().ctl(cmd, arg)
        if cmd != "status":
            self.keep_state({"forced": self.forced, "modes": sorted(self.modes)})
        return self.status()

    def status(self) -> dict[str, Any]:
        return {
            "state": "down" if self.is_down() else "up",
            "forced": self.forced,
            "mode": sorted(self.modes),
            "up": self.up_s,
            "down": self.down_s,
            **self.counts,
        }
