"""``blksnap demo``: the engine end to end on sample devices (no daemon)."""

from __future__ import annotations

import argparse
from typing import Any

from blksnap.cli.args import Commands
from blksnap.cli.output import Out


def register(sub: Any, cmd: Commands) -> None:
    demo = cmd(
        sub, "demo", "run the engine end to end on sample devices it creates, then remove them"
    )
    demo.add_argument("--dir", help="where to make the sample devices (default: a new temp dir)")
    demo.add_argument("--size", default="64M", help="size of each sample device (default 64M)")
    demo.set_defaults(handler=run, uses_daemon=False)


def run(args: argparse.Namespace, client: None, out: Out) -> int:
    from blksnap.tools.demo import run_demo  # the engine: only when asked for

    return run_demo(directory=args.dir, size=args.size, as_json=args.json)
