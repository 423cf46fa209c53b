"""Block-device filters, modelled on the kernel's blkfilter.

A filter sees every request (a :class:`Bio`) sent to a device before the
backing store does. Filters stack by *altitude*: the lowest altitude sees a
request first, and there is at most one filter per altitude. A filter's
:meth:`Filter.submit` answers with a :class:`FilterResult`:

``PASS``      hand the request to the next filter, then the backing store;
``SKIP``      the filter completed the request itself (``bio.result`` holds
              read data); nothing below it sees it;
``REPEAT``    call this filter again with the same request (it queued work
              that had to finish first);
``REDIRECT``  the filter changed ``bio.device``: start over on that device.

Requests a filter issues itself carry ``filtered=True`` and go straight to the
backing store, so they never re-enter any filter (the kernel's BIO_FILTERED);
or, with :meth:`Device.submit_below`, through the filters below the one
issuing them (a filter that completes a request itself and SKIPs, after
sending it down: the filters below still see it).

The altitudes of the filters blksnap brings, lowest (sees a request first)
to highest (sees it last, right above the backing store):

====  ==========  =========================================================
  10  flakey      a write it fails or drops reaches no filter below it: the
                  tracker never marks it, the snapshot never copies for it
  20  delay       holds requests for a while before anything below sees them
 100  blksnap     the tracker: CBT mark and copy-on-write for every write
                  that reaches it
 200  powercut    keeps the old contents of blocks written since the last
                  flush: sees exactly the writes that reach the store
 250  hydrate     serves the units of an instant restore not yet copied
                  from the backup, and copies them meanwhile: a write it
                  sees was tracked above it, its own copies are not
 300  migrate     mirrors every write that reaches the store to the new
                  storage: a write it mirrors was tracked once, above it
====  ==========  =========================================================

Filters of one's own take any altitude from 0 up not taken on the device.
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from blksnap import shortway
from blksnap.errors import AlreadyDone, Busy, Exists, InvalidArgument, NotFound, NotSupported

if TYPE_CHECKING:
    from blksnap.engine.device import Device


class Op(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


#: Operations that change data: the tracker marks and copies before them.
WRITE_OPS = frozenset((Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES))


class FilterResult(enum.Enum):
    PASS = "pass"
    SKIP = "skip"
    REPEAT = "repeat"
    REDIRECT = "redirect"


# The members as plain names: an attribute of an enum class costs as much
# as a dict lookup and a call, and the I/O path asks for them on every request.
PASS, SKIP, REPEAT, REDIRECT = (
    FilterResult.PASS, FilterResult.SKIP, FilterResult.REPEAT, FilterResult.REDIRECT
)  # fmt: skip
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = (
    Op.READ, Op.WRITE, Op.FLUSH, Op.DISCARD, Op.WRITE_ZEROES
)  # fmt: skip


@dataclass(slots=True)
class Bio:
    """One block request: byte ``offset`` and ``length`` on ``device``."""

    op: Op
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None
    device: Device | None = None
    #: Issued by a filter: skips every filter on its way down.
    filtered: bool = False
    #: Read data, filled by the backing store or by a filter that SKIPs.
    result: bytes | bytearray | None = None
    #: Free for filters to leave notes for each other.
    private: dict[str, Any] = field(default_factory=dict)
    #: Diff storage I/O on the device (:meth:`Device.submit_physical`): only
    #: filters that model the device itself see it.
    physical: bool = False


class Filter:
    """Base class of a filter. Subclasses set ``name`` and ``altitude``.

    ``__init__`` is the attach callback (it may refuse with a BlksnapError),
    ``detach`` is called before removal (it may refuse with ``Busy``),
    ``submit`` sees each request, ``ctl`` serves filter-specific commands.
    """

    name: ClassVar[str] = ""
    altitude: ClassVar[int] = 0
    #: One line on what the filter does (``blksnap filter list``).
    summary: ClassVar[str] = ""
    #: Its options (``attach --opt K=V``): name -> what it means.
    options: ClassVar[dict[str, str]] = {}
    #: Its control commands (``ctl``): name -> what it does.
    commands: ClassVar[dict[str, str]] = {}
    #: The filter stands for the device itself (a disk that fails, is slow,
    #: loses its write cache, moves), not for a watcher of its data: it also
    #: sees the diff storage I/O that snapshots send to the device below its
    #: tracker (:meth:`Device.submit_physical`).
    models_device: ClassVar[bool] = False
    #: Options that name a file or block device: the engine refuses one that
    #: a device it serves lives on (as it refuses to serve a file twice).
    path_options: ClassVar[tuple[str, ...]] = ()
    #: Under this filter the device reads what its backing store holds (it
    #: watches writes, or fails or delays requests, but never serves reads
    #: from elsewhere): only with every filter so does
    #: :meth:`Device.allocation` report the backing store's holes.
    reads_backing: ClassVar[bool] = False

    def __init__(self, device: Device, opts: dict[str, str]) -> None:
        self.device = device
        self.refuse_options(opts)

    @classmethod
    def refuse_options(cls, opts: dict[str, str]) -> None:
        """EINVAL for any option in ``opts`` (those left once a filter has
        taken its own)."""
        if opts:
            raise InvalidArgument(f"filter {cls.name!r} takes no option {sorted(opts)[0]!r}")

    @classmethod
    def prepare(cls, device: Device, opts: dict[str, str]) -> Any:
        """Work an attach needs that may do I/O, done before the device is
        drained for it (a file on the device itself would wait for the
        drain); what it returns is given to :meth:`prepared` (None: not
        called)."""
        return None

    def prepared(self, what: Any) -> None:
        """Right after ``__init__``, the device drained: what :meth:`prepare` made."""

    @classmethod
    def unprepare(cls, device: Device, what: Any) -> None:
        """The attach failed after :meth:`prepare` (in ``__init__``,
        :meth:`prepared` or joining the stack): release what it made (its
        open files above all). Called once, for a ``what`` not None."""

    def submit(self, bio: Bio) -> FilterResult:
        return FilterResult.PASS

    #: Every READ passes this filter untouched (:meth:`submit` returns
    #: PASS at once): the device reads its backing store the short way.
    passes_reads: ClassVar[bool] = False

    def pass_write(self, offset: int, length: int) -> bool:
        """The short way of a plain WRITE (no ``bio``; called with the gate
        held, outside ``no_wait``, when this is the device's only filter):
        do what :meth:`submit` would do for it and return True if that is
        all it needs (it then goes straight to the backing store), or do
        nothing and return False (it is sent through :meth:`submit`). Here:
        False, always."""
        return False

    def short_way(self) -> shortway.Grant:
        """What this filter, the device's only one, lets its compiled short
        way do (:meth:`Device.open_short_way`, :mod:`blksnap.shortway`).
        Asked with the device drained. Here: nothing (every request goes
        through :meth:`submit`)."""
        return shortway.NOTHING

    def write_may_wait(self, offset: int, length: int) -> bool:
        """Could a device write of ``offset``..``offset+length`` submitted
        now wait in this filter (for I/O of its own, a lock, a delay)? A
        front-end that must not block serves the write inline only when
        every filter says no (:meth:`Device.write_may_wait`). True unless a
        filter knows better: the ``blksnap`` tracker does."""
        return True

    def detach(self) -> None:
        """Called with the device drained, before the filter is removed.
        Here: what :meth:`keep_state` kept (or a region under
        :attr:`state_key`) is let go."""
        self.device.regions.drop(self.state_key)

    def ctl(self, cmd: str, arg: Any = None) -> Any:
        raise NotSupported(f"filter {self.name!r} has no command {cmd!r}")

    # -- state kept across a restart of blksnapd's worker ---------------------

    @property
    def state_key(self) -> str:
        """The region key of this filter's state on its device."""
        return f"filter/{self.device.name}/{self.name}"

    def keep_state(self, state: dict[str, Any]) -> None:
        """Keep ``state`` (JSON) where a process taking over finds it (with
        regions that outlive the process; nothing otherwise)."""
        self.device.regions.put_blob(self.state_key, json.dumps(state).encode())

    def kept_state(self) -> dict[str, Any] | None:
        """What :meth:`keep_state` kept for this filter, if anything."""
        blob = self.device.regions.get_blob(self.state_key)
        try:
            state = json.loads(blob) if blob else None
        except ValueError:
            return None
        return state if isinstance(state, dict) else None

    def status(self) -> dict[str, Any] | None:
        """A short account of the filter's state for ``device list``
        (None: nothing to say)."""
        return None


class FilterRegistry:
    """Filter classes known by name (the kernel's registered filter drivers)."""

    def __init__(self) -> None:
        self._by_name: dict[str, type[Filter]] = {}
        self._lock = threading.Lock()

    def register(self, cls: type[Filter]) -> None:
        if not cls.name or cls.altitude < 0:
            raise InvalidArgument("a filter needs a name and an altitude >= 0")
        with self._lock:
            if cls.name in self._by_name:
                raise Exists(f"filter {cls.name!r} is already registered")
            self._by_name[cls.name] = cls

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._by_name.pop(name, None) is None:
                raise NotFound(f"no filter named {name!r}")

    def get(self, name: str) -> type[Filter]:
        cls = self._by_name.get(name)
        if cls is None:
            raise NotFound(f"unknown filter {name!r} (known: {', '.join(sorted(self._by_name))})")
        return cls

    def names(self) -> list[str]:
        return sorted(self._by_name)


class FilterStack:
    """The filters attached to one device, ordered by altitude.

    Attach and detach swap in a new tuple, so :meth:`process` reads a stable
    list with no lock on the I/O path; the device is drained while they run.
    """

    def __init__(self) -> None:
        self._filters: tuple[Filter, ...] = ()

    def __iter__(self):
        return iter(self._filters)

    def __bool__(self) -> bool:
        return bool(self._filters)

    def find(self, name: str) -> Filter | None:
        for flt in self._filters:
            if flt.name == name:
                return flt
        return None

    def at(self, altitude: int) -> Filter | None:
        for flt in self._filters:
            if flt.altitude == altitude:
                return flt
        return None

    def check_attach(self, cls: type[Filter]) -> None:
        present = self.at(cls.altitude)
        if present is None:
            return
        if present.name == cls.name:
            raise AlreadyDone(f"filter {cls.name!r} is already attached")
        raise Busy(f"filter {present.name!r} holds altitude {cls.altitude}")

    def add(self, flt: Filter) -> None:
        self.check_attach(type(flt))
        self._filters = tuple(sorted((*self._filters, flt), key=lambda f: f.altitude))

    def check_detach(self, cls: type[Filter]) -> Filter:
        present = self.at(cls.altitude)
        if present is None:
            raise NotFound(f"no filter attached at the altitude of {cls.name!r}")
        if present.name != cls.name:
            raise InvalidArgument(
                f"the filter attached there is {present.name!r}, not {cls.name!r}"
            )
        return present

    def remove(self, flt: Filter) -> None:
        self._filters = tuple(f for f in self._filters if f is not flt)

    def process_below(self, above: Filter | None, bio: Bio) -> FilterResult:
        """:meth:`process` by the filters of higher altitude than ``above``
        (None: all); of a ``physical`` request, only by those that
        :attr:`~Filter.models_device`."""
        floor = -1 if above is None else above.altitude
        physical = bio.physical
        below = [
            f for f in self._filters if f.altitude > floor and (f.models_device or not physical)
        ]
        return _run(below, bio)

    def process(self, bio: Bio) -> FilterResult:
        return _run(self._filters, bio)


def _run(filters: Sequence[Filter], bio: Bio) -> FilterResult:
    """``bio`` through ``filters`` in order, until one does not PASS it."""
    for flt in filters:
        result = flt.submit(bio)
        while result is REPEAT:
            result = flt.submit(bio)
        if result is not PASS:
            return result
    return PASS
