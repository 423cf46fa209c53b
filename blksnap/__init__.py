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

from .errors import (
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
    "Bio": ".filters",
    "CbtInfo": ".cbt",
    "Client": ".client",
    "Device": ".device",
    "Engine": ".engine",
    "Event": ".event_queue",
    "Filter": ".filters",
    "FilterResult": ".filters",
    "Image": ".image",
    "Op": ".filters",
    "Params": ".params",
}

if TYPE_CHECKING:
    from .cbt import CbtInfo
    from .client import Client
    from .device import Device
    from .engine import Engine
    from .event_queue import Event
    from .filters import Bio, Filter, FilterResult, Op
    from .image import Image
    from .params import Params


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blksnap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
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
