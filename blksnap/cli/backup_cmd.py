"""The backup commands of ``blksnap``: backup, backups, restore, mount,
umount, verify, prune, gc (key create and repo upgrade: ``repo_cmd``).

``backup``, ``mount``, ``umount`` and ``restore --instant`` talk to blksnapd;
the others work on the repository alone, so a restore needs no daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
from collections.abc import Callable
from typing import Any

from blksnap.cli.args import Commands, open_repo, repo_args, repo_exists, sizearg
from blksnap.cli.mount_cmd import INSTANT_EPILOG, restore_instant
from blksnap.cli.mount_cmd import register as register_mount
from blksnap.cli.output import table
from blksnap.cli.progress import progress, wanted
from blksnap.cli.repo_cmd import register as register_repo
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
    repo_args(
        bk,
        "repository: a directory or s3://BUCKET/PREFIX (created if missing, without"
        " encryption: see 'key create')",
    )
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
        help="diff storage of the snapshot: a directory (default: the repository, or"
        " /var/lib/blksnap/diff for an object store), a file or a block device",
    )
    bk.add_argument("--storage-size", type=sizearg, help="first size and growth step")
    bk.add_argument("--storage-max", type=sizearg, help="most diff storage to use")
    bk.add_argument(
        "--compress",
        choices=["zstd", "none"],
        default="zstd",
        help="compression of a new repository (default zstd)",
    )
    bk.add_argument(
        "--chunk-size",
        type=sizearg,
        help="chunk size of a new repository (a power of two, 64K to 16M; default 1M)",
    )
    bk.add_argument("--no-progress", action="store_true", help="no progress bar")
    bk.set_defaults(handler=cmd_backup, long_timeout=True)
    bl = cmd(sub, "backups", "the backups in a repository (or one backup's devices)")
    repo_args(bl)
    bl.add_argument("--backup", "-b", help="show this backup's devices ('latest' works too)")
    bl.set_defaults(handler=cmd_backups)
    rs = cmd(
        sub,
        "restore",
        "rebuild a device as of a backup into PATH",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RESTORE_EPILOG + "\n\n" + INSTANT_EPILOG,
    )
    repo_args(rs)
    rs.add_argument("--backup", "-b", required=True, help="backup id, or 'latest'")
    rs.add_argument("-d", "--device", required=True)
    rs.add_argument("--to", required=True, metavar="PATH", help="a file, or a block device")
    rs.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing non-empty file or a block device (never one in use)",
    )
    rs.add_argument("--no-progress", action="store_true", help="no progress bar")
    rs.add_argument(
        "--instant",
        action="store_true",
        help="serve PATH at once as device N (blksnapd), copying the backup in the background",
    )
    rs.add_argument("--loop", action="store_true", help="--instant: also a loop device over it")
    rs.add_argument(
        "--rate", type=sizearg, metavar="SIZE", help="--instant: copy at most SIZE per second"
    )
    rs.add_argument(
        "--paused", action="store_true", help="--instant: start with the background copy paused"
    )
    rs.set_defaults(handler=cmd_restore)
    register_mount(sub, cmd)
    vf = cmd(
        sub,
        "verify",
        "check a repository (or one backup): manifests, indexes, and every chunk they"
        " name, once each (present, its seal opens, its digest is its name)",
    )
    repo_args(vf)
    vf.add_argument("--backup", "-b", help="only this backup")
    vf.add_argument("--no-progress", action="store_true", help="no progress bar")
    vf.set_defaults(handler=cmd_verify)
    pr = cmd(
        sub,
        "prune",
        "remove backups a retention policy does not keep (then 'gc' frees their chunks)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=PRUNE_EPILOG,
    )
    repo_args(pr)
    pr.add_argument("--keep", type=int, metavar="N", help="the same as --keep-last N")
    for rule, what in (
        ("last", "the N newest backups"),
        ("hourly", "the newest backup of each of the N newest hours that have one"),
        ("daily", "... of each of the N newest days"),
        ("weekly", "... of each of the N newest ISO weeks"),
        ("monthly", "... of each of the N newest months"),
        ("yearly", "... of each of the N newest years"),
    ):
        pr.add_argument(
            f"--keep-{rule}", type=int, metavar="N", default=0, help=f"{what} (-1: all)"
        )
    pr.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    pr.set_defaults(handler=cmd_prune)
    gc = cmd(
        sub,
        "gc",
        "remove the chunks no backup names any more (after prune, or failed backups)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=GC_EPILOG,
    )
    repo_args(gc)
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="keep unnamed chunks younger than this (default 300)",
    )
    gc.set_defaults(handler=cmd_gc)
    register_repo(sub, cmd)


PRUNE_EPILOG = """Rules as restic's 'forget' and Proxmox Backup Server's prune: backups are taken
newest first; --keep-last N keeps the N newest; each period rule keeps the
newest backup of each of its N newest periods (UTC hours, days, ISO weeks,
months, years) that have a backup. A backup kept by any rule stays; the table
says which rules keep it. Failed or damaged backups older than the oldest
kept one are removed too.

Every backup's index lists all of its device's chunks, so removing a backup
never breaks another (an incremental does not need its parent to restore).
The chunks only removed backups used are freed by 'blksnap gc'."""

GC_EPILOG = """gc marks every chunk named by an index under backups/, then removes the
others, unless they are younger than the cutoff: gc's start minus --grace, or
the start of the oldest backup still running, whichever is earlier (times by
the repository file system's clock). A backup holds chunks.lock shared while it
reuses or stores a chunk, gc holds it exclusively while it removes: so gc runs
safely beside backups, and a chunk a running backup reused is never removed."""


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


def cmd_backup(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.repo import DEFAULT_CHUNK_SIZE, Repository
    from blksnap.backup.session import BackupFailed, DevicePlan, run_backup

    client.status()  # no daemon: say so before making a repository
    if args.key_file and not repo_exists(args):
        raise error(
            errno.ENOENT,
            f"{args.repo} is not a repository yet, and --key-file asks for an encrypted one:"
            f" make it with 'blksnap key create --repo {args.repo} --key-file {args.key_file}'",
        )
    repo = Repository.init(
        args.repo,
        compression=args.compress,
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
        key_file=args.key_file,
        endpoint=args.s3_endpoint,
    )
    show = wanted(args)

    def bar(desc: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        return progress(f"{desc:>10}", total, show=show)

    def planned(p: DevicePlan) -> None:
        if not args.json:
            what = f"{p.kind}" + (f" on {p.parent}" if p.parent else "")
            changed = (
                ""
                if p.kind == "full"
                else f"{len(p.blocks)} of {-(-p.size // p.block_size)} CBT blocks changed, "
            )
            print(
                f"{p.name}: {what}, {changed}{len(p.chunks)} chunks to read"
                f" ({format_size(p.bytes_planned)}): {p.reason}",
                flush=True,
            )
            if len(p.recheck):
                print(
                    f"{p.name}: {len(p.recheck)} of the chunks only because blksnapd did not"
                    " stop cleanly (write intent): compared with the parent's, kept if the same",
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
            f"{d.name}: read {format_size(d.bytes_read)}: new {format_size(d.bytes_new)}"
            f" (stored as {format_size(d.bytes_stored)}), already in the repository"
            f" {format_size(d.bytes_reused)}, zero {d.chunks_zero} chunks"
        )
        p = rechecked.get(d.name)
        if p is not None:
            lines.append(
                f"{d.name}: re-read after an unclean stop: {format_size(p.recheck_bytes)} "
                f"({len(p.recheck)} chunks), {p.recheck_unchanged} unchanged"
            )
    if res.traffic is not None and not repo.local:
        t = res.traffic
        lines.append(
            f"{repo.path}: {t.requests} requests, sent {format_size(t.bytes_sent)},"
            f" received {format_size(t.bytes_received)}, {t.retries} retried"
        )
    lines.append(f"backup {b.id} ({b.kind}) done in {res.seconds:.1f} s")
    out.emit(doc, "\n".join(lines))
    return 0


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_backups(args: argparse.Namespace, client: Any, out: Any) -> int:
    repo = open_repo(args)
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
            f"{d.chunks_new}/{d.chunks_reused}/{d.chunks_zero}",
            format_size(d.bytes_read),
            format_size(d.bytes_stored),
            f"{d.generation_id[:8]}/{d.changes_number}",
        ]
        for d in b.devices
    ]
    text = table(
        rows,
        [
            "DEVICE",
            "KIND",
            "PARENT",
            "SIZE",
            "CHUNKS NEW/REUSED/ZERO",
            "READ",
            "STORED",
            "GEN/CHANGES",
        ],
    )
    out.emit(b.as_dict(), head + "\n" + text)
    return 0


def cmd_restore(args: argparse.Namespace, client: Any, out: Any) -> int:
    if args.instant:
        return restore_instant(args, client, out)
    for flag in ("loop", "rate", "paused"):
        if getattr(args, flag):
            raise error(errno.EINVAL, f"--{flag} goes with --instant")
    repo = open_repo(args)
    b = repo.get(args.backup)
    rec = b.device(args.device)
    # SIGTERM unwinds like Ctrl-C: the half-written temporary file is removed.
    signal.signal(signal.SIGTERM, _terminate)
    with progress(f"{args.device:>10}", rec.size, show=wanted(args)) as advance:
        r = repo.restore(b.id, args.device, args.to, progress=advance, force=args.force)
    out.emit(
        r,
        f"restored {args.device} as of {b.id} to {args.to}: {format_size(r['size'])}"
        f"\nsha256 {r['sha256']}",
    )
    return 0


def cmd_verify(args: argparse.Namespace, client: Any, out: Any) -> int:
    repo = open_repo(args)
    chosen = [repo.get(args.backup)] if args.backup else [b for b in repo.backups() if b.ok]
    total = sum(d.size for b in chosen if b.ok for d in b.devices)
    with progress("verify", total, show=wanted(args)) as advance:
        problems = repo.verify(args.backup and chosen[0].id, progress=advance)
    doc = {
        "ok": not problems,
        "backups": [b.id for b in chosen],
        "problems": [
            {
                "backup": p.backup,
                "device": p.device,
                "chunk": p.chunk,
                "offset": p.offset,
                "digest": p.digest,
                "object": p.object,
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
    out.emit(doc, f"{len(chosen)} backup(s) verified, every chunk checks")
    return 0


def cmd_prune(args: argparse.Namespace, client: Any, out: Any) -> int:
    from blksnap.backup.retention import Policy
    from blksnap.backup.retention import table as decision_rows

    last = args.keep_last
    if args.keep is not None:
        if last:
            raise error(errno.EINVAL, "give --keep or --keep-last, not both")
        last = args.keep
    policy = Policy(
        last=last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
    )
    if policy.empty:
        raise error(
            errno.EINVAL,
            "say what to keep: --keep-last N, --keep-hourly/daily/weekly/monthly/yearly N",
        )
    repo = open_repo(args)
    decisions = repo.prune(policy, dry_run=args.dry_run)
    removed = [d.id for d in decisions if not d.keep]
    verb = "would remove" if args.dry_run else "removed"
    text = table(decision_rows(decisions), ["ID", "STARTED", "ACTION", "WHY"]) if decisions else ""
    summary = f"{policy.describe()}: {verb} {len(removed)} of {len(decisions)} backup(s)"
    if removed and not args.dry_run:
        summary += "; 'blksnap gc' frees the chunks only they used"
    out.emit(
        {
            "removed": sorted(removed),
            "kept": [d.id for d in decisions if d.keep],
            "dry_run": args.dry_run,
            "decisions": [
                {"id": d.id, "keep": d.keep, "reasons": list(d.reasons)} for d in decisions
            ],
        },
        (text + "\n" if text else "") + summary,
    )
    return 0


def cmd_gc(args: argparse.Namespace, client: Any, out: Any) -> int:
    repo = open_repo(args)
    r = repo.gc(dry_run=args.dry_run, grace=args.grace)
    verb = "would remove" if args.dry_run else "removed"
    out.emit(
        r.as_dict(),
        f"{r.chunks} chunk files; {r.indexes} index(es) name {r.chunks_referenced} digests;"
        f" {verb} {r.chunks_removed} ({format_size(r.bytes_removed)})"
        + (f", kept {r.chunks_recent} unnamed but newer than {r.cutoff}" if r.chunks_recent else "")
        + (f", {r.running_backups} backup(s) running" if r.running_backups else "")
        + f" in {r.seconds:.1f} s",
    )
    return 0
