"""The repository commands of ``blksnap``: key create (a new encrypted
repository) and repo upgrade (a version 1 repository into a version 2 one).
They work on the repository alone."""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import sys
from collections.abc import Callable
from typing import Any

from blksnap.cli.args import Commands, endpoint_arg, repo_exists, sizearg
from blksnap.cli.progress import progress, wanted
from blksnap.errors import error
from blksnap.units import format_size


def register(sub: Any, cmd: Commands) -> None:
    ky = cmd(sub, "key", "encryption keys of a repository")
    ksub = ky.add_subparsers(dest="action", metavar="ACTION", required=True)
    kc = cmd(
        ksub,
        "create",
        "make R a new encrypted repository: a random master key, wrapped by the passphrase"
        " in BLKSNAP_PASSPHRASE (or asked for), or written to --key-file F",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=KEY_EPILOG,
    )
    kc.add_argument("--repo", required=True, help="a new or empty directory, or s3://BUCKET/PREFIX")
    endpoint_arg(kc)
    kc.add_argument(
        "--key-file",
        metavar="FILE",
        help="write the key to FILE (new; keep it apart from the repository) instead of"
        " wrapping it with a passphrase",
    )
    kc.add_argument("--compress", choices=["zstd", "none"], default="zstd")
    kc.add_argument("--chunk-size", type=sizearg, help="a power of two, 64K to 16M (default 1M)")
    kc.set_defaults(handler=cmd_key_create)
    rp = cmd(sub, "repo", "repository maintenance")
    rsub = rp.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = cmd(
        rsub,
        "upgrade",
        "convert a version 1 repository into a new version 2 repository (the old one is"
        " only read; remove it once the new one verifies)",
    )
    up.add_argument("--repo", required=True, help="the version 1 repository")
    up.add_argument(
        "--to",
        required=True,
        metavar="NEW",
        help="new directory or s3://BUCKET/PREFIX (or an empty repository made by"
        " 'key create': encrypted)",
    )
    up.add_argument("--key-file", metavar="FILE", help="key file of NEW, if encrypted so")
    endpoint_arg(up)
    up.add_argument("--no-progress", action="store_true", help="no progress bar")
    up.set_defaults(handler=cmd_repo_upgrade)


KEY_EPILOG = """Every command on an encrypted repository then needs the key: --key-file FILE,
or the passphrase in BLKSNAP_PASSPHRASE. Chunks are sealed with AES-256-GCM,
chunk names are keyed digests (they reveal nothing about the data), manifests
and indexes carry a keyed MAC. Lose the key file or the passphrase and the
backups cannot be read by anyone: keep a copy of the key file elsewhere.
Encryption is chosen when a repository is made; to encrypt existing backups,
make a new encrypted repository and 'blksnap repo upgrade' or back up into it."""


def _new_passphrase() -> bytes:
    from blksnap.backup.crypto import passphrase_from_env

    given = passphrase_from_env()
    if given:
        return given
    if not sys.stdin.isatty():
        raise error(
            errno.ENOKEY,
            "no passphrase: set BLKSNAP_PASSPHRASE, run on a terminal to be asked,"
            " or use --key-file FILE",
        )
    first = getpass.getpass("passphrase for the new key: ").encode()
    if getpass.getpass("again: ").encode() != first:
        raise error(errno.EINVAL, "the passphrases differ")
    if not first:
        raise error(errno.EINVAL, "an empty passphrase protects nothing")
    return first


def cmd_key_create(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.repo import DEFAULT_CHUNK_SIZE, Repository

    if repo_exists(args):
        raise error(
            errno.EEXIST,
            f"{args.repo} is already a repository; encryption is chosen when one is made"
            " (make a new encrypted repository and back up or 'repo upgrade' into it)",
        )
    passphrase = None if args.key_file else _new_passphrase()
    repo = Repository.init(
        args.repo,
        compression=args.compress,
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
        passphrase=passphrase,
        key_file=args.key_file,
        encrypt=True,
        endpoint=args.s3_endpoint,
    )
    where = f"key file {args.key_file}" if args.key_file else "the passphrase"
    out.emit(
        {
            "repo": repo.path,
            "key_id": repo.keys.key_id,
            "mode": "keyfile" if args.key_file else "passphrase",
            "key_file": args.key_file,
        },
        f"{repo.path}: encrypted repository, key {repo.keys.key_id}, opened by {where}",
    )
    return 0


def cmd_repo_upgrade(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.upgrade import upgrade

    def bar(desc: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        return progress(f"{desc:>10}", total, show=wanted(args))

    report = upgrade(
        args.repo, args.to, key_file=args.key_file, endpoint=args.s3_endpoint, progress=bar
    )
    out.emit(
        report,
        f"{args.to}: {report['converted']} backup(s) converted"
        + (f", {report['skipped']} already there" if report["skipped"] else "")
        + (f", {len(report['not_converted'])} not convertible" if report["not_converted"] else "")
        + f"; {format_size(report['bytes_stored'])} stored. Check it with"
        f" 'blksnap verify --repo {args.to}', then remove {args.repo}",
    )
    return 0
