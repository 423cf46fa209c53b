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
its lock and never gives a node id out twice, and each name added or removed
is invalidated in the kernel's entry cache (``FUSE_NOTIFY_INVAL_ENTRY``)
before the change returns, so names and attributes may be cached for long
(``SETTINGS.fuse_cache_seconds``) and still never be served stale.

The node ids and the open file handles are recorded in a JSON file
(``record``; blksnapd's state dir) on every change: what a process taking
over the connection needs to answer the kernel's ids (:meth:`OwnFS.record`).

``FALLOCATE`` reaches the engine: a punched hole is a trim of the target
(a loop device's DISCARD), a zeroed range its ``write_zeroes`` (a loop
device's WRITE_ZEROES with REQ_NOUNMAP); pyfuse3's front-end answers ENOSYS
to both, so the loop device refuses discards there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from blksnap import shortway
from blksnap.engine.engine import Engine
from blksnap.errors import BlksnapError
from blksnap.frontends import fuse_proto as proto
from blksnap.frontends.fuse_session import FuseSession, Node, Tree
from blksnap.frontends.targets import Target, backup_target, device_target, image_target
from blksnap.settings import SETTINGS, Settings

log = logging.getLogger(__name__)


def _os_error(exc: BlksnapError) -> OSError:
    return OSError(exc.errno, str(exc))


class TargetBacking:
    """A target (a device or an image) as a file of the tree. Reads and
    writes are the served object's own methods, called by the session with
    no layer between (it answers an engine error with its errno); the rest
    turns engine errors into ``OSError``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.size = target.size
        self.read: Callable[[int, int], bytes | bytearray] = target.served.read
        self.write: Callable[[int, memoryview], None] = target.served.write
        #: A device's or image's compiled short way (None: a backup, or none built).
        self.short_way: shortway.Way | None = getattr(target.served, "short_way", None)

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

    def __init__(self, fs: OwnFS, mountpoint: str, threads: int, timeout: float) -> None:
        super().__init__(fs.tree, mountpoint, threads=threads, timeout=timeout)
        self.fs = fs
        self.ways = fs.nodes
        self.handles: dict[int, Node] = {}
        #: The unique of the OPEN each handle was made for (its resend bit
        #: cleared): a server killed between recording a handle and
        #: answering its OPEN leaves the kernel without it, and the kernel
        #: sends that OPEN again to the next server, which must give back
        #: the handle recorded rather than make a second one nobody releases.
        self.opens: dict[int, int] = {}

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
            unique = req.unique & ~proto.RESEND_BIT
            with self.fs.record_lock:
                fh = self._made_for(unique, node) if req.resent else None
                if fh is None:
                    fh = self.fs.next_fh
                    self.fs.next_fh += 1
                    self.handles[fh] = node
                    self.opens[fh] = unique
                    self.fs.save()
            flags = proto.FOPEN_DIRECT_IO | proto.FOPEN_PARALLEL_DIRECT_WRITES
            return [proto.reply(req.unique, proto.open_out(fh, flags))]
        if op == proto.Opcode.RELEASE:
            with self.fs.record_lock:
                self.opens.pop(req.args.fh, None)
                if self.handles.pop(req.args.fh, None) is not None:
                    self.fs.save()
            return [proto.reply(req.unique)]
        return super()._slow(req)

    def _made_for(self, unique: int, node: Node) -> int | None:
        """The handle already made (by this server or the one before) for
        the OPEN ``unique`` of ``node``, if any."""
        for fh, u in self.opens.items():
            if u == unique and self.handles.get(fh) is node:
                return fh
        return None


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
        cache_seconds: float | None = None,
        record: str | None = None,
        resume: dict[str, Any] | None = None,
        short_way: bool | None = None,
    ) -> None:
        self.engine = engine
        #: Devices' READs and WRITEs served in C (:mod:`blksnap.shortway`);
        #: by default whenever it is built and not turned off.
        self.short_way = shortway.LIB is not None if short_way is None else short_way
        if self.short_way and shortway.LIB is None:
            raise RuntimeError(f"no compiled short way: {shortway.WHY_NOT}")
        #: Which device file (node id) takes which device's short way.
        self.nodes = shortway.Nodes() if self.short_way else None
        self.settings = settings or SETTINGS
        self.threads = threads if threads is not None else self.settings.fuse_threads
        self.cache_seconds = (
            cache_seconds if cache_seconds is not None else self.settings.fuse_cache_seconds
        )
        #: Where the node ids and handles are recorded (None: nowhere).
        self.record_path = record
        self.record_lock = threading.RLock()
        self.next_fh = 1
        #: The record of the process this one takes over from (:meth:`record`).
        self.resume = resume
        #: Taking over: the record is not written until the tree is rebuilt
        #: (a crash meanwhile leaves the next process the complete old one).
        self._rebuilding = resume is not None
        if resume is not None:
            self.tree = Tree(resume.get("nodes") or {}, int(resume.get("next_id", 0)))
            self.next_fh = int(resume.get("next_fh", 1))
        else:
            self.tree = Tree()
        self.dev = self.tree.add_dir("dev")
        self.images = self.tree.add_dir("images")
        self.backups = self.tree.add_dir("backups")
        self.session: _Session | None = None
        self.save()

    # -- the record ---------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """``{"version", "next_id", "nodes": {path: id}, "next_fh", "handles":
        {fh: path}, "opens": {fh: unique}}``: what a process taking over the
        live connection needs to give every name the id the kernel knows, to
        know the handles open on it, and to answer an OPEN the kernel sends
        again with the handle made for it (a record without "opens", from an
        older blksnapd, is read as one without such OPENs)."""
        doc: dict[str, Any] = {"version": 1, **self.tree.record(), "next_fh": self.next_fh}
        s = self.session
        handles = dict(s.handles) if s is not None else {}
        opens = dict(s.opens) if s is not None else {}
        doc["handles"] = {str(fh): node.path for fh, node in sorted(handles.items())}
        doc["opens"] = {str(fh): u for fh, u in sorted(opens.items()) if fh in handles}
        return doc

    def save(self) -> None:
        """Write :meth:`record` to ``record`` atomically (a new file renamed
        over the old). Not fsynced: the connection it describes ends with
        the machine anyway."""
        if self.record_path is None or self._rebuilding:
            return
        with self.record_lock:
            tmp = f"{self.record_path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.record(), f, indent=1, sort_keys=True)
            os.replace(tmp, self.record_path)

    def _changed(self, parent: Node, name: str) -> None:
        """After a name of ``parent`` was added or removed: recorded, and
        forgotten by the kernel's entry cache."""
        self.save()
        s = self.session
        if s is not None:
            s.invalidate_entry(parent.nodeid, name.encode())

    # -- life ---------------------------------------------------------------------

    def mount(self, mountpoint: str) -> None:
        """Mount at ``mountpoint`` and start the reader threads."""
        session = _Session(self, mountpoint, self.threads, self.cache_seconds)
        self.session = session
        try:
            session.mount()
        except BaseException:
            self.session = None
            raise

    def adopt(self, mountpoint: str, fds: list[int], *, initialized: bool) -> None:
        """Serve the connection on ``fds`` that another process mounted at
        ``mountpoint`` (:meth:`FuseSession.adopt`). Taking over (a ``resume``
        record given), the kernel's open file handles are given back to the
        files they were opened on: call it after the tree was rebuilt."""
        session = _Session(self, mountpoint, len(fds), self.cache_seconds)
        if self.resume is not None:
            opens = self.resume.get("opens") or {}
            for fh, path in (self.resume.get("handles") or {}).items():
                node = self.tree.lookup(path)
                if node is None:
                    log.warning("file handle %s: %s is gone; its reads and writes fail", fh, path)
                    continue
                session.handles[int(fh)] = node
                if fh in opens:
                    session.opens[int(fh)] = int(opens[fh])
        self.session = session
        try:
            session.adopt(fds, initialized=initialized)
        except BaseException:
            self.session = None
            raise
        self._rebuilding = False
        self.save()
        if self.resume is not None:
            self._forget_gone(session, self.resume.get("nodes") or {})

    def _forget_gone(self, session: _Session, old: dict[str, int]) -> None:
        """Names the process before had and this one has not (a snapshot that
        did not survive it): out of the kernel's entry cache."""
        for path in sorted(old, key=len):
            if self.tree.lookup(path) is not None:
                continue
            parent, _, name = path.rpartition("/")
            if parent and self.tree.lookup(parent) is None:
                continue  # gone with its parent
            pid = old.get(parent, proto.ROOT_ID) if parent else proto.ROOT_ID
            session.invalidate_entry(pid, name.encode())

    def alive(self) -> bool:
        """Is every reader thread still serving? (They end when the kernel
        ends the connection: an abort, the mount taken away.)"""
        s = self.session
        return s is not None and bool(s.threads) and all(t.is_alive() for t in s.threads)

    def close(self, timeout: float = 10.0) -> None:
        """Unmount (lazily if busy) and join the reader threads (at most
        ``timeout`` seconds: :class:`TimeoutError` if some still serve)."""
        session, self.session = self.session, None
        if session is not None:
            session.close(timeout)  # (TimeoutError: threads may still be in C)
        nodes, self.nodes = self.nodes, None
        if nodes is not None:
            nodes.free()

    # -- the tree -----------------------------------------------------------------

    def _bind(self, node: Node) -> None:
        """A device's or image's file: its reads (and writes) take its
        compiled short way."""
        way = getattr(node.backing, "short_way", None)
        if self.nodes is not None and way is not None and not self.nodes.bind(node.nodeid, way):
            log.warning("%s: no room in the short way's table: served in Python", node.path)

    def _unbind(self, node: Node) -> None:
        if self.nodes is not None:
            self.nodes.unbind(node.nodeid)

    def add_device(self, name: str) -> None:
        backing = TargetBacking(device_target(self.engine, name))
        self._bind(self.tree.add_file(f"dev/{name}", backing))
        self._changed(self.dev, name)

    def remove_device(self, name: str) -> None:
        node = self.tree.remove(f"dev/{name}")
        if node is not None:
            self._unbind(node)
        self._changed(self.dev, name)

    def add_snapshot(self, sid: str, names: list[str]) -> None:
        with self.tree.lock:  # the folder appears with all its files
            self.tree.add_dir(f"images/{sid}")
            for name in names:
                backing = TargetBacking(image_target(self.engine, sid, name))
                self._bind(self.tree.add_file(f"images/{sid}/{name}", backing))
        self._changed(self.images, sid)

    def remove_snapshot(self, sid: str) -> None:
        folder = self.tree.remove(f"images/{sid}")
        if folder is not None:
            for node in folder.children.values():
                self._unbind(node)
        self._changed(self.images, sid)

    def add_backup(self, key: str) -> None:
        """``backups/B/N`` for the mounted backup ``key`` (``B/N``), read-only."""
        bid, _, name = key.partition("/")
        backing = TargetBacking(backup_target(self.engine, key))
        with self.tree.lock:
            if self.tree.lookup(f"backups/{bid}") is None:
                self.tree.add_dir(f"backups/{bid}")
            self.tree.add_file(f"backups/{bid}/{name}", backing, mode=0o400)
        self._changed(self.backups, bid)

    def remove_backup(self, key: str) -> None:
        bid, _, name = key.partition("/")
        with self.tree.lock:
            self.tree.remove(f"backups/{bid}/{name}")
            folder = self.tree.lookup(f"backups/{bid}")
            empty = folder is not None and not folder.children
            if empty:
                self.tree.remove(f"backups/{bid}")
        if not empty:
            node = self.tree.lookup(f"backups/{bid}")
            if node is not None:
                self._changed(node, name)
        self._changed(self.backups, bid)

    def open_count(self, target: Any) -> int:
        """Open handles of the file served from ``target`` (a Device, an
        Image or a mounted backup's Source, or its target); a loop device
        over the file holds one."""
        s = self.session
        if s is None:
            return 0
        n = 0
        for node in list(s.handles.values()):
            t = node.backing.target if isinstance(node.backing, TargetBacking) else None
            if t is not None and (
                t is target or t.served is target or getattr(t.served, "source", None) is target
            ):
                n += 1
        return n
