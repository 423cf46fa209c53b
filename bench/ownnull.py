#!/usr/bin/env python3
"""Our own FUSE session's do-nothing mode, in a process of its own.

One file, ``/disk``, of a given size, served by
:class:`blksnap.frontends.fuse_session.FuseSession` from a
:class:`~blksnap.frontends.fuse_session.NullBacking`: writes return at once,
reads return zeroes. Same session, reader threads, mount options and
direct-I/O files as blksnapd's, with the engine taken out: fio on a loop
device over it measures what the FUSE round trip and the session's request
dispatch cost by themselves, the ceiling of blksnapd's front-end (as
``bench/nullfs.py`` is the ceiling of a pyfuse3 one).

With ``--file PATH`` it serves that file instead, each read a ``pread``
and each write a ``pwrite`` straight from the reader thread, with the page
cache treated as blksnapd treats a backing file (no readahead, clean cache
dropped at the start): for writes, the least any server in Python on this
session can do for a request that reaches a file, the ceiling of blksnapd's
engine. (Its reads hold the turn while they wait for the disk; blksnapd's
hand it on: no ceiling for reads.)

Usage: ``ownnull.py MOUNTPOINT --size BYTES [--threads N] [--file PATH]``;
prints ``ready`` once mounted, serves until SIGTERM or SIGINT, then unmounts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from blksnap.frontends.fuse_session import FileBacking, FuseSession, NullBacking, Tree
from blksnap.settings import SETTINGS


def serve(mountpoint: str, size: int, threads: int, file: str | None = None) -> int:
    """Mount the do-nothing session (or ``file``'s) at ``mountpoint`` until
    SIGTERM or SIGINT."""
    tree = Tree()
    if file is None:
        tree.add_file("disk", NullBacking(size))
    else:
        backing = FileBacking(file, size)
        os.posix_fadvise(backing.fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.posix_fadvise(backing.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        tree.add_file("disk", backing)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # only wakes pause()
    with FuseSession(tree, mountpoint, threads=threads):
        print("ready", flush=True)
        signal.pause()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="do-nothing file system on our own FUSE session")
    ap.add_argument("mountpoint")
    ap.add_argument("--size", type=int, required=True, help="size of /disk in bytes")
    ap.add_argument(
        "--threads",
        type=int,
        default=SETTINGS.fuse_threads,
        help=f"reader threads (default {SETTINGS.fuse_threads}, blksnapd's)",
    )
    ap.add_argument("--file", help="serve this file with pread/pwrite instead of doing nothing")
    args = ap.parse_args(argv)
    return serve(args.mountpoint, args.size, args.threads, args.file)


if __name__ == "__main__":
    sys.exit(main())
