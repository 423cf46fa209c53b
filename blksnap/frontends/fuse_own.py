"""blksnapd's FUSE files on our own session (:mod:`fuse_session`), no pyfuse3.

The same layout and public methods as :class:`blksnap.frontends.fuse.BlksnapFS`
(``dev/<name>``, ``images/<id>/<name>``; ``add_device``, ``remove_device``,
``add_snapshot``, ``remove_snapshot``, ``open_count``, ``close``), served by
reader threads on cloned ``/dev/fuse`` fds instead of an event loop: each
request runs to its end in the thread that read it. A copy-on-write write
may wait there (for the copy, for another thread's copy, for a take's
gate), so the session has ``SETTINGS.fuse_threads`` threads and the others
keep serving meanwhile.

The tree changes while mounted (devices added and removed, snapshots taken
and destroyed): :class:`~blksnap.frontends.fuse_session.Tree` changes under
its lock and never gives a node id out twice. Entries and attributes are
cached for :data:`CACHE_SECONDS` (0: the kernel asks again at every path
walk), so a name removed is never served stale; kernel invalidation
notifications (``FUSE_NOTIFY_INVAL_ENTRY``) would let the cache time grow,
and are not sent yet.

``FALLOCATE`` reaches the engine: a punched hole is a trim of the target
(a loop device's DISCARD), a zeroed range its ``write_zeroes`` (a loop
device's WRITE_ZEROES with REQ_NOUNMAP); pyfuse3's front-end answers ENOSYS
to both, so the loop device refuses discards there.
"""

from __future__ import annotations

import errno
import itertools
import logging
from typing import Any

from blksnap.engine.engine import Engine
from blksnap.errors import BlksnapError
from blksnap.frontends import fuse_proto as proto
from blksnap.frontends.fuse_session import FuseSession, Node, Tree
from blksnap.frontends.targets import Target, device_target, image_target
from blksnap.settings import SETTINGS, Settings

log = logging.getLogger(__name__)

#: Entry and attribute cache time given to the kernel (see the module doc).
CACHE_SECONDS = 0.0


def _os_error(exc: BlksnapError) -> OSError:
    return OSError(exc.errno, str(exc))


class TargetBacking:
    """A target (a device or an image) as a file of the tree: engine errors
    become ``OSError`` with their errno, which the session answers with."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.size = target.size

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self.target.read(offset, length)
        except BlksnapError as exc:
            raise _os_error(exc) from None

    def write(self, offset: int, data: memoryview) -> None:
        try:
            self.target.write(offset, data)
        except BlksnapError as exc:
            raise _os_error(exc) from None

    def flush(self) -> None:
        try:
            self.target.flush()
        except BlksnapError as exc:
            raise _os_error(exc) from None

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """Punch hole: trim; zero range: zeros, the space kept. A plain
        allocation (mode 0, or KEEP_SIZE alone) of a fixed-size file whose
        blocks always exist: nothing to do."""
        end = min(offset + length, self.size)
        if end <= offset:
            return
        try:
            if mode & proto.FALLOC_FL_PUNCH_HOLE:
                self.target.trim(offset, end - offset)
            elif mode & proto.FALLOC_FL_ZERO_RANGE:
                self.target.write_zeroes(offset, end - offset, unmap=False)
            elif mode & ~proto.FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        except BlksnapError as exc:
            raise _os_error(exc) from None


class _Session(FuseSession):
    """The session with file handles of their own (so that open handles can
    be counted, and a handle outlives its name: a removed device's file
    still open answers ENOENT rather than someone else's data)."""

    def __init__(self, tree: Tree, mountpoint: str, threads: int, timeout: float) -> None:
        super().__init__(tree, mountpoint, threads=threads, timeout=timeout)
        self._fhs = itertools.count(1)
        self.handles: dict[int, Node] = {}

    def _file(self, fh: int) -> Node:
        node = self.handles.get(fh)
        if node is None:
            raise OSError(errno.EBADF, "no such file handle")
        if node.backing is None:
            raise OSError(errno.EISDIR, "a directory")
        return node

    def _slow(self, req: proto.Request) -> list[bytes] | None:
        op = req.opcode
        if op == proto.Opcode.OPEN:
            node = self._node(req.nodeid)
            if node.backing is None:
                raise OSError(errno.EISDIR, "a directory")
            fh = next(self._fhs)
            self.handles[fh] = node
            flags = proto.FOPEN_DIRECT_IO | proto.FOPEN_PARALLEL_DIRECT_WRITES
            return [proto.reply(req.unique, proto.open_out(fh, flags))]
        if op == proto.Opcode.RELEASE:
            self.handles.pop(req.args.fh, None)
            return [proto.reply(req.unique)]
        return super()._slow(req)


class OwnFS:
    """blksnapd's FUSE files on a :class:`FuseSession`. Tree changes come
    from the daemon's event loop thread; requests are served in the
    session's reader threads."""

    def __init__(
        self,
        engine: Engine,
        *,
        threads: int | None = None,
        settings: Settings | None = None,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self.engine = engine
        self.settings = settings or SETTINGS
        self.threads = threads if threads is not None else self.settings.fuse_threads
        self.cache_seconds = cache_seconds
        self.tree = Tree()
        self.tree.add_dir("dev")
        self.tree.add_dir("images")
        self.session: _Session | None = None

    # -- life ---------------------------------------------------------------------

    def mount(self, mountpoint: str) -> None:
        """Mount at ``mountpoint`` and start the reader threads."""
        session = _Session(self.tree, mountpoint, self.threads, self.cache_seconds)
        session.mount()
        self.session = session

    def alive(self) -> bool:
        """Is every reader thread still serving? (They end when the kernel
        ends the connection: an abort, the mount taken away.)"""
        s = self.session
        return s is not None and bool(s.threads) and all(t.is_alive() for t in s.threads)

    def close(self) -> None:
        """Unmount (lazily if busy) and join the reader threads."""
        session, self.session = self.session, None
        if session is not None:
            session.close()

    # -- the tree -----------------------------------------------------------------

    def add_device(self, name: str) -> None:
        self.tree.add_file(f"dev/{name}", TargetBacking(device_target(self.engine, name)))

    def remove_device(self, name: str) -> None:
        self.tree.remove(f"dev/{name}")

    def add_snapshot(self, sid: str, names: list[str]) -> None:
        with self.tree.lock:  # the folder appears with all its files
            self.tree.add_dir(f"images/{sid}")
            for name in names:
                backing = TargetBacking(image_target(self.engine, sid, name))
                self.tree.add_file(f"images/{sid}/{name}", backing)

    def remove_snapshot(self, sid: str) -> None:
        self.tree.remove(f"images/{sid}")

    def open_count(self, target: Any) -> int:
        """Open handles of the file served from ``target`` (a Device or an
        Image, or its target); a loop device over the file holds one."""
        s = self.session
        if s is None:
            return 0
        n = 0
        for node in list(s.handles.values()):
            t = node.backing.target if isinstance(node.backing, TargetBacking) else None
            if t is not None and (t is target or t.served is target):
                n += 1
        return n
