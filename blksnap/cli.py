"""The ``blksnap`` command line.

The daemon-backed commands of shared/SPEC.md arrive with blksnapd; what works
in-process today is ``version`` and ``demo``.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import BlksnapError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blksnap",
        description=(
            "Consistent snapshots of live block devices with change-block tracking. "
            "Commands that talk to blksnapd come with the daemon; today the engine "
            "runs in-process (see 'blksnap demo' and the Python API, blksnap.Engine)."
        ),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the version")
    demo = sub.add_parser(
        "demo", help="run the engine end to end on sample devices it creates, then remove them"
    )
    demo.add_argument("--dir", help="where to make the sample devices (default: a new temp dir)")
    demo.add_argument("--size", default="64M", help="size of each sample device (default 64M)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            if args.json:
                print(json.dumps({"cli": __version__}))
            else:
                print(f"blksnap {__version__}")
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(directory=args.dir, size=args.size, as_json=args.json)
        _parser().print_help()
        return 2
    except BlksnapError as exc:
        if args.json:
            print(json.dumps({"error": exc.errname, "message": exc.message}), file=sys.stderr)
        else:
            print(f"blksnap: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
