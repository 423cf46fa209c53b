"""FUSE front-end: each device and each snapshot image as a regular file.

Layout under the mount point::

    dev/<name>              the device (writes go through its filter stack)
    images/<id>/<name>      the image of device <name> in snapshot <id>

Both are attachable with ``losetup``. Files are opened in direct-I/O mode
(no page cache in front of the engine: a block device has none, and a take
must not leave dirty pages behind). Engine calls run in worker threads under
a capacity limiter, so requests proceed in parallel while the event loop
keeps serving.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from ..engine import Engine
from ..errors import BlksnapError

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
DEV_DIR = ROOT + 1
IMAGES_DIR = ROOT + 2
FIRST_DYNAMIC = 16
#: Attribute and entry cache time. Sizes only change on add/remove, which
#: invalidate the entries explicitly.
CACHE_SECONDS = 1.0


@dataclass
class Node:
    ino: int
    name: str
    parent: int
    kind: str  # "dir" | "device" | "image"
    children: dict[str, int] = field(default_factory=dict)
    #: For files: what to open (a Device or an Image), looked up lazily.
    target: Callable[[], Any] | None = None
    size: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)


class BlksnapFS(pyfuse3.Operations):
    """The pyfuse3 operations. Mutations of the tree (``add_device`` ...) are
    called from the daemon's event loop thread."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, engine: Engine, *, threads: int = 16, direct_io: bool = True) -> None:
        super().__init__()
        self.engine = engine
        self.direct_io = direct_io
        self.limiter = trio.CapacityLimiter(threads)
        self._inos = itertools.count(FIRST_DYNAMIC)
        self._fhs = itertools.count(1)
        self._handles: dict[int, Any] = {}
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
                target=lambda: self.engine.device(name),
                size=dev.size,
            )
        )

    def remove_device(self, name: str) -> None:
        self._remove(DEV_DIR, name)

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
                    target=lambda name=name: self.engine.image(sid, name),
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
        a.attr_timeout = a.entry_timeout = CACHE_SECONDS
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

    def _handle(self, fh: int) -> tuple[Any, int]:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except BlksnapError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def read(self, fh, off, size):
        target, length = self._handle(fh)
        if off >= length:
            return b""
        return await self._call(target.read, off, min(size, length - off))

    async def write(self, fh, off, buf):
        target, length = self._handle(fh)
        if off + len(buf) > length:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        await self._call(target.write, off, buf)
        return len(buf)

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
