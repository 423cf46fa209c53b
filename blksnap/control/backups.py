"""blksnapd serving backups: ``blksnap mount`` and ``blksnap restore --instant``.

**Mount.** Device ``N`` of backup ``B`` is opened as a
:class:`~blksnap.backup.source.BackupSource` (its index read and checked,
the repository read-locked against prunes) and served read-only as
``<mount>/backups/B/N``, with a read-only loop device over it if asked, and
as the NBD export ``backups/B/N`` when blksnapd serves NBD.

**Instant restore.** The target (a file, made at the backup's size if
missing, or a block device) is served at once as device ``N`` with the
``hydrate`` filter (:mod:`blksnap.engine.hydrate`) over the backup's source,
and the tracker attached before any request can reach it. The tracker
starts a new CBT generation; the repository records that it starts from
``B`` (:meth:`Repository.link_generation`), so the next backup of ``N`` is
an incremental against ``B`` holding exactly the writes since the restore.

**Keys.** The command line opens an encrypted repository (passphrase or
key file) and hands blksnapd the master key; blksnapd keeps it in memory its
supervisor holds (a region), never on disk, so a worker that takes over
opens the repository again; a key *file* named on the command line is
recorded instead, so that a boot can carry on a hydration. After a boot a
hydration whose repository needs a passphrase waits (its device is not
served) until ``blksnap restore --instant`` is given again with the same
arguments: it carries on from the committed map.

Everything is recorded in ``daemon.json`` (``"mounts"`` and each
hydration's ``"sources"`` entry) for a worker taking over.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blksnap import hostinfo
from blksnap.backup.crypto import Keys
from blksnap.backup.repository import Repository
from blksnap.backup.restore import check_target
from blksnap.backup.source import BackupSource
from blksnap.engine import cbt_checkpoint
from blksnap.engine import source as sources
from blksnap.engine.hydrate import map_state
from blksnap.engine.source import Source
from blksnap.errors import (
    BlksnapError,
    Exists,
    InvalidArgument,
    IOFailure,
    NotFound,
    error,
)
from blksnap.fileio import fd_size, storage_identity
from blksnap.frontends.targets import BackupTarget

if TYPE_CHECKING:
    from blksnap.control.daemon import Daemon

log = logging.getLogger("blksnapd.backups")

#: Where a mounted backup's source is registered, and the folder (and NBD
#: export prefix) it is served under: the front-ends' names.
MOUNT_PREFIX = BackupTarget.KEY_PREFIX
HYDRATE_PREFIX = "hydrate/"
#: A hydration's source keeps no decoded chunks: each is written to the
#: target once and read from there after (a mount's keeps SETTINGS.mount_cache).
HYDRATION_CACHE = 0
#: Where hydration maps live, under the state dir.
MAPS = "hydrate"


class Opened:
    """What blksnapd needs to open one source again (a worker taking over),
    and what it was (size, unit, identity: a :class:`Deferred` stands in
    for it with them)."""

    def __init__(
        self,
        repo: str,
        backup: str,
        device: str,
        key_id: str | None,
        key_file: str | None,
        shape: dict[str, Any] | None = None,
    ) -> None:
        self.repo = repo
        self.backup = backup
        self.device = device
        self.key_id = key_id
        self.key_file = key_file
        self.shape = shape or {}

    @classmethod
    def of(cls, src: BackupSource, key_id: str | None, key_file: str | None) -> Opened:
        shape = {"size": src.size, "unit": src.unit, "identity": src.identity}
        return cls(src.repo.locator, src.backup_id, src.device, key_id, key_file, shape)

    def doc(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "backup": self.backup,
            "device": self.device,
            "key_id": self.key_id,
            "key_file": self.key_file,
            **self.shape,
        }

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Opened:
        shape = {k: d[k] for k in ("size", "unit", "identity") if k in d}
        return cls(
            str(d["repo"]),
            str(d["backup"]),
            str(d["device"]),
            d.get("key_id"),
            d.get("key_file"),
            shape,
        )


class Deferred(Source):
    """A recorded source in its place while it is opened again (a worker
    taking over), or after it could not be (the repository gone for a while,
    a damaged index ...): same size, unit and identity, so the device or the
    mounted backup is served on at once, whatever the repository answers.

    Made with no ``why``, it opens the source in a thread of its own at once:
    a takeover never waits for a repository (an object store that does not
    answer costs a minute of retries, a big index seconds of reading), and
    the file systems on the other devices see no more than the takeover's
    own pause. A read that needs the source meanwhile waits for that open
    (the storage's retries bound it). Once an open has failed, reads of units
    not restored yet fail with ``EIO`` naming why, and each tries to open the
    source again (at most every :data:`RETRY` seconds), so ``ctl resume``
    carries on once the repository is back."""

    RETRY = 5.0

    def __init__(
        self, o: Opened, reopen: Callable[[Opened], BackupSource], why: str | None = None
    ) -> None:
        self.size = int(o.shape["size"])
        self.unit = int(o.shape["unit"])
        self.identity = str(o.shape["identity"])
        self.description = f"backup {o.backup} of device {o.device} in {o.repo}"
        self._o = o
        self._reopen = reopen
        self._why = why or "being opened again"
        self._src: BackupSource | None = None
        self._closed = False
        #: One open at a time; a read waits here for the one under way.
        self._opening = threading.Lock()
        self._state = threading.Lock()  # _src and _closed
        if why is None:
            self._next = 0.0
            threading.Thread(target=self._open, name="blksnap-reopen", daemon=True).start()
        else:
            self._next = time.monotonic() + self.RETRY

    def _open(self) -> None:
        """Open the source unless it is open, closed, or failed lately."""
        with self._opening:
            if self._src is not None or self._closed or time.monotonic() < self._next:
                return
            try:
                got = self._reopen(self._o)
                if (got.size, got.unit, got.identity) != (self.size, self.unit, self.identity):
                    got.close()
                    raise IOFailure(f"{self.description} is not the one recorded")
            except BlksnapError as exc:
                self._why = exc.message
                self._next = time.monotonic() + self.RETRY
                log.error("%s cannot be opened (%s): its regions not restored yet fail "
                          "until it can", self.description, exc.message)  # fmt: skip
                return
            with self._state:
                closed = self._closed
                if not closed:
                    self._src = got
            if closed:
                got.close()
            else:
                log.info("source %s open again", self.description)

    def _get(self) -> BackupSource:
        src = self._src
        if src is None:
            self._open()  # (or wait for the open under way)
            src = self._src
            if src is None:
                raise IOFailure(
                    f"{self.description} cannot be read ({self._why}): regions not restored "
                    "yet fail until it can (blksnap ctl ... --filter hydrate resume tries again)"
                )
        return src

    def is_zero(self, index: int) -> bool:
        src = self._src
        return src.is_zero(index) if src is not None else False

    def read_unit(self, index: int) -> bytes:
        return self._get().read_unit(index)

    def close(self) -> None:
        """(An open under way closes what it opens.)"""
        with self._state:
            self._closed = True
            src, self._src = self._src, None
        if src is not None:
            src.close()


def _blockdev_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_size(fd)
    finally:
        os.close(fd)


class BackupServing:
    """The mounted backups and the hydrations of one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        #: mount key ``B/N`` -> how it was opened.
        self.mounts: dict[str, Opened] = {}
        #: device name -> how its hydration source was opened.
        self.hydrations: dict[str, Opened] = {}
        #: At a boot: the hydration sources of devices not served again yet
        #: (kept in the record meanwhile), device name -> recorded doc.
        self.unrestored: dict[str, dict[str, Any]] = {}

    # -- opening --------------------------------------------------------------

    def _key_region(self, key_id: str) -> str:
        return f"key/{key_id}"

    def open_repo(
        self, path: str, key_hex: str | None, key_file: str | None
    ) -> tuple[Repository, str | None]:
        """The repository, opened by the master key the command line sent
        (kept where a worker taking over finds it) or by a key file; and
        its key id (None: not encrypted)."""
        if key_hex:
            try:
                master = bytes.fromhex(key_hex)
            except ValueError:
                raise InvalidArgument("key: not hex") from None
            keys = Keys.from_master(master)
            repo = Repository.open(path, keys=keys)
            self.d.engine.regions.put_blob(self._key_region(keys.key_id), master)
            return repo, keys.key_id
        repo = Repository.open(path, key_file=key_file)
        return repo, repo.keys.key_id or None

    def reopen(self, o: Opened, cache: int | None = None) -> BackupSource:
        """Open a recorded source again (a worker taking over, a boot)."""
        keys = None
        if o.key_id:
            master = self.d.engine.regions.get_blob(self._key_region(o.key_id))
            if master is not None:
                keys = Keys.from_master(master)
        if keys is not None:
            repo = Repository.open(o.repo, keys=keys)
        elif o.key_id and not o.key_file:
            raise error(errno.ENOKEY, f"{o.repo} is encrypted and its key is not held here")
        else:
            repo = Repository.open(o.repo, key_file=o.key_file)
        return BackupSource(repo, o.backup, o.device, cache)

    def key_regions(self) -> set[str]:
        """The regions holding keys still needed."""
        return {
            self._key_region(o.key_id)
            for o in (*self.mounts.values(), *self.hydrations.values())
            if o.key_id
        }

    def _drop_key(self, key_id: str | None) -> None:
        if key_id and self._key_region(key_id) not in self.key_regions():
            self.d.engine.regions.drop(self._key_region(key_id))

    # -- mounts ---------------------------------------------------------------

    def mount_path(self, key: str) -> str:
        return os.path.join(self.d.mount, BackupTarget.PREFIX + key)

    def mount(self, args: dict[str, Any]) -> dict[str, Any]:
        """(In a worker thread.) Serve a backup read-only."""
        repo, key_id = self.open_repo(args["repo"], args.get("key"), args.get("key_file"))
        src = BackupSource(repo, args["backup"], args["device"])
        key = f"{src.backup_id}/{src.device}"
        try:
            if key in self.mounts:
                raise Exists(f"backup {key} is already mounted at {self.mount_path(key)}")
            sources.register(MOUNT_PREFIX + key, src)
        except BaseException:
            src.close()
            raise
        self.mounts[key] = Opened.of(src, key_id, args.get("key_file"))
        self.d.fs.add_backup(key)
        log.info("mounted %s at %s", src.description, self.mount_path(key))
        return {"key": key, "size": src.size, "source": src.description}

    def forget_mount(self, key: str) -> None:
        """(Taken out of the tree already.) Close the source."""
        o = self.mounts.pop(key, None)
        src = sources.unregister(MOUNT_PREFIX + key)
        if src is not None:
            src.close()
        if o is not None:
            self._drop_key(o.key_id)

    def mount_key(self, backup: str, device: str) -> str:
        key = f"{backup}/{device}"
        if key not in self.mounts:
            raise NotFound(f"backup {backup} device {device} is not mounted")
        return key

    # -- instant restore ------------------------------------------------------------

    def map_path(self, name: str) -> str:
        return os.path.join(self.d.state_dir, MAPS, f"{name}.map")

    def prepare_target(
        self, target: str, src: BackupSource, name: str, force: bool
    ) -> tuple[str, bool]:
        """(Blocking.) The target's real path, made (a sparse file of the
        source's size) if missing; and whether this carries on an earlier
        hydration of the same backup onto the same target (its map is
        there). Refused: in use (EBUSY), holding data without ``force`` and
        not carried on (EEXIST), the unfinished hydration of device ``name``
        from another backup or onto another target without ``force``
        (EEXIST: ``force`` gives it up)."""
        real = os.path.realpath(target)
        size = src.size
        try:
            st = os.stat(real)
        except FileNotFoundError:
            st = None
        if st is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            served = max(st.st_size, size) if stat.S_ISREG(st.st_mode) else _blockdev_size(real)
            state = map_state(self.map_path(name), src, storage_identity(st), served)
        else:  # (a map is of another target, then)
            state = "other" if os.path.exists(self.map_path(name)) else "none"
        if state == "other" and not force:
            raise Exists(
                f"device {name} has an unfinished instant restore of another backup or "
                f"onto another target ({self.map_path(name)}): given again with that "
                "backup and target it carries on; --force gives it up and starts this one"
            )
        resume = state == "same"
        # (what it holds is overwritten only with --force, or when carried on)
        st = check_target(target, real, force or resume)
        if st is None:
            if not os.path.isdir(os.path.dirname(real)):
                raise NotFound(f"{os.path.dirname(real)}: no such directory")
            fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            return real, False
        if stat.S_ISREG(st.st_mode) and st.st_size < size:
            os.truncate(real, size)
        return real, resume

    def start_hydration(self, args: dict[str, Any]) -> dict[str, Any]:
        """(In a worker thread.) Serve the target as device ``N`` at once,
        hydrating from the backup."""
        d, engine = self.d, self.d.engine
        name = args["device"]
        if name in {dev.name for dev in engine.devices()}:
            raise Exists(f"a device named {name!r} is already served")
        repo, key_id = self.open_repo(args["repo"], args.get("key"), args.get("key_file"))
        src = BackupSource(repo, args["backup"], name, HYDRATION_CACHE)
        registered = False
        added = False
        try:
            real, resume = self.prepare_target(args["target"], src, name, bool(args.get("force")))
            if not resume:
                # (the maps of an earlier hydration of another backup or target)
                try:
                    os.unlink(self.map_path(name))
                except FileNotFoundError:
                    pass
                engine.regions.drop(f"filter/{name}/hydrate")
            sources.register(HYDRATE_PREFIX + name, src)
            registered = True
            engine.add_device(real, name)
            added = True
            dev = engine.device(name)
            if not resume and dev.checkpoint_path:
                cbt_checkpoint.remove(dev.checkpoint_path)  # (another device's CBT)
            opts = {"source": HYDRATE_PREFIX + name, "map": self.map_path(name)}
            if args.get("rate"):
                opts["rate"] = str(args["rate"])
            if args.get("paused"):
                opts["paused"] = "1"
            engine.attach(name, "blksnap", {})
            engine.attach(name, "hydrate", opts)
        except BaseException:
            if added:
                try:
                    engine.remove_device(name)
                except BlksnapError as exc:
                    log.error("device %s not removed after a failed start: %s", name, exc)
            if registered:
                sources.unregister(HYDRATE_PREFIX + name)
            src.close()
            raise
        d.filter_opts[(name, "blksnap")] = {}
        d.filter_opts[(name, "hydrate")] = {k: v for k, v in opts.items() if k != "paused"}
        self.hydrations[name] = Opened.of(src, key_id, args.get("key_file"))
        self.unrestored.pop(name, None)
        info = engine.cbt_info(name)
        link: dict[str, Any] | None = None
        try:
            link = repo.generation_link(info.generation_id, name)
            if link is None and not resume:
                link = repo.link_generation(
                    info.generation_id, src.backup_id, name, info.changes_number
                )
            elif link is None:
                # (carried on, and the CBT did not: the writes made before
                # are not in this generation's map, so it must not be linked)
                log.warning("device %s: CBT generation %s is new; the next backup is full",
                            name, info.generation_id)  # fmt: skip
        except BlksnapError as exc:
            log.warning("device %s: generation not linked to backup %s (the next backup "
                        "will be full): %s", name, src.backup_id, exc)  # fmt: skip
        log.info("device %s: instant restore of %s onto %s%s", name, src.description, real,
                 " (carried on)" if resume else "")  # fmt: skip
        return {
            "target": real,
            "resumed": resume,
            "generation_id": info.generation_id,
            "linked": link is not None and link.get("backup") == src.backup_id,
        }

    def hydration_done(self, name: str) -> None:
        """The hydrate filter of ``name`` took itself off (the gate drained)."""
        o = self.hydrations.pop(name, None)
        src = sources.unregister(HYDRATE_PREFIX + name)
        if src is not None:
            src.close()
        if o is not None:
            self._drop_key(o.key_id)

    def device_removed(self, name: str) -> None:
        """Device ``name`` was removed while it hydrated: its source closes
        (the map stays: a restore --instant of the same backup onto the same
        target carries on)."""
        if name in self.hydrations:
            self.hydration_done(name)

    # -- the record -----------------------------------------------------------

    def record(self) -> dict[str, Any]:
        return {
            "mounts": {
                k: {**o.doc(), "loop": self.d.loops.get(self.mount_path(k))}
                for k, o in self.mounts.items()
            },
            "sources": {
                **{n: od for n, od in self.unrestored.items() if n not in self.hydrations},
                **{n: o.doc() for n, o in self.hydrations.items()},
            },
        }

    def rebuild(self, doc: dict[str, Any]) -> None:
        """Taking over: the sources of the hydrations again (before their
        devices' filters are attached), each opened in the background
        (:class:`Deferred`); one recorded without its shape (size, unit,
        identity), at once."""
        for name, od in (doc.get("sources") or {}).items():
            try:
                o = Opened.from_doc(od)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("taking over: hydration source of %s unreadable in the record: %s",
                          name, exc)  # fmt: skip
                continue
            src: Source
            try:
                src = self._reopening(o, HYDRATION_CACHE)
            except BlksnapError as exc:  # (no shape recorded: opened at once, and failed)
                log.error("taking over: hydration source of %s not opened again: %s", name, exc)
                continue
            sources.register(HYDRATE_PREFIX + name, src)
            self.hydrations[name] = o

    def _reopening(self, o: Opened, cache: int | None = None) -> Source:
        """A recorded source, opened in the background if its shape is
        recorded (:class:`Deferred`), else at once."""
        if {"size", "unit", "identity"} <= set(o.shape):
            return Deferred(o, lambda o: self.reopen(o, cache))
        return self.reopen(o, cache)

    def rebuild_mounts(self, doc: dict[str, Any]) -> None:
        """Taking over: serve the mounted backups again, their sources
        opened in the background as the hydrations' (:meth:`rebuild`)."""
        for key, od in (doc.get("mounts") or {}).items():
            try:
                o = Opened.from_doc(od)
                sources.register(MOUNT_PREFIX + key, self._reopening(o))
                self.mounts[key] = o
                self.d.fs.add_backup(key)
                lp, path = od.get("loop"), self.mount_path(key)
                if lp and hostinfo.backing_file(os.path.basename(lp)) == path:
                    self.d.loops[path] = lp  # (still blksnapd's own)
            except (BlksnapError, KeyError, TypeError, ValueError) as exc:
                log.error("taking over: mounted backup %s not served again: %s", key, exc)
                lp = od.get("loop") if isinstance(od, dict) else None
                if lp:  # (detached once serving, as a lost image's)
                    self.d.lost_image_loops[self.mount_path(key)] = lp

    def boot_source(self, name: str) -> bool:
        """At a boot (``--restore-devices``): open the hydration source of
        device ``name`` again if nothing but a key file is needed."""
        od = self.unrestored.get(name)
        if not isinstance(od, dict):
            log.error(
                "device %s: hydrating, but its source is not recorded: not served; run "
                "blksnap restore --instant again with the same arguments",
                name,
            )
            return False
        try:
            o = Opened.from_doc(od)
            src = self.reopen(o, HYDRATION_CACHE)
        except (BlksnapError, KeyError, TypeError, ValueError) as exc:
            log.error(
                "device %s: its instant restore cannot carry on by itself (%s): run "
                "blksnap restore --instant again with the same arguments",
                name,
                exc,
            )
            return False
        sources.register(HYDRATE_PREFIX + name, src)
        self.hydrations[name] = o
        del self.unrestored[name]
        return True

    def hydration_status(self, name: str) -> dict[str, Any] | None:
        dev = self.d.engine.device(name)
        flt = dev.filters.find("hydrate")
        st = flt.status() if flt is not None else dev.retired.get("hydrate")
        if st is None:
            return None
        return {k: st.get(k) for k in ("state", "done", "total", "rate", "source", "error")}
