"""``blksnap mount`` / ``umount`` (a backup served read-only by blksnapd) and
``blksnap restore --instant`` (a target served at once, hydrated from a
backup): the command line opens the repository and hands blksnapd its key."""

from __future__ import annotations

import argparse
import errno
from typing import Any

from blksnap.cli.args import Commands, open_repo, repo_args
from blksnap.errors import error
from blksnap.units import format_size


def register(sub: Any, cmd: Commands) -> None:
    mt = cmd(
        sub,
        "mount",
        "serve a backup of a device read-only as <mount>/backups/B/N (blksnapd)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MOUNT_EPILOG,
    )
    repo_args(mt)
    mt.add_argument("--backup", "-b", required=True, help="backup id, or 'latest'")
    mt.add_argument("-d", "--device", required=True)
    mt.add_argument("--loop", action="store_true", help="also a read-only loop device over it")
    mt.add_argument(
        "--nbd", action="store_true", help="say its NBD export (blksnapd started with --nbd)"
    )
    mt.set_defaults(handler=cmd_mount)
    um = cmd(sub, "umount", "stop serving a mounted backup (EBUSY while in use)")
    um.add_argument("--repo", help="repository directory (accepted, not needed)")
    um.add_argument("--key-file", metavar="FILE", help=argparse.SUPPRESS)
    um.add_argument("--backup", "-b", required=True, help="backup id")
    um.add_argument("-d", "--device", required=True)
    um.add_argument("--force", action="store_true", help="even if in use (its readers get errors)")
    um.set_defaults(handler=cmd_umount)


MOUNT_EPILOG = """\
Reads fetch the chunks they need from the repository (checked, decrypted,
decompressed) and keep the newest in a bounded cache; nothing is copied first,
so any backup of any size is served at once. While mounted, the repository
cannot be pruned (EBUSY). File-level restore: mount the loop device
read-only, without replaying a journal:

  blksnap mount --repo /backup --backup latest -d disk0 --loop
  mount -o ro,noload /dev/loopN /mnt/restore        # ext4
  mount -o ro,norecovery,nouuid /dev/loopN /mnt/restore   # xfs
  ...copy files out...
  umount /mnt/restore
  blksnap umount --backup B -d disk0

Also served over NBD as export backups/B/N when blksnapd runs with --nbd."""

INSTANT_EPILOG = """\
With --instant, PATH (a file, made at the device's size if missing, or a block
device; checked as for a restore) is served at once as device N: a read of a
region not yet restored fetches it from the repository and writes it to PATH,
a write goes to PATH and marks its region done, and a background copy restores
the rest ('blksnap device list' shows its progress; 'blksnap ctl -d N --filter
hydrate pause|resume|status|rate SIZE' steers it). Which regions are done is
durable: a crash of blksnapd's worker or of the machine carries on, never
copying over what was written since (after a boot, a passphrase repository
needs this command again, with the same arguments; so does a device removed
before it was done, and --force gives such an unfinished restore up to start
another backup or target under its name). The tracker is attached
from the first instant, in a CBT generation linked to the backup: the next
backup of N is incremental against it."""


def _keys_of(args: argparse.Namespace) -> tuple[Any, bytes | None]:
    """The repository (opened here: the passphrase or key file stays with
    the command) and its master key for blksnapd (None: not encrypted)."""
    repo = open_repo(args)
    return repo, repo.keys.master()


def cmd_mount(args: argparse.Namespace, client: Any, out: Any) -> int:
    repo, master = _keys_of(args)
    b = repo.get(args.backup)
    b.device(args.device)
    r = client.mount(
        repo.locator, b.id, args.device, key=master, key_file=args.key_file, loop=args.loop
    )
    if args.nbd and not r.get("nbd_export"):
        raise error(errno.ENOTCONN, "blksnapd serves no NBD (start it with --nbd)")
    lines = [f"backup {b.id} device {args.device}: {r['path']} (read-only)"]
    if r.get("loop"):
        lines.append(f"loop device {r['loop']}")
    if r.get("nbd_export"):
        lines.append(f"NBD export {r['nbd_export']}")
    out.emit(r, "\n".join(lines))
    return 0


def cmd_umount(args: argparse.Namespace, client: Any, out: Any) -> int:
    r = client.umount(args.backup, args.device, force=args.force)
    out.emit(r, f"{r['name']} unmounted")
    return 0


def restore_instant(args: argparse.Namespace, client: Any, out: Any) -> int:
    repo, master = _keys_of(args)
    b = repo.get(args.backup)
    b.device(args.device)
    r = client.restore_instant(
        repo.locator,
        b.id,
        args.device,
        args.to,
        key=master,
        key_file=args.key_file,
        loop=args.loop,
        rate=str(args.rate) if args.rate else None,
        paused=args.paused,
        force=args.force,
    )
    h = r.get("hydration") or {}
    lines = [
        f"{args.device} served from {r['target']} as of backup {b.id}"
        + (" (carried on)" if r.get("resumed") else ""),
        f"path {r['path']}" + (f", loop device {r['loop']}" if r.get("loop") else ""),
        f"hydration {h.get('state')}: {format_size(h.get('done') or 0)} of "
        f"{format_size(h.get('total') or 0)}",
    ]
    if not r.get("linked"):
        lines.append(
            "note: the CBT generation is not linked to the backup: the next backup is full"
        )
    out.emit(r, "\n".join(lines))
    return 0
