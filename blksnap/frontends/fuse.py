"""FUSE front-end: each device and each snapshot image as a regular file.

Layout under the mount point::

    dev/<name>              the device (writes go through its filter stack)
    images/<id>/<name>      the image of device <name> in snapshot <id>

Both are attachable with ``losetup``. Files are opened in direct-I/O mode
(no page cache in front of the engine: a block device has none, and a take
must not leave dirty pages behind).

Where a request runs (measured with ``bench/fuse_bench.py``: on this
front-end the cost per request, not the bytes, is what limits a loop device):

- *Fast path*: a page-aligned device write whose filter stack cannot make it
  wait (:meth:`~blksnap.engine.device.Device.write_may_wait`: no filter, or
  the ``blksnap`` tracker when the device is in no snapshot, or in a taken
  one whose chunks under the write are all stored already, a rewrite) runs
  on the event loop's own thread. It is a CBT mark and a ``pwrite`` into the
  backing store's page cache: cheaper than handing it to a thread and back,
  which costs more event-loop time than the write itself. It is submitted
  inside :data:`~blksnap.engine.gate.no_wait`, so a write that would copy
  after all (a take armed copy-on-write between the check and the write) is
  refused untouched and goes to the pool.
- *Slow path*: everything else (reads, which may wait for the disk; fsync;
  image I/O; device writes that may copy chunks to diff storage or wait for
  another thread's copy, and any while the device is in a snapshot not yet
  taken) runs in a :class:`WorkerPool`, so requests proceed in parallel
  while the event loop keeps serving.

Either way a write is acknowledged only after the engine returned.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import outcome
import pyfuse3
import trio

from blksnap.engine.engine import Engine
from blksnap.engine.gate import WouldWait, no_wait
from blksnap.errors import BlksnapError
from blksnap.frontends.targets import Target, device_target, image_target
from blksnap.settings import SETTINGS, Settings

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
DEV_DIR = ROOT + 1
IMAGES_DIR = ROOT + 2
FIRST_DYNAMIC = 16
# Knobs (``SETTINGS``): ``fuse_cache_seconds``, the attribute and entry cache
# time (sizes only change on add/remove, which invalidate the entries
# explicitly); ``fuse_inline_write_max``, the largest device write served on
# the event loop thread (the fast path): a 1 MiB page-cache write blocks the
# loop for well under a millisecond and still beats the hand-off (sequential
# 1 MiB writes x1.6 over 128 KiB); FUSE sends nothing larger than 1 MiB
# anyway; ``fuse_threads``, the worker pool.
#: Fast-path writes must cover whole pages: a partial page of the backing
#: store's page cache may have to be read from the disk first.
PAGE_MASK = 4096 - 1


class WorkerPool:
    """A fixed set of worker threads for engine calls, with the cheapest
    hand-off trio allows.

    ``trio.to_thread.run_sync`` pays for a capacity limiter, the thread cache,
    a context copy and one event-loop wake-up per call; here a call is one
    ``SimpleQueue.put``, the task parks, and a worker that finishes queues the
    result and wakes the loop only if no wake-up is pending, so completions
    that arrive together cost one wake-up (4 KiB writes in threads: x1.5 over
    ``to_thread``). The pool size bounds the calls in flight, as the limiter
    did. Threads start on the first call (inside the event loop) and stop in
    :meth:`close`; they are daemon threads, so a pool never closed does not
    hold up the process exit.

    Like ``to_thread.run_sync`` (without abandon), a call cannot be cancelled
    once handed over: the task waits for its result.
    """

    def __init__(self, threads: int, name: str = "blksnap-fuse") -> None:
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = threads
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any] | None] = (
            queue.SimpleQueue()
        )
        self._done: collections.deque[tuple[Any, outcome.Outcome[Any]]] = collections.deque()
        self._wakeup_pending = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._threads: list[threading.Thread] = []

    def _start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread; its result, or its exception."""
        if self._token is None:
            self._start()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._jobs.put((fn, args, trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(_not_abortable)

    def _work(self) -> None:
        jobs, done = self._jobs, self._done
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, args, task = job
            done.append((task, outcome.capture(fn, *args)))
            # The loop clears the flag before it empties the queue, so a result
            # appended after the last drain always finds it clear.
            if not self._wakeup_pending:
                self._wakeup_pending = True
                assert self._token is not None
                try:
                    self._token.run_sync_soon(self._deliver)
                except trio.RunFinishedError:  # the loop is gone: nobody waits
                    return

    def _deliver(self) -> None:
        """In the event loop: wake every task whose call has finished."""
        self._wakeup_pending = False
        done = self._done
        while done:
            task, result = done.popleft()
            trio.lowlevel.reschedule(task, result)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads once the calls in flight are done."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        self._token = None


def _not_abortable(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


@dataclass
class Node:
    ino: int
    name: str
    parent: int
    kind: str  # "dir" | "device" | "image"
    children: dict[str, int] = field(default_factory=dict)
    #: For files: what to open (a device or an image target), looked up lazily.
    target: Callable[[], Target] | None = None
    size: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)


class BlksnapFS(pyfuse3.Operations):
    """The pyfuse3 operations. Mutations of the tree (``add_device`` ...) are
    called from the daemon's event loop thread."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        engine: Engine,
        *,
        threads: int | None = None,
        direct_io: bool = True,
        inline_write_max: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.direct_io = direct_io
        self.settings = settings or SETTINGS
        #: 0 turns the fast path off: every request goes to the pool.
        self.inline_write_max = (
            inline_write_max
            if inline_write_max is not None
            else self.settings.fuse_inline_write_max
        )
        self.cache_seconds = self.settings.fuse_cache_seconds
        self.pool = WorkerPool(threads if threads is not None else self.settings.fuse_threads)
        self._inos = itertools.count(FIRST_DYNAMIC)
        self._fhs = itertools.count(1)
        self._handles: dict[int, tuple[Target, int]] = {}
        self._lock = threading.Lock()
        self.nodes: dict[int, Node] = {}
        self._add(Node(ROOT, "", ROOT, "dir"))
        self._add(Node(DEV_DIR, "dev", ROOT, "dir"))
        self._add(Node(IMAGES_DIR, "images", ROOT, "dir"))
        self.uid, self.gid = os.getuid(), os.getgid()

    # -- the tree ---------------------------------------------------------------

    def _add(self, node: Node) -> Node:
        with self._lock:
            self.nodes[node.ino] = node
            if node.ino != node.parent:
                self.nodes[node.parent].children[node.name] = node.ino
        return node

    def _remove(self, parent: int, name: str) -> None:
        with self._lock:
            ino = self.nodes[parent].children.pop(name, None)
            if ino is None:
                return
            stack = [ino]
            while stack:
                node = self.nodes.pop(stack.pop(), None)
                if node is not None:
                    stack.extend(node.children.values())
        try:
            pyfuse3.invalidate_entry_async(parent, name.encode(), ignore_enoent=True)
        except Exception as exc:  # not mounted (tests of the tree alone)
            log.debug("invalidate %s: %s", name, exc)

    def add_device(self, name: str) -> None:
        dev = self.engine.device(name)
        self._add(
            Node(
                next(self._inos),
                name,
                DEV_DIR,
                "device",
                target=lambda: device_target(self.engine, name),
                size=dev.size,
            )
        )

    def remove_device(self, name: str) -> None:
        self._remove(DEV_DIR, name)

    def open_count(self, target: Any) -> int:
        """Open handles of the file served from ``target`` (a Device or an
        Image, or its target); a loop device over the file holds one."""
        return sum(1 for t, _ in list(self._handles.values()) if t is target or t.served is target)

    def add_snapshot(self, sid: str, names: list[str]) -> None:
        folder = self._add(Node(next(self._inos), sid, IMAGES_DIR, "dir"))
        for name in names:
            img = self.engine.image(sid, name)
            self._add(
                Node(
                    next(self._inos),
                    name,
                    folder.ino,
                    "image",
                    target=lambda name=name: image_target(self.engine, sid, name),
                    size=img.size,
                )
            )

    def remove_snapshot(self, sid: str) -> None:
        self._remove(IMAGES_DIR, sid)

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        if node.kind == "dir":
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        else:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = node.size
            a.st_blocks = (node.size + 511) // 512
        a.st_blksize = 4096
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        a.attr_timeout = a.entry_timeout = self.cache_seconds
        return a

    # -- metadata ------------------------------------------------------------------

    async def getattr(self, inode, ctx=None):
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        ino = parent.children.get(name.decode(errors="surrogateescape"))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._node(ino))

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size and attr.st_size != node.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a block device has a fixed size
        return self._attr(node)

    async def opendir(self, inode, ctx):
        if self._node(inode).kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        node = self._node(fh)
        entries = sorted(node.children.items())
        for i, (name, ino) in enumerate(entries[start_id:], start=start_id):
            child = self.nodes.get(ino)
            if child is None:
                continue
            if not pyfuse3.readdir_reply(token, name.encode(), self._attr(child), i + 1):
                break

    async def releasedir(self, fh):
        return None

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(n.size for n in list(self.nodes.values()) if n.kind != "dir")
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- data ------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.kind == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        assert node.target is not None
        try:
            target = node.target()
        except BlksnapError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        fh = next(self._fhs)
        self._handles[fh] = (target, node.size)
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=False)

    def _handle(self, fh: int) -> tuple[Target, int]:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.pool.run(fn, *args)
        except BlksnapError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    @staticmethod
    def _never_waits(target: Any, offset: int, length: int) -> bool:
        """Can a write to ``target`` wait on nothing but the page cache?

        Only a device whose filters all say the write will neither wait nor
        copy a chunk (:meth:`Device.write_may_wait`: the ``blksnap`` tracker
        knows; any other filter may delay I/O) qualifies; an image never
        does. The answer is taken outside the device's gate and may go
        stale before the write gets in; the tracker checks again inside it,
        since the write is submitted inside ``with no_wait:``; and a gate
        held shut while attach, detach, take or destroy drain it refuses at
        once rather than block the loop (:class:`~blksnap.engine.gate.WouldWait`,
        the write goes to the pool). If the tracker ever does I/O of its own
        on a write (a CBT persisted before the first write to a block), its
        answer must be revisited.
        """
        return not target.write_may_wait(offset, length)

    def close(self) -> None:
        """Stop the worker threads (after the FUSE session has ended)."""
        self.pool.close()

    async def read(self, fh, off, size):
        target, length = self._handle(fh)
        if off >= length:
            return b""
        return await self._call(target.read, off, min(size, length - off))

    async def write(self, fh, off, buf):
        target, length = self._handle(fh)
        n = len(buf)
        if off + n > length:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if (
            n <= self.inline_write_max
            and not (off | n) & PAGE_MASK
            and self._never_waits(target, off, n)
        ):
            try:
                with no_wait:
                    target.write(off, buf)
                return n
            except WouldWait:
                pass  # copy-on-write after all: the pool, below
            except BlksnapError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        await self._call(target.write, off, buf)
        return n

    async def flush(self, fh):
        return None

    async def fsync(self, fh, datasync):
        target, _ = self._handle(fh)
        await self._call(target.flush)

    async def release(self, fh):
        self._handles.pop(fh, None)


def mount_options(fsname: str = "blksnap") -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    opts |= {f"fsname={fsname}", "subtype=blksnap", "allow_other"}
    return opts
