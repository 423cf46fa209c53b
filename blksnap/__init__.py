"""blksnap: consistent snapshots of live block devices, with change-block
tracking, as a user-space block layer.

``blksnap.Engine`` is the in-process engine, ``blksnap.Client`` the same
operations over blksnapd's control socket; see shared/SPEC.md for the
contract and README.md for the tour. Names are imported on first use, so the
CLI starts without loading the engine (and numpy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blksnap.errors import (
    AlreadyDone,
    BlksnapError,
    Busy,
    Exists,
    InvalidArgument,
    IOFailure,
    NoSpace,
    NotFound,
    NotSupported,
)

__version__ = "0.1.0"

_LAZY = {
    "Bio": "blksnap.engine.filters",
    "CbtInfo": "blksnap.engine.cbt",
    "Client": "blksnap.control.client",
    "Device": "blksnap.engine.device",
    "Engine": "blksnap.engine.engine",
    "Event": "blksnap.engine.event_queue",
    "Filter": "blksnap.engine.filters",
    "FilterResult": "blksnap.engine.filters",
    "Image": "blksnap.engine.image",
    "Op": "blksnap.engine.filters",
    "Params": "blksnap.engine.params",
}

if TYPE_CHECKING:
    from blksnap.control.client import Client
    from blksnap.engine.cbt import CbtInfo
    from blksnap.engine.device import Device
    from blksnap.engine.engine import Engine
    from blksnap.engine.event_queue import Event
    from blksnap.engine.filters import Bio, Filter, FilterResult, Op
    from blksnap.engine.image import Image
    from blksnap.engine.params import Params


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blksnap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AlreadyDone",
    "Bio",
    "BlksnapError",
    "Busy",
    "CbtInfo",
    "Client",
    "Device",
    "Engine",
    "Event",
    "Exists",
    "Filter",
    "FilterResult",
    "IOFailure",
    "Image",
    "InvalidArgument",
    "NoSpace",
    "NotFound",
    "NotSupported",
    "Op",
    "Params",
    "__version__",
]
