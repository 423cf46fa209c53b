"""The client asks again when blksnapd's connection breaks under a request
that changes nothing (its worker restarted), says so with ``-v``, and never
sends a request that changes something twice. A small server here plays
blksnapd: it reads a request and closes, then answers the next."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

from blksnap.control.client import Client
from blksnap.control.protocol import HEADER, encode
from blksnap.errors import BlksnapError
from blksnap.tools.sandbox import BIN


class Flaky:
    """Drops the first ``drops`` connections after reading their request;
    answers the others (every request it read is kept in ``seen``)."""

    def __init__(self, path: Path, drops: int) -> None:
        self.path = str(path)
        self.drops = drops
        self.seen: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        (n,) = HEADER.unpack(self._read(conn, HEADER.size))
                        req = json.loads(self._read(conn, n))
                        self.seen.append(req)
                        if self.drops > 0:
                            self.drops -= 1
                            break  # closed with the request unanswered
                        result = {"daemon": "blksnapd test", "protocol": 1}
                        conn.sendall(encode({"id": req["id"], "ok": True, "result": result}))
                except (EOFError, OSError):
                    pass

    def close(self) -> None:
        self.sock.close()


def test_a_reading_request_is_asked_again_and_verbose_says_so(tmp_path: Path) -> None:
    server = Flaky(tmp_path / "s.sock", drops=2)
    try:
        quiet = subprocess.run([str(BIN / "blksnap"), "--socket", server.path, "version"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert quiet.returncode == 0, quiet.stderr
        assert "blksnapd test" in quiet.stdout and quiet.stderr == ""
        server.drops = 1
        loud = subprocess.run([str(BIN / "blksnap"), "-v", "--socket", server.path, "version"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert loud.returncode == 0, loud.stderr
        assert "version: " in loud.stderr and "asking again" in loud.stderr, loud.stderr
        assert [r["op"] for r in server.seen] == ["version"] * 5
    finally:
        server.close()


def test_a_changing_request_is_never_sent_twice(tmp_path: Path) -> None:
    server = Flaky(tmp_path / "s.sock", drops=1)
    try:
        with Client(server.path, timeout=10) as client:
            try:
                client.call("device.add", path="/nonexistent", name="x")
            except BlksnapError as exc:
                assert exc.errname == "ECONNRESET", exc
            else:
                raise AssertionError("a dropped device.add reported success")
        assert [r["op"] for r in server.seen] == ["device.add"]
    finally:
        server.close()
