"""A recorded source opened in the background (``backups.Deferred``): a
worker taking over never waits for a repository; reads wait for the open
under way, fail with EIO once it has failed, and try again later."""

from __future__ import annotations

import errno
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from blksnap.control import backups
from blksnap.control.backups import Deferred, Opened
from blksnap.errors import BlksnapError, IOFailure

UNIT = 4096


class FakeSource:
    """What ``BackupSource`` gives a ``Deferred``: shape, units, close."""

    def __init__(self, size: int = 4 * UNIT, identity: str = "id") -> None:
        self.size, self.unit, self.identity = size, UNIT, identity
        self.closed = False

    def is_zero(self, index: int) -> bool:
        return index == 3

    def read_unit(self, index: int) -> bytes:
        return bytes([index + 1]) * UNIT

    def close(self) -> None:
        self.closed = True


def opened(identity: str = "id") -> Opened:
    shape = {"size": 4 * UNIT, "unit": UNIT, "identity": identity}
    return Opened("/repo", "B", "disk0", None, None, shape)


class Gate:
    """A reopen that waits until released, then fails or gives a source."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.fail: BlksnapError | None = None
        self.made: list[FakeSource] = []

    def __call__(self, o: Opened) -> Any:
        self.calls += 1
        self.entered.set()
        assert self.go.wait(10)
        if self.fail is not None:
            raise self.fail
        self.made.append(FakeSource())
        return self.made[-1]


def test_made_without_waiting_and_a_read_waits_for_the_open() -> None:
    gate = Gate()
    src = Deferred(opened(), gate)  # returns while the open is held
    assert gate.entered.wait(10) and src.size == 4 * UNIT and src.unit == UNIT
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(src.read_unit(1)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not got  # waiting for the open, not failing
    gate.go.set()
    reader.join(10)
    assert got == [b"\x02" * UNIT] and gate.calls == 1
    assert src.is_zero(3) and not src.is_zero(0)
    src.close()
    assert gate.made[0].closed


def test_a_failed_open_fails_reads_with_eio_then_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate()
    gate.fail = IOFailure("the store does not answer")
    gate.go.set()
    clock = [100.0]
    monkeypatch.setattr(backups, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    src = Deferred(opened(), gate)
    with pytest.raises(BlksnapError) as exc:
        src.read_unit(0)  # (waits for the first open if it still runs)
    assert exc.value.errno == errno.EIO and "the store does not answer" in exc.value.message
    assert gate.calls == 1  # not tried again at once
    gate.fail = None
    clock[0] += Deferred.RETRY
    assert src.read_unit(0) == b"\x01" * UNIT and gate.calls == 2


def test_closed_while_opening_closes_what_it_opens() -> None:
    gate = Gate()
    src = Deferred(opened(), gate)
    assert gate.entered.wait(10)
    src.close()  # does not wait for the open
    gate.go.set()
    for _ in range(200):
        if gate.made and gate.made[0].closed:
            break
        threading.Event().wait(0.05)
    assert gate.made and gate.made[0].closed
    with pytest.raises(BlksnapError):
        src.read_unit(0)


def test_another_backup_in_its_place_is_refused() -> None:
    gate = Gate()
    gate.go.set()
    src = Deferred(opened(identity="other"), gate)
    with pytest.raises(BlksnapError) as exc:
        src.read_unit(0)
    assert "not the one recorded" in exc.value.message
    assert gate.made[0].closed
