"""The drainable gate: freeze waits for requests in flight and holds new
ones; inside ``with no_wait:`` a held request is refused at once
(``WouldWait``, EAGAIN) instead of blocking; close fails later requests."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from blksnap.engine.gate import Gate, WouldWait, no_wait
from blksnap.errors import NoDevice


def test_freeze_holds_new_requests_until_unfreeze() -> None:
    gate = Gate()
    gate.freeze()
    entered = threading.Event()

    def request() -> None:
        with gate.request():
            entered.set()

    t = threading.Thread(target=request)
    t.start()
    assert not entered.wait(0.2)  # held while frozen
    gate.unfreeze()
    assert entered.wait(5)
    t.join()


def test_no_wait_request_is_refused_at_once_while_frozen() -> None:
    gate = Gate()
    gate.freeze()
    t0 = time.monotonic()
    with no_wait, pytest.raises(WouldWait) as info:
        gate.enter()
    assert time.monotonic() - t0 < 0.5
    assert info.value.errno == errno.EAGAIN
    assert gate.inflight == 0  # nothing entered
    gate.unfreeze()
    with no_wait:
        gate.enter()  # open gate: no_wait changes nothing
    gate.leave()
    assert not no_wait.active


def test_no_wait_is_per_thread() -> None:
    gate = Gate()
    gate.freeze()
    other_refused = []

    def other() -> None:
        try:
            gate.enter()  # not inside no_wait: waits
            gate.leave()
        except WouldWait:
            other_refused.append(True)

    with no_wait:
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.1)
    gate.unfreeze()
    t.join(5)
    assert not t.is_alive() and not other_refused


def test_closed_gate_fails_with_its_error_even_inside_no_wait() -> None:
    gate = Gate()
    gate.close(lambda: NoDevice("gone"))
    with pytest.raises(NoDevice):
        gate.enter()
    with no_wait, pytest.raises(NoDevice):
        gate.enter()
