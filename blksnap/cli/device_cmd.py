"""``blksnap device add|remove|list``, ``blksnap attach`` and ``blksnap detach``."""

from __future__ import annotations

import argparse
import functools
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

    at = cmd(
        sub,
        "attach",
        "attach a filter to a device in use (default: blksnap, the CBT + snapshot tracker)",
        epilog=functools.partial(_filters_help, options=True),
        formatter_class=_LazyEpilog,
    )
    at.add_argument("-d", "--device", required=True)
    at.add_argument("--filter", default="blksnap")
    at.add_argument(
        "--opt", action="append", type=optarg, default=[], metavar="K=V", help="a filter option"
    )
    at.set_defaults(handler=attach)
    dt = cmd(sub, "detach", "detach a filter")
    dt.add_argument("-d", "--device", required=True)
    dt.add_argument("--filter", default="blksnap")
    dt.set_defaults(handler=detach)

    ct = cmd(
        sub,
        "ctl",
        "a filter's control command (e.g. flakey down, powercut cut, migrate status)",
        epilog=functools.partial(_filters_help, options=False),
        formatter_class=_LazyEpilog,
    )
    ct.add_argument("-d", "--device", required=True)
    ct.add_argument("--filter", required=True)
    ct.add_argument("command", metavar="CMD")
    ct.add_argument("arg", metavar="ARG", nargs="?", default=None)
    ct.set_defaults(handler=ctl)

    fl = cmd(sub, "filter", "the filters blksnapd knows")
    flsub = fl.add_subparsers(dest="action", metavar="ACTION", required=True)
    fls = cmd(flsub, "list", "registered filters: altitude (lowest sees requests first), "
              "options and control commands")  # fmt: skip
    fls.set_defaults(handler=filter_list)


class _LazyEpilog(argparse.RawDescriptionHelpFormatter):
    """An epilog given as a function is made only when help is shown: the
    filters' help loads the engine, which every other command can do without
    (it is most of a command's start-up time)."""

    def _format_text(self, text: Any) -> str:
        return super()._format_text(text() if callable(text) else text)


def _filters_help(*, options: bool) -> str:
    """The built-in filters' options or commands, for --help."""
    from blksnap.engine.engine import BUILTIN_FILTERS

    lines = ["filters (by altitude: the lowest sees a request first):"]
    for cls in BUILTIN_FILTERS:
        lines.append(f"  {cls.name} ({cls.altitude}): {cls.summary}")
        for key, what in (cls.options if options else cls.commands).items():
            lines.append(f"      {key}{'=V' if options else ''}: {what}")
    return "\n".join(lines)


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


def _stack_text(d: dict[str, Any]) -> str:
    """A device's filters in the order requests meet them, with a word of
    state where there is one (flakey down, power cut, migration progress)."""
    parts = []
    for f in d.get("stack") or [{"filter": n, "status": None} for n in d["filters"]]:
        st = f.get("status") or {}
        word = ""
        if f["filter"] == "migrate" and st:
            word = f"{st['state']} {100 * st['copied'] // max(st['total'], 1)}%"
        elif f["filter"] in ("flakey", "powercut") and st:
            word = st["state"]
        parts.append(f"{f['filter']}({word})" if word else f["filter"])
    return ">".join(parts) or "-"


def device_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    devs = client.devices()
    rows = [
        [
            d["name"],
            format_size(d["size"]),
            d["loop"] or "-",
            _stack_text(d),
            d["backing"],
        ]
        for d in devs
    ]
    text = table(rows, ["NAME", "SIZE", "LOOP", "FILTERS", "BACKING"]) if devs else "no devices"
    for d in devs:
        h = d.get("hydration")
        if h and h.get("state") != "done":
            text += "\n" + _hydration_text(d["name"], h)
    out.emit(devs, text)
    return 0


def _hydration_text(name: str, h: dict) -> str:
    total = h.get("total") or 1
    line = (
        f"{name}: hydration {h['state']}, {format_size(h['done'])} of {format_size(total)}"
        f" ({100 * h['done'] / total:.1f} %) from {h.get('source')}"
    )
    if h.get("rate"):
        line += f", {format_size(h['rate'])}/s"
    if h.get("error"):
        line += f": {h['error']}"
    return line


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


def ctl(args: argparse.Namespace, client: Client, out: Out) -> int:
    result = client.ctl(args.device, args.filter, args.command, args.arg)
    if isinstance(result, dict):
        text = "\n".join(f"{k}: {v}" for k, v in result.items())
    else:
        text = "done" if result is None else str(result)
    out.emit(result, text)
    return 0


def filter_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    kinds = client.filter_list()
    rows = [
        [
            str(k["altitude"]),
            k["filter"],
            ",".join(k["options"]) or "-",
            ",".join(k["commands"]) or "-",
            k["summary"],
        ]
        for k in kinds
    ]
    out.emit(kinds, table(rows, ["ALTITUDE", "FILTER", "OPTIONS", "CTL", "WHAT"]))
    return 0
