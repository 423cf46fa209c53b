"""blksnap: consistent snapshots of live block devices, with change-block
tracking, as a user-space block layer.

``blksnap.Engine`` is the in-process engine; see shared/SPEC.md for the
contract and README.md for the tour.
"""

from .cbt import CbtInfo
from .device import Device
from .engine import Engine
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
from .event_queue import Event
from .filters import Bio, Filter, FilterResult, Op
from .image import Image
from .params import Params

__version__ = "0.1.0"

__all__ = [
    "AlreadyDone",
    "Bio",
    "BlksnapError",
    "Busy",
    "CbtInfo",
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
