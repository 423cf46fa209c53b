"""The NBD server: where it listens (:mod:`blksnap.frontends.listen`), accepting
clients, and shutting down. Each client is a :class:`Connection`, which
negotiates (:mod:`.handshake`) and is served (:mod:`.transmission`); bad
traffic is answered as the protocol says or the connection is closed, and
never takes the server or another client down.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import trio

from blksnap.engine.engine import Engine
from blksnap.frontends.listen import Address, bind, join_host_port
from blksnap.frontends.nbd.connection import Connection
from blksnap.frontends.nbd.exports import Export, Exports
from blksnap.frontends.nbd.handshake import Handshake
from blksnap.frontends.nbd.protocol import Hangup
from blksnap.frontends.nbd.transmission import WorkerPool, transmission
from blksnap.settings import SETTINGS, Settings

log = logging.getLogger("blksnapd.nbd")


class NbdServer:
    """Devices and snapshot images as NBD exports (see :mod:`blksnap.frontends.nbd`).

    Its limits, threads and timeouts are ``settings`` (:data:`SETTINGS`
    unless given); ``threads`` overrides ``settings.nbd_threads``."""

    def __init__(
        self,
        engine: Engine,
        address: Address,
        *,
        writable_images: bool = False,
        threads: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.engine = engine
        self.address = address
        self.writable_images = writable_images
        self.settings = settings or SETTINGS
        self.pool = WorkerPool(threads if threads is not None else self.settings.nbd_threads)
        self.exports = Exports(engine, writable_images=writable_images)
        self.connections: set[Connection] = set()
        self.listeners: list[trio.SocketListener] = []
        #: The addresses actually bound (a TCP port 0 becomes a real port).
        self.bound: list[str] = []
        self._ids = itertools.count(1)
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
        return self.exports.users(name)

    @contextmanager
    def withdrawn(self, name: str) -> Iterator[None]:
        """While a device is being removed: no new client may open it."""
        with self.exports.withdrawn(name):
            yield

    # -- exports ----------------------------------------------------------------------

    def lookup(self, name: str) -> Export | None:
        return self.exports.lookup(name)

    def export_names(self) -> list[str]:
        return self.exports.names()

    # -- listening ---------------------------------------------------------------------

    async def open(self, socks: list[socket.socket] | None = None) -> None:
        """Bind the listening socket(s), or listen on ``socks``, bound
        already (blksnapd's supervisor holds them across workers); errors as
        :class:`BlksnapError`."""
        if socks is None:
            socks = bind(self.address)
        for sock in socks:
            self.listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            name = sock.getsockname()
            self.bound.append(
                f"unix:{name}" if sock.family == socket.AF_UNIX else join_host_port(*name[:2])
            )
        if self.address.kind == "unix":
            self._unix_path = self.address.path
        else:
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
        most ``settings.nbd_shutdown_grace`` seconds) and are closed."""
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
        with trio.move_on_after(self.settings.nbd_shutdown_grace):
            while self.connections:
                await trio.sleep(0.01)
        for conn in list(self.connections):
            log.warning("%s: requests still running at shutdown; cancelled", conn)
            conn.kill()
            conn.scope.cancel()
        await self._done.wait()

    def _is_closing(self) -> bool:
        return self._closing

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
        conn = Connection(next(self._ids), stream, self._peer(stream), self.settings)
        timeout = self.settings.nbd_handshake_timeout
        self.connections.add(conn)
        try:
            async with stream:
                with conn.scope:
                    if self._closing:
                        return
                    log.debug("%s: connected", conn)
                    with trio.move_on_after(timeout) as hs:
                        export = await Handshake(conn, self.exports, self._is_closing).run()
                    if hs.cancelled_caught:
                        log.warning("%s: handshake not done in %gs; closed", conn, timeout)
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
                    await transmission(conn, self.pool)
        except Hangup as exc:
            log.info("%s: %s", conn, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("%s: connection lost: %s", conn, exc)
        except Exception:  # a bug: this connection ends, the server carries on
            log.exception("%s: crashed", conn)
        finally:
            self.exports.release(conn)
            self.connections.discard(conn)
            log.debug("%s: closed", conn)
