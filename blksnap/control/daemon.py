"""``blksnapd``: serves devices and snapshot images over FUSE files (and over
NBD with ``--nbd``), and the control socket that ``blksnap`` and
:class:`blksnap.Client` speak to.

The FUSE files are served by reader threads of blksnapd's own FUSE session
(:mod:`blksnap.frontends.fuse_own`), each request start to finish in the
thread that read it; one trio event loop runs the NBD server, the control
socket and a watch on those threads; engine
calls, ``losetup`` and FIFREEZE run in worker threads (they may need the
loop to serve FUSE requests while they wait). Shutdown on SIGTERM, SIGINT or
``daemon.stop``: snapshots destroyed, loop devices it made detached, devices
flushed, FUSE unmounted, socket removed. The NBD server stops first: it
finishes the requests in flight, then closes its connections.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import trio

from blksnap import __version__, hostinfo
from blksnap.control import host, loop
from blksnap.control.backups import BackupServing
from blksnap.control.fusefront import FUSE_RECORD, FuseFront
from blksnap.control.protocol import VERSION
from blksnap.control.regions import SupervisedRegions
from blksnap.control.server import ControlServer, Handler
from blksnap.control.supervisor import RESTART_STATUS, Inherited
from blksnap.control.users import Users
from blksnap.engine.engine import Engine
from blksnap.engine.params import Params
from blksnap.errors import BlksnapError, InvalidArgument, IOFailure, error
from blksnap.fileio import fsync_dir
from blksnap.frontends.targets import BackupTarget
from blksnap.settings import SETTINGS

if TYPE_CHECKING:
    from blksnap.frontends.nbd import Address, NbdServer

log = logging.getLogger("blksnapd")

#: Snapshots lost at worker restarts that status keeps listing (the latest).
LOST_KEPT = 100
#: In the state dir: what a worker taking over rebuilds from (:meth:`Daemon.record`).
DAEMON_RECORD = "daemon.json"


class Daemon:
    """blksnapd's engine, front-ends and loop devices, its operations (one
    ``op_*`` coroutine per op of the control protocol) and its life (run,
    signals, shutdown). Who uses what is :class:`~blksnap.control.users.Users`;
    the control socket, :class:`~blksnap.control.server.ControlServer`."""

    def __init__(
        self,
        state_dir: str,
        mount: str,
        socket_path: str,
        *,
        fuse_threads: int = SETTINGS.fuse_threads,
        nbd: Address | None = None,
        nbd_writable_images: bool = False,
        inherited: Inherited | None = None,
        restore_devices: bool = False,
        params: Params | None = None,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.mount = os.path.abspath(mount)
        self.socket_path = os.path.abspath(socket_path)
        #: A worker of a supervisor: the fds it holds for us (None: alone).
        self.inherited = inherited
        regions = SupervisedRegions(inherited) if inherited is not None else None
        self.engine = Engine(self.state_dir, params, regions=regions)
        self.engine.served_root = self.mount
        #: Taking over from a worker that died (or, under systemd, from a
        #: supervisor that died: the connection came back from the fd store):
        #: rebuild from the records.
        self.takeover = inherited is not None and (inherited.restarts > 0 or inherited.initialized)
        resume = self._read_record(FUSE_RECORD) if self.takeover else None
        #: The FUSE session: its files, its reader threads, its record.
        self.fuse = FuseFront(
            self.engine, self.mount, self.state_dir, threads=fuse_threads, resume=resume
        )
        self.fs = self.fuse.fs
        self.nbd: NbdServer | None = None
        if nbd is not None:
            from blksnap.frontends.nbd import NbdServer

            self.nbd = NbdServer(self.engine, nbd, writable_images=nbd_writable_images)
        #: Loop devices this daemon attached: FUSE path -> loop device.
        self.loops: dict[str, str] = {}
        #: Devices added with a loop device over them (attached again when
        #: blksnapd serves them again at start).
        self.loop_wanted: set[str] = set()
        #: ``--restore-devices`` at a fresh start: the devices of the last
        #: run's record, by name, until served again; kept in the record
        #: meanwhile (one whose backing store is missing stays there).
        self.unrestored: dict[str, dict[str, Any]] = {}
        #: Mounted backups and instant restores.
        self.backups = BackupServing(self)
        if restore_devices and not self.takeover:
            last = self._read_record(DAEMON_RECORD) or {}
            for d in last.get("devices", []):
                if isinstance(d, dict) and isinstance(d.get("name"), str):
                    self.unrestored[d["name"]] = d
            # (hydrations of those devices: kept in the record until served)
            self.backups.unrestored = dict(last.get("sources") or {})
        #: Options of the filters attached: (device, filter) -> options.
        self.filter_opts: dict[tuple[str, str], dict[str, Any]] = {}
        #: One writer of the record at a time (the control thread, and a
        #: migration's copy thread recording its switch).
        self._record_lock = threading.Lock()
        #: The record as last written (None: not written by this process).
        self._record_text: str | None = None
        self.engine.on_backing_switch = self._backing_switched
        self.engine.on_filter_retired = self._filter_retired
        #: Snapshots a dead worker had, gone with it: id -> why.
        self.lost_snapshots: dict[str, str] = {}
        self.lost_image_loops: dict[str, str] = {}
        self.rebuilt = False
        self.started = time.time()
        self.stopping = trio.Event()
        #: Stopping with ``--force``: the FUSE files may still be in use.
        self.forced = False
        #: Why the FUSE session ended while blksnapd still runs (the kernel
        #: aborted the connection, the mount went away), or None.
        self.fuse_ended: str | None = None
        self.control_limiter = trio.CapacityLimiter(SETTINGS.control_threads)
        self.handlers: dict[str, Handler] = {
            "version": self.op_version,
            "daemon.status": self.op_status,
            "daemon.restart": self.op_restart,
            "daemon.stop": self.op_stop,
            "device.add": self.op_device_add,
            "device.remove": self.op_device_remove,
            "device.list": self.op_device_list,
            "filter.attach": self.op_attach,
            "filter.detach": self.op_detach,
            "filter.ctl": self.op_ctl,
            "filter.list": self.op_filter_list,
            "cbt.info": self.op_cbt_info,
            "cbt.map": self.op_cbt_map,
            "cbt.markdirty": self.op_markdirty,
            "snapshot.create": self.op_snapshot_create,
            "snapshot.appendstorage": self.op_appendstorage,
            "snapshot.take": self.op_snapshot_take,
            "snapshot.info": self.op_snapshot_info,
            "snapshot.collect": self.op_snapshot_collect,
            "snapshot.waitevent": self.op_waitevent,
            "snapshot.destroy": self.op_snapshot_destroy,
            "backup.mount": self.op_mount,
            "backup.umount": self.op_umount,
            "backup.mounts": self.op_mounts,
            "restore.instant": self.op_restore_instant,
        }
        self.control = ControlServer(self.socket_path, self.handlers)
        #: Who uses the devices and images (what a remove, destroy or stop would break).
        self.who = Users(self)

    @property
    def pid(self) -> int:
        """blksnapd's pid: its supervisor's (what lives until blksnapd stops)."""
        return self.inherited.supervisor if self.inherited else os.getpid()

    # -- paths ------------------------------------------------------------------

    def device_path(self, name: str) -> str:
        return os.path.join(self.mount, "dev", name)

    def image_path(self, sid: str, name: str) -> str:
        return os.path.join(self.mount, "images", sid, name)

    async def thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.control_limiter)

    # -- operations -------------------------------------------------------------

    async def op_version(self, args: dict[str, Any]) -> Any:
        return {"daemon": __version__, "protocol": VERSION}

    async def health(self) -> tuple[list[str], dict[str, Any]]:
        """(problems, device errors): the FUSE session (own: its reader
        threads alive), the data path (a
        statfs of the mount and a stat of its dev/ directory, which the
        kernel must ask this daemon for, each given ``SETTINGS.health_timeout``
        to answer) and devices whose backing store failed requests."""
        problems: list[str] = []
        if not self.fuse_ended and not self.fuse.alive():
            self.fuse_ended = self.fuse.ended_why()  # before its watcher saw it
        if self.fuse_ended:
            problems.append(self.fuse_ended)
        for fn, path in ((os.statvfs, self.mount), (os.stat, os.path.join(self.mount, "dev"))):
            problem = await host.stat_problem(fn, path, SETTINGS.health_timeout)
            if problem:
                problems.append(problem)
                break
        dev_errors = self.engine.device_errors()
        for name, err in sorted(dev_errors.items()):
            last = err["last"]
            problems.append(
                f"device {name}: {err['errors']} I/O error(s) from its backing store, "
                f"last {last['error']} on {last['op']} at {last['offset']}: {last['message']}"
            )
        return problems, dev_errors

    async def op_status(self, args: dict[str, Any]) -> Any:
        problems, dev_errors = await self.health()
        inh = self.inherited
        return {
            "healthy": not problems,
            "problems": problems,
            "device_errors": dev_errors,
            "fuse": "down" if self.fuse_ended else "up",
            "pid": self.pid,
            "worker_pid": os.getpid(),
            "supervised": inh is not None,
            "restarts": inh.restarts if inh else 0,
            "last_restart_cause": inh.causes[-1] if inh and inh.causes else None,
            "lost_snapshots": dict(self.lost_snapshots),
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "state_dir": self.state_dir,
            "mount": self.mount,
            "socket": self.socket_path,
            "devices": len(self.engine.devices()),
            "snapshots": len(self.engine.snapshot_collect()),
            "loops": sorted(self.loops.values()),
            "nbd": self.nbd.address_text if self.nbd else None,
            "nbd_listen": list(self.nbd.bound) if self.nbd else [],
            "nbd_clients": len(self.nbd.connections) if self.nbd else 0,
            "mounted_backups": sorted(self.backups.mounts),
            "hydrations": {
                n: self.backups.hydration_status(n) for n in sorted(self.backups.hydrations)
            },
        }

    async def op_stop(self, args: dict[str, Any]) -> Any:
        if not args.get("force"):
            users = await self.all_users()
            if users:
                raise error(
                    errno.EBUSY,
                    "blksnapd is in use, not stopping (unmount and close these first, "
                    "or stop with --force, which detaches the loop devices under them): "
                    + "; ".join(users),
                )
        else:
            log.warning("daemon stop --force: devices and images go away under whoever uses them")
            self.forced = True
        self.stopping.set()
        return {"stopping": True, "pid": self.pid}

    async def op_restart(self, args: dict[str, Any]) -> Any:
        """A new worker from the code on disk; the supervisor keeps the FUSE
        connection and the control socket, so file systems see a pause."""
        inh = self.inherited
        if inh is None:
            raise error(
                errno.EOPNOTSUPP,
                "this blksnapd runs without a supervisor (--no-supervisor): "
                "stop and start it instead",
            )
        log.warning("daemon restart: worker %d hands over to a new one", os.getpid())
        # The supervisor starts the new worker (code from disk) and, once it
        # has imported everything and waits, signals SIGUSR1: then this one
        # goes, and the new one takes over at once.
        inh.tell("restart")
        trio.lowlevel.spawn_system_task(self._exit_for_restart, SETTINGS.restart_wait)
        return {"restarting": True, "pid": inh.supervisor, "worker_pid": os.getpid()}

    async def _exit_for_restart(self, wait: float) -> None:
        """Exit with RESTART_STATUS on SIGUSR1 from the supervisor (or after
        ``wait`` seconds without it), the devices flushed first."""
        with trio.move_on_after(wait), trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                break
        for dev in self.engine.devices():
            try:
                await self.thread(dev.flush)
            except BlksnapError as exc:
                log.error("flush %s: %s", dev.name, exc)
        logging.shutdown()
        os._exit(RESTART_STATUS)

    # -- who uses what ------------------------------------------------------------

    async def users(self, name: str, sid: str | None = None) -> list[str]:
        """Who uses device ``name`` (or its image in snapshot ``sid``):
        see :meth:`blksnap.control.users.Users.of`."""
        return await self.who.of(name, sid)

    async def snapshot_users(self, sid: str) -> list[str]:
        """Who uses the images of snapshot ``sid``."""
        return await self.who.of_snapshot(sid)

    async def all_users(self) -> list[str]:
        """Who uses any device, image or mounted backup: what a stop would break."""
        users = await self.who.of_all()
        for key in sorted(self.backups.mounts):
            users += await self.who.of_backup(key, grace=0)
        return users

    def _loop_of(self, path: str) -> str | None:
        return self.loops.get(path)

    async def _attach_loop(self, path: str, read_only: bool = False) -> str:
        dev = await self.thread(lambda: loop.attach(path, read_only=read_only))
        self.loops[path] = dev
        self.save_record()
        return dev

    async def _detach_loop(self, path: str) -> None:
        dev = self.loops.pop(path, None)
        if dev is not None:
            self.save_record()
            try:
                await self.thread(loop.detach, dev)
            except BlksnapError as exc:
                log.warning("detach %s: %s", dev, exc)

    # -- the record a new worker rebuilds from ----------------------------------------

    def _read_record(self, name: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.state_dir, name)) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("record %s unreadable, not used: %s", name, exc)
            return None
        return doc if isinstance(doc, dict) else None

    def record(self) -> dict[str, Any]:
        """What a worker taking over rebuilds from: devices (backing, filters
        and their options, the loop device made over each), the snapshots
        and the loop devices made over their images."""
        devices = []
        for dev in self.engine.devices():
            path = self.device_path(dev.name)
            filters = [
                {"filter": f, "opts": self.filter_opts.get((dev.name, f), {})}
                for f in self.engine.filters(dev.name)
            ]
            entry = {"name": dev.name, "backing": dev.path, "filters": filters}
            devices.append(
                {**entry, "loop": self.loops.get(path), "loop_wanted": dev.name in self.loop_wanted}
            )
        served = {d["name"] for d in devices}
        devices += [d for n, d in list(self.unrestored.items()) if n not in served]
        images = os.path.join(self.mount, "images") + "/"
        return {
            "version": 1,
            "devices": devices,
            "snapshots": [s["id"] for s in self.engine.snapshot_collect()],
            "image_loops": {p: lp for p, lp in list(self.loops.items()) if p.startswith(images)},
            # (carried from worker to worker: status keeps showing them)
            "lost_snapshots": dict(list(self.lost_snapshots.items())[-LOST_KEPT:]),
            **self.backups.record(),
        }

    def save_record(self) -> None:
        """:meth:`record` to the state dir, atomically (a file renamed over
        the old one): a worker dying at any moment leaves a whole record."""
        if self.inherited is None:
            return
        if self.takeover and not self.rebuilt:
            return  # still reading the old one
        path = os.path.join(self.state_dir, DAEMON_RECORD)
        with self._record_lock:
            text = json.dumps(self.record(), indent=1)
            if text == self._record_text:
                return
            # Durable before it counts: ``--restore-devices`` reads it at
            # boot, and after a power cut an unsynced record can be empty
            # (the rename on disk before the data) or say a migrated device
            # is still on its old store. Only a changed record is written
            # (a worker taking over writes its first once serving again,
            # outside the stall).
            with open(f"{path}.tmp", "w") as f:
                f.write(text)
                f.flush()
                os.fdatasync(f.fileno())
            os.replace(f"{path}.tmp", path)
            fsync_dir(self.state_dir)
            self._record_text = text

    def _backing_switched(self, name: str, path: str) -> None:
        """A migration is done (in its copy thread, the device drained, the
        device already on ``path`` but not yet served from it): the record
        says so before any request reaches the new store, so that a worker
        taking over serves the device from there. (Until this record is
        written, the old store holds every byte: one taking over serves it
        from there and copies again.)"""
        self.filter_opts.pop((name, "migrate"), None)
        log.info("device %s: now on %s (migration done)", name, path)
        self.save_record()

    def _filter_retired(self, name: str, filter: str) -> None:
        """A filter took itself off device ``name`` (a hydration done; in its
        thread, the device drained): recorded before any request goes on."""
        self.filter_opts.pop((name, filter), None)
        if filter == "hydrate":
            self.backups.hydration_done(name)
            log.info("device %s: hydration done; an ordinary device from now on", name)
        self.save_record()

    def rebuild(self) -> None:
        """Taking over: the devices, filters and loop devices of the record
        the dead worker left, then its snapshots from the regions the
        supervisor holds (:meth:`Engine.snapshot_resume`): their images are
        served again under the same node ids, and the loop devices over
        them kept. A snapshot that cannot be carried on is released, its id
        kept in :attr:`lost_snapshots` with the reason, and the loop devices
        over its images detached once serving (:meth:`drop_lost_images`)."""
        doc = self._read_record(DAEMON_RECORD) or {}
        cause = self.inherited.causes[-1] if self.inherited and self.inherited.causes else "?"
        self.backups.rebuild(doc)  # (hydration sources, before the filters that read them)
        for d in doc.get("devices", []):
            name = d["name"]
            try:
                self.engine.add_device(d["backing"], name, taking_over=True)
            except BlksnapError as exc:
                log.error("taking over: device %s (%s) not served again: %s", name,
                          d["backing"], exc)  # fmt: skip
                continue
            for f in d.get("filters", []):
                try:
                    self.engine.attach(name, f["filter"], f.get("opts") or {})
                    self.filter_opts[(name, f["filter"])] = f.get("opts") or {}
                except BlksnapError as exc:
                    log.error("taking over: filter %s of device %s not attached again: %s",
                              f["filter"], name, exc)  # fmt: skip
                    if f["filter"] == "hydrate":
                        # Served without it, the device would read what is not
                        # restored yet: every request fails instead.
                        why = f"{name}: its hydration could not be carried on: {exc.message}"
                        self.engine.device(name).queue.close(lambda why=why: IOFailure(why))
            self.fs.add_device(name)
            lp = d.get("loop")
            if d.get("loop_wanted") or lp:
                self.loop_wanted.add(name)
            path = self.device_path(name)
            if lp and hostinfo.backing_file(os.path.basename(lp)) == path:
                self.loops[path] = lp
            log.info("taking over: device %s (%s)%s", name, d["backing"],
                     f", {lp}" if lp else "")  # fmt: skip
        self.backups.rebuild_mounts(doc)
        earlier = doc.get("lost_snapshots")
        if isinstance(earlier, dict):
            self.lost_snapshots.update({str(k): str(v) for k, v in earlier.items()})
        served: set[str] = set()
        for sid in self.engine.snapshots_left():
            try:
                snap = self.engine.snapshot_resume(sid)
            except BlksnapError as exc:
                self.lost_snapshots[sid] = f"lost at worker restart ({cause}): {exc.message}"
                log.error("taking over: snapshot %s lost: %s", sid, exc.message)
                continue
            if snap is None:
                continue  # its destroy was cut short: finished
            names = sorted(snap.members)
            if any(m.image is not None for m in snap.members.values()):
                self.fs.add_snapshot(sid, names)
                served.add(sid)
            log.info("taking over: snapshot %s (%s) carried on: %s", sid, ", ".join(names),
                     snap.state + (f": {snap.reason}" if snap.reason else ""))  # fmt: skip
        images = os.path.join(self.mount, "images")
        for path, lp in (doc.get("image_loops") or {}).items():
            sid = os.path.basename(os.path.dirname(path))
            if os.path.dirname(os.path.dirname(path)) == images and sid in served:
                if hostinfo.backing_file(os.path.basename(lp)) == path:
                    self.loops[path] = lp
            else:
                self.lost_image_loops[path] = lp
        regions = self.engine.regions
        if isinstance(regions, SupervisedRegions):
            tracked = [d.name for d in self.engine.devices() if self.engine.tracker_of(d.name)]
            used = {f"cbt/{name}" for name in tracked}
            used |= {
                f"filter/{d.name}/{f}"
                for d in self.engine.devices()
                for f in self.engine.filters(d.name)
            }
            used |= self.backups.key_regions()
            kept = {f"snap/{s['id']}" for s in self.engine.snapshot_collect()}
            for key in regions.held_keys():
                # (a snapshot's keys: snap/ID and snap/ID/...; file systems
                # left frozen are thawed once serving: thaw_left)
                if key.startswith(loop.FROZEN_KEY):
                    continue
                if key not in used and "/".join(key.split("/")[:2]) not in kept:
                    log.warning("taking over: region %s not used by any device: let go", key)
                    regions.drop(key)
        self.rebuilt = True

    async def restore_devices(self) -> None:
        """``--restore-devices``, at a fresh start (a boot): the devices of
        the last run served again, each with its tracker (the CBT carries on
        from its checkpoint when it can be trusted, else starts a new
        generation and says why) and its loop device. Other filters are not
        attached again (a flakey or powercut left attached must not greet a
        boot; a migration starts again when asked). A device that cannot be
        served (its file missing) stays in the record for the next start."""
        for name, d in list(self.unrestored.items()):
            filters = [f.get("filter") for f in d.get("filters") or [] if isinstance(f, dict)]
            hydrate = next(
                (f for f in d.get("filters") or [] if isinstance(f, dict)
                 and f.get("filter") == "hydrate"), None,
            )  # fmt: skip
            if hydrate is not None and not await self.thread(self.backups.boot_source, name):
                # (served without its hydration it would read what is not restored yet)
                continue
            try:
                await self.thread(self.engine.add_device, str(d["backing"]), name)
            except (BlksnapError, KeyError, TypeError) as exc:
                log.error("device %s (%s) not served again at start: %s", name,
                          d.get("backing"), exc)  # fmt: skip
                continue
            if hydrate is not None:
                try:
                    await self.thread(
                        self.engine.attach, name, "hydrate", hydrate.get("opts") or {}
                    )
                    self.filter_opts[(name, "hydrate")] = hydrate.get("opts") or {}
                except BlksnapError as exc:
                    log.error("device %s: hydration not carried on, device not served: %s",
                              name, exc)  # fmt: skip
                    self.backups.device_removed(name)
                    await self.thread(self.engine.remove_device, name)
                    continue
            self.fs.add_device(name)
            del self.unrestored[name]
            if "blksnap" in filters:
                try:
                    await self.thread(self.engine.attach, name, "blksnap", {})
                    self.filter_opts[(name, "blksnap")] = {}
                except BlksnapError as exc:
                    log.error("device %s: tracker not attached again: %s", name, exc)
            others = [f for f in filters if f not in ("blksnap", "hydrate")]
            if others:
                log.warning("device %s: filters %s not attached again at start",
                            name, ", ".join(map(str, others)))  # fmt: skip
            trk = self.engine.tracker_of(name)
            origin = trk.origin if trk is not None else None
            log.info("device %s served again (%s)%s", name, d["backing"],
                     f", CBT: {origin}" if origin else "")  # fmt: skip
            if d.get("loop_wanted") or d.get("loop"):
                self.loop_wanted.add(name)
                try:
                    await self._attach_loop(self.device_path(name))
                except BlksnapError as exc:
                    log.error("device %s: no loop device: %s", name, exc)
            self.save_record()

    async def thaw_left(self) -> None:
        """Once serving, after a takeover: thaw the file systems the dead
        worker left frozen (it died in a take; :func:`loop.thaw_left`)."""
        dying = self.inherited.dying if self.inherited else []
        await trio.to_thread.run_sync(loop.thaw_left, self.engine.regions, dying)

    async def drop_lost_images(self) -> None:
        """Once serving, after a takeover: detach the loop devices of images
        that did not carry on."""
        for path, lp in self.lost_image_loops.items():
            if hostinfo.backing_file(os.path.basename(lp)) == path:
                log.warning("detaching %s: its image %s was lost with the worker", lp, path)
                try:
                    await self.thread(loop.detach, lp)
                except BlksnapError as exc:
                    log.error("detach %s: %s", lp, exc)

    async def unsteer_loops(self) -> None:
        """Once serving, after a takeover: the loop devices it carries on whose
        completions are still steered (attached by a blksnapd from before
        :func:`loop.unsteer`) stop being so. Not before the new worker serves:
        storing a queue attribute may freeze the loop device's queue, which
        waits for the requests in flight, and only a serving worker answers
        them."""
        for path, lp in list(self.loops.items()):
            if hostinfo.backing_file(os.path.basename(lp)) != path:
                continue  # (detached meanwhile, or another file's now)
            if await self.thread(loop.steered, lp):
                log.info("%s: its completions are no longer steered", lp)
                await self.thread(loop.unsteer, lp)

    def _describe_device(self, name: str) -> dict[str, Any]:
        dev = self.engine.device(name)
        path = self.device_path(name)
        return {
            "name": name,
            "path": path,
            "loop": self._loop_of(path),
            "backing": dev.path,
            "size": dev.size,
            "filters": self.engine.filters(name),
            "stack": self.engine.filter_status(name),
            "hydration": self.backups.hydration_status(name),
        }

    def _check_store(self, path: str, what: str, ours: str) -> None:
        """A path to serve a device from (``what``): absolute, and not a
        file of blksnapd's mount (refused saying ``ours``)."""
        if not os.path.isabs(path):
            raise InvalidArgument(f"{what} path must be absolute: {path}")
        if os.path.commonpath([os.path.abspath(path), self.mount]) == self.mount:
            raise InvalidArgument(ours)

    async def op_device_add(self, args: dict[str, Any]) -> Any:
        path, name = args["path"], args["name"]
        self._check_store(path, "backing", "a file served by blksnapd cannot back another device")
        await self.thread(self.engine.add_device, path, name)
        try:
            await self._serve_new(name, bool(args.get("loop")))
        except BlksnapError:
            self.fs.remove_device(name)
            await self.thread(self.engine.remove_device, name)
            raise
        return self._describe_device(name)

    async def _serve_new(self, name: str, loop_wanted: bool) -> None:
        """A device just added to the engine: its FUSE file, the record,
        and a loop device over it if wanted (a failure of that is raised)."""
        self.fs.add_device(name)
        self.unrestored.pop(name, None)
        if loop_wanted:
            self.loop_wanted.add(name)
        self.save_record()
        if loop_wanted:
            await self._attach_loop(self.device_path(name))

    async def op_device_remove(self, args: dict[str, Any]) -> Any:
        name = args["name"]
        sid = self.engine.snapshot_of(name)  # NotFound without such a device
        if sid is not None:
            raise error(errno.EBUSY, f"{name} is in snapshot {sid}")
        path = self.device_path(name)
        # Mounted or held loop devices, other loop devices over the file,
        # processes with it open, NBD clients (NBD lets no new one in while
        # the device goes).
        users = await self.users(name)
        if users:
            raise error(errno.EBUSY, "in use, not removing: " + "; ".join(users))
        with self.nbd.withdrawn(name) if self.nbd else nullcontext():
            await self._detach_loop(path)
            self.fs.remove_device(name)
            await self.thread(self.engine.remove_device, name)
            self.backups.device_removed(name)
            self.filter_opts = {k: v for k, v in self.filter_opts.items() if k[0] != name}
            self.loop_wanted.discard(name)
            self.save_record()
        return {"name": name, "removed": True}

    # -- backups ------------------------------------------------------------------

    def _served_backup(self, key: str) -> dict[str, Any]:
        path = self.backups.mount_path(key)
        return {
            "name": BackupTarget.PREFIX + key,
            "path": path,
            "loop": self._loop_of(path),
            "nbd_export": (BackupTarget.PREFIX + key) if self.nbd else None,
        }

    async def op_mount(self, args: dict[str, Any]) -> Any:
        got = await self.thread(self.backups.mount, args)
        key = got["key"]
        self.save_record()
        if args.get("loop"):
            try:
                await self._attach_loop(self.backups.mount_path(key), read_only=True)
            except BlksnapError:
                self.fs.remove_backup(key)
                self.backups.forget_mount(key)
                self.save_record()
                raise
        return {**self._served_backup(key), "size": got["size"], "source": got["source"]}

    async def op_umount(self, args: dict[str, Any]) -> Any:
        key = self.backups.mount_key(args["backup"], args["device"])
        path = self.backups.mount_path(key)
        if not args.get("force"):
            users = await self.who.of_backup(key, grace=0)
            if users:
                raise error(errno.EBUSY, "in use, not unmounting: " + "; ".join(users))
        await self._detach_loop(path)
        self.fs.remove_backup(key)
        await self.thread(self.backups.forget_mount, key)
        self.save_record()
        return {"name": BackupTarget.PREFIX + key, "unmounted": True}

    async def op_mounts(self, args: dict[str, Any]) -> Any:
        return [
            {**self._served_backup(k), **o.doc()} for k, o in sorted(self.backups.mounts.items())
        ]

    async def op_restore_instant(self, args: dict[str, Any]) -> Any:
        name = args["device"]
        self._check_store(
            args["target"], "target", "a file served by blksnapd cannot be a restore target"
        )
        got = await self.thread(self.backups.start_hydration, args)
        try:
            await self._serve_new(name, bool(args.get("loop")))
        except BlksnapError as exc:  # (served, hydrating: only the loop device is missing)
            log.error("device %s: no loop device: %s", name, exc)
        desc = self._describe_device(name)
        return {
            "name": name,
            "path": desc["path"],
            "loop": desc["loop"],
            "nbd_export": name if self.nbd else None,
            "hydration": desc["hydration"],
            **got,
        }

    async def op_device_list(self, args: dict[str, Any]) -> Any:
        return [self._describe_device(d.name) for d in self.engine.devices()]

    async def op_attach(self, args: dict[str, Any]) -> Any:
        flt = args.get("filter", "blksnap")
        await self.thread(self.engine.attach, args["device"], flt, args.get("opts") or {})
        self.filter_opts[(args["device"], flt)] = args.get("opts") or {}
        self.save_record()
        return {
            "device": args["device"],
            "filter": flt,
            "filters": self.engine.filters(args["device"]),
        }

    async def op_detach(self, args: dict[str, Any]) -> Any:
        flt = args.get("filter", "blksnap")
        await self.thread(self.engine.detach, args["device"], flt)
        self.filter_opts.pop((args["device"], flt), None)
        self.save_record()
        return {
            "device": args["device"],
            "filter": flt,
            "filters": self.engine.filters(args["device"]),
        }

    async def op_ctl(self, args: dict[str, Any]) -> Any:
        """A filter's control command: its answer, made fit for JSON (bytes
        as base64, a record as a dict)."""
        result = await self.thread(
            self.engine.ctl, args["device"], args["filter"], args["cmd"], args.get("arg")
        )
        if isinstance(result, (bytes, bytearray)):
            return {"bytes": len(result), "base64": base64.b64encode(result).decode()}
        if hasattr(result, "as_dict"):
            return result.as_dict()
        return result

    async def op_filter_list(self, args: dict[str, Any]) -> Any:
        return self.engine.filter_kinds()

    async def op_cbt_info(self, args: dict[str, Any]) -> Any:
        return self.engine.cbt_info(args["device"]).as_dict()

    async def op_cbt_map(self, args: dict[str, Any]) -> Any:
        info = self.engine.cbt_info(args["device"])
        data = await self.thread(self.engine.cbt_map, args["device"])
        return {**info.as_dict(), "map": base64.b64encode(data).decode()}

    async def op_markdirty(self, args: dict[str, Any]) -> Any:
        ranges = [(int(o), int(n)) for o, n in args["ranges"]]
        await self.thread(self.engine.mark_dirty, args["device"], ranges)
        return {"device": args["device"], "ranges": len(ranges)}

    @staticmethod
    def _storage_args(path: str | None, args: dict[str, Any]) -> list[tuple[int, int]] | None:
        """Check a diff storage path of a request; its byte ranges, or None."""
        if path is not None and not os.path.isabs(path):
            raise InvalidArgument(f"storage path must be absolute: {path}")
        return [(int(o), int(n)) for o, n in args.get("ranges", [])] or None

    async def op_snapshot_create(self, args: dict[str, Any]) -> Any:
        storage = args.get("storage")
        ranges = self._storage_args(storage, args)
        sid = await self.thread(
            lambda: self.engine.snapshot_create(
                args["devices"],
                storage=storage,
                limit=args.get("limit"),
                ranges=ranges,
                sid=args.get("id"),
            )
        )
        self.save_record()
        return {"id": sid}

    async def op_appendstorage(self, args: dict[str, Any]) -> Any:
        ranges = self._storage_args(args["path"], args)
        await self.thread(
            lambda: self.engine.snapshot_append_storage(
                args["id"], args["path"], size=args.get("size"), ranges=ranges
            )
        )
        snap = self.engine.snapshot_collect(args["id"])[0]
        return {"id": args["id"], "storage": snap["storage"]}

    def _consistent_take(self, sid: str, blockdevs: list[str]) -> list[str]:
        with loop.frozen(blockdevs, self.engine.regions) as frozen:
            self.engine.snapshot_take(sid, guard_storage=False)
        self.engine.guard_storage(sid)  # a file system write: after the thaw
        return frozen

    async def op_snapshot_take(self, args: dict[str, Any]) -> Any:
        sid = args["id"]
        snap = self.engine.snapshot(sid)
        names = sorted(snap.members)
        blockdevs: list[str] = []
        for name in names:
            blockdevs += await self.thread(hostinfo.loops_backed_by, self.device_path(name))
        frozen = await self.thread(self._consistent_take, sid, blockdevs)
        self.fs.add_snapshot(sid, names)
        self.save_record()
        images: dict[str, dict[str, Any]] = {}
        for name in names:
            path = self.image_path(sid, name)
            lp = await self._attach_loop(path) if args.get("loop") else None
            images[name] = {"path": path, "loop": lp}
        return {"id": sid, "images": images, "frozen": frozen}

    async def op_snapshot_info(self, args: dict[str, Any]) -> Any:
        info = self.engine.snapshot_info(args["device"])
        path = self.image_path(info["id"], args["device"]) if info["image"] else None
        return {
            "id": info["id"],
            "state": info["state"],
            "error": errno.errorcode.get(info["error"]) if info["error"] else None,
            "errno": info["error"],
            "image": path,
            "loop": self._loop_of(path) if path else None,
        }

    async def op_snapshot_collect(self, args: dict[str, Any]) -> Any:
        out = []
        for snap in self.engine.snapshot_collect(args.get("id")):
            for d in snap["devices"]:
                path = self.image_path(snap["id"], d["name"]) if d["image"] else None
                d["image"] = path
                d["loop"] = self._loop_of(path) if path else None
            out.append(snap)
        return out

    async def op_waitevent(self, args: dict[str, Any]) -> Any:
        sid, timeout = args["id"], args["timeout_ms"] / 1000.0
        self.engine.snapshot(sid)  # ENOENT now, not after the wait
        ev = await trio.to_thread.run_sync(
            self.engine.wait_event, sid, timeout, abandon_on_cancel=True
        )
        if ev is None:
            return {"event": "timeout", "data": {}}
        return ev.as_dict()

    async def op_snapshot_destroy(self, args: dict[str, Any]) -> Any:
        sid = args["id"]
        self.engine.snapshot(sid)  # ENOENT
        if not args.get("force"):
            users = await self.snapshot_users(sid)
            if users:
                raise error(
                    errno.EBUSY,
                    f"snapshot {sid} is in use, not destroying (unmount and close its "
                    "images first, or destroy with --force): " + "; ".join(users),
                )
        else:
            log.warning("snapshot destroy --force %s: whoever uses its images loses them", sid)
        return await self._destroy(sid)

    async def _destroy(self, sid: str) -> Any:
        snap = self.engine.snapshot(sid)
        for name in sorted(snap.members):
            await self._detach_loop(self.image_path(sid, name))
        self.fs.remove_snapshot(sid)
        await self.thread(self.engine.snapshot_destroy, sid)
        self.save_record()
        return {"id": sid, "destroyed": True}

    # -- life -------------------------------------------------------------------

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                sig = signal.Signals(signum).name
                if self.stopping.is_set():
                    continue
                # Stopping detaches the loop devices under mounted file
                # systems (their journals abort): refuse, keep serving, and
                # say why. A second signal does not force; only
                # 'blksnap daemon stop --force' does.
                users = await self.all_users()
                if users:
                    log.error(
                        "signal %s: NOT stopping, blksnapd is in use (unmount and close "
                        "these first, or 'blksnap daemon stop --force'): %s",
                        sig,
                        "; ".join(users),
                    )
                    host.sd_notify("STATUS=refused to stop: in use: " + "; ".join(users)[:400])
                    continue
                log.info("signal %s: shutting down", sig)
                self.stopping.set()

    async def _serve_fuse(self) -> None:
        why = await self.fuse.serve(self.stopping)
        if why is not None:
            self.fuse_ended = why
            log.error("%s", why)

    async def shutdown(self) -> None:
        """Destroy snapshots, detach our loop devices, flush devices. FUSE is
        still served meanwhile (losetup closes the files through it)."""
        host.sd_notify("STOPPING=1")
        if self.nbd is not None:
            await self.nbd.close()
        for snap in self.engine.snapshot_collect():
            try:
                await self._destroy(snap["id"])
            except BlksnapError as exc:
                log.error("destroy %s: %s", snap["id"], exc)
        for path in list(self.loops):
            await self._detach_loop(path)
        for key in list(self.backups.mounts):
            self.backups.forget_mount(key)  # (the read lock of its repository goes)
        for dev in self.engine.devices():
            try:
                await self.thread(dev.flush)
            except BlksnapError as exc:
                log.error("flush %s: %s", dev.name, exc)

    async def run(self) -> None:
        inh = self.inherited
        if self.nbd is not None:
            # Before the mount: a bad address leaves nothing behind. A worker
            # listens on the sockets its supervisor bound.
            held = [socket.socket(fileno=fd) for fd in inh.nbd] if inh and inh.nbd else None
            await self.nbd.open(held)
        control_sock: socket.socket | None = None
        try:
            if inh is None:
                host.clear_stale_mount(self.mount)
                os.makedirs(self.mount, mode=0o755, exist_ok=True)
                self.fuse.mount_fs()
            else:
                for fd in (*inh.fuse, inh.control, inh.status):
                    os.set_inheritable(fd, False)  # not into losetup, mount ...
                control_sock = socket.socket(fileno=inh.control)
                if self.takeover:
                    self.rebuild()
                self.fuse.adopt(inh.fuse, initialized=inh.initialized)
                inh.tell("init")
                self.save_record()
        except BaseException:
            if self.nbd is not None:
                self.nbd.remove_socket()
            raise
        log.info("FUSE %s at %s (%d reader threads)%s",
                 "mounted" if inh is None else "served", self.mount, self.fuse.threads,
                 f", worker of supervisor {inh.supervisor}, restart {inh.restarts}"
                 if inh else "")  # fmt: skip
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_fuse)
                if self.unrestored:  # (before the control socket answers)
                    await self.restore_devices()
                await nursery.start(self.control.serve, control_sock)
                if self.nbd is not None:
                    await nursery.start(self.nbd.serve)
                if self.takeover:
                    nursery.start_soon(self.thaw_left)
                    await self.drop_lost_images()
                    nursery.start_soon(self.unsteer_loops)
                nursery.start_soon(self._signals)
                log.info(
                    "blksnapd %s ready: socket %s, mount %s, state %s%s",
                    __version__,
                    self.socket_path,
                    self.mount,
                    self.state_dir,
                    f", NBD {self.nbd.address_text}" if self.nbd else "",
                )
                if inh is None:
                    host.sd_notify(f"READY=1\nMAINPID={os.getpid()}")
                else:
                    inh.tell("ready")  # the supervisor tells systemd
                await self.stopping.wait()
                await self.shutdown()
                nursery.cancel_scope.cancel()
        finally:
            try:
                self.fuse.unmount(forced=self.forced)
            except Exception as exc:
                log.error("unmount %s: %s", self.mount, exc)
            host.unmount_left_behind(self.mount)
            self.engine.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            log.info("blksnapd stopped")


def parse_params(items: Sequence[str]) -> Params:
    """``NAME=VALUE`` tunables as :class:`Params` (EINVAL for an unknown
    name or a value of the wrong type)."""
    names = sorted(f.name for f in dataclasses.fields(Params))
    defaults = Params()
    kwargs: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise InvalidArgument(
                f"--param {item!r}: NAME=VALUE with NAME one of {', '.join(names)}"
            )
        kind = type(getattr(defaults, name))
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                kwargs[name] = text.lower() in ("1", "true", "yes", "on")
            else:
                kwargs[name] = kind(text)
        except ValueError:
            raise InvalidArgument(f"--param {name}: {text!r} is not a {kind.__name__}") from None
    return Params(**kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="blksnapd",
        description="blksnap daemon: serves protected devices and snapshot images as FUSE "
        "files (<mount>/dev/N, <mount>/images/ID/N) and answers the blksnap CLI on a "
        "Unix socket. Runs in the foreground; systemd Type=notify friendly.",
    )
    p.add_argument("--state-dir", default=SETTINGS.state_dir, help=f"default {SETTINGS.state_dir}")
    p.add_argument(
        "--mount", default=SETTINGS.mount, help=f"FUSE mount point, default {SETTINGS.mount}"
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("BLKSNAP_SOCKET", SETTINGS.socket),
        help=f"control socket (env BLKSNAP_SOCKET), default {SETTINGS.socket}",
    )
    p.add_argument(
        "--nbd",
        default=None,
        metavar="ADDR",
        help="also serve devices (export N) and snapshot images (export ID/N) over NBD on "
        "unix:PATH or [HOST:]PORT (no host: 127.0.0.1; TCP is open to every local user, "
        "prefer unix:)",
    )
    p.add_argument(
        "--nbd-any",
        action="store_true",
        help="allow --nbd on a wildcard address (0.0.0.0, ::): every interface",
    )
    p.add_argument(
        "--nbd-writable-images",
        action="store_true",
        help="export snapshot images read-write (writes land in diff storage and mark the CBT)",
    )
    p.add_argument(
        "--fuse-threads",
        type=int,
        default=SETTINGS.fuse_threads,
        help="FUSE reader threads (each serves a request start to finish, so a "
        "copy-on-write write waiting for its chunk holds one)",
    )
    p.add_argument(
        "--no-supervisor",
        action="store_true",
        help="one process, no supervisor: a crash of blksnapd then ends the FUSE "
        "connection (the file systems on its devices see I/O errors)",
    )
    p.add_argument(
        "--restore-devices",
        action="store_true",
        help="at start, serve again the devices of the last run (the state dir's record), "
        "with their trackers (the CBT carries on from its checkpoint after a clean stop) "
        "and loop devices: what a boot needs",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine tunable (blksnap.engine.params.Params), e.g. "
        "cbt_checkpoint_interval=10 or cbt_intent_region_size=16777216; repeatable",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw_argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    nbd_address = None
    if args.nbd is not None:
        from blksnap.frontends.nbd import parse_address

        try:
            nbd_address = parse_address(args.nbd, allow_any=args.nbd_any)
        except BlksnapError as exc:
            print(f"blksnapd: {exc}", file=sys.stderr)
            return 2
    try:
        params = parse_params(args.param)
    except BlksnapError as exc:
        print(f"blksnapd: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        log.warning("not root: loop devices and FIFREEZE will fail")
    inherited = Inherited.from_env()
    if inherited is not None and inherited.standby is not None:
        inherited = inherited.activated()  # a standby worker: wait for the call
    if inherited is None and not args.no_supervisor:
        from blksnap.control import supervisor

        try:
            return supervisor.main(
                raw_argv, args.mount, args.socket, args.fuse_threads, nbd_address
            )
        except BlksnapError as exc:
            print(f"blksnapd: {exc}", file=sys.stderr)
            return 1
    try:
        daemon = Daemon(
            args.state_dir,
            args.mount,
            args.socket,
            fuse_threads=args.fuse_threads,
            nbd=nbd_address,
            nbd_writable_images=args.nbd_writable_images,
            inherited=inherited,
            restore_devices=args.restore_devices,
            params=params,
        )
        trio.run(daemon.run)
    except BlksnapError as exc:
        print(f"blksnapd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
