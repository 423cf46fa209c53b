#!/usr/bin/env python3
"""A do-nothing pyfuse3 file system: the ceiling of a pyfuse3 front-end.

One file, ``/disk``, of a given size. ``write`` returns at once without
looking at the data, ``read`` returns zeros, ``fsync`` does nothing. It is
mounted with the same options and opened in the same direct-I/O mode as
blksnapd's files, and served by the same ``pyfuse3.main`` loop, so fio on a
loop device over it measures what the FUSE round trip and pyfuse3's request
dispatch cost by themselves: no front-end built on pyfuse3 can beat it.

Usage: ``nullfs.py MOUNTPOINT --size BYTES``; runs in the foreground until
SIGTERM or SIGINT, then unmounts.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
NAME = b"disk"


class NullFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.zeros = bytes(1 << 20)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.size
            a.st_blocks = (self.size + 511) // 512
        a.st_blksize = 4096
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.attr_timeout = a.entry_timeout = 1.0
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INO), 1)

    async def releasedir(self, fh):
        return None

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=FILE_INO, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        if off >= self.size:
            return b""
        n = min(size, self.size - off)
        return self.zeros[:n] if n <= len(self.zeros) else bytes(n)

    async def write(self, fh, off, buf):
        return len(buf)

    async def flush(self, fh):
        return None

    async def fsync(self, fh, datasync):
        return None

    async def release(self, fh):
        return None


async def serve(mountpoint: str, size: int, max_tasks: int) -> None:
    fs = NullFS(size)
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    opts |= {"fsname=nullfs", "subtype=nullfs", "allow_other"}
    pyfuse3.init(fs, mountpoint, opts)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main, 1, max_tasks)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                print("ready", flush=True)
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="do-nothing pyfuse3 file system (one file, 'disk')")
    ap.add_argument("mountpoint")
    ap.add_argument("--size", type=int, required=True, help="size of /disk in bytes")
    ap.add_argument("--max-tasks", type=int, default=256, help="pyfuse3.main max_tasks")
    args = ap.parse_args(argv)
    trio.run(serve, args.mountpoint, args.size, args.max_tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
