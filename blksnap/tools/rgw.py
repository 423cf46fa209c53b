"""A throwaway single-node Ceph cluster with a RADOS Gateway: a real
S3-compatible endpoint on 127.0.0.1 for the tests and benchmarks of the
S3 repository backend.

One monitor, one OSD on ``memstore`` (data in memory, pool size 1) and
``radosgw`` with the ``beast`` front-end, all in one temporary directory,
started as plain processes (no systemd, no ``ceph-mgr``: S3 I/O does not
need it), stopped by their pids. From nothing to a working endpoint takes
about 12 s here (most of it the gateway making its pools), about 200 MB of
memory. Debian 12's packages: ``ceph-mon ceph-osd radosgw ceph-common``
(``make setup`` installs them with ``--no-install-recommends``).

``Gateway.start(root)`` returns the running gateway (its ``endpoint``,
``access_key``, ``secret_key``); ``stop()`` ends every process it started
and removes nothing else. ``stop_gateway()`` and ``start_gateway()`` end and
restart only ``radosgw`` (same port, same data: the monitor and the OSD keep
running; the OSD's memstore would lose everything if it stopped), an outage
of the S3 endpoint for the tests of retries. ``why_not()`` says why it
cannot run here (None when it can).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from blksnap.tools import sandbox

#: The binaries it needs.
TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph-authtool", "monmaptool", "ceph")
#: Fixed S3 credentials of the gateway's one user (a throwaway cluster).
ACCESS_KEY = "BLKSNAPTESTACCESS01"
SECRET_KEY = "blksnap-test-secret-key-0000000000000001"
#: Memory the OSD's memstore may use.
MEMSTORE_BYTES = 2 << 30


def why_not() -> str | None:
    """Why a gateway cannot run here, or None."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (
            f"Ceph is not installed ({', '.join(missing)} missing): make setup installs "
            "ceph-mon ceph-osd radosgw ceph-common"
        )
    if os.geteuid() != 0:
        return "the throwaway Ceph cluster runs as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, timeout: float = 60) -> str:
    """:func:`sandbox.run` with a time limit; its output."""
    return sandbox.run(*args, timeout=timeout).stdout


@dataclass
class Gateway:
    root: Path
    endpoint: str
    conf: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- life -----------------------------------------------------------------

    @classmethod
    def start(cls, root: str | Path, timeout: float = 120) -> Gateway:
        """A monitor, an OSD and a gateway under ``root`` (made), ready for S3."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        mon_v2, mon_v1, rgw_port = _free_port(), _free_port(), _free_port()
        fsid = str(uuid.uuid4())
        conf = root / "ceph.conf"
        conf.write_text(
            "\n".join(
                [
                    "[global]",
                    f"fsid = {fsid}",
                    f"mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]",
                    "public network = 127.0.0.0/8",
                    "auth cluster required = cephx",
                    "auth service required = cephx",
                    "auth client required = cephx",
                    f"keyring = {root}/$name.keyring",
                    f"pid file = {root}/$name.pid",
                    f"log file = {root}/$name.log",
                    f"admin socket = {root}/$name.asok",
                    f"run dir = {root}",
                    "osd pool default size = 1",
                    "osd pool default min size = 1",
                    "osd pool default pg num = 8",
                    "osd pool default pgp num = 8",
                    "mon allow pool size one = true",
                    "mon allow pool delete = true",
                    "mon warn on pool no redundancy = false",
                    "osd crush chooseleaf type = 0",
                    "osd crush initial weight = 1",
                    "osd objectstore = memstore",
                    f"memstore device bytes = {MEMSTORE_BYTES}",
                    "mon max pg per osd = 1000",
                    "[mon.a]",
                    f"mon data = {root}/mon-a",
                    "[osd.0]",
                    f"osd data = {root}/osd-0",
                    "[client.rgw.gw]",
                    f"rgw frontends = beast endpoint=127.0.0.1:{rgw_port}",
                    f"rgw data = {root}/rgw",
                    "rgw dns name = localhost",
                    "",
                ]
            )
        )
        gw = cls(root, f"http://127.0.0.1:{rgw_port}", conf)
        try:
            gw._bootstrap(fsid, mon_v2, mon_v1, timeout)
        except BaseException:
            gw.stop()
            raise
        return gw

    def _ceph(self, *args: str, timeout: float = 60) -> str:
        return _run(
            "ceph", "-c", str(self.conf), "-n", "client.admin", *args, timeout=timeout
        )  # fmt: skip

    def _bootstrap(self, fsid: str, mon_v2: int, mon_v1: int, timeout: float) -> None:
        root, conf = self.root, str(self.conf)
        deadline = time.monotonic() + timeout
        mon_key, admin_key = root / "mon.keyring", root / "client.admin.keyring"
        _run("ceph-authtool", "--create-keyring", str(mon_key), "--gen-key", "-n", "mon.",
             "--cap", "mon", "allow *")  # fmt: skip
        _run("ceph-authtool", "--create-keyring", str(admin_key), "--gen-key", "-n",
             "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
             "--cap", "mds", "allow *", "--cap", "mgr", "allow *")  # fmt: skip
        _run("ceph-authtool", str(mon_key), "--import-keyring", str(admin_key))
        monmap = root / "monmap"
        _run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
             f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]", str(monmap))  # fmt: skip
        (root / "mon-a").mkdir(exist_ok=True)
        _run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", str(monmap),
             "--keyring", str(mon_key))  # fmt: skip
        self._spawn("mon", "ceph-mon", "-f", "-c", conf, "-i", "a")
        self._wait(lambda: self._ceph("mon", "stat", timeout=10), deadline, "the monitor")
        # The OSD: an id, its key, its store made, then started.
        osd_uuid = str(uuid.uuid4())
        (root / "osd-0").mkdir(exist_ok=True)
        osd_key = root / "osd.0.keyring"
        _run("ceph-authtool", "--create-keyring", str(osd_key), "--gen-key", "-n", "osd.0")
        (root / "osd-0" / "keyring").write_text(osd_key.read_text())
        self._ceph("auth", "add", "osd.0", "mon", "allow profile osd", "osd", "allow *",
                   "mgr", "allow profile osd", "-i", str(osd_key))  # fmt: skip
        osd_id = self._ceph("osd", "new", osd_uuid, "0").strip()
        if osd_id != "0":
            raise RuntimeError(f"osd new gave id {osd_id!r}, not 0")
        _run("ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
             "--keyring", str(osd_key))  # fmt: skip
        self._spawn("osd", "ceph-osd", "-f", "-c", conf, "-i", "0")
        self._wait(self._osd_up, deadline, "the OSD")
        # The gateway: its key, then started; its user made once it answers.
        rgw_key = root / "client.rgw.gw.keyring"
        _run("ceph-authtool", "--create-keyring", str(rgw_key), "--gen-key", "-n",
             "client.rgw.gw")  # fmt: skip
        self._ceph("auth", "add", "client.rgw.gw", "mon", "allow rw", "osd", "allow rwx",
                   "-i", str(rgw_key))  # fmt: skip
        self._spawn_gateway()
        self._wait(
            lambda: _run(
                "radosgw-admin", "-c", conf, "-n", "client.admin", "user", "create",
                "--uid", "blksnap", "--display-name", "blksnap tests",
                "--access-key", self.access_key, "--secret", self.secret_key, timeout=60,
            ),
            deadline,
            "the gateway's user",
        )  # fmt: skip
        self._wait(self._answers, deadline, "the S3 endpoint")

    def _spawn_gateway(self) -> None:
        self._spawn("rgw", "radosgw", "-f", "-c", str(self.conf), "-n", "client.rgw.gw")

    def _spawn(self, name: str, *args: str) -> None:
        # Appended to: a gateway started again keeps the log of the first.
        log = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 - the process keeps it
        try:
            self.procs[name] = subprocess.Popen(
                list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()

    def _osd_up(self) -> None:
        if "1 up" not in self._ceph("osd", "stat", timeout=10):
            raise RuntimeError("osd.0 not up yet")

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def _answers(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), 2):
            pass

    def _serves(self) -> None:
        """An HTTP answer, whatever it says (the gateway reads requests)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
        except (http.client.HTTPException, OSError) as exc:
            raise RuntimeError(f"no HTTP answer: {exc}") from exc
        finally:
            conn.close()

    def _wait(self, probe: Callable[[], object], deadline: float, what: str) -> None:
        last: BaseException | None = None
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(
                        f"ceph {name} exited ({p.returncode}): {self.log_tail(name)}"
                    )
            try:
                probe()
                return
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"{what} not ready in time: {last}")

    def log_tail(self, name: str, n: int = 2000) -> str:
        try:
            return (self.root / f"{name}.out").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """End the processes this gateway started (by pid): gateway, OSD,
        monitor; SIGKILL after a grace."""
        for name in ("rgw", "osd", "mon"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
        for name in ("rgw", "osd", "mon"):
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=15)

    # -- an outage ------------------------------------------------------------

    def stop_gateway(self, timeout: float = 15) -> None:
        """End ``radosgw`` alone (by its pid; SIGKILL after ``timeout``): the
        endpoint refuses connections until :meth:`start_gateway`."""
        p = self.procs.get("rgw")
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=timeout)

    def start_gateway(self, timeout: float = 60) -> None:
        """Start ``radosgw`` again on the same port (its pools and users are
        in the cluster, which kept running); back when it answers HTTP."""
        p = self.procs.get("rgw")
        if p is not None and p.poll() is None:
            return
        self._spawn_gateway()
        self._wait(self._serves, time.monotonic() + timeout, "the S3 endpoint")

    # -- for clients ----------------------------------------------------------

    def client(self) -> object:
        """A boto3 S3 client for this gateway (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="default",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
