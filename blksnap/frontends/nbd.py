"""NBD front-end: devices and snapshot images as exports of an NBD server.

Written from the protocol document (``doc/proto.md`` of the NBD project).
What this server speaks:

* fixed newstyle handshake (``NBD_FLAG_FIXED_NEWSTYLE``, ``NBD_FLAG_NO_ZEROES``);
  options ``EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``, ``GO``,
  ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and ``SET_META_CONTEXT``;
  anything else gets ``NBD_REP_ERR_UNSUP`` (so ``STARTTLS`` too: no TLS);
* commands ``READ``, ``WRITE``, ``FLUSH``, ``TRIM``, ``WRITE_ZEROES``,
  ``BLOCK_STATUS`` and ``DISC``; simple replies, or structured replies once
  negotiated (one data chunk per read, error chunks with a message, one
  block status chunk per selected meta context);
* block size constraints are the protocol's defaults (minimum 1, preferred
  4096, maximum payload 32 MiB), advertised when a client asks.

Exports, looked up by name in the engine whenever a client asks for one, so
nothing has to tell the server when devices or snapshots come and go:

* ``N``: device ``N``. Writes go through its filter stack (CBT, COW).
* ``ID/N``: the image of device ``N`` in snapshot ``ID``, from take until
  destroy; read-only unless the server was made with ``writable_images``.
  A client still connected when the snapshot is destroyed gets
  ``NBD_ESHUTDOWN`` on every request after that (the protocol's word for
  "this export is going away": the client is to disconnect).

``TRIM`` deallocates (a hole punched in a file backing store, BLKZEROOUT
on a block device); ``WRITE_ZEROES`` may too unless the client says
``NO_HOLE``. On an image, ``TRIM`` is a hint it ignores and ``WRITE_ZEROES``
writes zeros into the image's copies of the chunks.

Meta contexts: ``base:allocation`` (holes of the backing store, which read
as zeros: ``NBD_STATE_HOLE | NBD_STATE_ZERO``; on an image, chunks still on
the device are as the device's backing store says, chunks in diff storage
are data) and ``qemu:dirty-bitmap:blksnap`` (bit 0 ``NBD_STATE_DIRTY``), at CBT block
granularity, runs merged, clipped to the request:

* on an image taken at take *k*: the blocks whose frozen CBT number (read
  map) is at least ``changes_number(k)``, i.e. greater than the previous
  take's: changed since the previous snapshot of that device (image writes
  and ``markdirtyblock`` mark the read map too);
* on a device: the blocks of the live write map that carry the active
  number: changed since the last take (everything, without a tracker).

As with ``readcbtmap``, a consumer must compare ``generation_id``
(``blksnap cbtinfo``) with the one of its last backup before trusting the
bitmap; the export description (``nbdinfo``) names it too.

The server runs on the daemon's trio loop, which negotiates; in
transmission a thread of the connection reads the requests. Reads and
writes that are quick (the page cache) are served start to finish (engine
call and reply) by that thread, since handing a request over to another
thread costs more than a 256 KiB read; slow ones (a disk), and the other
commands, go to a small shared pool of worker threads, so that several run
at once. The loop never blocks and never copies reply data. No thread ever
waits for a client to take a reply: what the socket cannot take now is
queued and sent by the loop as the client makes room, while that client's
requests stay counted in flight (so a client that stops reading stops being
served, alone). Replies may come out of order (the protocol allows it),
each one whole. Bad traffic is answered as the protocol says or the
connection is closed; it never takes the server or another client down.
Every such event is logged.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import logging
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from blksnap.engine.device import Device
from blksnap.engine.engine import Engine
from blksnap.engine.image import Image
from blksnap.engine.tracker import Tracker
from blksnap.errors import BlksnapError, InvalidArgument, error

log = logging.getLogger("blksnapd.nbd")

KiB = 1 << 10
MiB = 1 << 20

# -- protocol constants (doc/proto.md, "Values") ------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11
KNOWN_OPTIONS = frozenset(
    {
        OPT_EXPORT_NAME,
        OPT_ABORT,
        OPT_LIST,
        OPT_INFO,
        OPT_GO,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
    }
)

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9

# NBD_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured replies.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# Error values of the protocol.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Block status flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# -- limits of this server ------------------------------------------------------------

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * MiB
#: Strings (export names, queries, messages): the protocol's hard limit.
MAX_STRING = 4096
#: Option data this server reads into memory; more is refused (below).
MAX_OPTION_DATA = 64 * KiB
#: Larger option data is read and thrown away (the connection carries on with
#: NBD_REP_ERR_TOO_BIG) up to this; beyond it the client is deemed abusive and
#: the connection is closed.
MAX_OPTION_DISCARD = 16 * MiB
#: A block status chunk carries at most this many extents (the protocol's advice).
MAX_EXTENTS = 1 << 20
#: Requests of one connection served at once, and the payload bytes they may hold.
MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 64 * MiB
#: Worker threads serving requests, shared by every connection.
DEFAULT_THREADS = max(4, min(16, 2 * (os.cpu_count() or 2)))
#: Reads (and writes) are served by the connection's reader thread while
#: they are quick, as from the page cache, where handing one to a worker
#: costs more than the read; while they are slow, as from a disk, workers
#: serve them, several at once. Slow: taking more than SLOW_IO seconds plus
#: a copy of the data at COPY_RATE. Each slow one adds 1 to a score, each
#: quick one takes 1 off (within 0..2*SLOW_SCORE); from SLOW_SCORE on, reads
#: go to the workers. So most recent ones must have been slow: a loaded
#: machine makes a few quick ones slow now and then.
SLOW_IO = 1e-3
COPY_RATE = 1 << 30
SLOW_SCORE = 8
#: Kernel send buffer of a connection in transmission.
SEND_BUFFER = 4 * MiB
#: Seconds a client may spend in the handshake.
HANDSHAKE_TIMEOUT = 60.0
#: Seconds the server waits at shutdown for requests in flight.
SHUTDOWN_GRACE = 10.0
#: Zero-filled piece used to zero image ranges.
_ZERO_PIECE = 1 * MiB

CTX_ALLOCATION = "base:allocation"
CTX_DIRTY = "qemu:dirty-bitmap:blksnap"
#: Filters under which a device reads what its backing store holds (they
#: watch writes, or fail or delay requests, but never serve reads from
#: elsewhere): only with these attached does ``base:allocation`` on a
#: device export report the backing store's holes. A filter that may serve
#: reads itself (migrate, an instant restore) makes it report all data.
BACKING_READ_FILTERS = frozenset(("blksnap",))
#: Context ids given out by NBD_OPT_SET_META_CONTEXT (fixed: they are opaque
#: to clients, and unique per context is all the protocol asks).
CONTEXT_IDS = {CTX_ALLOCATION: 1, CTX_DIRTY: 2}

OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
ERROR_PAYLOAD = struct.Struct(">IH")


# -- errors --------------------------------------------------------------------------


class OptionError(Exception):
    """An option that is answered with an error reply; negotiation goes on."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class CommandError(Exception):
    """A request that is answered with an NBD error value."""

    def __init__(self, nbd_errno: int, message: str) -> None:
        super().__init__(message)
        self.nbd_errno = nbd_errno
        self.message = message


class Hangup(Exception):
    """The connection is over: the client left."""


class Stopped(Exception):
    """The request reader was told to stop (shutdown, or replies lost)."""


class Violation(Hangup):
    """The client broke the protocol so that nothing it sends can be trusted
    any more: the server hangs up (a hard disconnect)."""


_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
    # The export went away under the client (snapshot destroyed, device removed).
    errno.ENOENT: NBD_ESHUTDOWN,
    errno.ENODEV: NBD_ESHUTDOWN,
    errno.EBADF: NBD_ESHUTDOWN,
}


def nbd_errno(err: int | None) -> int:
    """The protocol's error value for a system errno (EIO when it has none)."""
    return _ERRNO_TO_NBD.get(err or errno.EIO, NBD_EIO)


# -- addresses ----------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where the server listens: a Unix socket path, or a TCP host and port."""

    kind: str  # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return host in ("*", "")


def parse_address(spec: str, *, allow_any: bool = False) -> Address:
    """``unix:PATH``, ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT``.

    Without a host, the loopback address. A wildcard host (``0.0.0.0``,
    ``::``) only with ``allow_any``: the exports are raw disks.
    """
    spec = spec.strip()
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise InvalidArgument("--nbd unix: needs a socket path")
        return Address("unix", path=os.path.abspath(path))
    if "/" in spec:
        raise InvalidArgument(f"--nbd {spec!r}: a Unix socket is written unix:PATH")
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidArgument(f"--nbd {spec!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif ":" in spec:
        host, _, port_text = spec.rpartition(":")
        if ":" in host:
            raise InvalidArgument(f"--nbd {spec!r}: write IPv6 addresses as [ADDRESS]:PORT")
    else:
        host, port_text = "", spec
    try:
        port = int(port_text, 10)
    except ValueError:
        raise InvalidArgument(f"--nbd {spec!r}: bad port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"--nbd {spec!r}: port out of range")
    if not host:
        host = "127.0.0.1"
    elif is_wildcard(host) and not allow_any:
        raise InvalidArgument(
            f"--nbd {spec!r} would serve raw disks on every interface; "
            "name an address, or pass --nbd-any to really mean it"
        )
    return Address("tcp", host=host, port=port)


# -- pure protocol pieces ---------------------------------------------------------------


def decode_string(raw: bytes | bytearray | memoryview, what: str) -> str:
    """A protocol string: UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > MAX_STRING:
        raise OptionError(REP_ERR_TOO_BIG, f"{what} is longer than {MAX_STRING} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(REP_ERR_INVALID, f"{what} is not UTF-8") from None
    if "\0" in text:
        raise OptionError(REP_ERR_INVALID, f"{what} contains NUL")
    return text


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """The data of NBD_OPT_INFO / NBD_OPT_GO: export name and information requests."""
    if len(data) < 6:
        raise OptionError(REP_ERR_INVALID, "option data shorter than 6 bytes")
    (name_len,) = struct.unpack_from(">I", data, 0)
    if name_len > len(data) - 6:
        raise OptionError(REP_ERR_INVALID, "export name length runs past the option data")
    name = decode_string(data[4 : 4 + name_len], "export name")
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    if len(data) != 6 + name_len + 2 * count:
        raise OptionError(
            REP_ERR_INVALID, "number of information requests does not match the option length"
        )
    requests = list(struct.unpack_from(f">{count}H", data, 6 + name_len))
    return name, list(dict.fromkeys(requests))


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    if len(data) < 8:
        raise OptionError(REP_ERR_INVALID, "option data shorter than 8 bytes")
    (name_len,) = struct.unpack_from(">I", data, 0)
    if name_len > len(data) - 8:
        raise OptionError(REP_ERR_INVALID, "export name length runs past the option data")
    name = decode_string(data[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise OptionError(REP_ERR_INVALID, "query count runs past the option data")
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if qlen > len(data) - pos:
            raise OptionError(REP_ERR_INVALID, "query length runs past the option data")
        queries.append(decode_string(data[pos : pos + qlen], "query"))
        pos += qlen
    if pos != len(data):
        raise OptionError(REP_ERR_INVALID, "trailing bytes after the last query")
    return name, queries


def match_contexts(queries: Sequence[str], available: Sequence[str], *, listing: bool) -> list[str]:
    """The contexts of ``available`` that ``queries`` name.

    Listing: no query means every context, and a query ending in a colon is
    a wildcard over what follows (``base:``, ``qemu:``, ``qemu:dirty-bitmap:``).
    Selecting: only exact names select. Unknown namespaces are ignored; a
    query without a namespace is invalid.
    """
    if not queries:
        return list(available) if listing else []
    out: dict[str, None] = {}
    for q in queries:
        if ":" not in q or q.startswith(":"):
            raise OptionError(REP_ERR_INVALID, f"query {q!r} does not start with a namespace")
        for ctx in available:
            if ctx == q or (listing and q.endswith(":") and ctx.startswith(q)):
                out[ctx] = None
    return list(out)


def runs_to_extents(
    mask: np.ndarray,
    first_block: int,
    block_shift: int,
    offset: int,
    end: int,
    flag: int,
    *,
    limit: int = MAX_EXTENTS,
) -> list[tuple[int, int]]:
    """Extents (length, flags) of ``offset``..``end`` from one boolean per
    block (``mask[i]`` is block ``first_block + i``): runs of equal blocks
    merged, the first and last clipped to the range, ``flag`` where the mask
    holds, at most ``limit`` extents."""
    n = len(mask)
    if n == 0 or offset >= end:
        return []
    starts = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = ((starts + first_block) << block_shift).tolist()
    edges = [offset, *bounds, end]
    states = [bool(mask[0]), *mask[starts].tolist()]
    out: list[tuple[int, int]] = []
    for i, state in enumerate(states):
        a, b = edges[i], min(edges[i + 1], end)
        if b > a:
            out.append((b - a, flag if state else 0))
        if len(out) >= limit:
            break
    return out


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def error_chunk(cookie: int, nbd_err: int, message: str) -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_STRING]
    payload = ERROR_PAYLOAD.pack(nbd_err, len(msg)) + msg
    return (
        CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)
        )
        + payload
    )


def block_status_chunk(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool
) -> bytes:
    body = np.asarray(extents, dtype=">u4").tobytes()
    return (
        CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE if done else 0,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            4 + len(body),
        )
        + struct.pack(">I", context_id)
        + body
    )


# -- exports ------------------------------------------------------------------------


class Export:
    """What one connection serves; I/O methods run in worker threads."""

    kind = ""

    def __init__(self, name: str, size: int, readonly: bool) -> None:
        self.name = name
        self.size = size
        self.readonly = readonly

    def flags(self, structured: bool) -> int:
        f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
        if self.readonly:
            f |= FLAG_READ_ONLY
        else:
            f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        if structured:
            f |= FLAG_SEND_DF  # a read is always one data chunk
        return f

    def description(self) -> str:
        raise NotImplementedError

    def contexts(self) -> list[str]:
        return [CTX_ALLOCATION, CTX_DIRTY]

    def check(self) -> None:
        """Raise (ESHUTDOWN) if the export is gone. Cheap: runs on the loop."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        """Zeros; ``unmap`` unless the client said ``NBD_CMD_FLAG_NO_HOLE``."""
        raise NotImplementedError

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents (length, flags) of a prefix of
        ``offset``..``offset+length``, at most ``limit``: holes read as
        zeros (``NBD_STATE_HOLE | NBD_STATE_ZERO``), data is flags 0."""
        return [(length, 0)]

    @staticmethod
    def _state_extents(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
        hole = STATE_HOLE | STATE_ZERO
        return [(n, hole if is_hole else 0) for _off, n, is_hole in runs]

    def dirty_mask(self, offset: int, end: int) -> tuple[np.ndarray, int, int]:
        """Dirty flags of the CBT blocks under ``offset``..``end``: the flags,
        the number of the first block and the block shift."""
        raise NotImplementedError


class DeviceExport(Export):
    kind = "device"

    def __init__(self, engine: Engine, dev: Device) -> None:
        super().__init__(dev.name, dev.size, readonly=False)
        self.engine = engine
        self.dev = dev

    def description(self) -> str:
        return f"blksnap device {self.dev.name} (backing {self.dev.path})"

    def _tracker(self) -> Tracker | None:
        flt = self.dev.filters.find(Tracker.name)
        return flt if isinstance(flt, Tracker) else None

    def contexts(self) -> list[str]:
        return [CTX_ALLOCATION, CTX_DIRTY] if self._tracker() else [CTX_ALLOCATION]

    def check(self) -> None:
        try:
            alive = self.engine.device(self.name) is self.dev
        except BlksnapError:
            alive = False
        if not alive:
            raise CommandError(NBD_ESHUTDOWN, f"device {self.name} is no longer served")

    def read(self, offset: int, length: int) -> bytes:
        return self.dev.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        self.dev.write(offset, data)
        if fua:
            self.dev.flush()

    def flush(self) -> None:
        self.dev.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.dev.discard(offset, length)
        if fua:
            self.dev.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        self.dev.write_zeroes(offset, length, unmap=unmap)
        if fua:
            self.dev.flush()

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        # A hole of the backing store reads as zeros only if no filter serves
        # reads from elsewhere (a redirect, a hydration): else say data.
        if any(flt.name not in BACKING_READ_FILTERS for flt in self.dev.filters):
            return [(length, 0)]
        return self._state_extents(self.dev.backing.extents(offset, length, limit))

    def dirty_mask(self, offset: int, end: int) -> tuple[np.ndarray, int, int]:
        trk = self._tracker()
        if trk is None:  # nothing tracks it: every block may have changed
            shift = 16
            first, last = offset >> shift, (end - 1) >> shift
            return np.ones(last - first + 1, dtype=bool), first, shift
        cbt = trk.cbt
        active, wmap, shift = cbt.active, cbt.write_map, cbt.block_shift
        first, last = offset >> shift, (end - 1) >> shift
        return wmap[first : last + 1] == active, first, shift


class ImageExport(Export):
    kind = "image"

    def __init__(self, engine: Engine, sid: str, img: Image, readonly: bool) -> None:
        super().__init__(f"{sid}/{img.name}", img.size, readonly=readonly)
        self.engine = engine
        self.sid = sid
        self.img = img

    def description(self) -> str:
        info = self.img.cbt.info()
        return (
            f"snapshot image of {self.img.name} in snapshot {self.sid}"
            f"{' (read-only)' if self.readonly else ''}; CBT generation {info.generation_id}, "
            f"changes_number {info.changes_number}, block size {info.block_size}"
        )

    def check(self) -> None:
        try:
            alive = self.engine.image(self.sid, self.img.name) is self.img
        except BlksnapError:
            alive = False
        if not alive:
            raise CommandError(NBD_ESHUTDOWN, f"snapshot {self.sid} has been destroyed")

    def read(self, offset: int, length: int) -> bytes:
        return self.img.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        self.img.write(offset, data)
        if fua:
            self.img.flush()

    def flush(self) -> None:
        self.img.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """A hint the image may ignore: its chunks stay as they are."""
        self.img.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool, unmap: bool) -> None:
        zero = bytes(min(length, _ZERO_PIECE))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self.img.write(offset, zero if n == len(zero) else zero[:n])
            offset += n
        if fua:
            self.img.flush()

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        return self._state_extents(self.img.allocation(offset, length, limit))

    def dirty_mask(self, offset: int, end: int) -> tuple[np.ndarray, int, int]:
        cbt = self.img.cbt
        number, rmap, shift = cbt.changes_number, cbt.read_map, cbt.block_shift
        first, last = offset >> shift, (end - 1) >> shift
        return rmap[first : last + 1] >= number, first, shift


# -- one connection --------------------------------------------------------------------


class WorkerPool:
    """Threads that serve requests: engine call and reply, start to finish.

    A job is handed over through a queue, and nothing comes back to the
    event loop (``trio.to_thread.run_sync`` costs more CPU per call than a
    256 KiB image read). Quick reads and writes skip even this hand-over:
    the connection's reader serves them (see SLOW_IO).
    """

    def __init__(self, threads: int) -> None:
        self.size = threads
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"blksnap-nbd-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._jobs.put((fn, args))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except BaseException:  # a bug in a job must not kill the thread
                log.exception("NBD worker: job %r failed", fn)

    def stop(self) -> None:
        """Let the queued jobs finish, then end the threads (blocking)."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()


@dataclass(eq=False)
class Connection:
    """One client. The event loop receives in the handshake; in
    transmission a reader thread receives (request headers, write payloads)
    through :attr:`tx` (a duplicate of the socket, non-blocking, so it waits
    in poll(2)), and replies are sent by the thread that served the request
    through the same :attr:`tx` under :attr:`tx_lock`; what the socket has
    no room for is left in :attr:`out` for :meth:`flusher`, on the loop."""

    id: int
    stream: trio.SocketStream
    peer: str
    sock: Any = None
    structured: bool = False
    no_zeroes: bool = False
    export: Export | None = None
    #: Selected meta contexts (id -> name) and the export they were selected for.
    meta: dict[int, str] = field(default_factory=dict)
    meta_export: str | None = None
    flags: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closing: bool = False
    #: The request reader (a thread in transmission) is to stop taking requests.
    stopping: bool = False
    #: Set once a reply could not be sent: the connection is over.
    dead: bool = False
    tx: socket.socket | None = None
    tx_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Requests taken and not finished, and the payload bytes they hold;
    #: guarded by ``lock``. The reader thread waits on ``room_cond`` when
    #: there is no room; the loop waits on ``waiter`` (set from a worker
    #: through the trio token) for the last one at the end.
    lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: int = 0
    inflight_bytes: int = 0
    #: Recent reads and writes were slow, by this score (see SLOW_SCORE).
    slow: int = 0
    waiter: trio.Event | None = None
    #: The reader thread waits on this (with ``lock``) for room in flight.
    room_cond: threading.Condition | None = None
    room_waiting: bool = False
    token: Any = None
    #: The transmission is over on the loop's side (tx closes with the last request).
    finished: bool = False
    #: The device this connection holds open (device removal waits for it).
    held: str | None = None
    #: Replies the socket had no room for: (unsent views, payload bytes held),
    #: guarded by ``tx_lock``; the flusher waits on ``out_wake``.
    out: collections.deque[tuple[list[memoryview], int]] = field(default_factory=collections.deque)
    out_wake: trio.Event = field(default_factory=trio.Event)
    #: The flusher has been asked to send what is left over.
    flushing: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _pos: int = 0
    _scratch: memoryview | None = None
    #: The reader thread's wait for input: the socket and a pipe that
    #: :meth:`stop_reading` writes to.
    _poll: Any = None
    _wake: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.sock = self.stream.socket
        self.room_cond = threading.Condition(self.lock)

    def __str__(self) -> str:
        return f"nbd#{self.id} ({self.peer})"

    # -- receiving (the event loop) ------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> int:
        """Some bytes into ``view`` (0 at end of stream)."""
        return await self.sock.recv_into(view)

    def _take(self, got: int) -> None:
        """Append ``got`` bytes of the scratch buffer to the receive buffer."""
        if not got:
            raise Hangup("client closed the connection")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        assert self._scratch is not None
        self._buf += self._scratch[:got]

    async def _fill(self) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(256 * KiB))
        self._take(await self._recv_into(self._scratch))

    async def recv(self, n: int) -> bytes:
        """Exactly ``n`` bytes (small: headers, option data)."""
        while len(self._buf) - self._pos < n:
            await self._fill()
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    async def skip(self, n: int) -> None:
        """Read ``n`` bytes and throw them away."""
        have = min(len(self._buf) - self._pos, n)
        self._pos += have
        n -= have
        scratch = bytearray(min(n, 1 * MiB))
        view = memoryview(scratch)
        while n:
            got = await self._recv_into(view[: min(n, len(scratch))])
            if not got:
                raise Hangup("client closed the connection while sending data")
            n -= got

    # -- receiving in transmission (the reader thread) ---------------------------------------

    def recv_sync(self, view: memoryview) -> int:
        """Some bytes into ``view`` (0 at end of stream), waiting in poll(2)
        when none are there; :class:`Stopped` once :meth:`stop_reading` is
        called. The socket stays non-blocking (the workers share it)."""
        raw = self.tx
        assert raw is not None
        while True:
            if self.stopping:
                raise Stopped
            try:
                return raw.recv_into(view)
            except BlockingIOError:
                self._poll.poll()

    def fill_sync(self) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(256 * KiB))
        self._take(self.recv_sync(self._scratch))

    def recv_payload_sync(self, n: int) -> bytearray:
        """Exactly ``n`` bytes into a buffer of their own (write payloads)."""
        out = bytearray(n)
        have = min(len(self._buf) - self._pos, n)
        out[:have] = self._buf[self._pos : self._pos + have]
        self._pos += have
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        view = memoryview(out)
        while have < n:
            got = self.recv_sync(view[have:])
            if not got:
                raise Hangup(f"client closed the connection {n - have} bytes into a payload")
            have += got
        return out

    def skip_sync(self, n: int) -> None:
        """Read ``n`` bytes and throw them away."""
        have = min(len(self._buf) - self._pos, n)
        self._pos += have
        n -= have
        scratch = bytearray(min(n, 1 * MiB))
        view = memoryview(scratch)
        while n:
            got = self.recv_sync(view[: min(n, len(scratch))])
            if not got:
                raise Hangup("client closed the connection while sending data")
            n -= got

    def stop_reading(self) -> None:
        """Make the reader thread stop taking requests (any thread; idempotent)."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            if self.room_waiting:
                assert self.room_cond is not None
                self.room_cond.notify_all()
            if self._wake is not None:
                with suppress(OSError):
                    os.write(self._wake[1], b"x")

    # -- sending in the handshake (the event loop) ------------------------------------------

    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        views = [memoryview(p) for p in parts if len(p)]
        while views:
            sent = await self.sock.sendmsg(views)
            _advance(views, sent)

    async def option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self.send(option_reply(option, reply, data))

    async def option_error(self, option: int, reply: int, message: str) -> None:
        raw = message.encode("utf-8", "replace")[:MAX_STRING]
        await self.send(option_reply(option, reply, raw))

    # -- sending in transmission (worker threads) --------------------------------------------

    def start_transmission(self) -> None:
        self.tx = socket.socket(fileno=os.dup(self.sock.fileno()))
        # Room for a few whole replies in the kernel: fewer partial sends,
        # fewer wake-ups. FORCE needs CAP_NET_ADMIN (blksnapd runs as root).
        for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:
                self.tx.setsockopt(socket.SOL_SOCKET, opt, SEND_BUFFER)
                break
            except OSError:
                continue
        self.token = trio.lowlevel.current_trio_token()
        self._wake = os.pipe()
        self._poll = select.poll()
        self._poll.register(self.tx.fileno(), select.POLLIN)
        self._poll.register(self._wake[0], select.POLLIN)

    def kill(self) -> None:
        """Wake every thread blocked sending to this client, and fail them."""
        self.dead = True
        self.stop_reading()
        with self.lock:
            if self.tx is not None:
                with suppress(OSError):
                    self.tx.shutdown(socket.SHUT_RDWR)

    def end_transmission(self) -> None:
        """The loop is done with this connection; the last request in
        flight (or this call, if none is) closes the reply socket."""
        with self.lock:
            self.finished = True
            if not self.inflight and self.tx is not None:
                self.tx.close()
                self.tx = None
            wake, self._wake, self._poll = self._wake, None, None
        if wake is not None:
            for fd in wake:
                os.close(fd)

    # -- flow control between the reader (loop) and the workers ------------------------

    def try_room(self, nbytes: int) -> bool:
        """:meth:`room` without waiting: False if there is none now."""
        with self.lock:
            if self.inflight < MAX_INFLIGHT and (
                not self.inflight_bytes or self.inflight_bytes + nbytes <= MAX_INFLIGHT_BYTES
            ):
                self.inflight += 1
                self.inflight_bytes += nbytes
                return True
        return False

    def room_sync(self, nbytes: int) -> None:
        """Wait until one more request of ``nbytes`` payload may be in flight
        (the reader thread); :class:`Stopped` if told to stop meanwhile."""
        cond = self.room_cond
        assert cond is not None
        with cond:
            while True:
                if self.stopping:
                    raise Stopped
                if self.inflight < MAX_INFLIGHT and (
                    not self.inflight_bytes or self.inflight_bytes + nbytes <= MAX_INFLIGHT_BYTES
                ):
                    self.inflight += 1
                    self.inflight_bytes += nbytes
                    return
                self.room_waiting = True
                try:
                    cond.wait()
                finally:
                    self.room_waiting = False

    async def drained(self) -> None:
        """Wait until no request is in flight."""
        while True:
            with self.lock:
                if not self.inflight:
                    return
                event = self.waiter = trio.Event()
            await event.wait()

    def finish(self, nbytes: int, *, broken: bool = False) -> None:
        """A worker is done with a request (worker thread)."""
        with self.lock:
            self.inflight -= 1
            self.inflight_bytes -= nbytes
            event, self.waiter = self.waiter, None
            if self.room_waiting:
                assert self.room_cond is not None
                self.room_cond.notify()
            if self.finished and not self.inflight and self.tx is not None:
                self.tx.close()
                self.tx = None
        if broken:
            self.stop_reading()
        if event is not None:
            with suppress(trio.RunFinishedError):
                self.token.run_sync_soon(event.set)

    def _drain(self, done: list[int]) -> bool:
        """Send queued replies, oldest first, until the socket is full
        (``tx_lock`` held). Appends the payload bytes of each request now
        answered to ``done``; True if replies are left over."""
        tx, out = self.tx, self.out
        assert tx is not None
        while out:
            views, held = out[0]
            try:
                sent = tx.sendmsg(views)
            except BlockingIOError:
                return True
            _advance(views, sent)
            if not views:
                out.popleft()
                done.append(held)
        return False

    def send_reply(self, held: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Queue one whole reply (whole messages, in order) and send what the
        socket takes now, from a worker, never waiting for the client: what
        is left over goes out from :meth:`flusher` as the client makes room.
        A request ends (:meth:`finish`) when its reply is sent, so a client
        that does not read keeps its requests in flight, the reader stops
        taking more, and memory stays bounded."""
        views = [memoryview(p) for p in parts if len(p)]
        done: list[int] = []
        lost: OSError | None = None
        wake = False
        with self.tx_lock:
            if self.tx is None or self.dead:
                done.append(held)  # nobody to answer any more
            else:
                self.out.append((views, held))
                try:
                    left = self._drain(done)
                except OSError as exc:
                    lost, self.dead = exc, True
                    done += [h for _views, h in self.out]
                    self.out.clear()
                else:
                    if left and not self.flushing:
                        self.flushing = wake = True
        for h in done:
            self.finish(h, broken=lost is not None)
        if wake:
            with suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self.out_wake.set)
        if lost is not None:
            raise lost

    async def flusher(self) -> None:
        """Send the replies left over once the socket has room (the loop)."""
        tx = self.tx
        assert tx is not None
        while True:
            await self.out_wake.wait()
            self.out_wake = trio.Event()
            left = True
            while left:
                await trio.lowlevel.wait_writable(tx)
                done: list[int] = []
                with self.tx_lock:
                    try:
                        left = self._drain(done)
                    except OSError as exc:
                        if not self.dead:
                            log.info("%s: replies lost: %s", self, exc)
                        self.dead, left = True, False
                        done += [h for _views, h in self.out]
                        self.out.clear()
                    if not left:
                        self.flushing = False
                for h in done:
                    self.finish(h, broken=self.dead)

    def drop_queued(self) -> None:
        """Forget the replies that will never go out (their requests end)."""
        with self.tx_lock:
            dropped = [held for _views, held in self.out]
            self.out.clear()
        for held in dropped:
            self.finish(held)

    def msg_ok(self, cookie: int) -> tuple[bytes, ...]:
        return (SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie),)

    def msg_error(self, cookie: int, nbd_err: int, message: str) -> tuple[bytes, ...]:
        if self.structured:
            return (error_chunk(cookie, nbd_err, message),)
        return (SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, nbd_err, cookie),)

    def msg_data(self, cookie: int, offset: int, data: bytes) -> tuple[bytes, ...]:
        if not self.structured:
            return (SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data)
        if not data:  # nothing to describe: a bare "done"
            return (
                CHUNK_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0
                ),
            )
        head = OFFSET_DATA_HEADER.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + len(data),
            offset,
        )
        return (head, data)


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``views``."""
    while sent:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


@dataclass(slots=True)
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.cmd, f"command {self.cmd}")


#: The command flags each command takes (FUA and DF: if advertised).
_COMMAND_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}


# -- the server ----------------------------------------------------------------------


class NbdServer:
    def __init__(
        self,
        engine: Engine,
        address: Address,
        *,
        writable_images: bool = False,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self.engine = engine
        self.address = address
        self.writable_images = writable_images
        self.pool = WorkerPool(threads)
        self.connections: set[Connection] = set()
        self.listeners: list[trio.SocketListener] = []
        #: The addresses actually bound (a TCP port 0 becomes a real port).
        self.bound: list[str] = []
        self._ids = itertools.count(1)
        self._device_users: Counter[str] = Counter()
        self._withdrawn: set[str] = set()
        self._accepting = trio.CancelScope()
        self._closing = False
        self._serving = False
        self._done = trio.Event()
        self._unix_path: str | None = None

    # -- what the daemon sees -----------------------------------------------------------

    @property
    def address_text(self) -> str:
        return self.bound[0] if self.bound else str(self.address)

    def device_users(self, name: str) -> int:
        """Connections in transmission on device ``name``."""
        return self._device_users[name]

    @contextmanager
    def withdrawn(self, name: str) -> Iterator[None]:
        """While a device is being removed: no new client may open it."""
        self._withdrawn.add(name)
        try:
            yield
        finally:
            self._withdrawn.discard(name)

    # -- exports ----------------------------------------------------------------------

    def lookup(self, name: str) -> Export | None:
        sid, slash, dname = name.partition("/")
        try:
            if not slash:
                if not name or name in self._withdrawn:
                    return None
                return DeviceExport(self.engine, self.engine.device(name))
            img = self.engine.image(sid, dname)
        except BlksnapError:
            return None
        return ImageExport(self.engine, sid, img, readonly=not self.writable_images)

    def export_names(self) -> list[str]:
        names = [d.name for d in self.engine.devices() if d.name not in self._withdrawn]
        for snap in self.engine.snapshot_collect():
            names += [f"{snap['id']}/{d['name']}" for d in snap["devices"] if d["image"]]
        return names

    # -- listening ---------------------------------------------------------------------

    async def open(self) -> None:
        """Bind the listening socket(s); errors as :class:`BlksnapError`."""
        try:
            if self.address.kind == "unix":
                await self._open_unix(self.address.path)
            else:
                await self._open_tcp(self.address.host, self.address.port)
        except OSError as exc:
            for lst in self.listeners:
                await lst.aclose()
            self.listeners.clear()
            raise error(exc.errno or errno.EIO, f"NBD on {self.address}: {exc.strerror}") from None

    async def _open_unix(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(errno.EADDRINUSE, f"something answers on {path}")
            except ConnectionRefusedError:
                os.unlink(path)  # left behind by a server that died
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the exports are raw disks: owner only
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(128)
        self._unix_path = path
        self.listeners.append(trio.SocketListener(sock))
        self.bound.append(f"unix:{path}")

    async def _open_tcp(self, host: str, port: int) -> None:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if any(is_wildcard(info[4][0]) for info in infos) and not is_wildcard(host):
            raise OSError(errno.EINVAL, f"{host} resolves to a wildcard address")
        self.listeners = list(await trio.open_tcp_listeners(port, host=host, backlog=128))
        for lst in self.listeners:
            addr = lst.socket.getsockname()
            self.bound.append(join_host_port(addr[0], addr[1]))
        log.warning(
            "NBD on TCP %s: every local user who can reach it can read and write the "
            "exported disks (prefer unix:PATH)",
            ", ".join(self.bound),
        )

    def remove_socket(self) -> None:
        """Remove the Unix socket file (for a daemon that fails to start)."""
        if self._unix_path:
            with suppress(FileNotFoundError):
                os.unlink(self._unix_path)

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until :meth:`close`; then wait for them to finish."""
        if not self.listeners:
            await self.open()
        self._serving = True
        self.pool.start()
        try:
            async with trio.open_nursery() as conns:
                with self._accepting:
                    async with trio.open_nursery() as accept:
                        for lst in self.listeners:
                            accept.start_soon(self._accept_loop, lst, conns)
                        log.info("NBD server listening on %s", ", ".join(self.bound))
                        task_status.started()
                # No more clients: close() tells the connected ones to finish.
        finally:
            for lst in self.listeners:
                with suppress(Exception):
                    await lst.aclose()
            self.remove_socket()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.pool.stop)
            self._done.set()
            log.info("NBD server stopped")

    async def _accept_loop(self, listener: trio.SocketListener, conns: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: wait, then go on
                log.error("NBD accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            conns.start_soon(self._connection, stream)

    async def close(self) -> None:
        """Stop accepting; connections finish the requests in flight (for at
        most SHUTDOWN_GRACE seconds) and are closed."""
        if self._closing or not self._serving:
            self._closing = True
            if self._serving:
                await self._done.wait()
            return
        self._closing = True
        self._accepting.cancel()
        for conn in list(self.connections):
            conn.closing = True
            if conn.export is None:
                conn.scope.cancel()  # still negotiating: nothing in flight
            else:
                conn.stop_reading()
        with trio.move_on_after(SHUTDOWN_GRACE):
            while self.connections:
                await trio.sleep(0.01)
        for conn in list(self.connections):
            log.warning("%s: requests still running at shutdown; cancelled", conn)
            conn.kill()
            conn.scope.cancel()
        await self._done.wait()

    # -- a connection ---------------------------------------------------------------------

    def _peer(self, stream: trio.SocketStream) -> str:
        try:
            name = stream.socket.getpeername()
        except OSError:
            return "?"
        if isinstance(name, tuple):
            return join_host_port(name[0], name[1])
        if stream.socket.family == socket.AF_UNIX:
            with suppress(OSError):
                creds = stream.socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
                pid, uid, _gid = struct.unpack("3i", creds)
                return f"unix pid {pid} uid {uid}"
        return "unix"

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = Connection(next(self._ids), stream, self._peer(stream))
        self.connections.add(conn)
        try:
            async with stream:
                with conn.scope:
                    if self._closing:
                        return
                    log.debug("%s: connected", conn)
                    with trio.move_on_after(HANDSHAKE_TIMEOUT) as hs:
                        export = await self._handshake(conn)
                    if hs.cancelled_caught:
                        log.warning(
                            "%s: handshake not done in %gs; closed", conn, HANDSHAKE_TIMEOUT
                        )
                        return
                    if export is None:
                        return
                    conn.export = export
                    log.info(
                        "%s: export %r (%s, %d bytes, %s%s)",
                        conn,
                        export.name,
                        export.kind,
                        export.size,
                        "read-only" if export.readonly else "read-write",
                        ", structured replies" if conn.structured else "",
                    )
                    await self._transmission(conn)
        except Hangup as exc:
            log.info("%s: %s", conn, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("%s: connection lost: %s", conn, exc)
        except Exception:  # a bug: this connection ends, the server carries on
            log.exception("%s: crashed", conn)
        finally:
            self._release(conn)
            self.connections.discard(conn)
            log.debug("%s: closed", conn)

    # -- handshake -----------------------------------------------------------------------

    async def _handshake(self, conn: Connection) -> Export | None:
        """Fixed newstyle negotiation; the export chosen, or None to hang up."""
        await conn.send(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        (cflags,) = struct.unpack(">I", await conn.recv(4))
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            log.warning("%s: unknown client flags %#x; closed", conn, cflags)
            return None
        conn.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = OPTION_HEADER.unpack(await conn.recv(OPTION_HEADER.size))
            if magic != IHAVEOPT:
                log.warning("%s: bad option magic %#x; closed", conn, magic)
                return None
            if length > MAX_OPTION_DATA:
                if option == OPT_EXPORT_NAME or length > MAX_OPTION_DISCARD:
                    log.warning("%s: option %d with %d bytes of data; closed", conn, option, length)
                    return None
                log.warning("%s: option %d with %d bytes of data refused", conn, option, length)
                await conn.skip(length)
                if option in KNOWN_OPTIONS:
                    await conn.option_error(option, REP_ERR_TOO_BIG, "option data too large")
                else:
                    await conn.option_error(option, REP_ERR_UNSUP, f"option {option} unsupported")
                continue
            data = await conn.recv(length) if length else b""
            if option == OPT_EXPORT_NAME:
                return await self._opt_export_name(conn, data)
            if option == OPT_ABORT:
                with suppress(trio.BrokenResourceError, OSError):
                    await conn.option_reply(option, REP_ACK)
                log.debug("%s: client aborted the negotiation", conn)
                return None
            try:
                if self._closing:
                    raise OptionError(REP_ERR_SHUTDOWN, "server shutting down")
                if option in (OPT_INFO, OPT_GO):
                    export = await self._opt_info(conn, option, data)
                    if option == OPT_GO:
                        return export
                elif option == OPT_LIST:
                    await self._opt_list(conn, data)
                elif option == OPT_STRUCTURED_REPLY:
                    if data:
                        raise OptionError(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                    conn.structured = True
                    await conn.option_reply(option, REP_ACK)
                elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                    await self._opt_meta(conn, option, data)
                else:
                    log.info("%s: unsupported option %d", conn, option)
                    raise OptionError(REP_ERR_UNSUP, f"option {option} is not supported")
            except OptionError as exc:
                if exc.reply != REP_ERR_UNSUP:
                    log.info("%s: option %d refused: %s", conn, option, exc.message)
                await conn.option_error(option, exc.reply, exc.message)

    async def _opt_export_name(self, conn: Connection, data: bytes) -> Export | None:
        try:
            name = decode_string(data, "export name")
        except OptionError as exc:
            log.warning("%s: NBD_OPT_EXPORT_NAME: %s; closed", conn, exc.message)
            return None
        export = self.lookup(name)
        if export is None or self._closing:
            # This option cannot answer with an error: the protocol says hang up.
            log.info("%s: NBD_OPT_EXPORT_NAME %r: no such export; closed", conn, name)
            return None
        self._hold(conn, export)
        conn.flags = export.flags(conn.structured)
        self._select_meta(conn, export)
        await conn.send(
            struct.pack(">QH", export.size, conn.flags) + (b"" if conn.no_zeroes else bytes(124))
        )
        return export

    async def _opt_info(self, conn: Connection, option: int, data: bytes) -> Export | None:
        name, requests = parse_info_request(data)
        export = self.lookup(name)
        if export is None:
            raise OptionError(REP_ERR_UNKNOWN, f"no export named {name!r}")
        if option == OPT_GO:
            self._hold(conn, export)
        flags = export.flags(conn.structured)
        replies = [struct.pack(">HQH", INFO_EXPORT, export.size, flags)]
        if INFO_NAME in requests:
            replies.append(struct.pack(">H", INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in requests:
            text = export.description().encode("utf-8", "replace")[:MAX_STRING]
            replies.append(struct.pack(">H", INFO_DESCRIPTION) + text)
        if INFO_BLOCK_SIZE in requests:
            replies.append(
                struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD)
            )
        await conn.send(*(option_reply(option, REP_INFO, r) for r in replies))
        await conn.option_reply(option, REP_ACK)
        if option != OPT_GO:
            return None
        conn.flags = flags
        self._select_meta(conn, export)
        return export

    def _hold(self, conn: Connection, export: Export) -> None:
        """Count a connection entering transmission on a device, at once
        after the lookup (no await in between), so that a device removal
        never passes a client that is about to use it."""
        if isinstance(export, DeviceExport) and conn.held is None:
            conn.held = export.name
            self._device_users[export.name] += 1

    def _release(self, conn: Connection) -> None:
        if conn.held is not None:
            self._device_users[conn.held] -= 1
            if not self._device_users[conn.held]:
                del self._device_users[conn.held]
            conn.held = None

    def _select_meta(self, conn: Connection, export: Export) -> None:
        """Contexts selected for another export do not carry over."""
        if conn.meta_export != export.name:
            conn.meta = {}

    async def _opt_list(self, conn: Connection, data: bytes) -> None:
        if data:
            raise OptionError(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        names = self.export_names()
        msgs = []
        for name in names:
            raw = name.encode()
            msgs.append(option_reply(OPT_LIST, REP_SERVER, struct.pack(">I", len(raw)) + raw))
        msgs.append(option_reply(OPT_LIST, REP_ACK))
        await conn.send(*msgs)

    async def _opt_meta(self, conn: Connection, option: int, data: bytes) -> None:
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            conn.meta, conn.meta_export = {}, None  # replaced even if this fails
        if not conn.structured:
            raise OptionError(REP_ERR_INVALID, "negotiate structured replies first")
        name, queries = parse_meta_request(data)
        export = self.lookup(name)
        if export is None:
            raise OptionError(REP_ERR_UNKNOWN, f"no export named {name!r}")
        found = match_contexts(queries, export.contexts(), listing=not setting)
        msgs = []
        for ctx in found:
            ctx_id = CONTEXT_IDS[ctx] if setting else 0
            msgs.append(
                option_reply(option, REP_META_CONTEXT, struct.pack(">I", ctx_id) + ctx.encode())
            )
        msgs.append(option_reply(option, REP_ACK))
        if setting:
            conn.meta = {CONTEXT_IDS[ctx]: ctx for ctx in found}
            conn.meta_export = name
        await conn.send(*msgs)

    # -- transmission --------------------------------------------------------------------

    async def _transmission(self, conn: Connection) -> None:
        conn.start_transmission()
        done = trio.Event()
        outcome: list[BaseException] = []
        token = conn.token

        def reader() -> None:
            try:
                self._read_requests(conn)
            except Stopped:
                pass
            except BaseException as exc:  # handed to the loop
                outcome.append(exc)
            finally:
                with suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        thread = threading.Thread(target=reader, name=f"blksnap-nbd-conn-{conn.id}", daemon=True)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.flusher)
                thread.start()
                await done.wait()
                owed = True
                if outcome:
                    exc = outcome[0]
                    if isinstance(exc, Violation):  # hard disconnect: nothing more is owed
                        log.warning("%s: %s", conn, exc)
                        owed = False
                    elif isinstance(exc, Hangup):  # nobody left to answer
                        log.info("%s: %s", conn, exc)
                        owed = False
                    else:
                        raise exc
                if owed and not conn.dead:
                    if conn.closing:
                        log.info("%s: server shutting down; closing after requests in flight", conn)
                    # NBD_CMD_DISC or shutdown: answer what is in flight, then close.
                    await conn.drained()
                nursery.cancel_scope.cancel()
        finally:
            conn.kill()
            if thread.ident is not None:
                with trio.CancelScope(shield=True):
                    await done.wait()  # kill() wakes the reader wherever it waits
            conn.drop_queued()
            conn.end_transmission()

    def _read_requests(self, conn: Connection) -> None:
        """Take requests off the socket and hand them to the workers (the
        connection's reader thread). It waits for data (in poll(2)), for room
        (too much in flight), and for write payloads, never for a reply;
        :meth:`Connection.stop_reading` ends it."""
        size = REQUEST.size
        unpack_from = REQUEST.unpack_from
        submit = self.pool.submit
        serve = self._serve
        buf = conn._buf
        while True:
            if len(buf) - conn._pos < size:
                conn.fill_sync()
                continue
            magic, flags, cmd, cookie, offset, length = unpack_from(buf, conn._pos)
            conn._pos += size
            if magic != REQUEST_MAGIC:
                raise Violation(f"bad request magic {magic:#x}; hard disconnect")
            req = Request(flags, cmd, cookie, offset, length)
            if cmd == CMD_DISC:
                log.debug("%s: NBD_CMD_DISC", conn)
                return  # the requests in flight are finished before the close
            held = length if cmd in (CMD_READ, CMD_WRITE) and length <= MAX_PAYLOAD else 0
            if not conn.try_room(held):
                conn.room_sync(held)
            if cmd != CMD_WRITE:
                if cmd != CMD_READ:
                    submit(serve, conn, req, None, None, held)
                elif conn.slow < SLOW_SCORE:
                    self._serve_timed(conn, req, None, held)
                else:
                    submit(self._serve_timed, conn, req, None, held)
                continue
            if length > MAX_PAYLOAD:
                log.warning("%s: WRITE of %d bytes refused (max %d)", conn, length, MAX_PAYLOAD)
                refusal = CommandError(
                    NBD_EINVAL,
                    f"write of {length} bytes is over the maximum payload {MAX_PAYLOAD}",
                )
                try:
                    conn.skip_sync(length)
                except BaseException:
                    conn.finish(held)
                    raise
                submit(serve, conn, req, None, refusal, held)
                continue
            try:
                payload = conn.recv_payload_sync(length)
            except BaseException:
                conn.finish(held)
                raise
            if conn.slow < SLOW_SCORE:
                self._serve_timed(conn, req, payload, held)
            else:
                submit(self._serve_timed, conn, req, payload, held)

    def _validate(self, conn: Connection, req: Request) -> None:
        export = conn.export
        assert export is not None
        cmd, flags, offset, length = req.cmd, req.flags, req.offset, req.length
        allowed = _COMMAND_FLAGS.get(cmd)
        if allowed is None:
            raise CommandError(NBD_EINVAL, f"unknown command {cmd}")
        if conn.flags & FLAG_SEND_FUA:
            allowed |= CMD_FLAG_FUA
        if not conn.flags & FLAG_SEND_DF:
            allowed &= ~CMD_FLAG_DF
        if flags & ~allowed:
            raise CommandError(NBD_EINVAL, f"{req.name}: unsupported flags {flags & ~allowed:#x}")
        if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and export.readonly:
            raise CommandError(NBD_EPERM, f"export {export.name!r} is read-only")
        if cmd == CMD_FLUSH:
            return
        if cmd == CMD_READ and length > MAX_PAYLOAD:
            raise CommandError(
                NBD_EOVERFLOW if conn.structured else NBD_EINVAL,
                f"read of {length} bytes is over the maximum payload {MAX_PAYLOAD}",
            )
        if offset > export.size or length > export.size - offset:
            err = NBD_ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
            raise CommandError(
                err, f"{req.name} at {offset}+{length} is past the end ({export.size} bytes)"
            )
        if cmd == CMD_BLOCK_STATUS:
            if not conn.meta:
                raise CommandError(NBD_EINVAL, "no meta context was selected for this export")
            if length == 0:
                raise CommandError(NBD_EINVAL, "block status of an empty range")

    def _serve(
        self,
        conn: Connection,
        req: Request,
        payload: bytearray | None,
        refusal: CommandError | None,
        held: int,
    ) -> None:
        """One request, start to finish, in a worker thread: check it, do it,
        send the reply (or queue it, if the client is slow to take it)."""
        try:
            reply = self._serve_one(conn, req, payload, refusal)
        except BaseException:
            conn.finish(held)
            raise
        try:
            conn.send_reply(held, reply)
        except OSError as exc:  # the reply cannot go out: the client is gone
            log.info("%s: reply to %s lost: %s", conn, req.name, exc)

    def _serve_timed(
        self, conn: Connection, req: Request, payload: bytearray | None, held: int
    ) -> None:
        """:meth:`_serve` of a read or write, timed into ``conn.lag``."""
        start = time.perf_counter()
        self._serve(conn, req, payload, None, held)
        lag = time.perf_counter() - start - req.length / COPY_RATE
        if lag > SLOW_IO:
            conn.slow = min(conn.slow + 1, 2 * SLOW_SCORE)
        elif conn.slow:
            conn.slow -= 1

    def _serve_one(
        self,
        conn: Connection,
        req: Request,
        payload: bytearray | None,
        refusal: CommandError | None,
    ) -> Sequence[bytes]:
        """Do one request; its reply message."""
        export = conn.export
        assert export is not None
        cookie, offset, length = req.cookie, req.offset, req.length
        fua = bool(req.flags & CMD_FLAG_FUA)
        try:
            if refusal is not None:
                raise refusal
            self._validate(conn, req)
            export.check()
            cmd = req.cmd
            if cmd == CMD_READ:
                return conn.msg_data(cookie, offset, export.read(offset, length) if length else b"")
            if cmd == CMD_WRITE:
                if length:
                    assert payload is not None
                    export.write(offset, payload, fua)
            elif cmd == CMD_FLUSH:
                export.flush()
            elif cmd == CMD_TRIM:
                if length:
                    export.trim(offset, length, fua)
            elif cmd == CMD_WRITE_ZEROES:
                if length:
                    unmap = not req.flags & CMD_FLAG_NO_HOLE
                    export.write_zeroes(offset, length, fua, unmap)
            elif cmd == CMD_BLOCK_STATUS:
                req_one = bool(req.flags & CMD_FLAG_REQ_ONE)
                chunks = self._block_status(export, conn.meta, offset, length, req_one)
                export.check()  # destroyed while we looked: the map is not its own
                return [
                    block_status_chunk(cookie, ctx_id, ext, i == len(chunks) - 1)
                    for i, (ctx_id, ext) in enumerate(chunks)
                ]
            return conn.msg_ok(cookie)
        except CommandError as exc:
            level = logging.DEBUG if exc.nbd_errno == NBD_ESHUTDOWN else logging.INFO
            log.log(level, "%s: %s refused: %s", conn, req.name, exc.message)
            return conn.msg_error(cookie, exc.nbd_errno, exc.message)
        except BlksnapError as exc:
            err = nbd_errno(exc.errno)
            if exc.errno == errno.ENOENT:
                export_gone = f"export {export.name!r} is gone: {exc.message}"
                log.info("%s: %s failed: %s", conn, req.name, export_gone)
                return conn.msg_error(cookie, err, export_gone)
            log.warning("%s: %s at %d+%d failed: %s", conn, req.name, offset, length, exc)
            return conn.msg_error(cookie, err, str(exc))
        except Exception as exc:  # a bug: say so to this client, keep serving
            log.exception("%s: %s crashed", conn, req.name)
            return conn.msg_error(cookie, NBD_EIO, f"internal error: {exc!r}")

    @staticmethod
    def _block_status(
        export: Export, meta: dict[int, str], offset: int, length: int, req_one: bool
    ) -> list[tuple[int, list[tuple[int, int]]]]:
        end = offset + length
        out: list[tuple[int, list[tuple[int, int]]]] = []
        for ctx_id, ctx in sorted(meta.items()):
            if ctx == CTX_ALLOCATION:
                extents = export.allocation(offset, length, 1 if req_one else MAX_EXTENTS)
            else:
                mask, first, shift = export.dirty_mask(offset, end)
                blocks = ((end - 1) >> shift) - first + 1
                if len(mask) < blocks:  # a map shorter than the export: say dirty
                    mask = np.concatenate([mask, np.ones(blocks - len(mask), dtype=bool)])
                extents = runs_to_extents(
                    mask,
                    first,
                    shift,
                    offset,
                    end,
                    STATE_DIRTY,
                    limit=1 if req_one else MAX_EXTENTS,
                )
            out.append((ctx_id, extents))
        return out
