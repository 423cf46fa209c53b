"""NBD transmission: the requests of one connection, served.

The event loop negotiates; in transmission a thread of the connection reads
the requests. Reads and writes that are quick (the page cache) are served
start to finish (engine call and reply) by that thread, since handing a
request over to another thread costs more than a 256 KiB read; slow ones (a
disk), and the other commands, go to a small shared :class:`WorkerPool`, so
that several run at once. Slow: taking more than ``nbd_slow_io`` seconds
plus a copy of the data at ``nbd_copy_rate``. Each slow one adds 1 to a
score, each quick one takes 1 off (within 0..2*``nbd_slow_score``); from
``nbd_slow_score`` on, reads go to the workers. So most recent ones must
have been slow: a loaded machine makes a few quick ones slow now and then.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import trio

from blksnap.errors import BlksnapError
from blksnap.frontends.nbd.connection import Connection
from blksnap.frontends.nbd.exports import Export
from blksnap.frontends.nbd.protocol import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    CTX_ALLOCATION,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ESHUTDOWN,
    REQUEST,
    REQUEST_MAGIC,
    CommandError,
    Hangup,
    Request,
    Stopped,
    Violation,
    block_status_chunk,
    check_request,
    nbd_errno,
)

log = logging.getLogger("blksnapd.nbd")


class WorkerPool:
    """Threads that serve requests: engine call and reply, start to finish.

    A job is handed over through a queue, and nothing comes back to the
    event loop (``trio.to_thread.run_sync`` costs more CPU per call than a
    256 KiB image read). Quick reads and writes skip even this hand-over:
    the connection's reader serves them (see :mod:`.transmission`).
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


async def transmission(conn: Connection, pool: WorkerPool) -> None:
    """Serve ``conn`` until the client disconnects, breaks the protocol, or
    the server stops it (:meth:`Connection.stop_reading`)."""
    conn.start_transmission()
    done = trio.Event()
    outcome: list[BaseException] = []
    token = conn.token

    def reader() -> None:
        try:
            read_requests(conn, pool)
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


def read_requests(conn: Connection, pool: WorkerPool) -> None:
    """Take requests off the socket and hand them to the workers (the
    connection's reader thread). It waits for data (in poll(2)), for room
    (too much in flight), and for write payloads, never for a reply;
    :meth:`Connection.stop_reading` ends it."""
    size = REQUEST.size
    unpack_from = REQUEST.unpack_from
    submit = pool.submit
    max_payload = conn.settings.nbd_max_payload
    slow_score = conn.settings.nbd_slow_score
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
        held = length if cmd in (CMD_READ, CMD_WRITE) and length <= max_payload else 0
        if not conn.try_room(held):
            conn.room_sync(held)
        if cmd != CMD_WRITE:
            if cmd != CMD_READ:
                submit(serve, conn, req, None, None, held)
            elif conn.slow < slow_score:
                serve_timed(conn, req, None, held)
            else:
                submit(serve_timed, conn, req, None, held)
            continue
        if length > max_payload:
            log.warning("%s: WRITE of %d bytes refused (max %d)", conn, length, max_payload)
            refusal = CommandError(
                NBD_EINVAL,
                f"write of {length} bytes is over the maximum payload {max_payload}",
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
        if conn.slow < slow_score:
            serve_timed(conn, req, payload, held)
        else:
            submit(serve_timed, conn, req, payload, held)


def serve(
    conn: Connection,
    req: Request,
    payload: bytearray | None,
    refusal: CommandError | None,
    held: int,
) -> None:
    """One request, start to finish, in a worker thread: check it, do it,
    send the reply (or queue it, if the client is slow to take it)."""
    try:
        reply = serve_one(conn, req, payload, refusal)
    except BaseException:
        conn.finish(held)
        raise
    try:
        conn.send_reply(held, reply)
    except OSError as exc:  # the reply cannot go out: the client is gone
        log.info("%s: reply to %s lost: %s", conn, req.name, exc)


def serve_timed(conn: Connection, req: Request, payload: bytearray | None, held: int) -> None:
    """:func:`serve` of a read or write, timed into ``conn.slow``."""
    settings = conn.settings
    start = time.perf_counter()
    serve(conn, req, payload, None, held)
    lag = time.perf_counter() - start - req.length / settings.nbd_copy_rate
    if lag > settings.nbd_slow_io:
        conn.slow = min(conn.slow + 1, 2 * settings.nbd_slow_score)
    elif conn.slow:
        conn.slow -= 1


def serve_one(
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
        check_request(
            req,
            flags=conn.flags,
            structured=conn.structured,
            has_meta=bool(conn.meta),
            name=export.name,
            size=export.size,
            readonly=export.readonly,
            max_payload=conn.settings.nbd_max_payload,
        )
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
            limit = 1 if req.flags & CMD_FLAG_REQ_ONE else conn.settings.nbd_max_extents
            chunks = block_status(export, conn.meta, offset, length, limit)
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


def block_status(
    export: Export, meta: dict[int, str], offset: int, length: int, limit: int
) -> list[tuple[int, list[tuple[int, int]]]]:
    """The extents of each selected context (id, extents), ids in order."""
    out: list[tuple[int, list[tuple[int, int]]]] = []
    for ctx_id, ctx in sorted(meta.items()):
        if ctx == CTX_ALLOCATION:
            extents = export.allocation(offset, length, limit)
        else:
            extents = export.dirty(offset, length, limit)
        out.append((ctx_id, extents))
    return out
