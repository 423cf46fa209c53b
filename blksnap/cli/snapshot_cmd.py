"""``blksnap snapshot create|appendstorage|take|info|collect|waitevent|watch|destroy``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

from blksnap.cli.args import Commands, add_ranges, sizearg
from blksnap.cli.output import Out
from blksnap.control.client import Client
from blksnap.errors import BlksnapError, InvalidArgument
from blksnap.units import format_size, parse_size


def register(sub: Any, cmd: Commands) -> None:
    sn = cmd(sub, "snapshot", "create, take, watch and destroy snapshots")
    ssub = sn.add_subparsers(dest="action", metavar="ACTION", required=True)
    cr = cmd(
        ssub,
        "create",
        "a snapshot of one or more devices; prints its id",
        epilog="Diff storage is given here with -f (and -l), or afterwards in two steps, "
        "as with the kernel module's tool: 'blksnap snapshot create -d N' (no -f), then "
        "'blksnap snapshot appendstorage -i ID -f PATH -l SIZE' (as often as needed), then "
        "'blksnap snapshot take -i ID'. A take without any diff storage is refused "
        "(EINVAL) and leaves the snapshot as it was. Storage on a file system that a "
        "blksnapd device carries (the protected root itself) is a regular file, or a "
        "directory where blksnap makes one: preallocated to -l, written through its "
        "extents below the device's filters, immutable while the snapshot lives "
        "(ext2/3/4 and xfs only). A limit its file system cannot hold: ENOSPC.",
    )
    cr.add_argument("-d", "--device", dest="devices", nargs="+", action="extend", required=True)
    cr.add_argument(
        "-f",
        "--storage",
        help="diff storage: a directory (an anonymous file there), a regular file or a "
        "block device; never a device of the snapshot itself (EINVAL)",
    )
    cr.add_argument("-l", "--limit", type=sizearg, help="most diff storage to use from it")
    add_ranges(cr, "use only these sectors of the storage")
    cr.set_defaults(handler=create)
    ap = cmd(ssub, "appendstorage", "grow the diff storage of a live snapshot")
    ap.add_argument("-i", "--id", required=True)
    ap.add_argument("-f", "--storage", required=True)
    ap.add_argument("-l", "--limit", type=sizearg, help="size to use (needed for a directory)")
    add_ranges(ap, "use only these sectors of the storage")
    ap.set_defaults(handler=appendstorage)
    tk = cmd(ssub, "take", "take the snapshot: all its devices at one instant; images appear")
    tk.add_argument("-i", "--id", required=True)
    tk.add_argument("--loop", action="store_true", help="attach a loop device to each image")
    tk.set_defaults(handler=take, long_timeout=True)
    si = cmd(ssub, "info", "the snapshot a device is in: state, error, image")
    si.add_argument("-d", "--device", required=True)
    si.set_defaults(handler=info)
    co = cmd(ssub, "collect", "snapshots, their devices, images and state")
    co.add_argument("-i", "--id")
    co.set_defaults(handler=collect)
    # Its -t/--timeout is the wait in milliseconds, as in the kernel module's
    # tool; the global --timeout goes before the command here.
    we = cmd(ssub, "waitevent", "wait for the next event of a snapshot", parents=[cmd.base])
    we.add_argument("-i", "--id", required=True)
    we.add_argument("-t", "--timeout", type=int, default=1000, help="milliseconds (default 1000)")
    we.set_defaults(handler=waitevent)
    wa = cmd(ssub, "watch", "follow a snapshot's events until it ends; optionally grow its storage")
    wa.add_argument("-i", "--id", required=True)
    wa.add_argument("--extend", metavar="DIR", help="on low_free_space, add storage in DIR")
    wa.add_argument(
        "--step", type=sizearg, default=None, help="storage added each time (default 1G)"
    )
    wa.add_argument("--max", type=sizearg, default=None, help="most storage to add in all")
    wa.set_defaults(handler=watch)
    ds = cmd(
        ssub,
        "destroy",
        "release a snapshot; its images vanish (refused with EBUSY while an image is "
        "mounted or open)",
    )
    ds.add_argument("-i", "--id", required=True)
    ds.add_argument("--force", action="store_true", help="destroy even while its images are in use")
    ds.set_defaults(handler=destroy, long_timeout=True)


def create(args: argparse.Namespace, client: Client, out: Out) -> int:
    sid = client.snapshot_create(args.devices, args.storage, args.limit, args.ranges)
    out.emit({"id": sid}, sid)
    if not args.storage:
        print(
            f"blksnap: snapshot {sid} has no diff storage yet; add some before "
            f"'snapshot take' with: blksnap snapshot appendstorage -i {sid} -f PATH "
            "[-l SIZE]",
            file=sys.stderr,
        )
    return 0


def appendstorage(args: argparse.Namespace, client: Client, out: Out) -> int:
    r = client.snapshot_append_storage(args.id, args.storage, size=args.limit, ranges=args.ranges)
    out.emit(
        r,
        f"storage of {args.id}: {format_size(r['storage']['capacity'])}, "
        f"{format_size(r['storage']['free'])} free",
    )
    return 0


def take(args: argparse.Namespace, client: Client, out: Out) -> int:
    r = client.snapshot_take(args.id, loop=args.loop)
    text = "\n".join(f"{n}: {i['loop'] or i['path']}" for n, i in sorted(r["images"].items()))
    out.emit(r, text)
    return 0


def info(args: argparse.Namespace, client: Client, out: Out) -> int:
    r = client.snapshot_info(args.device)
    out.emit(
        r,
        f"snapshot {r['id']} ({r['state']}), error {r['error'] or 'none'}\n"
        f"image {r['image'] or '-'}" + (f" on {r['loop']}" if r["loop"] else ""),
    )
    return 0


def collect(args: argparse.Namespace, client: Client, out: Out) -> int:
    snaps = client.snapshot_collect(args.id)
    lines = []
    for s in snaps:
        lines.append(
            f"{s['id']}  {s['state']}"
            + (f" ({s['error']})" if s["error"] else "")
            + f"  storage {format_size(s['storage']['used'])}"
            + f" of {format_size(s['storage']['capacity'])}"
        )
        for d in s["devices"]:
            lines.append(f"  {d['name']}: " + (d["loop"] or d["image"] or "(not taken)"))
    out.emit(snaps, "\n".join(lines) if snaps else "no snapshots")
    return 0


def waitevent(args: argparse.Namespace, client: Client, out: Out) -> int:
    ev = client.wait_event(args.id, timeout=args.timeout / 1000.0)
    doc = (
        {"event": ev.code, "data": ev.data, "time": ev.time}
        if ev
        else {"event": "timeout", "data": {}}
    )
    out.emit(doc, doc["event"] + (f" {json.dumps(doc['data'])}" if doc["data"] else ""))
    return 0


def watch(args: argparse.Namespace, client: Client, out: Out) -> int:
    step = args.step or parse_size("1G")
    cap = args.max
    added = 0
    if args.extend and not os.path.isdir(args.extend):
        raise InvalidArgument(f"--extend {args.extend}: not a directory")
    out.line({"event": "watching", "id": args.id}, f"watching snapshot {args.id} (Ctrl-C to stop)")
    while True:
        try:
            ev = client.wait_event(args.id, timeout=1.0)
        except BlksnapError as exc:
            if exc.errno == errno.ENOENT:
                out.line({"event": "gone", "id": args.id}, f"snapshot {args.id} is gone")
                return 0
            raise
        if ev is None:
            continue
        out.line(
            {"event": ev.code, "data": ev.data, "time": ev.time},
            f"{ev.code}: {json.dumps(ev.data)}",
        )
        if ev.code == "corrupted":
            return 1
        if ev.code == "low_free_space" and args.extend:
            size = step if cap is None else min(step, cap - added)
            if size <= 0:
                out.line(
                    {"event": "limit", "added": added},
                    f"not extending: --max {format_size(cap or 0)} reached",
                )
                continue
            client.snapshot_append_storage(args.id, args.extend, size=size)
            added += size
            out.line(
                {"event": "extended", "size": size, "added": added, "path": args.extend},
                f"extended by {format_size(size)} in {args.extend} "
                f"({format_size(added)} added in all)",
            )


def destroy(args: argparse.Namespace, client: Client, out: Out) -> int:
    client.snapshot_destroy(args.id, force=args.force)
    out.emit({"id": args.id, "destroyed": True}, f"destroyed {args.id}")
    return 0
