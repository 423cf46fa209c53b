"""The NBD protocol as this server speaks it: constants, wire structures,
errors, and pure functions that parse and encode messages (no sockets, no
engine: testable alone). Written from ``doc/proto.md`` of the NBD project;
the knobs of the server (payload and in-flight limits, threads, timeouts)
are :mod:`blksnap.settings` fields, not constants here.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blksnap.engine.cbt import mask_runs

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

# -- limits of the protocol -----------------------------------------------------------

#: Block size constraints advertised (the protocol's defaults); the maximum
#: payload is ``SETTINGS.nbd_max_payload``.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
#: Strings (export names, queries, messages): the protocol's hard limit.
MAX_STRING = 4096
#: A block status chunk carries at most this many extents (the protocol's advice).
MAX_EXTENTS = 1 << 20

CTX_ALLOCATION = "base:allocation"
CTX_DIRTY = "qemu:dirty-bitmap:blksnap"
#: Context ids given out by NBD_OPT_SET_META_CONTEXT (fixed: they are opaque
#: to clients, and unique per context is all the protocol asks).
CONTEXT_IDS = {CTX_ALLOCATION: 1, CTX_DIRTY: 2}

GREETING = struct.Struct(">QQH")
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
    return run_extents(mask_runs(mask, first_block, block_shift, offset, end, limit), flag)


def run_extents(runs: Sequence[tuple[int, int, bool]], flag: int) -> list[tuple[int, int]]:
    """Block status extents (length, flags) of runs ``(offset, length,
    state)`` (a target's allocation or dirty ranges): ``flag`` where the
    state holds, 0 elsewhere."""
    return [(n, flag if state else 0) for _off, n, state in runs]


def transmission_flags(readonly: bool, structured: bool) -> int:
    """The transmission flags of an export."""
    f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
    if readonly:
        f |= FLAG_READ_ONLY
    else:
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    if structured:
        f |= FLAG_SEND_DF  # a read is always one data chunk
    return f


def greeting() -> bytes:
    """The server's first message: newstyle, fixed, no zeroes."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size, flags (and 124 zeros unless
    the client said NO_ZEROES)."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


def info_replies(
    option: int,
    requests: Sequence[int],
    *,
    size: int,
    flags: int,
    name: str,
    description: str,
    max_payload: int,
) -> list[bytes]:
    """The NBD_REP_INFO replies to NBD_OPT_INFO / NBD_OPT_GO: always
    NBD_INFO_EXPORT, and what the client asked for among name, description
    and block size (unknown requests are ignored, as the protocol says)."""
    replies = [struct.pack(">HQH", INFO_EXPORT, size, flags)]
    if INFO_NAME in requests:
        replies.append(struct.pack(">H", INFO_NAME) + name.encode())
    if INFO_DESCRIPTION in requests:
        text = description.encode("utf-8", "replace")[:MAX_STRING]
        replies.append(struct.pack(">H", INFO_DESCRIPTION) + text)
    if INFO_BLOCK_SIZE in requests:
        replies.append(
            struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, max_payload)
        )
    return [option_reply(option, REP_INFO, r) for r in replies]


def server_reply(name: str) -> bytes:
    """One NBD_REP_SERVER reply of NBD_OPT_LIST."""
    raw = name.encode()
    return option_reply(OPT_LIST, REP_SERVER, struct.pack(">I", len(raw)) + raw)


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode())


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option: int, reply: int, message: str) -> bytes:
    """An error reply to an option, with a message."""
    return option_reply(option, reply, message.encode("utf-8", "replace")[:MAX_STRING])


def simple_reply(cookie: int, nbd_err: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, nbd_err, cookie)


def error_reply(cookie: int, nbd_err: int, message: str, structured: bool) -> tuple[bytes, ...]:
    """A failed request: an error chunk with the message if structured."""
    if structured:
        return (error_chunk(cookie, nbd_err, message),)
    return (simple_reply(cookie, nbd_err),)


def data_reply(cookie: int, offset: int, data: bytes, structured: bool) -> tuple[bytes, ...]:
    """A read's reply: simple (header, data), or one data chunk (a bare
    "done" chunk when there is no data)."""
    if not structured:
        return (simple_reply(cookie), data)
    if not data:  # nothing to describe: a bare "done"
        return (
            CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0),
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
COMMAND_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}


def check_request(
    req: Request,
    *,
    flags: int,
    structured: bool,
    has_meta: bool,
    name: str,
    size: int,
    readonly: bool,
    max_payload: int,
) -> None:
    """Refuse (:class:`CommandError`) a request the export cannot take:
    unknown command or flag (``flags``: the transmission flags sent),
    writes to read-only export ``name``, reads over ``max_payload``, ranges past
    ``size``, block status without a selected context or of nothing."""
    cmd, rflags, offset, length = req.cmd, req.flags, req.offset, req.length
    allowed = COMMAND_FLAGS.get(cmd)
    if allowed is None:
        raise CommandError(NBD_EINVAL, f"unknown command {cmd}")
    if flags & FLAG_SEND_FUA:
        allowed |= CMD_FLAG_FUA
    if not flags & FLAG_SEND_DF:
        allowed &= ~CMD_FLAG_DF
    if rflags & ~allowed:
        raise CommandError(NBD_EINVAL, f"{req.name}: unsupported flags {rflags & ~allowed:#x}")
    if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and readonly:
        raise CommandError(NBD_EPERM, f"export {name!r} is read-only")
    if cmd == CMD_FLUSH:
        return
    if cmd == CMD_READ and length > max_payload:
        raise CommandError(
            NBD_EOVERFLOW if structured else NBD_EINVAL,
            f"read of {length} bytes is over the maximum payload {max_payload}",
        )
    if offset > size or length > size - offset:
        err = NBD_ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
        raise CommandError(err, f"{req.name} at {offset}+{length} is past the end ({size} bytes)")
    if cmd == CMD_BLOCK_STATUS:
        if not has_meta:
            raise CommandError(NBD_EINVAL, "no meta context was selected for this export")
        if length == 0:
            raise CommandError(NBD_EINVAL, "block status of an empty range")
