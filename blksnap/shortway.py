"""The short way, compiled (``_shortway.c``): READ and WRITE requests of the
FUSE files of devices, and READs of images, served without the interpreter.

Python's share of a 4 KiB request is most of its cost (BENCHMARKS.md, "Block
layer": ~10 us of CPU a request in Python against ~8 us for the same loop
compiled, and one Python thread runs at a time). So blksnapd's FUSE reader
threads wait for requests in C (:func:`serve`, Python's lock let go), serve
there the reads and writes of a device whose filters ask nothing of them
but a CBT mark (or a check that the chunks are stored), and the reads of an
image whose chunks are not stored, and hand every other request to Python.

Two objects tie the C side to the engine and the session:

* a :class:`Way` per device and per image says what its requests may do in
  C (:class:`Grant`); the engine opens it only with it closed and drained,
  from the device's gate (:class:`blksnap.engine.gate.Gate`), which closes
  it first at every drain;
* a :class:`Nodes` table per FUSE file system says which way the requests
  of each file (its node id) take.

Built by ``make`` (``make setup``) with the machine's C compiler into
``blksnap/_shortway.so``; without it, or with ``BLKSNAP_SHORT_WAY=0`` in the
environment, :data:`LIB` is None and every request goes the long way (the
same results, at Python's speed). :data:`WHY_NOT` says why.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What a way lets through (``_shortway.c``: BS_READS, BS_WRITES, ...).
READS = 1
WRITES = 2
TRACKED = 4
STORED = 8
IMAGE = 16

SO_PATH = Path(__file__).with_name("_shortway.so")
SOURCE_PATH = Path(__file__).with_name("_shortway.c")

_p = ctypes.c_void_p
_u32, _u64, _i32 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


#: Each function's argument and result types.
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "bs_way_new": ([], _p),
    "bs_way_shut": ([_p], _u32),
    "bs_way_close": ([_p], None),
    "bs_way_open": (
        [_p, _u32, _i32, _u64, _u64, _p, _u32, _u64, _u32, _p, _p, _u32, _u64, _p, _p],
        None,
    ),
    "bs_way_mode": ([_p], _u32),
    "bs_way_counts": ([_p, ctypes.POINTER(_u64)], None),
    "bs_fence": ([], None),
    "bs_add64": ([_p, ctypes.c_int64], None),
    "bs_table_new": ([ctypes.c_uint], _p),
    "bs_table_free": ([_p], None),
    "bs_table_bind": ([_p, _u64, _p], ctypes.c_int),
    "bs_table_unbind": ([_p, _u64], None),
    "bs_turn_new": ([], _p),
    "bs_turn_free": ([_p], None),
    "bs_turn_give": ([_p], None),
    "bs_serve": (
        [ctypes.c_int, _p, ctypes.c_size_t, _p, _p, ctypes.POINTER(ctypes.c_int)],
        ctypes.c_ssize_t,
    ),
}
#: The calls that may wait, made with Python's lock let go (through
#: :data:`LIB`); every other goes through :data:`QUICK`.
_WAITING = ("bs_serve", "bs_way_close")


def _declare(lib: ctypes.CDLL, names: Any) -> None:
    for name in names:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _SIGNATURES[name]


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("BLKSNAP_SHORT_WAY", "1") == "0":
        return None, "BLKSNAP_SHORT_WAY=0 in the environment"
    if not SO_PATH.exists():
        return None, f"{SO_PATH} is not built (make setup builds it)"
    try:
        if SOURCE_PATH.exists() and SOURCE_PATH.stat().st_mtime > SO_PATH.stat().st_mtime:
            return None, f"{SO_PATH} is older than its source (make setup builds it again)"
        lib = ctypes.CDLL(str(SO_PATH))
    except OSError as exc:
        return None, f"{SO_PATH}: {exc}"
    _declare(lib, _WAITING)
    return lib, None


#: The compiled short way, or None (then :data:`WHY_NOT` says why).
LIB, WHY_NOT = _load()
#: The same library for the calls that return at once, made without letting
#: go of Python's lock: a call through :data:`LIB` lets it go, and taking it
#: back while other threads run Python waits for one of them to hand it over
#: (up to the 5 ms switch interval), which a take, a checkpoint or an image's
#: counters must not pay for a call of a microsecond. Only :func:`serve` and
#: the wait of :meth:`Way.close` go through :data:`LIB`.
QUICK: ctypes.PyDLL | None = None
if LIB is not None:
    QUICK = ctypes.PyDLL(str(SO_PATH))
    _declare(QUICK, (name for name in _SIGNATURES if name not in _WAITING))


def fence() -> None:
    """A full memory barrier, for Python code whose order the C side relies
    on (a CBT checkpoint: clear the durable marks, fence, copy the map)."""
    if QUICK is not None:
        QUICK.bs_fence()


def add64(address: int, n: int) -> None:
    """Add ``n`` to the int64 at ``address`` atomically (a counter the C
    side adds to as well)."""
    assert QUICK is not None
    QUICK.bs_add64(address, n)


def address(buf: bytearray) -> tuple[int, Any]:
    """The address of ``buf``'s bytes and the object that pins them (keep it
    as long as C may use the address: ``buf`` cannot be resized meanwhile)."""
    pin = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(pin), pin


@dataclass(frozen=True)
class Grant:
    """What a short way may do: ``mode`` (:data:`READS`, :data:`WRITES`,
    :data:`TRACKED`, :data:`STORED`, :data:`IMAGE`); ``cbt``: (write map
    address, block shift, blocks, active number, intent-durable bytes
    address or 0) for :data:`TRACKED`; ``chunks``: (chunk map address,
    chunk shift, capacity at take) for :data:`STORED` and :data:`IMAGE`;
    ``image``: (error word address, stats address: bytes read, reads) for
    :data:`IMAGE`; ``keep``: the objects that own those bytes."""

    mode: int
    cbt: tuple[int, int, int, int, int] | None = None
    chunks: tuple[int, int, int] | None = None
    keep: tuple[Any, ...] = ()
    image: tuple[int, int] | None = None


NOTHING = Grant(0)


class Way:
    """One device's or image's short way (closed when made)."""

    __slots__ = ("_keep", "ptr")

    def __init__(self) -> None:
        assert QUICK is not None
        ptr = QUICK.bs_way_new()
        if not ptr:
            raise MemoryError("no memory for a short way")
        #: Never freed: a reader thread may have looked it up just before
        #: its file was unbound (it finds it closed).
        self.ptr: int = ptr
        self._keep: tuple[Any, ...] = ()

    def close(self) -> None:
        """Close the way and wait until no request is inside (then the
        memory it was given may go)."""
        assert LIB is not None and QUICK is not None
        if QUICK.bs_way_shut(self.ptr):  # (requests inside: wait, Python's lock let go)
            LIB.bs_way_close(self.ptr)
        self._keep = ()

    def open(self, grant: Grant, fd: int, size: int, piece: int = 0) -> None:
        """Let ``grant`` through to ``fd`` (``size`` bytes; writes in pieces
        of ``piece``), holding what owns its addresses until the way is
        closed. Only with the way closed and drained."""
        assert QUICK is not None
        mode = grant.mode
        if mode & TRACKED and grant.cbt is None:
            raise ValueError("a tracked way needs its CBT map")
        if mode & (STORED | IMAGE) and grant.chunks is None:
            raise ValueError("a way under a snapshot needs its chunk map")
        if mode & IMAGE and (grant.image is None or mode & WRITES):
            raise ValueError("an image's way reads only, and needs its error word and stats")
        self._keep = grant.keep
        addr, shift, blocks, active, iok = grant.cbt or (0, 0, 0, 0, 0)
        cmap, cshift, capacity = grant.chunks or (0, 0, 0)
        error, stats = grant.image or (0, 0)
        QUICK.bs_way_open(self.ptr, mode, fd, size, piece, addr, shift, blocks, active, iok,
                        cmap, cshift, capacity, error, stats)  # fmt: skip

    @property
    def mode(self) -> int:
        assert QUICK is not None
        return int(QUICK.bs_way_mode(self.ptr))

    def counts(self) -> dict[str, int]:
        """Requests served in C so far (reads, writes) and READs/WRITEs of a
        bound handle given back to Python (``returned``)."""
        assert QUICK is not None
        out = (_u64 * 3)()
        QUICK.bs_way_counts(self.ptr, out)
        return {"reads": out[0], "writes": out[1], "returned": out[2]}


class Nodes:
    """FUSE node id -> way, for one FUSE file system (a device's file keeps
    its node id as long as it exists, and ids are never given out twice).
    Binding and unbinding are done by one thread at a time (the caller's
    lock); the reader threads read it lock-free. A node the table has no
    room for goes the long way.

    With it, the session's turn to serve requests in Python, one thread at
    a time (``_shortway.c``, struct bs_turn): :func:`serve` returns a
    request with the turn taken and gives it back when called again;
    :meth:`give` gives it back earlier (before a wait)."""

    BITS = 12

    def __init__(self) -> None:
        assert QUICK is not None
        ptr = QUICK.bs_table_new(self.BITS)
        turn = QUICK.bs_turn_new()
        if not ptr or not turn:
            QUICK.bs_table_free(ptr)
            QUICK.bs_turn_free(turn)
            raise MemoryError("no memory for a node table")
        self.ptr: int = ptr
        self.turn: int = turn
        self.bound: dict[int, Way] = {}

    def bind(self, nodeid: int, way: Way) -> bool:
        """Serve ``nodeid``'s reads and writes by ``way``; False if there is
        no room (they go the long way)."""
        assert QUICK is not None
        if QUICK.bs_table_bind(self.ptr, nodeid, way.ptr) != 0:
            return False
        self.bound[nodeid] = way
        return True

    def unbind(self, nodeid: int) -> None:
        assert QUICK is not None
        if self.bound.pop(nodeid, None) is not None:
            QUICK.bs_table_unbind(self.ptr, nodeid)

    def give(self) -> None:
        """Give the turn back if this thread holds it (``may_block``'s hook)."""
        assert QUICK is not None
        QUICK.bs_turn_give(self.turn)

    def free(self) -> None:
        """Only once no thread can be in :func:`serve` with it."""
        assert QUICK is not None
        ptr, self.ptr = self.ptr, 0
        turn, self.turn = self.turn, 0
        if ptr:
            QUICK.bs_table_free(ptr)
        if turn:
            QUICK.bs_turn_free(turn)


def serve(fd: int, buf: int, size: int, nodes: Nodes, reply_errno: Any) -> int:
    """Serve requests from ``fd`` in C until one is for Python (``_shortway.c``,
    ``bs_serve``): its length (in the ``size`` bytes at address ``buf``),
    the turn taken; 0 if a reply could not be sent (``reply_errno.value``:
    its errno); ``-errno`` if reading failed."""
    assert LIB is not None
    return int(LIB.bs_serve(fd, buf, size, nodes.ptr, nodes.turn, ctypes.byref(reply_errno)))
