"""``blksnap cbtinfo``, ``blksnap readcbtmap`` and ``blksnap markdirtyblock``:
the change-block tracking of a device."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
from typing import Any

from blksnap.cli.args import Commands, add_ranges
from blksnap.cli.output import Out
from blksnap.control.client import Client
from blksnap.errors import error, from_oserror
from blksnap.units import SECTOR_SHIFT


def register(sub: Any, cmd: Commands) -> None:
    ci = cmd(sub, "cbtinfo", "CBT geometry, generation and changes number of a device")
    ci.add_argument("-d", "--device", required=True)
    ci.set_defaults(handler=cbtinfo)
    rc = cmd(sub, "readcbtmap", "write the CBT map (one byte per block) to FILE")
    rc.add_argument("-d", "--device", required=True)
    rc.add_argument("-f", "--file", required=True)
    rc.set_defaults(handler=readcbtmap)
    md = cmd(sub, "markdirtyblock", "mark sector ranges changed in the CBT")
    md.add_argument("-d", "--device", required=True)
    add_ranges(md, "sectors to mark changed", required=True)
    md.set_defaults(handler=markdirtyblock)


def cbtinfo(args: argparse.Namespace, client: Client, out: Out) -> int:
    info = client.cbt_info(args.device).as_dict()
    out.emit(info, "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def readcbtmap(args: argparse.Namespace, client: Client, out: Out) -> int:
    if os.path.isdir(args.file):
        raise error(errno.EISDIR, f"-f {args.file}: is a directory; name a file")
    data = client.cbt_map(args.device)
    _write_file(args.file, data)
    changed = sum(1 for b in data if b)
    out.emit(
        {"device": args.device, "file": args.file, "block_count": len(data), "marked": changed},
        f"{len(data)} blocks written to {args.file} ({changed} marked)",
    )
    return 0


def markdirtyblock(args: argparse.Namespace, client: Client, out: Out) -> int:
    client.mark_dirty(args.device, args.ranges)
    out.emit(
        {
            "device": args.device,
            "ranges": [[o >> SECTOR_SHIFT, n >> SECTOR_SHIFT] for o, n in args.ranges],
        },
        f"{len(args.ranges)} range(s) marked",
    )
    return 0


def _write_file(path: str, data: bytes) -> None:
    """``data`` into ``path``: a regular file is replaced whole (written beside
    it, then renamed); anything else that exists (``/dev/stdout``, a pipe) is
    written as it is, never replaced."""
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise from_oserror(exc, f"-f {path}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise from_oserror(exc, f"-f {path}") from None
        return
    tmp = f"{path}.tmp{os.getpid()}"
    made = False
    try:
        with open(tmp, "xb") as f:
            made = True
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        if made:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise from_oserror(exc, f"-f {path}") from None
