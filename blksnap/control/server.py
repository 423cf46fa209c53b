"""blksnapd's control socket: a Unix stream socket (mode 0600) that answers
the owner's uid and root only, one framed JSON request at a time per
connection (:mod:`blksnap.control.protocol`), each dispatched to the
daemon's handler of its op.

A request that fails answers the error (errno and message); one that
crashes answers EIO and the server keeps serving. A request too long to
read answers an error and the connection is closed (its body cannot be
skipped safely).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from blksnap.control.protocol import (
    HEADER,
    MAX_REQUEST,
    ProtocolError,
    check_length,
    decode_body,
    encode,
    error_reply,
    ok_reply,
    validate_request,
)
from blksnap.errors import BlksnapError, error

log = logging.getLogger("blksnapd")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    """``n`` bytes from ``stream``, or None if it ends first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def peer_allowed(stream: trio.SocketStream) -> bool:
    """Is the peer root or this process's uid (SO_PEERCRED)?"""
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def socket_alive(path: str) -> bool:
    """Does something accept connections on the Unix socket ``path``?"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlServer:
    """Serves ``handlers`` (op -> coroutine of its arguments) on ``socket_path``."""

    def __init__(self, socket_path: str, handlers: Mapping[str, Handler]) -> None:
        self.socket_path = socket_path
        self.handlers = handlers

    async def dispatch(self, body: bytes) -> dict[str, Any]:
        """The reply to one request body."""
        req_id: Any = None
        try:
            msg = decode_body(body)
            req_id = msg.get("id")
            req_id, op, args = validate_request(msg)
            result = await self.handlers[op](args)
            return ok_reply(req_id, result)
        except BlksnapError as exc:
            log.info("request %s failed: %s", req_id, exc)
            return error_reply(req_id, exc)
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("request %s crashed", req_id)
            return error_reply(req_id, error(errno.EIO, f"internal error: {exc!r}"))

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            if not peer_allowed(stream):
                log.warning("control connection from a foreign uid refused")
                await stream.send_all(encode(error_reply(None, error(errno.EPERM, "not allowed"))))
                return
            while True:
                try:
                    header = await receive_exactly(stream, HEADER.size)
                    if header is None:
                        return
                    (length,) = HEADER.unpack(header)
                    try:
                        check_length(length, MAX_REQUEST)
                    except ProtocolError as exc:
                        # The body cannot be skipped safely: answer, then hang up.
                        await stream.send_all(encode(error_reply(None, exc)))
                        return
                    body = await receive_exactly(stream, length)
                    if body is None:
                        return
                    reply = await self.dispatch(body)
                    await stream.send_all(encode(reply))
                except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                    return

    async def serve(
        self, sock: socket.socket | None = None, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the socket (:func:`bind_control`), or serve on ``sock``, one
        bound already (blksnapd's supervisor holds it across workers); serve
        until cancelled."""
        if sock is None:
            sock = bind_control(self.socket_path)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        task_status.started()
        await trio.serve_listeners(self.handle_connection, [listener])


def bind_control(path: str) -> socket.socket:
    """The listening control socket at ``path`` (mode 0600); EADDRINUSE if
    another blksnapd answers there, a stale socket file replaced."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        if socket_alive(path):
            raise error(errno.EADDRINUSE, f"another blksnapd answers on {path}")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    sock.listen(64)
    return sock
