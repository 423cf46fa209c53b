"""``blksnap daemon start|stop|status`` and ``blksnap version``."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from blksnap import __version__
from blksnap.cli.args import Commands
from blksnap.cli.output import Out
from blksnap.control.client import Client
from blksnap.errors import BlksnapError, error
from blksnap.hostinfo import proc_stat
from blksnap.settings import SETTINGS
from blksnap.units import format_size


def register(sub: Any, cmd: Commands) -> None:
    d = cmd(sub, "daemon", "start, stop or ask the blksnapd daemon")
    dsub = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = cmd(dsub, "start", "start blksnapd in the background and wait until it answers")
    start.add_argument("--state-dir", default=None, help=f"default {SETTINGS.state_dir}")
    start.add_argument("--mount", default=None, help=f"FUSE mount point, default {SETTINGS.mount}")
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
    start.add_argument(
        "--restore-devices",
        action="store_true",
        help="serve the last run's devices again, with their trackers (the CBT carries on "
        "after a clean stop) and loop devices",
    )
    start.set_defaults(handler=daemon_start)
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
    stop.set_defaults(handler=daemon_stop, long_timeout=True)
    restart = cmd(
        dsub,
        "restart",
        "a new blksnapd worker from the code on disk (upgrade in place): its supervisor "
        "keeps the FUSE files, the loop devices over them and the control socket, so file "
        "systems on its devices only pause; snapshots carry on (their chunk maps and diff "
        "storage are held by the supervisor too), and so do the images being read",
    )
    restart.add_argument(
        "--force",
        action="store_true",
        help="accepted and ignored: nothing a restart would lose needs forcing",
    )
    restart.set_defaults(handler=daemon_restart, long_timeout=True)
    status = cmd(
        dsub,
        "status",
        "is blksnapd up and healthy (FUSE data path answering, no backing store errors), "
        "and what does it serve",
    )
    status.set_defaults(handler=daemon_status)

    version = cmd(sub, "version", "versions of this CLI and of the daemon")
    version.set_defaults(handler=show_version)


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
    state_dir = args.state_dir or SETTINGS.state_dir
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
    if args.restore_devices:
        cmdline.append("--restore-devices")
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
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


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


def daemon_restart(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.restart(force=args.force)
    client.close()
    old = reply["worker_pid"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = client.status()  # retried while the new worker comes up
        if st["worker_pid"] != old:
            out.emit(
                {"restarted": True, "pid": st["pid"], "old_worker_pid": old,
                 "worker_pid": st["worker_pid"], "restarts": st["restarts"]},
                f"blksnapd (pid {st['pid']}) restarted: worker {old} -> {st['worker_pid']}",
            )  # fmt: skip
            return 0
        time.sleep(0.1)
    raise error(errno.ETIMEDOUT, f"blksnapd's worker {old} was not replaced within 60 s")


def daemon_status(args: argparse.Namespace, client: Client, out: Out) -> int:
    st = client.status()
    healthy = st.get("healthy", True)
    problems = st.get("problems") or []
    health = "healthy" if healthy else "NOT HEALTHY:\n" + "\n".join(f"  - {p}" for p in problems)
    up = f"up {st['uptime']:.0f} s"
    lines = [f"blksnapd {st['version']} running, pid {st['pid']}, {up}, {health}"]
    if st.get("supervised"):
        last = st.get("last_restart_cause")
        lines.append(
            f"  worker {st['worker_pid']}, {st['restarts']} restart(s)"
            + (f", last: {last}" if last else "")
        )
    else:
        lines.append("  no supervisor: a crash of blksnapd ends the FUSE connection")
    lines += [f"  snapshot {k} {v}" for k, v in (st.get("lost_snapshots") or {}).items()]
    lines += [
        f"  socket {st['socket']}",
        f"  mount  {st['mount']}",
        f"  state  {st['state_dir']}",
        f"  {st['devices']} device(s), {st['snapshots']} snapshot(s), loop devices: "
        + (", ".join(st["loops"]) or "none"),
    ]
    if st.get("nbd"):
        lines.append(
            f"  nbd    {', '.join(st.get('nbd_listen') or [st['nbd']])}, "
            f"{st.get('nbd_clients', 0)} client(s)"
        )
    for key in st.get("mounted_backups") or []:
        lines.append(f"  backup {key} mounted at {st['mount']}/backups/{key}")
    for name, h in (st.get("hydrations") or {}).items():
        if h:
            total = h.get("total") or 1
            lines.append(
                f"  device {name}: hydration {h['state']}, {100 * h['done'] / total:.1f} % of "
                f"{format_size(total)}"
            )
    out.emit({"running": True, **st}, "\n".join(lines))
    return 0


def show_version(args: argparse.Namespace, client: Client, out: Out) -> int:
    try:
        daemon: Any = client.version()
    except BlksnapError as exc:
        daemon = {"error": exc.errname, "message": exc.message}
    text = f"blksnap {__version__}\nblksnapd " + (
        daemon["daemon"] if "daemon" in daemon else f"not reachable ({daemon['error']})"
    )
    out.emit({"cli": __version__, "daemon": daemon}, text)
    return 0
