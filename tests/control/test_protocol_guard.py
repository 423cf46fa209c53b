"""Malformed control messages, sector ranges and client timeouts, without a
daemon (the CLI-level proofs are in tests/integration/test_guard_cli.py)."""

from __future__ import annotations

import errno
import socket
import time

import pytest

from blksnap import Client
from blksnap.cli.app import _negative_ranges
from blksnap.control.protocol import decode_body
from blksnap.errors import BlksnapError
from blksnap.units import parse_sector_range


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b'{"id": ' + b"9" * 5000 + b"}",  # more digits than int() takes
        b"\xff\xfe",
        b"{not json",
        b"[1, 2]",
    ],
)
def test_malformed_bodies_are_ebadmsg(body):
    with pytest.raises(BlksnapError) as info:
        decode_body(body)
    assert info.value.errno == errno.EBADMSG, info.value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-5:8", "-5:8: sector must be >= 0; give SECTOR:COUNT"),
        ("5:0", "5:0: sector count must be > 0"),
        ("5", "5: not a sector range"),
        ("a:b", "a:b: not a sector range"),
    ],
)
def test_sector_range_errors_say_what_is_wrong(text, message):
    with pytest.raises(BlksnapError) as info:
        parse_sector_range(text)
    assert info.value.errno == errno.EINVAL and message in info.value.message


def test_negative_ranges_are_given_to_the_range_option():
    assert _negative_ranges(["markdirtyblock", "-d", "a", "-r", "-5:8"]) == [
        "markdirtyblock",
        "-d",
        "a",
        "--range=-5:8",
    ]
    assert _negative_ranges(["x", "-r", "0:8", "-5:8", "-d", "a"]) == [
        "x",
        *("-r", "0:8", "--range=-5:8", "-d", "a"),
    ]
    # Only after -r: other options and values are left alone.
    assert _negative_ranges(["x", "-l", "-5", "-d", "-a"]) == ["x", "-l", "-5", "-d", "-a"]


def test_client_times_out_on_a_silent_socket_and_drops_the_connection(tmp_path):
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    try:
        client = Client(path, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(BlksnapError) as info:
            client.devices()
        assert time.monotonic() - t0 < 3
        assert info.value.errno == errno.ETIMEDOUT
        assert "device.list" in info.value.message and path in info.value.message
        assert getattr(client._local, "sock", None) is None  # closed, never reused
        # A per-call override; 0 would mean no limit.
        t0 = time.monotonic()
        with pytest.raises(BlksnapError):
            client.call("version", _timeout=0.1)
        assert time.monotonic() - t0 < 2
        # wait_event: the wait plus the client's timeout as margin.
        t0 = time.monotonic()
        with pytest.raises(BlksnapError) as info:
            client.wait_event("x", timeout=0.5)
        assert 0.75 < time.monotonic() - t0 < 4
        assert info.value.errno == errno.ETIMEDOUT
        client.close()
    finally:
        srv.close()
