"""Argument helpers shared by the command modules of ``blksnap``: value types
(sizes, seconds, sector ranges, K=V), ``-r SECTOR:COUNT``, the per-call
timeout, ``--repo``/``--key-file`` and the repository they open, and
:class:`Commands`, which adds a command's parser with the
common options (``--json``, ``--socket``, ``--timeout``).

A command module's ``register(sub, cmd)`` adds its parsers with ``cmd`` and
binds each to its handler: ``set_defaults(handler=fn)``, where
``fn(args, client, out) -> int`` is the exit status. A parser may also set

* ``long_timeout``: True (or a function of the parsed arguments saying so)
  when the command waits for blksnapd longer than most
  (:attr:`~blksnap.settings.Settings.cli_long_timeout`);
* ``uses_daemon=False``: the handler gets no client (``None``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from blksnap.errors import BlksnapError
from blksnap.settings import SETTINGS
from blksnap.units import parse_sector_range, parse_size

#: A command's handler: (parsed arguments, client of blksnapd, output) -> exit status.
Handler = Callable[[argparse.Namespace, Any, Any], int]


def sizearg(text: str) -> int:
    """A size with K, M, G, T suffixes, in bytes."""
    try:
        return parse_size(text)
    except BlksnapError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def secondsarg(text: str) -> float:
    """A finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


def rangearg(text: str) -> tuple[int, int]:
    """``SECTOR:COUNT`` in 512-byte sectors, as a byte (offset, length) pair."""
    try:
        return parse_sector_range(text)
    except BlksnapError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def optarg(text: str) -> tuple[str, str]:
    """``K=V`` (V may be empty)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"not K=V: {text!r}")
    return key, value


def add_ranges(parser: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """``-r SECTOR:COUNT ...`` (repeatable), as byte (offset, length) pairs in ``ranges``."""
    parser.add_argument(
        "-r",
        "--range",
        dest="ranges",
        nargs="+",
        action="extend",
        type=rangearg,
        required=required,
        metavar="SECTOR:COUNT",
        help=help,
    )


TIMEOUT_HELP = (
    "seconds to wait for each answer of blksnapd (env BLKSNAP_TIMEOUT; 0: no limit; "
    f"default {SETTINGS.cli_timeout:g}, {SETTINGS.cli_long_timeout:g} for snapshot take, "
    "backup, daemon stop and device add --loop)"
)


def call_timeout(args: argparse.Namespace, parser: argparse.ArgumentParser) -> float | None:
    """--timeout, else BLKSNAP_TIMEOUT, else the command's default; None: no limit."""
    value = getattr(args, "call_timeout", None)
    if value is None and os.environ.get("BLKSNAP_TIMEOUT"):
        try:
            value = secondsarg(os.environ["BLKSNAP_TIMEOUT"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"BLKSNAP_TIMEOUT: {exc}")
    if value is None:
        long = getattr(args, "long_timeout", False)
        if callable(long):
            long = long(args)
        value = SETTINGS.cli_long_timeout if long else SETTINGS.cli_timeout
    return value or None


class Commands:
    """``cmd(parent, name, help, **kw)``: a command's parser under ``parent``
    (a subparsers action) with ``help`` as its description too, and the
    common options (``--json``, ``--socket``, ``--timeout``) unless ``parents``
    says otherwise (``[cmd.base]``: all but ``--timeout``)."""

    def __init__(self, base: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
        #: --json and --socket.
        self.base = base
        #: --json, --socket and --timeout.
        self.common = common

    def __call__(self, parent: Any, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        parents = kw.pop("parents", [self.common])
        parser: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, parents=parents, **kw
        )
        return parser


# -- repositories ---------------------------------------------------------------------

KEY_HELP = (
    "key file of an encrypted repository (else the passphrase in BLKSNAP_PASSPHRASE opens it)"
)


REPO_HELP = "repository: a directory, or s3://BUCKET/PREFIX in an S3-compatible object store"
S3_ENDPOINT_HELP = (
    "URL of the S3-compatible service (env BLKSNAP_S3_ENDPOINT or AWS_ENDPOINT_URL; default"
    " AWS); credentials and region come from the usual AWS variables or ~/.aws files"
)


def repo_args(parser: argparse.ArgumentParser, help: str = REPO_HELP) -> None:
    """``--repo R``, ``--key-file F`` and ``--s3-endpoint URL``."""
    parser.add_argument("--repo", required=True, help=help)
    parser.add_argument("--key-file", metavar="FILE", help=KEY_HELP)
    endpoint_arg(parser)


def endpoint_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint", metavar="URL", help=S3_ENDPOINT_HELP)


def open_repo(args: argparse.Namespace) -> Any:
    """The repository of ``--repo``, opened by ``--key-file`` or the passphrase."""
    from blksnap.backup.repo import Repository

    return Repository.open(args.repo, key_file=args.key_file, endpoint=args.s3_endpoint)


def repo_exists(args: argparse.Namespace) -> bool:
    """Is ``--repo`` a repository already?"""
    from blksnap.backup.backends import open_storage
    from blksnap.backup.repo import Repository

    return Repository.exists(open_storage(args.repo, endpoint=args.s3_endpoint))
