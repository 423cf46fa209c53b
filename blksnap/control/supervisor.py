"""blksnapd's supervisor: holds what must outlive a worker, restarts workers.

``blksnapd`` starts as this small process. It mounts the FUSE files (an fd
of ``/dev/fuse`` and one clone per reader thread), binds the control socket,
and starts the worker (``blksnapd`` again, with :data:`WORKER_ENV` naming
the fds it inherits), which does everything else: the engine, the devices,
serving. A FUSE connection lives as long as any process holds one of its
fds, so when the worker dies -- killed, crashed, or asked to by
``blksnap daemon restart`` (exit status :data:`RESTART_STATUS`) -- the
connection stays, the kernel holds the file systems' requests, and the
supervisor starts a new worker at once. The new worker rebuilds from the
records in the state dir, sends ``FUSE_NOTIFY_RESEND`` (the requests the
dead one read and never answered come again) and serves on.

The supervisor also binds the NBD address (``--nbd``) and holds those
sockets: an NBD client that connects while a worker restarts waits in the
backlog. The supervisor imports no engine and does no I/O on devices. Its workers get
``PR_SET_PDEATHSIG``: if the supervisor itself is killed, its worker goes
with it. Under systemd with an fd store the connection lives on there and
the restarted unit carries it on (see "systemd's fd store" below); without
one the connection ends (the file systems see I/O errors, as a crash of a
single-process blksnapd did) and the next start clears up.

A worker that ends with status 0 stopped cleanly (it unmounted): the
supervisor exits 0. A first worker that never became ready is a failed
start: the supervisor unmounts and exits with its status.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from blksnap.control import host
from blksnap.control.server import bind_control
from blksnap.frontends.fuse_session import clone_fd, mount_fuse, umount
from blksnap.frontends.listen import Address, bind
from blksnap.hostinfo import proc_stat

log = logging.getLogger("blksnapd")

#: The environment variable that makes ``blksnapd`` a worker: JSON of
#: :class:`Inherited`.
WORKER_ENV = "BLKSNAPD_WORKER"
#: A worker's exit status asking for a new worker at once (daemon restart).
RESTART_STATUS = 75
#: Restarts closer than this many seconds apart count as a crash loop...
CRASH_WINDOW = 10.0
#: ... and after this many in the window, the next start waits a second.
CRASH_BURST = 5

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: File descriptors in one message (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 250


@dataclass
class Inherited:
    """What a worker gets from its supervisor (``BLKSNAPD_WORKER``)."""

    supervisor: int  # its pid
    fuse: list[int]  # the connection's fd, then its clones
    control: int  # the listening control socket
    status: int  # the worker's end of a SOCK_SEQPACKET pair to the supervisor
    initialized: bool  # INIT was answered by an earlier worker
    restarts: int = 0
    causes: list[str] = field(default_factory=list)  # of the restarts, latest last
    #: Memory regions the supervisor holds for workers: key -> fd.
    stored: dict[str, int] = field(default_factory=dict)
    #: The NBD server's listening sockets (--nbd).
    nbd: list[int] = field(default_factory=list)
    #: A standby worker's end of its own socket pair: it waits there to be
    #: made the worker (:meth:`activated`).
    standby: int | None = None
    #: Workers before this one still dying (a thread in the kernel).
    dying: list[int] = field(default_factory=list)

    def dumps(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if not k.startswith("_")})

    @classmethod
    def from_env(cls) -> Inherited | None:
        raw = os.environ.get(WORKER_ENV)
        return cls(**json.loads(raw)) if raw else None

    def activated(self) -> Inherited:
        """A standby worker (started and imported ahead): wait until the
        supervisor makes it the worker, with what changed since it started
        (restarts, regions: their fds come with the message). Exits if the
        supervisor lets it go instead."""
        assert self.standby is not None
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
        sock = socket.socket(fileno=self.standby)
        try:
            try:
                sock.send(b"waiting")  # imports done: ready to take over at once
            except OSError:
                pass  # called (or let go) already: the message waits below
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, MAX_FDS)
            except OSError:
                msg, fds = b"", []  # let go
        finally:
            sock.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if not msg:
            sys.exit(0)  # the supervisor let this standby go
        doc = json.loads(msg)
        keys = doc.pop("stored")
        return Inherited(**{**doc, "stored": dict(zip(keys, fds, strict=True)), "standby": None})

    def _channel(self) -> socket.socket:
        chan = self.__dict__.get("_chan")
        if chan is None:
            chan = socket.socket(fileno=self.status)
            self.__dict__["_chan"] = chan
        return chan

    def close_status(self) -> None:
        """Close the status channel to the supervisor: its socket if one was
        made over the fd (which owns the fd then), else the fd."""
        chan = self.__dict__.pop("_chan", None)
        if chan is not None:
            chan.close()
        else:
            os.close(self.status)

    def tell(self, what: str, fd: int | None = None) -> None:
        """A message to the supervisor (``init``, ``ready``, ``store KEY``
        with the fd of a region to hold, ``drop KEY``). Sent before this
        returns: should the worker die right after, the supervisor still
        reads it (and holds the fd)."""
        try:
            if fd is None:
                self._channel().send(what.encode())
            else:
                socket.send_fds(self._channel(), [what.encode()], [fd])
        except OSError as exc:
            log.warning("telling the supervisor %r: %s", what, exc)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def describe_status(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == RESTART_STATUS:
        return "daemon restart"
    return f"exited with status {rc}"


def exited_status(pid: int) -> int | None:
    """The exit status (as ``Popen.returncode`` gives it) of process
    ``pid`` whose main thread has exited while another of its threads has
    not: it is dying, but cannot be reaped yet. None while its main thread
    runs (or if it is gone: ask ``poll``).

    A worker killed while one of its threads waits in the kernel for I/O
    that only FUSE can complete (the flush of a loop device over one of its
    own files, a freeze's sync) stays so until the *next* worker serves that
    request: waiting for it to be reaped before starting the next would
    wait forever."""
    fields = proc_stat(pid)
    if fields is None or fields[0] not in ("Z", "X"):
        return None
    status = int(fields[49])  # exit_code (stat field 52), as waitpid reports it
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Supervisor:
    def __init__(
        self, argv: list[str], mount: str, socket_path: str, threads: int,
        nbd: Address | None = None,
    ) -> None:  # fmt: skip
        self.argv = argv
        self.nbd_address = nbd
        self.nbd: list[socket.socket] = []
        self.mount = os.path.abspath(mount)
        self.socket_path = os.path.abspath(socket_path)
        self.threads = max(1, threads)
        self.fuse: list[int] = []
        self.control: socket.socket | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        #: A worker started ahead that waits to take over (its imports done),
        #: and the supervisor's end of its socket pair.
        self.spare: tuple[subprocess.Popen[bytes], socket.socket] | None = None
        self.worker_ready = False
        #: The socket pair end of a worker that was a standby, kept open while
        #: it lives (closed with its "waiting" unread, the worker would get
        #: ECONNRESET before it read its call).
        self.worker_sock: socket.socket | None = None
        #: The worker asked to be replaced (daemon restart).
        self.restart_asked = False
        self.initialized = False
        self.ready = False
        self.restarts = 0
        self.causes: list[str] = []
        self._recent: list[float] = []
        self._chan, self._chan_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        #: Regions held for workers: key -> fd (see :mod:`blksnap.control.regions`).
        self.stored: dict[str, int] = {}
        #: Workers whose main thread exited while a thread of theirs still
        #: waits in the kernel (see :func:`exited_status`): reaped when done.
        self.dying: list[subprocess.Popen[bytes]] = []

    # -- what outlives a worker ---------------------------------------------------

    def open(self) -> None:
        passed = host.listen_fds()
        if passed:
            self._take_passed(passed)
        if self.nbd_address is not None and not self.nbd:  # first: a bad address leaves nothing
            self.nbd = bind(self.nbd_address)
        if not self.fuse:
            host.clear_stale_mount(self.mount)
            os.makedirs(self.mount, mode=0o755, exist_ok=True)
        try:
            if self.control is None:
                self.control = bind_control(self.socket_path)
        except BaseException:
            self.close(unmount=False)
            raise
        if self.fuse:
            log.warning("supervisor %d: carrying on the FUSE connection at %s (%d fds) and %d "
                        "CBT regions kept by systemd across a restart of the unit",
                        os.getpid(), self.mount, len(self.fuse), len(self.stored))  # fmt: skip
        else:
            try:
                fd = mount_fuse(self.mount)
                self.fuse.append(fd)
                for _ in range(self.threads - 1):
                    self.fuse.append(clone_fd(fd))
            except BaseException:
                self.close(unmount=True)
                raise
            log.info("supervisor %d: FUSE mounted at %s (%d fds)", os.getpid(), self.mount,
                     len(self.fuse))  # fmt: skip
        self._store_all()

    # -- systemd's fd store: what outlives the supervisor too -------------------------
    #
    # Under systemd with FileDescriptorStoreMax= the supervisor puts a copy of
    # each fd it holds for workers into the unit's fd store: the FUSE
    # connection (fuse-N), the control socket (control), the NBD sockets
    # (nbd-N) and the CBT regions (region/KEY). Should the supervisor die
    # (its worker goes with it), systemd still holds the connection, so the
    # kernel keeps the file systems' requests waiting instead of failing
    # them; the unit's restart gets the fds back (LISTEN_FDS) and carries on
    # like a worker restart: same node ids, requests resent, CBT unchanged.

    def _take_passed(self, passed: dict[str, list[int]]) -> None:
        """Take what systemd passed: the FUSE connection only if its mount is
        still there (else it is dead, and so is every CBT region with it:
        writes may have reached the backing files untracked), the sockets if
        they still serve what we are told to serve; close the rest."""
        fuse: dict[int, int] = {}
        regions: dict[str, int] = {}
        nbd: list[int] = []
        control: int | None = None
        rest: list[int] = []
        for name, fds in passed.items():
            if name.startswith("fuse-") and name[5:].isdigit() and len(fds) == 1:
                fuse[int(name[5:])] = fds[0]
            elif name.startswith("region/") and len(fds) == 1:
                regions[name[7:]] = fds[0]
            elif name.startswith("nbd-"):
                nbd += fds
            elif name == "control" and len(fds) == 1:
                control = fds[0]
            else:
                rest += fds
        alive = sorted(fuse) == list(range(len(fuse))) and bool(fuse)
        if alive and host.is_mounted(self.mount):
            self.fuse = [fuse[i] for i in sorted(fuse)]
            self.stored = regions
            self.initialized = True  # a worker served it: the next one resends
        else:
            if fuse:
                log.warning("FUSE fds from systemd's fd store, but %s is no live mount of "
                            "ours: starting afresh", self.mount)  # fmt: skip
            rest += [*fuse.values(), *regions.values()]
            # systemd's copies too: a connection nobody serves would hang
            # whoever looks at the old mount point, this start included.
            for name in (*(f"fuse-{i}" for i in fuse), *(f"region/{k}" for k in regions)):
                host.fd_store_drop(name)
        if control is not None:
            if os.path.exists(self.socket_path):
                self.control = socket.socket(fileno=control)
            else:
                rest.append(control)
        if nbd and self.nbd_address is not None:
            self.nbd = [socket.socket(fileno=fd) for fd in nbd]
        else:
            rest += nbd
        for fd in rest:
            os.close(fd)
        for name in ("control", *(f"nbd-{i}" for i in range(len(nbd)))):
            host.fd_store_drop(name)  # stored again below, as they are now

    def _store_all(self) -> None:
        if not host.fd_store_size():
            return
        for i, fd in enumerate(self.fuse):
            host.fd_store_put(f"fuse-{i}", fd)
        if self.control is not None:
            host.fd_store_put("control", self.control.fileno())
        for i, sock in enumerate(self.nbd):
            host.fd_store_put(f"nbd-{i}", sock.fileno())
        for key, fd in self.stored.items():
            host.fd_store_put(f"region/{key}", fd)

    def _unstore_all(self) -> None:
        """The connection is over (clean stop, failed start): nothing for
        the next start to carry on."""
        if not host.fd_store_size():
            return
        names = [f"fuse-{i}" for i in range(len(self.fuse))]
        names += ["control", *(f"nbd-{i}" for i in range(len(self.nbd)))]
        names += [f"region/{key}" for key in self.stored]
        for name in names:
            host.fd_store_drop(name)

    def close(self, unmount: bool) -> None:
        self._unstore_all()
        if unmount and host.is_mounted(self.mount):
            try:
                umount(self.mount, lazy=True)
            except OSError as exc:
                log.error("unmount %s: %s", self.mount, exc)
        for fd in (*self.fuse, *self.stored.values()):
            os.close(fd)
        self.fuse.clear()
        self.stored.clear()
        if self.control is not None:
            self.control.close()
            self.control = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        for sock in self.nbd:
            sock.close()
        self.nbd.clear()
        if self.nbd_address is not None and self.nbd_address.kind == "unix":
            try:
                os.unlink(self.nbd_address.path)
            except FileNotFoundError:
                pass

    # -- workers ------------------------------------------------------------------

    def _inherited(self) -> Inherited:
        assert self.control is not None
        return Inherited(
            supervisor=os.getpid(),
            fuse=self.fuse,
            control=self.control.fileno(),
            status=self._chan_worker.fileno(),
            initialized=self.initialized,
            restarts=self.restarts,
            causes=self.causes[-5:],
            stored=dict(self.stored),
            nbd=[sock.fileno() for sock in self.nbd],
            dying=[w.pid for w in self.dying if w.poll() is None],
        )

    def _popen(self, inherited: Inherited, extra_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        fds = (*inherited.fuse, inherited.control, inherited.status, *inherited.nbd, *extra_fds)
        return subprocess.Popen(
            [sys.executable, "-m", "blksnap.control.daemon", *self.argv],
            env={**os.environ, WORKER_ENV: inherited.dumps()},
            pass_fds=fds,
            preexec_fn=_die_with_parent,  # the supervisor has no threads
        )

    def spawn(self) -> subprocess.Popen[bytes]:
        """A new worker from the code on disk."""
        inherited = self._inherited()
        return self._popen(inherited, tuple(inherited.stored.values()))

    def spawn_spare(self) -> None:
        """A standby worker: it starts, imports everything and waits."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inherited = self._inherited()
        inherited.stored = {}
        inherited.standby = theirs.fileno()
        try:
            proc = self._popen(inherited, (theirs.fileno(),))
        finally:
            theirs.close()
        self.spare = (proc, mine)
        log.info("supervisor %d: standby worker %d", os.getpid(), proc.pid)

    def drop_spare(self) -> None:
        if self.spare is not None:
            proc, sock = self.spare
            self.spare = None
            sock.close()  # it exits when it reads the end
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def spare_waiting(self, timeout: float) -> bool:
        """Has the standby worker imported everything and said so?"""
        if self.spare is None:
            return False
        proc, sock = self.spare
        if not select.select([sock], [], [], timeout)[0]:
            return False
        return sock.recv(64) == b"waiting" and proc.poll() is None

    def prepare_restart(self) -> None:
        """daemon restart: a standby from the code on disk, then the worker
        is told to go (SIGUSR1); the standby takes over when it has."""
        self.restart_asked = False
        self.drop_spare()
        self.spawn_spare()
        if not self.spare_waiting(30.0):
            log.error("the new worker did not get ready in 30 s; restarting without it")
            self.drop_spare()
        assert self.worker is not None
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGUSR1)

    def activate_spare(self) -> subprocess.Popen[bytes] | None:
        """The standby worker made the worker; None if there is none alive."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        proc, sock = spare
        if proc.poll() is not None or len(self.stored) > MAX_FDS:
            sock.close()
            proc.wait()
            return None
        doc = self._inherited().__dict__.copy()
        doc["stored"] = list(self.stored)
        doc.pop("standby", None)
        try:
            socket.send_fds(sock, [json.dumps(doc).encode()], list(self.stored.values()))
        except OSError as exc:
            log.warning("standby worker %d: %s; starting a new worker", proc.pid, exc)
            sock.close()
            proc.kill()
            proc.wait()
            return None
        self.worker_sock = sock
        return proc

    def _read_status(self, timeout: float) -> None:
        """Every message waiting (the first one waited for up to ``timeout``)."""
        while select.select([self._chan], [], [], timeout)[0]:
            timeout = 0
            msg, fds, _flags, _addr = socket.recv_fds(self._chan, 4096, 4)
            what, _, key = msg.decode(errors="replace").partition(" ")
            if what == "init":
                self.initialized = True
            elif what == "ready":
                if not self.ready:
                    host.sd_notify(f"READY=1\nMAINPID={os.getpid()}")
                self.ready = True
                self.worker_ready = True
            elif what == "store" and key and len(fds) == 1:
                old = self.stored.pop(key, None)
                if old is not None:
                    os.close(old)
                self.stored[key] = fds.pop()
                host.fd_store_put(f"region/{key}", self.stored[key])
            elif what == "restart":
                self.restart_asked = True
            elif what == "drop" and key:
                old = self.stored.pop(key, None)
                if old is not None:
                    os.close(old)
                host.fd_store_drop(f"region/{key}")
            for fd in fds:  # anything unasked for
                os.close(fd)

    def forward(self, signum: int, frame: object) -> None:
        w = self.worker
        if w is not None and w.poll() is None:
            w.send_signal(signum)

    def run(self) -> int:
        """Start workers until one stops cleanly; its exit status."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self.forward)
        self.worker = self.spawn()
        while True:
            self.worker_ready = False
            rc: int | None = None
            while rc is None:
                rc = self.worker.poll()
                if rc is None:
                    rc = exited_status(self.worker.pid)
                    if rc is not None:
                        try:  # (its other threads end a moment after it, as a rule)
                            rc = self.worker.wait(None if rc == 0 else 0.05)
                        except subprocess.TimeoutExpired:
                            log.warning("worker %d is dying (%s) with a thread still in the "
                                        "kernel: the next one takes over now",
                                        self.worker.pid, describe_status(rc))  # fmt: skip
                            self.dying.append(self.worker)
                        break
                self.dying = [w for w in self.dying if w.poll() is None]
                self._read_status(0.02)
                if self.restart_asked:
                    self.prepare_restart()
                elif self.worker_ready and (self.spare is None or self.spare[0].poll() is not None):
                    self.drop_spare()
                    self.spawn_spare()
            self._read_status(0)
            if self.worker_sock is not None:
                self.worker_sock.close()
                self.worker_sock = None
            if rc == 0:
                self.drop_spare()
                self.close(unmount=False)  # the worker unmounted when it stopped
                log.info("supervisor %d: worker stopped cleanly", os.getpid())
                return 0
            cause = describe_status(rc)
            if not self.ready:
                log.error("worker %d %s before it was ready: not restarting", self.worker.pid,
                          cause)  # fmt: skip
                self.drop_spare()
                self.close(unmount=True)
                return rc if rc > 0 else 1
            now = time.monotonic()
            self._recent = [t for t in self._recent if now - t < CRASH_WINDOW] + [now]
            self.restarts += 1
            self.causes.append(cause)
            host.sd_notify(f"STATUS=worker restart {self.restarts}: {cause}")
            if len(self._recent) > CRASH_BURST and rc != RESTART_STATUS:
                time.sleep(1.0)
            # The standby takes over at once (for a restart asked for, it was
            # started from the code on disk after the asking).
            old = self.worker.pid
            nxt = self.activate_spare()
            self.worker = nxt or self.spawn()
            log.warning("worker %d %s: worker %d takes over (%s, restart %d)", old, cause,
                        self.worker.pid, "standby" if nxt else "started now",
                        self.restarts)  # fmt: skip


def main(
    argv: list[str], mount: str, socket_path: str, threads: int, nbd: Address | None = None
) -> int:
    sup = Supervisor(argv, mount, socket_path, threads, nbd)
    sup.open()
    try:
        return sup.run()
    except BaseException:
        w = sup.worker
        if w is not None and w.poll() is None:
            w.kill()
            w.wait()
        sup.drop_spare()
        sup.close(unmount=True)
        raise
