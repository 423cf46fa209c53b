"""``blksnap.Client``: the engine's operations, over blksnapd's control socket.

Synchronous and thread-safe: each thread gets its own connection, so a long
``wait_event`` in one thread does not hold up the others. Errors arrive as
the same :class:`BlksnapError` subclasses, with the daemon's errno.

``timeout`` (seconds, None or 0 = wait forever) bounds every request: from
connect to the whole reply. A request that gets no answer in time fails with
``ETIMEDOUT`` and its connection is closed, since a late reply would
otherwise answer the next request. ``call(..., _timeout=S)`` overrides it
for one request; ``wait_event`` adds its own wait to it.
"""

from __future__ import annotations

import base64
import errno
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from blksnap.control.protocol import (
    HEADER,
    MAX_REPLY,
    VERSION,
    ProtocolError,
    check_length,
    decode_body,
    encode,
)
from blksnap.engine.event_queue import Event
from blksnap.errors import BlksnapError, error
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
    from blksnap.engine.cbt import CbtInfo


log = logging.getLogger("blksnap.client")

#: Requests that change nothing: sent again when the connection broke under
#: them (blksnapd's worker restarted).
IDEMPOTENT = frozenset(
    {"version", "daemon.status", "device.list", "cbt.info", "cbt.map", "snapshot.info",
     "snapshot.collect",
     # (takes an event off the queue; but a connection broken under it means
     # the worker died, and the events not yet taken went with it anyway)
     "snapshot.waitevent"}
)  # fmt: skip
#: How often, and the pause before each (the new worker takes about a second).
RETRIES = 40
RETRY_PAUSE = 0.25
_BROKEN = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})


def default_socket() -> str:
    """blksnapd's control socket: $BLKSNAP_SOCKET, else ``SETTINGS.socket``."""
    return os.environ.get("BLKSNAP_SOCKET") or SETTINGS.socket


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float | None = None) -> None:
        self.socket_path = socket_path or default_socket()
        #: Seconds a request may take (None: no limit).
        self.timeout = timeout or None
        self._local = threading.local()
        self._ids = itertools.count(1)

    # -- transport ------------------------------------------------------------------

    def _connect(self, timeout: float | None = None) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise error(
                exc.errno or errno.ECONNREFUSED,
                f"blksnapd is not running (nothing answers on {self.socket_path}); "
                "start it with 'blksnap daemon start'",
            ) from None
        except PermissionError:
            sock.close()
            raise error(
                errno.EACCES, f"no permission to use {self.socket_path} (root only)"
            ) from None
        self._local.sock = sock
        return sock

    def close(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exactly(self, sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            _settimeout(sock, deadline)
            chunk = sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise error(errno.ECONNRESET, "blksnapd closed the connection")
            buf += chunk
        return bytes(buf)

    def call(self, op: str, _timeout: float | None = -1.0, **args: Any) -> Any:
        """Send one request; its result, or the daemon's error raised.

        ``_timeout``: seconds for this request (None or 0: no limit), instead
        of the client's ``timeout``; ``ETIMEDOUT`` when no reply came in time.

        A request that only reads (:data:`IDEMPOTENT`) is sent again when the
        connection broke under it: blksnapd's worker was restarted (crash or
        ``daemon restart``); its supervisor keeps the socket listening, and
        the new worker answers.
        """
        for attempt in range(RETRIES + 1):
            try:
                return self._call_once(op, _timeout, args)
            except BlksnapError as exc:
                if op not in IDEMPOTENT or exc.errno not in _BROKEN or attempt == RETRIES:
                    raise
                log.info("%s: %s; blksnapd's worker may have restarted, asking again", op, exc)
                time.sleep(RETRY_PAUSE)
        raise AssertionError("unreachable")

    def _call_once(self, op: str, _timeout: float | None, args: dict[str, Any]) -> Any:
        timeout = self.timeout if _timeout is not None and _timeout < 0 else (_timeout or None)
        deadline = None if timeout is None else time.monotonic() + timeout
        req_id = next(self._ids)
        msg = {
            "version": VERSION,
            "id": req_id,
            "op": op,
            "args": {k: v for k, v in args.items() if v is not None},
        }
        try:
            sock = self._connect(timeout)
        except TimeoutError:
            self.close()
            raise self._timed_out(op, req_id, timeout, "accepted no connection") from None
        try:
            _settimeout(sock, deadline)
            sock.sendall(encode(msg))
            (length,) = HEADER.unpack(self._recv_exactly(sock, HEADER.size, deadline))
            check_length(length, MAX_REPLY)
            reply = decode_body(self._recv_exactly(sock, length, deadline))
        except TimeoutError:
            # A late reply would answer the next request: this connection is done.
            self.close()
            raise self._timed_out(op, req_id, timeout, "did not answer") from None
        except (OSError, ProtocolError, BlksnapError) as exc:
            self.close()
            if isinstance(exc, BlksnapError):
                raise
            raise error(exc.errno or errno.EIO, f"talking to blksnapd: {exc}") from None
        except BaseException:
            # Interrupted mid-exchange (Ctrl-C, SIGTERM): the reply may still
            # be on its way, so this connection can no longer be trusted.
            self.close()
            raise
        if reply.get("id") not in (req_id, None):
            self.close()
            raise error(errno.EPROTO, f"blksnapd answered request {reply.get('id')}, not {req_id}")
        if reply.get("ok"):
            return reply.get("result")
        code = reply.get("errno")
        raise error(code if isinstance(code, int) else errno.EIO, str(reply.get("message", "")))

    def _timed_out(self, op: str, req_id: int, timeout: float | None, what: str) -> BlksnapError:
        return error(
            errno.ETIMEDOUT,
            f"blksnapd {what} on {self.socket_path} within {timeout:g} s "
            f"(request {op!r}, #{req_id}); it may be wedged or very busy: "
            "check its log and 'blksnap daemon status' (--timeout SECONDS or "
            "BLKSNAP_TIMEOUT to wait longer, 0 for no limit)",
        )

    # -- operations (the Engine's, by name) ----------------------------------------------

    def version(self) -> dict[str, Any]:
        return self.call("version")

    def status(self) -> dict[str, Any]:
        return self.call("daemon.status")

    def restart(self, force: bool = False) -> dict[str, Any]:
        """A new blksnapd worker from the code on disk (an upgrade in place);
        the FUSE files, the devices and the snapshots stay served (``force``
        is accepted and ignored)."""
        return self.call("daemon.restart", force=True if force else None)

    def stop(self, force: bool = False) -> dict[str, Any]:
        """Stop blksnapd; ``EBUSY`` (listing them) while file systems are
        mounted on its loop devices or its files are open, unless ``force``."""
        return self.call("daemon.stop", force=True if force else None)

    def add_device(self, path: str, name: str, loop: bool = False) -> dict[str, Any]:
        return self.call("device.add", path=os.path.abspath(path), name=name, loop=loop)

    def remove_device(self, name: str) -> None:
        self.call("device.remove", name=name)

    def devices(self) -> list[dict[str, Any]]:
        return self.call("device.list")

    def attach(
        self, name: str, filter: str = "blksnap", opts: dict[str, str] | None = None
    ) -> None:
        self.call("filter.attach", device=name, filter=filter, opts=opts or None)

    def detach(self, name: str, filter: str = "blksnap") -> None:
        self.call("filter.detach", device=name, filter=filter)

    def ctl(self, name: str, filter: str, cmd: str, arg: str | None = None) -> Any:
        """A filter's control command (``flakey`` ``down``, ``migrate`` ``status`` ...)."""
        return self.call("filter.ctl", device=name, filter=filter, cmd=cmd, arg=arg)

    def filter_list(self) -> list[dict[str, Any]]:
        return self.call("filter.list")

    def cbt_info(self, name: str) -> CbtInfo:
        from blksnap.engine.cbt import CbtInfo

        return CbtInfo.from_dict(self.call("cbt.info", device=name))

    def cbt_map(self, name: str) -> bytes:
        return base64.b64decode(self.call("cbt.map", device=name)["map"])

    def mark_dirty(self, name: str, ranges: Iterable[tuple[int, int]]) -> None:
        self.call("cbt.markdirty", device=name, ranges=[[int(o), int(n)] for o, n in ranges])

    def snapshot_create(
        self,
        names: Sequence[str],
        storage: str | None = None,
        limit: int | None = None,
        ranges: Sequence[tuple[int, int]] | None = None,
        sid: str | None = None,
    ) -> str:
        if isinstance(names, str):
            names = [names]
        return self.call(
            "snapshot.create",
            id=sid,
            devices=list(names),
            storage=os.path.abspath(storage) if storage else None,
            limit=limit,
            ranges=[list(r) for r in ranges] if ranges else None,
        )["id"]

    def snapshot_append_storage(
        self,
        sid: str,
        path: str,
        *,
        size: int | None = None,
        ranges: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Any]:
        return self.call(
            "snapshot.appendstorage",
            id=sid,
            path=os.path.abspath(path),
            size=size,
            ranges=[list(r) for r in ranges] if ranges else None,
        )

    def snapshot_take(self, sid: str, loop: bool = False) -> dict[str, Any]:
        return self.call("snapshot.take", id=sid, loop=loop)

    def snapshot_info(self, name: str) -> dict[str, Any]:
        return self.call("snapshot.info", device=name)

    def snapshot_collect(self, sid: str | None = None) -> list[dict[str, Any]]:
        return self.call("snapshot.collect", id=sid)

    def wait_event(self, sid: str, timeout: float | None = 1.0) -> Event | None:
        ms = 24 * 3600 * 1000 if timeout is None else max(0, int(timeout * 1000))
        # The daemon answers after the wait: the client's timeout is the margin.
        limit = None if self.timeout is None else self.timeout + ms / 1000.0
        reply = self.call("snapshot.waitevent", _timeout=limit, id=sid, timeout_ms=ms)
        if reply["event"] == "timeout":
            return None
        return Event(reply["event"], reply.get("data", {}), reply.get("time", 0.0))

    def snapshot_destroy(self, sid: str, force: bool = False) -> None:
        """Release snapshot ``sid``; ``EBUSY`` while an image is mounted or
        open (loop device, file handle, NBD client), unless ``force``."""
        self.call("snapshot.destroy", id=sid, force=True if force else None)

    # -- backups served by blksnapd ---------------------------------------------------

    def mount(
        self,
        repo: str,
        backup: str,
        device: str,
        *,
        key: bytes | None = None,
        key_file: str | None = None,
        loop: bool = False,
    ) -> dict[str, Any]:
        """Serve device ``device`` of ``backup`` read-only as
        ``<mount>/backups/B/N`` (``key``: the master key of an encrypted
        repository)."""
        return self.call(
            "backup.mount",
            repo=repo if "://" in repo else os.path.abspath(repo),
            backup=backup,
            device=device,
            key=key.hex() if key else None,
            key_file=os.path.abspath(key_file) if key_file else None,
            loop=loop,
        )

    def umount(self, backup: str, device: str, force: bool = False) -> dict[str, Any]:
        return self.call("backup.umount", backup=backup, device=device, force=force or None)

    def mounts(self) -> list[dict[str, Any]]:
        return self.call("backup.mounts")

    def restore_instant(
        self,
        repo: str,
        backup: str,
        device: str,
        target: str,
        *,
        key: bytes | None = None,
        key_file: str | None = None,
        loop: bool = False,
        rate: str | None = None,
        paused: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        """Serve ``target`` at once as device ``device``, hydrated from the backup."""
        return self.call(
            "restore.instant",
            repo=repo if "://" in repo else os.path.abspath(repo),
            backup=backup,
            device=device,
            target=os.path.abspath(target),
            key=key.hex() if key else None,
            key_file=os.path.abspath(key_file) if key_file else None,
            loop=loop,
            rate=rate,
            paused=paused or None,
            force=force or None,
        )


def _settimeout(sock: socket.socket, deadline: float | None) -> None:
    """Let the next socket operation run until ``deadline`` (monotonic) at most."""
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)
