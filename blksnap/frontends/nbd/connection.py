"""One NBD client connection: its socket, in the handshake (on the event
loop) and in transmission (a reader thread takes requests, worker threads
send replies), flow control between them, and the queue of replies the
socket had no room for. What requests mean is :mod:`.transmission`'s.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from blksnap.frontends.nbd.protocol import (
    Hangup,
    Stopped,
    data_reply,
    error_reply,
    option_error,
    option_reply,
    simple_reply,
)
from blksnap.settings import SETTINGS, Settings
from blksnap.units import KiB, MiB

if TYPE_CHECKING:
    from blksnap.frontends.nbd.exports import Export

log = logging.getLogger("blksnapd.nbd")


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
    settings: Settings = SETTINGS
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
    #: The limits of the two (``nbd_max_inflight``, ``nbd_max_inflight_bytes``).
    max_inflight: int = 0
    max_inflight_bytes: int = 0
    #: Recent reads and writes were slow, by this score (see ``nbd_slow_score``).
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
        self.max_inflight = self.settings.nbd_max_inflight
        self.max_inflight_bytes = self.settings.nbd_max_inflight_bytes

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
        await self.send(option_error(option, reply, message))

    # -- sending in transmission (worker threads) --------------------------------------------

    def start_transmission(self) -> None:
        self.tx = socket.socket(fileno=os.dup(self.sock.fileno()))
        # Room for a few whole replies in the kernel: fewer partial sends,
        # fewer wake-ups. FORCE needs CAP_NET_ADMIN (blksnapd runs as root).
        for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:
                self.tx.setsockopt(socket.SOL_SOCKET, opt, self.settings.nbd_send_buffer)
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
            if self.inflight < self.max_inflight and (
                not self.inflight_bytes or self.inflight_bytes + nbytes <= self.max_inflight_bytes
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
                if self.inflight < self.max_inflight and (
                    not self.inflight_bytes
                    or self.inflight_bytes + nbytes <= self.max_inflight_bytes
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
        return (simple_reply(cookie),)

    def msg_error(self, cookie: int, nbd_err: int, message: str) -> tuple[bytes, ...]:
        return error_reply(cookie, nbd_err, message, self.structured)

    def msg_data(self, cookie: int, offset: int, data: bytes) -> tuple[bytes, ...]:
        return data_reply(cookie, offset, data, self.structured)


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``views``."""
    while sent:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0
