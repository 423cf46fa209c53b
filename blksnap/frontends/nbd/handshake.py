"""NBD handshake: fixed newstyle negotiation and its options, on the event
loop, up to the export a connection enters transmission with.

Options ``EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``, ``GO``,
``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and ``SET_META_CONTEXT``;
anything else gets ``NBD_REP_ERR_UNSUP`` (so ``STARTTLS`` too: no TLS).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import suppress

import trio

from blksnap.frontends.nbd.connection import Connection
from blksnap.frontends.nbd.exports import Export, Exports
from blksnap.frontends.nbd.protocol import (
    CONTEXT_IDS,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    IHAVEOPT,
    KNOWN_OPTIONS,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_SHUTDOWN,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    OptionError,
    decode_string,
    export_name_reply,
    greeting,
    info_replies,
    match_contexts,
    meta_context_reply,
    option_reply,
    parse_info_request,
    parse_meta_request,
    server_reply,
)

log = logging.getLogger("blksnapd.nbd")


class Handshake:
    """The negotiation of one connection against the server's exports;
    ``closing()`` tells whether the server is shutting down."""

    def __init__(self, conn: Connection, exports: Exports, closing: Callable[[], bool]) -> None:
        self.conn = conn
        self.exports = exports
        self.closing = closing
        self.settings = conn.settings

    async def run(self) -> Export | None:
        """Fixed newstyle negotiation; the export chosen, or None to hang up."""
        conn = self.conn
        max_data = self.settings.nbd_max_option_data
        max_discard = self.settings.nbd_max_option_discard
        await conn.send(greeting())
        cflags = int.from_bytes(await conn.recv(4), "big")
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            log.warning("%s: unknown client flags %#x; closed", conn, cflags)
            return None
        conn.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = OPTION_HEADER.unpack(await conn.recv(OPTION_HEADER.size))
            if magic != IHAVEOPT:
                log.warning("%s: bad option magic %#x; closed", conn, magic)
                return None
            if length > max_data:
                if option == OPT_EXPORT_NAME or length > max_discard:
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
                return await self._export_name(data)
            if option == OPT_ABORT:
                with suppress(trio.BrokenResourceError, OSError):
                    await conn.option_reply(option, REP_ACK)
                log.debug("%s: client aborted the negotiation", conn)
                return None
            try:
                if self.closing():
                    raise OptionError(REP_ERR_SHUTDOWN, "server shutting down")
                if option in (OPT_INFO, OPT_GO):
                    export = await self._info(option, data)
                    if option == OPT_GO:
                        return export
                elif option == OPT_LIST:
                    await self._list(data)
                elif option == OPT_STRUCTURED_REPLY:
                    if data:
                        raise OptionError(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                    conn.structured = True
                    await conn.option_reply(option, REP_ACK)
                elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                    await self._meta(option, data)
                else:
                    log.info("%s: unsupported option %d", conn, option)
                    raise OptionError(REP_ERR_UNSUP, f"option {option} is not supported")
            except OptionError as exc:
                if exc.reply != REP_ERR_UNSUP:
                    log.info("%s: option %d refused: %s", conn, option, exc.message)
                await conn.option_error(option, exc.reply, exc.message)

    async def _export_name(self, data: bytes) -> Export | None:
        conn = self.conn
        try:
            name = decode_string(data, "export name")
        except OptionError as exc:
            log.warning("%s: NBD_OPT_EXPORT_NAME: %s; closed", conn, exc.message)
            return None
        export = self.exports.lookup(name)
        if export is None or self.closing():
            # This option cannot answer with an error: the protocol says hang up.
            log.info("%s: NBD_OPT_EXPORT_NAME %r: no such export; closed", conn, name)
            return None
        self.exports.hold(conn, export)
        conn.flags = export.flags(conn.structured)
        self._select_meta(export)
        await conn.send(export_name_reply(export.size, conn.flags, conn.no_zeroes))
        return export

    async def _info(self, option: int, data: bytes) -> Export | None:
        conn = self.conn
        name, requests = parse_info_request(data)
        export = self.exports.lookup(name)
        if export is None:
            raise OptionError(REP_ERR_UNKNOWN, f"no export named {name!r}")
        if option == OPT_GO:
            self.exports.hold(conn, export)
        flags = export.flags(conn.structured)
        replies = info_replies(
            option,
            requests,
            size=export.size,
            flags=flags,
            name=export.name,
            description=export.description(),
            max_payload=self.settings.nbd_max_payload,
        )
        await conn.send(*replies)
        await conn.option_reply(option, REP_ACK)
        if option != OPT_GO:
            return None
        conn.flags = flags
        self._select_meta(export)
        return export

    def _select_meta(self, export: Export) -> None:
        """Contexts selected for another export do not carry over."""
        if self.conn.meta_export != export.name:
            self.conn.meta = {}

    async def _list(self, data: bytes) -> None:
        if data:
            raise OptionError(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        msgs = [server_reply(name) for name in self.exports.names()]
        msgs.append(option_reply(OPT_LIST, REP_ACK))
        await self.conn.send(*msgs)

    async def _meta(self, option: int, data: bytes) -> None:
        conn = self.conn
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            conn.meta, conn.meta_export = {}, None  # replaced even if this fails
        if not conn.structured:
            raise OptionError(REP_ERR_INVALID, "negotiate structured replies first")
        name, queries = parse_meta_request(data)
        export = self.exports.lookup(name)
        if export is None:
            raise OptionError(REP_ERR_UNKNOWN, f"no export named {name!r}")
        found = match_contexts(queries, export.contexts(), listing=not setting)
        ids = {ctx: CONTEXT_IDS[ctx] if setting else 0 for ctx in found}
        msgs = [meta_context_reply(option, ids[ctx], ctx) for ctx in found]
        msgs.append(option_reply(option, REP_ACK))
        if setting:
            conn.meta = {CONTEXT_IDS[ctx]: ctx for ctx in found}
            conn.meta_export = name
        await conn.send(*msgs)
