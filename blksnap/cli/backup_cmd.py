"""The backup commands of ``blksnap``: backup, backups, restore, verify, prune.

Only ``backup`` talks to blksnapd; the others work on the repository alone,
so a restore needs no daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
from collections.abc import Callable
from typing import Any

from blksnap.cli.args import Commands, sizearg
from blksnap.cli.output import table
from blksnap.cli.progress import progress
from blksnap.errors import error
from blksnap.units import format_size


def register(sub: Any, cmd: Commands) -> None:
    bk = cmd(
        sub,
        "backup",
        "one backup session: snapshot the devices at one instant, copy what changed "
        "(from the CBT) into the repository, destroy the snapshot",
        epilog="Without --full/--differential the backup is incremental where it can be "
        "(a good earlier backup of the device in the same CBT generation) and full "
        "where it cannot; each device's line says which and why.\n",
    )
    bk.add_argument(
        "-d",
        "--device",
        dest="devices",
        nargs="+",
        action="extend",
        required=True,
        metavar="N",
        help="devices to back up, all taken at one instant",
    )
    bk.add_argument("--repo", required=True, help="repository directory (created if missing)")
    kind = bk.add_mutually_exclusive_group()
    kind.add_argument("--full", dest="mode", action="store_const", const="full", help="every block")
    kind.add_argument(
        "--incremental",
        dest="mode",
        action="store_const",
        const="incremental",
        help="blocks changed since the newest good backup (the default)",
    )
    kind.add_argument(
        "--differential",
        dest="mode",
        action="store_const",
        const="differential",
        help="blocks changed since the newest good full backup",
    )
    bk.add_argument(
        "--storage",
        help="diff storage of the snapshot: a directory (default: the repository), "
        "a file or a block device",
    )
    bk.add_argument("--storage-size", type=sizearg, help="first size and growth step")
    bk.add_argument("--storage-max", type=sizearg, help="most diff storage to use")
    bk.add_argument(
        "--compress",
        choices=["zstd", "none"],
        default="zstd",
        help="compression of a new repository (default zstd)",
    )
    bk.add_argument("--no-progress", action="store_true", help="no progress bar")
    bk.set_defaults(handler=cmd_backup, long_timeout=True)
    bl = cmd(sub, "backups", "the backups in a repository (or one backup's devices)")
    bl.add_argument("--repo", required=True)
    bl.add_argument("--backup", "-b", help="show this backup's devices ('latest' works too)")
    bl.set_defaults(handler=cmd_backups)
    rs = cmd(
        sub,
        "restore",
        "rebuild a device as of a backup (its whole chain) into PATH",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RESTORE_EPILOG,
    )
    rs.add_argument("--repo", required=True)
    rs.add_argument("--backup", "-b", required=True, help="backup id, or 'latest'")
    rs.add_argument("-d", "--device", required=True)
    rs.add_argument("--to", required=True, metavar="PATH", help="a file, or a block device")
    rs.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing non-empty file or a block device (never one in use)",
    )
    rs.add_argument("--no-progress", action="store_true", help="no progress bar")
    rs.set_defaults(handler=cmd_restore)
    vf = cmd(sub, "verify", "check every checksum of a repository (or of one backup)")
    vf.add_argument("--repo", required=True)
    vf.add_argument("--backup", "-b", help="only this backup")
    vf.add_argument("--no-progress", action="store_true", help="no progress bar")
    vf.set_defaults(handler=cmd_verify)
    pr = cmd(
        sub,
        "prune",
        "remove old backups, keeping the newest N and every backup their chains need",
    )
    pr.add_argument("--repo", required=True)
    pr.add_argument("--keep", type=int, required=True, metavar="N")
    pr.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    pr.set_defaults(handler=cmd_prune)


RESTORE_EPILOG = """\
PATH in use is refused with EBUSY, --force or not: a file some process holds
open (blksnapd holds the backing files it serves), a file a loop device is
attached to, a file of blksnapd's FUSE mount, a block device that is mounted,
held (device-mapper, md), has a mounted or held partition, or cannot be opened
exclusively. Unmount or remove the device first.

An existing file of non-zero size, or any block device, is overwritten only
with --force (else EEXIST). A file is written to a temporary file
.NAME.blksnap-restore-XXXX beside it and renamed over PATH only once complete:
a restore that fails or is interrupted leaves PATH as it was (after a SIGKILL
the temporary may remain; remove it by hand). On a block device the first
64 KiB are zeroed first and written last: a half-restored device shows no file
system signature."""


def _show(args: argparse.Namespace) -> bool:
    return not args.json and not getattr(args, "no_progress", False)


def cmd_backup(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.repo import Repository
    from blksnap.backup.session import BackupFailed, DevicePlan, run_backup

    client.status()  # no daemon: say so before making a repository
    repo = Repository.init(args.repo, compression=args.compress)
    show = _show(args)

    def bar(desc: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        return progress(f"{desc:>10}", total, show=show)

    def planned(p: DevicePlan) -> None:
        if not args.json:
            what = f"{p.kind}" + (f" on {p.parent}" if p.parent else "")
            print(
                f"{p.name}: {what}, {len(p.blocks)} of {-(-p.size // p.block_size)} blocks "
                f"({format_size(p.bytes_planned)}): {p.reason}",
                flush=True,
            )
            if len(p.recheck):
                print(
                    f"{p.name}: {len(p.recheck)} of them only because blksnapd did not stop "
                    "cleanly (write intent): compared with the parent's, stored if changed",
                    flush=True,
                )

    # SIGTERM unwinds like Ctrl-C: the snapshot is destroyed and the staged
    # backup removed before the process ends.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        res = run_backup(
            client,
            repo,
            args.devices,
            args.mode or "auto",
            storage=args.storage,
            storage_size=args.storage_size,
            storage_max=args.storage_max,
            progress=bar,
            on_plan=planned,
        )
    except BackupFailed as exc:
        if exc.backup is not None and not args.json:
            print(f"recorded as failed: {exc.backup.id} (never used as a parent)", flush=True)
        raise
    doc = res.as_dict()
    b = res.backup
    lines = []
    rechecked = {p.name: p for p in res.plans if len(p.recheck)}
    for d in b.devices:
        lines.append(
            f"{d.name}: read {format_size(d.bytes_read)}, stored {format_size(d.bytes_stored)}"
            f" ({d.blocks_stored} blocks, {d.blocks_zero} zero)"
        )
        p = rechecked.get(d.name)
        if p is not None:
            lines.append(
                f"{d.name}: re-read after an unclean stop: {format_size(p.recheck_bytes)} "
                f"({len(p.recheck)} blocks), {p.recheck_unchanged} unchanged and not stored"
            )
    lines.append(f"backup {b.id} ({b.kind}) done in {res.seconds:.1f} s")
    out.emit(doc, "\n".join(lines))
    return 0


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_backups(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.repo import Repository

    repo = Repository.open(args.repo)
    if args.backup:
        return _show_backup(repo.get(args.backup), out)
    backups = repo.backups()
    rows = []
    for b in backups:
        size = sum(d.size for d in b.devices)
        stored = sum(d.bytes_stored for d in b.devices)
        parents = sorted({d.parent for d in b.devices if d.parent})
        rows.append(
            [
                b.id,
                b.kind,
                b.state if b.state != "failed" else f"failed ({(b.error or {}).get('errno', '?')})",
                ",".join(d.name for d in b.devices) or "-",
                format_size(size),
                format_size(stored),
                ",".join(parents) or "-",
            ]
        )
    out.emit(
        [b.as_dict() for b in backups],
        table(rows, ["ID", "KIND", "STATE", "DEVICES", "SIZE", "STORED", "PARENT"])
        if rows
        else f"no backups in {args.repo}",
    )
    return 0


def _show_backup(b: Any, out: Any) -> int:
    head = (
        f"backup {b.id}: {b.kind}, {b.state}"
        + (f" ({b.error.get('errno')}: {b.error.get('message')})" if b.error else "")
        + f"\n  started {b.started}, finished {b.finished}, snapshot {b.snapshot_id or '-'}"
        + f"\n  compression {b.compression}, checksum {b.checksum}"
    )
    rows = [
        [
            d.name,
            d.kind,
            d.parent or "-",
            format_size(d.size),
            f"{d.blocks_stored - d.blocks_zero}+{d.blocks_zero}z",
            format_size(d.bytes_read),
            format_size(d.bytes_stored),
            f"{d.generation_id[:8]}/{d.changes_number}",
        ]
        for d in b.devices
    ]
    text = table(
        rows, ["DEVICE", "KIND", "PARENT", "SIZE", "BLOCKS", "READ", "STORED", "GEN/CHANGES"]
    )
    out.emit(b.as_dict(), head + "\n" + text)
    return 0


def cmd_restore(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.repo import Repository

    repo = Repository.open(args.repo)
    b = repo.get(args.backup)
    rec = b.device(args.device)
    # SIGTERM unwinds like Ctrl-C: the half-written temporary file is removed.
    signal.signal(signal.SIGTERM, _terminate)
    with progress(f"{args.device:>10}", rec.size, show=_show(args)) as advance:
        r = repo.restore(b.id, args.device, args.to, progress=advance, force=args.force)
    out.emit(
        r,
        f"restored {args.device} as of {b.id} to {args.to}: {format_size(r['size'])}, "
        f"chain {' -> '.join(r['chain'])}\nsha256 {r['sha256']}",
    )
    return 0


def cmd_verify(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.repo import Repository

    repo = Repository.open(args.repo)
    chosen = [repo.get(args.backup)] if args.backup else [b for b in repo.backups() if b.ok]
    total = sum(d.data_size for b in chosen for d in b.devices)
    with progress("verify", total, show=_show(args)) as advance:
        problems = repo.verify(args.backup and chosen[0].id, progress=advance)
    doc = {
        "ok": not problems,
        "backups": [b.id for b in chosen],
        "problems": [
            {
                "backup": p.backup,
                "device": p.device,
                "block": p.block,
                "offset": p.offset,
                "message": p.message,
            }
            for p in problems
        ],
    }
    if problems:
        if not args.json:
            for p in problems:
                print(str(p))
        else:
            out.emit(doc)
        raise error(errno.EIO, f"{len(problems)} problem(s) found in {args.repo}")
    out.emit(doc, f"{len(chosen)} backup(s) verified, every checksum matches")
    return 0


def cmd_prune(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.repo import Repository

    repo = Repository.open(args.repo)
    removed = repo.prune(args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    out.emit(
        {"removed": removed, "dry_run": args.dry_run},
        f"{verb} {len(removed)} backup(s)" + (": " + ", ".join(removed) if removed else ""),
    )
    return 0
