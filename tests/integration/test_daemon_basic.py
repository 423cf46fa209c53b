"""blksnapd and the CLI: the basics, end to end, with a real ext4."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct

from tests.integration.conftest import run
from tests.integration.helpers import queue_limit

MiB = 1 << 20


def test_device_snapshot_image_ext4(daemon, backing, tmp_path):
    path = backing("a.img", 64 * MiB)
    add = json.loads(daemon.cli("--json", "device", "add", path, "--name", "a", "--loop").stdout)
    assert add["path"] == os.path.join(daemon.mount, "dev", "a")
    assert add["loop"].startswith("/dev/loop")
    # its completions are not steered to the submitting CPU (each would cost
    # blksnapd an inter-processor interrupt: blksnap.control.loop.unsteer)
    assert queue_limit(add["loop"], "rq_affinity") == 0
    run("mkfs.ext4", "-q", add["loop"])
    m1 = daemon.mount_fs(add["loop"], tmp_path / "m1")
    with open(os.path.join(m1, "before"), "wb") as f:
        f.write(os.urandom(3 * MiB))
    storage = tmp_path / "diff"
    storage.mkdir()
    sid = daemon.cli(
        "snapshot", "create", "-d", "a", "-f", str(storage), "-l", "64M"
    ).stdout.strip()
    take = json.loads(daemon.cli("--json", "snapshot", "take", "-i", sid, "--loop").stdout)
    img = take["images"]["a"]
    assert img["path"] == os.path.join(daemon.mount, "images", sid, "a")
    assert take["frozen"] == [m1]
    assert queue_limit(img["loop"], "rq_affinity") == 0
    with open(os.path.join(m1, "after"), "wb") as f:
        f.write(b"after")
    m2 = daemon.mount_fs(img["loop"], tmp_path / "m2", "ro", "noload")
    assert sorted(os.listdir(m2)) == ["before", "lost+found"]
    daemon.umount(m2)
    assert run("fsck.ext4", "-fn", img["loop"], check=False).returncode == 0
    collect = json.loads(daemon.cli("--json", "snapshot", "collect").stdout)
    assert [s["id"] for s in collect] == [sid]
    assert collect[0]["devices"] == [
        {**collect[0]["devices"][0], "name": "a", "image": img["path"], "loop": img["loop"]}
    ]
    daemon.cli("snapshot", "destroy", "-i", sid)
    assert not os.path.exists(img["path"])
    daemon.umount(m1)


def _raw_request(sock_path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(payload)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
                break
        return data


def _reply(data: bytes) -> dict:
    (n,) = struct.unpack(">I", data[:4])
    return json.loads(data[4 : 4 + n])


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_malformed_control_requests_get_errors_and_daemon_carries_on(daemon):
    cases = [
        (frame(b"{not json"), "EBADMSG"),
        (frame(b"[1,2]"), "EBADMSG"),
        (frame(json.dumps({"version": 99, "id": 1, "op": "version"}).encode()), "EPROTONOSUPPORT"),
        (frame(json.dumps({"version": 1, "id": 1, "op": "rm -rf"}).encode()), "ENOSYS"),
        (frame(json.dumps({"version": 1, "id": -1, "op": "version"}).encode()), "EINVAL"),
        (
            frame(
                json.dumps(
                    {"version": 1, "id": 2, "op": "device.add", "args": {"name": 3}}
                ).encode()
            ),
            "EINVAL",
        ),
        (
            frame(
                json.dumps(
                    {"version": 1, "id": 3, "op": "device.remove", "args": {"name": "x", "y": 1}}
                ).encode()
            ),
            "EINVAL",
        ),
        (struct.pack(">I", 1 << 30), "EMSGSIZE"),
        (struct.pack(">I", 0), "EBADMSG"),
    ]
    for payload, expected in cases:
        reply = _reply(_raw_request(daemon.sock, payload))
        assert reply["ok"] is False and reply["error"] == expected, (payload[:40], reply)
    # A client that hangs up mid-request.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.sock)
        s.sendall(struct.pack(">I", 100) + b'{"ver')
    assert daemon.client.status()["pid"] == daemon.proc.pid
    assert oct(os.stat(daemon.sock).st_mode & 0o777) == "0o600"


def test_cli_errors_name_the_errno(daemon, backing, tmp_path):
    path = backing("e.img", 8 * MiB)
    daemon.cli("device", "add", path, "--name", "e")
    daemon.cli("attach", "-d", "e")
    r = daemon.cli("attach", "-d", "e", check=False)
    assert r.returncode == 1 and "EALREADY" in r.stderr
    r = daemon.cli("--json", "attach", "-d", "e", check=False)
    assert r.returncode == 1 and json.loads(r.stderr)["error"] == "EALREADY"
    r = daemon.cli("attach", "-d", "e", "--filter", "nope", check=False)
    assert r.returncode == 1 and "ENOENT" in r.stderr
    storage = tmp_path / "d"
    storage.mkdir()
    sid = daemon.cli("snapshot", "create", "-d", "e", "-f", str(storage), "-l", "8M").stdout.strip()
    r = daemon.cli("snapshot", "create", "-d", "e", "-f", str(storage), "-l", "8M", check=False)
    assert r.returncode == 1 and "EBUSY" in r.stderr
    for args in (
        ["snapshot", "take", "-i", "00000000-0000-0000-0000-000000000000"],
        ["snapshot", "destroy", "-i", "nope"],
        ["cbtinfo", "-d", "nope"],
        ["device", "remove", "nope"],
    ):
        r = daemon.cli(*args, check=False)
        assert r.returncode == 1 and "ENOENT" in r.stderr, (args, r.stderr)
    r = daemon.cli("device", "remove", "e", check=False)
    assert r.returncode == 1 and "EBUSY" in r.stderr
    daemon.cli("snapshot", "destroy", "-i", sid)
    r = daemon.cli("detach", "-d", "e", "--filter", "nope", check=False)
    assert r.returncode == 1 and "ENOENT" in r.stderr
    assert errno.ENOENT  # names above are errno names


def test_daemon_stop_cleans_up(daemon, backing):
    path = backing("s.img", 8 * MiB)
    daemon.cli("device", "add", path, "--name", "s", "--loop")
    status = json.loads(daemon.cli("--json", "daemon", "status").stdout)
    assert status["running"] and len(status["loops"]) == 1
    daemon.cli("daemon", "stop")
    assert daemon.proc.wait(timeout=30) == 0
    assert not os.path.exists(daemon.sock)
    r = daemon.cli("daemon", "status", check=False)
    assert r.returncode == 1 and ("ENOENT" in r.stderr or "ECONNREFUSED" in r.stderr)


def test_device_remove_refused_while_its_file_is_open(daemon, backing):
    """``device remove`` says EBUSY while a process holds <mount>/dev/N open
    (its own loop device does not count), and goes through once it is closed."""
    for name, loop in (("plain", False), ("looped", True)):
        daemon.client.add_device(backing(name, 4 << 20), name, loop=loop)
        path = f"{daemon.mount}/dev/{name}"
        fd = os.open(path, os.O_RDONLY)
        try:
            r = daemon.cli("device", "remove", name, check=False)
            assert r.returncode == 1 and "EBUSY" in r.stderr and "open" in r.stderr, r.stderr
            assert name in [d["name"] for d in daemon.client.devices()]
        finally:
            os.close(fd)
        daemon.cli("device", "remove", name)  # the release may lag the close: it waits
        assert name not in [d["name"] for d in daemon.client.devices()]
