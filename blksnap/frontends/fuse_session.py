"""A FUSE session of our own: ``mount(2)``, ``/dev/fuse`` and reader threads.

No libfuse, no event loop: the session mounts with ``mount(2)`` on an fd of
``/dev/fuse`` it opened, answers INIT itself, then starts N reader threads,
each on its own fd (the first one, or a clone of it made with
``FUSE_DEV_IOC_CLONE``). A thread reads a request, serves it start to finish
and answers on the fd it read it from (each clone has its own queue of
requests being processed, so a reply on another fd is refused). Measured
(docs: "FUSE session: measured"): 3 to 4 times pyfuse3's 4 KiB IOPS, and
threads keep the device served while one request waits.

What is served is a :class:`Tree`: directories and files, each file backed
by an object with ``size``, ``read``, ``write``, ``flush`` and optionally
``fallocate`` (:class:`Backing`). Node ids are given out in the order nodes
are added, from the root's 1: the same tree built the same way gets the
same ids, which a server taking over a live connection needs (the kernel
keeps the old ones). The tree may change while mounted (:meth:`Tree.remove`,
adds, under :attr:`Tree.lock`); an id is never given out twice, so a node
the kernel still knows by a removed id answers ENOENT. A request the kernel
resends (bit 63 of its unique, after ``FUSE_NOTIFY_RESEND``) is served like
any other and answered with its unique as it came.

Files are opened in direct-I/O mode: no page cache in front of the backing
object (a block device has none), and writes of one file may run in
parallel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterable
from typing import Protocol

from blksnap import shortway
from blksnap.errors import BlksnapError
from blksnap.fileio import fallocate, may_block
from blksnap.frontends import fuse_proto as proto

log = logging.getLogger(__name__)

FUSE_DEV_IOC_CLONE = 0x8004E500
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FSTYPE = b"fuse.blksnap"
SOURCE = b"blksnap"
MiB = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


# The fast path of READ and WRITE: length, opcode, unique, then (past the rest
# of the in-header) fh, offset and size of fuse_read_in / fuse_write_in.
_RW_PEEK = struct.Struct("<IIQ24xQQI").unpack_from
_RW_END = proto.IN_HEADER.size + 40  # where a WRITE's data starts
_WRITE_REPLY = struct.Struct("<IiQI4x").pack  # out-header + fuse_write_out
_WRITE_REPLY_LEN = 24
_READ = int(proto.Opcode.READ)
_WRITE = int(proto.Opcode.WRITE)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


# --- the connection: what a supervisor holding it needs, no serving -----------


def mount_fuse(mountpoint: str) -> int:
    """Open ``/dev/fuse`` and mount it at ``mountpoint``; the fd of the new
    connection (the kernel queues INIT on it)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        _check(
            _libc.mount(SOURCE, mountpoint.encode(), FSTYPE, MS_NOSUID | MS_NODEV, opts),
            f"mount {mountpoint}",
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def clone_fd(fd: int) -> int:
    """A new fd of the connection of ``fd`` with its own queue of requests
    being processed (``FUSE_DEV_IOC_CLONE``)."""
    cfd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(cfd, FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
    except BaseException:
        os.close(cfd)
        raise
    return cfd


def umount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount (the kernel ends the connection once the mount is gone)."""
    _check(_libc.umount2(mountpoint.encode(), MNT_DETACH if lazy else 0), f"umount {mountpoint}")


class Backing(Protocol):
    """What a file of the tree is served from. Methods run in reader threads,
    several at once; an ``OSError`` (or blksnap's ``BlksnapError``) becomes
    its errno in the reply."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: memoryview) -> None: ...
    def flush(self) -> None: ...


class FileBacking:
    """A regular file (or block device) as a backing object: pread/pwrite."""

    def __init__(self, path: str, size: int | None = None) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size if size is None else size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def flush(self) -> None:
        os.fsync(self.fd)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        fallocate(self.fd, mode, offset, length)

    def close(self) -> None:
        os.close(self.fd)


class NullBacking:
    """The do-nothing mode, for benchmarks: writes return at once, reads
    return zeroes, flush and fallocate do nothing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._zeroes = bytes(MiB)

    def read(self, offset: int, length: int) -> bytes:
        return self._zeroes[:length] if length <= MiB else bytes(length)

    def write(self, offset: int, data: memoryview) -> None:
        pass

    def flush(self) -> None:
        pass

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        pass


class Node:
    def __init__(self, nodeid: int, name: bytes, mode: int, backing: Backing | None = None,
                 path: str = "") -> None:  # fmt: skip
        self.nodeid = nodeid
        self.name = name
        self.path = path  # from the root, no leading slash ("" for the root)
        self.mode = mode
        self.backing = backing
        self.children: dict[bytes, Node] = {}

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Tree:
    """Directories and files, node ids in the order they were added.

    ``ids`` (from :meth:`record` of another process's tree): the id each path
    had there, given again when that path is added (once: a path removed and
    added again gets a new id), and ids after ``next_id`` for new paths, so
    that a server taking over a live connection answers the node ids the
    kernel holds.
    """

    def __init__(self, ids: dict[str, int] | None = None, next_id: int = 0) -> None:
        self.root = Node(proto.ROOT_ID, b"", stat.S_IFDIR | 0o755)
        self.nodes: dict[int, Node] = {proto.ROOT_ID: self.root}
        self._ids = {p: i for p, i in (ids or {}).items() if i > proto.ROOT_ID}
        self._next = max(proto.ROOT_ID + 1, next_id, *(i + 1 for i in self._ids.values()))
        self.time = int(time.time())
        #: Held by changes of the tree (readers only take it to copy a listing).
        self.lock = threading.RLock()

    @staticmethod
    def _parts(path: str) -> list[bytes]:
        parts = [p.encode() for p in path.strip("/").split("/") if p]
        if not parts:
            raise ValueError("the root is there already")
        return parts

    def _add(self, path: str, mode: int, backing: Backing | None) -> Node:
        with self.lock:
            return self._add_locked(self._parts(path), mode, backing)

    def _add_locked(self, parts: list[bytes], mode: int, backing: Backing | None) -> Node:
        parent = self.root
        for i, part in enumerate(parts[:-1]):
            child = parent.children.get(part)
            if child is None:
                child = self.add_dir(b"/".join(parts[: i + 1]).decode())
            if not child.is_dir:
                raise NotADirectoryError(b"/".join(parts).decode())
            parent = child
        if parts[-1] in parent.children:
            raise FileExistsError(b"/".join(parts).decode())
        path = b"/".join(parts).decode()
        nodeid = self._ids.pop(path, None)
        if nodeid is None or nodeid in self.nodes:
            nodeid = self._next
            self._next += 1
        node = Node(nodeid, parts[-1], mode, backing, path)
        self.nodes[node.nodeid] = node
        parent.children[node.name] = node
        return node

    def lookup(self, path: str) -> Node | None:
        node: Node | None = self.root
        for part in self._parts(path):
            node = node.children.get(part) if node is not None else None
        return node

    def remove(self, path: str) -> Node | None:
        """Take ``path`` and everything under it out of the tree (its ids are
        not given out again); the node removed, or None if there was none."""
        parts = self._parts(path)
        with self.lock:
            parent = self.lookup(b"/".join(parts[:-1]).decode()) if parts[:-1] else self.root
            node = parent.children.pop(parts[-1], None) if parent is not None else None
            stack = [node] if node is not None else []
            while stack:
                n = stack.pop()
                self.nodes.pop(n.nodeid, None)
                stack.extend(n.children.values())
        return node

    def record(self) -> dict[str, object]:
        """The ids of this tree, for :class:`Tree` of a process taking over:
        ``{"next_id": N, "nodes": {path: id}}``."""
        with self.lock:
            nodes = {n.path: n.nodeid for n in self.nodes.values() if n is not self.root}
            return {"next_id": self._next, "nodes": nodes}

    def add_dir(self, path: str, mode: int = 0o755) -> Node:
        return self._add(path, stat.S_IFDIR | mode, None)

    def add_file(self, path: str, backing: Backing, mode: int = 0o600) -> Node:
        return self._add(path, stat.S_IFREG | mode, backing)

    def attr(self, node: Node) -> proto.Attr:
        if node.is_dir:
            return proto.Attr(node.nodeid, 0, node.mode, nlink=2, time=self.time)
        assert node.backing is not None
        return proto.Attr(node.nodeid, node.backing.size, node.mode, time=self.time)


#: A spare reader thread reads anyway when the thread holding the turn has
#: been serving one request this long: a wait nobody announced (a lock, the
#: kernel throttling writes) must not stall the whole connection, nor lock it
#: up (a write to diff storage on a file system over one of our own devices
#: waits for a request only another thread can read).
STALL = 0.005


class _Turn:
    """A reader thread's hold on its session's turn to read (at most one
    thread holds it; :meth:`FuseSession._serve`)."""

    __slots__ = ("busy", "held", "served", "session")

    def __init__(self, session: FuseSession) -> None:
        self.session = session
        self.held = False
        #: Serving a request now; requests served so far.
        self.busy = False
        self.served = 0

    def take(self) -> None:
        """Wait for the turn; or take it over from a holder that has been
        serving one request for :data:`STALL` seconds (that one finishes
        its request, then waits for a turn like any other thread)."""
        s = self.session
        lock = s._turn_lock
        seen: tuple[_Turn, int] | None = None
        # One spare at a time watches the holder (the others wait in line,
        # asleep): every look costs a hand-over of Python's lock.
        with s._turn_line:
            while not lock.acquire(timeout=STALL):
                with s._turn_mutex:
                    holder = s._holder
                    if holder is None:
                        seen = None
                        continue
                    mark = (holder, holder.served)
                    if holder.busy and mark == seen:  # stalled: the lock stays held
                        holder.held = False
                        s._holder = self
                        self.held = True
                        return
                    seen = mark
            with s._turn_mutex:
                s._holder = self
                self.held = True

    def give(self) -> None:
        """Let another thread read (this one is about to wait, or is done)."""
        if self.held:
            s = self.session
            with s._turn_mutex:
                if self.held:
                    self.held = False
                    s._holder = None
                    s._turn_lock.release()


class FuseSession:
    """One mount served by ``threads`` reader threads.

    ``with FuseSession(tree, mountpoint) as s:`` mounts, answers INIT and
    starts the threads; leaving unmounts (lazily if the mount is busy) and
    joins every thread.
    """

    def __init__(self, tree: Tree, mountpoint: str, threads: int = 2, max_write: int = MiB,
                 max_background: int = 64, timeout: float = 1.0) -> None:  # fmt: skip
        if threads < 1:
            raise ValueError("a session needs at least one reader thread")
        self.tree = tree
        self.mountpoint = os.path.abspath(mountpoint)
        self.nthreads = threads
        self.max_write = max_write
        self.max_background = max_background
        self.timeout = timeout
        self.init: proto.InitOut | None = None
        self.fds: list[int] = []
        self.threads: list[threading.Thread] = []
        self.mounted = False
        self.errors = 0  # requests answered with an error other than ENOENT/ENOSYS
        self._bufsize = max(proto.MIN_READ_BUFFER, max_write + proto.WRITE_HEADROOM + 4096)
        #: The turn to read (:meth:`_serve`): held while ``_turn_lock`` is,
        #: by ``_holder`` (changed under ``_turn_mutex``).
        self._turn_lock = threading.Lock()
        self._turn_mutex = threading.Lock()
        self._turn_line = threading.Lock()
        self._holder: _Turn | None = None
        #: Files (node ids) whose READs and WRITEs the compiled short way
        #: serves (:mod:`blksnap.shortway`; None: every request is served
        #: here); its owner frees it once the session is closed. With it,
        #: every thread waits for requests in C at once (Python's lock let go
        #: meanwhile), and takes the turn in C before serving one here.
        self.ways: shortway.Nodes | None = None

    # --- lifetime ----------------------------------------------------------

    def __enter__(self) -> FuseSession:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mount(self) -> None:
        """Mount, answer INIT, clone an fd per further thread, start them."""
        try:
            fd = mount_fuse(self.mountpoint)
            self.fds.append(fd)
            self.mounted = True
            self._answer_init(fd)
            for _ in range(self.nthreads - 1):
                self.fds.append(clone_fd(fd))
            self._start()
        except BaseException:
            self.close()
            raise

    def adopt(self, fds: list[int], *, initialized: bool) -> None:
        """Serve a connection another process mounted (blksnapd's
        supervisor, which holds its fds across workers): ``fds`` are the
        connection's fd and its clones, one reader thread each. A connection
        not ``initialized`` yet gets its INIT answered first; one a previous
        server served gets ``FUSE_NOTIFY_RESEND`` before any thread reads, so
        the requests that server read and never answered come again. The
        session unmounts on :meth:`close` like one it mounted itself."""
        if not fds:
            raise ValueError("no /dev/fuse fd to serve")
        self.fds = list(fds)
        self.nthreads = len(fds)
        self.mounted = True
        try:
            if initialized:
                self.send_resend()
            else:
                self._answer_init(fds[0])
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        serve = self._serve if self.ways is None else self._serve_compiled
        for i, cfd in enumerate(self.fds):
            t = threading.Thread(target=serve, args=(cfd,), name=f"blksnap-fuse-{i}",
                                 daemon=True)  # fmt: skip
            t.start()
            self.threads.append(t)

    def _answer_init(self, fd: int) -> None:
        buf = bytearray(self._bufsize)
        while True:
            n = os.readv(fd, [buf])
            req = proto.decode(memoryview(buf)[:n])
            if req.opcode != proto.Opcode.INIT:  # nothing else comes first
                os.write(fd, proto.error(req.unique, errno.EIO))
                continue
            init = proto.negotiate(req.args, self.max_write, self.max_background)
            os.write(fd, proto.reply(req.unique, init.pack()))
            if init.max_write:  # else the kernel spoke a later major: it asks again
                self.init = init
                log.info(
                    "FUSE %d.%d, flags %#x, max_write %d, max_pages %d",
                    *(init.major, init.minor, init.flags, init.max_write, init.max_pages),
                )
                return

    def unmount(self, lazy: bool = False) -> None:
        """Unmount; the kernel aborts the connection and the threads end (a
        lazy unmount: once the last user of the mount is gone)."""
        if self.mounted:
            umount(self.mountpoint, lazy)
            self.mounted = False

    def close(self, timeout: float = 10.0) -> None:
        """Unmount (lazily if busy), join every thread, close every fd."""
        if self.mounted:
            try:
                self.unmount()
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                log.warning("%s busy: unmounting lazily", self.mountpoint)
                self.unmount(lazy=True)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:  # a lazy unmount still in use: the fds must stay open
            raise TimeoutError(f"FUSE reader threads still serving: {', '.join(alive)}")
        self.threads.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def send_resend(self) -> None:
        """``FUSE_NOTIFY_RESEND`` on the first fd (a server taking over)."""
        os.write(self.fds[0], proto.notify_resend())

    def invalidate_entry(self, parent: int, name: bytes) -> bool:
        """Make the kernel forget the name ``name`` in directory ``parent``
        (added, removed or replaced), so that its entry cache never serves a
        stale name however long it may keep names. False if the kernel had
        nothing to forget or the connection is gone.

        Never call it holding :attr:`Tree.lock`: the kernel takes the
        directory's lock, which a reader thread listing that directory holds
        while it waits for the tree's."""
        if not self.mounted or not self.fds:
            return False
        try:
            os.write(self.fds[0], proto.notify_inval_entry(parent, name))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN, errno.EBADF):
                raise
            return False
        return True

    # --- serving -----------------------------------------------------------

    def _serve(self, fd: int) -> None:
        """One reader thread: take the turn, read a request, serve it, answer.

        Only the thread holding the turn reads (:class:`_Turn`), so one
        thread serves at a time and Python's lock never changes hands in
        the common case (measured: with every thread reading, 4 KiB writes
        cost about twice the CPU, in futex wakes and context switches). A
        request about to wait (:data:`~blksnap.fileio.may_block`: the
        disk, a chunk copy, a drain) hands the turn on, and so does one that
        has run longer than :data:`STALL` without saying so, so a spare
        thread reads and serves the next requests meanwhile.
        """
        turn = _Turn(self)
        may_block.hook = turn.give
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        readv, writev, handle = os.readv, os.writev, self.handle
        try:
            while True:
                if not turn.held:
                    turn.take()
                try:
                    n = readv(fd, [buf])
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    if e.errno != errno.ENODEV:  # ENODEV: unmounted or aborted
                        log.error("reading /dev/fuse: %s", e)
                    return
                turn.busy = True
                try:
                    out = handle(view[:n])
                except proto.ProtocolError as e:
                    out = self._refused(e)
                turn.busy = False
                turn.served += 1
                if out is None:
                    continue
                try:
                    writev(fd, out)
                except OSError as e:
                    if not self._answer_failed(fd, out, e):
                        return
        finally:
            turn.give()  # the next thread finds the connection gone too
            may_block.hook = None

    @staticmethod
    def _refused(e: proto.ProtocolError) -> list[bytes] | None:
        """The answer to a request that breaks the protocol (logged), if it
        can be answered at all."""
        log.error("bad FUSE request: %s", e)
        return None if e.unique is None else [proto.error(e.unique, e.errno)]

    def _answer_failed(self, fd: int, out: list[bytes], e: OSError) -> bool:
        """The answer ``out`` could not be written to ``fd``: False if the
        connection is gone (ENODEV), else True (logged, or sent on the fd
        that has the request). ENOENT: the request was interrupted or
        aborted meanwhile, or (an INTERRUPT's answer, odd unique) another fd
        has it."""
        if e.errno == errno.ENODEV:
            return False
        if e.errno != errno.ENOENT:
            log.error("answering FUSE request: %s", e)
        elif out[0][8] & proto.INT_REQ_BIT:
            self._answer_elsewhere(fd, out)
        return True

    def _serve_compiled(self, fd: int) -> None:
        """One reader thread with the compiled short way: it waits for
        requests in C (:func:`blksnap.shortway.serve`), which serves the
        READs and WRITEs of files bound to an open way and returns every
        other request here with the turn to serve in Python taken (one
        thread at a time, as :meth:`_serve`; handed on before a wait by
        :data:`may_block`), to be served as :meth:`_serve` does."""
        ways = self.ways
        assert ways is not None
        may_block.hook = ways.give
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        addr, pin = shortway.address(buf)
        size = len(buf)
        err = ctypes.c_int(0)
        serve, writev, handle = shortway.serve, os.writev, self.handle
        try:
            while True:
                n = serve(fd, addr, size, ways, err)
                if n < 0:
                    if -n != errno.ENODEV:  # unmounted or aborted
                        log.error("reading /dev/fuse: %s", os.strerror(-n))
                    return
                if n == 0:
                    log.error("answering FUSE request: %s", os.strerror(err.value))
                    continue
                try:
                    out = handle(view[:n])
                except proto.ProtocolError as e:
                    out = self._refused(e)
                if out is None:
                    continue
                try:
                    writev(fd, out)
                except OSError as e:
                    if not self._answer_failed(fd, out, e):
                        return
        finally:
            ways.give()
            may_block.hook = None
            del view, pin  # (buf's export, before buf goes)

    def handle(self, raw: memoryview) -> list[bytes] | None:
        """The reply to one request, as buffers for one ``writev`` (None: no reply).

        READ and WRITE of the usual shape (no extensions, lengths that add up)
        take a fast path that reads only the fields they need; everything
        else, and anything odd, is fully decoded and checked.
        """
        op = unique = 0
        try:
            if len(raw) >= _RW_END:
                length, op, unique, fh, offset, size = _RW_PEEK(raw)
                if op == _WRITE and length == len(raw) == _RW_END + size:
                    return self._write(unique, fh, offset, size, raw[_RW_END:])
                if op == _READ and length == len(raw) == _RW_END:
                    return self._read(unique, fh, offset, size)
            req = proto.decode(raw)
            op, unique, args = req.opcode, req.unique, req.args
            if op == _WRITE:
                return self._write(unique, args.fh, args.offset, args.size, req.data)
            if op == _READ:
                return self._read(unique, args.fh, args.offset, args.size)
            return self._slow(req)
        except proto.ProtocolError:
            raise
        except (OSError, BlksnapError) as e:  # (a backing may raise the engine's errors)
            err = e.errno or errno.EIO
            if err not in (errno.ENOENT, errno.ENOSYS):
                self.errors += 1
            return [proto.error(unique, err)]
        except Exception:
            log.exception("serving FUSE opcode %d", op)
            self.errors += 1
            return [proto.error(unique, errno.EIO)]

    def _write(self, unique: int, fh: int, offset: int, size: int, data: memoryview) -> list[bytes]:
        backing = self._file(fh).backing
        if offset + size > backing.size:
            raise OSError(errno.ENOSPC, "write past the end")
        backing.write(offset, data)
        return [_WRITE_REPLY(_WRITE_REPLY_LEN, 0, unique, size)]

    def _read(self, unique: int, fh: int, offset: int, size: int) -> list[bytes]:
        backing = self._file(fh).backing
        size = max(0, min(size, backing.size - offset))
        data = backing.read(offset, size) if size else b""
        return [proto.header(unique, len(data)), data]

    def _node(self, nodeid: int) -> Node:
        node = self.tree.nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ENOENT, "no such node")
        return node

    def _file(self, fh: int) -> Node:
        node = self._node(fh)
        if node.backing is None:
            raise OSError(errno.EISDIR, "a directory")
        return node

    def _slow(self, req: proto.Request) -> list[bytes] | None:
        op, unique, args = req.opcode, req.unique, req.args
        Op = proto.Opcode
        if op in proto.NO_REPLY:  # ids are never reused: lookup counts don't matter
            return None
        if op == Op.INTERRUPT:  # its own unique: the kernel stops sending them
            return [proto.error(unique, errno.ENOSYS)]
        if op == Op.INIT:  # resent to a server taking over from one that read it
            init = proto.negotiate(args, self.max_write, self.max_background)
            self.init = self.init or init
            return [proto.reply(unique, init.pack())]
        if op == Op.LOOKUP:
            parent = self._node(req.nodeid)
            child = parent.children.get(args.name)
            if child is None:
                raise OSError(errno.ENOENT, "no such entry")
            t = self.timeout
            return [proto.reply(unique, proto.entry_out(child.nodeid, self.tree.attr(child), t, t))]
        if op in (Op.GETATTR, Op.SETATTR):
            node = self._node(req.nodeid)
            resize = op == Op.SETATTR and args.valid & proto.FATTR_SIZE
            if resize and (node.backing is None or args.size != node.backing.size):
                raise OSError(errno.EINVAL, "the size of a served file is fixed")
            return [proto.reply(unique, proto.attr_out(self.tree.attr(node), self.timeout))]
        if op == Op.OPEN:
            node = self._node(req.nodeid)
            if node.backing is None:
                raise OSError(errno.EISDIR, "a directory")
            flags = proto.FOPEN_DIRECT_IO | proto.FOPEN_PARALLEL_DIRECT_WRITES
            return [proto.reply(unique, proto.open_out(node.nodeid, flags))]
        if op == Op.OPENDIR:
            node = self._node(req.nodeid)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            return [proto.reply(unique, proto.open_out(node.nodeid))]
        if op == Op.READDIR:
            return [proto.reply(unique, self._readdir(self._node(args.fh), args.offset, args.size))]
        if op in (Op.RELEASE, Op.RELEASEDIR, Op.FLUSH, Op.ACCESS, Op.DESTROY):
            # FLUSH is close(2), not a durability point: FSYNC is.
            return [proto.reply(unique)]
        if op == Op.FSYNC:
            self._file(args.fh).backing.flush()
            return [proto.reply(unique)]
        if op == Op.FALLOCATE:
            backing = self._file(args.fh).backing
            fallocate = getattr(backing, "fallocate", None)
            if fallocate is None:
                raise OSError(errno.EOPNOTSUPP, "no fallocate")
            if args.offset + args.length > backing.size and not args.mode & 1:
                raise OSError(errno.ENOSPC, "fallocate past the end")
            fallocate(args.mode, args.offset, args.length)
            return [proto.reply(unique)]
        if op == Op.STATFS:
            nodes = list(self.tree.nodes.values())
            blocks = sum((n.backing.size + 4095) // 4096 for n in nodes if n.backing)
            files = len(nodes)
            return [proto.reply(unique, proto.statfs_out(blocks, 0, 0, files, 0))]
        return [proto.error(unique, errno.ENOSYS)]

    def _answer_elsewhere(self, fd: int, out: list[bytes]) -> None:
        """An answer to an INTERRUPT (ENOSYS, so that the kernel sends no
        more) that the fd it was read on refused: the kernel takes it only on
        the fd whose thread is processing the interrupted request. Try the
        others; if none takes it, that request was answered meanwhile."""
        for other in list(self.fds):
            if other == fd:
                continue
            try:
                os.writev(other, out)
                return
            except OSError as e:
                if e.errno != errno.ENOENT:
                    return

    def _readdir(self, node: Node, offset: int, size: int) -> bytes:
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        with self.tree.lock:
            children = list(node.children.values())
        entries: Iterable[tuple[int, bytes, int]] = [
            (node.nodeid, b".", proto.DT_DIR),
            (proto.ROOT_ID, b"..", proto.DT_DIR),  # the kernel fixes up '..' itself
            *((c.nodeid, c.name, proto.DT_DIR if c.is_dir else proto.DT_REG) for c in children),
        ]
        out = bytearray()
        for i, (ino, name, dtype) in enumerate(entries):
            if i < offset:
                continue
            ent = proto.dirent(ino, i + 1, name, dtype)
            if len(out) + len(ent) > size:
                break
            out += ent
        return bytes(out)
