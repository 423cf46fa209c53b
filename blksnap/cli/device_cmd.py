"""``blksnap device add|remove|list``, ``blksnap attach`` and ``blksnap detach``."""

from __future__ import annotations

import argparse
from typing import Any

from blksnap.cli.args import Commands, optarg
from blksnap.cli.output import Out, table
from blksnap.control.client import Client
from blksnap.units import format_size


def register(sub: Any, cmd: Commands) -> None:
    dv = cmd(sub, "device", "serve, list and remove devices")
    dvsub = dv.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = cmd(dvsub, "add", "serve PATH (file or block device) as device NAME at <mount>/dev/NAME")
    add.add_argument("path")
    add.add_argument("--name", "-n", required=True)
    add.add_argument(
        "--loop", action="store_true", help="also attach a loop device; print its path"
    )
    add.set_defaults(handler=device_add, long_timeout=_with_loop)
    rm = cmd(dvsub, "remove", "stop serving a device (its loop device is detached)")
    rm.add_argument("name")
    rm.set_defaults(handler=device_remove, long_timeout=True)
    ls = cmd(dvsub, "list", "devices served")
    ls.set_defaults(handler=device_list)

    at = cmd(sub, "attach", "attach a filter (default: blksnap, the CBT + snapshot tracker)")
    at.add_argument("-d", "--device", required=True)
    at.add_argument("--filter", default="blksnap")
    at.add_argument("--opt", action="append", type=optarg, default=[], metavar="K=V")
    at.set_defaults(handler=attach)
    dt = cmd(sub, "detach", "detach a filter")
    dt.add_argument("-d", "--device", required=True)
    dt.add_argument("--filter", default="blksnap")
    dt.set_defaults(handler=detach)


def _with_loop(args: argparse.Namespace) -> bool:
    """Attaching a loop device may take long (device add --loop)."""
    return bool(args.loop)


def device_add(args: argparse.Namespace, client: Client, out: Out) -> int:
    r = client.add_device(args.path, args.name, loop=args.loop)
    out.emit(
        {
            "name": r["name"],
            "path": r["path"],
            "loop": r["loop"],
            "size": r["size"],
            "backing": r["backing"],
        },
        r["loop"] or r["path"],
    )
    return 0


def device_remove(args: argparse.Namespace, client: Client, out: Out) -> int:
    client.remove_device(args.name)
    out.emit({"name": args.name, "removed": True}, f"removed {args.name}")
    return 0


def device_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    devs = client.devices()
    rows = [
        [
            d["name"],
            format_size(d["size"]),
            d["loop"] or "-",
            ",".join(d["filters"]) or "-",
            d["backing"],
        ]
        for d in devs
    ]
    out.emit(
        devs,
        table(rows, ["NAME", "SIZE", "LOOP", "FILTERS", "BACKING"]) if devs else "no devices",
    )
    return 0


def attach(args: argparse.Namespace, client: Client, out: Out) -> int:
    client.attach(args.device, args.filter, dict(args.opt))
    out.emit(
        {"device": args.device, "filter": args.filter, "attached": True},
        f"{args.filter} attached to {args.device}",
    )
    return 0


def detach(args: argparse.Namespace, client: Client, out: Out) -> int:
    client.detach(args.device, args.filter)
    out.emit(
        {"device": args.device, "filter": args.filter, "detached": True},
        f"{args.filter} detached from {args.device}",
    )
    return 0
