"""Guard rails of the ``blksnap`` command, through the CLI: timeouts on a
wedged daemon, the two-step snapshot (create, then appendstorage), devices
that are no disks, malformed control messages, and one-line errors (never a
traceback) for bad files, paths and ranges."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, run
from tests.integration.test_daemon_basic import _raw_request, _reply, frame

MiB = 1 << 20
README = Path(__file__).resolve().parents[2] / "README.md"


def blksnap(sock: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [str(BIN / "blksnap"), "--socket", sock, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def one_line_error(r: subprocess.CompletedProcess[str], errname: str, rc: int = 1) -> str:
    """The failure is exit ``rc`` with one line on stderr naming ``errname``."""
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert errname in lines[0], r.stderr
    return lines[0]


def json_error(r: subprocess.CompletedProcess[str], errname: str, rc: int = 1) -> dict:
    line = one_line_error(r, errname, rc)
    doc = json.loads(line)
    assert doc["error"] == errname, doc
    return doc


# -- 7: timeouts -----------------------------------------------------------------------


@contextlib.contextmanager
def stopped(pid: int):
    """The process ``pid`` (one this test started) stopped with SIGSTOP."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_timeout_on_a_stopped_daemon(daemon):
    # The worker answers requests (its supervisor only holds the socket).
    with stopped(daemon.client.status()["worker_pid"]):
        t0 = time.monotonic()
        r = blksnap(daemon.sock, "--timeout", "1", "device", "list", timeout=30)
        took = time.monotonic() - t0
        line = one_line_error(r, "ETIMEDOUT")
        assert took < 8, took
        assert "device.list" in line and daemon.sock in line and "1 s" in line, line
        assert "daemon status" in line and "log" in line, line
        # The environment says it too, and --json puts the error on stderr.
        r = blksnap(daemon.sock, "--json", "daemon", "status", env={"BLKSNAP_TIMEOUT": "1"})
        doc = json_error(r, "ETIMEDOUT")
        assert "daemon.status" in doc["message"]
        assert r.stdout == ""
        # After the command too.
        r = blksnap(daemon.sock, "cbtinfo", "-d", "x", "--timeout", "0.5", timeout=30)
        assert "cbt.info" in one_line_error(r, "ETIMEDOUT")
    # Woken up, it answers as before.
    assert json.loads(blksnap(daemon.sock, "--json", "device", "list").stdout) == []


class SilentServer:
    """A Unix socket that accepts connections and never answers; with
    ``late`` set, answers each request that many seconds late instead."""

    def __init__(self, path: str, late: float | None = None) -> None:
        self.path = path
        self.late = late
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            if self.late is not None:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                head = conn.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                body = conn.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
                req = json.loads(body)
                if self.done.wait(self.late):
                    return
                reply = {"version": 1, "id": req["id"], "ok": True, "result": req["op"]}
                conn.sendall(frame(json.dumps(reply).encode()))

    def close(self) -> None:
        self.done.set()
        self.sock.close()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        os.unlink(self.path)

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_timeout_on_a_socket_that_never_answers(tmp_path):
    sock = str(tmp_path / "silent.sock")
    with SilentServer(sock):
        t0 = time.monotonic()
        r = blksnap(sock, "--timeout", "1", "device", "list", timeout=30)
        assert time.monotonic() - t0 < 8
        line = one_line_error(r, "ETIMEDOUT")
        assert "device.list" in line and sock in line, line
        r = blksnap(sock, "--json", "--timeout", "1", "snapshot", "take", "-i", "x", timeout=30)
        assert "snapshot.take" in json_error(r, "ETIMEDOUT")["message"]
        # waitevent: its own wait (-t, milliseconds), then the margin.
        t0 = time.monotonic()
        r = blksnap(
            sock, "--timeout", "1", "snapshot", "waitevent", "-i", "x", "-t", "2000", timeout=30
        )
        took = time.monotonic() - t0
        assert "snapshot.waitevent" in one_line_error(r, "ETIMEDOUT")
        assert 2.8 < took < 10, took


def test_a_timed_out_connection_is_not_reused(tmp_path):
    """The late answer of a timed-out request must not answer the next one."""
    from blksnap import Client

    sock = str(tmp_path / "late.sock")
    with SilentServer(sock, late=1.5), Client(sock, timeout=0.5) as client:
        with pytest.raises(Exception) as info:
            client.call("version")
        assert getattr(info.value, "errname", None) == "ETIMEDOUT", info.value
        time.sleep(1.5)  # the late reply to "version" has arrived by now
        assert client.call("device.list", _timeout=5) == "device.list"


# -- 10: snapshot create without storage -------------------------------------------------


def test_snapshot_without_storage_two_steps(daemon, backing, tmp_path):
    path = backing("a.img", 16 * MiB)
    daemon.cli("device", "add", path, "--name", "a")
    daemon.cli("attach", "-d", "a")
    r = daemon.cli("--json", "snapshot", "create", "-d", "a")
    sid = json.loads(r.stdout)["id"]  # stdout: the JSON document alone
    assert "no diff storage" in r.stderr and f"appendstorage -i {sid} -f" in r.stderr, r.stderr
    # Take refuses, and changes nothing.
    r = daemon.cli("snapshot", "take", "-i", sid, check=False)
    line = one_line_error(r, "EINVAL")
    assert "no diff storage" in line and f"blksnap snapshot appendstorage -i {sid} -f" in line
    snap = json.loads(daemon.cli("--json", "snapshot", "collect").stdout)
    assert [(s["id"], s["state"], s["error"]) for s in snap] == [(sid, "created", None)]
    assert snap[0]["devices"][0]["image"] is None
    assert not os.path.exists(os.path.join(daemon.mount, "images", sid))
    info = json.loads(daemon.cli("--json", "cbtinfo", "-d", "a").stdout)
    # The second step, then take works.
    storage = tmp_path / "diff"
    storage.mkdir()
    daemon.cli("snapshot", "appendstorage", "-i", sid, "-f", str(storage), "-l", "16M")
    take = json.loads(daemon.cli("--json", "snapshot", "take", "-i", sid).stdout)
    assert os.path.exists(take["images"]["a"]["path"])
    after = json.loads(daemon.cli("--json", "cbtinfo", "-d", "a").stdout)
    assert after["changes_number"] == info["changes_number"] + 1  # the refused take did not count
    daemon.cli("snapshot", "destroy", "-i", sid)
    # Text mode: the id alone on stdout, the note on stderr.
    r = daemon.cli("snapshot", "create", "-d", "a")
    assert r.stdout.strip().count("\n") == 0 and "appendstorage" in r.stderr
    daemon.cli("snapshot", "destroy", "-i", r.stdout.strip())
    # With storage: no note.
    r = daemon.cli("snapshot", "create", "-d", "a", "-f", str(storage), "-l", "16M")
    assert r.stderr == ""
    daemon.cli("snapshot", "destroy", "-i", r.stdout.strip())
    helptext = daemon.cli("snapshot", "create", "--help").stdout
    assert "appendstorage" in helptext and "two steps" in helptext


# -- 11: devices that are no disks ---------------------------------------------------------


def test_device_add_refuses_what_is_no_disk(daemon, backing, tmp_path):
    empty = backing("empty.img", 0)
    odd = backing("odd.img", MiB + 100)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    cases = [
        (empty, "size 0"),
        (odd, "not a multiple of 512"),
        ("/proc/self/status", "pseudo file system"),
        ("/proc/cpuinfo", "pseudo file system"),
        ("/dev/null", "regular file"),
        ("/dev/zero", "regular file"),
        (fifo, "regular file"),
        (str(tmp_path), "regular file"),
    ]
    for path, why in cases:
        r = daemon.cli("device", "add", path, "--name", "x", "--loop", check=False)
        line = one_line_error(r, "EINVAL")
        assert why in line and path in line, line
        r = daemon.cli("--json", "device", "add", path, "--name", "x", check=False)
        assert why in json_error(r, "EINVAL")["message"]
        assert json.loads(daemon.cli("--json", "device", "list").stdout) == []
        assert os.listdir(os.path.join(daemon.mount, "dev")) == []
    assert os.path.getsize(empty) == 0 and os.path.getsize(odd) == MiB + 100
    # The name is free for a real disk.
    daemon.cli("device", "add", backing("ok.img", MiB), "--name", "x")
    assert os.listdir(os.path.join(daemon.mount, "dev")) == ["x"]


# -- 12: malformed messages, bad files, bad ranges ------------------------------------------


def test_deeply_nested_json_is_a_bad_message(daemon):
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b'{"id": ' + b"1" * 5000 + b"}"):
        reply = _reply(_raw_request(daemon.sock, frame(body)))
        assert reply["ok"] is False and reply["error"] == "EBADMSG", reply
        assert "internal error" not in reply["message"]
    assert daemon.client.status()["pid"] == daemon.proc.pid
    assert "RecursionError" not in daemon.log_text()


@pytest.fixture
def readonly_dir(tmp_path):
    where = tmp_path / "ro"
    where.mkdir()
    run("mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(where))
    try:
        yield str(where)
    finally:
        run("umount", str(where), check=False)


def test_cli_file_errors_are_one_line(daemon, backing, tmp_path, readonly_dir):
    daemon.cli("device", "add", backing("c.img", 4 * MiB), "--name", "c")
    daemon.cli("attach", "-d", "c")
    cases = [
        ("/nonexistent/x", "ENOENT"),
        (str(tmp_path), "EISDIR"),
        (os.path.join(readonly_dir, "map"), "EROFS"),
        ("/etc/hostname/x", "ENOTDIR"),
    ]
    for target, errname in cases:
        r = daemon.cli("readcbtmap", "-d", "c", "-f", target, check=False)
        assert target in one_line_error(r, errname)
        r = daemon.cli("--json", "readcbtmap", "-d", "c", "-f", target, check=False)
        json_error(r, errname)
        assert r.stdout == ""
    assert not os.path.exists(str(tmp_path) + ".tmp")  # nothing left half-written
    assert os.listdir(readonly_dir) == []
    # It still works where it can: a file, or a pipe (written, not replaced).
    daemon.cli("readcbtmap", "-d", "c", "-f", str(tmp_path / "map"))
    assert os.path.getsize(tmp_path / "map") == 64  # 4 MiB in 64 KiB blocks
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    got: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        r = daemon.cli("readcbtmap", "-d", "c", "-f", fifo, check=False)
        t.join(10)
    finally:
        if t.is_alive():  # unblock the reader's open
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(10)
    assert r.returncode == 0, r.stderr
    assert got == [bytes(64)] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    # A repository where none can be.
    r = daemon.cli("backup", "-d", "c", "--repo", "/etc/hostname/r", "--no-progress", check=False)
    one_line_error(r, "ENOTDIR")
    r = daemon.cli("backup", "-d", "c", "--repo", os.path.join(readonly_dir, "r"), check=False)
    one_line_error(r, "EROFS")
    assert json.loads(daemon.cli("--json", "snapshot", "collect").stdout) == []


def test_bad_sector_ranges_say_what_is_wrong(daemon, backing):
    daemon.cli("device", "add", backing("r.img", 4 * MiB), "--name", "r")
    daemon.cli("attach", "-d", "r")
    for ranges, what in (
        (["-5:8"], "-5:8: sector must be >= 0; give SECTOR:COUNT"),
        (["0:8", "-5:8"], "-5:8: sector must be >= 0"),
        (["5:0"], "5:0: sector count must be > 0"),
        (["5:-1"], "5:-1: sector count must be > 0"),
        (["x"], "x: not a sector range; give SECTOR:COUNT"),
    ):
        r = daemon.cli("markdirtyblock", "-d", "r", "-r", *ranges, check=False)
        assert what in one_line_error(r, "EINVAL", rc=2), r.stderr
        r = daemon.cli("--json", "markdirtyblock", "-d", "r", "-r", *ranges, check=False)
        assert what in json_error(r, "EINVAL", rc=2)["message"]
    daemon.cli("markdirtyblock", "-d", "r", "-r", "8:8", "0:1")


# -- 13: docs --------------------------------------------------------------------------------


def test_readme_says_how_to_mount_an_image_beside_its_original():
    text = README.read_text()
    assert "ro,nouuid,norecovery" in text and "ro,noload" in text
    assert "snapshot appendstorage -i" in text and "--timeout" in text


def test_usage_errors_without_a_daemon_are_one_line(tmp_path):
    sock = str(tmp_path / "none.sock")
    one_line_error(blksnap(sock, "--timeout", "abc", "device", "list"), "EINVAL", rc=2)
    one_line_error(blksnap(sock, "device", "list", env={"BLKSNAP_TIMEOUT": "-1"}), "EINVAL", rc=2)
    one_line_error(blksnap(sock, "device", "list"), "ENOENT")
