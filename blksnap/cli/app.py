"""The ``blksnap`` command line: every operation of blksnapd, for people
(readable text) and scripts (``--json``: one JSON document on stdout; errors
as ``{"error": "EBUSY", "message": ...}`` on stderr). Exit status: 0 done,
1 failed (the errno is named), 2 bad usage.

This module is the top of it: the ``blksnap`` parser and its global options,
the fix-ups of argv, the handling of errors, and :func:`main`. Each command
group is a module (``daemon_cmd``, ``device_cmd``, ``cbt_cmd``,
``snapshot_cmd``, ``backup_cmd``, ``demo_cmd``) whose ``register`` adds its
parsers and binds their handlers; their shared argument types are in
:mod:`blksnap.cli.args`, their output in :mod:`blksnap.cli.output`. Command
modules never import this one.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from typing import Any

from blksnap.cli import backup_cmd, cbt_cmd, daemon_cmd, demo_cmd, device_cmd, snapshot_cmd
from blksnap.cli.args import TIMEOUT_HELP, Commands, call_timeout, secondsarg
from blksnap.cli.output import Out
from blksnap.control.client import Client, default_socket
from blksnap.errors import BlksnapError, error, from_oserror
from blksnap.settings import SETTINGS

#: The command groups, in the order of ``blksnap --help``.
COMMAND_MODULES = (daemon_cmd, device_cmd, cbt_cmd, snapshot_cmd, backup_cmd, demo_cmd)

EPILOG = f"""\
examples:
  blksnap daemon start
  blksnap device add /srv/disk0.img --name disk0 --loop
  blksnap attach -d disk0
  ID=$(blksnap snapshot create -d disk0 -f /var/tmp -l 1G)
  blksnap snapshot take -i $ID --loop
  blksnap snapshot watch -i $ID --extend /var/tmp --step 1G --max 8G &
  blksnap cbtinfo -d disk0; blksnap readcbtmap -d disk0 -f disk0.cbt
  blksnap snapshot destroy -i $ID
  blksnap backup -d disk0 disk1 --repo /backup/r1          # full, then incremental
  blksnap backups --repo /backup/r1
  blksnap restore --repo /backup/r1 --backup latest -d disk0 --to /tmp/disk0.img
  blksnap verify --repo /backup/r1

The daemon's socket is {SETTINGS.socket} unless --socket or
BLKSNAP_SOCKET says otherwise. Sizes take K, M, G, T suffixes; sector ranges
are SECTOR:COUNT in 512-byte sectors.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming EINVAL (JSON on stderr with --json), exit 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        if _JSON_ARGV[0]:
            print(
                json.dumps({"error": "EINVAL", "errno": errno.EINVAL, "message": message}),
                file=sys.stderr,
            )
        else:
            print(
                f"{self.prog}: EINVAL: {message} (see '{self.prog} --help')",
                file=sys.stderr,
            )
        self.exit(2)


#: Whether the argv being parsed asks for --json (set by main before parsing).
_JSON_ARGV = [False]


def _negative_ranges(argv: list[str]) -> list[str]:
    """``-r -5:8``: argparse takes ``-5:8`` for an option and says only "expected
    at least one argument". Hand such values to ``-r`` itself (``--range=-5:8``)
    so that its check says what is wrong with them."""

    def negative(tok: str) -> bool:
        return len(tok) > 1 and tok[0] == "-" and (tok[1].isdigit() or tok[1] == ":")

    out: list[str] = []
    in_range = False
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            out += argv[i - 1 :]
            break
        if tok in ("-r", "--range") and i < len(argv) and negative(argv[i]):
            out.append(f"--range={argv[i]}")
            i += 1
            in_range = True
        elif in_range and negative(tok):
            out.append(f"--range={tok}")
        else:
            in_range = tok in ("-r", "--range") or (in_range and not tok.startswith("-"))
            out.append(tok)
    return out


VERBOSE_HELP = (
    "say on stderr what happens underneath (a request sent again after blksnapd's "
    "worker restarted, ...)"
)


def _parser() -> argparse.ArgumentParser:
    base = _Parser(add_help=False)
    base.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    base.add_argument(
        "--socket", default=argparse.SUPPRESS, help="blksnapd control socket (env BLKSNAP_SOCKET)"
    )
    base.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                      help=VERBOSE_HELP)  # fmt: skip
    common = _Parser(add_help=False, parents=[base])
    common.add_argument(
        "--timeout",
        dest="call_timeout",
        type=secondsarg,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=TIMEOUT_HELP,
    )
    p = _Parser(
        prog="blksnap",
        description="Consistent snapshots of live block devices, with change-block tracking "
        "for incremental backups. Talks to the blksnapd daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--socket", default=None, help="blksnapd control socket (env BLKSNAP_SOCKET)")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument(
        "--timeout",
        dest="call_timeout",
        type=secondsarg,
        default=None,
        metavar="SECONDS",
        help=TIMEOUT_HELP,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    cmd = Commands(base, common)
    for module in COMMAND_MODULES:
        module.register(sub, cmd)
    return p


def _fail(exc: BlksnapError, as_json: bool) -> int:
    """The one line of a failure (a JSON document with --json) on stderr; status 1."""
    if as_json:
        print(
            json.dumps({"error": exc.errname, "errno": exc.errno, "message": exc.message}),
            file=sys.stderr,
        )
    else:
        print(f"blksnap: {exc}", file=sys.stderr)
    return 1


def _oserror(exc: OSError) -> BlksnapError:
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return from_oserror(exc, where)


def main(argv: list[str] | None = None) -> int:
    argv = _negative_ranges(list(sys.argv[1:] if argv is None else argv))
    _JSON_ARGV[0] = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    out = Out(bool(args.json))
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="blksnap: %(message)s", stream=sys.stderr)
    timeout = call_timeout(args, parser)
    handler = args.handler
    try:
        if not getattr(args, "uses_daemon", True):
            return int(handler(args, None, out))
        with Client(args.socket or default_socket(), timeout=timeout) as client:
            return int(handler(args, client, out))
    except BlksnapError as exc:
        return _fail(exc, args.json)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file named on the command line, say
        return _fail(_oserror(exc), args.json)
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if os.environ.get("BLKSNAP_DEBUG"):
            raise
        return _fail(
            error(
                errno.EIO,
                f"internal error: {exc!r} (BLKSNAP_DEBUG=1 shows the traceback)",
            ),
            args.json,
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
