"""The ``delay`` filter: a slow disk, as dm-delay.

Every read waits ``read_ms`` milliseconds and every write (discard,
write-zeroes) ``write_ms``, flushes ``flush_ms``, before anything below sees
it. The wait is in the request's own thread (it releases the GIL and lets
the front-end serve others), so a front-end with N threads serving one
device completes at most N delayed requests per delay.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from blksnap.engine.filters import READ, WRITE_OPS, Bio, Filter, FilterResult, Op
from blksnap.errors import InvalidArgument
from blksnap.fileio import may_block

if TYPE_CHECKING:
    from blksnap.engine.device import Device

ALTITUDE_DELAY = 20
#: Longest delay accepted: a request held longer looks like a hang.
MAX_MS = 60_000


class Delay(Filter):
    name = "delay"
    altitude = ALTITUDE_DELAY
    reads_backing = True
    models_device = True
    summary = "holds each request for a while before passing it on, as dm-delay"
    options = {
        "read_ms": "milliseconds added to each read (default 0)",
        "write_ms": "milliseconds added to each write, discard, write-zeroes (default 0)",
        "flush_ms": "milliseconds added to each flush (default 0)",
    }
    commands = {
        "set": "K=V[,K=V]: change read_ms, write_ms, flush_ms",
        "status": "the delays, and how many requests were held",
    }

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        opts = dict(opts)
        self.ms = {"read_ms": 0.0, "write_ms": 0.0, "flush_ms": 0.0}
        self._set(opts)
        super().__init__(device, opts)
        self.held = 0
        self._lock = threading.Lock()
        kept = self.kept_state()  # (a worker taking over: as it was left)
        if kept is not None:
            self._set({k: str(v) for k, v in kept.items() if k in self.ms})

    def _set(self, opts: dict[str, str]) -> None:
        new = dict(self.ms)
        for key in list(opts):
            if key in new:
                try:
                    value = float(opts.pop(key))
                except ValueError:
                    raise InvalidArgument(f"delay: {key} must be a number") from None
                if not 0 <= value <= MAX_MS:
                    raise InvalidArgument(f"delay: {key} must be 0-{MAX_MS}")
                new[key] = value
        self.ms = new

    def submit(self, bio: Bio) -> FilterResult:
        op = bio.op
        if op is READ:
            ms = self.ms["read_ms"]
        elif op in WRITE_OPS:
            ms = self.ms["write_ms"]
        elif op is Op.FLUSH:
            ms = self.ms["flush_ms"]
        else:
            ms = 0.0
        if ms:
            may_block()
            time.sleep(ms / 1000)
            with self._lock:
                self.held += 1
        return FilterResult.PASS

    def write_may_wait(self, offset: int, length: int) -> bool:
        return bool(self.ms["write_ms"])

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        if cmd == "set":
            opts = {}
            for part in str(arg or "").split(","):
                key, sep, value = part.partition("=")
                if not sep or key.strip() not in self.ms:
                    raise InvalidArgument(f"delay set: want K=V with K in {', '.join(self.ms)}")
                opts[key.strip()] = value.strip()
            self._set(opts)
            self.keep_state(dict(self.ms))
        elif cmd != "status":
            return super().ctl(cmd, arg)
        return self.status()

    def status(self) -> dict[str, Any]:
        return {**self.ms, "held": self.held}
