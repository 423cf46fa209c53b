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

Modules: :mod:`.protocol` (constants, wire structures, pure parse and
encode functions), :mod:`.exports` (a target as an export, the table of
exports), :mod:`.handshake` (negotiation and options), :mod:`.connection`
(one client's socket and flow control), :mod:`.transmission` (requests
served), :mod:`.server` (listening, :class:`NbdServer`).

The server runs on the daemon's trio loop, which negotiates; in
transmission a thread of the connection reads the requests, serves the
quick ones and hands the slow ones to a small shared pool of worker
threads (:mod:`.transmission`). The loop never blocks and never copies
reply data. No thread ever waits for a client to take a reply: what the
socket cannot take now is queued and sent by the loop as the client makes
room, while that client's requests stay counted in flight (so a client that
stops reading stops being served, alone). Replies may come out of order
(the protocol allows it), each one whole. Bad traffic is answered as the
protocol says or the connection is closed; it never takes the server or
another client down. Every such event is logged.
"""

from __future__ import annotations

from blksnap.frontends.listen import Address, is_wildcard, join_host_port, parse_address
from blksnap.frontends.nbd.connection import Connection
from blksnap.frontends.nbd.exports import DeviceExport, Export, Exports, ImageExport
from blksnap.frontends.nbd.protocol import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    CONTEXT_IDS,
    CTX_ALLOCATION,
    CTX_DIRTY,
    FLAG_CAN_MULTI_CONN,
    FLAG_HAS_FLAGS,
    FLAG_READ_ONLY,
    FLAG_SEND_DF,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
    MAX_STRING,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
    CommandError,
    Hangup,
    OptionError,
    Request,
    Violation,
    block_status_chunk,
    check_request,
    decode_string,
    error_chunk,
    match_contexts,
    nbd_errno,
    option_reply,
    parse_info_request,
    parse_meta_request,
    run_extents,
    runs_to_extents,
)
from blksnap.frontends.nbd.server import NbdServer

__all__ = [
    "CMD_BLOCK_STATUS",
    "CMD_DISC",
    "CMD_FLAG_DF",
    "CMD_FLAG_FUA",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_REQ_ONE",
    "CMD_FLUSH",
    "CMD_READ",
    "CMD_TRIM",
    "CMD_WRITE",
    "CMD_WRITE_ZEROES",
    "CONTEXT_IDS",
    "CTX_ALLOCATION",
    "CTX_DIRTY",
    "FLAG_CAN_MULTI_CONN",
    "FLAG_HAS_FLAGS",
    "FLAG_READ_ONLY",
    "FLAG_SEND_DF",
    "FLAG_SEND_FLUSH",
    "FLAG_SEND_FUA",
    "FLAG_SEND_TRIM",
    "FLAG_SEND_WRITE_ZEROES",
    "MAX_STRING",
    "NBD_EINVAL",
    "NBD_EIO",
    "NBD_ENOSPC",
    "NBD_EOVERFLOW",
    "NBD_EPERM",
    "NBD_ESHUTDOWN",
    "REP_ACK",
    "REP_ERR_INVALID",
    "REP_ERR_TOO_BIG",
    "REP_ERR_UNKNOWN",
    "REP_ERR_UNSUP",
    "STATE_DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "Address",
    "CommandError",
    "Connection",
    "DeviceExport",
    "Export",
    "Exports",
    "Hangup",
    "ImageExport",
    "NbdServer",
    "OptionError",
    "Request",
    "Violation",
    "block_status_chunk",
    "check_request",
    "decode_string",
    "error_chunk",
    "is_wildcard",
    "join_host_port",
    "match_contexts",
    "nbd_errno",
    "option_reply",
    "parse_address",
    "parse_info_request",
    "parse_meta_request",
    "run_extents",
    "runs_to_extents",
]
