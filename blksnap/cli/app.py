"""The ``blksnap`` command line: every operation of blksnapd, for people
(readable text) and scripts (``--json``: one JSON document on stdout; errors
as ``{"error": "EBUSY", "message": ...}`` on stderr). Exit status: 0 done,
1 failed (the errno is named), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from typing import Any

from blksnap import __version__
from blksnap.cli.output import Out, table
from blksnap.control.client import Client, default_socket
from blksnap.errors import BlksnapError, InvalidArgument, error, from_oserror
from blksnap.units import SECTOR_SHIFT, format_size, parse_sector_range, parse_size

EPILOG = """\
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

The daemon's socket is /run/blksnap/blksnapd.sock unless --socket or
BLKSNAP_SOCKET says otherwise. Sizes take K, M, G, T suffixes; sector ranges
are SECTOR:COUNT in 512-byte sectors.
"""


def _sizearg(text: str) -> int:
    try:
        return parse_size(text)
    except BlksnapError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


TIMEOUT_HELP = (
    "seconds to wait for each answer of blksnapd (env BLKSNAP_TIMEOUT; 0: no limit; "
    "default 30, 300 for snapshot take, backup, daemon stop and device add --loop)"
)


def _secondsarg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


def _rangearg(text: str) -> tuple[int, int]:
    try:
        return parse_sector_range(text)
    except BlksnapError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


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


def _optarg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"not K=V: {text!r}")
    return key, value


def _add_ranges(parser: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """``-r SECTOR:COUNT ...`` (repeatable), as byte (offset, length) pairs in ``ranges``."""
    parser.add_argument(
        "-r",
        "--range",
        dest="ranges",
        nargs="+",
        action="extend",
        type=_rangearg,
        required=required,
        metavar="SECTOR:COUNT",
        help=help,
    )


def _parser() -> argparse.ArgumentParser:
    base = _Parser(add_help=False)
    base.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    base.add_argument(
        "--socket", default=argparse.SUPPRESS, help="blksnapd control socket (env BLKSNAP_SOCKET)"
    )
    common = _Parser(add_help=False, parents=[base])
    common.add_argument(
        "--timeout",
        dest="call_timeout",
        type=_secondsarg,
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
    p.add_argument(
        "--timeout",
        dest="call_timeout",
        type=_secondsarg,
        default=None,
        metavar="SECONDS",
        help=TIMEOUT_HELP,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(parent: Any, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        parents = kw.pop("parents", [common])
        return parent.add_parser(name, help=help, description=help, parents=parents, **kw)

    # daemon
    d = cmd(sub, "daemon", "start, stop or ask the blksnapd daemon")
    dsub = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = cmd(dsub, "start", "start blksnapd in the background and wait until it answers")
    start.add_argument("--state-dir", default=None, help="default /var/lib/blksnap")
    start.add_argument("--mount", default=None, help="FUSE mount point, default /run/blksnap/mnt")
    start.add_argument("--log", default=None, help="log file (default <state-dir>/blksnapd.log)")
    start.add_argument(
        "--nbd",
        default=None,
        metavar="ADDR",
        help="also serve NBD on unix:PATH or [HOST:]PORT (exports N and ID/N)",
    )
    start.add_argument(
        "--nbd-any", action="store_true", help="allow a wildcard --nbd address (all interfaces)"
    )
    start.add_argument(
        "--nbd-writable-images", action="store_true", help="export snapshot images read-write"
    )
    stop = cmd(
        dsub,
        "stop",
        "stop blksnapd cleanly: snapshots destroyed, loop devices detached, unmounted; "
        "refused (EBUSY, with the list) while file systems are mounted on its loop devices "
        "or its files are open",
    )
    stop.add_argument(
        "--force",
        action="store_true",
        help="stop anyway: loop devices under mounted file systems go away (their I/O fails)",
    )
    cmd(
        dsub,
        "status",
        "is blksnapd up and healthy (FUSE data path answering, no backing store errors), "
        "and what does it serve",
    )

    cmd(sub, "version", "versions of this CLI and of the daemon")

    # devices
    dv = cmd(sub, "device", "serve, list and remove devices")
    dvsub = dv.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = cmd(dvsub, "add", "serve PATH (file or block device) as device NAME at <mount>/dev/NAME")
    add.add_argument("path")
    add.add_argument("--name", "-n", required=True)
    add.add_argument(
        "--loop", action="store_true", help="also attach a loop device; print its path"
    )
    rm = cmd(dvsub, "remove", "stop serving a device (its loop device is detached)")
    rm.add_argument("name")
    cmd(dvsub, "list", "devices served")

    # filters
    at = cmd(sub, "attach", "attach a filter (default: blksnap, the CBT + snapshot tracker)")
    at.add_argument("-d", "--device", required=True)
    at.add_argument("--filter", default="blksnap")
    at.add_argument("--opt", action="append", type=_optarg, default=[], metavar="K=V")
    dt = cmd(sub, "detach", "detach a filter")
    dt.add_argument("-d", "--device", required=True)
    dt.add_argument("--filter", default="blksnap")

    # CBT
    ci = cmd(sub, "cbtinfo", "CBT geometry, generation and changes number of a device")
    ci.add_argument("-d", "--device", required=True)
    rc = cmd(sub, "readcbtmap", "write the CBT map (one byte per block) to FILE")
    rc.add_argument("-d", "--device", required=True)
    rc.add_argument("-f", "--file", required=True)
    md = cmd(sub, "markdirtyblock", "mark sector ranges changed in the CBT")
    md.add_argument("-d", "--device", required=True)
    _add_ranges(md, "sectors to mark changed", required=True)

    # snapshots
    sn = cmd(sub, "snapshot", "create, take, watch and destroy snapshots")
    ssub = sn.add_subparsers(dest="action", metavar="ACTION", required=True)
    cr = cmd(
        ssub,
        "create",
        "a snapshot of one or more devices; prints its id",
        epilog="Diff storage is given here with -f (and -l), or afterwards in two steps, "
        "as with the kernel module's tool: 'blksnap snapshot create -d N' (no -f), then "
        "'blksnap snapshot appendstorage -i ID -f PATH -l SIZE' (as often as needed), then "
        "'blksnap snapshot take -i ID'. A take without any diff storage is refused "
        "(EINVAL) and leaves the snapshot as it was. Storage on a file system that a "
        "blksnapd device carries (the protected root itself) is a regular file, or a "
        "directory where blksnap makes one: preallocated to -l, written through its "
        "extents below the device's filters, immutable while the snapshot lives "
        "(ext2/3/4 and xfs only). A limit its file system cannot hold: ENOSPC.",
    )
    cr.add_argument("-d", "--device", dest="devices", nargs="+", action="extend", required=True)
    cr.add_argument(
        "-f",
        "--storage",
        help="diff storage: a directory (an anonymous file there), a regular file or a "
        "block device; never a device of the snapshot itself (EINVAL)",
    )
    cr.add_argument("-l", "--limit", type=_sizearg, help="most diff storage to use from it")
    _add_ranges(cr, "use only these sectors of the storage")
    ap = cmd(ssub, "appendstorage", "grow the diff storage of a live snapshot")
    ap.add_argument("-i", "--id", required=True)
    ap.add_argument("-f", "--storage", required=True)
    ap.add_argument("-l", "--limit", type=_sizearg, help="size to use (needed for a directory)")
    _add_ranges(ap, "use only these sectors of the storage")
    tk = cmd(ssub, "take", "take the snapshot: all its devices at one instant; images appear")
    tk.add_argument("-i", "--id", required=True)
    tk.add_argument("--loop", action="store_true", help="attach a loop device to each image")
    si = cmd(ssub, "info", "the snapshot a device is in: state, error, image")
    si.add_argument("-d", "--device", required=True)
    co = cmd(ssub, "collect", "snapshots, their devices, images and state")
    co.add_argument("-i", "--id")
    # Its -t/--timeout is the wait in milliseconds, as in the kernel module's
    # tool; the global --timeout goes before the command here.
    we = cmd(ssub, "waitevent", "wait for the next event of a snapshot", parents=[base])
    we.add_argument("-i", "--id", required=True)
    we.add_argument("-t", "--timeout", type=int, default=1000, help="milliseconds (default 1000)")
    wa = cmd(ssub, "watch", "follow a snapshot's events until it ends; optionally grow its storage")
    wa.add_argument("-i", "--id", required=True)
    wa.add_argument("--extend", metavar="DIR", help="on low_free_space, add storage in DIR")
    wa.add_argument(
        "--step", type=_sizearg, default=None, help="storage added each time (default 1G)"
    )
    wa.add_argument("--max", type=_sizearg, default=None, help="most storage to add in all")
    ds = cmd(
        ssub,
        "destroy",
        "release a snapshot; its images vanish (refused with EBUSY while an image is "
        "mounted or open)",
    )
    ds.add_argument("-i", "--id", required=True)
    ds.add_argument("--force", action="store_true", help="destroy even while its images are in use")

    # backup application
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
    bk.add_argument("--storage-size", type=_sizearg, help="first size and growth step")
    bk.add_argument("--storage-max", type=_sizearg, help="most diff storage to use")
    bk.add_argument(
        "--compress",
        choices=["zstd", "none"],
        default="zstd",
        help="compression of a new repository (default zstd)",
    )
    bk.add_argument("--no-progress", action="store_true", help="no progress bar")
    bl = cmd(sub, "backups", "the backups in a repository (or one backup's devices)")
    bl.add_argument("--repo", required=True)
    bl.add_argument("--backup", "-b", help="show this backup's devices ('latest' works too)")
    rs = cmd(
        sub,
        "restore",
        "rebuild a device as of a backup (its whole chain) into PATH",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
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
system signature.""",
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
    vf = cmd(sub, "verify", "check every checksum of a repository (or of one backup)")
    vf.add_argument("--repo", required=True)
    vf.add_argument("--backup", "-b", help="only this backup")
    vf.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr = cmd(
        sub,
        "prune",
        "remove old backups, keeping the newest N and every backup their chains need",
    )
    pr.add_argument("--repo", required=True)
    pr.add_argument("--keep", type=int, required=True, metavar="N")
    pr.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    demo = cmd(
        sub, "demo", "run the engine end to end on sample devices it creates, then remove them"
    )
    demo.add_argument("--dir", help="where to make the sample devices (default: a new temp dir)")
    demo.add_argument("--size", default="64M", help="size of each sample device (default 64M)")
    return p


# -- output ---------------------------------------------------------------------


# -- commands ---------------------------------------------------------------------


def _blksnapd() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "blksnapd")
    return here if os.path.exists(here) else (shutil.which("blksnapd") or "blksnapd")


def daemon_start(args: argparse.Namespace, client: Client, out: Out) -> int:
    try:
        st = client.status()
        out.emit(
            {"running": True, "started": False, **st}, f"blksnapd already running (pid {st['pid']})"
        )
        return 0
    except BlksnapError as exc:
        client.close()
        if exc.errno == errno.ETIMEDOUT:
            raise  # something holds the socket but does not answer: not a second daemon
    state_dir = args.state_dir or "/var/lib/blksnap"
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    logfile = args.log or os.path.join(state_dir, "blksnapd.log")
    cmdline = [_blksnapd(), "--socket", client.socket_path, "--state-dir", state_dir]
    if args.mount:
        cmdline += ["--mount", args.mount]
    if args.nbd is not None:
        cmdline += ["--nbd", args.nbd]
    if args.nbd_any:
        cmdline.append("--nbd-any")
    if args.nbd_writable_images:
        cmdline.append("--nbd-writable-images")
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            cmdline, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(logfile, errors="replace") as f:
                tail = f.read()[-2000:]
            raise error(
                errno.EIO, f"blksnapd exited with status {proc.returncode}; log {logfile}:\n{tail}"
            )
        try:
            st = client.status()
            out.emit(
                {"running": True, "started": True, "log": logfile, **st},
                f"blksnapd started (pid {st['pid']}), log {logfile}",
            )
            return 0
        except BlksnapError:
            client.close()
            time.sleep(0.1)
    raise error(errno.ETIMEDOUT, f"blksnapd did not answer within 20 s; see {logfile}")


def _alive(pid: int) -> bool:
    """Is ``pid`` running (a zombie waiting for its parent is not)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def daemon_stop(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.stop(force=args.force)
    client.close()
    pid = reply["pid"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not _alive(pid):
            out.emit({"stopped": True, "pid": pid}, f"blksnapd (pid {pid}) stopped")
            return 0
        time.sleep(0.1)
    raise error(errno.ETIMEDOUT, f"blksnapd (pid {pid}) still running after 60 s")


def daemon_status(args: argparse.Namespace, client: Client, out: Out) -> int:
    st = client.status()
    healthy = st.get("healthy", True)
    problems = st.get("problems") or []
    health = "healthy" if healthy else "NOT HEALTHY:\n" + "\n".join(f"  - {p}" for p in problems)
    out.emit(
        {"running": True, **st},
        f"blksnapd {st['version']} running, pid {st['pid']}, up {st['uptime']:.0f} s, "
        f"{health}\n"
        f"  socket {st['socket']}\n  mount  {st['mount']}\n  state  {st['state_dir']}\n"
        f"  {st['devices']} device(s), {st['snapshots']} snapshot(s), loop devices: "
        f"{', '.join(st['loops']) or 'none'}"
        + (
            f"\n  nbd    {', '.join(st.get('nbd_listen') or [st['nbd']])}, "
            f"{st.get('nbd_clients', 0)} client(s)"
            if st.get("nbd")
            else ""
        ),
    )
    return 0


def watch(args: argparse.Namespace, client: Client, out: Out) -> int:
    step = args.step or parse_size("1G")
    cap = args.max
    added = 0
    if args.extend and not os.path.isdir(args.extend):
        raise InvalidArgument(f"--extend {args.extend}: not a directory")
    out.line({"event": "watching", "id": args.id}, f"watching snapshot {args.id} (Ctrl-C to stop)")
    while True:
        try:
            ev = client.wait_event(args.id, timeout=1.0)
        except BlksnapError as exc:
            if exc.errno == errno.ENOENT:
                out.line({"event": "gone", "id": args.id}, f"snapshot {args.id} is gone")
                return 0
            raise
        if ev is None:
            continue
        out.line(
            {"event": ev.code, "data": ev.data, "time": ev.time},
            f"{ev.code}: {json.dumps(ev.data)}",
        )
        if ev.code == "corrupted":
            return 1
        if ev.code == "low_free_space" and args.extend:
            size = step if cap is None else min(step, cap - added)
            if size <= 0:
                out.line(
                    {"event": "limit", "added": added},
                    f"not extending: --max {format_size(cap or 0)} reached",
                )
                continue
            client.snapshot_append_storage(args.id, args.extend, size=size)
            added += size
            out.line(
                {"event": "extended", "size": size, "added": added, "path": args.extend},
                f"extended by {format_size(size)} in {args.extend} "
                f"({format_size(added)} added in all)",
            )


def _write_file(path: str, data: bytes) -> None:
    """``data`` into ``path``: a regular file is replaced whole (written beside
    it, then renamed); anything else that exists (``/dev/stdout``, a pipe) is
    written as it is, never replaced."""
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise from_oserror(exc, f"-f {path}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise from_oserror(exc, f"-f {path}") from None
        return
    tmp = f"{path}.tmp{os.getpid()}"
    made = False
    try:
        with open(tmp, "xb") as f:
            made = True
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        if made:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise from_oserror(exc, f"-f {path}") from None


def run(args: argparse.Namespace, client: Client, out: Out) -> int:
    c, a = args.command, getattr(args, "action", None)
    if c == "daemon":
        return {"start": daemon_start, "stop": daemon_stop, "status": daemon_status}[a](
            args, client, out
        )
    if c == "version":
        try:
            daemon: Any = client.version()
        except BlksnapError as exc:
            daemon = {"error": exc.errname, "message": exc.message}
        text = f"blksnap {__version__}\nblksnapd " + (
            daemon["daemon"] if "daemon" in daemon else f"not reachable ({daemon['error']})"
        )
        out.emit({"cli": __version__, "daemon": daemon}, text)
        return 0
    if c == "device":
        if a == "add":
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
        elif a == "remove":
            client.remove_device(args.name)
            out.emit({"name": args.name, "removed": True}, f"removed {args.name}")
        else:
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
                table(rows, ["NAME", "SIZE", "LOOP", "FILTERS", "BACKING"])
                if devs
                else "no devices",
            )
        return 0
    if c == "attach":
        client.attach(args.device, args.filter, dict(args.opt))
        out.emit(
            {"device": args.device, "filter": args.filter, "attached": True},
            f"{args.filter} attached to {args.device}",
        )
        return 0
    if c == "detach":
        client.detach(args.device, args.filter)
        out.emit(
            {"device": args.device, "filter": args.filter, "detached": True},
            f"{args.filter} detached from {args.device}",
        )
        return 0
    if c == "cbtinfo":
        info = client.cbt_info(args.device).as_dict()
        out.emit(info, "\n".join(f"{k}: {v}" for k, v in info.items()))
        return 0
    if c == "readcbtmap":
        if os.path.isdir(args.file):
            raise error(errno.EISDIR, f"-f {args.file}: is a directory; name a file")
        data = client.cbt_map(args.device)
        _write_file(args.file, data)
        changed = sum(1 for b in data if b)
        out.emit(
            {"device": args.device, "file": args.file, "block_count": len(data), "marked": changed},
            f"{len(data)} blocks written to {args.file} ({changed} marked)",
        )
        return 0
    if c == "markdirtyblock":
        client.mark_dirty(args.device, args.ranges)
        out.emit(
            {
                "device": args.device,
                "ranges": [[o >> SECTOR_SHIFT, n >> SECTOR_SHIFT] for o, n in args.ranges],
            },
            f"{len(args.ranges)} range(s) marked",
        )
        return 0
    if c == "snapshot":
        return snapshot(args, client, out)
    if c in ("backup", "restore", "backups", "verify", "prune"):
        from blksnap.cli.backup_cmd import run_backup_command

        return run_backup_command(args, client, out)
    raise AssertionError(c)


def snapshot(args: argparse.Namespace, client: Client, out: Out) -> int:
    a = args.action
    if a == "create":
        sid = client.snapshot_create(args.devices, args.storage, args.limit, args.ranges)
        out.emit({"id": sid}, sid)
        if not args.storage:
            print(
                f"blksnap: snapshot {sid} has no diff storage yet; add some before "
                f"'snapshot take' with: blksnap snapshot appendstorage -i {sid} -f PATH "
                "[-l SIZE]",
                file=sys.stderr,
            )
    elif a == "appendstorage":
        r = client.snapshot_append_storage(
            args.id, args.storage, size=args.limit, ranges=args.ranges
        )
        out.emit(
            r,
            f"storage of {args.id}: {format_size(r['storage']['capacity'])}, "
            f"{format_size(r['storage']['free'])} free",
        )
    elif a == "take":
        r = client.snapshot_take(args.id, loop=args.loop)
        text = "\n".join(f"{n}: {i['loop'] or i['path']}" for n, i in sorted(r["images"].items()))
        out.emit(r, text)
    elif a == "info":
        r = client.snapshot_info(args.device)
        out.emit(
            r,
            f"snapshot {r['id']} ({r['state']}), error {r['error'] or 'none'}\n"
            f"image {r['image'] or '-'}" + (f" on {r['loop']}" if r["loop"] else ""),
        )
    elif a == "collect":
        snaps = client.snapshot_collect(args.id)
        lines = []
        for s in snaps:
            lines.append(
                f"{s['id']}  {s['state']}"
                + (f" ({s['error']})" if s["error"] else "")
                + f"  storage {format_size(s['storage']['used'])}"
                + f" of {format_size(s['storage']['capacity'])}"
            )
            for d in s["devices"]:
                lines.append(f"  {d['name']}: " + (d["loop"] or d["image"] or "(not taken)"))
        out.emit(snaps, "\n".join(lines) if snaps else "no snapshots")
    elif a == "waitevent":
        ev = client.wait_event(args.id, timeout=args.timeout / 1000.0)
        doc = (
            {"event": ev.code, "data": ev.data, "time": ev.time}
            if ev
            else {"event": "timeout", "data": {}}
        )
        out.emit(doc, doc["event"] + (f" {json.dumps(doc['data'])}" if doc["data"] else ""))
    elif a == "watch":
        return watch(args, client, out)
    elif a == "destroy":
        client.snapshot_destroy(args.id, force=args.force)
        out.emit({"id": args.id, "destroyed": True}, f"destroyed {args.id}")
    return 0


#: Seconds to wait for each answer of blksnapd, by command (default 30).
LONG_TIMEOUT = 300.0
DEFAULT_TIMEOUT = 30.0


def _call_timeout(args: argparse.Namespace, parser: argparse.ArgumentParser) -> float | None:
    """--timeout, else BLKSNAP_TIMEOUT, else the command's default; None: no limit."""
    value = getattr(args, "call_timeout", None)
    if value is None and os.environ.get("BLKSNAP_TIMEOUT"):
        try:
            value = _secondsarg(os.environ["BLKSNAP_TIMEOUT"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"BLKSNAP_TIMEOUT: {exc}")
    if value is None:
        c, a = args.command, getattr(args, "action", None)
        slow = {("snapshot", "take"), ("snapshot", "destroy"), ("daemon", "stop")}
        slow |= {("device", "remove")}
        if getattr(args, "loop", False):
            slow.add(("device", "add"))
        long = c == "backup" or (c, a) in slow
        value = LONG_TIMEOUT if long else DEFAULT_TIMEOUT
    return value or None


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
    timeout = _call_timeout(args, parser)
    try:
        if args.command == "demo":
            from blksnap.tools.demo import run_demo

            return run_demo(directory=args.dir, size=args.size, as_json=args.json)
        with Client(args.socket or default_socket(), timeout=timeout) as client:
            return run(args, client, out)
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
